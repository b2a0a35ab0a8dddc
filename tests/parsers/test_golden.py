"""The golden corpus: raw mails in tests/fixtures/parsing/, each beside what a reader expects.

Every `NAME.eml` has a `NAME.expected.toml` written by hand. A key present there is
checked; a key absent is not. Keys:
- the D6 fields by name (`from_address`, `from_name`, `subject`, `message_id`,
  `in_reply_to`, `body_text`, `body_new`, `is_auto_reply`, `is_bounce`, …): equal
  (TOML has no null: "__none__" stands for None);
- `body_text_contains` / `body_new_excludes` / `body_text_excludes`: lists of fragments;
- `attachments`: the list of attachments, each table's keys compared (`filename`,
  `content_type`, `inline`, `skipped`, `size`);
- `bounce_recipients`, `bounce_original_message_id`, `forwarded_from_address`,
  `forwarded_from_name`, `sanitized_html_contains` / `sanitized_html_excludes`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pipeline.parsers.mime import parse_mail

CORPUS = Path(__file__).parent.parent / "fixtures" / "parsing"
CASES = sorted(p.name.removesuffix(".expected.toml") for p in CORPUS.glob("*.expected.toml"))
_PLAIN = ("from_address", "from_name", "subject", "message_id", "in_reply_to", "references", "to", "cc", "date",
          "body_text", "body_new", "is_auto_reply", "is_bounce", "auto_reply_reason", "bounce_reason")


def test_the_corpus_is_there() -> None:
    assert len(CASES) >= 80
    assert all((CORPUS / f"{name}.eml").exists() for name in CASES)


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    expected = tomllib.loads((CORPUS / f"{name}.expected.toml").read_text(encoding="utf-8"))
    mail = parse_mail((CORPUS / f"{name}.eml").read_bytes(), max_attachment_bytes=expected.pop("limit", None))
    got = mail.as_json()
    for key in _PLAIN:
        if key in expected:
            assert got[key] == (None if expected[key] == "__none__" else expected[key]), key
    for fragment in expected.get("body_text_contains", []):
        assert fragment in got["body_text"]
    for fragment in expected.get("body_text_excludes", []):
        assert fragment not in got["body_text"]
    for fragment in expected.get("body_new_excludes", []):
        assert fragment not in got["body_new"]
    if "attachments" in expected:
        assert len(got["attachments"]) == len(expected["attachments"]), [a["filename"] for a in got["attachments"]]
        for want, have in zip(expected["attachments"], got["attachments"]):
            assert {k: have[k] for k in want} == want
    if "bounce_recipients" in expected:
        assert [{k: r[k] for k in want} for want, r in zip(expected["bounce_recipients"], got["bounce"]["recipients"])
                ] == expected["bounce_recipients"]
        assert len(got["bounce"]["recipients"]) == len(expected["bounce_recipients"])
    if "bounce_original_message_id" in expected:
        assert got["bounce"]["original_message_id"] == expected["bounce_original_message_id"]
    for key in ("forwarded_from_address", "forwarded_from_name"):
        if key in expected:
            assert got["forwarded_from"] is not None, "not recognised as a forward"
            assert got["forwarded_from"][key.removeprefix("forwarded_")] == expected[key]
    if expected.get("forwarded") is False:
        assert got["forwarded_from"] is None
    for fragment in expected.get("sanitized_html_contains", []):
        assert fragment in got["body_html_sanitized"]
    for fragment in expected.get("sanitized_html_excludes", []):
        assert fragment not in got["body_html_sanitized"]
    assert got["warnings"] == expected.get("warnings", [])
