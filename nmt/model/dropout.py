"""Dropout masks drawn from bulk random bits: the CPU's dropout without its per-element draws.

On the CPU, PyTorch's dropout (`F.dropout`, `torch.bernoulli`) draws one Mersenne-Twister number
per element, single-threaded: 12-15 ms for a (128, 32, 512) activation on two cores, about a
tenth of the default model's training step. Here one 64-bit draw (`torch.randint` over the
whole int64 range) gives four 16-bit uniforms, and an element is kept when its uniform clears
a threshold: a third of the time (benchmarks/model_speed.py measures the step). The keep
probability is rounded to a multiple of 1/65536 and the mask is scaled by the rounded value,
so the expectation is exact. With the C++ kernels on (`nmt.native`), the mask is one pass of
a counter-based generator (SplitMix64) whose seed is one draw from PyTorch's generator, instead
of the draw, a compare, a cast and a scaling. On CUDA, where dropout is one fused Philox kernel,
`F.dropout` and `torch.bernoulli` run as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmt import native

_LEVELS = 1 << 16  # a 16-bit uniform per element
# False: torch's per-element draws on the CPU too (the reference benchmarks/model_speed.py times)
BULK_BITS_ON_CPU = True


def _quantised(p: float) -> tuple[int, float]:
    """The int16 threshold that drops an element with probability p (rounded to 1/65536),
    and the keep-mask's scale 1 / P(keep)."""
    dropped = min(max(round(p * _LEVELS), 0), _LEVELS - 1)
    return dropped - _LEVELS // 2, _LEVELS / (_LEVELS - dropped)


def _uniform16(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Independent uniform int16 values of the given shape, four per 64-bit draw."""
    count = math.prod(shape)
    words = torch.randint(
        -(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=device
    )
    return words.view(torch.int16)[:count].view(shape)


def keep_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scaled keep-mask: 1 / (1 - p) with probability 1 - p, else 0, in dtype.

    Drawn from the default generator, so that seeding and saving torch's RNG state (exact
    resume) cover it as they cover `torch.bernoulli`."""
    if device.type != "cpu" or not BULK_BITS_ON_CPU:
        return bernoulli_mask(shape, p, dtype, device)
    threshold, scale = _quantised(p)
    if native.active(device):
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
        return native.keep_mask(shape, seed, threshold, scale, dtype)
    return (_uniform16(shape, device) >= threshold).to(dtype).mul_(scale)


def bernoulli_mask(
    shape: tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The same mask drawn by `torch.bernoulli`, one draw per element (the CUDA path, and the
    reference benchmarks/model_speed.py times against)."""
    keep = torch.full(shape, 1 - p, dtype=dtype, device=device)
    return torch.bernoulli(keep) / (1 - p)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Dropout with a fresh mask per element, as `F.dropout` (CPU: from bulk random bits)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or not BULK_BITS_ON_CPU:
        return F.dropout(x, p, training=True)
    return x * keep_mask(tuple(x.shape), p, x.dtype, x.device)


class Dropout(nn.Module):
    """`nn.Dropout` drawing its masks with `keep_mask` (no parameters, no state: checkpoints
    written with nn.Dropout load as they are)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
