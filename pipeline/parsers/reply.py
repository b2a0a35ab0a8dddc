"""What the sender newly wrote: the body without quoted history and signature."""

from __future__ import annotations

import re

# A line that introduces quoted history, in the languages MSP customers write in.
_ATTRIBUTION = re.compile(
    r"""^\s*(?:
        On\s.{3,200}\swrote:                           # English
      | El\s.{3,200}\sescribi[óo]:                     # Spanish
      | Am\s.{3,200}\sschrieb.{0,200}:                 # German
      | Le\s.{3,200}\sa\s[ée]crit\s?:                  # French
      | Em\s.{3,200}\sescreveu:                        # Portuguese
      | Op\s.{3,200}\sschreef.{0,200}:                 # Dutch
      | Il\s.{3,200}\sha\sscritto:                     # Italian
      | -{2,}\s*(?:Original\sMessage|Urspr[üu]ngliche\sNachricht|Mensaje\soriginal
                |Message\sd'origine|Mensagem\soriginal|Oorspronkelijk\sbericht
                |Messaggio\soriginale|Forwarded\smessage|Weitergeleitete\sNachricht)\s*-{2,}
    )\s*$""",
    re.IGNORECASE | re.VERBOSE,
)
# Outlook's header block: a From: line followed closely by Sent:/Date: (in any language).
_OUTLOOK_FROM = re.compile(r"^\s*\*?(From|Von|De|Van|Da|Från|Fra)\s*:\*?\s", re.IGNORECASE)
_OUTLOOK_SENT = re.compile(
    r"^\s*\*?(Sent|Date|Gesendet|Datum|Enviado|Fecha|Envoy[ée]|Verzonden|Inviato|Data|Skickat|Sendt)\s*:",
    re.IGNORECASE,
)
_SIGNATURE = re.compile(r"^-- ?$")
_MOBILE_SIGNATURE = re.compile(r"^(Sent from my .{2,40}|Von meinem .{2,40} gesendet|Enviado desde mi .{2,40})$",
                               re.IGNORECASE)


def new_text(body: str) -> str:
    """The body up to the first quote attribution, Outlook header block, `>` quote or signature."""
    lines = body.splitlines()
    cut = len(lines)
    for i, line in enumerate(lines):
        if _SIGNATURE.match(line) or _MOBILE_SIGNATURE.match(line.strip()):
            cut = i
            break
        if _ATTRIBUTION.match(line) or _attribution_wrapped(lines, i):
            cut = i
            break
        if _OUTLOOK_FROM.match(line) and any(_OUTLOOK_SENT.match(x) for x in lines[i + 1 : i + 4]):
            cut = i
            # An underscore rule often sits just above Outlook's block.
            if i > 0 and re.fullmatch(r"\s*_{10,}\s*", lines[i - 1]):
                cut = i - 1
            break
        if line.startswith(">") and _only_quotes_after(lines, i):
            cut = i
            break
    text = "\n".join(lines[:cut]).rstrip()
    # A reply that is only a quote (or empty) keeps its whole body rather than nothing.
    return text if text.strip() else body.strip()


def _attribution_wrapped(lines: list[str], i: int) -> bool:
    # Clients wrap long "On <date>, <name> <address> wrote:" lines in two.
    if i + 1 >= len(lines) or not lines[i].strip():
        return False
    return bool(_ATTRIBUTION.match(lines[i].rstrip() + " " + lines[i + 1].strip()))


def _only_quotes_after(lines: list[str], i: int) -> bool:
    return all(not x.strip() or x.startswith(">") for x in lines[i:])
