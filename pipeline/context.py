"""The typed context a mail carries through the stages, and how a stage stops a mail."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pipeline.commands import CustomerAnswer, ParsedCommands
from pipeline.config import Config, MailboxConfig
from pipeline.parsers.mime import ParsedMail

Outcome = Literal["ticket_created", "note_added", "discarded", "already_processed", "quarantined", "rejected"]
EntityType = Literal["ticket", "task", "project"]


class StopMail(Exception):
    """Raised by a stage to end a mail's run with a named outcome (and no write)."""

    def __init__(self, outcome: Outcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


@dataclass(frozen=True)
class EntityRef:
    """A ticket, task or project number found in a mail, and how it was found."""

    type: EntityType
    number: str
    via: str  # "subject", "reply" (our Message-ID in In-Reply-To/References), or a plug-in's word


@dataclass
class TrustVerdict:
    passed: bool
    why: str
    authserv_id: str | None = None


@dataclass
class Sender:
    """Who sent the mail (D1.3). `kind` decides what the mail may do."""

    address: str
    name: str
    kind: Literal["resource", "contact", "new_contact", "unknown"]
    resource_id: int | None = None
    contact_id: int | None = None
    account_id: int | None = None  # None: the account is to be created on first use
    account_name: str | None = None
    # Set when the account is the mailbox's catch-all default: membership of it
    # proves nothing about who may write into a ticket (D8).
    account_is_default: bool = False
    policy: Literal["accept", "reject", "quarantine"] = "accept"
    why: str = ""


@dataclass
class Target:
    """Where the mail is written: an existing entity, or a new ticket (maybe linked)."""

    kind: Literal["existing", "new_ticket"]
    entity_type: EntityType = "ticket"
    entity_id: int | None = None
    number: str | None = None
    link_to_ticket_id: int | None = None
    internal: bool = False  # an unverified internal note (D8)
    why: str = ""
    # The mail answers one of our notifications on this (existing) ticket by In-Reply-To/References,
    # which vouches for a customer's `accept` or `close` (D2). Looked up by the resolve stage only
    # when that is what the mail says and it did not pass the trust policy; False otherwise.
    answers_notification: bool = False


@dataclass
class Written:
    """What the write stage wrote, for the stages after it (same transaction)."""

    entity_type: EntityType
    entity_id: int
    number: str
    note_id: int | None
    created: bool  # a new ticket, not a note on an existing entity
    text: str  # the note's (or new ticket's) text without command lines: a time entry's summary


@dataclass
class TraceStep:
    stage: str
    decision: str
    why: str

    def as_json(self) -> dict[str, str]:
        return {"stage": self.stage, "decision": self.decision, "why": self.why}


@dataclass
class MailContext:
    config: Config
    mailbox: MailboxConfig
    raw: bytes
    received_at: datetime
    journal_id: int | None = None
    dry_run: bool = False
    mail: ParsedMail | None = None
    identity: str | None = None
    trust: TrustVerdict | None = None
    sender: Sender | None = None
    references: list[EntityRef] = field(default_factory=list)
    target: Target | None = None
    # Set by an RMM (or other) stage that takes over flood handling: exempt from the loop guard.
    claimed_by: str | None = None
    # Why this mail must never be answered (auto-reply, bounce, unverified…), or None.
    no_answer: str | None = None
    # Commands at the top of the body (D4), and whether they may apply (and why / why not).
    commands: ParsedCommands | None = None
    commands_apply: bool = False
    commands_why: str = ""
    # A customer's `accept`, `reject: reason` or `close` (D2).
    customer_answer: CustomerAnswer | None = None
    written: Written | None = None
    # Free-form annotations from plug-in stages, keyed by the stage's name.
    annotations: dict[str, Any] = field(default_factory=dict)
    trace: list[TraceStep] = field(default_factory=list)
    # Set by the write stage: what was (or, in a dry run, would be) written.
    outcome: Outcome | None = None
    entity: dict[str, str | None] | None = None

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The mailbox's `[mailbox.stage_settings.<stage>]` table; {} when it has none."""
        return dict(self.mailbox.stage_settings.get(stage, {}))

    def note(self, stage: str, decision: str, why: str = "") -> None:
        self.trace.append(TraceStep(stage, decision, why))

    @property
    def parsed(self) -> ParsedMail:
        assert self.mail is not None, "the parse stage has not run"
        return self.mail


@dataclass
class Result:
    """What happened to one mail: the `ingest --json` object of D6."""

    outcome: Outcome
    entity: dict[str, str] | None
    reason: str | None
    trace: list[TraceStep]
    journal_id: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "entity": self.entity,
            "reason": self.reason,
            "trace": [t.as_json() for t in self.trace],
        }
