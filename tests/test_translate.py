"""Translator and the translate/evaluate/info commands on a small trained model."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from search_helpers import call

from nmt.cli import main
from nmt.search import beam_search, greedy_search
from nmt.translate import Translator, word_alignment

ROOT = Path(__file__).resolve().parents[1]
PHARAOH = re.compile(r"^(\d+-\d+( \d+-\d+)*)?$")


@pytest.fixture(scope="module")
def translator(tiny_model_dir: Path) -> Translator:
    return Translator.load(tiny_model_dir)


@pytest.fixture(scope="module")
def sentences(toy_corpus: Path) -> list[str]:
    return (toy_corpus / "test.es").read_text(encoding="utf-8").splitlines()[:12]


def test_every_command_has_help(capsys):
    for command in ("train", "translate", "evaluate", "serve", "average", "info"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: nmt {command}" in capsys.readouterr().out


def test_trained_model_beam_of_one_equals_greedy_and_wide_beam_scores_higher(
    translator: Translator, sentences: list[str]
):
    src, lengths, mask, *_ = translator._batch(translator.tokenizer.encode_src(sentences))
    kw = {"bos_id": translator.tokenizer.bos_id, "eos_id": translator.tokenizer.eos_id,
          "max_len_a": 1.5, "max_len_b": 5}  # fmt: skip
    greedy = call(greedy_search, translator.model, src, lengths, mask, **kw)
    beam1 = call(
        beam_search, translator.model, src, lengths, mask, beam_size=1, length_penalty=0.0, **kw
    )
    wide = call(
        beam_search, translator.model, src, lengths, mask, beam_size=16, length_penalty=0.0, **kw
    )
    for g, b1, w in zip(greedy, beam1, wide):
        assert b1[0].tokens == g.tokens
        assert b1[0].log_prob == pytest.approx(g.log_prob, abs=1e-4)
        assert w[0].log_prob >= g.log_prob - 1e-4


def test_sentence_alone_or_in_a_batch_translates_the_same(
    translator: Translator, sentences: list[str]
):
    together = [
        r.text for r in translator.translate(sentences, translator.with_options(beam_size=4))
    ]
    alone = [
        translator.translate([s], translator.with_options(beam_size=4))[0].text for s in sentences
    ]
    assert together == alone


def test_n_best_lists_are_sorted_distinct_and_start_with_the_best(
    translator: Translator, sentences: list[str]
):
    for result in translator.translate(sentences, translator.with_options(beam_size=5, n_best=4)):
        scores = [s for _, s in result.n_best]
        texts = [t for t, _ in result.n_best]
        assert scores == sorted(scores, reverse=True)
        assert len(set(texts)) == len(texts)
        assert result.n_best[0] == (result.text, result.score)
    with pytest.raises(ValueError, match="n_best"):
        translator.translate(sentences[:1], translator.with_options(beam_size=2, n_best=3))


def test_translate_command_keeps_input_order_across_chunks(
    tmp_path: Path, translator: Translator, sentences: list[str]
):
    src = tmp_path / "in.es"
    src.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    out = tmp_path / "out.en"
    code = main(["translate", "--model", str(translator_dir(translator)), "--input", str(src),
                 "--output", str(out), "--beam-size", "3", "--chunk-lines", "5"])  # fmt: skip
    assert code == 0
    expected = [
        r.text for r in translator.translate(sentences, translator.with_options(beam_size=3))
    ]
    assert out.read_text(encoding="utf-8").splitlines() == expected


def translator_dir(translator: Translator) -> Path:
    return Path(translator.tokenizer.files[0]).parent


def test_translate_command_n_best_alignments_and_attention_plot(
    tmp_path: Path, translator: Translator, sentences: list[str]
):
    model = str(translator_dir(translator))
    src = tmp_path / "in.es"
    src.write_text("".join(s + "\n" for s in sentences[:3]), encoding="utf-8")
    nbest = tmp_path / "nbest.txt"
    assert main(["translate", "--model", model, "--input", str(src), "--output", str(nbest),
                 "--beam-size", "3", "--n-best", "2"]) == 0  # fmt: skip
    lines = [line.split(" ||| ") for line in nbest.read_text().splitlines()]
    assert [int(i) for i, _, _ in lines] == [0, 0, 1, 1, 2, 2]
    aligned = tmp_path / "aligned.jsonl"
    png = tmp_path / "attention.png"
    assert main(["translate", "--model", model, "--input", str(src), "--output", str(aligned),
                 "--alignments", "--plot-attention", "2", "--plot-file", str(png)]) == 0  # fmt: skip
    records = [json.loads(line) for line in aligned.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3]
    for r in records:
        assert len(r["attention"]) == len(r["tgt_tokens"])
        for row in r["attention"]:
            assert len(row) == len(r["src_tokens"])
            assert sum(row) == pytest.approx(1.0, abs=1e-3)
        assert PHARAOH.match(r["alignment"])
    assert png.stat().st_size > 2000


def test_word_alignment_merges_subwords_into_words():
    src = ["▁la", "▁casa", "s", "▁roja"]
    tgt = ["▁the", "▁red", "▁house", "s", "</s>"]
    attention = [
        [0.9, 0.05, 0.0, 0.05],
        [0.0, 0.1, 0.0, 0.9],
        [0.0, 0.8, 0.2, 0.0],
        [0.0, 0.1, 0.9, 0.0],
        [0.25, 0.25, 0.25, 0.25],
    ]
    assert word_alignment(src, tgt, attention) == "0-0 1-2 2-1"


def test_evaluate_hyp_matches_the_sacrebleu_command_line(tmp_path: Path, capsys):
    hyp = tmp_path / "hyp.en"
    ref = tmp_path / "ref.en"
    hyp.write_text("the cat sat on the mat \nin the beginning was the word\nhello world\t\n")
    ref.write_text("the cat sat on a mat\nin the beginning was the Word\nhello there world\n")
    assert (
        main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--json", "--bootstrap", "0"]) == 0
    )
    ours = json.loads(capsys.readouterr().out)
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "sacrebleu"), str(ref), "-i", str(hyp), "-m", "bleu",
         "chrf", "-b", "-w", "4"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    bleu, chrf = (float(x) for x in re.findall(r"[\d.]+", cli.stdout))
    assert round(ours["bleu"]["score"], 4) == bleu
    assert round(ours["chrf"]["score"], 4) == chrf
    assert ours["bleu"]["signature"].startswith("nrefs:1|")


def test_evaluate_with_a_model_writes_translations_and_pharaoh_alignments(
    tmp_path: Path, tiny_model_dir: Path, toy_corpus: Path, capsys
):
    out, align = tmp_path / "hyp.en", tmp_path / "align.txt"
    code = main(["evaluate", "--model", str(tiny_model_dir), "--src", str(toy_corpus / "test.es"),
                 "--ref", str(toy_corpus / "test.en"), "--output", str(out), "--alignments",
                 str(align), "--bootstrap", "50"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "BLEU" in printed and "95% CI" in printed and "nrefs:1" in printed
    n = len((toy_corpus / "test.es").read_text().splitlines())
    assert len(out.read_text().splitlines()) == n
    lines = align.read_text().splitlines()
    assert len(lines) == n and all(PHARAOH.match(line) for line in lines)


def test_evaluate_names_a_reference_with_the_wrong_line_count(tmp_path: Path, capsys):
    hyp, ref = tmp_path / "hyp", tmp_path / "ref"
    hyp.write_text("a\nb\n")
    ref.write_text("a\n")
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref)]) == 2
    err = capsys.readouterr().err
    assert "ref" in err and "1" in err and "2" in err


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_translate_input_lines_end_at_newline_only(
    tmp_path: Path, translator: Translator, sentences: list[str], monkeypatch, via: str
):
    lines = [sentences[0], sentences[1].replace(" ", "\r", 1), sentences[2].replace(" ", "\u2028", 1),
             sentences[3].replace(" ", "\f", 1), sentences[4]]  # fmt: skip
    data = ("\r\n".join(lines[:2]) + "\r\n" + "\n".join(lines[2:]) + "\n").encode()  # CRLF, LF
    src, out = tmp_path / "in.es", tmp_path / "out.en"
    src.write_bytes(data)
    argv = ["translate", "--model", str(translator_dir(translator)), "--output", str(out),
            "--beam-size", "3", "--chunk-lines", "2"]  # fmt: skip
    if via == "file":
        argv += ["--input", str(src)]
    else:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    assert main(argv) == 0
    expected = [r.text for r in translator.translate(lines, translator.with_options(beam_size=3))]
    assert out.read_text(encoding="utf-8").split("\n") == [*expected, ""]


def test_test_split_scores_read_lines_as_training_data_does(
    tmp_path: Path, tiny_model_dir: Path, toy_corpus: Path, capsys
):
    from dataclasses import replace

    from nmt import checkpoint as ckpt
    from nmt.validate import record_test_scores

    corpus = Path(shutil.copytree(toy_corpus, tmp_path / "c"))
    src = (corpus / "test.es").read_text(encoding="utf-8").split("\n")
    src[2] = src[2].replace(" ", "\u2028", 1)  # str.splitlines would make two lines of it
    (corpus / "test.es").write_text("\n".join(src), encoding="utf-8")
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    cfg, _ = ckpt.read_model_dir(model)
    record_test_scores(replace(cfg, data=replace(cfg.data, corpus=str(corpus))), model,
                       torch.device("cpu"), "fp32")  # fmt: skip
    scores = json.loads((model / ckpt.META_FILE).read_text(encoding="utf-8"))["scores"]
    assert main(["evaluate", "--model", str(model), "--src", str(corpus / "test.es"), "--ref",
                 str(corpus / "test.en"), "--json", "--bootstrap", "0"]) == 0  # fmt: skip
    evaluated = json.loads(capsys.readouterr().out)["bleu"]["score"]
    assert scores["test_bleu"] == pytest.approx(evaluated)


def test_info_counts_add_up(capsys):
    assert main(["info", "--config", str(ROOT / "configs" / "bible-es-en.yaml"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)["parameters"]
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["total"] > 10_000_000


def test_bf16_translator_runs_and_int8_points_to_onnx(tiny_model_dir: Path, sentences: list[str]):
    with pytest.raises(ValueError, match="int8 now runs in ONNX Runtime: `nmt export"):
        Translator.load(tiny_model_dir, quantize=True)
    assert main(["translate", "--model", str(tiny_model_dir), "--quantize"]) == 2
    fp32_translator = Translator.load(tiny_model_dir)
    fp32 = fp32_translator.translate(sentences[:4], fp32_translator.with_options(beam_size=2))
    for kwargs in ({"precision": "bf16"},):
        other = Translator.load(tiny_model_dir, **kwargs)
        out = other.translate(sentences[:4], other.with_options(beam_size=2))
        assert len(out) == len(fp32) and all(isinstance(r.text, str) for r in out)
    assert torch.get_num_threads() >= 1
