"""The C++ kernels of the training step (`nmt.native`): the plain LSTM's gate math and the loss's
softmax pass give what the plain tensor code gives, forward and backward, and a whole training
step on them gives the eager step's loss and gradients."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import test_model as tm
import torch

from nmt import native
from nmt.loss import fused_linear_smoothed_nll
from nmt.model import cells
from nmt.model.cells import lstm_step, use_kernels


@pytest.fixture
def kernels() -> Iterator[Any]:
    """`use_kernels`, native for the test, eager again after it."""
    use_kernels("native")
    yield use_kernels
    use_kernels("eager")


LOW = {torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}, torch.float16: {"atol": 2e-3, "rtol": 2e-3}}
TIGHT = {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lstm_kernel_gives_the_plain_step_functions_results(kernels: Any, dtype: torch.dtype):
    """Forward and backward against `cells._lstm_fwd` / `_lstm_bwd` on the same inputs, at a
    width that is no multiple of a vector length; h and dA in the gates' dtype."""
    gen = torch.Generator().manual_seed(5)
    rows, width = 7, 37
    gates = (torch.randn(rows, 4 * width, generator=gen) * 2).to(dtype)
    c_prev = torch.randn(rows, width, generator=gen)
    h_plain, c_plain, s, g, tc = cells._lstm_fwd(gates.float(), c_prev)
    h, c, act, tc_native = native.lstm_fwd(gates, c_prev, dtype)
    assert h.dtype == dtype and c.dtype == torch.float32
    torch.testing.assert_close(c, c_plain, **TIGHT)
    torch.testing.assert_close(h, h_plain.to(dtype), **LOW.get(dtype, TIGHT))
    torch.testing.assert_close(tc_native, tc, **TIGHT)
    dh = torch.randn(rows, width, generator=gen).to(dtype)
    dc = torch.randn(rows, width, generator=gen)
    da_plain, dc_prev_plain = cells._lstm_bwd(dh.float(), dc, c_prev, s, g, tc)
    da, dc_prev = native.lstm_bwd(dh, dc, c_prev, act, tc_native, dtype)
    assert da.dtype == dtype and dc_prev.dtype == torch.float32
    torch.testing.assert_close(dc_prev, dc_prev_plain, **TIGHT)
    torch.testing.assert_close(da.float(), da_plain.to(dtype).float(), **LOW.get(dtype, TIGHT))


def test_lstm_step_on_the_kernel_has_the_autograd_gradients_of_the_plain_one(kernels: Any):
    """`lstm_step` (the input-feeding loop's gate math) over three chained steps: outputs and
    the gradients reaching the gates and the first cell state agree with plain tensor code."""
    gen = torch.Generator().manual_seed(6)
    gates = [torch.randn(4, 4 * 9, generator=gen, requires_grad=True) for _ in range(3)]
    c0 = torch.randn(4, 9, generator=gen, requires_grad=True)
    weights = torch.randn(4, 9, generator=gen)
    results = []
    for choice in ("eager", "native"):
        kernels(choice)
        c, total = c0, torch.zeros(())
        for g in gates:
            h, c = lstm_step(g, c)
            total = total + (h * weights).sum()
        total = total + c.square().sum()
        grads = torch.autograd.grad(total, [*gates, c0])
        results.append([total.detach(), *grads])
    for mine, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(mine, theirs, **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_kernel_gives_log_sum_exp_target_logit_and_gradient(dtype: torch.dtype):
    """lse, x_y and P = p - (1 - eps) onehot(y) of a block, against log_softmax by hand."""
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(6, 53, generator=gen) * 4).to(dtype)
    target = torch.tensor([0, 52, 3, 3, 17, 40])
    lse, logit_y, grad = native.smoothed_nll(logits, target, 0.1, dtype)
    x = logits.float()
    torch.testing.assert_close(lse, torch.logsumexp(x, dim=-1), **TIGHT)
    torch.testing.assert_close(logit_y, x[torch.arange(6), target], **TIGHT)
    expected = torch.softmax(x, dim=-1) - 0.9 * torch.nn.functional.one_hot(target, 53)
    assert grad is not None and grad.dtype == dtype
    torch.testing.assert_close(grad.float(), expected.to(dtype).float(), **LOW.get(dtype, TIGHT))
    lse2, _, none = native.smoothed_nll(logits, target, 0.1, None)
    assert none is None
    torch.testing.assert_close(lse2, lse)
    with pytest.raises(RuntimeError, match="target 53 out of range for 53 columns"):
        native.smoothed_nll(logits, torch.tensor([0, 1, 2, 3, 4, 53]), 0.1, None)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("whole", [True, False], ids=["one-product", "per-block"])
def test_fused_loss_on_the_kernel_gives_the_eager_loss_and_gradients(
    kernels: Any, precision: str, whole: bool, monkeypatch: pytest.MonkeyPatch
):
    """`fused_linear_smoothed_nll` over several blocks (and a partial one), with a bias:
    loss, nll and the gradients of hidden, weight and bias as on plain tensor code, with the
    blocks' P written into one tensor or each block's share added."""
    if not whole:
        monkeypatch.setattr("nmt.loss.WHOLE_GRAD_BYTES", 0)
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(3, 11, 16, generator=gen, requires_grad=True)
    weight = torch.randn(29, 16, generator=gen, requires_grad=True)
    bias = torch.randn(29, generator=gen, requires_grad=True)
    target = torch.randint(1, 29, (3, 11), generator=gen)
    target[0, 7:] = tm.PAD
    results = []
    for choice in ("eager", "native"):
        kernels(choice)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss, nll, n = fused_linear_smoothed_nll(
                hidden, weight, bias, target, tm.PAD, 0.1, block_rows=8
            )
        grads = torch.autograd.grad(loss, [hidden, weight, bias])
        results.append([loss.detach(), nll, n, *grads])
    tol = TIGHT if precision == "fp32" else LOW[torch.bfloat16]
    for mine, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(mine, theirs, **tol)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_on_the_kernels_gives_the_eager_step(kernels: Any, precision: str):
    """A whole LSTM model with input feeding (the default's decoder) and the fused loss:
    loss and every parameter's gradient as eager (float32 rounding; bf16 autocast: the same
    bf16 products, close to its rounding), and inference logits alike."""
    model = tm.make_model("lstm", "luong-general", "gnmt", input_feeding=True).train()
    batch = tm.toy_batch(torch.Generator().manual_seed(4), batch=7)
    inputs = (batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"])
    results = []
    for choice in ("eager", "native"):
        kernels(choice)
        model.zero_grad()
        torch.manual_seed(11)  # the same dropout masks
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            weight, bias = model.output_weights()
            features = model(*inputs, features=True)
            loss, _, _ = fused_linear_smoothed_nll(
                features, weight, bias, batch["tgt_out"], tm.PAD, 0.1
            )
        loss.backward()
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            inference = model(*inputs).float()
        model.train()
        results.append([loss.detach(), inference, *(p.grad.clone() for p in model.parameters())])
    tol = {"atol": 1e-5, "rtol": 1e-4} if precision == "fp32" else LOW[torch.bfloat16]
    for mine, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(mine, theirs, **tol)


def test_tiny_lstm_model_on_the_kernels_learns_to_reverse_token_strings(kernels: Any):
    model = tm.make_model("lstm", "luong-general", "gnmt", enc_hidden=16, input_feeding=True)
    losses = tm.train_toy(model, steps=150)
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert end < 0.3 * start, (start, end)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_products_kernel_gives_baddbmm_both_ways_round(dtype: torch.dtype):
    """base + x_b M_b per row, with M_b as stored and transposed, against baddbmm."""
    gen = torch.Generator().manual_seed(9)
    x_k, x_n = torch.randn(5, 13, generator=gen), torch.randn(5, 21, generator=gen)
    stored = torch.randn(5, 13, 21, generator=gen).to(dtype)
    base = torch.randn(5, 21, generator=gen).to(dtype)
    out = native.row_products(x_k.to(dtype), stored, base, False, dtype)
    expected = torch.baddbmm(base.float().unsqueeze(1), x_k.to(dtype).float().unsqueeze(1),
                             stored.float()).squeeze(1)  # fmt: skip
    torch.testing.assert_close(out.float(), expected.to(dtype).float(), **LOW.get(dtype, TIGHT))
    out_t = native.row_products(x_n.to(dtype), stored, None, True, torch.float32)
    expected_t = torch.bmm(x_n.to(dtype).float().unsqueeze(1), stored.float().transpose(1, 2))
    torch.testing.assert_close(out_t, expected_t.squeeze(1), **LOW.get(dtype, TIGHT))
    with pytest.raises(RuntimeError, match="x has 21 columns, the matrices 13"):
        native.row_products(x_n, stored.float(), None, False, torch.float32)


def test_nn_lstm_trained_on_the_kernels_matches_its_own_forward_and_backward(kernels: Any):
    """`lstm_on_kernels` (what the encoder runs for a plain nn.LSTM layer when training on the
    kernels): the module's outputs and the gradients of its input and of all four weights."""
    torch.manual_seed(12)
    rnn = torch.nn.LSTM(10, 7, batch_first=True)
    x = torch.randn(3, 6, 10, requires_grad=True)
    weights = torch.randn(3, 6, 7)
    results = []
    for run in (lambda: rnn(x)[0], lambda: cells.lstm_on_kernels(rnn, x)):
        rnn.zero_grad()
        x.grad = None
        out = run()
        (out * weights).sum().backward()
        results.append([out.detach(), x.grad, *(p.grad for p in rnn.parameters())])
    for mine, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(mine, theirs, **TIGHT)


def test_a_fused_adam_step_reaches_the_cached_output_matrix_of_decoding():
    """PyTorch's fused Adam writes the weights without bumping their version counters; the
    training step bumps them, so the restricted output matrix that decoding caches by version
    is gathered again from the new weights (the shipped weights of a run used to be decoded
    with the initial output matrix: dev BLEU 1.4 against 19 for the same weights averaged)."""
    from nmt.config import TrainConfig
    from nmt.train import _optimizer_step, make_optimizer

    model = tm.make_model("lstm", "luong-general", "gnmt", input_feeding=True)
    model.set_output_vocab(torch.arange(3, tm.VOCAB - 2), unk_id=3)
    tc = TrainConfig(lr=0.05, clip_norm=0.0)
    optimizer = make_optimizer(model, tc)
    assert optimizer.defaults["fused"]
    with torch.no_grad():
        before = model.output_weights()[0].clone()  # cached, as decoding caches it
    batch = tm.toy_batch(torch.Generator().manual_seed(2), batch=4)
    weight, bias = model.output_weights()
    features = model(batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"],
                     features=True)  # fmt: skip
    loss, _, _ = fused_linear_smoothed_nll(
        features, weight, bias, batch["tgt_out"], tm.PAD, 0.1, model.column_of
    )
    loss.backward()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _optimizer_step(model, optimizer, scaler, tc, 1.0)
    with torch.no_grad():
        after = model.output_weights()[0]
    expected = model.target_embedding.weight.index_select(0, model.output_ids)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_lstm_kernel_writes_into_given_rows_and_adds_a_second_dh(kernels: Any):
    """`lstm_fwd`'s h_out and `lstm_bwd`'s da_out and dh_more (what the encoder's loop passes:
    its rows of the output and of dA, and the output's own gradient beside the recurrent one)."""
    gen = torch.Generator().manual_seed(14)
    gates = torch.randn(5, 4 * 9, generator=gen).bfloat16()
    c_prev = torch.randn(5, 9, generator=gen)
    rows = torch.zeros(3, 5, 9, dtype=torch.bfloat16)
    h, c, act, tc = native.lstm_fwd(gates, c_prev, torch.bfloat16, rows[1])
    assert h.data_ptr() == rows[1].data_ptr()
    torch.testing.assert_close(h, native.lstm_fwd(gates, c_prev, torch.bfloat16)[0], **TIGHT)
    dh, dh_more = torch.randn(5, 9, generator=gen), torch.randn(5, 9, generator=gen).bfloat16()
    dc = torch.randn(5, 9, generator=gen)
    da_rows = torch.zeros(2, 5, 4 * 9, dtype=torch.bfloat16)
    da, dc_prev = native.lstm_bwd(dh, dc, c_prev, act, tc, torch.bfloat16, dh_more, da_rows[0])
    assert da.data_ptr() == da_rows[0].data_ptr()
    da_sum, dc_sum = native.lstm_bwd(dh + dh_more.float(), dc, c_prev, act, tc, torch.bfloat16)
    torch.testing.assert_close(da, da_sum, **TIGHT)
    torch.testing.assert_close(dc_prev, dc_sum, **TIGHT)
    with pytest.raises(RuntimeError, match="h_out must be a contiguous"):
        native.lstm_fwd(gates, c_prev, torch.float32, rows[1])


def test_our_lstm_layer_with_recurrent_dropout_on_the_kernels_gives_the_eager_layer(kernels: Any):
    """The layer's loop on the kernels (h written into the output, dA into the input's gradient,
    the recurrent and the output's gradient summed in the kernel) with recurrent dropout and
    weight drop: outputs and every gradient as the eager loop's, with the same masks."""
    torch.manual_seed(15)
    layer = cells.RecurrentLayer("lstm", 6, 5, dropout_recurrent=0.3, weight_drop=0.2).train()
    x = torch.randn(4, 7, 6, requires_grad=True)
    noise = layer.sample_noise(4, x)
    assert noise is not None and noise.h_mask is not None
    weights = torch.randn(4, 7, 5)
    results = []
    for choice in ("eager", "native"):
        kernels(choice)
        layer.zero_grad()
        x.grad = None
        out, (h, c) = layer(x, noise=noise)
        ((out * weights).sum() + c.sum()).backward()
        results.append([out.detach(), c.detach(), x.grad, *(p.grad for p in layer.parameters())])
    for mine, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(mine, theirs, **TIGHT)


def test_softmax_kernel_refuses_a_grad_out_of_the_wrong_shape_or_dtype(kernels: Any):
    logits, target = torch.randn(4, 6), torch.tensor([0, 1, 2, 5])
    for out in (torch.empty(4, 5), torch.empty(4, 6, dtype=torch.bfloat16)):
        with pytest.raises(RuntimeError, match="smoothed_nll: grad_out must be a contiguous"):
            native.smoothed_nll(logits, target, 0.1, torch.float32, out)
