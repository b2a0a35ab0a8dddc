"""Subject normalisation (D1.5) for the loop guard and the duplicate-ticket rule."""

from __future__ import annotations

import re

# Reply/forward prefixes: RE, FW, FWD, AW, WG, SV, VS, RV, TR, Antw/Antwort, optionally
# numbered ("RE[2]:", "Re(3):"), in any case, repeated.
_PREFIX = re.compile(
    r"^\s*(?:re|fw|fwd|aw|wg|sv|vs|rv|tr|antw|antwort|ant)\s*(?:\[\d+\]|\(\d+\))?\s*[:：]\s*",
    re.IGNORECASE,
)
# Tags that mail gateways prepend in front of the prefixes.
_GATEWAY_TAG = re.compile(r"^\s*(?:\[(?:external|ext|extern|caution|spam|suspected spam)\]|\*external\*)\s*",
                          re.IGNORECASE)


def strip_prefixes(subject: str) -> str:
    """`RE: [EXTERNAL] Fwd: AW: Printer down` → `Printer down` (case kept)."""
    text = subject or ""
    while True:
        stripped = _GATEWAY_TAG.sub("", text, count=1)
        stripped = _PREFIX.sub("", stripped, count=1)
        if stripped == text:
            return " ".join(text.split())
        text = stripped


def normalise_subject(subject: str) -> str:
    """`RE: Fwd: AW:  Printer  down` → `printer down`; a ticket tag is kept."""
    return strip_prefixes(subject).casefold()


def ticket_title(subject: str, tag: re.Pattern[str]) -> str:
    """A new ticket's title: the subject without reply prefixes and without our ticket tags."""
    title = " ".join(tag.sub(" ", strip_prefixes(subject)).split())
    return strip_prefixes(title) or "(no subject)"
