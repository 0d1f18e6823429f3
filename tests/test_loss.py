"""Label-smoothed cross-entropy: agrees with PyTorch's, ignores padding, exact gradients; fused
with the output projection, it equals the projection followed by the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmt.loss import fused_linear_smoothed_nll, label_smoothed_nll

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


# -- the output projection fused with the loss ---------------------------------------------------

D, V_ALL = 8, 23
KEPT_IDS = torch.tensor([1, 3, 4, 6, 7, 9, 12, 15, 18, 20, 22])  # a restricted output vocabulary


def projection_example(
    restricted: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.nn.Embedding, torch.nn.Parameter, torch.Tensor, torch.Tensor | None]:
    """Hidden states (3, 7, D), a tied embedding and bias over V_ALL ids, targets with
    padding, and column_of when the output covers only KEPT_IDS."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, D, generator=gen).requires_grad_()
    embedding = torch.nn.Embedding(V_ALL, D)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(V_ALL, D, generator=gen))
    bias = torch.nn.Parameter(torch.randn(V_ALL, generator=gen))
    target = torch.randint(1, V_ALL, (3, 7), generator=gen)
    target[0, 4:] = PAD
    target[2, 2:] = PAD
    column_of = None
    if restricted:
        column_of = torch.zeros(V_ALL, dtype=torch.long)  # unseen ids score as column 0
        column_of[KEPT_IDS] = torch.arange(len(KEPT_IDS))
    return hidden, embedding, bias, target, column_of


def loss_and_grads(
    fused: bool, restricted: bool, smoothing: float, autocast: bool, block_rows: int = 4
) -> list[torch.Tensor]:
    """Loss, nll and the gradients of 0.7 * loss wrt hidden, the embedding and the bias."""
    hidden, embedding, bias, target, column_of = projection_example(restricted)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        weight, out_bias = embedding.weight, bias
        if restricted:  # as Seq2Seq.output_weights does under grad mode
            weight, out_bias = weight.index_select(0, KEPT_IDS), bias.index_select(0, KEPT_IDS)
        if fused:
            loss, nll, n = fused_linear_smoothed_nll(
                hidden, weight, out_bias, target, PAD, smoothing, column_of, block_rows
            )
        else:
            logits = F.linear(hidden, weight, out_bias)
            loss, nll, n = label_smoothed_nll(logits, target, PAD, smoothing, column_of)
    assert int(n) == int((target != PAD).sum())
    (loss * 0.7).backward()
    assert hidden.grad is not None and embedding.weight.grad is not None and bias.grad is not None
    return [loss.detach(), nll, hidden.grad, embedding.weight.grad, bias.grad]


@pytest.mark.parametrize("restricted", [False, True], ids=["full", "restricted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("whole", [True, False], ids=["one-product", "per-block"])
def test_fused_projection_and_loss_match_the_unfused_path_in_fp32(
    restricted: bool, smoothing: float, whole: bool, monkeypatch: pytest.MonkeyPatch
):
    """Both ways to the weight gradient: one product over all rows' P (the default while it
    fits `WHOLE_GRAD_BYTES`) and a sum over the blocks' products."""
    if not whole:
        monkeypatch.setattr("nmt.loss.WHOLE_GRAD_BYTES", 0)
    expected = loss_and_grads(False, restricted, smoothing, autocast=False)
    for block_rows in (4, 5, 64):  # 13 positions: several blocks, a ragged one, one block
        got = loss_and_grads(True, restricted, smoothing, False, block_rows)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("restricted", [False, True], ids=["full", "restricted"])
def test_fused_projection_and_loss_match_the_unfused_path_under_bf16_autocast(restricted: bool):
    expected = loss_and_grads(False, restricted, 0.1, autocast=True)
    got = loss_and_grads(True, restricted, 0.1, autocast=True, block_rows=5)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got[1], expected[1], rtol=2e-3, atol=2e-3)
    for g, e in zip(got[2:], expected[2:], strict=True):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2)


def test_fused_loss_ignores_padding_positions_and_needs_no_bias():
    hidden, embedding, _, target, _ = projection_example(False)
    loss, nll, n = fused_linear_smoothed_nll(hidden, embedding.weight, None, target, PAD, 0.1)
    changed = hidden.detach().clone()
    changed[target == PAD] = 100.0  # whatever the model says on padding
    loss2, nll2, _ = fused_linear_smoothed_nll(changed, embedding.weight, None, target, PAD, 0.1)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(nll, nll2)
    assert loss.requires_grad and not nll.requires_grad
    (grad,) = torch.autograd.grad(loss, hidden)
    assert torch.all(grad[target == PAD] == 0) and torch.any(grad[target != PAD] != 0)
    expected, _, _ = label_smoothed_nll(hidden @ embedding.weight.t(), target, PAD, 0.1)
    torch.testing.assert_close(loss, expected)
    with torch.no_grad():  # no gradients made
        loss3, _, n3 = fused_linear_smoothed_nll(hidden, embedding.weight, None, target, PAD, 0.1)
    torch.testing.assert_close(loss3, loss.detach())
    assert int(n3) == int(n)
    with pytest.raises(ValueError, match="smoothing"):
        fused_linear_smoothed_nll(hidden, embedding.weight, None, target, PAD, 1.0)
    with pytest.raises(ValueError, match="block_rows"):
        fused_linear_smoothed_nll(hidden, embedding.weight, None, target, PAD, 0.1, None, 0)


@pytest.mark.parametrize("tie_output", [True, False], ids=["tied", "untied"])
def test_model_features_with_the_fused_loss_give_the_unfused_parameter_gradients(
    tie_output: bool,
):
    from test_model import make_model, toy_batch

    model = make_model("lstm", "luong-general", "gnmt", tie_output=tie_output).train()
    assert (model.out_proj is not None) == tie_output  # the decoder is narrower than E
    model.set_output_vocab(torch.tensor([1, 3, 4, 5, 7, 8, 9, 11, 13]), unk_id=1)
    batch = toy_batch(torch.Generator().manual_seed(3), batch=5)
    inputs = (batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"])
    grads = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        if fused:
            weight, bias = model.output_weights()
            features = model(*inputs, features=True)
            loss, _, _ = fused_linear_smoothed_nll(
                features, weight, bias, batch["tgt_out"], PAD, 0.1, model.column_of, 7
            )
        else:
            logits = model(*inputs)
            loss, _, _ = label_smoothed_nll(logits, batch["tgt_out"], PAD, 0.1, model.column_of)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == {n for n, _ in model.named_parameters()}
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-5, atol=1e-5, msg=name)
