"""Teacher forcing for the input-feeding Luong decoder as one loop of fused per-step products.

With input feeding (Luong et al., 2015, sec. 3.3) step t reads h~_{t-1}, so teacher forcing has
to loop over the target. This module runs that loop with as little besides matrix products as
it can, and gives the same logits and gradients as the plain loop over `Decoder._block`:

- The embedding's share of the bottom layer's input projection, with both biases, is one
  product over all target positions; a step multiplies only [h~_{t-1}; h_{t-1}] by
  [W_ih_rest | W_hh]^T, one matmul per layer per step (weights cast once, not per step), or
  two where h_{t-1}'s product has to stay apart (GRU's n gate, lstm_ln's two layer norms).
- Every cell runs here: nn.LSTM and nn.GRU with their gate math written out, our
  `RecurrentLayer` variants through their own step functions and backward (`cell_step`),
  recurrent dropout and weight drop included (`_Layer`).
- The context half of the combine layer (eq. 5) is moved in front of the attention sum:
  W_c1 c_t = sum_s a_t(s) (W_c1 h_s), so V W_c1^T is one product per batch and a step's
  attention and combine take one batched product.
- Per-step products use their matrices detached, so autograd neither accumulates a weight
  gradient at every step nor builds outer products per step: `_LoopProducts` keeps the
  per-step inputs and returns each matrix's gradient as one product over all steps
  (dM = X^T G), which is where most of the backward's time used to go.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from nmt import native
from nmt.model.attention import EncoderMemory
from nmt.model.cells import RecurrentLayer, RecurrentNoise, cell_step, lstm_step


class _LoopProducts(torch.autograd.Function):
    """Identity on base (T, B, N), whose step t is used as base[t] + sum_k x^k_t @ M_k with
    every M_k detached inside the loop; the loop appends x^k_t to inputs[k].

    Backward gets the gradient G (T, B, N) of every step at once (from `unbind`) and returns
    dM_k = sum_t (x^k_t)^T G_t as one product: M_k (K, N) is shared, x^k_t (B, K); or M_k
    (B, K, N) is per row, x^k_t (B, K) multiplying row b's matrix.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, base: Tensor, inputs: list[list[Tensor]], *mats: Tensor
    ) -> Tensor:
        ctx.inputs = inputs
        ctx.batched = [m.dim() == 3 for m in mats]
        return base

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads: list[Tensor | None] = []
        for k, (xs, batched) in enumerate(zip(ctx.inputs, ctx.batched, strict=True)):
            if not ctx.needs_input_grad[2 + k]:
                grads.append(None)
                continue
            x = torch.stack(xs)  # (T, B, K)
            g = grad.to(x.dtype)
            if batched:  # (B, K, T) @ (B, T, N)
                grads.append(torch.bmm(x.permute(1, 2, 0), g.transpose(0, 1)))
            else:  # ((N, T * B) @ (T * B, K))^T: laid out as the weight M^T it came from
                flat_g, flat_x = g.reshape(-1, g.size(-1)), x.reshape(-1, x.size(-1))
                grads.append((flat_g.t() @ flat_x).t())
        base_grad = grad if ctx.needs_input_grad[0] else None
        return (base_grad, None, *grads)


class _StepWeights(torch.autograd.Function):
    """A gated layer's matrices in the compute dtype, as the loop multiplies them: W_ih_emb^T
    (E, G*H), the embeddings' columns of W_ih (empty when E = 0, above the bottom layer), and
    [W_ih_rest | W_hh]^T (In' + H, G*H).

    Backward writes each weight's gradient in the weight's own layout and dtype, one pass per
    weight, from gradients laid out as the weights (`_LoopProducts` and autograd's product
    backward return them so): autograd's slice, cat, cast and transpose backwards would make
    a zero-filled copy per slice, a cast, and a strided copy of each into its weight's layout.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, w_ih: Tensor, w_hh: Tensor, dim: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        ctx.dim, ctx.ih_shape, ctx.ih_dtype, ctx.hh_dtype = dim, w_ih.shape, w_ih.dtype, w_hh.dtype
        ctx.set_materialize_grads(False)
        w_emb = w_ih[:, :dim].to(dtype, copy=True).t()
        rest_cols = w_ih.size(1) - dim
        rest = w_hh.new_empty((w_hh.size(0), rest_cols + w_hh.size(1)), dtype=dtype)
        rest[:, :rest_cols] = w_ih[:, dim:]  # cast and placed in one pass each
        rest[:, rest_cols:] = w_hh
        return w_emb, rest.t()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_emb: Tensor | None, grad_rest: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        dim, (rows, cols) = ctx.dim, ctx.ih_shape
        like = grad_rest if grad_rest is not None else grad_emb
        grad_ih = grad_hh = None
        if like is not None and ctx.needs_input_grad[0]:
            grad_ih = like.new_empty((rows, cols), dtype=ctx.ih_dtype)
            for part, grad in ((grad_ih[:, :dim], grad_emb), (grad_ih[:, dim:], grad_rest)):
                if grad is None:
                    part.zero_()
                else:
                    part.copy_(grad.t()[:, : part.size(1)])
        if grad_rest is not None and ctx.needs_input_grad[1]:
            grad_hh = grad_rest.t()[:, cols - dim :]
            grad_hh = grad_hh.to(ctx.hh_dtype, memory_format=torch.contiguous_format)
        return grad_ih, grad_hh, None, None


class _Products(NamedTuple):
    """One `_LoopProducts` site: the per-step bases, the detached matrices, the inputs lists
    the loop fills and, for the C++ row products, how each per-row matrix lies in memory."""

    bases: tuple[Tensor, ...]  # T tensors (B, N)
    mats: list[Tensor]  # detached M_k (K, N) or (B, K, N)
    inputs: list[list[Tensor]]
    # per M_k (B, K, N): (stored, transposed) for `_RowProducts`, M_k itself contiguous or its
    # transpose contiguous; None where the kernels are off or neither is
    row_mats: list[tuple[Tensor, bool] | None]

    @staticmethod
    def build(base: Tensor, mats: list[Tensor]) -> _Products:
        """base: (T, B, N); mats as in `_LoopProducts`."""
        inputs: list[list[Tensor]] = [[] for _ in mats]
        anchored = _LoopProducts.apply(base, inputs, *mats)
        detached = [m.detach() for m in mats]
        return _Products(anchored.unbind(0), detached, inputs, [_row_mat(m) for m in detached])

    def record(self, k: int, x: Tensor) -> Tensor:
        """Keeps x (B, K) for the k-th matrix's gradient; returns it."""
        if torch.is_grad_enabled():
            self.inputs[k].append(x.detach())
        return x

    def shared(self, t: int, x: Tensor, k: int = 0, base: Tensor | None = None) -> Tensor:
        """base (default: step t's) + x (B, K) @ M_k (K, N) -> (B, N)."""
        start = self.bases[t] if base is None else base
        return torch.addmm(start, self.record(k, x), self.mats[k])

    def per_row(self, t: int, x: Tensor, k: int = 0, base: Tensor | None = None) -> Tensor:
        """base (default: step t's) + x (B, K) @ M_k (B, K, N), row by row -> (B, N); on the
        C++ kernel under `use_kernels("native")` (`_RowProducts`)."""
        start = self.bases[t] if base is None else base
        row_mat = self.row_mats[k]
        if row_mat is not None:
            return _RowProducts.apply(start, self.record(k, x), *row_mat)  # type: ignore[no-any-return]
        return torch.baddbmm(
            start.unsqueeze(1), self.record(k, x).unsqueeze(1), self.mats[k]
        ).squeeze(1)


def _row_mat(mat: Tensor) -> tuple[Tensor, bool] | None:
    """How `_RowProducts` reads a per-row matrix M (B, K, N): (M, False) where M is contiguous,
    (M^T, True) where its transpose is; None for a shared matrix, with the kernels off, or
    where neither lies contiguously."""
    if mat.dim() != 3 or not native.active(mat):
        return None
    for stored, transposed in ((mat, False), (mat.transpose(1, 2), True)):
        if stored.is_contiguous():
            return stored, transposed
    return None


class _RowProducts(torch.autograd.Function):
    """base + x_b M_b per batch row on the C++ kernel (`native.row_products`), M detached:
    the gradient of x is g M_b^T, the same kernel over the same matrices the other way round
    (M's own gradient comes from `_LoopProducts`, over all steps at once)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, base: Tensor, x: Tensor, stored: Tensor, transposed: bool
    ) -> Tensor:
        ctx.save_for_backward(stored)
        ctx.transposed, ctx.x_dtype = transposed, x.dtype
        return native.row_products(x, stored, base, transposed, base.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (stored,) = ctx.saved_tensors
        grad_x = native.row_products(grad, stored, None, not ctx.transposed, ctx.x_dtype)
        return grad, grad_x, None, None


def _gru_pointwise(gi: Tensor, gh: Tensor, hidden: Tensor) -> Tensor:
    """nn.GRU's gate math in fp32 (gate order r, z, n): r and z from gi + gh,
    n = tanh(gi_n + r * gh_n), h' = (1 - z) * n + z * h.
    gi: (B, 3H) x W_ih^T + b_ih; gh: (B, 3H) h W_hh^T + b_hh, apart from gi for the n gate;
    hidden: (B, H). Returns h' (B, H) in gi's dtype."""
    width = hidden.size(1)
    gi32, gh32 = gi.float(), gh.float()
    reset, update = torch.sigmoid(gi32[:, : 2 * width] + gh32[:, : 2 * width]).chunk(2, dim=1)
    new = torch.tanh(torch.addcmul(gi32[:, 2 * width :], reset, gh32[:, 2 * width :]))
    return torch.lerp(new, hidden.float(), update).to(gi.dtype)


def _supported(layer: nn.Module) -> bool:
    if type(layer) in (nn.LSTM, nn.GRU):
        return bool(cast(nn.RNNBase, layer).bias)
    return isinstance(layer, RecurrentLayer)


def applies(layers: nn.ModuleList, keys: Tensor | None, residual_from: int) -> bool:
    """Whether `input_feeding_forward` can run this decoder: plain nn.LSTM or nn.GRU layers
    with biases (not, for example, quantised ones) or our `RecurrentLayer`s (recurrent dropout
    and weight drop included), a score that is one product of the query, and a bottom layer
    without a residual add."""
    return keys is not None and residual_from >= 1 and all(_supported(layer) for layer in layers)


class _Layer:
    """One decoder layer in the loop: its per-step products, built once per batch, and its step.

    The bottom layer's input projection takes the embeddings' share for all steps as one
    product; a step multiplies only the rest of a layer's input x (h~_{t-1} at the bottom, the
    layer below's output above) and h_{t-1}, by detached weights (`_Products`):

    - nn.LSTM, lstm_peephole, lstm_cifg: gates = base_t + [x; h] [W_ih | W_hh]^T, one matmul,
      base_t holding both biases (and the embeddings' share).
    - lstm_ln: x W_ih^T and h W_hh^T are normalised apart (Ba et al., 2016, sec. 6): two
      products, both normalised in the cell's step (`cell_step` with `input_ln`).
    - nn.GRU: the n gate reads r * (W_hn h + b_hn), so x W_ih^T + b_ih and h W_hh^T + b_hh
      are two products.

    The gate math runs in fp32: nn.GRU's here, nn.LSTM's as `lstm_step` (on the C++ kernel under
    `use_kernels("native")`), our cells' as `cell_step` (their step functions and hand-written
    backward). Recurrent dropout multiplies h_{t-1} in the
    recurrent product and weight drop W_hh, with the batch's masks, as the layer's loop does.
    """

    def __init__(
        self,
        layer: nn.Module,
        emb: Tensor | None,
        like: Tensor,
        steps: int,
        batch: int,
        noise: RecurrentNoise | None,
    ) -> None:
        """emb: (B, T, E) for the bottom layer, whose first E inputs it is; None above.
        like: a tensor in the compute dtype; noise: the layer's masks for this batch."""
        dtype = like.dtype
        self.dtype = dtype
        self.extra: list[Tensor] = []
        if isinstance(layer, RecurrentLayer):
            self.kind = layer.kind
            self.extra = layer.extra_weights()
        else:
            self.kind = "gru" if type(layer) is nn.GRU else "nn.lstm"
        # nn.LSTM's, nn.GRU's and our layer's names alike
        w_ih, w_hh, b_ih, b_hh = (
            cast(Tensor, getattr(layer, name))
            for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
        )
        h_mask = None if noise is None else noise.h_mask
        self.h_mask = None if h_mask is None else h_mask.to(dtype)
        if noise is not None and noise.w_mask is not None:
            w_hh = w_hh * noise.w_mask  # DropConnect, once per batch
        dim = 0 if emb is None else emb.size(-1)  # W_ih's columns in the embeddings' product
        if self.kind in ("lstm_ln", "gru"):
            w_rest = w_ih[:, dim:].contiguous()  # (G*H, In')
            in_bias = b_ih if self.kind == "gru" else None
            base = _input_base(w_ih, in_bias, emb, like, steps, batch)
            self.inputs = _Products.build(base, [w_rest.to(dtype).t()])
            rec_bias = b_hh if self.kind == "gru" else None  # lstm_ln: folded in ln_input
            rec_base = _input_base(w_hh, rec_bias, None, like, steps, batch)
            self.recurrent = _Products.build(rec_base, [w_hh.to(dtype).t()])
            if isinstance(layer, RecurrentLayer):  # lstm_ln: LN(x W_ih^T) * gain + b_ih + b_hh
                self.ln_input = (layer.ln_ih_weight, b_ih + b_hh)
        else:
            w_emb, weights = _StepWeights.apply(w_ih, w_hh, dim, dtype)  # (E, G*H), (In' + H, G*H)
            base = _input_base(w_ih, b_ih + b_hh, emb, like, steps, batch, w_emb)
            self.inputs = _Products.build(base, [weights])

    def step(self, t: int, x: Tensor, hidden: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
        """Step t over x (B, In') from h_{t-1} (B, H) and c_{t-1} (B, H) fp32 ((B, 0) for
        GRU). Returns h_t in the compute dtype and c_t."""
        h_rec = hidden if self.h_mask is None else hidden * self.h_mask
        if self.kind == "gru":
            gi = self.inputs.shared(t, x)
            return _gru_pointwise(gi, self.recurrent.shared(t, h_rec), hidden), cell
        if self.kind == "lstm_ln":
            proj, hh = self.inputs.shared(t, x), self.recurrent.shared(t, h_rec)
            return cell_step(self.kind, self.dtype, proj, cell, hh, self.extra, self.ln_input)
        gates = self.inputs.shared(t, torch.cat([x, h_rec], dim=1))
        if self.kind == "nn.lstm":
            return lstm_step(gates, cell)
        return cell_step(self.kind, self.dtype, gates, cell, None, self.extra)


def _input_base(
    w_ih: Tensor,
    bias: Tensor | None,
    emb: Tensor | None,
    like: Tensor,
    steps: int,
    batch: int,
    w_emb: Tensor | None = None,
) -> Tensor:
    """(T, B, G*H): the bias, plus for the bottom layer (emb (B, T, E)) the embeddings' share
    [W_ih_emb] y_t of every step as one product (by w_emb, W_ih_emb^T in the compute dtype,
    where the caller has it cast)."""
    dtype = like.dtype
    if emb is None:
        if bias is None:
            return like.new_zeros(()).expand(steps, batch, w_ih.size(0))
        return bias.to(dtype).expand(steps, batch, -1)
    dim = emb.size(-1)
    flat = emb.transpose(0, 1).reshape(-1, dim)
    if w_emb is None:
        w_emb = w_ih[:, :dim].to(dtype).t()
    proj = flat @ w_emb if bias is None else torch.addmm(bias.to(dtype), flat, w_emb)
    return proj.view(steps, batch, -1)


def input_feeding_forward(
    emb: Tensor,
    hidden: Tensor,
    cell: Tensor,
    attn_vector: Tensor,
    memory: EncoderMemory,
    keys: Tensor,
    layers: nn.ModuleList,
    combine: Tensor,
    residual_from: int,
    masks: list[Tensor | None],
) -> tuple[Tensor, Tensor]:
    """Teacher forcing through a Luong decoder with input feeding, all steps in one loop.

    Args:
        emb: (B, T, E) embedded tgt_in, in the compute dtype (bf16 under autocast).
        hidden, cell: (L, B, H) the initial state ((L, B, 0) cell for GRU); attn_vector: (B, H)
            h~_0.
        memory: the encoder memory (with the batch's recurrent masks in training); keys:
            (B, S, H) K with scores = h_t K^T (eq. 8, dot or general).
        layers: the L layers (`applies`), the bottom one over [y; h~] (E + H inputs).
        combine: W_c (H, He + H), eq. 5.
        residual_from: layers at this index (>= 1) and above add their input.
        masks: per layer above the bottom, the dropout mask of its input, (B, T, H) or
            (B, 1, H) (variational), or None; index 0 is the caller's (output dropout).
    Returns:
        h~ (B, T, H) before output dropout, and attention weights (B, T, S) fp32.
    """
    dtype = emb.dtype
    batch, steps, _ = emb.shape
    width = hidden.size(-1)
    device = emb.device.type
    with torch.autocast(device, enabled=False):  # every cast below is explicit and once
        stack = []
        for i, layer in enumerate(layers):
            if memory.noise is not None:
                noise = memory.noise.recurrent[i]
            elif isinstance(layer, RecurrentLayer):
                noise = layer.sample_noise(batch, emb)
            else:
                noise = None
            stack.append(_Layer(layer, emb if i == 0 else None, emb, steps, batch, noise))
        # eq. 8 scores h_t K^T; padding (and source a wait-k step has not read) gets -inf, so a
        # zero weight, through the base
        visible = memory.visible()  # (B, S), or (B, T, S) with a wait-k mask
        visible = visible.unsqueeze(0) if visible.dim() == 2 else visible.transpose(0, 1)
        mask_bias = torch.zeros(visible.shape, dtype=dtype, device=emb.device)
        mask_bias = mask_bias.masked_fill(~visible, float("-inf"))  # (1 or T, B, S)
        scores = _Products.build(mask_bias.expand(steps, -1, -1), [keys.to(dtype).transpose(1, 2)])
        # eq. 5: W_c [c_t; h_t] = a_t (V W_c1^T) + h_t W_c2^T
        enc_dim = memory.enc_out.size(-1)
        values = memory.enc_out.to(dtype) @ combine[:, :enc_dim].to(dtype).t()  # (B, S, H)
        zero = emb.new_zeros(()).expand(steps, batch, width)
        out_proj = _Products.build(zero, [combine[:, enc_dim:].to(dtype).t(), values])

        hs = list(hidden.to(dtype).unbind(0))
        cs = list(cell.float().unbind(0))
        feed = attn_vector.to(dtype)
        step_masks = [None if m is None else m.to(dtype).unbind(1) for m in masks]
        outs: list[Tensor] = []
        attns: list[Tensor] = []
        for t in range(steps):
            hs[0], cs[0] = stack[0].step(t, feed, hs[0], cs[0])
            x = hs[0]
            for i in range(1, len(layers)):
                mask = step_masks[i]
                inp = x if mask is None else x * mask[t if len(mask) > 1 else 0]
                hs[i], cs[i] = stack[i].step(t, inp, hs[i], cs[i])
                x = hs[i] + x if i >= residual_from else hs[i]
            weights = scores.per_row(t, x).float().softmax(dim=-1)  # (B, S), eq. 7
            pre_tilde = out_proj.shared(t, x)
            pre_tilde = out_proj.per_row(t, weights.to(dtype), k=1, base=pre_tilde)
            feed = torch.tanh(pre_tilde.float()).to(dtype)
            outs.append(feed)
            attns.append(weights)
    return torch.stack(outs, dim=1), torch.stack(attns, dim=1)
