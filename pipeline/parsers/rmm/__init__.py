"""RMM alert mail (D9): one base stage that reads an alert, one small subclass per vendor.

Like Zammad's monitoring filters: `RmmAlertStage` recognises an alert by its sender and
subject, extracts device, site/customer, alert type, severity, alert id and whether the
mail is a recovery, claims the mail (`ctx.claimed_by`, so the loop guard leaves the flood to
the correlation) and puts an `AlertRecord` in `ctx.annotations[stage name]`. Finding the
ticket, counting repeats and completing it on recovery happen in the pipeline's stages
(pipeline/stages.py, DuplicateTicketRule), which have the database.

Every pattern is overridable per mailbox, because MSPs customise their alert templates:

    [mailbox.stage_settings.datto_rmm]
    senders = ['alerts@rmm\\.acme-msp\\.example']    # full-match regexes on the From address
    subject = '^Alert: (?P<alert_type>.+?) - (?P<device>\\S+)$'
    device = '^Host: *(?P<device>\\S+)'               # any field: a regex with that named group
    recovery = '^(?:Resolved|Cleared)\\b'              # searched in subject, then body
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pipeline.context import MailContext

FIELDS = ("device", "site", "alert_type", "severity", "alert_id")


@dataclass(frozen=True)
class AlertRecord:
    """What an alert mail says; `key` is the duplicate-ticket rule's key (vendor + device + alert)."""

    vendor: str  # the stage's name, e.g. "datto_rmm"
    device: str
    alert_type: str
    site: str | None = None
    severity: str | None = None
    alert_id: str | None = None
    recovered: bool = False

    @property
    def key(self) -> str:
        # Not the alert id: most vendors give a recovery (and each re-raise) an id of its own,
        # while device + alert type stays the same for one problem.
        return f"{self.vendor}:{self.device.lower()}:{_fold(self.alert_type)}"[:300]


def _fold(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE | re.MULTILINE)


def alert_of(ctx: MailContext) -> AlertRecord | None:
    """The alert record of the stage that claimed the mail, if an RMM stage did."""
    record = ctx.annotations.get(ctx.claimed_by or "")
    return record if isinstance(record, AlertRecord) else None


class RmmAlertStage:
    """Base of the RMM family: a vendor sets `name`, `senders`, `subject`, `body` and `recovery`."""

    name = "rmm_alert"
    # Full-match regexes on the From address: only these may claim a mail (D8's exception).
    senders: tuple[str, ...] = ()
    # Subject regexes with named groups from FIELDS; the first that matches says "an alert".
    subject: tuple[str, ...] = ()
    # A regex per field, searched in the body text (multi-line), when the subject lacks it.
    body: dict[str, str] = {}
    # A regex searched in the subject, then the body: this mail is the recovery of an alert.
    recovery: str = r"(?!)"

    def __call__(self, ctx: MailContext) -> None:
        if ctx.claimed_by:  # an earlier stage claimed it already
            return
        if not self.may_claim(ctx):
            return
        settings: dict[str, Any] = ctx.stage_settings(self.name)
        mail = ctx.parsed
        record = self.extract(mail.subject or "", mail.body_text or "", settings)
        if record is None:
            ctx.note(self.name, "not an alert", f"sender {mail.from_address} matches, subject and body do not")
            return
        ctx.claimed_by = self.name
        ctx.annotations[self.name] = record
        # Nobody answers a monitoring system: no acknowledgement mail to its no-reply sender.
        ctx.no_answer = ctx.no_answer or f"alert mail from {self.name}"
        ctx.note(self.name, "recovery" if record.recovered else "alert",
                 f"{record.device} / {record.alert_type}" + (f" at {record.site}" if record.site else "")
                 + (f", severity {record.severity}" if record.severity else "")
                 + (f", id {record.alert_id}" if record.alert_id else ""))

    def may_claim(self, ctx: MailContext) -> bool:
        """Is the mail from one of the vendor's senders, the only mail this stage may claim?"""
        senders = ctx.stage_settings(self.name).get("senders", self.senders)
        if isinstance(senders, str):
            senders = (senders,)
        return any(_compile(s).fullmatch(ctx.parsed.from_address or "") for s in senders)

    def extract(self, subject: str, body: str, settings: dict[str, Any] | None = None) -> AlertRecord | None:
        """The alert in a subject and body, or None when they are not an alert of this vendor."""
        settings = settings or {}
        subject = re.sub(r"\s+", " ", subject).strip()
        subject_patterns = settings.get("subject", self.subject)
        if isinstance(subject_patterns, str):
            subject_patterns = (subject_patterns,)
        found: dict[str, str] = {}
        matched = False
        for pattern in subject_patterns:
            m = _compile(pattern).search(subject)
            if m:
                matched = True
                found.update({k: v.strip() for k, v in m.groupdict().items() if v and v.strip()})
                break
        if not matched:
            return None
        for field in FIELDS:
            pattern = settings.get(field, self.body.get(field))
            if pattern and field not in found:
                m = _compile(pattern).search(body)
                if m and m.group(field) and m.group(field).strip():
                    found[field] = m.group(field).strip()
        if "device" not in found or "alert_type" not in found:
            return None
        recovery = _compile(settings.get("recovery", self.recovery))
        recovered = bool(recovery.search(subject) or recovery.search(body))
        return AlertRecord(vendor=self.name, device=found["device"], alert_type=found["alert_type"],
                           site=found.get("site"), severity=found.get("severity"),
                           alert_id=found.get("alert_id"), recovered=recovered)


# Vendors grade alerts in words of their own; the ticket's priority is D3's four.
_PRIORITY_WORDS = {
    "Critical": ("critical", "disaster", "emergency", "fatal"),
    "High": ("high", "major", "error", "failed", "failure"),
    "Medium": ("medium", "moderate", "warning", "minor"),
    "Low": ("low", "info", "information", "informational", "notice"),
}


def priority_for_severity(severity: str | None) -> str | None:
    """The ticket priority for an alert's severity word, or None for a word we do not know."""
    word = (severity or "").strip().lower()
    for priority, words in _PRIORITY_WORDS.items():
        if word in words:
            return priority
    return None
