"""A small, safe Markdown subset for the guidelines panel: headings, lists, paragraphs,
**bold**, *italic* and `code`. Everything is HTML-escaped first, so a guidelines file can
never inject markup or script into the labeling page."""

from __future__ import annotations

import html
import re

_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"\*([^*]+)\*"), r"<em>\1</em>"),
]


def _inline(text: str) -> str:
    out = html.escape(text, quote=True)
    for pat, repl in _INLINE:
        out = pat.sub(repl, out)
    return out


def render(md: str) -> str:
    """HTML for a Markdown text (the subset above); unknown syntax shows as plain text."""
    out: list[str] = []
    para: list[str] = []
    in_list = False

    def flush() -> None:
        nonlocal in_list
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()
        if in_list:
            out.append("</ul>")
            in_list = False

    for line in md.splitlines():
        s = line.strip()
        heading = re.match(r"(#{1,4})\s+(.*)", s)
        item = re.match(r"[-*]\s+(.*)", s)
        if not s:
            flush()
        elif heading:
            flush()
            n = len(heading.group(1)) + 1  # h2..h5: the page's own title is h1
            out.append(f"<h{n}>{_inline(heading.group(2))}</h{n}>")
        elif item:
            if para:
                out.append("<p>" + _inline(" ".join(para)) + "</p>")
                para.clear()
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{_inline(item.group(1))}</li>")
        else:
            if in_list:
                out.append("</ul>")
                in_list = False
            para.append(s)
    flush()
    return "\n".join(out)
