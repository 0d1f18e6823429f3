"""Label-smoothed cross-entropy, padding ignored, computed in fp32: over logits, or fused with
the output projection so that the logits are never built whole."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nmt import native


class _SmoothedNLL(torch.autograd.Function):
    """Per-token smoothed loss with a hand-written gradient.

    With q = (1 - eps) * onehot(y) + eps / V the loss is -sum_j q_j log p_j and its gradient
    with respect to the logits is (p - q) * g: one fused log-softmax forward, and a backward
    of three elementwise passes instead of autograd's log-softmax, mean and gather backwards.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, target: Tensor, keep: Tensor, smoothing: float
    ) -> tuple[Tensor, Tensor]:
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (N, V) fp32
        nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)  # (N,)
        loss = (1.0 - smoothing) * nll - smoothing * log_probs.mean(dim=-1)
        keep_f = keep.to(loss.dtype)
        ctx.save_for_backward(log_probs, target, keep_f)
        ctx.smoothing = smoothing
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(nll)
        return loss * keep_f, nll * keep_f

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, grad_nll: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        log_probs, target, keep_f = ctx.saved_tensors
        eps = ctx.smoothing
        weight = (grad_loss * keep_f).unsqueeze(1)  # (N, 1)
        grad = torch.exp(log_probs).sub_(eps / log_probs.size(-1)).mul_(weight)  # (p - eps/V) g
        grad.scatter_add_(1, target.unsqueeze(1), weight * -(1.0 - eps))  # - (1 - eps) onehot g
        return grad.to(ctx.logits_dtype), None, None, None


def label_smoothed_nll(
    logits: Tensor,
    target: Tensor,
    pad_id: int,
    smoothing: float = 0.0,
    column_of: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Label-smoothed cross-entropy summed over non-padding target positions.

    The smoothed target puts 1 - smoothing on the reference token and spreads `smoothing`
    uniformly over the whole vocabulary (as `torch.nn.functional.cross_entropy` does).

    Args:
        logits: (B, T, V) any float dtype; the loss is computed in fp32.
        target: (B, T) long, tgt_out (y + EOS), `pad_id` on padding.
        pad_id: positions holding it contribute nothing.
        smoothing: in [0, 1).
        column_of: (V_all,) long, the logit column of each token id when the logits cover
            only part of the vocabulary (`Seq2Seq.column_of`); None when columns are ids.
    Returns:
        loss_sum (0-dim fp32, differentiable), nll_sum (0-dim fp32, the unsmoothed negative
        log-likelihood, detached) and n_tokens (0-dim long, the non-padding positions).
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    assert logits.shape[:-1] == target.shape, (logits.shape, target.shape)
    flat_logits = logits.reshape(-1, logits.size(-1))  # (N, V)
    flat_target = target.reshape(-1)  # (N,)
    keep = flat_target != pad_id
    if column_of is not None:
        flat_target = column_of[flat_target]
    loss, nll = _SmoothedNLL.apply(flat_logits, flat_target, keep, smoothing)
    return loss.sum(), nll.sum().detach(), keep.sum()


def _with_bias_column(
    x: Tensor, column: Tensor | float | None, width: int, dtype: torch.dtype | None = None
) -> Tensor:
    """x (R, D) widened to (R, width) with `column` at index D and zeros after it, in dtype
    (default: x's), one pass over x."""
    dtype = dtype or x.dtype
    if column is None:
        return x.to(dtype)
    out = x.new_empty((x.size(0), width), dtype=dtype)
    out[:, : x.size(1)] = x
    out[:, x.size(1)] = column
    out[:, x.size(1) + 1 :] = 0
    return out


WHOLE_GRAD_BYTES = 256 * 2**20  # P of every row kept for one dW product up to this size


class _FusedLinearSmoothedNLL(torch.autograd.Function):
    """Output projection and smoothed loss over row blocks, with the gradients made in forward.

    Fused linear cross-entropy: the (N, V) logits exist one block of rows at a time. For each
    block, logits = h W^T + b in the compute dtype and the fp32 log-softmax gives the loss.
    The loss's gradient wrt the logits is G = p - q (as in `_SmoothedNLL`); it goes straight
    into dh = G W, dW += G^T h and db += sum_rows G, and backward only scales these by the
    incoming gradient of the summed loss, a scalar. Rows are the non-padding positions only.

    Each pass over a block costs about as much as a product, so the blocks make as few as
    they can: the bias is a column of W against a column of ones in h (db comes out of the
    dW product); with G = P - eps / V, P = p - (1 - eps) onehot(y), the uniform part is
    rank one, G W = P W - (eps / V) sum_v W_v and G^T h = P^T h - (eps / V) sum_n h_n, so
    only P is formed; and the smoothing term sum_v log p_v = sum_v x_v - V lse(x) needs only
    lse(x) = x_y - log p_y per row and the sum of all logits, (sum_n h_n) . (sum_v W_v).

    Where P of all rows fits in `WHOLE_GRAD_BYTES` (in the compute dtype: half the size of the
    fp32 logits in bf16), the blocks write it into one (N, V) tensor and dh = P W and
    dW = P^T h are one product each after the last block; else each block adds its share,
    dW in fp32. One product is faster on the CPU (no per-block fp32 accumulation pass) and
    sums over all rows at the product's precision.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        rows: Tensor,
        target: Tensor,
        smoothing: float,
        compute_dtype: torch.dtype,
        block_rows: int,
    ) -> tuple[Tensor, Tensor]:
        need_h, need_w, need_b = (bool(x) for x in ctx.needs_input_grad[:3])
        all_rows = rows.numel() == hidden.size(0)
        d = hidden.size(1)
        width = d if bias is None else -(-(d + 1) // 32) * 32  # room for the bias column
        with torch.autocast(hidden.device.type, enabled=False):
            h = (hidden if all_rows else hidden.index_select(0, rows)).to(compute_dtype)  # (N, D)
            h_aug = _with_bias_column(h, None if bias is None else 1.0, width)  # (N, width)
            w_aug = _with_bias_column(weight, bias, width, compute_dtype)  # (V, width)
            w = w_aug[:, :d]  # (V, D)
            n, v = h.size(0), w.size(0)
            need_grad = need_h or need_w or need_b
            whole = (  # P of every row, for one product each for dh and dW at the end
                h.new_empty((n, v)) if need_grad and n * v * h.element_size() <= WHOLE_GRAD_BYTES
                else None
            )  # fmt: skip
            grad_h = h.new_empty(h.shape) if need_h else None
            grad_wb = (  # (V, width) fp32: dW, then db at column D, summed over the blocks
                h.new_zeros((v, width), dtype=torch.float32)
                if (need_w or need_b) and whole is None
                else None
            )
            nll = h.new_zeros((), dtype=torch.float32)
            lse = h.new_zeros((), dtype=torch.float32)
            on_kernel = native.active(h)  # the C++ kernel for the softmax pass (`nmt.native`)
            grad_p: Tensor | None = None
            for start in range(0, n, block_rows):
                h_blk = h_aug[start : start + block_rows]  # (n_blk, width)
                t_blk = target[start : start + block_rows].unsqueeze(1)  # (n_blk, 1)
                logits = h_blk @ w_aug.t()  # (n_blk, V), compute dtype, bias included
                p_out = None if whole is None else whole[start : start + block_rows]
                if on_kernel:  # one pass: lse, x_y and P = p - (1 - eps) onehot(y)
                    row_lse, logit_y, grad_p = native.smoothed_nll(
                        logits, t_blk.squeeze(1), smoothing,
                        compute_dtype if need_grad else None, p_out,
                    )  # fmt: skip
                    nll += (row_lse - logit_y).sum()
                    lse += row_lse.sum()
                else:
                    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
                    log_p_y = log_probs.gather(1, t_blk)  # (n_blk, 1)
                    nll -= log_p_y.sum()
                    if smoothing:
                        lse += (logits.gather(1, t_blk).float() - log_p_y).sum()
                    if need_grad:
                        probs = log_probs.exp_()  # P = p - (1 - eps) onehot(y), in place
                        probs.scatter_add_(1, t_blk, probs.new_full(t_blk.shape, smoothing - 1.0))
                        grad_p = probs.to(compute_dtype) if p_out is None else p_out.copy_(probs)
                if grad_p is None or whole is not None:
                    continue
                if grad_h is not None:
                    torch.mm(grad_p, w, out=grad_h[start : start + block_rows])
                if grad_wb is None:
                    pass
                elif compute_dtype == torch.float32:
                    grad_wb.addmm_(grad_p.t(), h_blk)
                else:  # accumulated over blocks in fp32
                    grad_wb += grad_p.t() @ h_blk
            if whole is not None:
                if grad_h is not None:
                    torch.mm(whole, w, out=grad_h)
                if need_w or need_b:
                    grad_wb = whole.t() @ h_aug  # compute dtype: cast with backward's pass
            # the rank-one terms of the docstring, the weights' column sums from the weights
            # as given (fp32 masters: no cast of W for them; they differ from the cast W's
            # sums by its rounding only)
            h_sum = h_aug.sum(0, dtype=torch.float32)  # (width,), 1 at the bias column: N
            w_sum = weight.sum(0, dtype=torch.float32)  # (D,)
            logit_sum = h_sum[:d] @ w_sum
            if bias is not None:
                logit_sum = logit_sum + h_sum[d] * bias.sum(dtype=torch.float32)
            loss = (1.0 - smoothing) * nll + smoothing * lse - smoothing / v * logit_sum
        ctx.grad_h = grad_h
        ctx.grad_h_shift = smoothing / v * w_sum if need_h and smoothing else None
        # dW = G^T h - (eps / V) sum_n h_n, and db at column D: backward's one pass
        ctx.grad_wb, ctx.grad_wb_shift = grad_wb, smoothing / v * h_sum
        ctx.d, ctx.need_w, ctx.need_b = d, need_w, need_b
        ctx.rows = None if all_rows else rows
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, grad_nll: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_hidden = grad_weight = grad_bias = None
        if ctx.grad_h is not None:
            grad_h = ctx.grad_h if ctx.grad_h_shift is None else ctx.grad_h - ctx.grad_h_shift
            grad_h = (grad_h * grad_loss).to(ctx.hidden_dtype)
            if ctx.rows is None:
                grad_hidden = grad_h
            else:
                grad_hidden = grad_h.new_zeros(ctx.hidden_shape).index_copy_(0, ctx.rows, grad_h)
        if ctx.grad_wb is not None:
            # (G^T h - shift) * g as one pass: fp32 row + bf16 or fp32 block * 0-dim, in fp32
            d, grad_wb, start = ctx.d, ctx.grad_wb, -ctx.grad_wb_shift * grad_loss.float()
            if ctx.need_w:
                grad_weight = torch.addcmul(start[:d], grad_wb[:, :d], grad_loss)
                grad_weight = grad_weight.to(ctx.weight_dtype)
            if ctx.need_b:
                grad_bias = torch.addcmul(start[d], grad_wb[:, d], grad_loss)
                grad_bias = grad_bias.to(ctx.bias_dtype)
        ctx.grad_h = ctx.grad_wb = None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def fused_linear_smoothed_nll(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    pad_id: int,
    smoothing: float = 0.0,
    column_of: Tensor | None = None,
    block_rows: int = 1024,
) -> tuple[Tensor, Tensor, Tensor]:
    """`label_smoothed_nll(F.linear(hidden, weight, bias), ...)` without the (B, T, V) logits.

    The projection and the loss run over blocks of `block_rows` non-padding positions, and
    the gradients wrt `hidden`, `weight` and `bias` are computed in the forward pass (see
    `_FusedLinearSmoothedNLL`). Under autocast the products run in the autocast dtype, as
    `F.linear` would, and the log-softmax in fp32; the weight and bias gradients are
    accumulated in fp32.

    Args:
        hidden: (B, T, D) the vectors the output matrix multiplies.
        weight: (V, D) output matrix, one row per logit column; bias: (V,) or None.
        target: (B, T) long, tgt_out (y + EOS), `pad_id` on padding.
        pad_id: positions holding it contribute nothing.
        smoothing: in [0, 1), spread uniformly over the V columns.
        column_of: (V_all,) long, the row of `weight` of each token id when the output covers
            only part of the vocabulary (`Seq2Seq.column_of`); None when rows are ids.
        block_rows: positions per block; memory for the logits is block_rows x V.
    Returns:
        loss_sum (0-dim fp32, differentiable), nll_sum (0-dim fp32, detached) and n_tokens
        (0-dim long), as `label_smoothed_nll`.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    assert hidden.shape[:-1] == target.shape, (hidden.shape, target.shape)
    assert weight.dim() == 2 and weight.size(1) == hidden.size(-1), (weight.shape, hidden.shape)
    flat_hidden = hidden.reshape(-1, hidden.size(-1))  # (N, D)
    flat_target = target.reshape(-1)  # (N,)
    keep = flat_target != pad_id
    rows = keep.nonzero().squeeze(1)  # (N_kept,)
    columns = flat_target.index_select(0, rows)
    if column_of is not None:
        columns = column_of[columns]
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    loss, nll = _FusedLinearSmoothedNLL.apply(
        flat_hidden, weight, bias, rows, columns, smoothing, compute_dtype, block_rows
    )
    return loss, nll.detach(), keep.sum()
