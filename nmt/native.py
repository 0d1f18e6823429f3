"""The C++ kernels of the training step on the CPU, built on first use, and the switch for them.

`nmt/csrc/` holds one pass over a batch's rows for what takes PyTorch a dozen kernels or more:

- `ln_lstm.cpp`: the layer-normalised LSTM's step, forward and backward (both layer norms, the
  gate math, the casts and the gains' gradients); the same math as `cells._ln_fwd`/`_ln_bwd`.
- `lstm.cpp`: nn.LSTM's gate math of one step, forward and backward, for the input-feeding
  decoder's loop (`nmt.model.input_feeding`); the same math as `cells._lstm_fwd`/`_lstm_bwd`.
- `smoothed_nll.cpp`: a block of logits' log-sum-exp, target logit and gradient for the fused
  projection and loss (`nmt.loss`), in one pass instead of four and two casts.
- `row_products.cpp`: a row vector times its own batch row's matrix (the input-feeding loop's
  attention scores and context, and their gradients), reading each matrix once.
- `dropout.cpp`: dropout's scaled keep-mask in one pass, from a counter-based generator seeded
  by PyTorch's (`nmt.model.dropout`), instead of a draw, a compare, a cast and a scaling.

They are built with PyTorch's C++ extension loader (a C++ compiler and ninja are needed; the first
build takes about a minute and is kept in PyTorch's extension cache, `TORCH_EXTENSIONS_DIR`).
`use(True)` (`cells.use_kernels("native")`, `train.cell_kernels: native`, and `auto`, the
default, on a CPU where they build) makes CPU tensors take them; other tensors, and everything
after `use(False)`, take the plain tensor code.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "module.cpp",
        "ln_lstm.cpp",
        "lstm.cpp",
        "smoothed_nll.cpp",
        "row_products.cpp",
        "dropout.cpp",
    )
]
_module: ModuleType | None = None
_active = False


def _arch_flags() -> tuple[str, list[str]]:
    """A name suffix and compiler flags for the vector instructions PyTorch found on this CPU:
    the name keeps builds for different CPUs apart in a shared extension cache."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return platform.machine().lower(), []
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2" or "DEFAULT"
    flags = {"AVX512": ["-march=x86-64-v4"], "AVX2": ["-march=x86-64-v3"]}
    return capability.lower(), flags.get(capability, [])


def load() -> ModuleType:
    """The compiled kernels (built on the first call, from the cache after). Raises
    RuntimeError, saying why, where they cannot be built (no compiler, no ninja)."""
    global _module
    if _module is None:
        from torch.utils import cpp_extension

        suffix, arch = _arch_flags()
        log.info("building the C++ kernels (%s); once per machine, kept in the cache", suffix)
        try:
            _module = cpp_extension.load(
                name=f"nmt_kernels_{suffix}",
                sources=[str(path) for path in SOURCES],
                extra_cflags=["-O3", "-ffast-math", "-fopenmp", *arch],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except (OSError, RuntimeError, ImportError) as exc:  # no compiler, no ninja, build error
            raise RuntimeError(
                f"train.cell_kernels: native needs a C++ compiler and ninja to build "
                f"the kernels in {SOURCES[0].parent.name}/ ({exc})"
            ) from exc
    return _module


def use(on: bool) -> None:
    """Turns the kernels on for CPU tensors (building them if not yet: RuntimeError where they
    cannot be built) or off."""
    global _active
    if on:
        load()
    _active = on


def active(on: Tensor | torch.device) -> bool:
    """Whether work on a tensor's device (or on a device) runs on the kernels: turned on, and
    the CPU."""
    device = on.device if isinstance(on, Tensor) else on
    return _active and device.type == "cpu"


def ln_fwd(
    a: Tensor,
    hh: Tensor,
    c_prev: Tensor,
    gain_h: Tensor,
    gain_c: Tensor,
    bias_c: Tensor,
    dtype: torch.dtype,
) -> tuple[Tensor, ...]:
    """`cells._ln_fwd`'s contract on CPU tensors: h (in dtype), c, then what `ln_bwd` needs."""
    h, c, act, tc, stats = load().ln_lstm_forward(a, hh, c_prev, gain_h, gain_c, bias_c, dtype)
    return h, c, act, tc, stats, hh


def ln_bwd(
    dh: Tensor,
    dc: Tensor,
    c_prev: Tensor,
    c: Tensor,
    act: Tensor,
    tc: Tensor,
    stats: Tensor,
    hh: Tensor,
    gain_h: Tensor,
    gain_c: Tensor,
    bias_c: Tensor,
    da_dtype: torch.dtype,
    dhh_dtype: torch.dtype,
) -> tuple[Tensor, ...]:
    """`cells._ln_bwd`'s contract on CPU tensors: dA (in da_dtype), dc_{t-1}, d(hh) (in
    dhh_dtype), then this step's gradients of gain_h, gain_c and bias_c (bias_c's value is not
    needed: it is in the signature because the plain backward takes it)."""
    return tuple(
        load().ln_lstm_backward(
            dh, dc, c_prev, c, act, tc, stats, hh, gain_h, gain_c, da_dtype, dhh_dtype
        )
    )


def lstm_fwd(
    gates: Tensor, c_prev: Tensor, dtype: torch.dtype, h_out: Tensor | None = None
) -> tuple[Tensor, ...]:
    """nn.LSTM's gate math: gates (B, 4H) any float dtype, c_prev (B, H) fp32. Returns h (B, H)
    in dtype (written into h_out where given: contiguous, (B, H), dtype), c (B, H) fp32, then
    what `lstm_bwd` needs: the activations (B, 4H) and tanh(c)."""
    return tuple(load().lstm_forward(gates, c_prev, dtype, h_out))


def lstm_bwd(
    dh: Tensor,
    dc: Tensor,
    c_prev: Tensor,
    act: Tensor,
    tc: Tensor,
    da_dtype: torch.dtype,
    dh_more: Tensor | None = None,
    da_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`lstm_fwd`'s backward from dh (B, H) (plus dh_more, any float dtype, where given) and
    dc = dL/dc_t of later steps (B, H): the gates' gradient (B, 4H) in da_dtype (written into
    da_out where given: contiguous, (B, 4H), da_dtype) and dc_{t-1} (B, H) fp32."""
    da, dc_prev = load().lstm_backward(dh, dc, c_prev, act, tc, da_dtype, dh_more, da_out)
    return da, dc_prev


def smoothed_nll(
    logits: Tensor,
    target: Tensor,
    smoothing: float,
    grad_dtype: torch.dtype | None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A block of logits (N, V) and its target columns (N,): the log-sum-exp of each row (N,)
    fp32, the target's logit (N,) fp32 and, where grad_dtype is given, P = p - (1 - eps)
    onehot(y) (N, V) in it, written into `out` where given (contiguous, (N, V), grad_dtype)."""
    with_grad = grad_dtype is not None
    lse, logit_y, grad = load().smoothed_nll_forward(
        logits, target, smoothing, with_grad, grad_dtype or logits.dtype, out
    )
    return lse, logit_y, grad if with_grad else None


def row_products(
    x: Tensor, stored: Tensor, base: Tensor | None, transposed: bool, dtype: torch.dtype
) -> Tensor:
    """base + x_b M_b for every batch row b: x (B, K), stored (B, R, C) the matrices as they lie
    in memory, M_b = stored_b (K = R) or its transpose (`transposed`, K = C); base (B, N) or
    None. Returns (B, N) in dtype; the sums run in fp32."""
    return load().row_products(x, stored, base, transposed, dtype)  # type: ignore[no-any-return]


def keep_mask(
    shape: tuple[int, ...], seed: int, threshold: int, scale: float, dtype: torch.dtype
) -> Tensor:
    """A CPU tensor of `shape` in dtype: `scale` where the element's 16-bit uniform (int16, from
    a SplitMix64 stream of `seed`, four per 64-bit output) is >= threshold, else 0."""
    return load().keep_mask(list(shape), seed, threshold, scale, dtype)  # type: ignore[no-any-return]
