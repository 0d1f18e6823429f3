"""Label-smoothed cross-entropy over logits, padding ignored, computed in fp32."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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
