"""Subject normalisation (D1.5) for the loop guard and the duplicate-ticket rule.

The leading run of a subject is read token by token: reply/forward prefixes (RE, FW, FWD,
AW, WG, SV, VS, RV, TR, Antw, … in any case, numbered like `RE[2]:` or `Re^3:`, with a
French space before the colon) and gateway tags (`[EXTERNAL]`, `*EXTERNAL*`, `EXTERNAL:`,
`[SPAM]`, …) are dropped wherever they stand in that run; other bracket tags (mailing-list
names, our own `[Ticket#…]`) are kept, in order, once each — so "[acme-users] Re: VPN" and
"Re: [acme-users] VPN" normalise alike.
"""

from __future__ import annotations

import re
from functools import lru_cache

# Reply/forward prefixes in the languages MSP customers write in: RE/AW/SV/Antw/RES/Odp (reply),
# FW/FWD/WG/VS/RV/TR/ENC/Doorst/RIF (forward).
_PREFIX = re.compile(
    r"(?:re|fw|fwd|aw|wg|sv|vs|rv|tr|antw|antwort|ant|res|enc|doorst|rif|odp|vl|ynt)"
    r"\s*(?:\[\d+\]|\(\d+\)|\^\d+)?\s*[:：]",
    re.IGNORECASE,
)
# Tags that mail gateways prepend in front of (or between) the prefixes.
_GATEWAY_TAG = re.compile(
    r"(?:\[(?:external|ext|extern|externe|externo|external\s+email|external\s+sender|caution|spam|suspected\s+spam"
    r"|possible\s+spam|phish(?:ing)?|bulk|warning|secure|encrypt(?:ed)?)\]|\*{1,3}\s*(?:external|spam)\s*\*{1,3}"
    r"|(?:external|extern)\s*:)",
    re.IGNORECASE,
)
_TAG = re.compile(r"\[[^\[\]]{1,80}\]")


@lru_cache(maxsize=1024)  # pure, and asked for one subject 6 times per mail (loop guard, duplicate rule, title…)
def strip_prefixes(subject: str) -> str:
    """`RE: [EXTERNAL] Fwd: AW: Printer down` → `Printer down` (case kept)."""
    text = " ".join((subject or "").split())
    kept: list[str] = []
    pos = 0
    while pos < len(text):
        while pos < len(text) and text[pos] == " ":
            pos += 1
        for pattern, keep in ((_PREFIX, False), (_GATEWAY_TAG, False), (_TAG, True)):
            m = pattern.match(text, pos)
            if m:
                if keep and m.group(0) not in kept:
                    kept.append(m.group(0))
                pos = m.end()
                break
        else:
            break
    rest = text[pos:].strip()
    return " ".join([*kept, rest]).strip()


def normalise_subject(subject: str) -> str:
    """`RE: Fwd: AW:  Printer  down` → `printer down`; a ticket tag is kept."""
    return strip_prefixes(subject).casefold()


def ticket_title(subject: str, tag: re.Pattern[str]) -> str:
    """A new ticket's title: the subject without reply prefixes and without our ticket tags."""
    title = " ".join(tag.sub(" ", strip_prefixes(subject)).split())
    return strip_prefixes(title) or "(no subject)"
