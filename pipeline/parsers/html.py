"""HTML mail bodies to readable text: paragraphs, line breaks, lists, links, tables, quotes.

lxml parses (C, forgiving, fast); one pass over its start/end events writes the text, so
deeply nested HTML costs no Python recursion. What real clients send is handled on
purpose: Word/Outlook markup (`MsoNormal` paragraphs are lines, `mso-list:Ignore` bullets
become list marks, conditional comments vanish), Gmail/Apple/Thunderbird quotes
(`<blockquote>` becomes `> ` lines, so reply separation sees them), hidden preheaders,
`<hr>` as Outlook's underscore rule. Never raises: input lxml refuses becomes its text
without tags.
"""

from __future__ import annotations

import html as html_lib
import re

import lxml.html
from lxml import etree

_PARSER = lxml.html.HTMLParser(remove_comments=True, remove_pis=True, no_network=True, recover=True,
                               huge_tree=True, default_doctype=False)
_SKIP = {"script", "style", "head", "title", "meta", "link", "noscript", "template", "xml", "object",
         "embed", "applet", "iframe", "frame", "frameset", "svg", "math", "select", "option", "button",
         "map", "area"}
_PARAGRAPH = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "dl", "pre", "blockquote",
              "address", "figure", "fieldset", "form"}
_BLOCK = {"div", "section", "article", "header", "footer", "main", "nav", "aside", "center", "dt", "dd",
          "caption", "tbody", "thead", "tfoot", "details", "summary", "figcaption", "hgroup"}
_IN_CELL_INLINE = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "center", "span", "font"}
_WS = re.compile(r"[ \t\r\n\f\v\xa0\u200b\u2002\u2003\u2009]+")
_BAD_XML_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*>", re.IGNORECASE)
_HIDDEN = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden|mso-hide\s*:\s*all", re.IGNORECASE)
_MSO_LIST_IGNORE = re.compile(r"mso-list\s*:\s*ignore", re.IGNORECASE)
_MSO_LIST_ITEM = re.compile(r"mso-list\s*:\s*l\d+\s+level(\d+)", re.IGNORECASE)
_NUMBERED_MARK = re.compile(r"^\(?[0-9]{1,3}[.)]$|^\(?[a-zA-Z][.)]$|^\(?[ivxlc]{1,5}[.)]$")
_TAG = re.compile(r"<[^<>]*>")  # "<" excluded: a run of "<" without ">" is scanned once, not once per "<"
_OUTLOOK_RULE = "_" * 32


class _Writer:
    """Text with paragraph breaks collapsed and `> ` in front of quoted lines."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.pending = 0  # newlines owed before the next text
        self.depth = 0  # blockquote nesting
        self.blank_depth = 0  # nesting at the time the owed newlines were asked for
        self.line_start = True
        self.space = False  # a collapsed space owed before the next word

    def newline(self, count: int = 1) -> None:
        if self.out:
            if not self.pending:
                self.blank_depth = self.depth
            self.pending = max(self.pending, count)
        self.space = False

    def _flush(self) -> None:
        if self.pending:
            for i in range(self.pending):
                self.out.append("\n")
                if i < self.pending - 1 and min(self.depth, self.blank_depth):
                    self.out.append(("> " * min(self.depth, self.blank_depth)).rstrip())
            self.pending = 0
            self.line_start = True
        if self.line_start and self.depth:
            self.out.append("> " * self.depth)

    def text(self, text: str) -> None:
        text = _WS.sub(" ", text)
        if not text:
            return
        if text == " ":
            self.space = self.space or not (self.line_start or self.pending)
            return
        if text[0] == " ":
            self.space = not (self.line_start or self.pending)
            text = text[1:]
        trailing = text.endswith(" ")
        text = text.rstrip(" ")
        if self.pending or self.line_start:
            self._flush()
            self.space = False
        elif self.space and not self.out[-1].endswith(" "):
            self.out.append(" ")
        self.out.append(text)
        self.line_start = False
        self.space = trailing

    def br(self) -> None:
        if self.out:
            if not self.pending:
                self.blank_depth = self.depth
            self.pending = min(self.pending + 1, 2)
        self.space = False

    def cell(self) -> None:
        if self.out and not self.line_start and not self.pending and self.out[-1] != " | ":
            self.out.append(" | ")
            self.space = False

    def raw_lines(self, text: str) -> None:
        """Pre-formatted text, kept as written."""
        lines = text.replace("\r\n", "\n").split("\n")
        for i, line in enumerate(lines):
            if i:
                self.pending = max(self.pending, 1)
                if not self.out:
                    self.out.append("")
            if line:
                self._flush()
                self.out.append(line.replace("\xa0", " "))
                self.line_start = False
        self.space = False

    def mark(self, text: str) -> None:
        """A list mark or rule at the start of a line."""
        self._flush()
        self.out.append(text)
        self.line_start = False
        self.space = False

    def result(self) -> str:
        text = "".join(self.out)
        return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def html_to_text(html: str) -> str:
    return html_to_text_noted(html)[0]


def html_to_text_noted(html: str) -> tuple[str, str | None]:
    """The text of `html`, and a note when it could only be had without the markup's structure."""
    if not html or not html.strip():
        return "", None
    html = _BAD_XML_CHARS.sub("", _XML_DECLARATION.sub("", html, count=1))
    try:
        root = lxml.html.document_fromstring(html, parser=_PARSER)
    except (etree.ParserError, ValueError, TypeError):
        return _fallback(html), None
    if _stopped(_PARSER):
        # libxml2 stops at 2048 levels of nesting and drops the rest of the mail: all of its
        # text, without the layout, is worth more than the layout of its first part.
        return _fallback(html), f"HTML nested deeper than {_HUGE_DEPTH} levels: its text kept without its layout"
    if root is None:
        return _fallback(html), None
    body = root.find("body")
    text = _render(body if body is not None else root)
    return text or _fallback(html), None


_HUGE_DEPTH = 2048  # libxml2's nesting limit with huge_tree (XML_PARSE_HUGE); 256 without


def _stopped(parser: etree.HTMLParser) -> bool:
    """Did libxml2 give up on the last document (a resource limit, such as its nesting depth)?"""
    last = parser.error_log.last_error  # a limit ends the parse: it is the last error (and O(1) to ask)
    return last is not None and last.level_name == "FATAL"


def normalized(html: str) -> str | None:
    """`html` as libxml2 reads it, re-written with every element closed and nested at most 256
    deep; None when it is nested deeper (libxml2 would drop the rest).

    What the sanitizer is given when the HTML could make it slow: html5ever (nh3's parser) walks
    its stack of open elements for every start tag and re-opens unclosed formatting elements in
    every later block, so deep or unclosed nesting costs it seconds and gigabytes; libxml2
    (C, linear) closes everything first, and within its depth limit nothing is lost.
    """
    try:
        root = lxml.html.document_fromstring(_BAD_XML_CHARS.sub("", html), parser=_BOUNDED_PARSER)
    except (etree.ParserError, ValueError, TypeError):
        return None
    if root is None or _stopped(_BOUNDED_PARSER):
        return None
    return lxml.html.tostring(root, encoding="unicode")


# As _PARSER, but at libxml2's default nesting limit (256): deeper than that, no mail is real.
_BOUNDED_PARSER = lxml.html.HTMLParser(remove_comments=True, remove_pis=True, no_network=True, recover=True,
                                       huge_tree=False, default_doctype=False)


def _fallback(html: str) -> str:
    return "\n".join(_WS.sub(" ", line).strip() for line in html_lib.unescape(_TAG.sub(" ", html)).splitlines()
                     ).strip()


def _render(root: etree._Element) -> str:
    w = _Writer()
    lists: list[list[int | None]] = []  # per open list: [counter] (None for bullets)
    pre = 0
    cells = 0  # table cells open: a paragraph inside a cell does not break the row
    walker = etree.iterwalk(root, events=("start", "end"))
    for event, el in walker:
        tag = el.tag if isinstance(el.tag, str) else ""
        tag = tag.rpartition("}")[2].lower()
        if ":" in tag:  # Word's o:p, v:shape, w:… — their text, if any, is inline
            tag = "span"
        if event == "start":
            style = el.get("style") or ""
            # A skipped element still gets its "end" event, which writes its tail.
            if tag in _SKIP or (style and _HIDDEN.search(style)) or el.get("hidden") is not None:
                walker.skip_subtree()
                continue
            if style and _MSO_LIST_IGNORE.search(style):
                mark = " ".join(el.text_content().split())
                w.mark(mark + " " if _NUMBERED_MARK.match(mark) else "- ")
                walker.skip_subtree()
                continue
            if cells and tag in _IN_CELL_INLINE:
                w.text(" ")
            else:
                _open(w, el, tag, style, lists)
            if tag in ("td", "th"):
                cells += 1
            if tag == "pre":
                pre += 1
            if el.text:
                (w.raw_lines if pre else w.text)(el.text)
        else:
            if tag in ("td", "th"):
                cells = max(cells - 1, 0)
            if cells and tag in _IN_CELL_INLINE:
                w.text(" ")
            else:
                _close(w, el, tag, lists)
            if tag == "pre":
                pre -= 1
            _tail(w, el, pre)
    return w.result()


def _tail(w: _Writer, el: etree._Element, pre: int) -> None:
    if el.tail:
        (w.raw_lines if pre else w.text)(el.tail)


def _open(w: _Writer, el: etree._Element, tag: str, style: str, lists: list[list[int | None]]) -> None:
    if tag == "br":
        w.br()
    elif tag == "p":
        word_line = (el.get("class") or "").lower().startswith("mso")
        w.newline(1 if word_line else 2)
    elif tag in ("ul", "ol"):
        start = el.get("start") or "1"
        lists.append([int(start) if tag == "ol" and start.isdigit() else (1 if tag == "ol" else None)])
        w.newline(1 if len(lists) > 1 else 2)
    elif tag == "li":
        w.newline(1)
        counter = lists[-1] if lists else [None]
        indent = "  " * max(len(lists) - 1, 0)
        if counter[0] is None:
            w.mark(indent + "- ")
        else:
            w.mark(f"{indent}{counter[0]}. ")
            counter[0] += 1
    elif tag == "blockquote":
        w.newline(2)
        w.depth += 1
    elif tag == "hr":
        w.newline(1)
        w.mark(_OUTLOOK_RULE)
        w.newline(1)
    elif tag == "tr":
        w.newline(1)
    elif tag in ("td", "th"):
        if el.getprevious() is not None:
            w.cell()
    elif tag == "img":
        alt = " ".join((el.get("alt") or "").split())
        if alt:
            w.text(f"[{alt}]")
    elif tag in _PARAGRAPH:
        w.newline(2)
    elif tag in _BLOCK:
        w.newline(1)
    if tag == "p" and style and _MSO_LIST_ITEM.search(style):
        w.newline(1)


def _close(w: _Writer, el: etree._Element, tag: str, lists: list[list[int | None]]) -> None:
    if tag == "a":
        href = (el.get("href") or "").strip()
        if href.lower().startswith(("http://", "https://")):
            label = " ".join(el.text_content().split())
            bare = re.sub(r"^https?://", "", href, flags=re.IGNORECASE).rstrip("/")
            if label and label.rstrip("/") not in (href.rstrip("/"), bare):
                w.text(f" ({href})")
                w.space = False
            elif not label:
                w.text(href)
    elif tag in ("ul", "ol"):
        if lists:
            lists.pop()
        w.newline(1 if lists else 2)
    elif tag == "blockquote":
        w.newline(2)
        w.depth = max(w.depth - 1, 0)
    elif tag == "p":
        if (el.get("class") or "").lower().startswith("mso"):
            w.newline(1)
            if not el.text_content().strip(" \t\r\n\xa0"):
                w.br()  # Word's <p class=MsoNormal>&nbsp;</p> is an empty line
        else:
            w.newline(2)
    elif tag in _PARAGRAPH:
        w.newline(2)
    elif tag in _BLOCK or tag in ("li", "tr"):
        w.newline(1)
