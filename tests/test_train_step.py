"""The fused input-feeding teacher-forcing loop gives the reference step loop's logits and the
gradients of every parameter, for every cell, in fp32 and under bf16 autocast, with and without
dropout (recurrent dropout and weight drop for our cells), padding and a wait-k mask."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
import torch
from test_model import PAD, make_model, toy_batch

from nmt.loss import label_smoothed_nll
from nmt.model import Seq2Seq, input_feeding
from nmt.model.cells import CELLS, CUSTOM_CELLS

pytestmark = pytest.mark.usefixtures("one_thread")


def train_step(
    model: Seq2Seq,
    batch: dict[str, torch.Tensor],
    *,
    reference: bool,
    bf16: bool,
    wait_k: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
    """Logits (B, T, V) fp32 and every parameter's gradient after one loss.backward(), and
    whether the fused loop ran."""
    model.zero_grad(set_to_none=True)
    model.decoder.reference_loop = reference
    torch.manual_seed(11)  # the same dropout masks for both loops
    args = (batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"])
    spy = mock.patch.object(
        input_feeding, "input_feeding_forward", wraps=input_feeding.input_feeding_forward
    )
    with spy as fused, torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        logits = model(*args, wait_k=wait_k)
    loss, _, _ = label_smoothed_nll(logits, batch["tgt_out"], PAD, 0.1)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads, fused.called


def assert_same_step(
    model: Seq2Seq, bf16: bool, seed: int = 1, wait_k: int | None = None, fused: bool = True
) -> None:
    """The fused loop (which runs, if `fused`) gives the reference loop's logits and grads."""
    batch = toy_batch(torch.Generator().manual_seed(seed), batch=7)
    ref_logits, ref_grads, ran = train_step(model, batch, reference=True, bf16=bf16, wait_k=wait_k)
    assert not ran
    logits, grads, ran = train_step(model, batch, reference=False, bf16=bf16, wait_k=wait_k)
    assert ran == fused
    assert grads.keys() == ref_grads.keys() == {n for n, _ in model.named_parameters()}
    if not bf16:  # fp32 rounding only (the tolerance scales with a gradient's largest entry)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        for name, grad in grads.items():
            atol = max(1e-5, 1e-4 * float(ref_grads[name].abs().max()))
            torch.testing.assert_close(grad, ref_grads[name], atol=atol, rtol=1e-4, msg=name)
        return
    # bf16 keeps about 3 significant digits, and the loops round in different places: they
    # may differ by 0.02 in a logit and 10% of a gradient's largest entry, or by up to three
    # times as much as the reference loop's bf16 result differs from its fp32 one (layer
    # norm of the toy model's 8-wide vectors amplifies rounding)
    fp32_logits, fp32_grads, _ = train_step(model, batch, reference=True, bf16=False, wait_k=wait_k)
    own_error = float((ref_logits - fp32_logits).abs().max())
    torch.testing.assert_close(logits, ref_logits, atol=max(0.02, 3 * own_error), rtol=0.02)
    for name, grad in grads.items():
        scale = float(ref_grads[name].abs().max())
        own_error = float((ref_grads[name] - fp32_grads[name]).abs().max())
        atol = max(0.1 * scale, 3 * own_error)
        torch.testing.assert_close(grad, ref_grads[name], atol=atol, rtol=0.0, msg=name)


VARIANTS: dict[str, dict[str, Any]] = {
    "general": {},
    "dot-bi": {"attention": "luong-dot", "layout": "bi"},
    "three-layers": {"decoder": {"num_layers": 3}},
    "dropout": {"decoder": {"dropout": 0.3}, "embed_dropout": 0.2},
    "variational": {"decoder": {"dropout": 0.3, "variational": True}},
}
# our cells only: nn.LSTM and nn.GRU refuse them
RECURRENT_NOISE = {"decoder": {"dropout": 0.3, "dropout_recurrent": 0.3, "weight_drop": 0.3}}


def feeding_model(cell: str, **kwargs: Any) -> Seq2Seq:
    attention = kwargs.pop("attention", "luong-general")
    layout = kwargs.pop("layout", "gnmt")
    return make_model(cell, attention, layout, input_feeding=True, **kwargs)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cell", CELLS)
def test_fused_loop_matches_the_reference_loop(cell: str, variant: str, precision: str):
    model = feeding_model(cell, **VARIANTS[variant]).train()
    assert_same_step(model, precision == "bf16")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("cell", CUSTOM_CELLS)
def test_fused_loop_matches_with_recurrent_dropout_and_weight_drop(cell: str, precision: str):
    model = feeding_model(cell, **RECURRENT_NOISE).train()
    assert_same_step(model, precision == "bf16")


@pytest.mark.parametrize("cell", CELLS)
def test_fused_loop_matches_under_a_wait_k_mask(cell: str):
    model = feeding_model(cell, layout="uni", decoder={"dropout": 0.3}).train()
    assert_same_step(model, bf16=False, wait_k=2)


@pytest.mark.parametrize("cell", CELLS)
def test_fused_loop_matches_in_eval_without_gradients(cell: str):
    model = feeding_model(cell).eval()
    batch = toy_batch(torch.Generator().manual_seed(2), batch=5)
    args = (batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"])
    with torch.no_grad():
        model.decoder.reference_loop = True
        expected, expected_attn = model.forward_with_attention(*args)
        model.decoder.reference_loop = False
        logits, attn = model.forward_with_attention(*args)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, expected_attn, atol=1e-5, rtol=1e-5)
    assert torch.all(attn[~batch["src_mask"].unsqueeze(1).expand_as(attn)] == 0)


def test_dropout_masks_are_fresh_per_position_and_scaled():
    model = make_model("lstm", "luong-general", "gnmt", decoder={"dropout": 0.5}).train()
    like = torch.zeros(1)
    masks = model.decoder._masks(64, like, steps=9)
    assert all(m is not None and m.shape == (64, 9, model.decoder.hidden_dim) for m in masks)
    mask = masks[1]
    assert mask is not None
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(mask[:, 0], mask[:, 1])  # not shared across time


@pytest.mark.parametrize("attention", ["luong-concat"])
def test_scores_that_are_no_product_keep_the_reference_loop(attention: str):
    model = make_model("lstm", attention, "gnmt", input_feeding=True).train()
    assert_same_step(model, bf16=False, fused=False)  # both run the reference loop: identical
