"""Greedy and beam search over the ONNX step graph, in numpy, by the rules of `nmt.search`.

The same `SearchOptions` and the same decisions as the PyTorch search, step for step: masked
log-probabilities (min length, n-gram blocking, EOS forced at the maximum length), GNMT length
and coverage penalties, n-best lists, the beam's K + 1 best tokens per row and 2K candidates per
sentence, and the same test for when a sentence is done. What it does not implement (sampling,
target prefixes) it refuses. Hypotheses come back as token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nmt.runtime.model import OnnxModel, select_rows
from nmt.search_options import SearchOptions, length_penalty_factor, max_length

NEG_INF = float("-inf")
_COVERAGE_EPS = 1e-10  # as nmt.search: keeps log() finite on source words without attention
SHRINK_FRACTION = 0.25  # greedy: drop finished rows once this share of the batch is done


class SearchCancelledError(Exception):
    """`should_stop` said so between two decoding steps (the service matches it by name)."""


@dataclass
class Hypothesis:
    """One output sentence, as `nmt.search.Hypothesis` (attention a numpy array)."""

    tokens: list[int]
    score: float
    log_prob: float
    attention: np.ndarray | None = None
    finished: bool = True


def check_supported(options: SearchOptions) -> None:
    """Raises ValueError for options the ONNX runtime does not implement."""
    if options.mode == "sample":
        raise ValueError(
            "sampling is not implemented in the ONNX runtime; decode the PyTorch model "
            "directory for sampling, or use greedy or beam search"
        )


def coverage_penalty_value(coverage: np.ndarray, src_mask: np.ndarray, beta: float) -> np.ndarray:
    """GNMT coverage penalty beta * sum_i log(min(sum_j a_ij, 1)) per row; coverage (N, S)."""
    logs = np.log(np.clip(coverage, _COVERAGE_EPS, 1.0)).astype(np.float32)
    return (beta * np.where(src_mask, logs, np.float32(0.0)).sum(axis=1)).astype(np.float32)


def block_repeated_ngrams(log_probs: np.ndarray, history: np.ndarray, n: int) -> None:
    """Set -inf, in place, on every token that would repeat an n-gram already in history (N, t)."""
    t = history.shape[1]
    if n == 1:
        if t:
            rows = np.repeat(np.arange(history.shape[0]), t)
            log_probs[rows, history.reshape(-1)] = NEG_INF
        return
    if t < n:
        return
    windows = np.lib.stride_tricks.sliding_window_view(history, n - 1, axis=1)  # (N, t-n+2, n-1)
    hits = (windows[:, :-1] == windows[:, -1:]).all(axis=2)  # (N, t - n + 1)
    rows, cols = np.nonzero(hits)
    log_probs[rows, history[:, n - 1 :][rows, cols]] = NEG_INF


def mask_step(
    log_probs: np.ndarray,
    history: np.ndarray,
    t: int,
    force_eos: np.ndarray | None,
    *,
    eos: int,
    min_len: int,
    no_repeat_ngram: int,
) -> None:
    """Min length, n-gram blocking and forced EOS on log_probs (N, V), in place (as
    `nmt.search._mask_step`). force_eos: (N,) bool rows at their maximum length, or None."""
    eos_raw = log_probs[:, eos].copy() if force_eos is not None else None
    if t < min_len:
        log_probs[:, eos] = NEG_INF
    if no_repeat_ngram > 0:
        block_repeated_ngrams(log_probs, history, no_repeat_ngram)
    if force_eos is not None and eos_raw is not None:
        # the forced EOS keeps its real log-probability
        log_probs[force_eos] = NEG_INF
        log_probs[:, eos] = np.where(force_eos, eos_raw, log_probs[:, eos])


class _Columns:
    """Logit columns and token ids (a model may score part of the vocabulary)."""

    def __init__(self, output_ids: np.ndarray | None, eos_id: int) -> None:
        self.ids = output_ids
        self.eos = eos_id
        if output_ids is not None:
            hits = np.nonzero(output_ids == eos_id)[0]
            if hits.size != 1:
                raise ValueError(f"EOS (id {eos_id}) is not one of the model's output tokens")
            self.eos = int(hits[0])

    def to_ids(self, cols: np.ndarray) -> np.ndarray:
        return cols if self.ids is None else self.ids[cols]

    def to_id_list(self, cols: np.ndarray) -> list[int]:
        return [int(c) for c in self.to_ids(cols)]


def _check_stop(should_stop: Callable[[], bool] | None, t: int) -> None:
    if should_stop is not None and should_stop():
        raise SearchCancelledError(f"search cancelled after {t} steps")


def search(
    model: OnnxModel,
    src: np.ndarray,
    src_lengths: np.ndarray,
    bos_id: int,
    eos_id: int,
    options: SearchOptions,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> list[list[Hypothesis]]:
    """Decodes a padded batch src (B, S) int64 as `options` say; per sentence its n-best list,
    best first, in input order (greedy search when beam_size and n_best are 1)."""
    check_supported(options)
    if src.shape[0] == 0:
        return []
    cap = options.max_len_cap
    limits = [max_length(n, options.max_len_a, options.max_len_b, cap) for n in src_lengths]
    runner = _Greedy(options) if options.mode == "greedy" else _Beam(options)
    return runner.run(model, src, src_lengths, bos_id, eos_id, limits, should_stop)


class _Greedy:
    """The most likely token at every step, for all sentences at once."""

    def __init__(self, options: SearchOptions) -> None:
        self.options = options

    def run(
        self,
        model: OnnxModel,
        src: np.ndarray,
        src_lengths: np.ndarray,
        bos_id: int,
        eos_id: int,
        limits: list[int],
        should_stop: Callable[[], bool] | None,
    ) -> list[list[Hypothesis]]:
        opt = self.options
        batch_size = src.shape[0]
        cols = _Columns(model.output_ids, eos_id)
        memory, state = model.encode(src, src_lengths)
        src_mask = memory["src_mask"]
        results: list[Hypothesis | None] = [None] * batch_size
        active = np.arange(batch_size)  # (N,) sentence ids of the rows
        limit_t = np.asarray(limits)
        idle = np.zeros(batch_size, dtype=bool)
        history = np.zeros((batch_size, 0), dtype=np.int64)
        log_prob_sum = np.zeros(batch_size, dtype=np.float32)
        beta = opt.coverage_penalty
        coverage = np.zeros(src.shape, np.float32) if beta != 0 else None
        attn_history = (
            np.zeros((batch_size, max(limits) + 1, src.shape[1]), np.float32)
            if opt.return_attention
            else None
        )
        prev = np.full(batch_size, bos_id, dtype=np.int64)
        t, n_idle, soonest = 0, 0, min(limits)
        rows_n = np.arange(batch_size)
        while True:
            _check_stop(should_stop, t)
            log_probs, state, attn = model.step(prev, state, memory)
            force = (limit_t <= t) if t >= soonest else None
            mask_step(log_probs, history, t, force, eos=cols.eos, min_len=opt.min_len,
                      no_repeat_ngram=opt.no_repeat_ngram)  # fmt: skip
            tokens = log_probs.argmax(axis=1)
            rows_n = np.arange(tokens.shape[0])
            log_prob_sum += log_probs[rows_n, tokens]
            history = np.concatenate([history, tokens[:, None]], axis=1)
            if coverage is not None:
                coverage += attn
            if attn_history is not None:
                attn_history[:, t] = attn
            prev = cols.to_ids(tokens)
            ended = (tokens == cols.eos) & ~idle
            if ended.any():
                lp = length_penalty_factor(t + 1, opt.length_penalty)
                rows = np.nonzero(ended)[0]
                pens = (
                    coverage_penalty_value(coverage[rows], src_mask[active[rows]], beta)
                    if coverage is not None
                    else np.zeros(rows.size, np.float32)
                )
                for row, pen in zip(rows.tolist(), pens.tolist(), strict=True):
                    sid = int(active[row])
                    total = float(log_prob_sum[row])
                    attention = None
                    if attn_history is not None:
                        attention = attn_history[row, : t + 1, : int(src_lengths[sid])].copy()
                    results[sid] = Hypothesis(
                        cols.to_id_list(history[row, :t]), total / lp + pen, total, attention,
                        finished=t < limits[sid],
                    )  # fmt: skip
                idle |= ended
                n_idle += rows.size
                if n_idle == active.size:
                    break
                if n_idle >= SHRINK_FRACTION * active.size:
                    keep = np.nonzero(~idle)[0]
                    memory, state = select_rows(memory, keep), select_rows(state, keep)
                    prev, active, limit_t = prev[keep], active[keep], limit_t[keep]
                    idle, history, log_prob_sum = idle[keep], history[keep], log_prob_sum[keep]
                    if coverage is not None:
                        coverage = coverage[keep]
                    if attn_history is not None:
                        attn_history = attn_history[keep]
                    n_idle = 0
                soonest = min(limits[int(s)] for s, i in zip(active, idle, strict=True) if not i)
            t += 1
        return [[r] for r in results if r is not None]


class _Beam:
    """Beam search with beams flattened into the batch (N = n * K rows), as `nmt.search`."""

    def __init__(self, options: SearchOptions) -> None:
        self.options = options
        self.k = options.beam_size
        self.alpha = options.length_penalty
        self.beta = options.coverage_penalty

    def run(
        self,
        model: OnnxModel,
        src: np.ndarray,
        src_lengths: np.ndarray,
        bos_id: int,
        eos_id: int,
        limits: list[int],
        should_stop: Callable[[], bool] | None,
    ) -> list[list[Hypothesis]]:
        k = self.k
        batch_size = src.shape[0]
        self.cols = _Columns(model.output_ids, eos_id)
        self.limits = limits
        self.src_lens = [int(n) for n in src_lengths]
        self.ended: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
        memory, state = model.encode(src, src_lengths)
        self.src_mask = memory["src_mask"]
        # the first step is the same for every beam: take it once per sentence, then copy
        bos = np.full(batch_size, bos_id, dtype=np.int64)
        log_probs, state, attn = model.step(bos, state, memory)
        per_beam = np.repeat(np.arange(batch_size), k)  # (B*K,)
        memory, state = select_rows(memory, per_beam), select_rows(state, per_beam)
        log_probs, attn = log_probs[per_beam], attn[per_beam]

        self.active = np.arange(batch_size)  # per live sentence (n,)
        self.limit_t = np.asarray(limits)
        self.lp_at_limit = np.asarray(
            [length_penalty_factor(m + 1, self.alpha) for m in limits], np.float32
        )
        self.n_ended = np.zeros(batch_size, np.int64)
        self.nbest_floor = np.full(batch_size, NEG_INF, np.float32)
        self.best_ended = np.full(batch_size, NEG_INF, np.float32)
        # only beam 0 is live at first, so the K copies do not give K identical candidates
        self.scores = np.full((batch_size, k), NEG_INF, np.float32)
        self.scores[:, 0] = 0.0
        self.history = np.zeros((batch_size * k, 0), np.int64)
        self.coverage = (
            np.zeros((batch_size * k, src.shape[1]), np.float32) if self.beta != 0 else None
        )
        self.attn_history = (
            np.zeros((batch_size * k, max(limits) + 1, src.shape[1]), np.float32)
            if self.options.return_attention
            else None
        )
        self.offsets = np.arange(batch_size)[:, None] * k  # (B, 1)

        t, soonest = 0, min(limits)
        while True:
            _check_stop(should_stop, t)
            prev, reorder = self._advance(log_probs, attn, t, soonest)
            done = self._done(t)
            if done.any():
                keep = np.nonzero(~done)[0]  # sentences that go on
                if keep.size == 0:
                    break
                rows = (keep[:, None] * k + np.arange(k)).reshape(-1)
                memory = select_rows(memory, rows)
                reorder, prev = reorder[rows], prev[rows]
                self._shrink(keep, rows)
                soonest = min(limits[int(sid)] for sid in self.active)
            state = select_rows(state, reorder)
            t += 1
            log_probs, state, attn = model.step(self.cols.to_ids(prev), state, memory)
        return [self._best(i) for i in range(batch_size)]

    def _advance(
        self, log_probs: np.ndarray, attn: np.ndarray, t: int, soonest: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """One step: score K * V candidates per sentence, set aside the ones that end, keep
        the K best that go on. Returns the next columns (N,) and the rows to reorder by."""
        k, opt = self.k, self.options
        n = self.scores.shape[0]
        force = np.repeat(self.limit_t <= t, k) if t >= soonest else None
        coverage = self.coverage + attn if self.coverage is not None else None
        mask_step(log_probs, self.history, t, force, eos=self.cols.eos, min_len=opt.min_len,
                  no_repeat_ngram=opt.no_repeat_ngram)  # fmt: skip
        # a beam's K + 1 best tokens, best first; then the 2K best of the K * (K + 1)
        per_row = min(k + 1, log_probs.shape[1])
        part = np.argpartition(-log_probs, per_row - 1, axis=1)[:, :per_row]
        part_scores = np.take_along_axis(log_probs, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        row_tokens = np.take_along_axis(part, order, axis=1)  # (N, K+1)
        row_scores = np.take_along_axis(part_scores, order, axis=1)
        cand = (self.scores.reshape(-1, 1) + row_scores).reshape(n, k * per_row)
        cand_idx = np.argsort(-cand, axis=1, kind="stable")[:, : min(2 * k, k * per_row)]
        cand_scores = np.take_along_axis(cand, cand_idx, axis=1)  # (n, 2K), best first
        cand_beams = cand_idx // per_row
        cand_tokens = np.take_along_axis(row_tokens.reshape(n, k * per_row), cand_idx, axis=1)
        is_eos = cand_tokens == self.cols.eos

        ends = is_eos[:, :k] & (cand_scores[:, :k] > NEG_INF)  # (n, K)
        attn_history = None
        if self.attn_history is not None:
            self.attn_history[:, t] = attn
            attn_history = self.attn_history
        if ends.any():
            self._finalise(ends, cand_scores, cand_beams, coverage, attn_history, t)

        n_cand = cand_scores.shape[1]
        order_key = is_eos.astype(np.int64) * n_cand + np.arange(n_cand)
        live = np.argsort(order_key, axis=1, kind="stable")[:, :k]  # (n, K)
        self.scores = np.take_along_axis(cand_scores, live, axis=1)
        tokens = np.take_along_axis(cand_tokens, live, axis=1).reshape(-1)
        reorder = (self.offsets[:n] + np.take_along_axis(cand_beams, live, axis=1)).reshape(-1)
        self.history = np.concatenate([self.history[reorder], tokens[:, None]], axis=1)
        if coverage is not None:
            self.coverage = coverage[reorder]
        if self.attn_history is not None:
            self.attn_history = self.attn_history[reorder]
        return tokens, reorder

    def _finalise(
        self,
        ends: np.ndarray,
        cand_scores: np.ndarray,
        cand_beams: np.ndarray,
        coverage: np.ndarray | None,
        attn_history: np.ndarray | None,
        t: int,
    ) -> None:
        """Move the ending candidates ends (n, K) into the per-sentence lists of ended ones."""
        sent, pos = np.nonzero(ends)
        rows = sent * self.k + cand_beams[sent, pos]
        log_probs = cand_scores[sent, pos]
        if coverage is not None:
            mask = self.src_mask[self.active[sent]]
            pens = coverage_penalty_value(coverage[rows], mask, self.beta)
        else:
            pens = np.zeros_like(log_probs)
        lp = length_penalty_factor(t + 1, self.alpha)
        touched: dict[int, int] = {}
        for s, row, total, pen in zip(
            sent.tolist(), rows.tolist(), log_probs.tolist(), pens.tolist(), strict=True
        ):
            sid = int(self.active[s])
            attention = None
            if attn_history is not None:
                attention = attn_history[row, : t + 1, : self.src_lens[sid]].copy()
            self.ended[sid].append(
                Hypothesis(
                    self.cols.to_id_list(self.history[row]), total / lp + pen, total, attention,
                    finished=t < self.limits[sid],
                )
            )  # fmt: skip
            touched[s] = sid
        n_best = self.options.n_best
        for s, sid in touched.items():
            hyps = self.ended[sid]
            hyps.sort(key=lambda h: h.score, reverse=True)
            self.n_ended[s] = len(hyps)
            self.nbest_floor[s] = hyps[n_best - 1].score if len(hyps) >= n_best else NEG_INF
            self.best_ended[s] = hyps[0].score

    def _done(self, t: int) -> np.ndarray:
        """(n,) bool: sentences whose n-best list is final after step t (as nmt.search)."""
        lp_next = length_penalty_factor(t + 2, self.alpha)
        best_live = self.scores[:, 0]
        beaten = best_live / np.maximum(self.lp_at_limit, np.float32(lp_next)) <= self.nbest_floor
        heuristic = (self.n_ended >= self.k) & (best_live / np.float32(lp_next) <= self.best_ended)
        return beaten | heuristic | (self.limit_t <= t)

    def _shrink(self, keep: np.ndarray, rows: np.ndarray) -> None:
        """Drop finished sentences: keep (n',) sentence positions, rows (n' * K,) beam rows."""
        self.active = self.active[keep]
        self.limit_t = self.limit_t[keep]
        self.lp_at_limit = self.lp_at_limit[keep]
        self.n_ended = self.n_ended[keep]
        self.nbest_floor = self.nbest_floor[keep]
        self.best_ended = self.best_ended[keep]
        self.scores = self.scores[keep]
        self.history = self.history[rows]
        if self.coverage is not None:
            self.coverage = self.coverage[rows]
        if self.attn_history is not None:
            self.attn_history = self.attn_history[rows]

    def _best(self, sid: int) -> list[Hypothesis]:
        hyps = sorted(self.ended[sid], key=lambda h: h.score, reverse=True)[: self.options.n_best]
        if not hyps:
            hyps = [Hypothesis(tokens=[], score=NEG_INF, log_prob=NEG_INF, finished=False)]
        return hyps
