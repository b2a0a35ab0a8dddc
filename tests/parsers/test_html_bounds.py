"""HTML that would stall nh3 (Rust) or lxml (C) — neither can be interrupted — is bounded before
they run: deep or unclosed nesting is re-written by libxml2 first, or keeps no HTML copy when it
nests deeper than 256 levels; the text is kept either way, and what happened is said."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.parsers.html import html_to_text_noted
from pipeline.parsers.mime import parse_mail
from pipeline.parsers.sanitize import nh3_clean, sanitize_html_noted

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

# Each took nh3 from seconds to minutes, or hundreds of MB, before it was bounded.
STALLING = {
    "40,000 nested divs": "<div>" * 40_000 + "deepword" + "</div>" * 40_000 + "<p>afterword</p>",
    "10 MB of unclosed divs": "<div>word " * 1_000_000,
    "5 MB of unclosed bold": "<b>word " * 1_000_000,
    "2,000 formatting tags left open": "".join(f'<b id="x{i}">' for i in range(2_000)) + "<p>word</p>" * 10,
    "250 left open, 20,000 paragraphs": "".join(f'<b id="x{i}">' for i in range(250)) + "<p>word</p>" * 20_000,
    "200 KB of <": "<p>word " + "<" * 200_000,
}


def cpu(call):  # type: ignore[no-untyped-def]
    start = time.process_time()
    result = call()
    return result, time.process_time() - start


@pytest.mark.parametrize("name", STALLING)
def test_html_that_would_stall_the_sanitizer_is_bounded_fast_and_says_so(name: str) -> None:
    (clean, note), seconds = cpu(lambda: sanitize_html_noted(STALLING[name]))
    assert seconds < 3, f"{name}: {seconds:.1f} s"
    assert note and ("HTML copy not kept" in note or "closed and re-nested" in note)
    assert clean is None or "<script" not in clean


def test_html_nested_deeper_than_libxml2_goes_keeps_all_its_text() -> None:
    (text, note), seconds = cpu(lambda: html_to_text_noted(STALLING["40,000 nested divs"]))
    assert seconds < 3
    assert "deepword" in text and "afterword" in text  # libxml2 alone dropped everything past 2048 levels
    assert note == "HTML nested deeper than 2048 levels: its text kept without its layout"


def test_a_mail_of_deep_html_is_parsed_with_its_text_and_the_reason_in_its_warnings() -> None:
    raw = (b"From: Jane <jane@acme.example>\nTo: support@msp.example\nSubject: deep\n"
           b"MIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n\n"
           + STALLING["40,000 nested divs"].encode())
    mail, seconds = cpu(lambda: parse_mail(raw))
    assert "deepword" in mail.body_text and "afterword" in mail.body_text
    assert any("nested deeper than 2048 levels" in w for w in mail.warnings)
    sanitized, more = cpu(lambda: mail.body_html_sanitized)
    assert seconds + more < 3 and sanitized is None


def _real_html() -> list[str]:
    htmls = []
    for path in sorted(FIXTURES.rglob("*.eml")):
        try:
            mail = parse_mail(path.read_bytes())
        except Exception:  # noqa: BLE001 - fixtures of unparseable mail
            continue
        if mail.body_html:
            htmls.append(mail.body_html)
    return htmls


def test_real_mail_is_sanitized_as_before_and_never_bounded() -> None:
    htmls = _real_html()
    assert len(htmls) > 10
    newsletter = "".join(htmls) * 4  # about 5,000 tags, like a big newsletter
    for html in [*htmls, newsletter]:
        clean, note = sanitize_html_noted(html)
        assert note is None and clean == nh3_clean(html)  # as nh3 alone cleans it
        assert html_to_text_noted(html)[1] is None
