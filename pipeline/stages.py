"""The stages of D1, and the pipeline: the ordered list at the bottom of this module.

Each stage is a small class with a `name` and `__call__(ctx, env)`: it reads the typed
`MailContext`, annotates it, notes its decision in the trace, and stops the mail by
raising `StopMail` with a named outcome. The decisions themselves live in plain
functions (`parse_mail`, `evaluate`, `decide_sender`, `normalise_subject`, …) that need
no database, Redis or Celery; `env` gives a stage the reads and the Redis it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from itertools import takewhile
from typing import Any, Iterable, Protocol

from sqlalchemy.orm import Session

from pipeline.attribute import decide_sender
from pipeline.commands import command_authority, parse_commands, parse_customer_answer
from pipeline.context import MailContext, Sender, StopMail, Target
from pipeline.dedup.loop_guard import AskedAhead, LoopGuard
from pipeline.lifecycle import ENDING_WORDS, effective_status, settings_for, utc
from pipeline.notify.plan import status_changed_notice
from pipeline.notify.recipients import prefetch_answers
from pipeline.parsers.mime import Unparseable, mail_identity, parse_mail
from pipeline.parsers.references import (
    answered_message_ids,
    find_references_in_subject,
    references_from_message_ids,
)
from pipeline.parsers.rmm import AlertRecord, RmmAlertStage, alert_of
from pipeline.parsers.subject import normalise_subject
from pipeline.registry import build_parser_stages
from pipeline.store.apply import apply_changes
from pipeline.store.locks import lock_conversation, try_conversation_locks
from pipeline.store.lookups import EntityInfo, Lookups
from pipeline.store.new_contacts import ExpectedContact, expect_contacts
from pipeline.store.numbers import foresee_numbers
from pipeline.store.rows import holding_back
from pipeline.store.write import write_mail
from pipeline.trust import evaluate


@dataclass
class StageEnv:
    session: Session
    lookups: Lookups
    loop_guard: LoopGuard
    asked_ahead: AskedAhead | None = None  # a batch's loop-guard answers, asked before the mails' turns


class Stage(Protocol):
    name: str

    def __call__(self, ctx: MailContext, env: StageEnv) -> None: ...


class Parse:
    """MIME, headers, bodies, attachments, auto-reply signals; unparseable → quarantine."""

    name = "parse"
    reads_store = False

    def __call__(self, ctx: MailContext, env: StageEnv) -> None:
        try:
            ctx.mail = parse_mail(ctx.raw, max_attachment_bytes=ctx.mailbox.max_attachment_bytes)
        except Unparseable as exc:
            ctx.note(self.name, "unparseable", str(exc))
            raise StopMail("quarantined", f"unparseable: {exc}") from None
        ctx.identity = mail_identity(ctx.mail)
        m = ctx.mail
        skipped = sum(1 for a in m.attachments if a.skipped)
        ctx.note(self.name, "parsed", f"from {m.from_address}, subject {m.subject!r}, "
                 f"{len(m.body_text)} chars of text, {len(m.attachments)} attachment(s)"
                 + (f", {skipped} skipped" if skipped else "")
                 + (f"; repaired: {'; '.join(m.warnings)}" if m.warnings else ""))


class Authenticate:
    """Did the mail pass the mailbox's trust policy (D8)?"""

    name = "authenticate"
    reads_store = False

    def __call__(self, ctx: MailContext, env: StageEnv) -> None:
        ctx.trust = evaluate(ctx.parsed.headers, ctx.parsed.from_address, ctx.mailbox.trust)
        ctx.note(self.name, "passed" if ctx.trust.passed else "not passed", ctx.trust.why)


class Attribute:
    """Resource, contact, or unknown sender under the mailbox's policy (D1.3)."""

    name = "attribute"

    def __call__(self, ctx: MailContext, env: StageEnv) -> None:
        ctx.sender = self.sender_of(ctx, env)
        decision = ctx.sender.kind if ctx.sender.policy == "accept" else ctx.sender.policy
        if ctx.sender.kind == "resource" and not ctx.trust.passed:
            decision = "unverified resource"
            ctx.no_answer = "mail from a resource address that failed the trust policy"
        ctx.note(self.name, decision, ctx.sender.why)

    @classmethod
    def sender_of(cls, ctx: MailContext, env: StageEnv) -> Sender:
        """Who the parsed, authenticated mail is from, as the directory stands in this transaction."""
        sender = cls._who(ctx, env, ctx.parsed.from_address, ctx.parsed.from_name)
        forwarded = ctx.parsed.forwarded
        if (sender.kind == "resource" and ctx.trust.passed and forwarded is not None
                and forwarded.from_address and forwarded.from_address != ctx.parsed.from_address):
            # A technician forwarded a customer's mail (Outlook's Forward, not a redirect): the
            # customer is the sender. Only for an authenticated resource, or anyone could forward
            # a mail to speak as a customer.
            forwarder = sender.address
            sender = cls._who(ctx, env, forwarded.from_address, forwarded.from_name)
            sender.why = f"forwarded by {forwarder}: {sender.why}"
        return sender

    @staticmethod
    def _who(ctx: MailContext, env: StageEnv, address: str, name: str) -> Sender:
        policy = ctx.mailbox.unknown_sender
        resource, contact = env.lookups.person(address)
        contact = None if resource else contact
        domain_account = default = None
        if not resource and not contact:
            domain_account = env.lookups.account_by_domain(address.rsplit("@", 1)[-1])
            default = env.lookups.account_by_name(policy.default_account)
        return decide_sender(
            address, name,
            resource=resource and (resource.id, resource.name),
            contact=contact and (contact.id, contact.name, contact.account_id, contact.account_name),
            domain_account=domain_account and (domain_account.id, domain_account.name),
            default_account=default and (default.id, default.name),
            policy=policy,
            public_domains_extra=ctx.config.settings.directory.public_domains_extra,
        )


class Extract:
    """The mailbox's parser stages (D9), in its configured order: numbers, replies, plug-ins."""

    name = "extract"

    def __call__(self, ctx: MailContext, env: StageEnv) -> None:
        for stage in build_parser_stages(ctx.mailbox.parser_stages):
            stage(ctx)


class ReadCommands:
    """Commands at the top of the body (D4) and whether they may apply (D8); a customer's answer (D2)."""

    name = "commands"

    def __call__(self, ctx: MailContext, env: StageEnv) -> None:
        ctx.commands = found = parse_commands(ctx.parsed.body_new)
        if ctx.sender.kind != "resource":
            ctx.customer_answer = parse_customer_answer(found.text)
        if not found.found:
            answer = ctx.customer_answer
            ctx.note(self.name, f"customer answer: {answer.word}" if answer else "none",
                     "first line of the customer's text" if answer else "no command lines at the top of the body")
            return
        ctx.commands_apply, ctx.commands_why = command_authority(ctx.sender.kind, ctx.trust.passed, ctx.trust.why)
        counted = f"{len(found.commands)} command(s), {len(found.failures)} that do not parse"
        ctx.note(self.name, "apply" if ctx.commands_apply else "not applied", f"{counted}; {ctx.commands_why}")


class Resolve:
    """Which entity the mail is written to, under D8's rule on who may write where."""

    name = "resolve"

    def __call__(self, ctx: MailContext, env: StageEnv) -> None:
        alert = alert_of(ctx)
        if alert is not None:
            self._alert(ctx, env, alert)
            return
        sender = ctx.sender
        unverified = sender.kind == "resource" and not ctx.trust.passed
        chosen: EntityInfo | None = None  # the existing entity it is written to
        for ref in ctx.references:
            entity = env.lookups.entity(ref)
            if entity is None:
                ctx.note(self.name, "unknown number", f"{ref.type} {ref.number} does not exist")
                continue
            allowed, why = self._may_write(ctx, env, entity, ref.via)
            if not allowed:
                ctx.note(self.name, "not attached", f"{ref.number}: {why}")
                continue
            closed = self._closed(ctx, entity)
            if closed:
                ctx.target = Target("new_ticket", link_to_ticket_id=entity.id,
                                    internal=unverified, why=f"{entity.number} {closed}; new ticket linked to it")
            else:
                ctx.target = Target("existing", entity.type, entity.id, entity.number, internal=unverified,
                                    why=f"{entity.number}: {why}")
                chosen = entity
            break
        else:
            ctx.target = Target("new_ticket", internal=unverified,
                                why="no reference" if not ctx.references else "no reference it may write to")
        if unverified:
            ctx.target.why += "; unverified sender: internal note only"
        ctx.note(self.name, "note on " + ctx.target.number if ctx.target.kind == "existing" else "new ticket",
                 ctx.target.why)
        if chosen is not None:
            self._vouch(ctx, env, chosen)

    def _alert(self, ctx: MailContext, env: StageEnv, alert: AlertRecord) -> None:
        """Alert mail: the account is the alert's site/customer; the ticket is found by alert key.

        D8's rule on who may write into a ticket is about people. An RMM stage claims a mail only
        when its sender matches the vendor's configured sender (pipeline/parsers/rmm), and that
        monitoring system is the documented exception: its ticket is the one its alert key names
        (DuplicateTicketRule), although the RMM is nobody's contact.
        """
        account = env.lookups.account_by_name(alert.site) if alert.site else None
        ctx.sender = Sender(
            ctx.parsed.from_address, ctx.parsed.from_name, kind="unknown",
            account_id=account.id if account else None, account_name=account.name if account else None,
            account_is_default=account is None, policy="accept",
            why=(f"alert for site {alert.site!r}: account {account.name}" if account else
                 f"alert for site {alert.site!r}: no account of that name, the mailbox's default"),
        )
        ctx.target = Target("new_ticket", why=f"alert mail ({alert.vendor}): found by alert key, not by reference")
        ctx.note(self.name, "alert", ctx.sender.why)

    def _vouch(self, ctx: MailContext, env: StageEnv, entity: EntityInfo) -> None:
        """Does the mail answer our notification on this ticket? It vouches for `accept`/`close` (D2).

        Asked only of a customer's `accept` or `close` that did not pass the trust policy: for
        every other mail the answer changes nothing, and one query per mail would be wasted.
        """
        answer, target, trust = ctx.customer_answer, ctx.target, ctx.trust
        assert target is not None and trust is not None, "called after the target is chosen"
        if entity.type != "ticket" or answer is None or answer.word not in ENDING_WORDS or trust.passed:
            return
        ours = env.lookups.sent_by_us(answered_message_ids(ctx.parsed), entity)
        target.answers_notification = ours
        ctx.note(self.name, f"`{answer.word}` " + ("vouched for" if ours else "not vouched for"),
                 f"answers our notification on {entity.number}" if ours else
                 f"did not pass the trust policy and answers no notification of ours on {entity.number}")

    @staticmethod
    def _closed(ctx: MailContext, entity: EntityInfo) -> str | None:
        """Why the ticket counts as Closed when this mail arrives, or None (D2)."""
        if entity.type != "ticket":
            return None
        if entity.status == "Closed":
            return "is Closed"
        settings = settings_for(ctx.config, entity.source_mailbox)
        if entity.state and effective_status(entity.state, settings, ctx.received_at) == "Closed":
            return f"was due to close ({entity.status}, its time ran out)"
        return None

    @staticmethod
    def _may_write(ctx: MailContext, env: StageEnv, entity: EntityInfo, via: str) -> tuple[bool, str]:
        s = ctx.sender
        mail = ctx.parsed
        if via == "reply" and env.lookups.sent_by_us(answered_message_ids(mail), entity):
            return True, "answers our notification"
        if s.kind == "resource":
            return True, "sender is a resource"
        if s.contact_id is not None and s.contact_id == entity.contact_id:
            return True, "sender is the ticket's contact"
        if s.account_id is not None and not s.account_is_default and s.account_id == entity.account_id:
            return True, f"sender belongs to its account {s.account_name}"
        if env.lookups.was_notified(s.address, entity):
            return True, "sender received a notification on it"
        return False, "the sender is not its contact, of its account, a resource or a notified recipient"


class AlreadyProcessed:
    """Gate 1: the same mail identity is processed once, across mailboxes and workers."""

    name = "already_processed"

    def __call__(self, ctx: MailContext, env: StageEnv) -> None:
        ours, journal_id = env.lookups.seen_before(ctx.parsed.message_id, ctx.identity)
        if ours:
            # Our own notification came back (a forwarding rule, a Cc to another mailbox): it is
            # in the store already, and answering it would start a loop.
            ctx.note(self.name, "our own notification", f"{ctx.parsed.message_id} was sent by this mailloop")
            raise StopMail("discarded", "our own notification came back")
        if journal_id is not None and journal_id != ctx.journal_id:
            ctx.note(self.name, "already processed", f"same mail as journal #{journal_id}")
            raise StopMail("already_processed", f"same mail as journal #{journal_id}")
        ctx.note(self.name, "new", "identity not seen before")


class LoopGuardGate:
    """Gate 2: at most N mails per mailbox + sender + normalised subject per window."""

    name = "loop_guard"

    def __call__(self, ctx: MailContext, env: StageEnv) -> None:
        settings = ctx.config.loop_guard_for(ctx.mailbox)
        if ctx.claimed_by:
            ctx.note(self.name, "exempt", f"claimed by {ctx.claimed_by}, which correlates floods itself")
            return
        if ctx.sender.kind == "resource" and ctx.trust.passed and settings.exempt_trusted_resources:
            ctx.note(self.name, "exempt", "authenticated resource")
            return
        question = self.question(ctx)
        subject_key = question["normalised_subject"]
        decision = ((env.asked_ahead and env.asked_ahead.take(ctx.journal_id, question))
                    or env.loop_guard.check(**question))
        window = f"{settings.limit} per {settings.window_seconds}s"
        if not decision.admitted:
            why = (f"{decision.seen} mails from {ctx.parsed.from_address} with subject {subject_key!r} "
                   f"already in the window ({window})")
            ctx.note(self.name, "discard", why)
            raise StopMail("discarded", f"loop guard: {why}")
        seen = "counted before (replay)" if decision.seen < 0 else f"{decision.seen + 1} of {settings.limit}"
        ctx.note(self.name, "pass", f"{seen} in the window ({window})")

    @staticmethod
    def question(ctx: MailContext) -> dict[str, Any]:
        """What the gate asks the loop guard about this mail (`LoopGuard.check`'s arguments)."""
        settings = ctx.config.loop_guard_for(ctx.mailbox)
        return dict(mailbox=ctx.mailbox.name, sender=ctx.parsed.from_address,
                    normalised_subject=normalise_subject(ctx.parsed.subject), at=ctx.received_at.timestamp(),
                    member=str(ctx.journal_id or ""), limit=settings.limit,
                    window_seconds=settings.window_seconds, peek=ctx.dry_run)


class AutoReplyGate:
    """Gate 3: auto-replies and bounces are written like other mail but never answered."""

    name = "auto_reply"

    def __call__(self, ctx: MailContext, env: StageEnv) -> None:
        why = ctx.parsed.auto_reply_why or ctx.parsed.bounce_why
        if why:
            kind = "bounce" if ctx.parsed.bounce_why else "auto-reply"
            ctx.no_answer = ctx.no_answer or f"{kind}: {why}"
            ctx.note(self.name, f"{kind}: never answered", why)
        else:
            ctx.note(self.name, "person", "no auto-reply or bounce signal")


class SenderPolicy:
    """Unknown senders the mailbox rejects or quarantines stop here, after the gates."""

    name = "sender_policy"

    def __call__(self, ctx: MailContext, env: StageEnv) -> None:
        if ctx.sender.policy == "reject":
            ctx.note(self.name, "reject", ctx.sender.why)
            raise StopMail("rejected", ctx.sender.why)
        if ctx.sender.policy == "quarantine":
            ctx.note(self.name, "quarantine", ctx.sender.why)
            raise StopMail("quarantined", ctx.sender.why)
        ctx.note(self.name, "accept", ctx.sender.why)


class DuplicateTicketRule:
    """Gate 4: a new conversation that repeats an open ticket's subject (D1.5.4)."""

    name = "duplicate_ticket"

    def __call__(self, ctx: MailContext, env: StageEnv) -> None:
        alert = alert_of(ctx)
        if alert is not None:
            self._alert(ctx, env, alert)
            return
        if ctx.target.kind != "new_ticket" or ctx.references or ctx.target.internal:
            ctx.note(self.name, "not applicable", "the mail refers to an entity" if ctx.references
                     else "not a new customer conversation")
            return
        s = ctx.sender
        key = normalise_subject(ctx.parsed.subject)
        if not ctx.dry_run:
            lock_conversation(env.session, key)  # a concurrent first mail commits its ticket first
        account = None if s.account_is_default else s.account_id
        ticket = env.lookups.open_ticket_like(key, s.contact_id, account)
        if ticket is None:
            ctx.note(self.name, "no match", "no open ticket with this subject from this sender or account")
            return
        rule = ctx.mailbox.duplicate_ticket.rule
        if rule == "note":
            ctx.target = Target("existing", "ticket", ticket.id, ticket.number,
                                why=f"same subject as open ticket {ticket.number}")
        elif rule == "link":
            ctx.target = Target("new_ticket", link_to_ticket_id=ticket.id,
                                why=f"same subject as open ticket {ticket.number}; new ticket linked to it")
        ctx.note(self.name, {"note": f"note on {ticket.number}", "link": f"new ticket linked to {ticket.number}",
                             "new": "new ticket"}[rule], f"open ticket {ticket.number} has the same subject; "
                 f"mailbox rule is {rule!r}")


    def _alert(self, ctx: MailContext, env: StageEnv, alert: AlertRecord) -> None:
        """The duplicate-ticket rule by alert key: the open ticket for vendor + device + alert (D9)."""
        if not ctx.dry_run:
            lock_conversation(env.session, "alert:" + alert.key)  # a storm's first mails make one ticket
        flap = ctx.mailbox.alerts.flap_window_seconds
        ticket = env.lookups.alert_ticket(alert.key, utc(ctx.received_at) - timedelta(seconds=flap))
        if ticket is None and alert.recovered:
            ctx.note(self.name, "discard", f"recovery of {alert.key}: no open ticket for this alert")
            raise StopMail("discarded", f"recovery without an open alert ticket ({alert.key})")
        if ticket is None:
            ctx.note(self.name, "new alert ticket", f"no open ticket for {alert.key}")
            return
        if alert.recovered and ticket.status == "Resolved":
            ctx.note(self.name, "discard", f"{ticket.number} has recovered already")
            raise StopMail("discarded", f"repeated recovery of {ticket.number}")
        what = ("recovery" if alert.recovered else
                "fired again after recovery (flapping)" if ticket.status == "Resolved" else "repeat")
        ctx.target = Target("existing", "ticket", ticket.id, ticket.number, why=f"alert {what} of {alert.key}")
        ctx.note(self.name, f"{what} on {ticket.number}", f"same vendor, device and alert: {alert.key}")


class Write:
    """One transaction: the ticket or note, attachments, timeline, outbox, journal outcome."""

    name = "write"

    def __call__(self, ctx: MailContext, env: StageEnv) -> None:
        write_mail(env.session, ctx)


class Apply:
    """In the same transaction: a resource's first update, commands, a customer's answer (D2, D4)."""

    name = "apply"

    def __call__(self, ctx: MailContext, env: StageEnv) -> None:
        if ctx.dry_run:
            c = ctx.commands
            would = "nothing to apply"
            if c and c.found and ctx.commands_apply:
                would = "would apply " + "; ".join(
                    [x.text for x in c.commands] + [f"line {f.line} fails: {f.why}" for f in c.failures])
            elif c and c.found:
                would = f"would apply no commands: {ctx.commands_why}"
            ctx.note(self.name, would, "dry run: nothing written")
            return
        apply_changes(env.session, ctx)
        # After every command has applied: the contact hears of the status the mail left (D1.7).
        status_changed_notice(env.session, ctx)


# The pipeline (D1, D9). The order is the specification: gates run in D1.5's order and
# nothing is written before every gate has passed.
PIPELINE: tuple[Stage, ...] = (
    Parse(),
    Authenticate(),
    Attribute(),
    Extract(),
    ReadCommands(),
    Resolve(),
    AlreadyProcessed(),
    LoopGuardGate(),
    AutoReplyGate(),
    SenderPolicy(),
    DuplicateTicketRule(),
    Write(),
    Apply(),
)

# The leading stages that read neither the store nor Redis (`reads_store = False`). A batch runs
# them on every one of its mails first, then asks the next stages' per-mail reads for the whole
# batch at once (`prefetch`); each mail then goes on from the first stage after them.
AHEAD: tuple[Stage, ...] = tuple(takewhile(lambda stage: getattr(stage, "reads_store", True) is False, PIPELINE))


def prefetch(contexts: Iterable[MailContext], env: StageEnv) -> None:
    """The attribute stage's and the first gate's reads for a batch's parsed mails, the loop
    guard's checks and the duplicate-ticket rule's conversation locks: seven round trips for the
    batch instead of up to four per mail (bench/README.md, issue 10). On PostgreSQL, also the new
    senders whose contacts the batch writes in one statement (`new_contacts`)."""
    parsed = [ctx for ctx in contexts if ctx.mail is not None and ctx.identity]
    env.lookups.prefetch_people(address for ctx in parsed for address in (
        ctx.parsed.from_address, ctx.parsed.forwarded.from_address if ctx.parsed.forwarded else None))
    env.lookups.prefetch_seen((ctx.parsed.message_id, ctx.identity) for ctx in parsed)
    env.asked_ahead = AskedAhead(env.loop_guard, _loop_questions(parsed, env))
    try_conversation_locks(env.session, (normalise_subject(ctx.parsed.subject) for ctx in parsed))
    if env.session.get_bind().dialect.name == "postgresql" and holding_back(env.session):
        # A SQLite batch holds its new contacts back instead: no other writer can race it for them.
        expect_contacts(env.session, _new_senders(parsed, env))
        foresee_numbers(env.session, "ticket", len({_conversation(ctx) for ctx in parsed if _may_open_ticket(ctx, env)}))
    # Where the outbox statement counts them itself (PostgreSQL, outbox rows written at once), not needed.
    if env.session.get_bind().dialect.name != "postgresql" or holding_back(env.session):
        prefetch_answers(env.session, [(ctx.parsed.from_address.lower(), ctx.mailbox.notifications.answer_window_seconds)
                                       for ctx in parsed if ctx.parsed.from_address])


def _new_senders(parsed: list[MailContext], env: StageEnv) -> dict[str, ExpectedContact]:
    """The contacts a batch's mails will most likely create: each new sender's, as its first mail
    would be attributed (a later mail finds the contact the first created)."""
    found: dict[str, ExpectedContact] = {}
    for ctx in parsed:
        if ctx.trust is None:  # failed before the authenticate stage: it ends there in its turn
            continue
        if _may_be_alert(ctx):
            continue  # most likely an alert, whose sender is nobody's contact (Resolve._alert)
        sender = Attribute.sender_of(ctx, env)
        if sender.kind == "new_contact" and sender.address not in found:
            found[sender.address] = ExpectedContact(sender.name or "", sender.account_id,
                                                    ctx.mailbox.unknown_sender.default_account)
    return found


def _may_be_alert(ctx: MailContext) -> bool:
    return any(isinstance(stage, RmmAlertStage) and stage.may_claim(ctx)
               for stage in build_parser_stages(ctx.mailbox.parser_stages))


def _may_open_ticket(ctx: MailContext, env: StageEnv) -> bool:
    """Whether a batch's mail will most likely need a new ticket's number: it got past the
    authenticate stage, the loop guard did not say discard when asked ahead, and it names no
    ticket, task or project in its subject or by our Message-IDs. Alerts are left out: most of a
    storm's are repeats of an open alert ticket."""
    if ctx.trust is None or ctx.dry_run or _may_be_alert(ctx):
        return False
    answer = env.asked_ahead.answers.get(ctx.journal_id) if env.asked_ahead else None
    if answer is not None and not answer.admitted:
        return False
    mail = ctx.parsed
    return not (find_references_in_subject(mail.subject, ctx.config.settings.numbering)
                or references_from_message_ids(answered_message_ids(mail)))


def _conversation(ctx: MailContext) -> tuple[str, str] | int:
    """Where the duplicate-ticket rule makes notes, a conversation's second mail in the batch most
    likely becomes a note on the ticket its first opens: they count once."""
    if ctx.mailbox.duplicate_ticket.rule != "note":
        return id(ctx)
    return ctx.parsed.from_address.lower(), normalise_subject(ctx.parsed.subject)


def _loop_questions(parsed: list[MailContext], env: StageEnv) -> dict[int, dict[str, Any]]:
    """The loop guard's question for each mail of a batch that will most likely reach the gate
    unexempted: not from a trusted resource. A mail whose key another mail of the batch shares
    (a looping sender, an alert storm) is asked in its turn, where its answer depends on theirs."""
    asked: dict[int, tuple[str, dict[str, Any]]] = {}
    by_key: dict[str, int] = {}
    for ctx in parsed:
        q = LoopGuardGate.question(ctx)
        key = env.loop_guard.key(q["mailbox"], q["sender"], q["normalised_subject"])
        by_key[key] = by_key.get(key, 0) + 1  # every mail counts here, asked ahead or not
        if ctx.trust is None or ctx.dry_run or ctx.journal_id is None or not ctx.parsed.from_address:
            continue
        resource, _contact = env.lookups.person(ctx.parsed.from_address)
        if resource and ctx.trust.passed and ctx.config.loop_guard_for(ctx.mailbox).exempt_trusted_resources:
            continue
        asked[ctx.journal_id] = key, q
    return {journal_id: q for journal_id, (key, q) in asked.items() if by_key[key] == 1}
