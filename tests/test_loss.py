"""Label-smoothed cross-entropy: agrees with PyTorch's, ignores padding, exact gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmt.loss import label_smoothed_nll

PAD = 0


def example(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=gen) * 3).to(dtype).requires_grad_()
    target = torch.randint(1, 11, (3, 5), generator=gen)
    target[0, 3:] = PAD
    target[2, 1:] = PAD
    return logits, target


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_matches_torch_cross_entropy_with_label_smoothing(smoothing: float):
    logits, target = example()
    loss, nll, n_tokens = label_smoothed_nll(logits, target, PAD, smoothing)
    flat_logits, flat_target = logits.reshape(-1, 11), target.reshape(-1)
    expected = F.cross_entropy(
        flat_logits, flat_target, ignore_index=PAD, label_smoothing=smoothing, reduction="sum"
    )
    expected_nll = F.cross_entropy(flat_logits, flat_target, ignore_index=PAD, reduction="sum")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, expected_nll)
    assert int(n_tokens) == int((target != PAD).sum()) == 9

    (grad,) = torch.autograd.grad(loss * 0.7, logits)
    (expected_grad,) = torch.autograd.grad(expected * 0.7, logits)
    torch.testing.assert_close(grad, expected_grad)


def test_padding_positions_contribute_nothing():
    logits, target = example()
    loss, _, _ = label_smoothed_nll(logits, target, PAD, 0.1)
    changed = logits.detach().clone()
    changed[target == PAD] = 100.0  # whatever the model says on padding
    loss2, _, _ = label_smoothed_nll(changed, target, PAD, 0.1)
    torch.testing.assert_close(loss, loss2)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.all(grad[target == PAD] == 0)


def test_nll_is_detached_and_uniform_logits_cost_log_v_per_token():
    logits, target = example()
    loss, nll, _ = label_smoothed_nll(logits, target, PAD, 0.1)
    assert loss.requires_grad and not nll.requires_grad
    uniform = torch.zeros(3, 5, 11)
    loss, nll, n_tokens = label_smoothed_nll(uniform, target, PAD, 0.2)
    expected = n_tokens * torch.log(torch.tensor(11.0))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, expected)
    with pytest.raises(ValueError, match="smoothing"):
        label_smoothed_nll(logits, target, PAD, 1.0)


def test_bf16_logits_give_the_fp32_loss_and_a_bf16_gradient():
    logits, target = example()
    loss, _, _ = label_smoothed_nll(logits, target, PAD, 0.1)
    bf16 = logits.detach().to(torch.bfloat16).requires_grad_()
    loss_bf16, _, _ = label_smoothed_nll(bf16, target, PAD, 0.1)
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16, loss, rtol=2e-2, atol=2e-2)
    loss_bf16.backward()
    assert bf16.grad is not None and bf16.grad.dtype == torch.bfloat16
