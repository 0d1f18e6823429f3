"""BLEU, chrF and TER agree with the sacrebleu command line, signatures and confidence included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nmt.metrics import (
    MetricScore,
    corpus_bleu,
    corpus_chrf,
    corpus_scores,
    corpus_ter,
    score_files,
    score_files_text,
)

HYPOTHESES = [
    "En el principio creó Dios los cielos y la tierra.",
    "Y la tierra estaba desordenada y vacía.",
    "Y dijo Dios: Sea la luz; y fue la luz.",
    "Y vio Dios que la luz era buena.",
    "Y llamó Dios a la luz Día, y a las tinieblas llamó Noche.",
    "El espíritu de Dios se movía sobre la faz de las aguas.",
]
REFERENCES = [
    "En el principio creó Dios los cielos y la tierra.",
    "Y la tierra estaba desordenada y vacía, y las tinieblas estaban sobre la faz del abismo.",
    "Y dijo Dios: Sea la luz; y fue la luz.",
    "Y vio Dios que la luz era buena; y separó Dios la luz de las tinieblas.",
    "Y llamó Dios a la luz Día, y a las tinieblas llamó Noche.",
    "Y el Espíritu de Dios se movía sobre la faz de las aguas.",
]
SECOND_REFERENCES = [
    "Al principio Dios creó el cielo y la tierra.",
    "La tierra era un caos y estaba vacía.",
    "Dijo Dios: Haya luz, y hubo luz.",
    "Vio Dios que la luz era buena.",
    "Dios llamó a la luz día y a las tinieblas noche.",
    "Y el espíritu de Dios aleteaba sobre las aguas.",
]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Path]:
    paths = tmp_path / "hyp.txt", tmp_path / "ref.txt", tmp_path / "ref2.txt"
    for path, lines in zip(paths, [HYPOTHESES, REFERENCES, SECOND_REFERENCES], strict=True):
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def sacrebleu_cli(*args: str | Path) -> list[dict[str, str | float]]:
    """Run the sacrebleu command line installed beside this Python; parse its JSON output."""
    exe = Path(sys.executable).parent / "sacrebleu"
    out = subprocess.run(
        [str(exe), *map(str, args), "--width", "4"], capture_output=True, text=True, check=True
    ).stdout
    parsed = json.loads(out)
    return parsed if isinstance(parsed, list) else [parsed]


def test_scores_match_the_sacrebleu_command_line(files: tuple[Path, Path, Path]) -> None:
    hyp, ref, _ = files
    cli = sacrebleu_cli(ref, "-i", hyp, "-m", "bleu", "chrf", "ter")
    ours = score_files(hyp, ref)
    assert list(ours) == ["bleu", "chrf", "ter"]
    for expected, got in zip(cli, ours.values(), strict=True):
        assert got.name == expected["name"]
        assert round(got.score, 4) == expected["score"]
        assert got.signature == expected["signature"]
        assert got.ci_low is None and got.ci_high is None
    assert ours["bleu"].details == cli[0]["verbose_score"]
    assert ours["bleu"].signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|")
    assert ours["chrf"].name == "chrF2"
    assert "|case:lc|tok:tercom|" in ours["ter"].signature
    assert 0 < ours["bleu"].score < 100


def test_multiple_references_match_the_command_line(files: tuple[Path, Path, Path]) -> None:
    hyp, ref, ref2 = files
    cli = sacrebleu_cli(ref, ref2, "-i", hyp, "-m", "bleu", "chrf", "ter")
    ours = score_files(hyp, [ref, ref2])
    for expected, got in zip(cli, ours.values(), strict=True):
        assert round(got.score, 4) == expected["score"]
        assert got.signature == expected["signature"]
        assert got.signature.startswith("nrefs:2|")
    assert ours["bleu"].score > score_files(hyp, ref)["bleu"].score
    # the same as lists: one list per reference set
    in_memory = corpus_scores(HYPOTHESES, [REFERENCES, SECOND_REFERENCES])
    assert {k: v.score for k, v in in_memory.items()} == {k: v.score for k, v in ours.items()}


def test_bootstrap_interval_matches_sacrebleu_confidence(files: tuple[Path, Path, Path]) -> None:
    hyp, ref, _ = files
    cli = sacrebleu_cli(
        ref, "-i", hyp, "-m", "bleu", "chrf", "--confidence", "--confidence-n", "200"
    )
    ours = score_files(hyp, ref, ["bleu", "chrf"], bootstrap=200, seed=12345)
    for expected, got in zip(cli, ours.values(), strict=True):
        assert got.signature == expected["signature"]
        assert "|bs:200|seed:12345|" in got.signature
        assert got.ci_low is not None and got.ci_high is not None
        assert got.bootstrap_mean == pytest.approx(expected["confidence_mean"], abs=1e-4)
        # sacrebleu prints half the width of the interval
        half_width = (got.ci_high - got.ci_low) / 2
        assert half_width == pytest.approx(expected["confidence_var"], abs=1e-4)
        assert got.ci_low <= got.score <= got.ci_high
        assert round(got.score, 4) == expected["score"]


def test_bootstrap_is_reproducible_from_its_seed() -> None:
    a = corpus_bleu(HYPOTHESES, REFERENCES, bootstrap=100, seed=1)
    b = corpus_bleu(HYPOTHESES, REFERENCES, bootstrap=100, seed=1)
    c = corpus_bleu(HYPOTHESES, REFERENCES, bootstrap=100, seed=2)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high, a.bootstrap_mean) != (c.ci_low, c.ci_high, c.bootstrap_mean)
    assert a.score == c.score
    assert "seed:1|" in a.signature and "seed:2|" in c.signature


def test_single_metric_helpers_and_formatting() -> None:
    assert corpus_bleu(REFERENCES, REFERENCES).score == pytest.approx(100.0)
    assert corpus_chrf(REFERENCES, REFERENCES).score == pytest.approx(100.0)
    assert corpus_ter(REFERENCES, REFERENCES).score == pytest.approx(0.0)
    assert corpus_ter(HYPOTHESES, REFERENCES).score > 0
    bleu = corpus_bleu(HYPOTHESES, REFERENCES, bootstrap=50)
    assert isinstance(bleu, MetricScore)
    assert str(bleu).startswith(f"BLEU = {bleu.score:.2f} (95% CI ")
    assert str(bleu).endswith(bleu.signature)
    lower = corpus_bleu([h.upper() for h in HYPOTHESES], REFERENCES, lowercase=True)
    assert lower.score == pytest.approx(corpus_bleu(HYPOTHESES, REFERENCES, lowercase=True).score)
    assert lower.score > corpus_bleu([h.upper() for h in HYPOTHESES], REFERENCES).score
    assert "case:lc" in lower.signature


def test_mismatched_inputs_are_rejected(tmp_path: Path, files: tuple[Path, Path, Path]) -> None:
    hyp, ref, _ = files
    short = tmp_path / "short.txt"
    short.write_text("one line\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"short\.txt has 1 lines but .*hyp\.txt has 6"):
        score_files(hyp, short)
    with pytest.raises(ValueError, match="reference set 0 has 5 sentences"):
        corpus_bleu(HYPOTHESES, REFERENCES[:5])
    with pytest.raises(ValueError, match="unknown metric 'meteor'"):
        corpus_scores(HYPOTHESES, REFERENCES, ["meteor"])
    with pytest.raises(ValueError, match="no hypotheses"):
        corpus_bleu([], [])


def test_scores_read_as_numbers_and_as_plain_dicts() -> None:
    scores = corpus_scores(HYPOTHESES, [REFERENCES])
    assert scores.bleu == scores["bleu"].score
    assert scores.chrf == scores["chrf"].score and scores.ter == scores["ter"].score
    assert scores.bleu_signature == scores["bleu"].signature
    plain = score_files_text(HYPOTHESES, [REFERENCES], bootstrap=20)
    assert json.loads(json.dumps(plain)) == plain
    assert plain["bleu"]["score"] == scores.bleu
    assert plain["bleu"]["ci_low"] <= plain["bleu"]["score"] <= plain["bleu"]["ci_high"]
    assert "ci_low" not in scores.to_dict()["bleu"]
