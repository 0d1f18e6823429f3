"""The layer-normalised LSTM's gate math as one C++ kernel per step and direction, built on first use.

`nmt/model/csrc/ln_lstm.cpp` does in one pass over the batch's rows what `cells._ln_fwd` and
`cells._ln_bwd` do in some thirty PyTorch kernels per step: both layer norms, the gate math, the
casts and the gains' gradients. It is built with PyTorch's C++ extension loader (a C++ compiler
and ninja are needed, the first build takes about a minute and is kept in PyTorch's extension
cache, `TORCH_EXTENSIONS_DIR`). CPU tensors only: `cells.use_kernels("native")` selects it
for CPU steps and keeps the plain tensor code for others (`train.cell_kernels: native`, and
`auto`, the default, where it builds).
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "ln_lstm.cpp"
_module: ModuleType | None = None


def _arch_flags() -> tuple[str, list[str]]:
    """A name suffix and compiler flags for the vector instructions PyTorch found on this CPU:
    the name keeps builds for different CPUs apart in a shared extension cache."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return platform.machine().lower(), []
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2" or "DEFAULT"
    flags = {"AVX512": ["-march=x86-64-v4"], "AVX2": ["-march=x86-64-v3"]}
    return capability.lower(), flags.get(capability, [])


def load() -> ModuleType:
    """The compiled kernel (built on the first call, from the cache after). Raises
    RuntimeError, saying why, where it cannot be built (no compiler, no ninja)."""
    global _module
    if _module is None:
        from torch.utils import cpp_extension

        suffix, arch = _arch_flags()
        log.info("building the lstm_ln kernel (%s); once per machine, kept in the cache", suffix)
        try:
            _module = cpp_extension.load(
                name=f"nmt_ln_lstm_{suffix}",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-ffast-math", "-fopenmp", *arch],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except (OSError, RuntimeError, ImportError) as exc:  # no compiler, no ninja, build error
            raise RuntimeError(
                f"train.cell_kernels: native needs a C++ compiler and ninja to build "
                f"{SOURCE.name} ({exc})"
            ) from exc
    return _module


def fwd(
    a: Tensor,
    hh: Tensor,
    c_prev: Tensor,
    gain_h: Tensor,
    gain_c: Tensor,
    bias_c: Tensor,
    dtype: torch.dtype,
) -> tuple[Tensor, ...]:
    """`cells._ln_fwd`'s contract on CPU tensors: h (in dtype), c, then what `bwd` needs."""
    h, c, act, tc, stats = load().forward(a, hh, c_prev, gain_h, gain_c, bias_c, dtype)
    return h, c, act, tc, stats, hh


def bwd(
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
        load().backward(dh, dc, c_prev, c, act, tc, stats, hh, gain_h, gain_c, da_dtype, dhh_dtype)
    )
