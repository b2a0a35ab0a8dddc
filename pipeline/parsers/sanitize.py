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
    if html is None:
        return None
    try:
        return nh3.clean(_CONTROL.sub("", html), tags=_TAGS, clean_content_tags=_DROP_WITH_CONTENT,
                         attributes=_ATTRIBUTES, attribute_filter=_attribute_filter, url_schemes=_SCHEMES,
                         link_rel="noopener noreferrer nofollow", strip_comments=True)
    except Exception:  # noqa: BLE001 - nh3 refuses some input (e.g. lone surrogates): keep nothing rather than risk it
        return ""
