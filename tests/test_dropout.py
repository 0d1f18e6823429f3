"""Dropout masks from bulk random bits (nmt.model.dropout)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nmt import native
from nmt.model import dropout as nmt_dropout
from nmt.model.cells import use_kernels
from nmt.model.dropout import Dropout, dropout, keep_mask


@pytest.fixture(params=["eager", "native"])
def kernels(request: pytest.FixtureRequest) -> str:
    """The masks from torch's bulk draws (eager) and from the C++ kernel's stream (native);
    the conftest puts the kernels back to eager afterwards."""
    return use_kernels(request.param)


def test_quantised_threshold_and_scale_by_hand() -> None:
    # p = 0.2 drops round(0.2 * 65536) = 13107 of the 65536 int16 values: those below -32768 + 13107
    threshold, scale = nmt_dropout._quantised(0.2)
    assert threshold == 13107 - 32768
    assert scale == 65536 / (65536 - 13107)
    assert nmt_dropout._quantised(0.0) == (-32768, 1.0)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_keep_mask_rate_values_and_expectation(p: float, kernels: str) -> None:
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of four: the last 64-bit draw is partly used
    mask = keep_mask((n,), p, torch.float32, torch.device("cpu"))
    _, scale = nmt_dropout._quantised(p)
    kept = mask != 0
    assert mask.unique().tolist() == [0.0, pytest.approx(scale, rel=1e-6)]
    keep = 1 / scale
    sigma = math.sqrt(keep * (1 - keep) / n)
    assert abs(kept.float().mean().item() - keep) < 5 * sigma
    assert abs(mask.double().mean().item() - 1.0) < 5 * sigma * scale  # unbiased


def test_neighbours_in_one_draw_are_independent(kernels: str) -> None:
    # four elements share a 64-bit draw: P(both kept) must be P(kept)^2 for neighbours
    torch.manual_seed(1)
    n = 4 * 250_000
    kept = keep_mask((n,), 0.5, torch.float32, torch.device("cpu")).view(-1, 4) != 0
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        both = (kept[:, a] & kept[:, b]).float().mean().item()
        assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / kept.size(0))


def test_masks_follow_the_seed_and_differ_between_draws(kernels: str) -> None:
    torch.manual_seed(5)
    first = keep_mask((64, 33), 0.3, torch.bfloat16, torch.device("cpu"))
    second = keep_mask((64, 33), 0.3, torch.bfloat16, torch.device("cpu"))
    torch.manual_seed(5)
    again = keep_mask((64, 33), 0.3, torch.bfloat16, torch.device("cpu"))
    assert first.dtype == torch.bfloat16 and first.shape == (64, 33)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_dropout_gradient_is_the_mask_and_eval_is_identity(kernels: str) -> None:
    torch.manual_seed(2)
    x = torch.randn(8, 5, 16, requires_grad=True)
    out = dropout(x, 0.25)
    out.sum().backward()
    assert x.grad is not None
    mask = x.grad
    _, scale = nmt_dropout._quantised(0.25)
    assert torch.allclose(out, x.detach() * mask)
    assert mask.unique().tolist() == [0.0, pytest.approx(scale, rel=1e-6)]
    assert dropout(x, 0.25, training=False) is x
    assert dropout(x, 0.0) is x


def test_native_mask_is_the_same_for_any_number_of_threads() -> None:
    use_kernels("native")
    threads = torch.get_num_threads()
    masks = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.manual_seed(7)
            masks.append(keep_mask((257, 129), 0.1, torch.float32, torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


def test_native_mask_by_hand_from_splitmix64() -> None:
    # word w of seed s is SplitMix64's output for the state s + (w + 1) * gamma; element 4w + j
    # is its j-th 16-bit slice (lowest first) read as int16, kept when >= the threshold
    mask64 = (1 << 64) - 1

    def splitmix64(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
        return z ^ (z >> 31)

    seed, threshold, scale = 12345, -1000, 1.25
    got = native.keep_mask((3, 3), seed, threshold, scale, torch.float32).flatten().tolist()
    expected = []
    for i in range(9):
        word = splitmix64((seed + (i // 4 + 1) * 0x9E3779B97F4A7C15) & mask64)
        value = (word >> (16 * (i % 4))) & 0xFFFF
        value = value - 65536 if value >= 32768 else value
        expected.append(scale if value >= threshold else 0.0)
    assert got == expected


def test_module_matches_nn_dropout_interface() -> None:
    layer = Dropout(0.1)
    assert layer.state_dict() == nn.Dropout(0.1).state_dict() == {}
    assert "p=0.1" in repr(layer)
    x = torch.randn(4, 7)
    assert torch.equal(layer.eval()(x), x)
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


def test_reference_switch_uses_torch_draws() -> None:
    # the benchmark's reference: the same call with torch's per-element draws
    torch.manual_seed(3)
    try:
        nmt_dropout.BULK_BITS_ON_CPU = False
        reference = keep_mask((1000,), 0.5, torch.float32, torch.device("cpu"))
    finally:
        nmt_dropout.BULK_BITS_ON_CPU = True
    torch.manual_seed(3)
    expected = torch.bernoulli(torch.full((1000,), 0.5)) / 0.5
    assert torch.equal(reference, expected)
