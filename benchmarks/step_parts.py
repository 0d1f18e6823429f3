"""What each of the CPU training step's C++ kernels and fused pieces buys, one at a time.

The bf16 training step of a config (forward + fused loss + backward on `model_speed`'s synthetic
batch, then an Adam step) is timed in alternation in one process: with everything on, and with
one piece at a time put back to what it replaced:

- `lstm_gate_math`: the input-feeding decoder's LSTM gate math on plain tensor code;
- `row_products`: the attention's per-row products as `baddbmm`;
- `encoder_on_kernels`: the encoder's nn.LSTM layers on oneDNN's fused kernels;
- `softmax_kernel`: the loss's softmax pass as log_softmax, exp, scatter and a cast;
- `dropout_kernel`: dropout masks as a bulk draw, a compare, a cast and a scaling;
- `one_weight_product`: the output weights' gradient summed block by block in fp32;
- `fused_adam`: Adam's per-tensor loop instead of its fused kernel;
- `all`: every one of these at once (`train.cell_kernels: eager`, per-tensor Adam).

`speedup_<piece>` is the step's median time without the piece over its median time with
everything on. Prints JSON.

    python -m benchmarks.step_parts --threads 2 --iters 9
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from benchmarks.model_speed import (
    PAD,
    ROOT,
    interleaved_seconds,
    synthetic_batch,
    train_step_fn,
)
from nmt import loss as nmt_loss
from nmt.config import config_from_dict, load_config
from nmt.model import build_model, input_feeding
from nmt.model import dropout as nmt_dropout
from nmt.model import encoder as nmt_encoder
from nmt.model.cells import lstm_step_plain, use_kernels
from nmt.train import make_optimizer


def _baddbmm_per_row(
    self: input_feeding._Products,
    t: int,
    x: torch.Tensor,
    k: int = 0,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    start = self.bases[t] if base is None else base
    return torch.baddbmm(start.unsqueeze(1), self.record(k, x).unsqueeze(1), self.mats[k]).squeeze(
        1
    )


def _onednn(rnn: torch.nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    out, _ = rnn(x)
    return out


class _KernelsOff:
    """`nmt.native` as one module sees it (the loss, dropout), with its kernels turned off."""

    @staticmethod
    def active(on: torch.Tensor | torch.device) -> bool:
        return False


@contextmanager
def _without(piece: str) -> Iterator[None]:
    """The step with one piece put back to what it replaced (module attributes swapped)."""
    saved: list[tuple[object, str, object]] = []

    def swap(owner: object, name: str, value: object) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    if piece == "lstm_gate_math":
        swap(input_feeding, "lstm_step", lstm_step_plain)
    elif piece == "row_products":
        swap(input_feeding._Products, "per_row", _baddbmm_per_row)
    elif piece == "encoder_on_kernels":
        swap(nmt_encoder, "lstm_on_kernels", _onednn)
    elif piece == "softmax_kernel":
        swap(nmt_loss, "native", _KernelsOff)
    elif piece == "dropout_kernel":
        swap(nmt_dropout, "native", _KernelsOff)
    if piece in ("one_weight_product", "all"):  # `all` also takes the kernels off (eager)
        swap(nmt_loss, "WHOLE_GRAD_BYTES", 0)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


PIECES = (
    "lstm_gate_math",
    "row_products",
    "encoder_on_kernels",
    "softmax_kernel",
    "dropout_kernel",
    "one_weight_product",
    "fused_adam",
    "all",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/bible-es-en.yaml")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=9)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_dict(load_config(ROOT / args.config).to_dict())
    vocab = cfg.tokenizer.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab, vocab, PAD)
    batch = synthetic_batch(vocab, args.batch_tokens, args.length, torch.Generator().manual_seed(0))
    n_tokens = int((batch["tgt_out"] != PAD).sum())
    fused_adam = make_optimizer(model, cfg.train)
    loop_adam = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas)

    def variant(piece: str | None) -> Callable[[], None]:
        kernels = "eager" if piece == "all" else "native"
        step = train_step_fn(model, batch, "bf16", kernels=kernels)
        optimizer = loop_adam if piece in ("fused_adam", "all") else fused_adam

        def run() -> None:
            with _without(piece or ""):
                step()
            optimizer.step()

        return run

    use_kernels("native")
    fns = {"full": variant(None), **{piece: variant(piece) for piece in PIECES}}
    times = interleaved_seconds(fns, args.warmup, args.iters)
    full = times["full"][1]
    result = {
        "config": args.config,
        "threads": torch.get_num_threads(),
        "target_tokens": n_tokens,
        "tokens_per_s": {name: round(n_tokens / median, 1) for name, (_, median) in times.items()},
        **{f"speedup_{piece}": round(times[piece][1] / full, 3) for piece in PIECES},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
