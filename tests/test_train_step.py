"""The fused input-feeding teacher-forcing loop gives the reference step loop's logits and the
gradients of every parameter, in fp32 and under bf16 autocast, with and without dropout."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_model import PAD, make_model, toy_batch

from nmt.loss import label_smoothed_nll
from nmt.model import Seq2Seq

pytestmark = pytest.mark.usefixtures("one_thread")


def train_step(
    model: Seq2Seq, batch: dict[str, torch.Tensor], *, reference: bool, bf16: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (B, T, V) fp32 and every parameter's gradient after one loss.backward()."""
    model.zero_grad(set_to_none=True)
    model.decoder.reference_loop = reference
    torch.manual_seed(11)  # the same dropout masks for both loops
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        logits = model(batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"])
    loss, _, _ = label_smoothed_nll(logits, batch["tgt_out"], PAD, 0.1)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


def assert_same_step(model: Seq2Seq, bf16: bool, seed: int = 1) -> None:
    batch = toy_batch(torch.Generator().manual_seed(seed), batch=7)
    ref_logits, ref_grads = train_step(model, batch, reference=True, bf16=bf16)
    logits, grads = train_step(model, batch, reference=False, bf16=bf16)
    assert grads.keys() == ref_grads.keys() == {n for n, _ in model.named_parameters()}
    if not bf16:
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
        return
    # bf16 keeps about 3 significant digits, and the loops round in different places
    torch.testing.assert_close(logits, ref_logits, atol=0.02, rtol=0.02)
    for name, grad in grads.items():
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grad, ref_grads[name], atol=0.06 * scale, rtol=0.0, msg=name)


VARIANTS: dict[str, dict[str, Any]] = {
    "general": {},
    "dot-bi": {"attention": "luong-dot", "layout": "bi"},
    "three-layers": {"decoder": {"num_layers": 3}},
    "dropout": {"decoder": {"dropout": 0.3}, "embed_dropout": 0.2},
    "variational": {"decoder": {"dropout": 0.3, "variational": True}},
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_loop_matches_the_reference_loop(variant: str, precision: str):
    kwargs = dict(VARIANTS[variant])
    attention = kwargs.pop("attention", "luong-general")
    layout = kwargs.pop("layout", "gnmt")
    model = make_model("lstm", attention, layout, input_feeding=True, **kwargs).train()
    assert_same_step(model, precision == "bf16")


def test_fused_loop_matches_in_eval_without_gradients():
    model = make_model("lstm", "luong-general", "gnmt", input_feeding=True).eval()
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
    assert_same_step(model, bf16=False)  # both run the reference loop: identical


def test_gru_keeps_the_reference_loop():
    model = make_model("gru", "luong-general", "gnmt", input_feeding=True).train()
    assert_same_step(model, bf16=False)
