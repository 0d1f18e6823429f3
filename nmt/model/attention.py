"""Bahdanau and Luong attention over encoder states: one call signature, masked softmax
(padding, and the wait-k mask of simultaneous models)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from nmt.model.cells import SequenceNoise


class EncoderMemory(NamedTuple):
    """What the decoder reads from the encoder; built once per batch by `Seq2Seq.encode`."""

    enc_out: Tensor  # (B, S, He) the attention values
    src_mask: Tensor  # (B, S) bool, True on real tokens
    keys: Tensor | None  # (B, S, Ha) keys projected once per batch; None for the dot score
    noise: SequenceNoise | None = None  # the decoder's dropout masks (training only)
    # (T, S) bool, True where target step t may read source token s: the wait-k mask of
    # teacher forcing (`wait_k_mask`), the same for every row, or (B, T, S), one per row (a k
    # per sentence); None: every real token
    read_mask: Tensor | None = None

    def steps(self, start: int, stop: int) -> EncoderMemory:
        """The memory as target steps start..stop-1 see it (their rows of `read_mask`)."""
        if self.read_mask is None:
            return self
        return self._replace(read_mask=self.read_mask[..., start:stop, :])

    def index_select(self, idx: Tensor) -> EncoderMemory:
        """Rows `idx` of the batch (search drops finished sentences with this). idx: (B',) long."""
        keys = None if self.keys is None else self.keys.index_select(0, idx)
        noise = None if self.noise is None else self.noise.index_select(idx)
        read_mask = self.read_mask
        if read_mask is not None and read_mask.dim() == 3:
            read_mask = read_mask.index_select(0, idx)
        return EncoderMemory(
            self.enc_out.index_select(0, idx),
            self.src_mask.index_select(0, idx),
            keys,
            noise,
            read_mask,
        )

    def visible(self, groups: int = 1) -> Tensor:
        """What the query rows may read: (B, S) True on real tokens, or with a read mask
        (B, G * T, S), the read mask repeated for each of the G query rows per memory row."""
        if self.read_mask is None:
            return self.src_mask
        if self.read_mask.dim() == 3:  # (B, T, S): one per row
            return self.src_mask.unsqueeze(1) & self.read_mask.repeat(1, groups, 1)
        return self.src_mask.unsqueeze(1) & self.read_mask.repeat(groups, 1).unsqueeze(0)


def wait_k_mask(
    tgt_len: int, src_len: int, k: int | Tensor, device: torch.device | None = None
) -> Tensor:
    """(T, S) bool: target step t (0-based) reads the first t + k source tokens (Ma et al.,
    2019, "STACL", eq. 3: g(t) = min(k + t - 1, |x|) for 1-based t; the |x| bound is the
    padding mask's). With k a (B,) tensor, a k per row: (B, T, S)."""
    if int(torch.as_tensor(k).min()) < 1:
        raise ValueError(f"wait-k needs k >= 1, got {k}")
    steps = torch.arange(tgt_len, device=device).unsqueeze(1)  # (T, 1)
    positions = torch.arange(src_len, device=device).unsqueeze(0)  # (1, S)
    if isinstance(k, Tensor):
        return positions.unsqueeze(0) < (steps.unsqueeze(0) + k.to(device).view(-1, 1, 1))
    return positions < steps + k  # (T, S)


def masked_softmax(scores: Tensor, src_mask: Tensor) -> Tensor:
    """Softmax over the source axis in fp32, exactly zero on padding (and unread source).

    Args:
        scores: (B, T, S) unnormalised scores, any float dtype.
        src_mask: (B, S) True on real tokens, or (B, T, S) per step (a wait-k mask); every
            row needs at least one.
    Returns:
        (B, T, S) fp32 weights that sum to one over S.
    """
    mask = src_mask.unsqueeze(1) if src_mask.dim() == 2 else src_mask
    scores = scores.float().masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


class Attention(nn.Module):
    """Scores a query against the encoder states and returns the context vector.

    Every variant has the same call: `attention(query (B, T, Hq), memory)` returns
    `context (B, T, He)` and `weights (B, T, S)`. Step-wise decoding passes T = 1; teacher
    forcing without input feeding passes the whole target sequence, so attention for all
    steps is one batched matmul. Keys that do not depend on the query are projected once
    per batch by `project_keys` and travel in `EncoderMemory.keys`.

    The query may have G times as many rows as the memory (the beams of a sentence in beam
    search): rows b * G ... b * G + G - 1 then read memory row b, so the memory is stored once
    per sentence and the G queries of a sentence meet it in one matmul.
    """

    def project_keys(self, enc_out: Tensor) -> Tensor | None:
        """Query-independent key projection. enc_out: (B, S, He) -> (B, S, Ha) or None."""
        raise NotImplementedError

    def scores(self, query: Tensor, memory: EncoderMemory) -> Tensor:
        """Unnormalised scores (B, T, S) for query (B, T, Hq)."""
        raise NotImplementedError

    def bilinear_keys(self, memory: EncoderMemory) -> Tensor | None:
        """K (B, S, Hq) with scores = query @ K^T, for scores that are one batched product of
        the query (dot, general); None for the others. Lets a step loop treat the score as a
        product whose key gradient is summed over all steps at once."""
        return None

    def forward(self, query: Tensor, memory: EncoderMemory) -> tuple[Tensor, Tensor]:
        """Context (N, T, He) and attention weights (N, T, S) for query (N, T, Hq), where N is
        the memory's B rows or a multiple B * G of them."""
        rows, steps = query.shape[:2]
        batch = memory.enc_out.size(0)
        if rows != batch:
            if rows % batch:
                raise ValueError(f"{rows} query rows do not divide among {batch} memory rows")
            query = query.reshape(batch, -1, query.size(-1))  # (B, G * T, Hq)
        visible = memory.visible(rows // batch)  # (B, S) or (B, G*T, S)
        weights = masked_softmax(self.scores(query, memory), visible)  # (B, G*T, S)
        # Luong et al. (2015), sec. 3.1: c_t = sum_s a_t(s) h_s
        context = torch.bmm(weights.to(memory.enc_out.dtype), memory.enc_out)  # (B, G*T, He)
        if rows != batch:
            context, weights = context.view(rows, steps, -1), weights.view(rows, steps, -1)
        return context, weights


class DotAttention(Attention):
    """Luong et al. (2015), eq. 8, "dot": score(h_t, h_s) = h_t^T h_s (needs Hq == He)."""

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__()
        if query_dim != key_dim:
            raise ValueError(
                f"dot attention needs equal widths, got query {query_dim}, key {key_dim}"
            )

    def project_keys(self, enc_out: Tensor) -> Tensor | None:
        return None

    def scores(self, query: Tensor, memory: EncoderMemory) -> Tensor:
        return torch.bmm(query, memory.enc_out.transpose(1, 2))  # (B, T, S)

    def bilinear_keys(self, memory: EncoderMemory) -> Tensor | None:
        return memory.enc_out


class GeneralAttention(Attention):
    """Luong et al. (2015), eq. 8, "general": score(h_t, h_s) = h_t^T W_a h_s.

    W_a h_s is computed once per batch (the keys), so a step costs one batched dot product.
    """

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__()
        self.key_proj = nn.Linear(key_dim, query_dim, bias=False)  # W_a

    def project_keys(self, enc_out: Tensor) -> Tensor | None:
        return self.key_proj(enc_out)  # (B, S, Hq)

    def scores(self, query: Tensor, memory: EncoderMemory) -> Tensor:
        assert memory.keys is not None, "general attention needs projected keys"
        return torch.bmm(query, memory.keys.transpose(1, 2))  # (B, T, S)

    def bilinear_keys(self, memory: EncoderMemory) -> Tensor | None:
        return memory.keys


class AdditiveAttention(Attention):
    """Additive scores: v^T tanh(W_q q + W_k h_s).

    This is Bahdanau et al. (2015), eq. 6 (a(s_{i-1}, h_j) = v^T tanh(W s_{i-1} + U h_j)) and
    Luong et al. (2015), eq. 8, "concat" (v^T tanh(W_a [h_t; h_s]), the same thing with W_a
    split in two). U h_j / W_k h_s is computed once per batch.
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int) -> None:
        super().__init__()
        self.query_proj = nn.Linear(query_dim, attn_dim)  # W (with the bias)
        self.key_proj = nn.Linear(key_dim, attn_dim, bias=False)  # U
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def project_keys(self, enc_out: Tensor) -> Tensor | None:
        return self.key_proj(enc_out)  # (B, S, Ha)

    def scores(self, query: Tensor, memory: EncoderMemory) -> Tensor:
        assert memory.keys is not None, "additive attention needs projected keys"
        q = self.query_proj(query).unsqueeze(2)  # (B, T, 1, Ha)
        energy = torch.tanh(q + memory.keys.unsqueeze(1))  # (B, T, S, Ha)
        return self.v(energy).squeeze(-1)  # (B, T, S)


def build_attention(score: str, query_dim: int, key_dim: int, attn_dim: int) -> Attention:
    """The scoring function named `score` (dot, general, additive, concat)."""
    if score == "dot":
        return DotAttention(query_dim, key_dim)
    if score == "general":
        return GeneralAttention(query_dim, key_dim)
    if score in ("additive", "concat"):
        return AdditiveAttention(query_dim, key_dim, attn_dim)
    raise ValueError(f"unknown attention score {score!r}; choose dot, general, additive or concat")
