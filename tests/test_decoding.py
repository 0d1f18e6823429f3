"""One decoding path: validation, `nmt evaluate`, `nmt translate` and streaming decode by the same
rules; every option changes the output where it should; prefixes, ensembles and sampling."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from nmt.cli import main
from nmt.corpus import read_lines
from nmt.search import SearchOptions
from nmt.translate import Translator, decode_options, translate_corpus

SENTENCES = [
    "El gato come pan hoy.",
    "La mujer busca un libro y la niña ve la luna mañana.",
    "Mi amigo tiene flores.",
    "El hombre quiere una casa ahora.",
    "Hoy hoy hoy hoy hoy hoy.",
]


@pytest.fixture(scope="module")
def translator(tiny_model_dir: Path) -> Translator:
    return Translator.load(tiny_model_dir)


def texts(
    translator: Translator, options: SearchOptions, sentences: list[str] = SENTENCES
) -> list[str]:
    return [r.text for r in translator.translate(sentences, options)]


def stream(translator: Translator, text: str, options: SearchOptions, **kw: object) -> str:
    shown: list[str] = []
    result = translator.translate_stream(text, options, on_text=shown.append, **kw)  # type: ignore[arg-type]
    assert not shown or shown[-1] == result.text
    return result.text


# -- one path ----------------------------------------------------------------------------------


def test_dev_bleu_logged_in_training_equals_nmt_evaluate_on_that_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tiny_model_dir.parent
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if "dev_bleu" in r]
    meta = json.loads((tiny_model_dir / "meta.json").read_text())
    cfg = yaml.safe_load((tiny_model_dir / "config.yaml").read_text())
    n = cfg["train"]["valid_max_sentences"]
    step = meta["step"]
    logged = next(r["dev_bleu"] for r in valid if r["step"] == step)
    corpus = Path(cfg["data"]["corpus"])
    src, ref = tmp_path / "dev.es", tmp_path / "dev.en"
    src.write_text("".join(line + "\n" for line in list(read_lines(corpus / "dev.es"))[:n]))
    ref.write_text("".join(line + "\n" for line in list(read_lines(corpus / "dev.en"))[:n]))
    # the shipped model is the validated checkpoint of that step (no averaging or EMA here)
    assert meta["scores"]["dev_bleu"] == pytest.approx(logged, abs=1e-9)
    beam = str(cfg["train"].get("valid_beam_size", 1))
    assert main(["evaluate", "--model", str(tiny_model_dir), "--src", str(src), "--ref", str(ref),
                 "--beam-size", beam, "--bootstrap", "0", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["bleu"]["score"] == pytest.approx(logged, abs=1e-6)


def test_max_len_b_applies_when_max_len_a_is_derived_from_data(translator: Translator) -> None:
    cfg = translator.cfg.decode
    ratio = translator.meta["length_ratio"]
    assert decode_options(replace(cfg, max_len_a=0.0, max_len_b=None), ratio).max_len_b == max(
        ratio[1], 1
    )
    derived = decode_options(replace(cfg, max_len_a=0.0, max_len_b=1), ratio)
    assert (derived.max_len_a, derived.max_len_b) == (ratio[0], 1.0)
    short = replace(translator.options, max_len_a=0.0, max_len_b=2)
    for beam in (1, 3):
        out = translator.translate(SENTENCES, replace(short, beam_size=beam))
        assert all(len(translator.tokenizer.encode_tgt([r.text])[0]) <= 2 for r in out)
        assert any(not r.finished for r in out)
    assert (
        len(
            translator.tokenizer.encode_tgt(
                [stream(translator, SENTENCES[1], replace(short, beam_size=1))]
            )[0]
        )
        <= 2
    )


@pytest.mark.parametrize("beam", [1, 3])
def test_no_repeat_ngram_blocks_repeats_in_greedy_beam_and_streaming(
    translator: Translator, beam: int
) -> None:
    base = replace(translator.options, beam_size=beam, max_len_a=0.0, max_len_b=12)
    blocked = replace(base, no_repeat_ngram=1)
    for result in translator.translate(SENTENCES, blocked):
        ids = translator.tokenizer.encode_tgt([result.text])[0]
        assert len(ids) == len(set(ids)), result.text
    if beam == 1:
        text = stream(translator, SENTENCES[4], blocked)
        assert text == texts(translator, blocked, [SENTENCES[4]])[0]


def test_min_length_holds_in_every_mode(translator: Translator) -> None:
    opts = replace(translator.options, min_len=6, max_len_a=0.0, max_len_b=20)
    for beam in (1, 3):
        for result in translator.translate(["Agua.", "Pan."], replace(opts, beam_size=beam)):
            assert len(translator.tokenizer.encode_tgt([result.text])[0]) >= 6
    greedy = replace(opts, beam_size=1)
    assert stream(translator, "Agua.", greedy) == texts(translator, greedy, ["Agua."])[0]
    sampled = replace(greedy, sampling="topk", seed=3)
    assert stream(translator, "Agua.", sampled) == texts(translator, sampled, ["Agua."])[0]


def test_streaming_gives_what_translate_gives_for_the_same_options(translator: Translator) -> None:
    for options in (
        replace(translator.options, beam_size=1),
        replace(translator.options, beam_size=1, length_penalty=0.0, coverage_penalty=0.4),
        replace(translator.options, beam_size=1, sampling="topp", top_p=0.8, seed=7),
    ):
        for text in SENTENCES:
            assert stream(translator, text, options) == texts(translator, options, [text])[0]
    with pytest.raises(ValueError, match="beam_size 1"):
        stream(translator, SENTENCES[0], replace(translator.options, beam_size=3))


def test_length_and_coverage_penalties_change_the_beam_ranking(translator: Translator) -> None:
    base = replace(translator.options, beam_size=3, n_best=3)
    scores = {
        alpha: [
            h[1]
            for r in translator.translate(SENTENCES, replace(base, length_penalty=alpha))
            for h in r.n_best
        ]
        for alpha in (0.0, 1.5)
    }
    assert scores[0.0] != scores[1.5]
    covered = translator.translate(SENTENCES, replace(base, coverage_penalty=1.0))
    plain = translator.translate(SENTENCES, base)
    assert [r.score for r in covered] != [r.score for r in plain]


# -- sampling ----------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_samples_and_top_p_to_zero_is_greedy(
    translator: Translator,
) -> None:
    lines = SENTENCES * 4
    sampled = replace(translator.options, beam_size=1, sampling="topk", temperature=1.5, seed=11)
    first = texts(translator, sampled, lines)
    assert texts(translator, sampled, lines) == first
    assert texts(translator, replace(sampled, seed=12), lines) != first
    # a sentence's sample depends on the seed and its line, not on how lines are batched
    for budget in (16, 64, 100_000):
        got = dict(translate_corpus(translator, lines, sampled, batch_tokens=budget))
        assert [got[i].text for i in range(len(lines))] == first
    greedy = texts(translator, replace(translator.options, beam_size=1), lines)
    nucleus = replace(translator.options, beam_size=1, sampling="topp", top_p=1e-6, seed=0)
    assert texts(translator, nucleus, lines) == greedy


# -- prefixes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize(
    "prefix",
    ["The", "The cat ", "Tomorrow,", "«Zyx» — q!", "ÆØÅ 42%;", "x", "The wo"],
)
def test_a_prefix_starts_every_output_verbatim(
    translator: Translator, beam: int, prefix: str
) -> None:
    options = replace(translator.options, beam_size=beam)
    results = translator.translate(SENTENCES, options, prefixes=[prefix] * len(SENTENCES))
    for result in results:
        assert result.text.startswith(prefix), (prefix, result.text)
        assert all(text.startswith(prefix) for text, _ in result.n_best)
    if beam == 1:
        assert stream(translator, SENTENCES[0], options, prefix=prefix).startswith(prefix)


def test_an_empty_prefix_is_normal_decoding(translator: Translator) -> None:
    for beam in (1, 3):
        options = replace(translator.options, beam_size=beam)
        plain = texts(translator, options)
        assert [
            r.text for r in translator.translate(SENTENCES, options, prefixes=[""] * 5)
        ] == plain
        mixed = translator.translate(SENTENCES, options, prefixes=["", "The", "", "", None])
        assert [r.text for i, r in enumerate(mixed) if i != 1] == [
            t for i, t in enumerate(plain) if i != 1
        ]


def test_nmt_translate_reads_prefixes_from_a_file(
    tiny_model_dir: Path, tmp_path: Path, translator: Translator
) -> None:
    src, prefixes, out = tmp_path / "in.es", tmp_path / "prefix.en", tmp_path / "out.en"
    src.write_text("".join(s + "\n" for s in SENTENCES))
    prefixes.write_text("The\n\nA dog,\n\nI \n")
    assert main(["translate", "--model", str(tiny_model_dir), "--input", str(src),
                 "--prefix-file", str(prefixes), "--output", str(out)]) == 0  # fmt: skip
    lines = out.read_text().split("\n")[:-1]
    assert lines[0].startswith("The") and lines[2].startswith("A dog,")
    assert lines[4].startswith("I ")
    plain = texts(translator, translator.options, [SENTENCES[1], SENTENCES[3]])
    assert [lines[1], lines[3]] == plain
    prefixes.write_text("The\n")
    assert main(["translate", "--model", str(tiny_model_dir), "--input", str(src),
                 "--prefix-file", str(prefixes)]) == 2  # fmt: skip


# -- the command line ----------------------------------------------------------------------------


def test_decoding_flags_reach_the_search(
    tiny_model_dir: Path, tmp_path: Path, translator: Translator
) -> None:
    src, out = tmp_path / "in.es", tmp_path / "out.en"
    src.write_text("".join(s + "\n" for s in SENTENCES))

    def run(*flags: str) -> list[str]:
        assert main(["translate", "--model", str(tiny_model_dir), "--input", str(src),
                     "--output", str(out), *flags]) == 0  # fmt: skip
        return out.read_text().split("\n")[:-1]

    cases = {
        ("--beam-size", "1"): replace(translator.options, beam_size=1),
        ("--max-length-b", "2"): replace(translator.options, max_len_b=2),
        ("--no-repeat-ngram", "1", "--beam-size", "1"): replace(
            translator.options, no_repeat_ngram=1, beam_size=1
        ),
        ("--min-length", "7"): replace(translator.options, min_len=7),
        ("--length-penalty", "2", "--coverage-penalty", "0.5"): replace(
            translator.options, length_penalty=2.0, coverage_penalty=0.5
        ),
        ("--sampling", "topp", "--top-p", "0.9", "--seed", "4"): replace(
            translator.options, beam_size=1, sampling="topp", top_p=0.9, seed=4
        ),
    }
    for flags, options in cases.items():
        assert run(*flags) == texts(translator, options), flags
    assert main(["translate", "--model", str(tiny_model_dir), "--input", str(src),
                 "--top-p", "0.5"]) == 2  # fmt: skip


# -- ensembles -------------------------------------------------------------------------------------


def test_an_ensemble_of_one_or_two_copies_translates_as_the_model(
    tiny_model_dir: Path, tmp_path: Path, translator: Translator
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    options = replace(translator.options, beam_size=3, n_best=2)
    alone = translator.translate(SENTENCES, options)
    for dirs in ([tiny_model_dir], [tiny_model_dir, copy]):
        ensemble = Translator.load(dirs)
        together = ensemble.translate(SENTENCES, options)
        assert [r.text for r in together] == [r.text for r in alone]
        assert [r.score for r in together] == pytest.approx([r.score for r in alone], abs=1e-4)
    src, out = tmp_path / "in.es", tmp_path / "out.en"
    src.write_text("".join(s + "\n" for s in SENTENCES))
    assert main(["translate", "--model", str(tiny_model_dir), "--model", str(copy),
                 "--input", str(src), "--output", str(out)]) == 0  # fmt: skip
    assert out.read_text().split("\n")[:-1] == texts(translator, translator.options)


def test_the_service_serves_an_ensemble_written_a_comma_b(
    tiny_model_dir: Path, tmp_path: Path, translator: Translator
) -> None:
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import settings_from

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    app = create_app(settings_from(model_dir=f"{tiny_model_dir},{copy}", warmup=False))
    with TestClient(app) as client:
        assert app.state.batcher.wait_ready(60)
        r = client.post("/v1/translate", json={"text": SENTENCES, "beam_size": 2})
        assert [t["text"] for t in r.json()["translations"]] == texts(
            translator, replace(translator.options, beam_size=2)
        )
        info = client.get("/v1/model").json()
        assert info["parameters"]["total"] == 2 * translator.info()["parameters"]["total"]


def test_an_ensemble_of_models_with_different_vocabularies_is_refused(
    tiny_model_dir: Path,
    toy_tokenizer_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    (other / "spm.model").write_bytes(next(toy_tokenizer_dir.glob("*.model")).read_bytes())
    with pytest.raises(ValueError, match="another tokenizer"):
        Translator.load([tiny_model_dir, other])
    src = tmp_path / "in.es"
    src.write_text("Pan.\n")
    assert main(["translate", "--model", str(tiny_model_dir), "--model", str(other),
                 "--input", str(src)]) == 2  # fmt: skip
    assert "another tokenizer" in capsys.readouterr().err


def test_translate_corpus_takes_options(translator: Translator) -> None:
    options = replace(translator.options, beam_size=1)
    got = dict(translate_corpus(translator, SENTENCES, options))
    assert [got[i].text for i in range(len(SENTENCES))] == texts(translator, options)
