"""HTML mail bodies to readable text (paragraphs, line breaks, lists, links, tables)."""

from __future__ import annotations

import re

from bs4 import BeautifulSoup, NavigableString, Tag

_BLOCK = {"p", "div", "section", "article", "header", "footer", "blockquote", "pre",
          "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "hr", "address"}
_DROP = {"script", "style", "head", "title", "meta", "noscript", "template", "xml"}


def html_to_text(html: str) -> str:
    soup = BeautifulSoup(html, "lxml")
    for tag in soup.find_all(list(_DROP)):
        tag.decompose()
    out: list[str] = []
    _walk(soup.body or soup, out)
    text = "".join(out)
    text = re.sub(r"[ \t\xa0]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return "\n".join(line.strip(" \t\xa0") for line in text.strip().splitlines()).strip()


def _walk(node: Tag, out: list[str]) -> None:
    for child in node.children:
        if isinstance(child, NavigableString):
            if type(child) is NavigableString:  # not a comment, CDATA or doctype
                out.append(re.sub(r"\s+", " ", str(child)))
            continue
        if not isinstance(child, Tag):
            continue
        name = child.name
        if name == "br":
            out.append("\n")
        elif name == "li":
            out.append("\n- ")
            _walk(child, out)
        elif name in ("td", "th"):
            _walk(child, out)
            out.append("\t")
        elif name == "tr":
            out.append("\n")
            _walk(child, out)
        elif name == "a":
            start = len(out)
            _walk(child, out)
            label = "".join(out[start:]).strip()
            href = (child.get("href") or "").strip()
            if href.startswith(("http://", "https://")) and href != label:
                out.append(f" ({href})")
        elif name == "img":
            alt = (child.get("alt") or "").strip()
            if alt:
                out.append(f"[{alt}]")
        elif name in _BLOCK:
            out.append("\n\n" if name in ("p", "table", "h1", "h2", "h3", "blockquote") else "\n")
            _walk(child, out)
            out.append("\n\n" if name in ("p", "table", "h1", "h2", "h3", "blockquote") else "\n")
        else:
            _walk(child, out)
