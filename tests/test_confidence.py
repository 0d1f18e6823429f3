"""Confidence: calibrated on the dev split when training finishes, in [0, 1], and higher for
better translations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from sacrebleu.metrics import CHRF

from nmt.translate import CONFIDENCE_FEATURES, Translator, confidence
from nmt.validate import spearman


def test_training_stores_a_calibration_in_meta_and_the_model_card(tiny_model_dir: Path) -> None:
    meta = json.loads((tiny_model_dir / "meta.json").read_text(encoding="utf-8"))
    calibration = meta["confidence"]
    assert calibration["features"] == list(CONFIDENCE_FEATURES)
    assert len(calibration["weights"]) == len(CONFIDENCE_FEATURES)
    assert calibration["dev_sentences"] == 30
    assert "| Confidence | calibrated on 30 dev sentences" in (
        tiny_model_dir / "README.md"
    ).read_text(encoding="utf-8")


def test_confidence_is_in_0_1_and_higher_for_sentences_with_higher_chrf(
    tiny_model_dir: Path, toy_corpus: Path
) -> None:
    translator = Translator.load(tiny_model_dir)
    src = (toy_corpus / "test.es").read_text(encoding="utf-8").splitlines()
    refs = (toy_corpus / "test.en").read_text(encoding="utf-8").splitlines()
    results = translator.translate(src)
    chrf = CHRF()
    scores = [chrf.sentence_score(r.text, [ref]).score for r, ref in zip(results, refs)]
    confidences = [r.confidence for r in results]
    assert all(c is not None and 0 <= c <= 1 for c in confidences)
    ranked = sorted(zip(scores, confidences))
    low, high = ranked[: len(ranked) // 2], ranked[len(ranked) // 2 :]
    assert sum(c for _, c in high) / len(high) > sum(c for _, c in low) / len(low)
    assert spearman(confidences, scores) > 0


def test_confidence_without_calibration_is_the_mean_token_probability() -> None:
    assert confidence((-0.5, 0.0, 0.0), None) == math.exp(-0.5)
    calibration = {"weights": [1.0, -1.0, -1.0], "bias": 0.5}
    assert confidence((-0.2, 0.1, 0.0), calibration) == pytest.approx(0.2)
    assert confidence((5.0, 0.0, 0.0), calibration) == 1.0  # clipped
    assert confidence((-50.0, 0.0, 1.0), calibration) == 0.0
