"""Model training and decoding-step speed on the CPU: fp32 against bf16 autocast.

Measures forward + loss + backward target tokens per second on a synthetic, length-bucketed
batch, parameter counts, and the latency of one decoding step for a beam-search-sized batch.
Precisions are timed in alternation after warm-up; the median and the best iteration are
reported (on a shared machine the ratio is the number to quote). The training step uses the
output projection fused with the loss (`fused_linear_smoothed_nll`); the step with the full
logits and `label_smoothed_nll` is timed in the same alternation, and
`train_speedup_fused_loss_*` is its time / the fused step's. Where teacher forcing loops over
target steps (input feeding, Bahdanau, GNMT), the reference step loop with the unfused loss
(the previous whole step) is timed too, and `train_speedup_over_reference_*` is old time / new
time. The step with dropout masks from torch's per-element draws is timed too, and
`train_speedup_bulk_dropout_*` is its time / the step's with `nmt.model.dropout`'s. The step
with the gate math and the loss's softmax on plain tensor code is timed too, and
`train_speedup_native_kernels_*` is its time / the step's on the C++ kernels (`nmt.native`).
Prints JSON; `--profile` adds a table of the bf16 step's top operators on stderr.

    python -m benchmarks.model_speed                      # bible-es-en, +input feeding, gnmt-8layer
    python -m benchmarks.model_speed --configs configs/luong.yaml --iters 3
    python -m benchmarks.model_speed --cases bible-es-en --step-rows 0 --threads 2 --profile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from nmt.config import apply_overrides, config_from_dict, load_config
from nmt.loss import fused_linear_smoothed_nll, label_smoothed_nll
from nmt.model import Seq2Seq, build_model, count_parameters
from nmt.model import dropout as nmt_dropout
from nmt.model.cells import use_kernels

ROOT = Path(__file__).resolve().parent.parent
PAD, BOS = 0, 2
# name -> (config file, overrides, target tokens per training batch)
CASES: dict[str, tuple[str, list[str], int]] = {
    "bible-es-en": ("configs/bible-es-en.yaml", [], 4096),
    "bible-es-en+input_feeding": (
        "configs/bible-es-en.yaml",
        ["model.decoder.input_feeding=true"],
        4096,
    ),
    "gnmt-8layer": ("configs/gnmt-8layer.yaml", [], 2048),
}


def synthetic_batch(
    vocab: int, batch_tokens: int, length: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """A batch as the token-bounded bucket sampler makes it: lengths within a few tokens."""
    batch = batch_tokens // length
    src_lengths = torch.randint(length - 3, length + 1, (batch,), generator=gen)
    src_lengths[0] = length
    src = torch.randint(4, vocab, (batch, length), generator=gen)
    src_mask = torch.arange(length).unsqueeze(0) < src_lengths.unsqueeze(1)
    src = src.masked_fill(~src_mask, PAD)
    tgt_lengths = torch.randint(length - 4, length, (batch,), generator=gen)
    tgt_lengths[0] = length - 1
    tgt = torch.randint(4, vocab, (batch, length), generator=gen)
    tgt_mask = torch.arange(length).unsqueeze(0) <= tgt_lengths.unsqueeze(1)
    tgt_out = tgt.masked_fill(~tgt_mask, PAD)
    tgt_in = torch.cat([torch.full((batch, 1), BOS), tgt_out[:, :-1]], dim=1)
    return {
        "src": src,
        "src_lengths": src_lengths,
        "src_mask": src_mask,
        "tgt_in": tgt_in,
        "tgt_out": tgt_out,
    }


def precision_context(precision: str) -> AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def interleaved_seconds(
    fns: dict[str, Callable[[], Any]], warmup: int, iters: int
) -> dict[str, tuple[float, float]]:
    """(min, median) seconds per call of each function, timed in alternation so that load
    from other processes on a shared machine hits every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def train_step_fn(
    model: Seq2Seq,
    batch: dict[str, torch.Tensor],
    precision: str,
    reference: bool = False,
    fused: bool = True,
    block_rows: int = 1024,
    torch_dropout: bool = False,
    kernels: str = "auto",
) -> Callable[[], None]:
    """Forward + loss + backward on the batch; `reference`: teacher forcing by the plain loop
    over the decoder's steps (`Decoder.reference_loop`) instead of its fastest path; `fused`:
    the output projection and the loss in blocks, else full logits and `label_smoothed_nll`;
    `torch_dropout`: dropout masks from torch's per-element draws, not `nmt.model.dropout`'s
    bulk random bits; `kernels`: `cells.use_kernels`' choice for this step (`native`: the C++
    kernels of the gate math and the loss; `auto` where they build)."""
    inputs = (batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"])

    def train_step() -> None:
        use_kernels(kernels)
        nmt_dropout.BULK_BITS_ON_CPU = not torch_dropout
        model.decoder.reference_loop = reference
        model.train()
        model.zero_grad(set_to_none=True)
        with precision_context(precision):
            if fused:
                weight, bias = model.output_weights()
                features = model(*inputs, features=True)
                loss, _, _ = fused_linear_smoothed_nll(
                    features, weight, bias, batch["tgt_out"], PAD, 0.1, block_rows=block_rows
                )
            else:
                loss, _, _ = label_smoothed_nll(model(*inputs), batch["tgt_out"], PAD, 0.1)
        loss.backward()
        nmt_dropout.BULK_BITS_ON_CPU = True

    return train_step


def decode_step_fn(
    model: Seq2Seq, batch: dict[str, torch.Tensor], rows: int, precision: str
) -> Callable[[], None]:
    """One decoding step plus the log-softmax for `rows` = sentences x beam. Runs under
    no_grad: autocast does not cache weight casts inside inference_mode."""
    model.eval()
    reps = -(-rows // batch["src"].size(0))
    idx = torch.arange(batch["src"].size(0)).repeat(reps)[:rows]
    with torch.no_grad(), precision_context(precision):
        memory, state = model.encode(batch["src"], batch["src_lengths"], batch["src_mask"])
        memory, state = memory.index_select(idx), state.index_select(idx)
    tokens = batch["tgt_in"][idx, 0]

    def one_step() -> None:
        with torch.no_grad(), precision_context(precision):
            logits, _, _ = model.step(tokens, state, memory)
            logits.float().log_softmax(-1)

    return one_step


def _product_flops(name: str, shapes: list[list[int]]) -> int:
    """FLOPs of one matrix-product operator from its recorded input shapes; 0 for others."""
    if name == "aten::mm":
        (m, k), (_, n) = shapes[0], shapes[1]
        return 2 * m * k * n
    if name == "aten::addmm":
        (m, k), (_, n) = shapes[1], shapes[2]
        return 2 * m * k * n
    if name == "aten::bmm":
        (b, m, k), (_, _, n) = shapes[0], shapes[1]
        return 2 * b * m * k * n
    if name == "aten::baddbmm":
        (b, m, k), (_, _, n) = shapes[1], shapes[2]
        return 2 * b * m * k * n
    return 0


def profile_train_step(name: str, model: Seq2Seq, batch: dict[str, torch.Tensor]) -> None:
    """Prints the top operators by self CPU time of two bf16 training steps, and how much of
    the step the matrix products take and at what rate, against the bf16 matmul peak measured
    here and now: the step's ceiling were everything else free (to stderr, so that stdout
    stays JSON)."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.peak import matmul_peaks

    step = train_step_fn(model, batch, "bf16")
    step()
    start = time.perf_counter()
    step()
    step()
    wall = (time.perf_counter() - start) / 2
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    print(f"{name}: bf16 training step, 2 iterations\n{table}", file=sys.stderr)
    seconds = flops = 0.0
    for event in prof.events():
        product = _product_flops(event.name, event.input_shapes)
        if product:
            flops += product / 2
            seconds += event.self_cpu_time_total / 1e6 / 2
    peak = matmul_peaks("cpu")["bf16"].best_gflops
    print(
        f"{name}: matrix products {seconds * 1e3:.1f} ms of a {wall * 1e3:.1f} ms step "
        f"({seconds / wall:.0%}), {flops / 1e9:.4g} GFLOP at {flops / seconds / 1e9:.0f} GFLOP/s; "
        f"bf16 peak {peak:.0f} GFLOP/s: the step at {flops / wall / 1e9 / peak:.0%} of it, "
        f"the products alone at {flops / seconds / 1e9 / peak:.0%}",
        file=sys.stderr,
    )


def run_case(
    name: str, config: str, overrides: list[str], batch_tokens: int, args: argparse.Namespace
) -> dict[str, Any]:
    values = load_config(ROOT / config).to_dict()
    cfg = config_from_dict(apply_overrides(values, overrides + args.set))
    vocab = cfg.tokenizer.vocab_size
    use_kernels("compiled" if cfg.train.compile_cells else cfg.train.cell_kernels)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab, vocab, PAD)
    batch = synthetic_batch(vocab, batch_tokens, args.length, torch.Generator().manual_seed(0))
    result: dict[str, Any] = {
        "config": config,
        "overrides": overrides + args.set,
        "parameters": count_parameters(model),
        "batch": list(batch["tgt_in"].shape),
        "target_tokens": int((batch["tgt_out"] != PAD).sum()),
    }
    n_tokens = result["target_tokens"]
    # the reference step loop only differs where teacher forcing loops over steps
    compare = args.reference and model.decoder.loops_over_steps
    fns = {p: train_step_fn(model, batch, p, block_rows=args.block_rows) for p in args.precisions}
    if args.reference:
        fns.update({f"{p}_unfused": train_step_fn(model, batch, p, fused=False) for p in fns})
        fns.update(
            {
                f"{p}_torch_dropout": train_step_fn(model, batch, p, torch_dropout=True)
                for p in args.precisions
            }
        )
        fns.update(
            {
                f"{p}_eager_kernels": train_step_fn(model, batch, p, kernels="eager")
                for p in args.precisions
            }
        )
    if compare:
        fns.update(
            {f"{p}_reference": train_step_fn(model, batch, p, True, False) for p in args.precisions}
        )
    train = interleaved_seconds(fns, args.warmup, args.iters)
    for variant, (best, median) in train.items():
        result[f"train_tokens_per_s_{variant}"] = round(n_tokens / median, 1)
        result[f"train_tokens_per_s_{variant}_best"] = round(n_tokens / best, 1)
    if args.reference:
        for p in args.precisions:
            new, old = train[p], train[f"{p}_unfused"]
            result[f"train_speedup_fused_loss_{p}"] = round(old[1] / new[1], 3)
            result[f"train_speedup_fused_loss_{p}_best"] = round(old[0] / new[0], 3)
            old = train[f"{p}_torch_dropout"]
            result[f"train_speedup_bulk_dropout_{p}"] = round(old[1] / new[1], 3)
            result[f"train_speedup_bulk_dropout_{p}_best"] = round(old[0] / new[0], 3)
            old = train[f"{p}_eager_kernels"]
            result[f"train_speedup_native_kernels_{p}"] = round(old[1] / new[1], 3)
            result[f"train_speedup_native_kernels_{p}_best"] = round(old[0] / new[0], 3)
    if compare:
        for p in args.precisions:
            new, old = train[p], train[f"{p}_reference"]
            result[f"train_speedup_over_reference_{p}"] = round(old[1] / new[1], 3)
            result[f"train_speedup_over_reference_{p}_best"] = round(old[0] / new[0], 3)
    if args.profile:
        profile_train_step(name, model, batch)
    if args.step_rows:
        steps = interleaved_seconds(
            {p: decode_step_fn(model, batch, args.step_rows, p) for p in args.precisions},
            3,
            args.iters * 4,
        )
        for precision, (best, median) in steps.items():
            result[f"step_ms_{precision}_rows{args.step_rows}"] = round(1000 * median, 2)
            result[f"step_ms_{precision}_rows{args.step_rows}_best"] = round(1000 * best, 2)
    if {"fp32", "bf16"} <= set(args.precisions):
        result["train_speedup_bf16"] = round(train["fp32"][1] / train["bf16"][1], 2)
        result["train_speedup_bf16_best"] = round(train["fp32"][0] / train["bf16"][0], 2)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--configs",
        nargs="*",
        default=[],
        help="extra config files, each optionally with its own overrides: "
        "configs/bible-es-en-lstm_ln.yaml+train.cell_kernels=native",
    )
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every case")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--length", type=int, default=32, help="padded source/target length")
    parser.add_argument("--batch-tokens", type=int, default=0, help="0: each case's default")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--step-rows", type=int, default=320, help="0 skips the step timing")
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument(
        "--block-rows", type=int, default=1024, help="target positions per block of the fused loss"
    )
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip timing the unfused loss and the decoders' reference step loop",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print a profile of the bf16 training step"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = {name: CASES[name] for name in args.cases}
    for spec in args.configs:  # PATH or PATH+KEY=VALUE+...: a config with its own overrides
        path, *overrides = spec.split("+")
        cases["+".join([Path(path).stem, *overrides])] = (path, overrides, 4096)
    results = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cases": {
            name: run_case(name, config, overrides, args.batch_tokens or tokens, args)
            for name, (config, overrides, tokens) in cases.items()
        },
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
