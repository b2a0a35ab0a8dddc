"""An example parser stage: finds an asset tag ("ASSET-1234") in the subject or body.

It annotates the mail (ctx.annotations["acme_example"]) and notes its decision in the trace.
Its pattern is read from the mailbox's table:

    [mailbox.stage_settings.acme_example]
    pattern = 'ASSET-\\d+'
"""

from __future__ import annotations

import re
from typing import Any


class AssetTagStage:
    name = "acme_example"
    default_pattern = r"\bASSET-\d{3,}\b"

    def __call__(self, ctx: Any) -> None:
        settings = ctx.stage_settings(self.name)
        pattern = re.compile(settings.get("pattern", self.default_pattern), re.IGNORECASE)
        mail = ctx.parsed
        tags = sorted({m.group(0).upper() for m in pattern.finditer(f"{mail.subject}\n{mail.body_text}")})
        ctx.annotations[self.name] = {"asset_tags": tags}
        ctx.note(self.name, f"asset tags: {', '.join(tags)}" if tags else "no asset tag", f"pattern {pattern.pattern}")
