"""The analytic FLOP count of benchmarks/peak.py against torch's FLOP counter on real models."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nmt.config import ModelConfig, load_config
from nmt.model.seq2seq import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed
from benchmarks.peak import flops_per_target_token, forward_flops, matmul_peak  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tiny_variants() -> dict[str, ModelConfig]:
    tiny = load_config(CONFIGS / "tiny.yaml", []).model
    bible = load_config(CONFIGS / "bible-es-en.yaml", [
        "model.embed_dim=32", "model.encoder.hidden_dim=24", "model.decoder.hidden_dim=40",
    ]).model  # fmt: skip
    return {
        "tiny": tiny,
        "tiny, input feeding": replace(tiny, decoder=replace(tiny.decoder, input_feeding=True)),
        "bible shape, untied": replace(bible, tie_output=False),
        "bible shape, tied with a map to the embedding": bible,
        "bi encoder, dot": replace(
            tiny,
            encoder=replace(tiny.encoder, layout="bi", residual_from=9),
            attention=replace(tiny.attention, score="dot"),
        ),
    }


@pytest.mark.parametrize("name", list(tiny_variants()))
def test_analytic_flops_match_the_flop_counter(name: str) -> None:
    cfg = tiny_variants()[name]
    vocab = 50
    model = build_model(cfg, vocab, vocab, 0).eval()
    model.set_output_vocab(torch.arange(0, vocab, 2), unk_id=0)  # 25 output columns
    B, S, T = 3, 7, 5  # noqa: N806
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(4, vocab, (B, S), generator=gen)
    tgt_in = torch.randint(4, vocab, (B, T), generator=gen)
    # without oneDNN the LSTM runs as products the counter sees
    with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter:
        model(src, torch.full((B,), S), torch.ones(B, S, dtype=torch.bool), tgt_in)
    expected = B * sum(forward_flops(cfg, S, T, model.num_outputs).values())
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.03)


def test_training_flops_are_three_forward_passes_per_target_token() -> None:
    cfg = tiny_variants()["tiny"]
    per_token = flops_per_target_token(cfg, 7.0, 4.0, 25)
    assert per_token == pytest.approx(3 * sum(forward_flops(cfg, 7.0, 5.0, 25).values()) / 5)
    longer_source = flops_per_target_token(cfg, 14.0, 4.0, 25)
    assert longer_source > per_token  # encoder and attention grow with the source


def test_matmul_peak_reports_positive_rates() -> None:
    peak = matmul_peak(torch.float32, size=128, repeats=3)
    assert peak.dtype == "fp32" and peak.best_gflops >= peak.median_gflops > 0
