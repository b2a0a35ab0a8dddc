"""A real TNEF (winmail.dat) blob, written the way Outlook lays it out (MS-OXTNEF 2.1).

Each attribute: level (1 message, 2 attachment), attribute id (type << 16 | name),
length, data, 16-bit checksum of the data. An attachment starts with
attAttachRendData, then attAttachTitle (file name) and attAttachData (content).
"""

from __future__ import annotations

import struct

SIGNATURE = 0x223E9F78
_MESSAGE, _ATTACHMENT = 0x01, 0x02
_TNEF_VERSION = (0x0008, 0x9006)  # (type dword, name)
_OEM_CODEPAGE = (0x0006, 0x9007)
_MESSAGE_CLASS = (0x0007, 0x8008)
_BODY = (0x0002, 0x800C)
_ATTACH_REND_DATA = (0x0006, 0x9002)
_ATTACH_TITLE = (0x0001, 0x8010)
_ATTACH_DATA = (0x0006, 0x800F)


def _attribute(level: int, kind: tuple[int, int], data: bytes) -> bytes:
    atype, name = kind
    return (struct.pack("<BHHI", level, name, atype, len(data)) + data
            + struct.pack("<H", sum(data) & 0xFFFF))


def winmail_dat(files: list[tuple[str, bytes]], body: str | None = None) -> bytes:
    out = struct.pack("<IH", SIGNATURE, 0x0001)
    out += _attribute(_MESSAGE, _TNEF_VERSION, struct.pack("<I", 0x00010000))
    out += _attribute(_MESSAGE, _OEM_CODEPAGE, struct.pack("<II", 1252, 0))
    out += _attribute(_MESSAGE, _MESSAGE_CLASS, b"IPM.Microsoft Mail.Note\x00")
    if body is not None:
        out += _attribute(_MESSAGE, _BODY, body.encode("cp1252") + b"\x00")
    for name, data in files:
        out += _attribute(_ATTACHMENT, _ATTACH_REND_DATA, struct.pack("<HIIHHI", 1, 0xFFFFFFFF, 0, 0, 0, 0))
        out += _attribute(_ATTACHMENT, _ATTACH_TITLE, name.encode("cp1252") + b"\x00")
        out += _attribute(_ATTACHMENT, _ATTACH_DATA, data)
    return out
