"""Reading, validating, filtering and writing raw parallel text."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from nmt.corpus import (
    CorpusError,
    CorpusWriter,
    FilterStats,
    choose_holdout,
    count_lines,
    drop_reason,
    filter_pairs,
    iter_lines,
    list_languages,
    normalize_text,
    prepare_corpus,
    read_jsonl,
    read_lines,
    read_manifest,
    read_parallel,
    read_tsv,
    require_pairs,
    split_files,
    write_corpus,
)


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_read_parallel_streams_aligned_pairs(tmp_path: Path) -> None:
    src = write(tmp_path / "a.es", "uno\ndos\ntres\n")
    tgt = write(tmp_path / "a.en", "one\ntwo\nthree")  # no final newline
    assert list(read_parallel(src, tgt)) == [("uno", "one"), ("dos", "two"), ("tres", "three")]


@pytest.mark.parametrize("longer", ["src", "tgt"])
def test_different_line_counts_name_both_files_and_counts(tmp_path: Path, longer: str) -> None:
    src = write(tmp_path / "a.es", "uno\ndos\ntres\n" if longer == "src" else "uno\n")
    tgt = write(tmp_path / "a.en", "one\n" if longer == "src" else "one\ntwo\nthree\n")
    with pytest.raises(CorpusError) as err:
        list(read_parallel(src, tgt))
    counts = (3, 1) if longer == "src" else (1, 3)
    assert f"{src} has {counts[0]} lines but {tgt} has {counts[1]}" in str(err.value)


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    src = write(tmp_path / "a.es", b"uno\ndos\ntr\xffes\n")
    tgt = write(tmp_path / "a.en", "one\ntwo\nthree\n")
    with pytest.raises(CorpusError, match=r"a\.es: line 3 is not valid UTF-8 \(byte 0xff"):
        list(read_parallel(src, tgt))


def test_missing_file_lists_what_the_folder_has(tmp_path: Path) -> None:
    write(tmp_path / "train.es", "uno\n")
    with pytest.raises(CorpusError, match=r"file not found: .*train\.en .*has: train\.es"):
        list(read_parallel(tmp_path / "train.es", tmp_path / "train.en"))


def test_lines_split_only_at_newline(tmp_path: Path) -> None:
    path = write(tmp_path / "x.txt", "\ufeffa\u2028b\r\nc\rd\n\n")
    assert list(read_lines(path)) == ["a\u2028b", "c\rd", ""]
    assert count_lines(path) == 3
    assert count_lines(write(tmp_path / "y.txt", "a\nb")) == 2
    assert count_lines(write(tmp_path / "z.txt", "")) == 0


def test_split_files_finds_a_split_and_explains_what_is_missing(toy_corpus: Path) -> None:
    src, tgt = split_files(toy_corpus, "dev", "es", "en")
    assert src == toy_corpus / "dev.es" and tgt == toy_corpus / "dev.en"
    assert list_languages(toy_corpus) == {
        "dev": ["en", "es"],
        "test": ["en", "es"],
        "train": ["en", "es"],
    }
    with pytest.raises(
        CorpusError, match=r"no dev file for language 'fr'; dev has languages: en, es"
    ):
        split_files(toy_corpus, "dev", "fr", "en")
    with pytest.raises(CorpusError, match=r"no 'valid' split; it has: dev \(en/es\), test"):
        split_files(toy_corpus, "valid", "es", "en")
    with pytest.raises(CorpusError, match=r"corpus folder not found: .*nope; .* has: toy-es-en"):
        split_files(toy_corpus.parent / "nope", "train", "es", "en")


def test_read_tsv(tmp_path: Path) -> None:
    path = write(tmp_path / "p.tsv", "hola\thello\n\nadiós\tbye\n")
    assert list(read_tsv(path)) == [("hola", "hello"), ("", ""), ("adiós", "bye")]
    bad = write(tmp_path / "bad.tsv", "hola\thello\nsolo una columna\n")
    with pytest.raises(CorpusError, match=r"bad\.tsv: line 2 has 1 tab-separated column"):
        list(read_tsv(bad))
    three = write(tmp_path / "three.tsv", "7\thola\thello\n8\tadiós\tbye\n")
    assert list(read_tsv(three, 1, 2)) == [("hola", "hello"), ("adiós", "bye")]


def test_a_tab_inside_a_tsv_sentence_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.tsv", "hola\thello\nadiós\tbye\tfor now\n")
    with pytest.raises(CorpusError, match=r"p\.tsv: line 2 has 3 tab-separated column.*expected 2"):
        list(read_tsv(path))
    with pytest.raises(CorpusError, match=r"line 2 has 4 .*expected 3; a tab inside a sentence"):
        list(read_tsv(write(tmp_path / "q.tsv", "1\ta\tb\n2\ta\tb\tc\n"), 1, 2))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, r"line 2 is JSON nested too deeply"),
        ('{"src": ' + "9" * 5000 + ', "tgt": "x"}', r"line 2 cannot be read as JSON \(Exceeds"),
        ('{"src": "ok", "tgt": "bad \\ud800 half"}', r"line 2, field 'tgt': unpaired surrogate"),
        ('{"translation": {"es": 5, "en": "five"}}', r"line 2, field 'translation.es': expected a"),
        ('{"es": ["a"], "en": "x"}', r"line 2, field 'es': expected a string, got list"),
    ],
)
def test_jsonl_that_is_not_text_pairs_is_an_error_naming_line_and_field(
    tmp_path: Path, line: str, message: str
) -> None:
    path = write(tmp_path / "p.jsonl", '{"src": "hola", "tgt": "hello"}\n' + line + "\n")
    with pytest.raises(CorpusError, match=rf"p\.jsonl: {message}"):
        list(read_jsonl(path, "es", "en"))


def test_lines_of_a_stream_split_as_a_file_does(tmp_path: Path) -> None:
    raw = "\ufeffuno\r\ndos\u2028tres\rcuatro\fcinco\n\nseis".encode()
    streamed = list(iter_lines(io.BytesIO(raw), "<stdin>"))
    assert streamed == list(read_lines(write(tmp_path / "x", raw)))
    assert streamed == ["uno", "dos\u2028tres\rcuatro\fcinco", "", "seis"]
    with pytest.raises(CorpusError, match=r"<stdin>: line 2 is not valid UTF-8"):
        list(iter_lines(io.BytesIO(b"ok\nbad \xff\n"), "<stdin>"))


def test_require_pairs_finds_a_pair_with_text_or_says_there_is_none(tmp_path: Path) -> None:
    require_pairs(write(tmp_path / "a.es", "\nhola\n"), write(tmp_path / "a.en", "\nhello\n"))
    empty = write(tmp_path / "e.es", ""), write(tmp_path / "e.en", "")
    with pytest.raises(CorpusError, match=r"no sentence pairs: .*e\.es and .*e\.en are empty"):
        require_pairs(*empty)
    one_sided = write(tmp_path / "o.es", "hola\n\n"), write(tmp_path / "o.en", "\n \n")
    with pytest.raises(CorpusError, match=r"have 2 lines but none with text on both sides"):
        require_pairs(*one_sided)


def test_prepare_corpus_with_no_training_pair_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"no training pairs .*kept 0 pairs, dropped 1"):
        prepare_corpus(tmp_path / "c", "es", "en", [("", "x")], {"dev": [("a", "b")]}, "test")
    assert not list((tmp_path / "c").iterdir())


def test_read_jsonl_both_schemas(tmp_path: Path) -> None:
    lines = [
        {"src": "hola", "tgt": "hello"},
        {"translation": {"es": "gato", "en": "cat", "de": "Katze"}},
        {"es": "perro", "en": "dog"},
    ]
    path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    assert list(read_jsonl(path, "es", "en")) == [
        ("hola", "hello"),
        ("gato", "cat"),
        ("perro", "dog"),
    ]


def test_read_jsonl_errors_name_line_and_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '{"translation": {"de": "Katze", "en": "cat"}}\n')
    with pytest.raises(
        CorpusError, match=r"line 1: no language 'fr'; this record has \['de', 'en'\]"
    ):
        list(read_jsonl(path, "fr", "en"))
    broken = write(tmp_path / "b.jsonl", '{"src": "a", "tgt": "b"}\n{"src": \n')
    with pytest.raises(CorpusError, match=r"b\.jsonl: line 2 is not valid JSON"):
        list(read_jsonl(broken))


def test_drop_reason() -> None:
    assert drop_reason(0, 5) == "empty"
    assert drop_reason(5, 0, max_len=3) == "empty"
    assert drop_reason(5, 4, max_len=4) == "too_long"
    assert drop_reason(2, 9, max_ratio=4) == "length_ratio"
    assert drop_reason(2, 8, max_len=10, max_ratio=4) is None


def test_filter_pairs_counts_every_reason() -> None:
    pairs = [
        ("hola  mundo", "hello\tworld"),
        ("", "empty source"),
        ("x" * 50, "y" * 50),
        ("sí", "yes, absolutely, without any doubt"),
        ("  ", " "),
    ]
    stats = FilterStats()
    kept = list(filter_pairs(pairs, stats, max_chars=40, max_length_ratio=5))
    assert kept == [("hola mundo", "hello world")]
    assert stats.kept == 1
    assert stats.dropped == {"empty": 2, "too_long": 1, "length_ratio": 1}
    assert stats.summary() == "kept 1 pairs, dropped 4 (empty: 2, length_ratio: 1, too_long: 1)"


def test_normalize_text() -> None:
    assert normalize_text("  a\u00a0b \n c\u200b ") == "a b c"
    assert normalize_text("n\u0303") == "ñ"  # NFC


def test_write_corpus_writes_aligned_files_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "my-corpus"
    manifest = write_corpus(
        out,
        {"train": [("uno\ndos", "one"), ("tres", "three")], "dev": iter([("cuatro", "four")])},
        "es",
        "en",
        source="unit test",
        filters={"max_chars": 10},
    )
    assert (out / "train.es").read_text("utf-8") == "uno dos\ntres\n"
    assert (out / "train.en").read_text("utf-8") == "one\nthree\n"
    assert manifest["splits"] == {"train": 2, "dev": 1}
    assert read_manifest(out) == manifest
    assert manifest["languages"] == ["es", "en"] and manifest["filters"] == {"max_chars": 10}
    assert sorted(p.name for p in out.iterdir()) == [
        "dev.en", "dev.es", "manifest.json", "train.en", "train.es"
    ]  # fmt: skip


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    def pairs():
        yield "uno", "one"
        raise CorpusError("boom")

    with pytest.raises(CorpusError, match="boom"):
        write_corpus(tmp_path / "c", {"train": pairs()}, "es", "en", source="x")
    assert list((tmp_path / "c").iterdir()) == []
    with CorpusWriter(tmp_path / "d", "es", "en") as writer:
        writer.write("train", "a", "b")  # never closed: nothing is kept
    assert list((tmp_path / "d").iterdir()) == []


def test_choose_holdout_is_reproducible_and_sized() -> None:
    held = choose_holdout(100, 10, 5, seed=3)
    assert held == choose_holdout(100, 10, 5, seed=3)
    assert held != choose_holdout(100, 10, 5, seed=4)
    assert sorted(held.values()).count("dev") == 10 and list(held.values()).count("test") == 5
    with pytest.raises(CorpusError, match="cannot hold out 60 dev \\+ 40 test pairs from 100"):
        choose_holdout(100, 60, 40)


def test_prepare_corpus_filters_training_pairs_only(tmp_path: Path) -> None:
    train = [(f"frase {i}", f"sentence {i}") for i in range(20)] + [("", "lost")]
    manifest, stats = prepare_corpus(
        tmp_path / "c",
        "es",
        "en",
        train,
        {"test": [("", "kept whole")]},
        source="unit test",
        holdout=choose_holdout(len(train), 4, 0, seed=1),
    )
    assert stats["train"].kept + stats["dev"].kept == 20
    assert stats["train"].dropped["empty"] + stats["dev"].dropped["empty"] == 1
    assert manifest["splits"]["test"] == 1
    assert (tmp_path / "c" / "test.en").read_text("utf-8") == "kept whole\n"
    dev = set((tmp_path / "c" / "dev.es").read_text("utf-8").splitlines())
    assert dev.isdisjoint((tmp_path / "c" / "train.es").read_text("utf-8").splitlines())


def test_reading_in_blocks_keeps_lines_and_line_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nmt.corpus

    monkeypatch.setattr(nmt.corpus, "_BLOCK", 7)  # lines straddle many blocks
    text = "".join(f"línea número {i}\r\n" for i in range(40))
    path = write(tmp_path / "x.es", text.encode() + b"\xe2\x82 broken\nlast")
    it = read_lines(path)
    assert [next(it) for _ in range(40)] == [f"línea número {i}" for i in range(40)]
    with pytest.raises(
        CorpusError, match=r"x\.es: line 41 is not valid UTF-8 \(byte 0xe2 at byte offset 0\)"
    ):
        next(it)


# -- what `nmt train` makes of it ---------------------------------------------------------------

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def train_argv(corpus: Path, run: Path) -> list[str]:
    sets = [f"data.corpus={corpus}", "data.src_lang=es", "data.tgt_lang=en", "train.max_steps=2",
            "train.valid_every=2", "train.test_at_end=false"]  # fmt: skip
    return ["train", "--config", str(TINY), "--run-dir", str(run), "--no-progress",
            *(arg for s in sets for arg in ("--set", s))]  # fmt: skip


def test_training_on_an_empty_split_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nmt.cli import main

    corpus = tmp_path / "c"
    write_corpus(corpus, {"train": [], "dev": [("hola", "hello")]}, "es", "en", source="test")
    assert main(train_argv(corpus, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{corpus / 'train.es'} and {corpus / 'train.en'} are empty" in err


def test_training_reads_dev_references_as_it_reads_dev_sources(
    toy_corpus: Path, tmp_path: Path
) -> None:
    from nmt.cli import main

    corpus = Path(shutil.copytree(toy_corpus, tmp_path / "c"))
    refs = (corpus / "dev.en").read_text("utf-8").split("\n")
    refs[3] = refs[3].replace(" ", "\u2028", 1)  # str.splitlines would split these lines
    refs[5] = refs[5].replace(" ", "\r", 1)
    (corpus / "dev.en").write_text("\n".join(refs), encoding="utf-8", newline="")
    assert main(train_argv(corpus, tmp_path / "run")) == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open(encoding="utf-8")]
    assert [r["dev_sentences"] for r in records if r["kind"] == "valid"] == [30]
