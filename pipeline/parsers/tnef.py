"""winmail.dat (TNEF, `application/ms-tnef`) unpacked with tnefparse: its files and its body.

Outlook sends TNEF when "Rich Text" format is chosen; the real attachments are inside.
A blob that tnefparse cannot read is kept as the attachment it came as.
Compressed-RTF-only bodies are not converted (that needs the `compressed_rtf` package);
their attachments are still unpacked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tnefparse.tnef import TNEF

from pipeline.parsers.charset import decode_bytes

_TNEF_SIGNATURE = b"\x78\x9f\x3e\x22"
logging.getLogger("tnefparse").setLevel(logging.ERROR)  # it warns on every checksum it dislikes


@dataclass
class TnefContent:
    files: list[tuple[str, bytes]] = field(default_factory=list)
    body_text: str | None = None
    body_html: str | None = None


def is_tnef(content_type: str, filename: str | None, data: bytes) -> bool:
    return (content_type in ("application/ms-tnef", "application/vnd.ms-tnef")
            or (filename or "").lower() == "winmail.dat") and data.startswith(_TNEF_SIGNATURE)


def unpack(data: bytes) -> TnefContent | None:
    """The files and body inside a TNEF blob, or None when it cannot be read."""
    try:
        tnef = TNEF(data, do_checksum=False)
    except Exception:  # noqa: BLE001 - tnefparse raises whatever struct/decoding error a broken blob provokes
        return None
    content = TnefContent()
    for attachment in tnef.attachments:
        try:
            name = attachment.long_filename()
        except Exception:  # noqa: BLE001 - tnefparse decodes 8-bit names as UTF-8; Outlook writes them in the code page
            name = getattr(attachment, "_name", None)
        if isinstance(name, bytes):
            name = decode_bytes(name.rstrip(b"\x00"))
        name = (name or "").strip("\x00").strip()
        payload = attachment.data if isinstance(attachment.data, bytes) else b""
        content.files.append((name, payload))
    content.body_text = _text(tnef.body)
    content.body_html = _text(tnef.htmlbody)
    return content


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = decode_bytes(value.rstrip(b"\x00"))
    text = str(value).strip("\x00")
    return text if text.strip() else None
