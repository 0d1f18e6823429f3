"""The corpus preparation scripts: SWORD Bible, Hugging Face datasets, local files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from nmt.corpus import read_manifest

SCRIPTS = Path(__file__).resolve().parent.parent / "data_scripts"
SWORD = Path("/usr/share/sword")


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"data_scripts_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bible = load_script("bible")
local = load_script("local")
hf_dataset = load_script("hf_dataset")


def lines(path: Path) -> list[str]:
    return path.read_text("utf-8").splitlines()


# -- bible.py ---------------------------------------------------------------------------------


def test_notes_between_words_leave_a_space() -> None:
    raw = (
        '<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">'
        "1:1 </reference>The Hebrew word rendered “God” is “Elohim”.</note>"
        '<w lemma="strong:H1254">created</w> the heavens<note type="crossReference">'
        "<reference>Gen 2:4</reference></note>, and his only born<note>Or, unique</note>Son."
    )
    assert bible.clean_osis(raw) == "God created the heavens, and his only born Son."


def test_markup_tags_titles_and_glossary_go_quotes_straighten() -> None:
    raw = (
        '<div type="x-milestone" subType="x-preverse" sID="pv1"/><title canonical="true" '
        'type="psalm">A Psalm by David.</title> <lg sID="g1"/><l level="1" sID="g2"/>Yahweh, '
        'how my adversaries <w>have</w> increased!<l eID="g2"/> <speaker>Beloved</speaker>'
        '<q who="Jesus">“It’s ‘good’ ”</q> <chapter eID="Ps.3"/>'
        '<div sID="gen1" type="glossary"/> <title type="main">Glossary</title> Abaddon is...'
    )
    text = bible.clean_osis(raw)
    assert text == "A Psalm by David. Yahweh, how my adversaries have increased! \"It's 'good'\""
    assert "<" not in text and "Glossary" not in text and "Beloved" not in text


def test_added_words_join_only_pronouns_to_verbs() -> None:
    verses = {
        ("Gen", 5, 3): "y engendró</w><transChange>un hijo</transChange><w>á su semejanza",
        ("1Kgs", 3, 5): "y díjo</w><transChange>le</transChange><w>Dios",
        ("Gen", 1, 1): "díjole Jehová, y los bendijo",  # the joined form occurs elsewhere
        ("Num", 1, 1): "y vengar</w><transChange>le</transChange> de Jehová</w><transChange>los",
    }
    texts = {k: bible.strip_markup(v) for k, v in verses.items()}
    assert bible.join_words_at_junctions(texts) == 2
    clean = {k: bible.tidy(v) for k, v in texts.items()}
    assert clean[("Gen", 5, 3)] == "y engendró un hijo á su semejanza"
    assert clean[("1Kgs", 3, 5)] == "y díjole Dios"
    assert clean[("Num", 1, 1)] == "y vengarle de Jehová los"


def test_chapter_openings_lose_their_capitals_and_subscriptions_go() -> None:
    verses = {
        ("Gen", 1, 1): "EN el principio crió Dios los cielos.",
        ("Gen", 2, 1): "Y ACONTECIÓ que JEHOVÁ habló.",
        ("Gen", 1, 2): "Y aconteció que Jehová vió el REY DE LOS JUDÍOS.",
        ("Rom", 16, 27): "sea gloria para siempre. Amén. Fué escrita de Corinto á los Romanos.",
    }
    bible.fix_chapter_capitals(verses)
    assert verses[("Gen", 1, 1)] == "En el principio crió Dios los cielos."
    assert verses[("Gen", 2, 1)] == "Y aconteció que JEHOVÁ habló."  # only the first two words
    assert verses[("Gen", 1, 2)].endswith("REY DE LOS JUDÍOS.")
    assert bible.drop_subscriptions(verses) == 1
    assert verses[("Rom", 16, 27)] == "sea gloria para siempre. Amén."


def test_alignment_follows_verse_numbers() -> None:
    lengths = [40, 120, 60, 200, 90, 150, 30, 110]
    es = [(("B", 1, v), "x" * n, frozenset[str]()) for v, n in enumerate(lengths, start=1)]
    en = [(("B", 1, v), "y" * n, frozenset[str]()) for v, n in enumerate(lengths, start=1)]
    assert bible.align_verses(es, en, ratio=1.0) == [([i], [i]) for i in range(len(lengths))]
    # a verse the Spanish leaves out is dropped, the others keep their partners
    beads = bible.align_verses(es[:2] + es[3:], en, ratio=1.0)
    assert beads == [([0], [0]), ([1], [1]), ([], [2])] + [([i - 1], [i]) for i in range(3, 8)]


def test_alignment_repairs_a_renumbered_stretch() -> None:
    # English chapters 1 and 2 of four verses; the Spanish moves 1:4 to 2:1, shifts chapter 2 by
    # one and merges the last two verses (what the RV1909 module does in Jonah 1-2)
    lengths = [50, 140, 70, 90, 160, 40, 120, 80]
    names = [frozenset({f"name{i}"}) for i in range(8)]
    en_keys = [("B", c, v) for c in (1, 2) for v in range(1, 5)]
    en = [(k, "y" * n, names[i]) for i, (k, n) in enumerate(zip(en_keys, lengths, strict=True))]
    es_keys = [
        ("B", 1, 1),
        ("B", 1, 2),
        ("B", 1, 3),
        ("B", 2, 1),
        ("B", 2, 2),
        ("B", 2, 3),
        ("B", 2, 4),
    ]
    es_texts = [(lengths[i], names[i]) for i in range(6)] + [
        (lengths[6] + lengths[7] + 1, names[6] | names[7])
    ]
    es = [(k, "x" * n, ns) for k, (n, ns) in zip(es_keys, es_texts, strict=True)]
    beads = bible.align_verses(es, en, ratio=1.0)
    assert beads == [([i], [i]) for i in range(6)] + [([6], [6, 7])]


def test_names_key_spellings_together() -> None:
    assert bible.name_key("Ornán") == bible.name_key("Ornan") == "orna"
    assert bible.name_key("Issachâr") == bible.name_key("Issachar")
    assert bible.name_key("Jehová") == "ieob" and bible.name_key("Yahweh") == "iawe"


def test_missing_sword_modules_say_how_to_install_them(tmp_path: Path) -> None:
    with pytest.raises(bible.CorpusError, match="apt-get install sword-text-sparv sword-text-web"):
        bible.find_sword_path((bible.SRC_MODULE, bible.TGT_MODULE), [str(tmp_path)])


@pytest.mark.skipif(not (SWORD / "mods.d").is_dir(), reason="SWORD Bible modules not installed")
def test_real_modules_give_clean_aligned_verses() -> None:
    path = bible.find_sword_path((bible.SRC_MODULE, bible.TGT_MODULE), [str(SWORD)])
    books = {"Jonah", "Ruth"}
    src = bible.read_module(path, bible.SRC_MODULE, books)
    tgt = bible.read_module(path, bible.TGT_MODULE, books)
    splits, report = bible.build_pairs(src, tgt)
    dev = splits["dev"]
    assert not splits["train"] and not splits["test"]
    assert 125 < len(dev) <= 85 + 48  # Ruth has 85 verses, Jonah 48
    assert all("<" not in s + t and "  " not in s + t for s, t in dev)
    # the RV1909 module numbers Jonah 1:17 as 2:1: the fish verses pair up anyway
    fish = [(s, t) for s, t in dev if "gran pez" in s and "tragase" in s]
    assert len(fish) == 1 and "huge fish to swallow up Jonah" in fish[0][1]
    assert report["renumbered_pairs"] >= 9


# -- local.py ---------------------------------------------------------------------------------


def test_local_pair_of_files_with_holdout(tmp_path: Path) -> None:
    (tmp_path / "c.de").write_text("".join(f"satz {i}\n" for i in range(50)) + "\n")
    (tmp_path / "c.en").write_text("".join(f"sentence {i}\n" for i in range(50)) + "lost\n")
    out = tmp_path / "out"
    argv = ["--src", "de", "--tgt", "en", "--out", str(out), "--train",
            str(tmp_path / "c.de"), str(tmp_path / "c.en"), "--dev-size", "5", "--test-size", "5"]  # fmt: skip
    assert local.main(argv) == 0
    manifest = read_manifest(out)
    assert manifest is not None
    assert (
        sum(manifest["splits"].values()) == 50
        and manifest["splits"]["dev"] + manifest["splits"]["test"] >= 9
    )
    assert manifest["filters"]["dropped"] in (
        {"train": {"empty": 1}},
        {"dev": {"empty": 1}},
        {"test": {"empty": 1}},
    )
    for split in ("train", "dev", "test"):
        de, en = lines(out / f"{split}.de"), lines(out / f"{split}.en")
        assert len(de) == len(en) and all(
            d.split()[1] == e.split()[1] for d, e in zip(de, en, strict=True)
        )


def test_local_tsv_and_jsonl_with_given_dev(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("hallo\thello\nwelt\tworld\n")
    (tmp_path / "dev.jsonl").write_text(
        json.dumps({"translation": {"de": "ja", "en": "yes"}}) + "\n"
    )
    out = tmp_path / "out"
    argv = ["--src", "de", "--tgt", "en", "--out", str(out),
            "--train", str(tmp_path / "train.tsv"), "--dev", str(tmp_path / "dev.jsonl")]  # fmt: skip
    assert local.main(argv) == 0
    assert lines(out / "train.de") == ["hallo", "welt"] and lines(out / "dev.en") == ["yes"]


def test_local_bad_input_is_a_clear_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.de").write_text("eins\nzwei\ndrei\n")
    (tmp_path / "a.en").write_text("one\ntwo\n")
    (tmp_path / "b.de").write_bytes(b"eins\nzw\xc3ei\n")
    (tmp_path / "b.en").write_text("one\ntwo\n")
    base = ["--src", "de", "--tgt", "en", "--out", str(tmp_path / "out"), "--train"]
    assert local.main(base + [str(tmp_path / "a.de"), str(tmp_path / "a.en")]) == 1
    assert "a.de has 3 lines but" in capsys.readouterr().err
    assert local.main(base + [str(tmp_path / "b.de"), str(tmp_path / "b.en")]) == 1
    assert "b.de: line 2 is not valid UTF-8" in capsys.readouterr().err
    assert local.main(base + [str(tmp_path / "c.de"), str(tmp_path / "b.en")]) == 1
    assert "file not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_local_with_no_training_pair_fails_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.de").write_text("\n\n")
    (tmp_path / "a.en").write_text("one\n\n")
    (tmp_path / "e.tsv").write_text("")
    base = ["--src", "de", "--tgt", "en", "--out", str(tmp_path / "out"), "--train"]
    for train in ([str(tmp_path / "a.de"), str(tmp_path / "a.en")], [str(tmp_path / "e.tsv")]):
        assert local.main(base + train) == 1
        assert "no training pairs" in capsys.readouterr().err
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_local_tsv_with_a_tab_inside_the_target_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "train.tsv").write_text("hallo\thello\nwelt\tthe\tworld\n")
    out = tmp_path / "out"
    argv = ["--src", "de", "--tgt", "en", "--out", str(out), "--train", str(tmp_path / "train.tsv")]
    assert local.main(argv) == 1
    assert "train.tsv: line 2 has 3 tab-separated column(s), expected 2" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


# -- hf_dataset.py ----------------------------------------------------------------------------


def _save_dataset(path: Path, splits: dict[str, int]) -> Path:
    import datasets

    rows = {
        name: datasets.Dataset.from_dict(
            {
                "translation": [
                    {"de": f"{name} satz {i}", "en": f"{name} sentence {i}"} for i in range(n)
                ]
            }
        )
        for name, n in splits.items()
    }
    datasets.DatasetDict(rows).save_to_disk(str(path))
    return path


def test_hf_saved_dataset_maps_validation_to_dev(tmp_path: Path) -> None:
    saved = _save_dataset(tmp_path / "saved", {"train": 20, "validation": 4, "test": 3})
    out = tmp_path / "out"
    assert hf_dataset.main([str(saved), "--src", "de", "--tgt", "en", "--out", str(out)]) == 0
    manifest = read_manifest(out)
    assert manifest is not None and manifest["splits"] == {"train": 20, "dev": 4, "test": 3}
    assert (
        lines(out / "dev.de")[0] == "validation satz 0"
        and lines(out / "dev.en")[0] == "validation sentence 0"
    )


def test_hf_dataset_without_dev_gets_one_from_train(tmp_path: Path) -> None:
    saved = _save_dataset(tmp_path / "saved", {"train": 40})
    out = tmp_path / "out"
    assert (
        hf_dataset.main(
            [str(saved), "--src", "en", "--tgt", "de", "--out", str(out), "--dev-size", "3"]
        )
        == 0
    )
    assert (len(lines(out / "train.en")), len(lines(out / "dev.de"))) == (37, 3)
    assert set(lines(out / "dev.en")).isdisjoint(lines(out / "train.en"))


def test_hf_json_lines_and_flat_columns(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"de": f"d{i}", "en": f"e{i}"}) + "\n" for i in range(30)))
    out = tmp_path / "out"
    argv = [
        str(path),
        "--src",
        "de",
        "--tgt",
        "en",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert hf_dataset.main(argv) == 0
    assert len(lines(out / "train.de")) + len(lines(out / "dev.de")) == 30


@pytest.mark.parametrize(
    ("rows", "field", "got"),
    [
        ({"de": ["a", "b", "c"], "en": [7, 8, 9]}, "en", "got int 7"),
        ({"translation": [{"de": ["a"], "en": "x"}] * 3}, "translation.de", "got list ['a']"),
    ],
)
def test_hf_columns_that_are_not_text_name_split_row_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: dict, field: str, got: str
) -> None:
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(saved))
    out = tmp_path / "o"
    argv = [str(saved), "--src", "de", "--tgt", "en", "--out", str(out), "--dev-size", "0"]
    assert hf_dataset.main(argv) == 1
    err = capsys.readouterr().err
    assert f"split train, row 0, field '{field}': expected a string, {got}" in err
    assert not out.exists() or not any(out.iterdir())


def test_hf_dataset_with_an_empty_train_split_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import datasets

    blank = datasets.Dataset.from_dict({"translation": [{"de": "", "en": "x"}] * 3})
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": blank}).save_to_disk(str(saved))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "o"
    for name, message in ((saved, "no training pairs"), (empty, "empty.jsonl is empty")):
        argv = [str(name), "--src", "de", "--tgt", "en", "--out", str(out)]
        assert hf_dataset.main(argv + ["--cache-dir", str(tmp_path / "c")]) == 1
        assert message in capsys.readouterr().err
        assert not out.exists() or not any(out.iterdir())


def test_hf_missing_language_lists_the_present_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = _save_dataset(tmp_path / "saved", {"train": 5})
    assert (
        hf_dataset.main([str(saved), "--src", "fr", "--tgt", "en", "--out", str(tmp_path / "o")])
        == 1
    )
    assert "no language 'fr'; it has: de, en" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_hf_hub_unreachable_fails_fast_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hf_dataset, "hub_reachable", lambda timeout=0: False)
    argv = ["surely-not-cached/wmt-xx", "--src", "de", "--tgt", "en", "--out", str(tmp_path / "o")]
    assert hf_dataset.main(argv) == 1
    err = capsys.readouterr().err
    assert "Hugging Face Hub is unreachable" in err and "local" in err
