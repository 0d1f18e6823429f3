"""Greedy, beam and sampling search against scripted fake models with hand-written tables."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from search_helpers import call
from torch import Tensor

import nmt.search
from nmt.config import load_config
from nmt.model import Seq2Seq, build_model
from nmt.search import (
    Ensemble,
    Hypothesis,
    SearchCancelledError,
    SearchOptions,
    beam_search,
    block_repeated_ngrams,
    greedy_search,
    length_penalty_factor,
    max_lengths,
    sample,
    search,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tensors this small gain nothing from an intra-op thread pool, and on a busy machine its
    threads wait for each other: one thread per test, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# the fake models use the project's id layout: pad, unk, bos, eos, then words
PAD, UNK, BOS, EOS = 0, 1, 2, 3
A, B, C = 4, 5, 6
V = 7


class TableMemory(NamedTuple):
    key: Tensor  # (B,) which table a sentence reads
    src_mask: Tensor  # (B, S)

    def index_select(self, idx: Tensor) -> TableMemory:
        return TableMemory(self.key.index_select(0, idx), self.src_mask.index_select(0, idx))


class TableState(NamedTuple):
    t: Tensor  # (B,) steps taken so far

    def index_select(self, idx: Tensor) -> TableState:
        return TableState(self.t.index_select(0, idx))


class TableModel:
    """Next-token log-probabilities read from table[key, t, prev_token] (keys, T, V, V).

    The key of a sentence is its first source id modulo the number of tables. Attention is
    uniform over the real source tokens, or, with `peaked_attention`, all on source position
    prev_token mod |source|, so that tests can tell which prefix produced a row. Every step
    records its batch size.
    """

    def __init__(self, table: Tensor, peaked_attention: bool = False) -> None:
        self.table = table.log_softmax(dim=-1)
        self.peaked_attention = peaked_attention
        self.batch_sizes: list[int] = []

    def encode(
        self, src: Tensor, src_lengths: Tensor, src_mask: Tensor
    ) -> tuple[TableMemory, TableState]:
        key = src[:, 0] % self.table.size(0)
        return TableMemory(key, src_mask), TableState(torch.zeros_like(key))

    def output_logits(self, out: Tensor) -> Tensor:
        """The table rows are the logits already: the projection is the identity."""
        return out

    def decode_step(
        self, prev_tokens: Tensor, state: TableState, memory: TableMemory
    ) -> tuple[Tensor, TableState, Tensor]:
        self.batch_sizes.append(prev_tokens.size(0))
        group = prev_tokens.size(0) // memory.key.size(0)  # rows per memory row (beams)
        key, src_mask = (
            memory.key.repeat_interleave(group),
            memory.src_mask.repeat_interleave(group, 0),
        )
        t = state.t.clamp(max=self.table.size(1) - 1)
        logits = self.table[key, t, prev_tokens]  # (B, V)
        mask = src_mask.float()  # (B, S)
        if self.peaked_attention:
            lengths = src_mask.sum(dim=1)
            pos = prev_tokens % lengths
            attn = torch.nn.functional.one_hot(pos, mask.size(1)).float()
        else:
            attn = mask / mask.sum(dim=1, keepdim=True)
        return logits, TableState(state.t + 1), attn

    def log_prob(self, key: int, tokens: list[int]) -> float:
        """Teacher-forced log-probability of tokens + EOS."""
        total, prev = 0.0, BOS
        for t, tok in enumerate([*tokens, EOS]):
            total += self.table[key, min(t, self.table.size(1) - 1), prev, tok].item()
            prev = tok
        return total


def scripted_table(rows: dict[tuple[int, int], dict[int, float]], steps: int) -> Tensor:
    """(1, T, V, V) log-probs from {(t, prev): {token: prob}}; other rows say EOS for sure.

    Row (t, prev) with t == steps - 1 also serves every later step."""
    table = torch.full((1, steps, V, V), float("-inf"))
    table[..., EOS] = 0.0
    for (t, prev), probs in rows.items():
        table[0, t, prev] = float("-inf")
        for tok, p in probs.items():
            table[0, t, prev, tok] = math.log(p)
    return table


def random_table(seed: int, keys: int = 1, steps: int = 4) -> Tensor:
    """(keys, T, V, V) random log-probs over EOS and the three words."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn((keys, steps, V, V), generator=g) * 1.5
    table[..., [PAD, UNK, BOS]] = float("-inf")
    return table


def batch(*sentences: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Pad id lists into (src (B,S), src_lengths (B,), src_mask (B,S))."""
    width = max(len(s) for s in sentences)
    src = torch.tensor([s + [PAD] * (width - len(s)) for s in sentences])
    lengths = torch.tensor([len(s) for s in sentences])
    return src, lengths, src != PAD


def run_greedy(model: TableModel, *sentences: list[int], **kw: object) -> list[Hypothesis]:
    args = {"bos_id": BOS, "eos_id": EOS, "max_len_a": 0.0, "max_len_b": 6} | kw
    return call(greedy_search, model, *batch(*sentences), **args)  # type: ignore[arg-type]


def run_beam(model: TableModel, *sentences: list[int], **kw: object) -> list[list[Hypothesis]]:
    args = {"bos_id": BOS, "eos_id": EOS, "max_len_a": 0.0, "max_len_b": 6} | kw
    return call(beam_search, model, *batch(*sentences), **args)  # type: ignore[arg-type]


# greedy takes a (0.6) then a (0.4) then EOS (0.5): p = 0.12
# beam 2 also keeps b (0.4), which ends at once with 0.9: p = 0.36
GARDEN_PATH = {
    (0, BOS): {A: 0.6, B: 0.4},
    (1, A): {A: 0.4, B: 0.32, EOS: 0.28},
    (1, B): {EOS: 0.9, A: 0.05, B: 0.05},
    (2, A): {EOS: 0.5, A: 0.25, B: 0.25},
    (2, B): {EOS: 0.5, A: 0.25, B: 0.25},
}

# EOS never gets near the top before the length limit forces it
_NEVER = {A: 0.5, B: 0.4, C: 0.0999, EOS: 0.0001}
NEVER_ENDS = {(0, BOS): _NEVER, (1, A): _NEVER, (1, B): _NEVER, (1, C): _NEVER}

# [] with p = 0.4 against [a] with p = 0.6 * 0.55 = 0.33
SHORT_OR_LONG = {
    (0, BOS): {EOS: 0.4, A: 0.6},
    (1, A): {EOS: 0.55, A: 0.25, B: 0.2},
    (2, A): {EOS: 0.5, A: 0.3, B: 0.2},
}


def test_greedy_follows_the_most_likely_token() -> None:
    model = TableModel(scripted_table(GARDEN_PATH, 4))
    (hyp,) = run_greedy(model, [A, A])
    assert hyp.tokens == [A, A]
    assert hyp.log_prob == pytest.approx(math.log(0.6 * 0.4 * 0.5), abs=1e-5)
    assert hyp.score == pytest.approx(hyp.log_prob)  # no penalties by default
    assert hyp.finished


def test_beam_finds_the_better_hypothesis_greedy_misses() -> None:
    model = TableModel(scripted_table(GARDEN_PATH, 4))
    (nbest,) = run_beam(model, [A, A], beam_size=2, length_penalty=0.0)
    assert nbest[0].tokens == [B]
    assert nbest[0].log_prob == pytest.approx(math.log(0.36), abs=1e-5)
    assert nbest[0].log_prob > run_greedy(model, [A, A])[0].log_prob


def test_length_penalty_by_hand() -> None:
    model = TableModel(scripted_table(SHORT_OR_LONG, 3))
    (plain,) = run_beam(model, [A], beam_size=2, n_best=2, length_penalty=0.0)
    assert [h.tokens for h in plain] == [[], [A]]
    assert [h.score for h in plain] == pytest.approx([math.log(0.4), math.log(0.33)], abs=1e-5)

    # alpha = 2: lp(|Y|=1) = 1, lp(|Y|=2) = (7/6)^2, so -0.9163 loses to -1.1087 / 1.3611 = -0.8145
    (penalised,) = run_beam(model, [A], beam_size=2, n_best=2, length_penalty=2.0)
    assert [h.tokens for h in penalised] == [[A], []]
    assert penalised[0].score == pytest.approx(math.log(0.33) / (7 / 6) ** 2, abs=1e-5)
    assert penalised[0].score == pytest.approx(-0.8145, abs=1e-4)
    assert penalised[1].score == pytest.approx(math.log(0.4), abs=1e-5)
    assert penalised[0].log_prob == pytest.approx(math.log(0.33), abs=1e-5)
    assert length_penalty_factor(2, 2.0) == pytest.approx((7 / 6) ** 2)


def test_coverage_penalty_by_hand() -> None:
    # uniform attention over 2 source words: [] attends 0.5 to each (penalty 2 * log 0.5),
    # [a] attends 1.0 to each after two steps (penalty 0). Without the penalty [] (0.4) comes
    # first; with it, [] (log 0.4 + 2 log 0.5 = -2.30) falls behind [a] (log 0.33)
    model = TableModel(scripted_table(SHORT_OR_LONG, 3))
    (nbest,) = run_beam(
        model, [A, B], beam_size=2, n_best=2, length_penalty=0.0, coverage_penalty=1.0
    )
    assert [h.tokens for h in nbest] == [[A], []]
    assert nbest[0].score == pytest.approx(math.log(0.33), abs=1e-5)
    assert nbest[1].score == pytest.approx(math.log(0.4) + 2 * math.log(0.5), abs=1e-5)
    (plain,) = run_beam(model, [A, B], beam_size=2, n_best=2, length_penalty=0.0)
    assert [h.tokens for h in plain] == [[], [A]]
    # a third beam keeps [a b] (log 0.12 = -2.12, attention 1.5 on each word: penalty 0)
    # alive long enough to end, and it ranks between [a] and []
    (wider,) = run_beam(
        model, [A, B], beam_size=3, n_best=3, length_penalty=0.0, coverage_penalty=1.0
    )
    assert [h.tokens for h in wider] == [[A], [A, B], []]
    assert wider[1].score == pytest.approx(math.log(0.12), abs=1e-5)
    # greedy takes [a]: two steps over three source words leave 2/3 on each
    (greedy,) = run_greedy(model, [A, B, C], coverage_penalty=0.5)
    assert greedy.tokens == [A]
    assert greedy.score == pytest.approx(math.log(0.33) + 0.5 * 3 * math.log(2 / 3), abs=1e-5)


def test_beam_of_one_matches_greedy() -> None:
    sentences = [[A + i % 3] * (1 + i % 4) for i in range(12)]
    for seed in range(5):
        model = TableModel(random_table(seed, keys=3, steps=5))
        kw = {"max_len_a": 1.0, "max_len_b": 2, "length_penalty": 0.6}
        greedy = run_greedy(model, *sentences, **kw)
        beam = run_beam(model, *sentences, beam_size=1, **kw)
        for g, (b,) in zip(greedy, beam, strict=True):
            assert b.tokens == g.tokens
            assert b.log_prob == pytest.approx(g.log_prob, abs=1e-5)
            assert b.score == pytest.approx(g.score, abs=1e-5)
            assert b.finished == g.finished
        assert call(search, model, *batch(*sentences), bos_id=BOS, eos_id=EOS, **kw) == [  # type: ignore[arg-type]
            [g] for g in greedy
        ]


def test_wide_beam_never_scores_below_greedy() -> None:
    # up to 4 words from 3: 27 live prefixes x 4 tokens = 108 candidates at most, so 128 beams
    # prune nothing. (A narrower beam can lose to greedy: greedy's path may fall out of it.)
    sentences = [[A], [B], [C], [A, B]]
    for seed in range(10):
        model = TableModel(random_table(seed, keys=3, steps=4))
        greedy = run_greedy(model, *sentences, max_len_b=4)
        beam = run_beam(model, *sentences, beam_size=128, length_penalty=0.0, max_len_b=4)
        for g, nbest in zip(greedy, beam, strict=True):
            assert nbest[0].log_prob >= g.log_prob - 1e-5
            assert nbest[0].score >= g.score - 1e-5


def exhaustive(
    model: TableModel, key: int, max_len: int, alpha: float
) -> list[tuple[float, list[int]]]:
    """All outputs of up to max_len words (EOS forced after max_len), best score first."""
    found = []
    for n in range(max_len + 1):
        for tokens in itertools.product([A, B, C], repeat=n):
            lp = model.log_prob(key, list(tokens))
            found.append((lp / length_penalty_factor(n + 1, alpha), list(tokens)))
    return sorted(found, key=lambda x: x[0], reverse=True)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_exhaustive_search_agrees_with_a_beam_wide_enough(alpha: float) -> None:
    # max 3 words over 3 words + EOS: at most 9 live prefixes x 4 tokens = 36 candidates a step,
    # so 40 beams never prune; the early stop must then still return the true best
    for seed in range(6):
        model = TableModel(random_table(seed, keys=2, steps=4))
        beam = run_beam(model, [A], [B], beam_size=40, n_best=5, length_penalty=alpha, max_len_b=3)
        for key, nbest in zip([A % 2, B % 2], beam, strict=True):
            truth = exhaustive(model, key, 3, alpha)[:5]
            assert [h.tokens for h in nbest] == [toks for _, toks in truth]
            assert [h.score for h in nbest] == pytest.approx([s for s, _ in truth], abs=1e-4)


def test_scores_are_penalised_log_probs_of_the_tokens() -> None:
    model = TableModel(random_table(7, keys=3, steps=6))
    sentences = [[A, B, C], [B], [C, C]]
    for nbest, sent in zip(
        run_beam(model, *sentences, beam_size=4, n_best=4, length_penalty=0.8, max_len_a=2.0),
        sentences,
        strict=True,
    ):
        for h in nbest:
            expected = model.log_prob(sent[0] % 3, h.tokens)
            assert h.log_prob == pytest.approx(expected, abs=1e-4)
            assert h.score == pytest.approx(
                expected / length_penalty_factor(len(h.tokens) + 1, 0.8), abs=1e-4
            )


def test_n_best_lists_are_sorted_distinct_and_start_with_the_one_best() -> None:
    sentences = [[A, B, C], [B, A], [C], [A, A, B, C]]
    for seed, alpha, beta in itertools.product(range(6), (0.0, 0.6), (0.0, 0.3)):
        model = TableModel(random_table(seed, keys=3, steps=6))
        kw = {"beam_size": 5, "length_penalty": alpha, "coverage_penalty": beta,
              "max_len_a": 1.5, "max_len_b": 2}  # fmt: skip
        one_best = run_beam(model, *sentences, **kw)
        for n in (2, 5):
            n_best = run_beam(model, *sentences, n_best=n, **kw)
            for (best,), nbest in zip(one_best, n_best, strict=True):
                assert len(nbest) == n
                scores = [h.score for h in nbest]
                assert scores == sorted(scores, reverse=True)
                assert len({tuple(h.tokens) for h in nbest}) == n
                assert nbest[0].tokens == best.tokens
                assert nbest[0].score == pytest.approx(best.score)


def test_min_length_keeps_eos_away() -> None:
    model = TableModel(scripted_table(SHORT_OR_LONG, 3))
    assert run_greedy(model, [A])[0].tokens == [A]
    assert run_greedy(model, [A], min_len=2)[0].tokens == [A, A]
    # the beam prefers [] (p = 0.4) to [a] (p = 0.33) until EOS may not come first
    assert run_beam(model, [A], beam_size=2, length_penalty=0.0)[0][0].tokens == []
    assert run_beam(model, [A], beam_size=2, length_penalty=0.0, min_len=1)[0][0].tokens == [A]
    (nbest,) = run_beam(model, [A], beam_size=3, n_best=3, min_len=2, length_penalty=0.0)
    assert all(len(h.tokens) >= 2 for h in nbest)
    # [a b] ends for sure after b: 0.6 * 0.2 * 1 beats greedy's [a a]: 0.6 * 0.25 * 0.5
    assert nbest[0].tokens == [A, B]
    assert nbest[0].log_prob == pytest.approx(math.log(0.12), abs=1e-5)


def test_max_length_follows_source_length_and_keeps_unfinished_output() -> None:
    # EOS is unlikely everywhere, so every sentence runs into its limit floor(0.5 * |src| + 1)
    model = TableModel(scripted_table(NEVER_ENDS, 2))
    sentences = [[A] * 2, [A] * 5, [A] * 8]
    assert max_lengths(torch.tensor([2, 5, 8]), 0.5, 1) == [2, 3, 5]
    kw = {"max_len_a": 0.5, "max_len_b": 1}
    greedy = run_greedy(model, *sentences, **kw)
    beam = run_beam(model, *sentences, beam_size=3, n_best=2, length_penalty=0.0, **kw)
    for limit, g, nbest in zip([2, 3, 5], greedy, beam, strict=True):
        assert g.tokens == [A] * limit
        assert not g.finished
        # the forced EOS counts with its real probability
        assert g.log_prob == pytest.approx(limit * math.log(0.5) + math.log(1e-4), abs=1e-4)
        assert nbest[0].tokens == g.tokens
        assert nbest[0].log_prob == pytest.approx(g.log_prob, abs=1e-4)
        assert sorted(nbest[1].tokens) == [A] * (limit - 1) + [B]  # which place B takes: a tie
        assert all(not h.finished for h in nbest)


def test_zero_max_length_still_returns_a_hypothesis() -> None:
    model = TableModel(random_table(0))
    (g,) = run_greedy(model, [A], max_len_b=0)
    ((b,),) = run_beam(model, [A], beam_size=3, max_len_b=0)
    assert g.tokens == b.tokens == []
    assert not g.finished and not b.finished


def test_a_length_cap_bounds_the_output_whatever_the_length_rule_says() -> None:
    model = TableModel(scripted_table(NEVER_ENDS, 2))
    assert max_lengths(torch.tensor([2, 50]), 1.0, 10, cap=7) == [7, 7]
    assert max_lengths(torch.tensor([2]), 1.0, 1, cap=7) == [3]
    kw = {"max_len_a": 2.0, "max_len_b": 100, "max_len_cap": 4}
    (g,) = run_greedy(model, [A] * 6, **kw)
    ((b,),) = run_beam(model, [A] * 6, beam_size=3, **kw)
    assert len(g.tokens) == len(b.tokens) == 4 and not g.finished and not b.finished


@pytest.mark.parametrize("beam_size", [1, 3])
def test_should_stop_ends_the_search_between_steps(beam_size: int) -> None:
    model = TableModel(scripted_table(NEVER_ENDS, 2))
    asked: list[int] = []

    def stop_at_third_step() -> bool:
        asked.append(1)
        return len(asked) >= 3

    with pytest.raises(SearchCancelledError, match="after 2 steps"):
        run_beam(model, [A] * 6, beam_size=beam_size, max_len_b=50, should_stop=stop_at_third_step)
    assert len(asked) == 3
    with pytest.raises(SearchCancelledError):
        run_greedy(model, [A], should_stop=lambda: True)
    (g,) = run_greedy(model, [A], should_stop=lambda: False)
    assert g.tokens


def test_block_repeated_ngrams_by_hand() -> None:
    history = torch.tensor([[A, B, A], [A, B, C]])  # next after "a b a": b would repeat "a b"
    log_probs = torch.zeros(2, V)
    block_repeated_ngrams(log_probs, history, 2)
    assert log_probs[0].isinf().nonzero().flatten().tolist() == [B]
    assert not log_probs[1].isinf().any()
    unigram = torch.zeros(2, V)
    block_repeated_ngrams(unigram, history, 1)
    assert unigram[1].isinf().nonzero().flatten().tolist() == [A, B, C]
    trigram = torch.zeros(1, V)
    block_repeated_ngrams(trigram, torch.tensor([[A, B, C, A, B]]), 3)
    assert trigram[0].isinf().nonzero().flatten().tolist() == [C]


def test_no_repeat_ngram_removes_repeats() -> None:
    # the model loves "a b a b ...": a -> b, b -> a, EOS only now and then
    loop = {(0, BOS): {A: 0.9, EOS: 0.1}, (1, A): {B: 0.8, C: 0.12, EOS: 0.08}}
    loop |= {(1, B): {A: 0.8, C: 0.12, EOS: 0.08}, (1, C): {A: 0.6, EOS: 0.4}}
    model = TableModel(scripted_table(loop, 2))
    assert run_greedy(model, [A], max_len_b=8)[0].tokens == [A, B] * 4
    for n in (1, 2, 3):
        outputs = [run_greedy(model, [A], max_len_b=8, no_repeat_ngram=n)[0].tokens]
        outputs += [
            h.tokens
            for h in run_beam(model, [A], beam_size=4, n_best=4, max_len_b=8, no_repeat_ngram=n)[0]
        ]
        for tokens in outputs:
            grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
            assert len(grams) == len(set(grams)), (n, tokens)
    assert run_greedy(model, [A], max_len_b=8, no_repeat_ngram=1)[0].tokens == [A, B, C]
    assert run_greedy(model, [A], max_len_b=8, no_repeat_ngram=2)[0].tokens == [A, B, A, C, A]


def test_a_sentence_alone_decodes_as_it_does_in_a_batch() -> None:
    model = TableModel(random_table(11, keys=3, steps=6), peaked_attention=True)
    sentences = [[A, B, C, A, B], [B], [C, A, A], [A, C], [B, B, B, B, B, B, B]]
    kw = {"max_len_a": 1.0, "max_len_b": 1, "return_attention": True}
    greedy_batch = run_greedy(model, *sentences, **kw)
    beam_batch = run_beam(model, *sentences, beam_size=3, n_best=3, coverage_penalty=0.3, **kw)
    for i, sent in enumerate(sentences):
        (greedy_alone,) = run_greedy(model, sent, **kw)
        (beam_alone,) = run_beam(model, sent, beam_size=3, n_best=3, coverage_penalty=0.3, **kw)
        assert greedy_alone.tokens == greedy_batch[i].tokens
        assert greedy_alone.score == pytest.approx(greedy_batch[i].score, abs=1e-6)
        assert greedy_alone.attention is not None and greedy_batch[i].attention is not None
        assert torch.equal(greedy_alone.attention, greedy_batch[i].attention)
        assert [h.tokens for h in beam_alone] == [h.tokens for h in beam_batch[i]]
        assert [h.score for h in beam_alone] == pytest.approx(
            [h.score for h in beam_batch[i]], abs=1e-6
        )


def test_attention_of_the_chosen_hypothesis_follows_its_own_prefix() -> None:
    # peaked attention looks at source position prev_token mod |source|: row i of a
    # hypothesis must point where its own token i - 1 (BOS for row 0) says, reordering and all
    model = TableModel(random_table(5, keys=3, steps=6), peaked_attention=True)
    sentences = [[A, B, C, A, B], [C, A, A]]
    for hyps in (
        [[h] for h in run_greedy(model, *sentences, max_len_b=5, return_attention=True)],
        run_beam(model, *sentences, beam_size=4, n_best=4, max_len_b=5, return_attention=True),
    ):
        for sent, nbest in zip(sentences, hyps, strict=True):
            for h in nbest:
                assert h.attention is not None
                # one row per token and one for EOS
                assert h.attention.shape == (len(h.tokens) + 1, len(sent))
                expected = [tok % len(sent) for tok in [BOS, *h.tokens]]
                assert h.attention.argmax(dim=1).tolist() == expected
                assert torch.allclose(h.attention.sum(dim=1), torch.ones(len(h.tokens) + 1))
    assert run_beam(model, [A], beam_size=2)[0][0].attention is None


def test_finished_sentences_leave_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # limits of 1..5 words make the sentences end at different steps
    sentences = [[A] * n for n in (1, 3, 5, 2, 4)]
    always_on = scripted_table(NEVER_ENDS, 2)
    kw = {"max_len_a": 1.0, "max_len_b": 0}

    monkeypatch.setattr(nmt.search, "SHRINK_FRACTION", 0.0)  # drop every sentence at once
    model = TableModel(always_on)
    run_greedy(model, *sentences, **kw)
    assert model.batch_sizes == [5, 5, 4, 3, 2, 1]
    model = TableModel(always_on)
    run_beam(model, *sentences, beam_size=3, **kw)
    assert model.batch_sizes == [5, 15, 12, 9, 6, 3]  # the first step runs once per sentence

    # by default, in greedy search, done sentences wait until a quarter of the batch is done:
    # 1 of 5 is not enough. Beam search, whose memory is one row per sentence, drops at once.
    monkeypatch.setattr(nmt.search, "SHRINK_FRACTION", 0.25)
    model = TableModel(always_on)
    run_greedy(model, *sentences, **kw)
    assert model.batch_sizes == [5, 5, 5, 3, 2, 1]
    model = TableModel(always_on)
    run_beam(model, *sentences, beam_size=3, **kw)
    assert model.batch_sizes == [5, 15, 12, 9, 6, 3]


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_when_done_sentences_leave_does_not_change_results(
    fraction: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = TableModel(random_table(4, keys=3, steps=6))
    sentences = [[A + i % 3] * (1 + i % 5) for i in range(10)]
    kw = {"max_len_a": 1.0, "max_len_b": 2, "return_attention": True, "coverage_penalty": 0.2}
    beam_kw = {"beam_size": 3, "n_best": 3, "no_repeat_ngram": 2} | kw
    expected = run_greedy(model, *sentences, **kw), run_beam(model, *sentences, **beam_kw)
    monkeypatch.setattr(nmt.search, "SHRINK_FRACTION", fraction)
    model.batch_sizes.clear()
    got_greedy = run_greedy(model, *sentences, **kw)
    greedy_sizes = list(model.batch_sizes)
    got = got_greedy, run_beam(model, *sentences, **beam_kw)
    for a, b in zip(expected[0], got[0], strict=True):
        assert a.tokens == b.tokens and a.score == b.score and a.finished == b.finished
        assert a.attention is not None and b.attention is not None
        assert torch.equal(a.attention, b.attention)
    for nbest_a, nbest_b in zip(expected[1], got[1], strict=True):
        assert [(h.tokens, h.score, h.finished) for h in nbest_a] == [
            (h.tokens, h.score, h.finished) for h in nbest_b
        ]
    if fraction == 1.0:  # in greedy search nobody leaves before everybody is done
        assert set(greedy_sizes) == {10}


def test_early_stop_ends_a_sentence_once_nothing_can_beat_it() -> None:
    # after step 1 the best live beam (a a, p = 0.24) cannot beat [b] (p = 0.36) even at the
    # largest length penalty, so the search stops long before the limit of 20 words
    model = TableModel(scripted_table(GARDEN_PATH, 4))
    (nbest,) = run_beam(model, [A], beam_size=2, length_penalty=0.0, max_len_b=20)
    assert nbest[0].tokens == [B]
    assert model.batch_sizes == [1, 2]
    # with alpha = 1 the same hypothesis wins but the bound uses lp(21): 0.24 ** (6/26) > 0.36 ** (6/8)
    model = TableModel(scripted_table(GARDEN_PATH, 4))
    (nbest,) = run_beam(model, [A], beam_size=2, length_penalty=1.0, max_len_b=20)
    assert nbest[0].tokens == [B]
    assert len(model.batch_sizes) > 2


def test_sampling_at_zero_temperature_top_one_or_tiny_top_p_is_greedy() -> None:
    sentences = [[A + i % 3] * (1 + i % 5) for i in range(15)]
    for seed in range(3):
        model = TableModel(random_table(seed, keys=3, steps=6))
        kw = {"bos_id": BOS, "eos_id": EOS, "max_len_a": 1.0, "max_len_b": 2}
        greedy = call(greedy_search, model, *batch(*sentences), **kw)  # type: ignore[arg-type]
        for options in (
            {"temperature": 1e-4},
            {"temperature": 0.0},
            {"top_k": 1},
            {"sampling": "topp", "top_p": 1e-6},
        ):
            drawn = call(sample, model, *batch(*sentences), seed=seed, **kw, **options)  # type: ignore[arg-type]
            assert [h.tokens for h in drawn] == [h.tokens for h in greedy]
            assert [h.log_prob for h in drawn] == pytest.approx([h.log_prob for h in greedy])


def test_sampling_is_reproducible_and_reports_model_log_probs() -> None:
    model = TableModel(random_table(2, keys=1, steps=6))
    sentences = [[A, B, C]] * 40
    kw = {"bos_id": BOS, "eos_id": EOS, "max_len_a": 2.0, "max_len_b": 0}

    def draw(seed: int, **options: object) -> list[Hypothesis]:
        return call(sample, model, *batch(*sentences), seed=seed, **kw, **options)  # type: ignore[arg-type]

    for options in ({}, {"sampling": "topp", "top_p": 0.9}):
        first, again, other = draw(0, **options), draw(0, **options), draw(1, **options)
        assert [h.tokens for h in first] == [h.tokens for h in again]
        assert [h.tokens for h in first] != [h.tokens for h in other]
        assert len({tuple(h.tokens) for h in first}) > 3  # a sample, not one answer repeated
    for h in draw(0) + draw(3, temperature=0.7, top_k=2):
        assert h.log_prob == pytest.approx(model.log_prob(0, h.tokens), abs=1e-4)
        assert len(h.tokens) <= 6


def test_top_p_draws_only_from_the_nucleus() -> None:
    # step 0 after BOS: a 0.5, b 0.3, c 0.15, EOS 0.05; p = 0.7 keeps {a, b}, p = 0.85 {a, b, c}
    first = {A: 0.5, B: 0.3, C: 0.15, EOS: 0.05}
    table = scripted_table({(0, BOS): first, (1, A): {EOS: 1.0}, (1, B): {EOS: 1.0},
                            (1, C): {EOS: 1.0}}, 2)  # fmt: skip
    model = TableModel(table)
    kw = {"bos_id": BOS, "eos_id": EOS, "max_len_a": 0.0, "max_len_b": 3, "sampling": "topp"}
    for p, allowed in ((0.7, {A, B}), (0.85, {A, B, C})):
        drawn = call(sample, model, *batch(*[[A]] * 300), top_p=p, seed=0, **kw)  # type: ignore[arg-type]
        seen = {h.tokens[0] for h in drawn}
        assert seen == allowed, (p, seen)


def test_bad_arguments_are_rejected() -> None:
    model = TableModel(random_table(0))
    with pytest.raises(ValueError, match="n_best"):
        run_beam(model, [A], beam_size=2, n_best=3)
    with pytest.raises(ValueError, match="beam_size"):
        run_beam(model, [A], beam_size=0)
    with pytest.raises(ValueError, match="min_len"):
        run_greedy(model, [A], min_len=-1)
    with pytest.raises(ValueError, match="temperature"):
        call(
            sample,
            model,
            *batch([A]),
            bos_id=BOS,
            eos_id=EOS,
            max_len_a=0,
            max_len_b=3,
            temperature=-1,
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beam_size": 2, "n_best": 3}, r"n_best \(3\) cannot exceed beam_size \(2\)"),
        ({"sampling": "topk", "beam_size": 4}, "sampling draws one output per sentence"),
        ({"top_p": 0.9}, "top_p applies to sampling only"),
        ({"temperature": 0.5}, "temperature applies to sampling only"),
        ({"seed": 1}, "seed applies to sampling only"),
        ({"sampling": "topk", "beam_size": 1, "top_p": 0.5}, "top_p applies to sampling topp"),
        ({"sampling": "topp", "beam_size": 1, "top_k": 5}, "top_k applies to sampling topk"),
        ({"sampling": "topp", "beam_size": 1, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"sampling": "beam"}, "sampling must be none, topk or topp"),
        ({"max_len_cap": -1}, "max_len_cap must be >= 0"),
        ({"no_repeat_ngram": -2}, "no_repeat_ngram must be >= 0"),
    ],
)
def test_search_options_check_themselves_once(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SearchOptions(**options)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        replace(SearchOptions(), **options)  # type: ignore[arg-type]


def test_search_dispatches_on_the_options() -> None:
    assert SearchOptions(beam_size=1).mode == "greedy"
    assert SearchOptions(beam_size=2).mode == "beam"
    assert SearchOptions(beam_size=3, n_best=2).mode == "beam"
    assert SearchOptions(beam_size=1, sampling="topp", top_p=0.5).mode == "sample"


# -- target prefixes ---------------------------------------------------------------------------


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_prefix_is_forced_then_the_search_goes_on(beam_size: int) -> None:
    model = TableModel(scripted_table(GARDEN_PATH, 4))

    def best(**kw: object) -> Hypothesis:
        if beam_size == 1:
            return run_greedy(model, [A], **kw)[0]
        return run_beam(model, [A], beam_size=beam_size, length_penalty=0.0, **kw)[0][0]

    free = best()
    assert free.tokens == ([A, A] if beam_size == 1 else [B])
    for prefix in ([A], [A, B], [B, A]):
        forced = best(prefixes=[prefix])
        assert forced.tokens[: len(prefix)] == prefix
        # forced tokens keep their model log-probabilities
        assert forced.log_prob == pytest.approx(model.log_prob(0, forced.tokens), abs=1e-4)
    # after the prefix the search is free again: greedy continues [a] with a, as unforced
    assert best(prefixes=[[A]]).tokens == ([A, A] if beam_size == 1 else [A])


def test_a_prefix_overrides_min_length_blocking_and_fits_the_length_limit() -> None:
    model = TableModel(scripted_table(NEVER_ENDS, 2))
    # a prefix longer than max_len: the limit grows to hold it, and EOS comes right after
    (g,) = run_greedy(model, [A], max_len_b=1, no_repeat_ngram=1, prefixes=[[B, B, B]])
    assert g.tokens == [B, B, B] and not g.finished
    with pytest.raises(
        ValueError, match="3 subwords long, more than the maximum output length of 2"
    ):
        run_greedy(model, [A], max_len_cap=2, prefixes=[[B, B, B]])


def test_an_empty_prefix_is_normal_decoding_and_prefixes_differ_per_sentence() -> None:
    model = TableModel(random_table(5, keys=3, steps=6))
    sentences = [[A], [B, B], [C, A, B]]
    free = run_beam(model, *sentences, beam_size=3, n_best=2)
    same = run_beam(model, *sentences, beam_size=3, n_best=2, prefixes=[[], [], []])
    assert [[h.tokens for h in n] for n in free] == [[h.tokens for h in n] for n in same]
    mixed = run_beam(model, *sentences, beam_size=3, prefixes=[[], [A, B], []])
    assert mixed[0][0].tokens == free[0][0].tokens and mixed[2][0].tokens == free[2][0].tokens
    assert mixed[1][0].tokens[:2] == [A, B]


# -- ensembles -----------------------------------------------------------------------------------


def test_an_ensemble_of_one_or_of_two_copies_is_the_model_itself() -> None:
    model = real_model("luong")
    kw = {"bos_id": BOS, "eos_id": EOS, "max_len_a": 1.5, "max_len_b": 3}
    alone = call(beam_search, model, *batch(*REAL_SENTENCES), beam_size=3, n_best=2, **kw)  # type: ignore[arg-type]
    for members in ([model], [model, model]):
        together = call(
            beam_search, Ensemble(members), *batch(*REAL_SENTENCES), beam_size=3, n_best=2, **kw
        )  # type: ignore[arg-type]
        assert [[h.tokens for h in n] for n in together] == [[h.tokens for h in n] for n in alone]
        for n_a, n_b in zip(alone, together, strict=True):
            assert [h.score for h in n_b] == pytest.approx([h.score for h in n_a], abs=1e-4)


def test_an_ensemble_of_different_models_averages_their_log_probabilities() -> None:
    one, other = real_model("luong"), real_model("luong")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    ens = Ensemble([one, other])
    src, lengths, mask = batch(*REAL_SENTENCES)
    mem, state = ens.encode(src, lengths, mask)
    prev = torch.full((src.size(0),), BOS)
    out, _, _ = ens.decode_step(prev, state, mem)
    expected = []
    for m in (one, other):
        m_mem, m_state = m.encode(src, lengths, mask)
        m_out, _, _ = m.decode_step(prev, m_state, m_mem)
        expected.append(m.output_logits(m_out).log_softmax(-1))
    torch.testing.assert_close(ens.output_logits(out), torch.stack(expected).mean(0))


# ---------------------------------------------------------------------------------------------
# the real model: tiny, random weights, eval mode
# ---------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
REAL_VOCAB = 24
REAL_VARIANTS = {
    "luong": [],
    "luong-input-feeding": ["model.decoder.input_feeding=true"],
    "bahdanau": ["model.attention.type=bahdanau", "model.attention.score=additive"],
    "gnmt": ["model.attention.type=gnmt", "model.attention.score=additive"],
}
REAL_SENTENCES = [[4, 9, 12, 7, 20, 5, 11], [6], [15, 8, 23], [10, 4, 4, 17, 9], [21, 13]]


def real_model(variant: str) -> Seq2Seq:
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / "tiny.yaml", ["data.corpus=unused", *REAL_VARIANTS[variant]])
    model = build_model(cfg.model, REAL_VOCAB, REAL_VOCAB, PAD).eval()
    with torch.no_grad():  # sharper than the initial weights, so outputs differ by sentence
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("variant", REAL_VARIANTS)
def test_real_model_beam_of_one_matches_greedy(variant: str) -> None:
    model = real_model(variant)
    kw = {"bos_id": BOS, "eos_id": EOS, "max_len_a": 1.5, "max_len_b": 3}
    greedy = call(greedy_search, model, *batch(*REAL_SENTENCES), **kw)  # type: ignore[arg-type]
    beam = call(beam_search, model, *batch(*REAL_SENTENCES), beam_size=1, **kw)  # type: ignore[arg-type]
    assert [h.tokens for h in greedy] == [nbest[0].tokens for nbest in beam]
    assert [h.log_prob for h in greedy] == pytest.approx([n[0].log_prob for n in beam], abs=1e-4)
    assert sum(len(h.tokens) for h in greedy) > 10


@pytest.mark.parametrize("variant", REAL_VARIANTS)
def test_real_model_sentence_alone_decodes_as_in_a_batch(variant: str) -> None:
    model = real_model(variant)
    kw = {"bos_id": BOS, "eos_id": EOS, "max_len_a": 1.5, "max_len_b": 3, "return_attention": True}
    beam_kw = {"beam_size": 3, "n_best": 2, "coverage_penalty": 0.2} | kw
    greedy = call(greedy_search, model, *batch(*REAL_SENTENCES), **kw)  # type: ignore[arg-type]
    beam = call(beam_search, model, *batch(*REAL_SENTENCES), **beam_kw)  # type: ignore[arg-type]
    for sent, g, nbest in zip(REAL_SENTENCES, greedy, beam, strict=True):
        (alone,) = call(greedy_search, model, *batch(sent), **kw)  # type: ignore[arg-type]
        (nbest_alone,) = call(beam_search, model, *batch(sent), **beam_kw)  # type: ignore[arg-type]
        assert alone.tokens == g.tokens
        assert alone.score == pytest.approx(g.score, rel=1e-3)
        assert [h.tokens for h in nbest_alone] == [h.tokens for h in nbest]
        assert [h.score for h in nbest_alone] == pytest.approx([h.score for h in nbest], rel=1e-3)
        for h in [g, *nbest]:
            assert h.attention is not None
            assert h.attention.shape == (len(h.tokens) + 1, len(sent))
            assert torch.allclose(h.attention.sum(dim=1), torch.ones(len(h.tokens) + 1), atol=1e-5)
