"""The one renderer from stored message text to safe HTML (a markdown subset through nh3).

Raw HTML in the source is never passed through (markdown-it runs with ``html=False``), and
nh3 then removes anything outside a small allowlist: no scripts, no event handlers, no
``javascript:`` or ``data:`` URLs, no images (they would leak readers' addresses).
"""

from __future__ import annotations

import re

import nh3
from markdown_it import MarkdownIt

_md = (
    MarkdownIt("commonmark", {"html": False, "linkify": True, "breaks": True, "typographer": False})
    .enable(["linkify", "strikethrough"])
    .disable(["image", "heading", "lheading", "hr", "reference"])
)

ALLOWED_TAGS = {"p", "br", "strong", "em", "del", "s", "code", "pre", "blockquote", "ul", "ol", "li", "a"}
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}
ALLOWED_SCHEMES = {"http", "https", "mailto"}

MENTION_RE = re.compile(r"(?<![\w@])@([A-Za-z0-9_.+-]{1,150})")


def render_body(body: str) -> str:
    html = _md.render(body)
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=ALLOWED_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        set_tag_attribute_values={"a": {"target": "_blank"}},
        strip_comments=True,
    ).strip()


def mentioned_usernames(body: str) -> set[str]:
    """``@name`` tokens in the text (outside of e-mail addresses), trailing punctuation dropped."""
    return {m.rstrip(".-+") for m in MENTION_RE.findall(body) if m.rstrip(".-+")}
