"""Our recurrence layer: LSTM variants no fused kernel offers, at close to fused-kernel speed.

Cells (`model.cell`): `lstm` and `gru` run on nn.LSTM / nn.GRU (oneDNN, cuDNN); `lstm_ln`
(layer normalisation, Ba et al. 2016, sec. 6), `lstm_peephole` (Gers & Schmidhuber, 2000) and
`lstm_cifg` (coupled input-forget gate, i = 1 - f) run on `RecurrentLayer`, which is called like
a one-layer, batch-first nn.LSTM: `out, (h, c) = layer(x, (h0, c0))`.

Where the speed comes from:
- The input-to-hidden product of every time step is one large product before the loop (bf16
  under autocast), with both biases folded in; the loop keeps h_{t-1} @ W_hh^T and the gate math.
- The whole loop is one autograd.Function (`_Recurrence`) with a hand-written backward: no
  autograd graph per step, the gate math in fp32 on few kernels, W_hh's gradient one product
  dW = sum_t dA_t^T h_{t-1} over all steps, and the peepholes' gradient one reduction over all
  steps, as the fused kernels do. Each layer norm is one fused kernel forward (PyTorch's
  `native_layer_norm`, statistics kept) and one backward that also gives its gain's gradient.
- `cell_step` runs one step of the same gate math as one autograd node, for a loop that does
  its own products (the input-feeding decoder, `nmt.model.input_feeding`).
- The pointwise step functions are plain tensor code; `use_kernels("compiled")` swaps in
  torch.compile'd versions (one generated kernel per step and direction), `use_kernels("native")`
  C++ kernels for lstm_ln's and the plain LSTM's (`nmt.native`: for lstm_ln both layer norms, the
  gate math and the casts in one pass per step). benchmarks/cells_speed.py measures all three
  (see BENCHMARKS.md).

Regularisation (training only): `dropout_recurrent` multiplies h_{t-1} in the recurrent product
by one mask per sequence (Gal & Ghahramani, 2016); `weight_drop` drops entries of W_hh once per
batch (DropConnect, as in AWD-LSTM). A caller running a sequence step by step draws both once
with `sample_noise` and passes them to every step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmt import native
from nmt.model.dropout import keep_mask

log = logging.getLogger(__name__)

FUSED_CELLS = ("lstm", "gru")  # nn.LSTM / nn.GRU
CUSTOM_CELLS = ("lstm_ln", "lstm_peephole", "lstm_cifg")  # RecurrentLayer
CELLS = FUSED_CELLS + CUSTOM_CELLS
GATES = {"lstm": 4, "lstm_ln": 4, "lstm_peephole": 4, "lstm_cifg": 3}
LN_EPS = 1e-5

# -- the gate math of one step, fp32 ----------------------------------------------------------
# Gate order (i, f, g, o) as in nn.LSTM; (f, g, o) for CIFG. `a` is the pre-activation
# x_t W_ih^T + b (+ h_{t-1} W_hh^T where not layer-normalised); `hh` = h_{t-1} W_hh^T.
# A forward returns h, c and what its backward needs; a backward returns dA, dc_{t-1} and,
# for layer norm, d(hh) and the step's gradients of the gains and the cell's bias.


# d sigmoid and d tanh from the activation y, one kernel each: grad * y * (1 - y), grad * (1 - y^2)
_sigmoid_grad = torch.ops.aten.sigmoid_backward
_tanh_grad = torch.ops.aten.tanh_backward


def _lstm_fwd(a: Tensor, c_prev: Tensor) -> tuple[Tensor, ...]:
    width = c_prev.size(1)
    s = torch.sigmoid(a)
    g = torch.tanh(a[:, 2 * width : 3 * width])
    c = torch.addcmul(s[:, width : 2 * width] * c_prev, s[:, :width], g)
    tc = torch.tanh(c)
    return s[:, 3 * width :] * tc, c, s, g, tc


def _lstm_gates_bwd(
    dh: Tensor, dc: Tensor, c_prev: Tensor, s: Tensor, g: Tensor, tc: Tensor
) -> Tensor:
    """dA of the LSTM's four gates, given dc = dL/dc_t in full."""
    width = c_prev.size(1)
    i, f, o = s[:, :width], s[:, width : 2 * width], s[:, 3 * width :]
    return torch.cat([_sigmoid_grad(dc * g, i), _sigmoid_grad(dc * c_prev, f),
                      _tanh_grad(dc * i, g), _sigmoid_grad(dh * tc, o)], dim=1)  # fmt: skip


def _lstm_bwd(
    dh: Tensor, dc: Tensor, c_prev: Tensor, s: Tensor, g: Tensor, tc: Tensor
) -> tuple[Tensor, Tensor]:
    width = c_prev.size(1)
    dc = dc + _tanh_grad(dh * s[:, 3 * width :], tc)
    return _lstm_gates_bwd(dh, dc, c_prev, s, g, tc), dc * s[:, width : 2 * width]


def _cifg_fwd(a: Tensor, c_prev: Tensor) -> tuple[Tensor, ...]:
    # c_t = f * c_{t-1} + (1 - f) * g: the input gate is tied to the forget gate
    width = c_prev.size(1)
    s = torch.sigmoid(a)
    f = s[:, :width]
    g = torch.tanh(a[:, width : 2 * width])
    c = torch.lerp(g, c_prev, f)
    tc = torch.tanh(c)
    return s[:, 2 * width :] * tc, c, s, g, tc


def _cifg_bwd(
    dh: Tensor, dc: Tensor, c_prev: Tensor, s: Tensor, g: Tensor, tc: Tensor
) -> tuple[Tensor, Tensor]:
    width = c_prev.size(1)
    f, o = s[:, :width], s[:, 2 * width :]
    dc = dc + _tanh_grad(dh * o, tc)
    dc_prev = dc * f
    da = torch.cat([_sigmoid_grad(dc * (c_prev - g), f), _tanh_grad(dc - dc_prev, g),
                    _sigmoid_grad(dh * tc, o)], dim=1)  # fmt: skip
    return da, dc_prev


def _peephole_fwd(a: Tensor, c_prev: Tensor, peep: Tensor) -> tuple[Tensor, ...]:
    # Gers & Schmidhuber (2000): i and f see c_{t-1}, o sees c_t, through diagonal weights
    width = c_prev.size(1)
    i = torch.sigmoid(torch.addcmul(a[:, :width], peep[0], c_prev))
    f = torch.sigmoid(torch.addcmul(a[:, width : 2 * width], peep[1], c_prev))
    g = torch.tanh(a[:, 2 * width : 3 * width])
    c = torch.addcmul(f * c_prev, i, g)
    o = torch.sigmoid(torch.addcmul(a[:, 3 * width :], peep[2], c))
    tc = torch.tanh(c)
    return o * tc, c, i, f, g, o, tc


def _peephole_bwd(
    dh: Tensor,
    dc: Tensor,
    c_prev: Tensor,
    i: Tensor,
    f: Tensor,
    g: Tensor,
    o: Tensor,
    tc: Tensor,
    peep: Tensor,
) -> tuple[Tensor, Tensor]:
    da_o = _sigmoid_grad(dh * tc, o)
    dc = torch.addcmul(dc + _tanh_grad(dh * o, tc), da_o, peep[2])
    da_i = _sigmoid_grad(dc * g, i)
    da_f = _sigmoid_grad(dc * c_prev, f)
    dc_prev = torch.addcmul(torch.addcmul(dc * f, da_i, peep[0]), da_f, peep[1])
    return torch.cat([da_i, da_f, _tanh_grad(dc * i, g), da_o], dim=1), dc_prev


def _ln_fwd(
    a: Tensor,
    hh: Tensor,
    c_prev: Tensor,
    gain_h: Tensor,
    gain_c: Tensor,
    bias_c: Tensor,
    dtype: torch.dtype,
) -> tuple[Tensor, ...]:
    # Ba et al. (2016), sec. 6: gates = LN(W_h h) + LN(W_x x) + b (LN(W_x x) is in `a`),
    # c_t as in the LSTM, h_t = o * tanh(LN(c_t)); each LN is one fused kernel (gain and bias
    # included) that returns the statistics its backward reuses. hh comes and h goes in the
    # products' dtype, the math runs in c's: the casts are in here, so that a compiled step
    # fuses them too
    width = c_prev.size(1)
    hh = hh.to(c_prev.dtype)  # kept for the backward in the math's dtype
    hh_norm, mean_h, rstd_h = torch.native_layer_norm(hh, hh.shape[1:], gain_h, None, LN_EPS)
    s_in = a + hh_norm
    s = torch.sigmoid(s_in)
    g = torch.tanh(s_in[:, 2 * width : 3 * width])
    c = torch.addcmul(s[:, width : 2 * width] * c_prev, s[:, :width], g)
    c_norm, mean_c, rstd_c = torch.native_layer_norm(c, c.shape[1:], gain_c, bias_c, LN_EPS)
    tc = torch.tanh(c_norm)
    h = (s[:, 3 * width :] * tc).to(dtype)
    return h, c, s, g, tc, hh, mean_h, rstd_h, mean_c, rstd_c


def _ln_bwd(
    dh: Tensor,
    dc: Tensor,
    c_prev: Tensor,
    c: Tensor,
    s: Tensor,
    g: Tensor,
    tc: Tensor,
    hh: Tensor,
    mean_h: Tensor,
    rstd_h: Tensor,
    mean_c: Tensor,
    rstd_c: Tensor,
    gain_h: Tensor,
    gain_c: Tensor,
    bias_c: Tensor,
    da_dtype: torch.dtype,
    dhh_dtype: torch.dtype,
) -> tuple[Tensor, ...]:
    """Also takes c_t, and returns beside dA (in da_dtype), dc_{t-1} and d(h W_hh^T) (in
    dhh_dtype) this step's gradients of gain_h, gain_c and bias_c (the fused layer-norm
    backward computes them in its pass). dh may come in any float dtype; the math runs in c's."""
    width = c_prev.size(1)
    dh = dh.to(c_prev.dtype)
    d_norm_c = _tanh_grad(dh * s[:, 3 * width :], tc)  # d (LN(c_t) * gain_c + bias_c)
    dc_norm, d_gain_c, d_bias_c = torch.ops.aten.native_layer_norm_backward(
        d_norm_c, c, c.shape[1:], mean_c, rstd_c, gain_c, bias_c, [True, True, True]
    )
    dc = dc + dc_norm
    da = _lstm_gates_bwd(dh, dc, c_prev, s, g, tc)
    dhh, d_gain_h, _ = torch.ops.aten.native_layer_norm_backward(
        da, hh, hh.shape[1:], mean_h, rstd_h, gain_h, None, [True, True, False]
    )
    dc_prev = dc * s[:, width : 2 * width]
    return da.to(da_dtype), dc_prev, dhh.to(dhh_dtype), d_gain_h, d_gain_c, d_bias_c


class _StepMath(NamedTuple):
    """A variant's forward and backward step functions (eager or compiled)."""

    fwd: Callable[..., tuple[Tensor, ...]]
    bwd: Callable[..., tuple[Tensor, ...]]


_EAGER = {
    "lstm": _StepMath(_lstm_fwd, _lstm_bwd),
    "lstm_cifg": _StepMath(_cifg_fwd, _cifg_bwd),
    "lstm_peephole": _StepMath(_peephole_fwd, _peephole_bwd),
    "lstm_ln": _StepMath(_ln_fwd, _ln_bwd),
}
_step_math: dict[str, _StepMath] = dict(_EAGER)
_compiled: dict[str, _StepMath] = {}


KERNELS = ("auto", "eager", "compiled", "native")


def use_kernels(kernels: str) -> str:
    """Selects how the gate math runs: `eager` (plain tensor code), `compiled` (torch.compile,
    one generated kernel per step and direction), `native` (the C++ kernels of `nmt.native`,
    built here if not yet: lstm_ln's and the plain LSTM's gate math as one kernel per step, the
    loss's softmax and the dropout masks; peephole and CIFG stay eager) or `auto` (native where
    the kernels build, else eager with a warning). Raises RuntimeError where `native` cannot be built. Returns
    what was selected."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown cell kernels {kernels!r}; choose from {', '.join(KERNELS)}")
    if kernels == "auto":
        try:
            return use_kernels("native")
        except RuntimeError as exc:
            log.warning("lstm_ln runs on plain tensor code, slower: %s", exc)
            return use_kernels("eager")
    if kernels == "compiled" and not _compiled:
        for kind, math_ in _EAGER.items():
            # default dynamic: the first batch size compiles static, a second one recompiles
            # with the batch dimension symbolic (token-bounded batches vary it), not once each
            _compiled[kind] = _StepMath(torch.compile(math_.fwd), torch.compile(math_.bwd))
    native.use(kernels == "native")  # built first: it may fail
    _step_math.update(_compiled if kernels == "compiled" else _EAGER)
    if kernels == "native":
        _step_math.update(_NATIVE)
    return kernels


def _on_kernel(cell: Tensor) -> bool:
    """Whether a step whose cell state is `cell` runs on the C++ kernel (CPU, float32 cell
    state: the gradient checks' float64 runs on plain tensor code)."""
    return cell.device.type == "cpu" and cell.dtype == torch.float32


def _ln_native_fwd(a: Tensor, hh: Tensor, c_prev: Tensor, *rest: Any) -> tuple[Tensor, ...]:
    return (native.ln_fwd if _on_kernel(c_prev) else _ln_fwd)(a, hh, c_prev, *rest)


def _ln_native_bwd(
    dh: Tensor, dc: Tensor, c_prev: Tensor, c: Tensor, *rest: Any
) -> tuple[Tensor, ...]:
    return (native.ln_bwd if _on_kernel(c) else _ln_bwd)(dh, dc, c_prev, c, *rest)


# lstm_ln's steps on the C++ kernel for CPU tensors, on plain tensor code for others (a forward
# keeps what its own backward needs; the cell state, the same in both, decides). The plain LSTM's
# kernel reads and writes the products' dtype, so `_Recurrence` and `lstm_step` call it directly.
_NATIVE = {"lstm_ln": _StepMath(_ln_native_fwd, _ln_native_bwd)}


# -- the whole sequence as one autograd node ------------------------------------------------


class _Recurrence(torch.autograd.Function):
    """Runs the loop over pre (T, B, G*H) = x W_ih^T + b from h0, c0 (B, H).

    Args after kind: pre, h0, c0, w_hh (G*H, H) (already weight-dropped), h_mask (B, H) or
    None (recurrent dropout), then the variant's weights: peep (3, H) for peephole; gain_h
    (G*H,), gain_c (H,), bias_c (H,) for layer norm. Returns out (T, B, H) in pre's dtype and
    the last c (B, H) fp32. The matrix products run in pre's dtype, the gate math in fp32.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        kind: str,
        pre: Tensor,
        h0: Tensor,
        c0: Tensor,
        w_hh: Tensor,
        h_mask: Tensor | None,
        *extra: Tensor,
    ) -> tuple[Tensor, Tensor]:
        dtype = pre.dtype
        steps, batch, _ = pre.shape
        width = w_hh.size(1)
        step = _step_math[kind]
        acc = torch.promote_types(dtype, torch.float32)  # the gate math's dtype
        extra32 = [e.to(acc) for e in extra]
        # a plain LSTM's steps on the C++ kernel (`use_kernels("native")`, CPU, fp32 cell state)
        on_kernel = kind == "lstm" and native.active(pre) and acc == torch.float32
        with torch.autocast(pre.device.type, enabled=False):
            w_t = w_hh.to(dtype).t()  # (H, G*H)
            mask = None if h_mask is None else h_mask.to(dtype)
            out = pre.new_empty(steps, batch, width)
            cs = [c0.to(acc)]
            h_in = h0.to(dtype)
            saved = []
            for t in range(steps):
                if mask is not None:
                    h_in = h_in * mask
                if kind == "lstm_ln":
                    # pre_t and hh stay in their dtype: the step casts (LN(hh) + pre_t: fp32)
                    hh = torch.mm(h_in, w_t)
                    h, c, *rest = step.fwd(pre[t], hh, cs[-1], *extra32, dtype)
                elif on_kernel:  # the C++ kernel reads the gates and writes h into out[t]
                    gates = torch.addmm(pre[t], h_in, w_t)
                    h, c, *rest = native.lstm_fwd(gates, cs[-1], dtype, out[t])
                else:  # pre_t + h W_hh^T as one product (bf16 under autocast, as nn.LSTM's)
                    gates = torch.addmm(pre[t], h_in, w_t).to(acc)
                    h, c, *rest = step.fwd(gates, cs[-1], *extra32)
                if not on_kernel:
                    out[t] = h
                h_in = out[t]
                cs.append(c)
                saved.append(rest)
        ctx.kind, ctx.on_kernel = kind, on_kernel
        ctx.saved = (cs, saved, extra32)  # intermediates only: outputs go through save_for_backward
        ctx.save_for_backward(w_hh, h_mask, h0, out)
        ctx.shapes = (dtype, c0.dtype, h0.dtype, [e.dtype for e in extra])
        return out, cs[-1].clone()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: Tensor, grad_c: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        kind = ctx.kind
        cs, saved, extra32 = ctx.saved
        w_hh, h_mask, h0, out = ctx.saved_tensors
        dtype, c_dtype, h_dtype, extra_dtypes = ctx.shapes
        step = _step_math[kind]
        steps = len(saved)
        with torch.autocast(grad_out.device.type, enabled=False):
            w = w_hh.to(dtype)  # (G*H, H)
            acc = cs[0].dtype
            dc = torch.zeros_like(cs[0]) if grad_c is None else grad_c.to(acc)
            dh_rec = torch.zeros_like(cs[0])
            # dA_t of every step, written in place in the products' dtype: the gradient of pre
            # as it is, and the recurrent product's input without a copy
            d_pre = grad_out.new_empty(steps, grad_out.size(1), w.size(0))
            d_hh = d_pre if kind != "lstm_ln" else torch.empty_like(d_pre)  # d(h W_hh^T)
            d_ln: list[list[Tensor]] = []  # lstm_ln: per step, the gains' and bias' gradients
            for t in range(steps - 1, -1, -1):
                if ctx.on_kernel:  # dh = dh_rec + grad_out[t] in the kernel, dA into d_pre[t]
                    act, tc = saved[t]
                    _, dc = native.lstm_bwd(
                        dh_rec, dc, cs[t], act, tc, d_pre.dtype, grad_out[t], d_pre[t]
                    )
                    dh_rec = torch.mm(d_hh[t], w)  # the kernel reads it in its dtype
                else:
                    dh = dh_rec + grad_out[t]
                    if kind == "lstm_ln":
                        da, dc, dhh, *d_step = step.bwd(
                            dh, dc, cs[t], cs[t + 1], *saved[t], *extra32, dtype, dtype
                        )
                        d_hh[t] = dhh
                        d_ln.append(d_step)
                    else:
                        da, dc = step.bwd(dh, dc, cs[t], *saved[t], *extra32)
                    d_pre[t] = da
                    dh_rec = torch.mm(d_hh[t], w).to(acc)
                if h_mask is not None:
                    dh_rec = dh_rec * h_mask
            # dW_hh = sum_t dHH_t^T h_{t-1}: one product over all steps
            h_prev = torch.cat([h0.to(dtype).unsqueeze(0), out[:-1]])  # (T, B, H)
            if h_mask is not None:
                h_prev = h_prev * h_mask.to(dtype)
            d_hh_flat = d_hh.reshape(-1, d_hh.size(-1))
            d_w = torch.mm(d_hh_flat.t(), h_prev.reshape(-1, h_prev.size(-1))).to(w_hh.dtype)
            d_extra = _extra_grads(kind, d_pre, cs, d_ln)
        d_h0 = dh_rec.to(h_dtype)
        d_extra = [g.to(d) for g, d in zip(d_extra, extra_dtypes, strict=True)]
        return (None, d_pre, d_h0, dc.to(c_dtype), d_w, None, *d_extra)


def _extra_grads(
    kind: str, d_pre: Tensor, cs: list[Tensor], d_ln: list[list[Tensor]]
) -> list[Tensor]:
    """The variant's own weights' gradients: for peepholes one reduction over all steps and
    rows; for layer norm the sum of the steps' (`_ln_bwd`)."""
    if kind == "lstm_peephole":
        width = cs[0].size(1)
        c_prev, c_new = torch.stack(cs[:-1]), torch.stack(cs[1:])  # (T, B, H)
        d_i = (d_pre[..., :width] * c_prev).sum((0, 1))
        d_f = (d_pre[..., width : 2 * width] * c_prev).sum((0, 1))
        d_o = (d_pre[..., 3 * width :] * c_new).sum((0, 1))
        return [torch.stack([d_i, d_f, d_o])]
    if kind == "lstm_ln":
        return [torch.stack(per_step).sum(0) for per_step in zip(*d_ln, strict=True)]
    return []


def lstm_on_kernels(rnn: nn.LSTM, x: Tensor) -> Tensor:
    """A one-layer, unidirectional, batch-first nn.LSTM over x (B, T, In) from zeros, run as
    our layer runs a plain LSTM: the input product of all steps as one, the loop and its
    hand-written backward in `_Recurrence` with the gate math on the C++ kernel. With the
    kernel on, a training step's forward and backward take 0.84x oneDNN's time at the Bible
    encoder's shape (BENCHMARKS.md, "Recurrent cells"). Returns out (B, T, H)."""
    w_ih, w_hh, b_ih, b_hh = (
        cast(Tensor, getattr(rnn, name))
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    )
    pre = F.linear(x.transpose(0, 1), w_ih, b_ih + b_hh)  # (T, B, 4H)
    zeros = x.new_zeros(x.size(0), rnn.hidden_size, dtype=torch.float32)
    out, _ = _Recurrence.apply("lstm", pre, zeros, zeros, w_hh, None)
    return cast(Tensor, out).transpose(0, 1)


# -- one step as one autograd node (the input-feeding loop) ---------------------------------


class _CellStep(torch.autograd.Function):
    """One step of a variant's gate math with its hand-written backward (see `cell_step`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        kind: str,
        dtype: torch.dtype,
        a: Tensor,
        c_prev: Tensor,
        hh: Tensor | None,
        *extra: Tensor,
    ) -> tuple[Tensor, Tensor]:
        step = _step_math[kind]
        extra32 = [e.float() for e in extra]
        if kind == "lstm_ln":
            assert hh is not None
            h, c, *rest = step.fwd(a, hh, c_prev, *extra32, dtype)  # a + LN(hh): fp32
        else:
            h, c, *rest = step.fwd(a.float(), c_prev, *extra32)
            h = h.to(dtype)
        ctx.kind = kind
        ctx.saved = (rest, extra32)  # intermediates only: inputs and outputs go below
        ctx.dtypes = (a.dtype, None if hh is None else hh.dtype, [e.dtype for e in extra])
        ctx.save_for_backward(c_prev, c)
        return h, c

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dh: Tensor, dc: Tensor
    ) -> tuple[Tensor | None, ...]:
        kind = ctx.kind
        rest, extra32 = ctx.saved
        c_prev, c = ctx.saved_tensors
        a_dtype, hh_dtype, extra_dtypes = ctx.dtypes
        step = _step_math[kind]
        width = c_prev.size(1)
        d_hh = None
        if kind == "lstm_ln":
            da, dc_prev, d_hh, *d_extra = step.bwd(
                dh, dc, c_prev, c, *rest, *extra32, a_dtype, hh_dtype
            )
        else:
            da, dc_prev = step.bwd(dh.float(), dc, c_prev, *rest, *extra32)
            d_extra = []
            if kind == "lstm_peephole":
                d_i = (da[:, :width] * c_prev).sum(0)
                d_f = (da[:, width : 2 * width] * c_prev).sum(0)
                d_extra = [torch.stack([d_i, d_f, (da[:, 3 * width :] * c).sum(0)])]
        d_extra = [g.to(d) for g, d in zip(d_extra, extra_dtypes, strict=True)]
        return (None, None, da.to(a_dtype), dc_prev, d_hh, *d_extra)


def cell_step(
    kind: str,
    dtype: torch.dtype,
    a: Tensor,
    c_prev: Tensor,
    hh: Tensor | None,
    extra: list[Tensor],
    input_ln: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of a variant's gate math in fp32, as the layer's loop runs it, for a caller
    that runs the products of the steps itself (`nmt.model.input_feeding`).

    Args:
        kind: an LSTM variant (`GATES`).
        dtype: the dtype of h out (the products' dtype).
        a: (B, G*H) the pre-activation: x_t W_ih^T + b + h_{t-1} W_hh^T; for lstm_ln
            LN(x_t W_ih^T) + b only, or x_t W_ih^T where `input_ln` is given.
        c_prev: (B, H) fp32.
        hh: (B, G*H) h_{t-1} W_hh^T for lstm_ln (normalised here); None for the others.
        extra: the layer's own weights (`RecurrentLayer.extra_weights`).
        input_ln: lstm_ln only: the gain and bias of a's layer norm, a = LN(a) * gain + bias
            here (on the C++ kernel in the same pass as the rest, under `use_kernels("native")`).
    Returns:
        h (B, H) in dtype and c (B, H) fp32. With gradients on, the step is one autograd node
        with the hand-written backward; without, plain tensor code.
    """
    if input_ln is not None:
        assert kind == "lstm_ln" and hh is not None
        if native.active(c_prev) and _on_kernel(c_prev):
            if torch.is_grad_enabled():
                return _NativeLnStep.apply(dtype, a, c_prev, hh, *extra, *input_ln)  # type: ignore[no-any-return]
            h, c, *_ = native.load().ln_lstm_forward(a, hh, c_prev, *extra, dtype, *input_ln)
            return h, c
        a = F.layer_norm(a.float(), a.shape[-1:], *input_ln, LN_EPS)  # mixed dtypes: CPU only
    if torch.is_grad_enabled():
        return _CellStep.apply(kind, dtype, a, c_prev, hh, *extra)  # type: ignore[no-any-return]
    extra32 = [e.float() for e in extra]
    fwd = _step_math[kind].fwd
    if kind == "lstm_ln":
        assert hh is not None
        h, c, *_ = fwd(a, hh, c_prev, *extra32, dtype)
        return h, c
    h, c, *_ = fwd(a.float(), c_prev, *extra32)
    return h.to(dtype), c


def lstm_step(gates: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:
    """nn.LSTM's gate math (order i, f, g, o) of one step in fp32, for a loop that runs the
    products of the steps itself (`nmt.model.input_feeding`): on CPU bf16 sigmoid and tanh run
    several times slower than fp32 ones, and fp32 costs nothing on GPUs.

    gates: (B, 4H) any float dtype; c_prev: (B, H) fp32. Returns h (B, H) in gates' dtype and
    c (B, H) fp32. Under `use_kernels("native")` on the CPU one C++ kernel forward and one
    backward (one autograd node); elsewhere plain tensor code that autograd follows.
    """
    if native.active(c_prev) and _on_kernel(c_prev):
        if torch.is_grad_enabled():
            return _NativeLstmStep.apply(gates, c_prev)  # type: ignore[no-any-return]
        h, c, *_ = native.lstm_fwd(gates, c_prev, gates.dtype)
        return h, c
    return lstm_step_plain(gates, c_prev)


def lstm_step_plain(gates: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:
    """`lstm_step` on plain tensor code, whatever kernels are selected."""
    in_gate, forget, cell_in, out_gate = gates.float().chunk(4, dim=1)
    c = torch.sigmoid(forget) * c_prev + torch.sigmoid(in_gate) * torch.tanh(cell_in)
    return (torch.sigmoid(out_gate) * torch.tanh(c)).to(gates.dtype), c


class _NativeLstmStep(torch.autograd.Function):
    """`lstm_step` on the C++ kernel: gates (B, 4H), c_prev (B, H) fp32 -> h, c."""

    @staticmethod
    def forward(ctx: Any, gates: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        h, c, act, tc = native.lstm_fwd(gates, c_prev, gates.dtype)
        ctx.save_for_backward(c_prev, act, tc)
        ctx.gates_dtype = gates.dtype
        return h, c

    @staticmethod
    def backward(ctx: Any, dh: Tensor, dc: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        c_prev, act, tc = ctx.saved_tensors
        return native.lstm_bwd(dh, dc, c_prev, act, tc, ctx.gates_dtype)


class _NativeLnStep(torch.autograd.Function):
    """lstm_ln's step with its input's layer norm as well, forward and backward on the C++
    kernel (`cell_step` with `input_ln`, `use_kernels("native")`, CPU tensors).

    Args: dtype (of h out), proj (B, 4H) x W_ih^T, c_prev (B, H), hh (B, 4H), then gain_h,
    gain_c, bias_c (the layer's `extra_weights`) and gain_a, bias_a (a's layer norm).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, dtype: torch.dtype, proj: Tensor, c_prev: Tensor, hh: Tensor, *weights: Tensor
    ) -> tuple[Tensor, Tensor]:
        gain_h, gain_c, bias_c, gain_a, bias_a = weights
        h, c, act, tc, stats = native.load().ln_lstm_forward(
            proj, hh, c_prev, gain_h, gain_c, bias_c, dtype, gain_a, bias_a
        )
        ctx.save_for_backward(c_prev, c, act, tc, stats, hh, proj, gain_h, gain_c, gain_a)
        ctx.dtypes = (proj.dtype, hh.dtype, [w.dtype for w in weights])
        return h, c

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dh: Tensor, dc: Tensor
    ) -> tuple[Tensor | None, ...]:
        c_prev, c, act, tc, stats, hh, proj, gain_h, gain_c, gain_a = ctx.saved_tensors
        proj_dtype, hh_dtype, weight_dtypes = ctx.dtypes
        d_proj, dc_prev, d_hh, *d_weights = native.load().ln_lstm_backward(
            dh, dc, c_prev, c, act, tc, stats, hh, gain_h, gain_c, proj_dtype, hh_dtype, proj,
            gain_a,
        )  # fmt: skip
        d_weights = [g.to(d) for g, d in zip(d_weights, weight_dtypes, strict=True)]
        return (None, d_proj, dc_prev, d_hh, *d_weights)


# -- the layer ----------------------------------------------------------------------------------


class RecurrentNoise(NamedTuple):
    """A sequence's regularisation masks, drawn once by `RecurrentLayer.sample_noise`."""

    h_mask: Tensor | None  # (B, H) scaled keep-mask on h_{t-1} in the recurrent product
    w_mask: Tensor | None  # (G*H, H) scaled keep-mask on W_hh


class RecurrentLayer(nn.Module):
    """One unidirectional, batch-first LSTM-variant layer, called like nn.LSTM.

    Parameter names follow nn.LSTM's (`weight_ih_l0`, ...), with both biases as PyTorch keeps
    them, so counts compare: lstm 4(H^2 + H*In + H) + 4H, cifg 3(...) + 3H, peephole adds 3H
    (`peephole`: p_i, p_f, p_o), layer norm adds gains for LN(W_x x) and LN(W_h h) (4H each)
    and a gain and bias for LN(c) (2H); the gates' layer norms have no bias of their own,
    the cell's biases are theirs.
    """

    def __init__(
        self,
        kind: str,
        input_dim: int,
        hidden_dim: int,
        dropout_recurrent: float = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in GATES:
            raise ValueError(f"unknown recurrent cell {kind!r}; choose one of {', '.join(GATES)}")
        for name, p in [("dropout_recurrent", dropout_recurrent), ("weight_drop", weight_drop)]:
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self.kind = kind
        self.input_size = input_dim
        self.hidden_size = hidden_dim
        self.dropout_recurrent = dropout_recurrent
        self.weight_drop = weight_drop
        gates = GATES[kind] * hidden_dim
        self.weight_ih_l0 = nn.Parameter(torch.empty(gates, input_dim))
        self.weight_hh_l0 = nn.Parameter(torch.empty(gates, hidden_dim))
        self.bias_ih_l0 = nn.Parameter(torch.empty(gates))
        self.bias_hh_l0 = nn.Parameter(torch.empty(gates))
        self.peephole = (
            nn.Parameter(torch.zeros(3, hidden_dim)) if kind == "lstm_peephole" else None
        )
        if kind == "lstm_ln":
            self.ln_ih_weight = nn.Parameter(torch.ones(gates))
            self.ln_hh_weight = nn.Parameter(torch.ones(gates))
            self.ln_cell_weight = nn.Parameter(torch.ones(hidden_dim))
            self.ln_cell_bias = nn.Parameter(torch.zeros(hidden_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.LSTM's uniform(-1/sqrt(H), 1/sqrt(H)); forget-gate bias 1 (in b_ih, b_hh 0)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in (self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0):
            nn.init.uniform_(weight, -bound, bound)
        width = self.hidden_size
        forget = slice(0, width) if self.kind == "lstm_cifg" else slice(width, 2 * width)
        with torch.no_grad():
            self.bias_ih_l0[forget] = 1.0
            self.bias_hh_l0[forget] = 0.0

    def sample_noise(self, batch: int, like: Tensor) -> RecurrentNoise | None:
        """Masks for one batch of sequences when training with recurrent dropout or weight
        drop; None otherwise. like: any tensor on the target device."""
        if not self.training or (self.dropout_recurrent == 0 and self.weight_drop == 0):
            return None
        h_mask = w_mask = None
        if self.dropout_recurrent > 0:
            shape = (batch, self.hidden_size)
            h_mask = keep_mask(shape, self.dropout_recurrent, torch.float32, like.device)
        if self.weight_drop > 0:
            w = self.weight_hh_l0
            w_mask = keep_mask(tuple(w.shape), self.weight_drop, w.dtype, like.device)
        return RecurrentNoise(h_mask, w_mask)

    def input_projection(self, x: Tensor) -> Tensor:
        """x (B, T, In) -> (T, B, G*H): x_t W_ih^T + b_ih + b_hh for all steps in one product
        (layer-normalised for lstm_ln, Ba et al. sec. 6)."""
        x_t = x.transpose(0, 1)  # time-major, so that each step's slice is contiguous
        if self.kind != "lstm_ln":
            return F.linear(x_t, self.weight_ih_l0, self.bias_ih_l0 + self.bias_hh_l0)
        proj = F.linear(x_t, self.weight_ih_l0)
        # one pass over the product in its dtype (bf16 under CPU autocast), statistics in fp32;
        # the cast is for CUDA's autocast, whose layer norm returns fp32
        bias = self.bias_ih_l0 + self.bias_hh_l0
        return F.layer_norm(proj, proj.shape[-1:], self.ln_ih_weight, bias, LN_EPS).to(proj.dtype)

    def forward(
        self,
        x: Tensor,
        state: tuple[Tensor, Tensor] | None = None,
        noise: RecurrentNoise | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: (B, T, In); state: h0, c0 (1, B, H) or None for zeros; noise: masks from
        `sample_noise` (a step loop draws them once), or None to draw them here.

        Returns out (B, T, H) (a view of a time-major tensor) and the last h (1, B, H) in
        out's dtype and c (1, B, H) fp32.
        """
        batch = x.size(0)
        if state is None:
            zeros = x.new_zeros(1, batch, self.hidden_size, dtype=torch.float32)
            state = (zeros, zeros)
        if noise is None:
            noise = self.sample_noise(batch, x)
        h_mask, w_mask = noise if noise is not None else (None, None)
        w_hh = self.weight_hh_l0 if w_mask is None else self.weight_hh_l0 * w_mask
        pre = self.input_projection(x)
        out, c = _Recurrence.apply(
            self.kind, pre, state[0][0], state[1][0], w_hh, h_mask, *self.extra_weights()
        )
        return out.transpose(0, 1), (out[-1].unsqueeze(0), c.unsqueeze(0))

    def extra_weights(self) -> list[Tensor]:
        """The variant's own weights, as `_Recurrence` and `cell_step` take them: the
        peepholes (3, H); or the layer-norm gains and the cell's bias; none for the others."""
        if self.kind == "lstm_peephole":
            assert self.peephole is not None
            return [self.peephole]
        if self.kind == "lstm_ln":
            return [self.ln_hh_weight, self.ln_cell_weight, self.ln_cell_bias]
        return []

    def extra_repr(self) -> str:
        return (
            f"{self.kind}, {self.input_size}, {self.hidden_size}, "
            f"dropout_recurrent={self.dropout_recurrent}, weight_drop={self.weight_drop}"
        )


class SequenceNoise(NamedTuple):
    """A batch's decoder dropout masks, drawn once per batch in training (`Decoder.sample_noise`)
    and carried in `EncoderMemory`, so that teacher forcing and a loop of steps alike use one
    mask per sequence."""

    inputs: list[Tensor | None]  # per layer: (B, 1, H) variational mask of its input; index 0:
    # of the output vectors; None where dropout is off or not variational
    recurrent: list[RecurrentNoise | None]  # per layer, for custom cells

    def index_select(self, idx: Tensor) -> SequenceNoise:
        """Rows `idx` of the batch. idx: (B',) long."""
        inputs = [None if m is None else m.index_select(0, idx) for m in self.inputs]
        recurrent = [
            None if n is None else n._replace(h_mask=_rows(n.h_mask, idx)) for n in self.recurrent
        ]
        return SequenceNoise(inputs, recurrent)


def _rows(mask: Tensor | None, idx: Tensor) -> Tensor | None:
    return None if mask is None else mask.index_select(0, idx)
