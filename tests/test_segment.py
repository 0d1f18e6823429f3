"""Documents into sentences and back: plain text with paragraphs, HTML with its markup intact."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from nmt.cli import main
from nmt.segment import segment_html, segment_text

PARAGRAPHS = [
    "El gato come pan hoy. El perro ve la luna.  ¿Dónde está mi amigo?",
    "La niña tiene flores. El hombre busca un libro mañana!",
    "Sr. García llegó a las 3.30. Mi amigo quiere agua.",
    "\tLa mujer ve una casa. Ahora.",
    "Una línea sin punto final",
]


def test_plain_text_joins_back_to_itself_exactly() -> None:
    text = "  " + "\n\n".join(PARAGRAPHS) + "\r\nÚltima.\n  \n"
    doc = segment_text(text, "es")
    assert doc.join(list(doc.sentences)) == text


def test_every_sentence_of_a_long_document_comes_back_in_order() -> None:
    text = "\n\n".join(PARAGRAPHS)
    doc = segment_text(text, "es")
    assert len(doc.sentences) == 10
    assert doc.sentences[0] == "El gato come pan hoy."
    assert doc.sentences[2] == "¿Dónde está mi amigo?"
    assert doc.sentences[5] == "Sr. García llegó a las 3.30."  # no break after the title
    marked = doc.join([f"<{i}>" for i in range(len(doc.sentences))])
    assert re.findall(r"<(\d+)>", marked) == [str(i) for i in range(10)]
    assert marked.count("\n\n") == 4  # the paragraph breaks stay


def test_whitespace_only_text_has_no_sentence() -> None:
    doc = segment_text(" \n\n\t ", "en")
    assert doc.sentences == () and doc.join([]) == " \n\n\t "


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(self.get_starttag_text() or "")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(self.get_starttag_text() or "")

    def handle_endtag(self, tag: str) -> None:
        self.tags.append(f"</{tag}>")


def _markup(document: str) -> list[str]:
    parser = _Markup()
    parser.feed(document)
    parser.close()
    return parser.tags


HTML = (
    "<div class=\"post\" data-x='1 &amp; 2'><p>El gato come pan. El perro ve la luna.</p>\n"
    '<p>Tom &amp; Jerry <a href="/x?a=1&amp;b=2" title="Hola.">tienen</a> agua&nbsp;hoy.</p>'
    "<br/><img src=x alt='No.'><!-- un comentario. --><script>var a = 'No. traducir.';</script>"
    '<code>no. traducir</code><span translate="no">Nombre. Propio.</span></div>'
)


def test_html_keeps_every_tag_and_attribute_and_translates_text_nodes() -> None:
    doc = segment_html(HTML, "es")
    assert doc.sentences == (
        "El gato come pan.",
        "El perro ve la luna.",
        "Tom & Jerry",
        "tienen",
        "agua hoy.",  # inner whitespace (&nbsp; too) reaches the model as one space
    )
    out = doc.join([s.upper() + " <&>" for s in doc.sentences])
    assert _markup(out) == _markup(HTML)
    for kept in ("<!-- un comentario. -->", "var a = 'No. traducir.';", "<code>no. traducir</code>",
                 '<span translate="no">Nombre. Propio.</span>', "<br/>"):  # fmt: skip
        assert kept in out
    assert "EL GATO COME PAN. &lt;&amp;&gt; EL PERRO" in out  # translations are escaped


def test_html_without_translation_changes_no_markup_byte() -> None:
    doc = segment_html(HTML, "es")
    out = doc.join(list(doc.sentences))
    assert out == HTML.replace("agua&nbsp;hoy", "agua hoy")  # only text nodes are rewritten


def test_broken_html_loses_nothing() -> None:
    broken = "<p>Hola <b>mundo. Adiós <i unclosed"
    doc = segment_html(broken, "es")
    assert doc.sentences == ("Hola", "mundo.", "Adiós <i unclosed")  # the parser calls it text
    assert doc.join(list(doc.sentences)) == "<p>Hola <b>mundo. Adiós &lt;i unclosed"


def test_translate_split_sentences_keeps_one_output_line_per_input_line(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in.es"
    src.write_text("El gato come pan. El perro ve la luna.\nHoy.\n", encoding="utf-8")
    out = tmp_path / "out.en"
    assert main(["translate", "--model", str(tiny_model_dir), "--input", str(src),
                 "--output", str(out), "--split-sentences", "--beam-size", "1"]) == 0  # fmt: skip
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 3 and lines[2] == ""
    whole = tmp_path / "whole.en"
    sentences = tmp_path / "sent.es"
    sentences.write_text("El gato come pan.\nEl perro ve la luna.\n", encoding="utf-8")
    main(["translate", "--model", str(tiny_model_dir), "--input", str(sentences),
          "--output", str(whole), "--beam-size", "1"])  # fmt: skip
    first, second = whole.read_text(encoding="utf-8").splitlines()
    assert lines[0] == f"{first} {second}"


@pytest.mark.parametrize("lang", ["xx", ""])
def test_unknown_language_still_splits_and_keeps_text(lang: str) -> None:
    doc = segment_text("One. Two.", lang)
    assert doc.join(list(doc.sentences)) == "One. Two."
