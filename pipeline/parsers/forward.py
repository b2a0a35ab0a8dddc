"""Forwarded mail: who originally wrote it.

When someone forwards a customer's mail (Outlook's Forward, Gmail's "Forwarded message",
Apple's "Begin forwarded message:"), the customer is in the forwarded block's From: line.
A mail counts as a forward when its subject carries a forward prefix (FW, FWD, WG, TR,
RV, VS, ENC, Doorst, I) or its body a forward rule; the first header block in the body
then names the original sender. The forwarder is the mail's own From.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import parseaddr

from pipeline.parsers.reply import history_start

_FORWARD_SUBJECT = re.compile(r"^\s*(?:\[[^\]]{0,80}\]\s*|\*?external\*?:?\s*)*(?:fw|fwd|wg|tr|rv|vs|enc|doorst|i)\s*:",
                              re.IGNORECASE)
_FORWARD_RULE = re.compile(
    r"^\s*(?:-{2,}\s*(?:Forwarded\smessage|Weitergeleitete\sNachricht|Mensaje\sreenviado|Message\stransf[ée]r[ée]"
    r"|Mensagem\sencaminhada|Doorgestuurd\sbericht|Messaggio\sinoltrato|Original\sMessage|Urspr[üu]ngliche\sNachricht)"
    r"\s*-{2,}|Begin\sforwarded\smessage\s?:|Anfang\sder\sweitergeleiteten\s(?:Nachricht|E-Mail)\s?:"
    r"|Inicio\sdel\smensaje\sreenviado\s?:|D[ée]but\sdu\smessage\sr[ée]exp[ée]di[ée]\s?:)\s*$",
    re.IGNORECASE | re.VERBOSE | re.MULTILINE,
)
_FIELD = re.compile(r"^\s*>?\s*\*?(From|Von|De|Van|Da|Från|Fra|Od|Absender|Sent|Date|Gesendet|Datum|Enviado|Fecha"
                    r"|Envoy[ée]|Verzonden|Inviato|Data|Subject|Betreff|Asunto|Objet|Assunto|Onderwerp|Oggetto)"
                    r"\s*:\*?\s*(.*)$", re.IGNORECASE)
_FROM = {"from", "von", "de", "van", "da", "från", "fra", "od", "absender"}
_DATE = {"sent", "date", "gesendet", "datum", "enviado", "fecha", "envoyé", "envoye", "verzonden", "inviato", "data"}
_SUBJECT = {"subject", "betreff", "asunto", "objet", "assunto", "onderwerp", "oggetto"}
_MAILTO = re.compile(r"\[mailto:([^\]\s]+)\]|\(mailto:([^)\s]+)\)", re.IGNORECASE)
_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")


@dataclass
class Forwarded:
    from_name: str
    from_address: str | None  # None when the block gives only a display name (Exchange-internal)
    subject: str | None
    date: str | None

    def as_json(self) -> dict[str, str | None]:
        return {"from_name": self.from_name, "from_address": self.from_address, "subject": self.subject,
                "date": self.date}


def is_forward(subject: str, body_text: str) -> bool:
    return bool(_FORWARD_SUBJECT.match(subject or "")) or bool(_FORWARD_RULE.search(body_text[:20000]))


def forwarded_origin(subject: str, body_text: str) -> Forwarded | None:
    """The original sender named in the forwarded block, or None when this is no forward."""
    if not is_forward(subject, body_text):
        return None
    lines = body_text[:200000].split("\n")
    start = history_start(lines)
    if start >= len(lines):  # forwarded without a word of one's own: the block is at the top
        start = 0
    for i in range(start, min(len(lines), start + 12)):
        m = _FIELD.match(lines[i])
        if not m or m.group(1).lower() not in _FROM:
            continue
        fields = {"from": m.group(2).strip()}
        for line in lines[i + 1: i + 8]:
            f = _FIELD.match(line)
            if not f:
                if line.strip() and not line.lstrip().lower().startswith(("to:", "an:", "cc:", "para:", "à:", "a:",
                                                                           "aan:", "kopie:")):
                    break
                continue
            key = f.group(1).lower()
            kind = "date" if key in _DATE else "subject" if key in _SUBJECT else None
            if kind:
                fields.setdefault(kind, f.group(2).strip())
        name, address = _sender(fields["from"])
        if not name and not address:
            return None
        return Forwarded(name, address, fields.get("subject"), fields.get("date"))
    return None


def _sender(value: str) -> tuple[str, str | None]:
    m = _MAILTO.search(value)
    if m:
        address = m.group(1) or m.group(2)
        name = _MAILTO.sub("", value).strip().strip('"').strip()
        return name, address.lower() if _ADDRESS.match(address) else None
    name, address = parseaddr(value)
    address = address.strip().lower()
    if _ADDRESS.match(address):
        return name.strip(), address
    return value.strip().strip('"'), None
