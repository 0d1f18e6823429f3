"""Attention scores against their equations; masked softmax; keys projected once."""

from __future__ import annotations

import pytest
import torch

from nmt.model.attention import (
    AdditiveAttention,
    Attention,
    DotAttention,
    EncoderMemory,
    GeneralAttention,
    build_attention,
    masked_softmax,
)


def memory_for(attention: Attention, enc_out: torch.Tensor, lengths: list[int]) -> EncoderMemory:
    mask = torch.arange(enc_out.size(1)).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return EncoderMemory(enc_out, mask, attention.project_keys(enc_out))


def test_masked_softmax_is_zero_on_padding_and_sums_to_one():
    scores = torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    weights = masked_softmax(scores, mask)
    assert torch.all(weights[0, :, 2:] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(weights[0, :, :2], scores[0, :, :2].softmax(-1))


@pytest.mark.parametrize("score", ["dot", "general", "additive", "concat"])
def test_scores_follow_their_equations(score: str):
    torch.manual_seed(0)
    enc_out, query = torch.randn(2, 4, 6), torch.randn(2, 3, 6)
    attention = build_attention(score, 6, 6, 5)
    memory = memory_for(attention, enc_out, [4, 2])
    context, weights = attention(query, memory)
    b, t, s = 1, 2, 1
    h_t, h_s = query[b, t], enc_out[b, s]
    if isinstance(attention, DotAttention):
        expected = h_t @ h_s
    elif isinstance(attention, GeneralAttention):
        expected = h_t @ (attention.key_proj.weight @ h_s)  # h_t^T W_a h_s
    else:
        assert isinstance(attention, AdditiveAttention)
        energy = torch.tanh(attention.query_proj(h_t) + attention.key_proj.weight @ h_s)
        expected = attention.v.weight[0] @ energy
    torch.testing.assert_close(attention.scores(query, memory)[b, t, s], expected)
    assert torch.all(weights[1, :, 2:] == 0)
    torch.testing.assert_close(context, weights @ enc_out)


def test_step_queries_give_the_whole_sequence_result():
    torch.manual_seed(1)
    attention = build_attention("additive", 6, 8, 5)
    memory = memory_for(attention, torch.randn(3, 7, 8), [7, 3, 5])
    query = torch.randn(3, 4, 6)
    context, weights = attention(query, memory)
    for t in range(4):
        step_context, step_weights = attention(query[:, t : t + 1], memory)
        torch.testing.assert_close(step_context, context[:, t : t + 1])
        torch.testing.assert_close(step_weights, weights[:, t : t + 1])


def test_dot_needs_equal_widths_and_unknown_scores_fail():
    with pytest.raises(ValueError, match="equal widths"):
        build_attention("dot", 4, 6, 4)
    with pytest.raises(ValueError, match="unknown attention score"):
        build_attention("cosine", 4, 4, 4)
