"""Recurrent layer speed: forward + backward tokens/s of each cell against nn.LSTM.

One layer at the Bible model's shapes (configs/bible-es-en.yaml: batches of 4096 tokens at
length 32, so B = 128, T = 32): an encoder layer (512 -> 256) and the decoder's bottom layer with
input feeding (1024 -> 512). Every implementation is timed in alternation, in bf16 autocast and
in fp32; the median of `--iters` runs after warm-up is reported, and `ratio` is its time over
nn.LSTM's in the same precision. `ours:lstm` is a plain LSTM on our layer (the target: no slower
than nn.LSTM); `+compiled` rows run the gate math through torch.compile instead of eager code,
`+native` the C++ kernels of lstm_ln and the plain LSTM (`train.cell_kernels`). Prints JSON.

    python -m benchmarks.cells_speed --threads 2
    python -m benchmarks.cells_speed --iters 3 --no-compile --no-native
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nmt.model.cells import RecurrentLayer, use_kernels

SHAPES = {"encoder 512->256": (512, 256), "decoder 1024->512": (1024, 512)}
BATCH, LENGTH = 128, 32


def makers(
    input_dim: int, hidden: int, compiled: bool, native: bool
) -> dict[str, tuple[Callable[[], nn.Module], str]]:
    """Name -> (layer constructor, how its gate math runs: `cells.use_kernels`)."""
    found: dict[str, tuple[Callable[[], nn.Module], str]] = {
        "nn.LSTM": (lambda: nn.LSTM(input_dim, hidden, batch_first=True), "eager"),
        "nn.GRU": (lambda: nn.GRU(input_dim, hidden, batch_first=True), "eager"),
    }
    for kind in ("lstm", "lstm_ln", "lstm_peephole", "lstm_cifg"):
        make = lambda kind=kind: RecurrentLayer(kind, input_dim, hidden)  # noqa: E731
        found[f"ours:{kind}"] = (make, "eager")
        if kind in ("lstm", "lstm_ln") and compiled:
            found[f"ours:{kind}+compiled"] = (make, "compiled")
        if kind in ("lstm", "lstm_ln") and native:
            found[f"ours:{kind}+native"] = (make, "native")
    return found


def layer_fn(
    make: Callable[[], nn.Module], shape: tuple[int, int], precision: str, kernels: str
) -> Callable[[], None]:
    """One forward + backward through a fresh layer on a fixed random batch."""
    torch.manual_seed(0)
    layer = make()
    x = torch.randn((BATCH, LENGTH, shape[0]), requires_grad=True)
    grad = torch.randn((BATCH, LENGTH, shape[1]))

    def run() -> None:
        use_kernels(kernels)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            out, _ = layer(x)
        out.backward(grad.to(out.dtype))

    return run


def measure(fns: dict[str, Callable[[], None]], warmup: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-native", action="store_true", help="skip the C++ kernel's rows")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "batch": BATCH, "length": LENGTH}
    for shape, dims in SHAPES.items():
        for precision in ("bf16", "fp32"):
            fns = {
                name: layer_fn(make, dims, precision, kernels)
                for name, (make, kernels) in makers(
                    *dims, not args.no_compile, not args.no_native
                ).items()
            }
            seconds = measure(fns, args.warmup, args.iters)
            use_kernels("eager")
            reference = seconds["nn.LSTM"]
            results[f"{shape} {precision}"] = {
                name: {
                    "ms": round(s * 1e3, 1),
                    "tokens_per_s": round(BATCH * LENGTH / s),
                    "ratio": round(s / reference, 2),
                }
                for name, s in seconds.items()
            }
            print(json.dumps({f"{shape} {precision}": results[f"{shape} {precision}"]}), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
