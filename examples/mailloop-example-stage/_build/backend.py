"""A minimal in-tree PEP 517 backend: builds this plug-in's wheel with the standard library only.

So `pip install --no-build-isolation --no-index ./examples/mailloop-example-stage` works in a
venv without `wheel` or a recent setuptools, and without network. A real plug-in would use
setuptools, hatchling or flit instead.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

NAME, VERSION, PACKAGE = "mailloop_example_stage", "0.1.0", "mailloop_example_stage"
ROOT = Path(__file__).resolve().parent.parent
DIST_INFO = f"{NAME}-{VERSION}.dist-info"
METADATA = f"Metadata-Version: 2.1\nName: mailloop-example-stage\nVersion: {VERSION}\n" \
           "Summary: Example parser stage for mailloop\nRequires-Python: >=3.11\n"
WHEEL = "Wheel-Version: 1.0\nGenerator: mailloop-example-backend\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
ENTRY_POINTS = "[mailloop.parser_stages]\nacme_example = mailloop_example_stage:AssetTagStage\n"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(wheel_directory: str, config_settings: dict | None = None,
                metadata_directory: str | None = None) -> str:
    filename = f"{NAME}-{VERSION}-py3-none-any.whl"
    files: dict[str, bytes] = {
        f"{PACKAGE}/{p.name}": p.read_bytes() for p in sorted((ROOT / PACKAGE).glob("*.py"))
    }
    files[f"{DIST_INFO}/METADATA"] = METADATA.encode()
    files[f"{DIST_INFO}/WHEEL"] = WHEEL.encode()
    files[f"{DIST_INFO}/entry_points.txt"] = ENTRY_POINTS.encode()
    record = [_record_line(n, d) for n, d in files.items()] + [f"{DIST_INFO}/RECORD,,"]
    files[f"{DIST_INFO}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(Path(wheel_directory) / filename, "w", zipfile.ZIP_DEFLATED) as whl:
        for name, data in files.items():
            whl.writestr(name, data)
    return filename


def get_requires_for_build_wheel(config_settings: dict | None = None) -> list[str]:
    return []
