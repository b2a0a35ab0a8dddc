"""The HTML copy of a mail that is safe to store and show (D8): nh3 (ammonia) does the work.

Removed: scripts, styles and their content, event handlers, forms, frames, objects, every
`style` attribute (CSS can load remote content), and remote-content beacons — an image is
kept only when it is an inline part of the mail (`cid:`) or embedded (`data:image/…`);
a remote image loses its `src` and keeps its `alt`. Links keep `http`, `https`, `mailto` and
`tel` targets and get `rel="noopener noreferrer nofollow"`.
"""

from __future__ import annotations

import re

import nh3

from pipeline.parsers.html import normalized

_TAGS = (set(nh3.ALLOWED_TAGS) - {"area", "map"}) | {"font"}
_ATTRIBUTES = {tag: set(attrs) - {"cite"} for tag, attrs in nh3.ALLOWED_ATTRIBUTES.items()}
_ATTRIBUTES["font"] = {"color", "face", "size"}
_ATTRIBUTES["*"] = {"dir", "lang", "title"}
_DROP_WITH_CONTENT = {"script", "style", "title", "head", "noscript", "template", "iframe", "frame", "frameset",
                      "object", "embed", "applet", "svg", "math", "xml", "form", "select", "textarea", "button"}
_SCHEMES = {"http", "https", "mailto", "tel", "cid", "data"}
_INLINE_IMAGE = re.compile(r"^\s*(?:cid:|data:image/(?:png|gif|jpe?g|webp|bmp);)", re.IGNORECASE)
_LINK = re.compile(r"^\s*(?:https?:|mailto:|tel:)", re.IGNORECASE)
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")


def _attribute_filter(tag: str, attribute: str, value: str) -> str | None:
    if attribute == "src":
        return value if tag == "img" and _INLINE_IMAGE.match(value) else None
    if attribute == "href":
        return value if _LINK.match(value) else None
    return value


def sanitize_html(html: str | None) -> str | None:
    """`html` with everything removed that could run, track or load; None stays None."""
    return sanitize_html_noted(html)[0]


def sanitize_html_noted(html: str | None) -> tuple[str | None, str | None]:
    """The sanitized copy of `html`, and a note when it could not be kept as sent.

    nh3 (Rust) cannot be interrupted, and deep or unclosed nesting costs it seconds to minutes
    and gigabytes: HTML that could (`_risky`) is first re-written by libxml2 with every element
    closed (`normalized`), and HTML nested deeper than that allows keeps no copy at all — the
    mail's text, which comes from the same HTML, is kept either way.
    """
    if html is None:
        return None, None
    why = _risky(html)
    safe = normalized(html) if why else html
    if safe is None:
        return None, f"HTML copy not kept ({why}, nested deeper than 256 levels); its text is kept"
    try:
        clean = nh3_clean(safe)
    except Exception:  # noqa: BLE001 - nh3 refuses some input (e.g. lone surrogates): keep nothing rather than risk it
        return "", "HTML copy refused by the sanitizer"
    return clean, (f"HTML copy closed and re-nested before it was sanitized ({why})" if why else None)


def nh3_clean(html: str) -> str:
    """nh3 with our rules, on any input: give it only what `sanitize_html_noted` lets through."""
    return nh3.clean(_CONTROL.sub("", html), tags=_TAGS, clean_content_tags=_DROP_WITH_CONTENT,
                     attributes=_ATTRIBUTES, attribute_filter=_attribute_filter, url_schemes=_SCHEMES,
                     link_rel="noopener noreferrer nofollow", strip_comments=True)


# Past these, nh3 is given libxml2's re-written HTML: real mail stays well inside them, so it
# pays nothing (counting is C speed). 10,000 tags: a 200 KB newsletter has about 5,000.
_MAX_TAGS = 10_000
_MAX_UNCLOSED_FORMATTING = 100  # each one is re-opened by html5ever in every later paragraph
# Over a lower-cased copy: twice as fast as matching without case.
_FORMATTING_START = re.compile(r"<(?:a|b|big|code|em|font|i|nobr|s|small|strike|strong|tt|u)[\s>]")
_FORMATTING_END = re.compile(r"</(?:a|b|big|code|em|font|i|nobr|s|small|strike|strong|tt|u)\s*>")


def _risky(html: str) -> str | None:
    """Why `html` could make nh3 slow or hungry, or None."""
    tags = html.count("<")
    if tags > _MAX_TAGS:
        return f"{tags:,} tags"
    if tags > _MAX_UNCLOSED_FORMATTING:
        lower = html.lower()
        unclosed = len(_FORMATTING_START.findall(lower)) - len(_FORMATTING_END.findall(lower))
        if unclosed > _MAX_UNCLOSED_FORMATTING:
            return f"{unclosed:,} formatting tags left open"
    return None
