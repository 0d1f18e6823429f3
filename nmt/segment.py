"""Sentences out of paragraphs and HTML text nodes, and the document back around their translations.

`segment_text` cuts plain text into sentences with `sentencex` (a maintained rule-based segmenter
for some 300 languages) and keeps every line break and the spacing between sentences as literal
text; `segment_html` does the same for the text nodes of an HTML fragment read with the standard
library's HTML parser, and keeps all markup (tags, attributes, comments, entities outside the
translated text) byte for byte. `Segmented.join(translations)` puts the document back together.
Nothing is ever dropped: joining the sentences themselves gives the input back (tested).
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser

logger = logging.getLogger(__name__)

_SPACE = " \t\n\r\f\v"  # ASCII whitespace: kept verbatim around sentences (&nbsp; stays inside)
_LINE_BREAK = re.compile(r"(\r\n|\n|\r)")
# elements whose content is code or data, never prose
_NO_TRANSLATE = frozenset({"script", "style", "code", "pre", "kbd", "samp", "var", "textarea"})
_VOID = frozenset(
    [
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "param",
        "source",
        "track",
        "wbr",
    ]
)


@dataclass(frozen=True)
class Segmented:
    """A document cut into sentences to translate and the literal text kept between them.

    `parts` are literal strings and sentence indices in document order; `sentences` have their
    inner whitespace collapsed to single spaces (what a model should see)."""

    parts: tuple[str | int, ...]
    sentences: tuple[str, ...]
    html: bool = False

    def join(self, translations: Sequence[str]) -> str:
        """The document with each sentence replaced by its translation (HTML-escaped in HTML)."""
        if len(translations) != len(self.sentences):
            raise ValueError(
                f"{len(translations)} translations for {len(self.sentences)} sentences"
            )
        out = []
        for part in self.parts:
            if isinstance(part, int):
                text = translations[part]
                out.append(html.escape(text, quote=False) if self.html else text)
            else:
                out.append(part)
        return "".join(out)


class _Builder:
    def __init__(self) -> None:
        self.parts: list[str | int] = []
        self.sentences: list[str] = []

    def literal(self, text: str) -> None:
        if not text:
            return
        if self.parts and isinstance(self.parts[-1], str):
            self.parts[-1] += text
        else:
            self.parts.append(text)

    def sentence(self, text: str) -> None:
        self.parts.append(len(self.sentences))
        self.sentences.append(" ".join(text.split()))

    def prose(self, text: str, lang: str) -> None:
        """Text without markup: its sentences, and the whitespace around them as literals."""
        for piece in split_sentences(text, lang):
            core = piece.strip(_SPACE)
            if not core:
                self.literal(piece)
                continue
            start = piece.index(core)
            self.literal(piece[:start])
            self.sentence(core)
            self.literal(piece[start + len(core) :])

    def build(self, is_html: bool) -> Segmented:
        return Segmented(tuple(self.parts), tuple(self.sentences), is_html)


def split_sentences(text: str, lang: str) -> list[str]:
    """`text` cut into sentences with their trailing whitespace; the pieces join to `text`.

    `lang` is an ISO 639 code; the segmenter falls back to related languages and then to
    generic rules for codes it does not know. Should it ever lose characters, the whole text is
    one sentence instead, so that no text is dropped."""
    from sentencex import segment

    try:
        pieces = [p for p in segment(lang or "en", text) if p]
    except Exception:  # a segmenter bug must not lose the user's text
        logger.exception("sentence segmentation failed (language %r); keeping the text whole", lang)
        return [text]
    if "".join(pieces) != text:
        logger.warning("the segmenter changed the text (language %r); keeping it whole", lang)
        return [text]
    return pieces


def segment_text(text: str, lang: str) -> Segmented:
    """Plain text with paragraphs and line breaks: each line cut into sentences; line breaks,
    blank lines and the spacing between sentences are kept as they were."""
    builder = _Builder()
    for i, chunk in enumerate(_LINE_BREAK.split(text)):
        if i % 2 == 1 or not chunk.strip():  # a line break, or a blank line
            builder.literal(chunk)
        else:
            builder.prose(chunk, lang)
    return builder.build(False)


class _Events(HTMLParser):
    """Where each piece of an HTML document starts, and what it is."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)  # entities as events: their source stays exact
        self.events: list[tuple[tuple[int, int], str, str]] = []  # ((line, column), kind, tag)

    def _add(self, kind: str, tag: str = "") -> None:
        self.events.append((self.getpos(), kind, tag))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        keep = any(k == "translate" and (v or "").lower() == "no" for k, v in attrs)
        self._add("start-keep" if keep else "start", tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._add("markup", tag)

    def handle_endtag(self, tag: str) -> None:
        self._add("end", tag)

    def handle_data(self, data: str) -> None:
        self._add("text")

    def handle_entityref(self, name: str) -> None:
        self._add("text")

    def handle_charref(self, name: str) -> None:
        self._add("text")

    def handle_comment(self, data: str) -> None:
        self._add("markup")

    def handle_decl(self, decl: str) -> None:
        self._add("markup")

    def handle_pi(self, data: str) -> None:
        self._add("markup")

    def unknown_decl(self, data: str) -> None:
        self._add("markup")


def segment_html(document: str, lang: str) -> Segmented:
    """An HTML fragment or page: the text nodes' sentences, everything else kept verbatim.

    Text inside script, style, code, pre and similar elements, and inside any element with
    `translate="no"`, is kept. Text that inline tags interrupt (`Hello <b>world</b>.`) is
    translated piece by piece, as the tags cut it."""
    parser = _Events()
    parser.feed(document)
    parser.close()
    line_starts = [0] + [m.end() for m in re.finditer("\n", document)]
    starts = [line_starts[line - 1] + col for (line, col), _, _ in parser.events]
    builder = _Builder()
    if not starts or starts[0] > 0:  # nothing reported before the first event: keep it
        builder.literal(document[: starts[0] if starts else len(document)])
    stack: list[tuple[str, bool]] = []  # open elements: (tag, content kept verbatim)
    run_start: int | None = None  # where the current run of text events began

    def flush(end: int) -> None:
        nonlocal run_start
        if run_start is None:
            return
        raw = document[run_start:end]
        run_start = None
        plain = html.unescape(raw)
        if not plain.strip(_SPACE) or any(keep for _, keep in stack):
            builder.literal(raw)
        else:
            builder.prose(plain, lang)

    for i, (_, kind, tag) in enumerate(parser.events):
        start = starts[i]
        end = starts[i + 1] if i + 1 < len(starts) else len(document)
        if kind == "text":
            if run_start is None:
                run_start = start
            continue
        flush(start)
        builder.literal(document[start:end])
        if kind.startswith("start") and tag not in _VOID:
            stack.append((tag, kind == "start-keep" or tag in _NO_TRANSLATE))
        elif kind == "end" and any(t == tag for t, _ in stack):
            while stack and stack.pop()[0] != tag:  # close what an unclosed tag left open
                pass
    flush(len(document))
    return builder.build(True)
