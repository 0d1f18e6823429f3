"""Greedy, beam and sampling search over a step-wise decoder, batched over sentences.

One value says how to decode, `SearchOptions`, and one function decodes by it,
`search(model, batch, options)`; the CLI, validation during training and the service all go
through it (via `nmt.translate.Translator`). A target prefix per sentence (`EncodedSource.prefixes`)
is forced token by token before the search continues on its own, and an `Ensemble` of models is
one more model to search.

The search sees the model through a few calls only: ``encode``, ``decode_step``,
``output_logits``, and ``index_select`` on the memory and state it gets back (see ``StepModel``).
It works on log-probabilities, lengths and EOS, never on text. A model whose softmax covers part
of the vocabulary (``output_ids``) is searched over its logit columns, and the hypotheses come
back as token ids.

Lengths: a sentence may produce at most ``max_len = floor(a * |source| + b)`` tokens (EOS not
counted). A hypothesis still open after ``max_len`` tokens gets EOS forced, keeps its tokens and
comes back with ``finished=False``; nothing is truncated silently or dropped. ``|Y|`` in the length
penalty counts EOS, so a hypothesis of ``n`` tokens has ``|Y| = n + 1``.

Batching: all sentences decode together; beam search flattens (sentences x beams) into one batch
dimension N = B * K of decoder states, keeps the encoder memory one row per sentence (the K beam
rows of a sentence read the same row) and takes the first step, the same for every beam, once
per sentence. A sentence that is done leaves the batch, so later steps compute less: in beam
search at once; in greedy search, where dropping rows copies a larger share of the work, once
a share (`SHRINK_FRACTION`) of the batch is done. Per step, the work outside the model is one
log-softmax and one top-k over (N, V), block by block (`PROJECTION_ROWS`), and a handful of small
tensor ops; Python touches single hypotheses only when they end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

# the options and length rules live in a torch-free module (the ONNX runtime uses them too)
from nmt.search_options import SearchOptions, length_penalty_factor, max_length

NEG_INF = float("-inf")
_COVERAGE_EPS = 1e-10  # keeps log() finite on source words that got no attention at all

_Self = TypeVar("_Self", bound="Reorderable")


class Reorderable(Protocol):
    """Encoder memory or decoder state: anything whose batch rows can be picked by index."""

    def index_select(self: _Self, idx: Tensor, /) -> _Self: ...


MemoryT = TypeVar("MemoryT", bound=Reorderable)
StateT = TypeVar("StateT", bound=Reorderable)


class StepModel(Protocol[MemoryT, StateT]):
    """What search needs from a model: encode once, then one decoder step at a time, its
    output vectors (N, H) projected to logits (N', V) on any block of rows.

    `decode_step` gets G >= 1 rows of state per memory row, the G rows of a memory row next to
    each other (the beams of a sentence in beam search; G = 1 in greedy search). A model whose
    logits cover part of the vocabulary also has `output_ids`, the token id of each column."""

    def encode(
        self, src: Tensor, src_lengths: Tensor, src_mask: Tensor, /
    ) -> tuple[MemoryT, StateT]: ...

    def decode_step(
        self, prev_tokens: Tensor, state: StateT, memory: MemoryT, /
    ) -> tuple[Tensor, StateT, Tensor]: ...

    def output_logits(self, out: Tensor, /) -> Tensor: ...


@dataclass
class Hypothesis:
    """One output sentence.

    tokens: ids without BOS or EOS. score: log_prob after GNMT length and coverage penalties
    (the ranking key). log_prob: model log-probability of tokens + EOS. attention: (T + 1, S)
    weights over the S real source tokens, one row per token of tokens + EOS, when asked for.
    finished: False when the hypothesis hit the maximum length and EOS was forced.
    """

    tokens: list[int]
    score: float
    log_prob: float
    attention: Tensor | None = None
    finished: bool = True


class EncodedSource(NamedTuple):
    """A padded batch of source sentences as search gets it, with the special ids it needs and
    optional target prefixes to force (token ids, one list per sentence, [] for none)."""

    src: Tensor  # (B, S) long
    src_lengths: Tensor  # (B,) long
    src_mask: Tensor  # (B, S) bool, True on real tokens
    bos_id: int
    eos_id: int
    prefixes: list[list[int]] | None = None
    # stable ids of the sentences (e.g. line numbers): with a sampling seed, each sentence draws
    # from its own random stream, so its sample does not depend on the batch it is in
    keys: list[int] | None = None


def coverage_penalty_value(coverage: Tensor, src_mask: Tensor, beta: float) -> Tensor:
    """GNMT coverage penalty beta * sum_i log(min(sum_j a_ij, 1)) (Wu et al., 2016, eq. 14).

    Args:
        coverage: (N, S) attention summed over the output steps.
        src_mask: (N, S) True on real source tokens; padding does not count.
    Returns:
        (N,) penalties, <= 0.
    """
    logs = coverage.clamp(min=_COVERAGE_EPS, max=1.0).log().masked_fill(~src_mask, 0.0)
    return beta * logs.sum(dim=1)


def max_lengths(
    src_lengths: Tensor, max_len_a: float, max_len_b: float, cap: int | None = None
) -> list[int]:
    """Per-sentence output limits floor(a * |source| + b), at least 0 and at most `cap` (a hard
    bound whatever a and b say, e.g. a server's). src_lengths (B,)."""
    if max_len_a < 0:
        raise ValueError(f"max_len_a must be >= 0, got {max_len_a}")
    if cap is not None and cap < 0:
        raise ValueError(f"max_len_cap must be >= 0, got {cap}")
    return [max_length(n, max_len_a, max_len_b, cap) for n in src_lengths.tolist()]


def output_limits(batch: EncodedSource, options: SearchOptions) -> list[int]:
    """Per-sentence output limits: the length rule, at least the sentence's target prefix, at
    most the cap. Raises ValueError for a prefix longer than the cap."""
    limits = max_lengths(batch.src_lengths, options.max_len_a, options.max_len_b)
    if batch.prefixes is not None:
        for i, prefix in enumerate(batch.prefixes):
            if options.max_len_cap is not None and len(prefix) > options.max_len_cap:
                raise ValueError(
                    f"target prefix {i} is {len(prefix)} subwords long, more than the "
                    f"maximum output length of {options.max_len_cap}"
                )
            limits[i] = max(limits[i], len(prefix))
    cap = options.max_len_cap
    return limits if cap is None else [min(n, cap) for n in limits]


class SearchCancelledError(Exception):
    """`should_stop` said so between two decoding steps: nobody waits for this search any more."""


def _check_stop(should_stop: Callable[[], bool] | None, t: int) -> None:
    if should_stop is not None and should_stop():
        raise SearchCancelledError(f"search cancelled after {t} steps")


def block_repeated_ngrams(log_probs: Tensor, history: Tensor, n: int) -> None:
    """Set -inf, in place, on every token that would repeat an n-gram already in history.

    Args:
        log_probs: (N, V) next-token scores, changed in place.
        history: (N, t) tokens produced so far (no BOS).
        n: n-gram order; 1 forbids repeating any token.
    """
    t = history.size(1)
    if n == 1:
        if t == 0:
            return
        banned, hits = history, torch.ones_like(history, dtype=log_probs.dtype)
    else:
        if t < n:
            return
        windows = history.unfold(1, n - 1, 1)  # (N, t - n + 2, n - 1)
        # earlier (n-1)-grams that equal the last one; the token after each is banned
        hits = (windows[:, :-1] == windows[:, -1:]).all(dim=2).to(log_probs.dtype)  # (N, t-n+1)
        banned = history[:, n - 1 :]  # (N, t - n + 1)
    counts = torch.zeros_like(log_probs).scatter_add_(1, banned, hits)  # (N, V)
    log_probs.masked_fill_(counts > 0, NEG_INF)


def _mask_step(
    log_probs: Tensor,
    history: Tensor,
    t: int,
    force_eos: Tensor | None,
    forced: Tensor | None,
    *,
    eos_id: int,
    min_len: int,
    no_repeat_ngram: int,
) -> None:
    """Apply min length, n-gram blocking, forced EOS and forced prefix tokens to log_probs (N, V)
    in place.

    force_eos: (N,) bool rows that reached their maximum length, or None when none did.
    forced: (N,) long, the column each row must take (a target prefix), -1 where free; or None.
    """
    eos_raw = log_probs[:, eos_id].clone() if force_eos is not None else None
    forced_raw = None
    if forced is not None:
        forced_cols = forced.clamp(min=0).unsqueeze(1)  # (N, 1)
        forced_raw = log_probs.gather(1, forced_cols)
    if t < min_len:
        log_probs[:, eos_id] = NEG_INF
    if no_repeat_ngram > 0:
        block_repeated_ngrams(log_probs, history, no_repeat_ngram)
    if force_eos is not None and eos_raw is not None:
        # the forced EOS keeps its real log-probability, so truncated and finished hypotheses
        # are ranked on the same footing
        log_probs.masked_fill_(force_eos.unsqueeze(1), NEG_INF)
        log_probs[:, eos_id] = torch.where(force_eos, eos_raw, log_probs[:, eos_id])
    if forced is not None and forced_raw is not None:
        # a prefix token is taken whatever the rules above say, with its real log-probability
        rows = (forced >= 0).unsqueeze(1)  # (N, 1)
        kept = torch.where(rows, forced_raw, log_probs.gather(1, forced_cols))
        log_probs.masked_fill_(rows, NEG_INF)
        log_probs.scatter_(1, forced_cols, kept)


# The output projection, log-softmax, masks and top-k run over blocks of this many rows: a block's
# logits stay in cache from the matmul to the top-k, and no step allocates an (N, V) tensor.
# Fresh allocations that large cost page faults at every step; over the Bible test set, beam 5
# decodes faster block-wise than over whole (N, V) matrices (BENCHMARKS.md, "Decoding").
PROJECTION_ROWS = 128


def _log_prob_blocks(
    model: StepModel[MemoryT, StateT],
    out: Tensor,
    history: Tensor,
    t: int,
    force_eos: Tensor | None,
    forced: Tensor | None,
    *,
    eos_id: int,
    min_len: int,
    no_repeat_ngram: int,
) -> Iterator[Tensor]:
    """Masked fp32 next-token log-probabilities (R, V) for consecutive blocks of out (N, H).

    history (N, t), force_eos (N,) and forced (N,) are sliced along with the rows (see
    `_mask_step`).
    """
    for start in range(0, out.size(0), PROJECTION_ROWS):
        rows = slice(start, start + PROJECTION_ROWS)
        log_probs = model.output_logits(out[rows]).log_softmax(dim=-1, dtype=torch.float32)
        _mask_step(
            log_probs,
            history[rows],
            t,
            None if force_eos is None else force_eos[rows],
            None if forced is None else forced[rows],
            eos_id=eos_id,
            min_len=min_len,
            no_repeat_ngram=no_repeat_ngram,
        )
        yield log_probs


class _Columns:
    """Logit columns and token ids. A model may score only part of the vocabulary (its
    `output_ids`, the token id of each logit column, e.g. the tokens of the target side of the
    training data); search then runs in column space and turns columns into token ids for the
    next step's input and for the hypotheses it returns."""

    def __init__(self, model: object, eos_id: int) -> None:
        ids = getattr(model, "output_ids", None)
        self.ids: Tensor | None = ids
        self.id_list: list[int] | None = None
        self.eos = eos_id
        if ids is not None:
            hits = (ids == eos_id).nonzero()
            if hits.numel() != 1:
                raise ValueError(f"EOS (id {eos_id}) is not one of the model's output tokens")
            self.eos = int(hits[0, 0])
            self.id_list = ids.tolist()

    def to_ids(self, cols: Tensor) -> Tensor:
        """Token ids of columns cols (any shape)."""
        return cols if self.ids is None else self.ids[cols]

    def to_id_list(self, cols: list[int]) -> list[int]:
        return cols if self.id_list is None else [self.id_list[c] for c in cols]

    def prefix_table(self, prefixes: list[list[int]], device: torch.device) -> Tensor:
        """(B, P) columns of each sentence's prefix tokens, -1 after its end. A token the model
        cannot output (outside its output vocabulary) raises ValueError."""
        width = max((len(p) for p in prefixes), default=0)
        table = torch.full((len(prefixes), width), -1, dtype=torch.long)
        column = None if self.id_list is None else {t: c for c, t in enumerate(self.id_list)}
        for i, prefix in enumerate(prefixes):
            for j, token in enumerate(prefix):
                col = token if column is None else column.get(token)
                if col is None:
                    raise ValueError(
                        f"target prefix {i}: subword id {token} is not in the model's output "
                        "vocabulary, so it cannot be forced"
                    )
                table[i, j] = col
        return table.to(device)


def _forced_at(table: Tensor | None, t: int) -> Tensor | None:
    """The columns rows must take at step t (-1: free), or None once every prefix has ended."""
    if table is None or t >= table.size(1):
        return None
    return table[:, t]


# In greedy search, sentences that are done stay in the batch, their rows computed and ignored,
# until this share of the rows is done: dropping rows copies the encoder memory of all the rows
# that stay, which costs more than a few idle rows do.
SHRINK_FRACTION = 0.25


def _worth_shrinking(n_done: int, n: int) -> bool:
    return n_done >= SHRINK_FRACTION * n


def _trim_attention(attn: Tensor, src_len: int) -> Tensor:
    """(T, S_padded) -> (T, src_len) on CPU, detached from the search buffers."""
    return attn[:, :src_len].float().cpu().clone()


# ---------------------------------------------------------------------------------------------
# greedy search and sampling: one hypothesis per sentence
# ---------------------------------------------------------------------------------------------


class _OneEach:
    """Greedy search or sampling: one token per sentence per step, picked by
    `choose(log_probs (R, V), sentence ids of the R rows) -> tokens (R,)` on blocks of rows.
    Tensors cover the N sentences still in the batch."""

    def __init__(self, choose: Chooser, options: SearchOptions) -> None:
        self.choose = choose
        self.min_len = options.min_len
        self.no_repeat_ngram = options.no_repeat_ngram
        self.alpha = options.length_penalty
        self.beta = options.coverage_penalty
        self.return_attention = options.return_attention

    def run(
        self,
        model: StepModel[MemoryT, StateT],
        batch: EncodedSource,
        limits: list[int],
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[list[int], Tensor], None] | None = None,
    ) -> list[Hypothesis]:
        src, src_lengths, src_mask = batch.src, batch.src_lengths, batch.src_mask
        device, batch_size = src.device, src.size(0)
        if batch_size == 0:
            return []
        self.limits = limits
        self.src_lens: list[int] = src_lengths.tolist()
        self.src_mask = src_mask
        self.results: list[Hypothesis | None] = [None] * batch_size

        memory, state = model.encode(src, src_lengths, src_mask)
        self.cols = _Columns(model, batch.eos_id)
        self.prefix = (
            self.cols.prefix_table(batch.prefixes, device) if batch.prefixes is not None else None
        )  # (N, P) columns to force
        self.active_ids = list(range(batch_size))
        self.active = torch.arange(batch_size, device=device)  # (N,) sentence ids
        self.limit_t = torch.tensor(limits, device=device)  # (N,)
        self.idle = torch.zeros(batch_size, dtype=torch.bool, device=device)  # done, not dropped
        self.history = torch.zeros((batch_size, 0), dtype=torch.long, device=device)  # (N, t)
        self.log_prob_sum = torch.zeros(batch_size, device=device)  # (N,)
        self.coverage = torch.zeros(src_mask.shape, device=device) if self.beta != 0 else None
        # preallocated for the longest output allowed: written in place, one row per step
        self.attn_history = (
            torch.zeros((batch_size, max(limits) + 1, src.size(1)), device=device)
            if self.return_attention
            else None
        )  # (N, T_max + 1, S)
        prev = torch.full((batch_size,), batch.bos_id, dtype=torch.long, device=device)

        t, n_idle, soonest_limit = 0, 0, min(limits)
        while True:
            _check_stop(should_stop, t)
            out, state, attn = model.decode_step(prev, state, memory)  # (N, H), (N, S)
            tokens = self._advance(model, out, attn.float(), t, soonest_limit)  # columns
            prev = self.cols.to_ids(tokens)
            if on_step is not None:
                on_step(self.active_ids, torch.where(self.idle, -1, prev))
            ended = (tokens == self.cols.eos) & ~self.idle  # (N,); forced rows can only pick EOS
            if ended.any():
                rows = ended.nonzero().squeeze(1)
                self._finalise(rows, t)
                self.idle = self.idle | ended
                n_idle += rows.numel()
                if n_idle == len(self.active_ids):
                    break
                if _worth_shrinking(n_idle, len(self.active_ids)):
                    keep = (~self.idle).nonzero().squeeze(1)  # (N',)
                    memory = memory.index_select(keep)
                    state = state.index_select(keep)
                    prev = prev.index_select(0, keep)
                    self._shrink(keep)
                    n_idle = 0
                soonest_limit = min(
                    limits[sid]
                    for sid, idle in zip(self.active_ids, self.idle.tolist(), strict=True)
                    if not idle
                )
            t += 1

        assert all(r is not None for r in self.results)
        return [r for r in self.results if r is not None]

    def _advance(
        self, model: StepModel[MemoryT, StateT], out: Tensor, attn: Tensor, t: int, limit: int
    ) -> Tensor:
        """Pick the next tokens (N,) from the output vectors out (N, H); attn (N, S) is this
        step's attention; limit is the soonest maximum length of a sentence still going."""
        picked, picked_log_probs = [], []
        start = 0
        for log_probs in _log_prob_blocks(
            model,
            out,
            self.history,
            t,
            (self.limit_t <= t) if t >= limit else None,
            _forced_at(self.prefix, t),
            eos_id=self.cols.eos,
            min_len=self.min_len,
            no_repeat_ngram=self.no_repeat_ngram,
        ):
            tokens = self.choose(log_probs, self.active_ids[start : start + log_probs.size(0)])
            start += log_probs.size(0)
            picked.append(tokens)
            picked_log_probs.append(log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1))
        tokens = torch.cat(picked)  # (N,)
        self.log_prob_sum += torch.cat(picked_log_probs)
        self.history = torch.cat([self.history, tokens.unsqueeze(1)], dim=1)
        if self.coverage is not None:
            self.coverage += attn
        if self.attn_history is not None:
            self.attn_history[:, t] = attn
        return tokens

    def _finalise(self, rows: Tensor, t: int) -> None:
        """Store the hypotheses of rows (M,) that chose EOS at step t."""
        if self.coverage is not None:
            mask = self.src_mask.index_select(0, self.active.index_select(0, rows))
            penalties = coverage_penalty_value(self.coverage.index_select(0, rows), mask, self.beta)
        else:
            penalties = torch.zeros(rows.numel())
        lp = length_penalty_factor(t + 1, self.alpha)
        for row, toks, total, pen in zip(
            rows.tolist(),
            self.history[rows, :t].tolist(),
            self.log_prob_sum[rows].tolist(),
            penalties.tolist(),
            strict=True,
        ):
            sid = self.active_ids[row]
            attention = None
            if self.attn_history is not None:
                attention = _trim_attention(self.attn_history[row, : t + 1], self.src_lens[sid])
            self.results[sid] = Hypothesis(
                tokens=self.cols.to_id_list(toks),
                score=total / lp + pen,
                log_prob=total,
                attention=attention,
                finished=t < self.limits[sid],
            )

    def _shrink(self, keep: Tensor) -> None:
        """Drop the sentences that are done; keep (N',) the rows that stay."""
        self.active_ids = [self.active_ids[i] for i in keep.tolist()]
        self.active = self.active.index_select(0, keep)
        self.limit_t = self.limit_t.index_select(0, keep)
        self.idle = self.idle.index_select(0, keep)
        self.history = self.history.index_select(0, keep)
        self.log_prob_sum = self.log_prob_sum.index_select(0, keep)
        if self.prefix is not None:
            self.prefix = self.prefix.index_select(0, keep)
        if self.coverage is not None:
            self.coverage = self.coverage.index_select(0, keep)
        if self.attn_history is not None:
            self.attn_history = self.attn_history.index_select(0, keep)


StepCallback = Callable[[list[int], Tensor], None]
"""Called after every step of greedy search or sampling with the sentence ids of the rows and
the token ids (N,) they took (-1 for rows already done)."""


def greedy_search(
    model: StepModel[MemoryT, StateT],
    batch: EncodedSource,
    options: SearchOptions,
    *,
    should_stop: Callable[[], bool] | None = None,
    on_step: StepCallback | None = None,
) -> list[Hypothesis]:
    """Pick the most likely token at every step, for all sentences at once (beam_size and
    n_best are not read; the penalties change `score` only).

    Returns one hypothesis per sentence, in input order; `should_stop` is asked between steps
    and True raises SearchCancelledError.
    """
    runner = _OneEach(lambda log_probs, _: log_probs.argmax(dim=-1), options)
    with torch.no_grad():  # not inference_mode: keeps the autocast weight cache
        return runner.run(model, batch, output_limits(batch, options), should_stop, on_step)


Chooser = Callable[[Tensor, list[int]], Tensor]
"""choose(log_probs (R, V), the sentence ids of the R rows) -> the tokens (R,) they take."""


def _sampler(options: SearchOptions, batch: EncodedSource) -> Chooser:
    """A Chooser that draws as the options say; with a seed, every sentence from its own
    generator, seeded from the seed and the sentence's key."""
    temperature = options.temperature
    keys = batch.keys if batch.keys is not None else list(range(batch.src.size(0)))
    generators: dict[int, torch.Generator] = {}

    def generator(sid: int) -> torch.Generator:
        if sid not in generators:
            assert options.seed is not None
            seed = (options.seed * 2_654_435_761 + keys[sid] * 40_503 + 1) % 2**63
            generators[sid] = torch.Generator(device=batch.src.device).manual_seed(seed)
        return generators[sid]

    def draw(probs: Tensor, sids: list[int]) -> Tensor:  # (R, V') -> (R,) column indices
        if options.seed is None:
            return torch.multinomial(probs, 1).squeeze(1)
        return torch.cat(
            [
                torch.multinomial(p, 1, generator=generator(sid))
                for p, sid in zip(probs, sids, strict=True)
            ]
        )

    def choose(log_probs: Tensor, sids: list[int]) -> Tensor:
        if temperature == 0.0:
            return log_probs.argmax(dim=-1)
        scaled = log_probs / temperature
        if options.sampling == "topk" and options.top_k > 0:
            top_scores, top_ids = scaled.topk(min(options.top_k, scaled.size(1)), dim=-1)
            picked = draw(top_scores.softmax(dim=-1), sids)
            return top_ids.gather(1, picked.unsqueeze(1)).squeeze(1)
        if options.sampling == "topp" and options.top_p < 1.0:
            probs, ids = scaled.softmax(dim=-1).sort(dim=-1, descending=True)  # (R, V)
            # keep the most likely tokens until their mass reaches top_p (the first always)
            outside = probs.cumsum(dim=-1) - probs >= options.top_p
            picked = draw(probs.masked_fill(outside, 0.0), sids)
            return ids.gather(1, picked.unsqueeze(1)).squeeze(1)
        return draw(scaled.softmax(dim=-1), sids)

    return choose


def sample(
    model: StepModel[MemoryT, StateT],
    batch: EncodedSource,
    options: SearchOptions,
    *,
    should_stop: Callable[[], bool] | None = None,
    on_step: StepCallback | None = None,
) -> list[Hypothesis]:
    """Draw one output per sentence from the model (back-translation, data augmentation).

    Tokens are drawn as `options.sampling` says; `log_prob` and `score` are the model's own
    (untempered) log-probability of the drawn output. With `options.seed`, a sentence's sample
    depends only on the seed, the sentence and its key (`EncodedSource.keys`, by default its
    place in the batch), not on the other sentences of the batch.
    """
    runner = _OneEach(_sampler(options, batch), options)
    with torch.no_grad():  # not inference_mode: keeps the autocast weight cache
        return runner.run(model, batch, output_limits(batch, options), should_stop, on_step)


# ---------------------------------------------------------------------------------------------
# beam search
# ---------------------------------------------------------------------------------------------


def beam_search(
    model: StepModel[MemoryT, StateT],
    batch: EncodedSource,
    options: SearchOptions,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> list[list[Hypothesis]]:
    """Beam search for all sentences at once, beams flattened into the batch (B * K).

    Live beams are ranked by log-probability (they all have the same length). A hypothesis that
    ends is scored log_prob / lp(|Y|) + cp (GNMT, Wu et al., 2016, eq. 14) and kept aside. A
    sentence is done when no live beam can still beat its n_best-th ended one (bounded with the
    largest length penalty it could reach and a coverage penalty of 0); once beam_size have
    ended, also when the best live beam would not beat the best ended one even if it ended at
    the next step (exact, too, when length_penalty is 0); or at its maximum length, where EOS
    is forced. So the 1-best does not depend on n_best, and with length_penalty 0 a beam of one
    gives greedy search's output.

    Returns per sentence, in input order, its n-best list sorted by score, best first;
    `should_stop` is asked between steps and True raises SearchCancelledError.
    """
    with torch.no_grad():  # not inference_mode: keeps the autocast weight cache
        return _BeamSearch(options).run(model, batch, output_limits(batch, options), should_stop)


class _BeamSearch:
    """The state of one beam search call; tensors cover the N = n * K rows of live sentences."""

    def __init__(self, options: SearchOptions) -> None:
        self.k = options.beam_size
        self.n_best = options.n_best
        self.alpha = options.length_penalty
        self.beta = options.coverage_penalty
        self.min_len = options.min_len
        self.no_repeat_ngram = options.no_repeat_ngram
        self.return_attention = options.return_attention

    def run(
        self,
        model: StepModel[MemoryT, StateT],
        batch: EncodedSource,
        limits: list[int],
        should_stop: Callable[[], bool] | None = None,
    ) -> list[list[Hypothesis]]:
        src, src_lengths, src_mask = batch.src, batch.src_lengths, batch.src_mask
        k, device = self.k, src.device
        batch_size = src.size(0)
        if batch_size == 0:
            return []
        self.limits = limits
        self.src_lens: list[int] = src_lengths.tolist()
        self.src_mask = src_mask
        self.ended: list[list[Hypothesis]] = [[] for _ in range(batch_size)]

        memory, state = model.encode(src, src_lengths, src_mask)
        self.cols = _Columns(model, batch.eos_id)
        self.prefix = (
            self.cols.prefix_table(batch.prefixes, device).repeat_interleave(k, dim=0)
            if batch.prefixes is not None
            else None
        )  # (N, P): every beam of a sentence forces its prefix
        # the first step is the same for every beam: take it once per sentence, then copy
        bos = torch.full((batch_size,), batch.bos_id, dtype=torch.long, device=device)
        out, state, attn = model.decode_step(bos, state, memory)  # (B, H), (B, S)
        # the memory stays one row per sentence: the model reads it for each of the K beam rows
        per_beam = torch.arange(batch_size, device=device).repeat_interleave(k)  # (B*K,)
        state = state.index_select(per_beam)
        out, attn = out.index_select(0, per_beam), attn.index_select(0, per_beam)

        # per live sentence (n,)
        self.active_ids = list(range(batch_size))
        self.active = torch.arange(batch_size, device=device)
        self.limit_t = torch.tensor(limits, device=device)
        self.lp_at_limit = torch.tensor(
            [length_penalty_factor(m + 1, self.alpha) for m in limits], device=device
        )
        self.n_ended = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.nbest_floor = torch.full((batch_size,), NEG_INF, device=device)
        self.best_ended = torch.full((batch_size,), NEG_INF, device=device)
        # per live beam: (n, K) log-probs; only beam 0 is live at first, so that the K copies
        # of the start state do not produce K identical candidates
        self.scores = torch.full((batch_size, k), NEG_INF, device=device)
        self.scores[:, 0] = 0.0
        self.history = torch.zeros((batch_size * k, 0), dtype=torch.long, device=device)
        self.coverage = (
            torch.zeros((batch_size * k, src.size(1)), device=device) if self.beta != 0 else None
        )
        # preallocated for the longest output allowed; rows follow the beams' reordering
        self.attn_history = (
            torch.zeros((batch_size * k, max(limits) + 1, src.size(1)), device=device)
            if self.return_attention
            else None
        )  # (N, T_max + 1, S)
        self.offsets = torch.arange(batch_size, device=device).unsqueeze(1) * k  # (B, 1)

        t = 0
        soonest_limit = min(limits)
        while True:
            _check_stop(should_stop, t)
            prev, reorder = self._advance(model, out, attn.float(), t, soonest_limit)
            done = self._done(t)  # (n,)
            if bool(done.any()):
                # a done sentence leaves at once: its memory is one row, its state K rows
                # that the reordering below skips
                keep = (~done).nonzero().squeeze(1)  # (n',) sentences that go on
                if keep.numel() == 0:
                    break
                rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
                memory = memory.index_select(keep)
                reorder, prev = reorder.index_select(0, rows), prev.index_select(0, rows)
                self._shrink(keep, rows)
                soonest_limit = min(limits[sid] for sid in self.active_ids)
            state = state.index_select(reorder)
            t += 1
            out, state, attn = model.decode_step(self.cols.to_ids(prev), state, memory)

        return [self._best(i) for i in range(batch_size)]

    def _advance(
        self, model: StepModel[MemoryT, StateT], out: Tensor, attn: Tensor, t: int, limit: int
    ) -> tuple[Tensor, Tensor]:
        """One step: score K * V candidates per sentence, set aside the ones that end,
        keep the K best that go on. out (N, H) output vectors, attn (N, S); limit is the
        soonest maximum length of a sentence still going.

        Returns the next input tokens (N,) and the rows (N,) to reorder the state by."""
        k = self.k
        n = self.scores.size(0)
        force = (self.limit_t <= t).repeat_interleave(k) if t >= limit else None  # (N,)
        coverage = self.coverage + attn if self.coverage is not None else None  # (N, S)

        # Only a beam's K + 1 best tokens can matter: K of them that go on beat any other
        # token of that beam, and the K + 1 best hold at most one EOS. So take those per row,
        # then the best 2K of the K * (K + 1) per sentence: 2K always hold K that go on.
        best = [
            log_probs.topk(min(k + 1, log_probs.size(1)), dim=1)
            for log_probs in _log_prob_blocks(
                model,
                out,
                self.history,
                t,
                force,
                _forced_at(self.prefix, t),
                eos_id=self.cols.eos,
                min_len=self.min_len,
                no_repeat_ngram=self.no_repeat_ngram,
            )
        ]
        row_scores = torch.cat([b.values for b in best])  # (N, K+1)
        row_tokens = torch.cat([b.indices for b in best])  # (N, K+1)
        per_row = row_scores.size(1)
        cand = (self.scores.view(-1, 1) + row_scores).view(n, k * per_row)  # (n, K*(K+1))
        cand_scores, cand_idx = cand.topk(min(2 * k, k * per_row), dim=1)  # (n, 2K), best first
        cand_beams = cand_idx.div(per_row, rounding_mode="floor")
        cand_tokens = row_tokens.view(n, k * per_row).gather(1, cand_idx)
        is_eos = cand_tokens == self.cols.eos  # (n, 2K)

        # an EOS among the K best ends a hypothesis (Wu et al., 2016; as in fairseq)
        ends = is_eos[:, :k] & (cand_scores[:, :k] > NEG_INF)  # (n, K)
        # attention of every step so far, this one (maybe EOS) included: (N, t + 1, S)
        attn_history = None
        if self.attn_history is not None:
            self.attn_history[:, t] = attn
            attn_history = self.attn_history[:, : t + 1]
        if ends.any():
            self._finalise(ends, cand_scores, cand_beams, coverage, attn_history, t)

        # the K best candidates that do not end, in score order
        n_cand = cand_scores.size(1)
        order_key = is_eos.long() * n_cand + torch.arange(n_cand, device=cand_scores.device)
        live = order_key.topk(k, dim=1, largest=False).indices  # (n, K), ascending
        self.scores = cand_scores.gather(1, live)
        tokens = cand_tokens.gather(1, live).view(-1)  # (N,)
        reorder = (self.offsets[:n] + cand_beams.gather(1, live)).view(-1)  # (N,)

        self.history = torch.cat(
            [self.history.index_select(0, reorder), tokens.unsqueeze(1)], dim=1
        )
        if coverage is not None:
            self.coverage = coverage.index_select(0, reorder)
        if attn_history is not None:
            attn_history.copy_(attn_history.index_select(0, reorder))
        return tokens, reorder

    def _finalise(
        self,
        ends: Tensor,
        cand_scores: Tensor,
        cand_beams: Tensor,
        coverage: Tensor | None,
        attn_history: Tensor | None,
        t: int,
    ) -> None:
        """Move the ending candidates ends (n, K) into the per-sentence lists of ended ones."""
        sent, pos = ends.nonzero(as_tuple=True)  # (M,), (M,)
        rows = sent * self.k + cand_beams[sent, pos]  # (M,) rows before reordering
        log_probs = cand_scores[sent, pos]
        if coverage is not None:
            mask = self.src_mask.index_select(0, self.active.index_select(0, sent))
            penalties = coverage_penalty_value(coverage.index_select(0, rows), mask, self.beta)
        else:
            penalties = torch.zeros_like(log_probs)
        lp = length_penalty_factor(t + 1, self.alpha)
        touched: dict[int, int] = {}
        for s, row, toks, total, pen in zip(
            sent.tolist(),
            rows.tolist(),
            self.history.index_select(0, rows).tolist(),
            log_probs.tolist(),
            penalties.tolist(),
            strict=True,
        ):
            sid = self.active_ids[s]
            attention = None
            if attn_history is not None:
                attention = _trim_attention(attn_history[row], self.src_lens[sid])
            self.ended[sid].append(
                Hypothesis(
                    tokens=self.cols.to_id_list(toks),
                    score=total / lp + pen,
                    log_prob=total,
                    attention=attention,
                    finished=t < self.limits[sid],
                )
            )
            touched[s] = sid
        idx, counts, floors, bests = [], [], [], []
        for s, sid in touched.items():
            hyps = self.ended[sid]
            hyps.sort(key=lambda h: h.score, reverse=True)
            idx.append(s)
            counts.append(len(hyps))
            floors.append(hyps[self.n_best - 1].score if len(hyps) >= self.n_best else NEG_INF)
            bests.append(hyps[0].score)
        where = torch.tensor(idx, device=self.n_ended.device)
        self.n_ended[where] = torch.tensor(counts, device=where.device)
        self.nbest_floor[where] = torch.tensor(floors, device=where.device)
        self.best_ended[where] = torch.tensor(bests, device=where.device)

    def _done(self, t: int) -> Tensor:
        """(n,) bool: sentences whose n-best list is final after step t."""
        # live beams now hold t + 1 tokens; their |Y| will lie in [t + 2, limit + 1]; log-probs
        # only fall, a coverage penalty is <= 0, so this bounds any score they can still reach
        lp_next = length_penalty_factor(t + 2, self.alpha)
        best_live = self.scores[:, 0]  # (n,)
        beaten = best_live / self.lp_at_limit.clamp(min=lp_next) <= self.nbest_floor
        # once K have ended, also stop when the best live beam would not beat the best ended one
        # even if it ended at the next step. With alpha = 0 this is exact too. It does not
        # depend on n_best, so neither does the 1-best: an n-best list starts with the 1-best.
        heuristic = (self.n_ended >= self.k) & (best_live / lp_next <= self.best_ended)
        return beaten | heuristic | (self.limit_t <= t)

    def _shrink(self, keep: Tensor, rows: Tensor) -> None:
        """Drop finished sentences: keep (n',) sentence positions, rows (n' * K,) beam rows."""
        self.active_ids = [self.active_ids[i] for i in keep.tolist()]
        self.active = self.active.index_select(0, keep)
        self.limit_t = self.limit_t.index_select(0, keep)
        self.lp_at_limit = self.lp_at_limit.index_select(0, keep)
        self.n_ended = self.n_ended.index_select(0, keep)
        self.nbest_floor = self.nbest_floor.index_select(0, keep)
        self.best_ended = self.best_ended.index_select(0, keep)
        self.scores = self.scores.index_select(0, keep)
        self.history = self.history.index_select(0, rows)
        if self.prefix is not None:
            self.prefix = self.prefix.index_select(0, rows)
        if self.coverage is not None:
            self.coverage = self.coverage.index_select(0, rows)
        if self.attn_history is not None:
            self.attn_history = self.attn_history.index_select(0, rows)

    def _best(self, sid: int) -> list[Hypothesis]:
        hyps = sorted(self.ended[sid], key=lambda h: h.score, reverse=True)[: self.n_best]
        if not hyps:
            # every continuation was blocked (tiny vocabulary with min_len / n-gram blocking):
            # say so rather than return nothing
            hyps = [Hypothesis(tokens=[], score=NEG_INF, log_prob=NEG_INF, finished=False)]
        return hyps


def search(
    model: StepModel[MemoryT, StateT],
    batch: EncodedSource,
    options: SearchOptions,
    *,
    should_stop: Callable[[], bool] | None = None,
    on_step: StepCallback | None = None,
) -> list[list[Hypothesis]]:
    """Decodes `batch` as `options` say: sampling, greedy search (one beam, one output: the same
    output as a beam of one with length_penalty 0, for less work) or beam search.

    Returns per sentence, in input order, its n-best list, best first. `on_step` (greedy search
    and sampling only) sees the tokens of every step as they are chosen.
    """
    if options.mode == "beam":
        if on_step is not None:
            raise ValueError("token-by-token output needs greedy search or sampling (beam_size 1)")
        return beam_search(model, batch, options, should_stop=should_stop)
    run = sample if options.mode == "sample" else greedy_search
    return [[h] for h in run(model, batch, options, should_stop=should_stop, on_step=on_step)]


# ---------------------------------------------------------------------------------------------
# ensembles
# ---------------------------------------------------------------------------------------------


class _Members(tuple):  # type: ignore[type-arg]
    """The members' encoder memories or decoder states, reordered together."""

    def index_select(self, idx: Tensor, /) -> _Members:
        return _Members(part.index_select(idx) for part in self)


class Ensemble:
    """Several models searched as one: at every step the next-token log-probabilities are the
    average of the members' (log-linear interpolation, renormalised by search's log-softmax),
    and the attention is the average of theirs.

    Members must score the same output columns (`output_ids`); whether they share a tokenizer is
    the caller's to check (`nmt.translate.Translator.load` does)."""

    def __init__(self, models: Sequence[Any]) -> None:
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = list(models)
        first = getattr(self.models[0], "output_ids", None)
        for i, m in enumerate(self.models[1:], 2):
            ids = getattr(m, "output_ids", None)
            same = (ids is None and first is None) or (
                ids is not None and first is not None and torch.equal(ids, first)
            )
            if not same:
                raise ValueError(
                    f"ensemble member {i} scores a different output vocabulary than member 1"
                )
        self.output_ids = first
        self._widths: list[int] = []

    def encode(self, src: Tensor, src_lengths: Tensor, src_mask: Tensor, /) -> tuple[Any, Any]:
        parts = [m.encode(src, src_lengths, src_mask) for m in self.models]
        return _Members(p[0] for p in parts), _Members(p[1] for p in parts)

    def decode_step(self, prev: Tensor, state: Any, memory: Any, /) -> tuple[Tensor, Any, Tensor]:
        steps = [m.decode_step(prev, s, mem) for m, s, mem in zip(self.models, state, memory)]
        outs = [o for o, _, _ in steps]
        self._widths = [o.size(-1) for o in outs]
        attn = torch.stack([a.float() for _, _, a in steps]).mean(dim=0)
        return torch.cat(outs, dim=-1), _Members(st for _, st, _ in steps), attn

    def output_logits(self, out: Tensor, /) -> Tensor:
        parts = out.split(self._widths, dim=-1)
        log_probs = [
            m.output_logits(part).log_softmax(dim=-1, dtype=torch.float32)
            for m, part in zip(self.models, parts, strict=True)
        ]
        return torch.stack(log_probs).mean(dim=0)
