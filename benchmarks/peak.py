"""Matmul peak of this machine and the analytic FLOP count of a model, so speeds travel.

A throughput in tokens/s says little across machines; the same throughput as a fraction of the
matmul peak measured in the same run does. `matmul_peak` times 2048 x 2048 @ 2048 x 2048 products
in fp32 and bf16; `flops_per_target_token` counts the matrix products of one training step of a
config (forward + backward ~ 3x forward), per target token, from the mean sentence lengths.

    python -m benchmarks.peak [--device cpu] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from nmt.config import ModelConfig

GATES = {"lstm": 4, "gru": 3, "lstm_ln": 4, "lstm_peephole": 4, "lstm_cifg": 3}  # gate blocks of W


@dataclass(frozen=True)
class Peak:
    """Matmul throughput of one dtype: the best and median of several repetitions, GFLOP/s."""

    dtype: str
    best_gflops: float
    median_gflops: float


def matmul_peak(
    dtype: torch.dtype, device: str = "cpu", size: int = 2048, repeats: int = 5
) -> Peak:
    """Times `repeats` (size x size) @ (size x size) products after one warm-up product."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    flops = 2 * size**3
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        rates.append(flops / (time.perf_counter() - start) / 1e9)
    name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
    return Peak(name, round(max(rates), 1), round(statistics.median(rates), 1))


def matmul_peaks(device: str = "cpu", repeats: int = 5) -> dict[str, Peak]:
    """fp32 and bf16 peaks: {"fp32": Peak, "bf16": Peak}."""
    return {
        "fp32": matmul_peak(torch.float32, device, repeats=repeats),
        "bf16": matmul_peak(torch.bfloat16, device, repeats=repeats),
    }


def _rnn(gates: int, input_dim: int, hidden_dim: int) -> int:
    """Multiply-adds of one recurrent step: input and recurrent products of all gates."""
    return gates * hidden_dim * (input_dim + hidden_dim)


def forward_flops(
    cfg: ModelConfig, src_len: float, tgt_len: float, num_outputs: int
) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one sentence's teacher-forced forward pass, by part.

    Elementwise work (gate nonlinearities, softmax, dropout) and embedding lookups are left out:
    they are not matrix products.

    Args:
        src_len: source length S (subwords); tgt_len: decoder steps T (target subwords + 1).
        num_outputs: columns of the output projection (the output vocabulary's size).
    Returns:
        {"encoder", "bridge", "decoder", "attention", "combine", "output"}: FLOPs per sentence.
    """
    enc, dec, att = cfg.encoder, cfg.decoder, cfg.attention
    g = GATES[cfg.cell]
    S, T, E, H = src_len, tgt_len, cfg.embed_dim, dec.hidden_dim  # noqa: N806
    encoder = 0.0
    width = E
    for i in range(enc.num_layers):
        directions = 2 if enc.layout == "bi" or i == 0 else 1
        encoder += directions * S * _rnn(g, width, enc.hidden_dim)
        width = directions * enc.hidden_dim
    He = width  # noqa: N806  (the memory width)
    states = 2 if cfg.cell == "lstm" else 1
    bridge = He * states * dec.num_layers * H if dec.bridge == "dense" else 0
    if att.type == "luong":
        bottom = E + (H if dec.input_feeding else 0)
        inputs = [bottom] + [H] * (dec.num_layers - 1)
    elif att.type == "bahdanau":
        inputs = [E + He] + [H] * (dec.num_layers - 1)
    else:  # gnmt: the context joins every layer above the bottom
        inputs = [E] + [H + He] * (dec.num_layers - 1)
    decoder = T * sum(_rnn(g, d, H) for d in inputs)
    context = T * S * He  # weights (T, S) @ memory (S, He)
    if att.score == "dot":
        attention = T * S * He + context
    elif att.score == "general":
        attention = S * He * H + T * S * H + context  # keys W_a h_s once, then q . keys
    else:  # additive / concat: U h_s once, W q per step, v . tanh(...) per (t, s)
        a = att.dim or H
        attention = S * He * a + T * H * a + T * S * a + context
    combine = T * (He + H) * H
    out_dim = H
    output = 0.0
    if cfg.tie_output and H != E:
        output += T * H * E  # the map to the embedding width before the tied projection
        out_dim = E
    output += T * out_dim * num_outputs
    parts = {"encoder": encoder, "bridge": bridge, "decoder": decoder, "attention": attention,
             "combine": combine, "output": output}  # fmt: skip
    return {k: 2.0 * v for k, v in parts.items()}


def flops_per_target_token(
    cfg: ModelConfig, mean_src_len: float, mean_tgt_len: float, num_outputs: int
) -> float:
    """Training FLOPs per target token: 3x the forward matmul FLOPs (backward ~ 2x forward).

    Args:
        mean_src_len: mean source subwords per sentence of the data;
        mean_tgt_len: mean target subwords per sentence (EOS is added here, as the loss counts).
    """
    steps = mean_tgt_len + 1
    return 3 * sum(forward_flops(cfg, mean_src_len, steps, num_outputs).values()) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    peaks = matmul_peaks(args.device, args.repeats)
    print(json.dumps({name: vars(peak) for name, peak in peaks.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
