"""Simultaneous translation: wait-k decoding over a live source, and latency metrics (AL, AP, DAL).

Wait-k (Ma et al., 2019, "STACL"): target step t (0-based) is written once the first t + k source
subwords have been read, and attends to those only. Two implementations of the same rule:

- `wait_k_search` decodes a batch of whole sentences offline, the source of step t hidden by a
  mask (the reference the live policy is tested against, and a fast way to score a model);
- `WaitKPolicy` is fed text as it arrives (typed, or from a speech recogniser), encodes each whole
  word once a space or the end of input shows it is complete, advances the `uni` encoder over it
  with its state carried, and writes greedily as soon as the rule allows. Output once written is
  never revised. Its step is split in two, `next_step` (what the rule allows now) and
  `apply_step` (the step's outcome), so that `write_steps` can run the steps of many live
  sentences as one decoder call (the live route's worker does), a sentence writing what it
  writes alone.

Both apply the same rules, so they give the same output for the same sentence however it is cut
into pieces: EOS is not allowed while unread source remains (the decoder must not stop before the
sentence ends), the length rule of `SearchOptions` (a, b, cap) and `min_len` apply, and the
decoder's initial state comes from the encoder's state after the first min(k, |x|) tokens. Where
the live policy cannot yet know whether the source is complete (exactly t + k tokens read, no end
of input yet) and the model's best token is EOS, it waits for the next word or the end instead of
guessing. Search's other options (beam, penalties, n-gram blocking, sampling) do not apply.

Latency is measured as SimulEval does (`simuleval.evaluator.scorers.latency_scorer`): the delay of
a target word is the number of source words read when it was released, a target word is released
once it is known to be complete (the next subword starts a new word, or the output ended), and AL
and AP divide by the reference's length in words where one is given (SimulEval's default).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, cast

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from nmt.config import Config
from nmt.model import EncoderMemory, Seq2Seq
from nmt.model.decoder import DecoderState
from nmt.model.encoder import EncoderState, LayerState
from nmt.results import batched
from nmt.search import EncodedSource, Hypothesis, SearchOptions, max_lengths
from nmt.translate import Translator, autocast

NEG_INF = float("-inf")
WORD_START = "\u2581"  # SentencePiece's word-start mark


# ---------------------------------------------------------------------------------------------
# latency metrics
# ---------------------------------------------------------------------------------------------


def average_lagging(
    delays: Sequence[float], source_length: int, reference_length: int | None = None
) -> float:
    """Average Lagging (Ma et al., 2019, eq. 4), as SimulEval computes it:
    AL = 1/tau sum_{i=1}^{tau} (d_i - (i - 1) / gamma), gamma = |Y| / |X|, tau the first i with
    d_i >= |X|; |Y| is the reference's length when given, else the output's."""
    if delays[0] > source_length:
        return float(delays[0])
    target_length = reference_length if reference_length is not None else len(delays)
    gamma = target_length / source_length
    total, tau = 0.0, 0
    for i, d in enumerate(delays):
        total += d - i / gamma
        tau = i + 1
        if d >= source_length:
            break
    return total / tau


def average_proportion(
    delays: Sequence[float], source_length: int, reference_length: int | None = None
) -> float:
    """Average Proportion (Cho and Esipova, 2016): sum_i d_i / (|X| |Y|), |Y| as in AL."""
    target_length = reference_length if reference_length is not None else len(delays)
    return sum(delays) / (source_length * target_length)


def differentiable_average_lagging(delays: Sequence[float], source_length: int) -> float:
    """Differentiable Average Lagging (Arivazhagan et al., 2019, eq. 5), as SimulEval computes
    it: d'_1 = d_1, d'_i = max(d_i, d'_{i-1} + 1/gamma), DAL = 1/|Y| sum_i (d'_i - (i-1)/gamma),
    gamma = |Y| / |X| with |Y| the output's length."""
    gamma = len(delays) / source_length
    total, previous = 0.0, 0.0
    for i, d in enumerate(delays):
        lagged = d if i == 0 else max(d, previous + 1 / gamma)
        total += lagged - i / gamma
        previous = lagged
    return total / len(delays)


@dataclass(frozen=True)
class Latency:
    """Corpus latency in source words: the mean over sentences with any output."""

    al: float
    ap: float
    dal: float
    sentences: int  # sentences the means are over


def corpus_latency(
    delays: Sequence[Sequence[float]],
    source_lengths: Sequence[int],
    reference_lengths: Sequence[int] | None = None,
) -> Latency:
    """AL, AP and DAL averaged over sentences, skipping those with no output or no source (as
    SimulEval skips instances without delays)."""
    al, ap, dal = [], [], []
    for i, (d, n) in enumerate(zip(delays, source_lengths, strict=True)):
        if not d or n == 0:
            continue
        ref = None if reference_lengths is None else max(reference_lengths[i], 1)
        al.append(average_lagging(d, n, ref))
        ap.append(average_proportion(d, n, ref))
        dal.append(differentiable_average_lagging(d, n))
    if not al:
        return Latency(math.nan, math.nan, math.nan, 0)
    return Latency(statistics.mean(al), statistics.mean(ap), statistics.mean(dal), len(al))


# ---------------------------------------------------------------------------------------------
# offline wait-k decoding
# ---------------------------------------------------------------------------------------------


def check_streaming_model(model: object) -> Seq2Seq:
    """`model` as a Seq2Seq whose encoder reads left to right; ValueError for any other."""
    if not isinstance(model, Seq2Seq) or not model.encoder.streaming:
        raise ValueError(
            "simultaneous translation needs one model whose encoder reads left to right "
            "(model.encoder.layout: uni); this one's encoder looks ahead"
        )
    return model


def _eos_column(model: Seq2Seq, eos_id: int) -> int:
    return eos_id if model.column_of is None else int(model.column_of[eos_id])


def wait_k_search(
    model: Seq2Seq, batch: EncodedSource, k: int, options: SearchOptions
) -> list[Hypothesis]:
    """Greedy wait-k decoding of whole sentences: step t reads the first min(t + k, |x|)
    source tokens. Returns one hypothesis per sentence, in input order (see the module
    docstring for the rules; `WaitKPolicy` gives the same output over a live source)."""
    if k < 1:
        raise ValueError(f"wait-k needs k >= 1, got {k}")
    model = check_streaming_model(model)
    src_mask = batch.src_mask
    device = src_mask.device
    lengths = batch.src_lengths.to(device)
    memory, state = model.encode(batch.src, batch.src_lengths, src_mask, wait_k=k)
    limits = torch.tensor(
        max_lengths(batch.src_lengths, options.max_len_a, options.max_len_b, options.max_len_cap),
        device=device,
    )
    eos_col = _eos_column(model, batch.eos_id)
    rows = src_mask.size(0)
    positions = torch.arange(src_mask.size(1), device=device)
    prev = torch.full((rows,), batch.bos_id, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    scores = torch.zeros(rows, device=device)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    finished = [True] * rows
    for t in range(int(limits.max()) + 1):
        step_memory = memory._replace(src_mask=src_mask & (positions < t + k))
        out, state, _ = model.decode_step(prev, state, step_memory)
        log_probs = model.output_logits(out).float().log_softmax(dim=-1)  # (B, V)
        eos_raw = log_probs[:, eos_col].clone()
        no_eos = lengths > t + k if t >= options.min_len else torch.ones_like(done)
        log_probs[:, eos_col] = log_probs[:, eos_col].masked_fill(no_eos, NEG_INF)
        forced = limits <= t  # the length rule ends the sentence here
        cols = torch.where(forced, eos_col, log_probs.argmax(dim=-1))
        step_scores = torch.where(forced, eos_raw, log_probs.gather(1, cols[:, None])[:, 0])
        scores += step_scores.masked_fill(done, 0.0)
        ids = model.token_ids(cols)
        for i in (~done).nonzero()[:, 0].tolist():
            if int(cols[i]) == eos_col:
                finished[i] = not bool(forced[i])
            else:
                tokens[i].append(int(ids[i]))
        done |= cols == eos_col
        if bool(done.all()):
            break
        prev = ids
    return [
        Hypothesis(tokens[i], float(scores[i]), float(scores[i]), finished=finished[i])
        for i in range(rows)
    ]


def translate_wait_k(
    translator: Translator, texts: list[str], k: int, options: SearchOptions | None = None
) -> list[str]:
    """Offline wait-k translations of whole sentences (`wait_k_search`), detokenised."""
    return wait_k_texts(translator, translator.tokenizer.encode_src(texts), k, options)


def wait_k_texts(
    translator: Translator, ids: list[list[int]], k: int, options: SearchOptions | None = None
) -> list[str]:
    """Offline wait-k translations of encoded sources, in input order, decoded in batches of
    similar length as `translate_encoded` batches them (`decode.batch_tokens`); an empty
    source gives an empty translation."""
    texts = [""] * len(ids)
    lengths = [len(s) for s in ids]
    order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: -lengths[i])
    model = check_streaming_model(translator.model)
    for rows in batched(order, lengths, translator.cfg.decode.batch_tokens):
        batch = translator._batch([ids[i] for i in rows])
        with torch.no_grad(), autocast(translator.device, translator.precision):
            hyps = wait_k_search(model, batch, k, options or translator.options)
        decoded = translator.tokenizer.decode_tgt([h.tokens for h in hyps])
        for i, text in zip(rows, decoded, strict=True):
            texts[i] = text
    return texts


# ---------------------------------------------------------------------------------------------
# the live policy
# ---------------------------------------------------------------------------------------------


def live_translator(translator: Translator, precision: str | None = None) -> Translator:
    """A copy of `translator` with a model of its own, for a thread that decodes live sources
    (the same tokenizer and options), in `precision` (default: the translator's). In bf16 the
    copy keeps its weights in bf16: a live step is a few rows, so reading the weights is most
    of its cost, and autocast would cast them again at every call."""
    precision = precision or translator.precision
    model = copy.deepcopy(check_streaming_model(translator.model))
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    return Translator(model, translator.tokenizer, translator.cfg, translator.meta,
                      translator.device, precision)  # fmt: skip


class SourceTooLongError(ValueError):
    """The live source passed the policy's limit on source subwords."""


@dataclass
class _Decoder:
    """The decoder side of a live sentence: its state and what it has written."""

    state: DecoderState | None = None
    prev: int = 0  # the last written token (BOS at the start)
    tokens: list[int] = field(default_factory=list)
    ended: bool = False  # EOS was written (or forced by the length rule)


@dataclass(frozen=True, eq=False)
class WaitKStep:
    """The next decoder step of a live sentence (`WaitKPolicy.next_step`): what `write_steps`
    stacks with other sentences' steps."""

    policy: WaitKPolicy
    prev: int  # the last written token (BOS at the start)
    state: DecoderState | None  # (L, 1, H); None before the first step
    start: Tensor | None  # (1, He) the encoder output the first step's state comes from
    enc_out: Tensor  # (1, S, He) the source this step reads, S = min(t + k, subwords read)
    keys: Tensor | None  # (1, S, Ha); None for the dot score
    eos_allowed: bool  # False while unread source remains and before min_len


class WaitKPolicy:
    """Wait-k over a live source, one sentence at a time: `feed(text)` as text arrives,
    `finish()` at the end of input; both return the target words they committed.

    Only whole words are encoded: a word still being typed waits for the space (or the end of
    input) that completes it. Not thread-safe: one policy per sentence, used by one thread.

    `feed` and `finish` are three steps that a caller serving many sentences at once runs
    itself (`serve.live`): `read` / `end` take the source, then, while `next_step` returns a
    step, `write_steps` runs it together with other sentences' steps, and `release` returns
    the target words that became complete.

    Such a caller can also write the end of the sentence before it comes (`end_draft`): while
    it has nothing else to do, it advances a draft, a copy of the policy that takes the end of
    input now, as it would the policy itself. If the end comes with nothing read since, `end`
    adopts the draft, so the rest of the sentence is (partly) written already and released
    at once; anything read first discards it. The output is the same either way.

    Args:
        translator: a loaded model with a `uni` encoder (not an ensemble) and its tokenizer.
        k: source subwords read ahead of the target; k >= 1.
        options: the length rule and min_len (default: the translator's own).
        max_source_tokens: a limit on the sentence's source subwords; passing it raises
            `SourceTooLongError`.
    """

    def __init__(
        self,
        translator: Translator,
        k: int,
        options: SearchOptions | None = None,
        max_source_tokens: int | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"wait-k needs k >= 1, got {k}")
        self.model = check_streaming_model(translator.model)
        self.translator = translator
        self.tokenizer = translator.tokenizer
        self.k = k
        self.options = options or translator.options
        self.max_source_tokens = max_source_tokens
        self.source_words = 0  # whole words read (encoded) so far
        self.source_ended = False  # the end of input has arrived
        self._pending = ""  # text of the word still being typed
        self._enc_state: EncoderState | None = None
        self._enc_out: list[Tensor] = []  # (1, S', He) pieces
        self._keys: list[Tensor] = []  # (1, S', Ha) pieces (none for the dot score)
        self._memory: tuple[Tensor, Tensor | None] | None = None  # the pieces joined, cached
        self._read = 0  # source subwords read and encoded
        self._unencoded: list[int] = []  # subwords of whole words read, not yet encoded
        self._limits = (-1, 0)  # the length rule's limit for a source of n subwords: (n, limit)
        self._waits_for_source = False  # the model chose EOS before the end of input
        self._decoder = _Decoder(prev=self.tokenizer.bos_id)
        self._released: list[str] = []  # target words committed so far
        self._eos_col = _eos_column(self.model, self.tokenizer.eos_id)
        # the end of input written ahead (`end_draft`): None until asked for, False where the
        # source so far cannot end here (the pending word passes the subword limit)
        self._draft: WaitKPolicy | Literal[False] | None = None

    # -- public ---------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """The sentence is finished: end of input, and everything written."""
        empty = self._read == 0 and not self._unencoded
        return self.source_ended and (self._decoder.ended or empty)

    @property
    def text(self) -> str:
        """The committed translation so far."""
        return " ".join(self._released)

    @property
    def tokens(self) -> list[int]:
        """The target subwords written so far (EOS not included)."""
        return list(self._decoder.tokens)

    def feed(self, text: str) -> list[str]:
        """Takes the next piece of source text; returns the target words it lets the policy
        commit (possibly none)."""
        self.read(text)
        self._write()
        return self.release()

    def finish(self) -> list[str]:
        """The end of input: reads the last word and writes to the end; returns the rest."""
        if self.source_ended:
            return []
        self.end()
        self._write()
        return self.release()

    # -- reading --------------------------------------------------------------------------

    def read(self, text: str) -> None:
        """Takes the next piece of source text and encodes the words it completes; writes
        nothing (see `next_step`)."""
        if self.source_ended:
            raise ValueError("the input has ended; start a new policy for the next sentence")
        self._draft = None  # written for a source that ended before this text
        self._pending += text
        cut = max((i for i, ch in enumerate(self._pending) if ch.isspace()), default=-1)
        if cut < 0:
            return
        words, self._pending = self._pending[:cut].split(), self._pending[cut + 1 :]
        if words:
            self._read_words(words)

    def end(self) -> None:
        """The end of input: encodes the last word; writes nothing (see `next_step`)."""
        if self.source_ended:
            return
        if self._draft:  # the end written ahead for this very source: carry on from there
            self.__dict__.update(self._draft.__dict__)
            return
        words = self._pending.split()
        self._pending = ""
        self.source_ended = True
        self._waits_for_source = False
        if words:
            self._read_words(words)

    def end_draft(self) -> WaitKPolicy | None:
        """The end of input written ahead: a copy of this policy that has taken the end of
        input now, made at the first call after a read and then kept, for the caller to
        advance with `next_step` / `write_steps` while it waits for this sentence's next
        frame (`done` when it is complete). None after the end of input, or when ending here
        would pass the subword limit. `end` adopts the draft if nothing was read since."""
        if self.source_ended or self._draft is False:
            return None
        if self._draft is None:
            draft = copy.copy(self)
            draft._decoder = replace(self._decoder, tokens=list(self._decoder.tokens))
            draft._enc_out, draft._keys = list(self._enc_out), list(self._keys)
            draft._unencoded, draft._released = list(self._unencoded), list(self._released)
            try:
                draft.end()
            except SourceTooLongError:
                self._draft = False
                return None
            self._draft = draft
        return self._draft

    def _read_words(self, words: list[str]) -> None:
        ids = [t for piece in self.tokenizer.encode_src(words) for t in piece]
        total = self._read + len(self._unencoded) + len(ids)
        if self.max_source_tokens is not None and total > self.max_source_tokens:
            raise SourceTooLongError(
                f"the source is {total} subwords long; the limit is "
                f"{self.max_source_tokens} (end the sentence sooner)"
            )
        self.source_words += len(words)
        self._unencoded.extend(ids)  # encoded by `next_step`, or with others by `encode_pending`

    def _encode(self) -> None:
        """Encodes the subwords read but not yet encoded, on their own."""
        if self._unencoded:
            encode_pending([self])

    def _take_encoded(self, enc_out: Tensor, keys: Tensor | None, state: EncoderState) -> None:
        """The encoder's outputs (1, S', He), keys and state after the pending subwords."""
        self._enc_out.append(enc_out)
        if keys is not None:
            self._keys.append(keys)
        self._enc_state = EncoderState(state.layers, self._read + len(self._unencoded))
        self._memory = None
        self._read += len(self._unencoded)
        self._unencoded = []
        self._waits_for_source = False

    def _source(self, n: int) -> tuple[Tensor, Tensor | None]:
        """The encoder outputs (1, n, He) and keys (1, n, Ha) or None of the first n tokens."""
        if self._memory is None:
            keys = torch.cat(self._keys, dim=1) if self._keys else None
            self._memory = (torch.cat(self._enc_out, dim=1), keys)
        enc_out, keys = self._memory
        return enc_out[:, :n], None if keys is None else keys[:, :n]

    # -- writing --------------------------------------------------------------------------

    def _limit(self, n: int) -> int:
        """The length rule's output limit for a source of n subwords."""
        if self._limits[0] != n:
            o = self.options
            limit = max_lengths(torch.tensor([n]), o.max_len_a, o.max_len_b, o.max_len_cap)[0]
            self._limits = (n, limit)
        return self._limits[1]

    def next_step(self) -> WaitKStep | None:
        """The decoder step the rules allow now, or None: the policy waits for more source (or
        the end of input), or the sentence is written (see the module docstring for the
        rules). Asking has no effect, except that a sentence the length rule ends is ended (and
        that words read are encoded first, if `encode_pending` has not)."""
        self._encode()
        dec, k, n = self._decoder, self.k, self._read
        if dec.ended or n == 0 or self._waits_for_source:
            return None
        t = len(dec.tokens)
        if not self.source_ended and (n < t + k or t >= self._limit(n)):
            return None  # wait for more source
        if self.source_ended and t >= self._limit(n):
            dec.ended = True  # the length rule ends the sentence (EOS forced)
            return None
        enc_out, keys = self._source(min(t + k, n))
        start = None if dec.state is not None else self._source(n)[0][:, min(k, n) - 1]
        unread = t + k < n  # the source goes on beyond what step t reads
        eos_allowed = not unread and t >= self.options.min_len
        return WaitKStep(self, dec.prev, dec.state, start, enc_out, keys, eos_allowed)

    def apply_step(self, column: int, state: DecoderState) -> None:
        """Takes the outcome of the step `next_step` returned, nothing read in between: the
        argmax column of its logits (EOS masked unless allowed) and the new state (L, 1, H)."""
        self._draft = None  # written before this step (a caller's slip: keep it right)
        dec = self._decoder
        if column == self._eos_col and not self.source_ended:
            self._waits_for_source = True  # EOS is only right if the source ends here
            return
        dec.state = state
        if column == self._eos_col:
            dec.ended = True
            return
        token = int(self.model.token_ids(torch.tensor(column)))
        dec.tokens.append(token)
        dec.prev = token

    def _write(self) -> None:
        """Writes every step the read source allows, one at a time."""
        while (step := self.next_step()) is not None:
            write_steps([step])

    def release(self) -> list[str]:
        """The target words newly known to be complete."""
        tokens = self._decoder.tokens
        if not (self._decoder.ended or self.done):
            pieces = self.tokenizer.tgt_pieces(tokens)
            starts = [i for i, piece in enumerate(pieces) if piece.startswith(WORD_START)]
            tokens = tokens[: starts[-1]] if starts else []  # the last word may go on
        words = self.tokenizer.decode_tgt([tokens])[0].split() if tokens else []
        new = words[len(self._released) :]
        self._released.extend(new)
        return new


def encode_pending(policies: Sequence[WaitKPolicy]) -> list[int]:
    """Encodes the words the policies have read and not yet encoded, batched: the sentences of
    one model advance their encoders in one call, states stacked, so each gets what it gets
    alone (`Seq2Seq.encode_more`); their new subwords are padded to the longest where the
    encoder takes ragged lengths (fused nn.LSTM / nn.GRU layers), else sentences with as many
    new subwords go together. The live route's worker calls it for the frames of a tick;
    `next_step` encodes what is left on its own. Returns the number of sentences in each
    encoder call."""
    groups: dict[tuple[int, int], list[WaitKPolicy]] = {}
    for policy in policies:
        if policy._unencoded:  # rows of any length go together where the encoder pads them
            count = 0 if policy.model.encoder.ragged_advance else len(policy._unencoded)
            groups.setdefault((id(policy.model), count), []).append(policy)
    for group in groups.values():
        first = group[0]
        device = first.translator.device
        new = [torch.tensor(p._unencoded, dtype=torch.long) for p in group]
        src = pad_sequence(new, batch_first=True, padding_value=first.tokenizer.pad_id)
        lengths = torch.tensor([len(ids) for ids in new])
        ragged = bool((lengths != src.size(1)).any())
        with torch.no_grad(), autocast(device, first.translator.precision):
            state = stack_states([p._enc_state for p in group])
            enc_out, keys, state = first.model.encode_more(
                src.to(device), state, lengths.to(device) if ragged else None
            )
        for i, (policy, n) in enumerate(zip(group, lengths.tolist(), strict=True)):
            row = None if keys is None else keys[i : i + 1, :n]
            policy._take_encoded(enc_out[i : i + 1, :n], row, state_row(state, i))
    return [len(group) for group in groups.values()]


def stack_states(states: Sequence[EncoderState | None]) -> EncoderState | None:
    """One batch's encoder state from the sentences' own (None: nothing read, zeros)."""
    if all(s is None for s in states):
        return None
    known = next(s for s in states if s is not None)
    layers: list[LayerState] = []
    for i, like in enumerate(known.layers):
        zeros = [torch.zeros_like(part) for part in _parts(like)]
        rows = [zeros if s is None else _parts(s.layers[i]) for s in states]
        layers.append(_layer_state([torch.cat(column, dim=1) for column in zip(*rows)]))
    return EncoderState(layers, 0)  # lengths differ: each policy keeps its own


def state_row(state: EncoderState, i: int) -> EncoderState:
    """Sentence i's encoder state out of a batch's (the length is the policy's to set)."""
    layers = [
        _layer_state([part[:, i : i + 1] for part in _parts(layer)]) for layer in state.layers
    ]
    return EncoderState(layers, state.length)


def _parts(layer: LayerState) -> tuple[Tensor, ...]:
    """A layer's state as its tensors: (h,) for GRU, (h, c) for the LSTMs, each (1, B, H)."""
    return (layer,) if isinstance(layer, Tensor) else layer


def _layer_state(parts: Sequence[Tensor]) -> LayerState:
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def write_steps(steps: Sequence[WaitKStep]) -> None:
    """Runs the next steps of several live sentences as one decoder call and hands each policy
    its outcome (`WaitKPolicy.apply_step`).

    The sentences' states and previous tokens are stacked and the source each step reads is
    padded to the longest and masked, as beam search stacks hypotheses, so a sentence writes
    what it writes alone whatever its company (k, length, progress). One step per policy;
    steps of policies over different models (a model replaced while sentences were open) run
    as one call per model.
    """
    by_model: dict[int, list[WaitKStep]] = {}
    for step in steps:
        by_model.setdefault(id(step.policy.model), []).append(step)
    for group in by_model.values():
        _write_one_model(group)


def _write_one_model(steps: Sequence[WaitKStep]) -> None:
    """`write_steps` for the steps of one model."""
    policy = steps[0].policy
    model, translator = policy.model, policy.translator
    assert len({id(s.policy) for s in steps}) == len(steps), "one step per policy"
    with torch.no_grad(), autocast(translator.device, translator.precision):
        columns, state = _decode_steps(model, steps, policy._eos_col)
    for i, (step, column) in enumerate(zip(steps, columns, strict=True)):
        row = DecoderState(state.hidden[:, i : i + 1], state.cell[:, i : i + 1],
                           state.attn_vector[i : i + 1])  # fmt: skip
        step.policy.apply_step(column, row)


def _decode_steps(
    model: Seq2Seq, steps: Sequence[WaitKStep], eos_col: int
) -> tuple[list[int], DecoderState]:
    """The batched decoder step of `write_steps`: each row's argmax column and the new state."""
    device = steps[0].enc_out.device
    states = [
        s.state if s.state is not None else model.decoder.init_state(cast(Tensor, s.start))
        for s in steps
    ]  # the first step's state from the encoder after min(k, |x|) tokens, row by row
    state = DecoderState(
        torch.cat([s.hidden for s in states], dim=1),  # (L, B, H)
        torch.cat([s.cell for s in states], dim=1),
        torch.cat([s.attn_vector for s in states], dim=0),
    )
    enc_out = pad_sequence([s.enc_out[0] for s in steps], batch_first=True)  # (B, S, He)
    keys = None
    if steps[0].keys is not None:
        keys = pad_sequence([cast(Tensor, s.keys)[0] for s in steps], batch_first=True)
    lengths = torch.tensor([s.enc_out.size(1) for s in steps], device=device)
    src_mask = torch.arange(enc_out.size(1), device=device) < lengths[:, None]  # (B, S)
    prev = torch.tensor([s.prev for s in steps], dtype=torch.long, device=device)
    out, state, _ = model.decode_step(prev, state, EncoderMemory(enc_out, src_mask, keys))
    logits = model.output_logits(out).float()  # (B, V), argmax only
    no_eos = torch.tensor([not s.eos_allowed for s in steps], device=device)
    logits[:, eos_col] = logits[:, eos_col].masked_fill(no_eos, NEG_INF)
    return logits.argmax(dim=-1).tolist(), state


def default_wait_k(cfg: Config) -> int:
    """A model's k for live translation: its training k; for a multi-k model, 3 within its
    range; 3 for a model trained on full sentences."""
    wait_k = cfg.train.wait_k
    if isinstance(wait_k, int):
        return wait_k
    if wait_k is None:
        return 3
    return min(max(3, wait_k[0]), wait_k[1])


# ---------------------------------------------------------------------------------------------
# simulation over a corpus
# ---------------------------------------------------------------------------------------------


@dataclass
class Simulation:
    """One sentence translated with its source revealed one word at a time."""

    text: str
    delays: list[int]  # per target word, source words read when it was released
    source_length: int  # source words


def simulate(
    translator: Translator, source: str, k: int, options: SearchOptions | None = None
) -> Simulation:
    """Feeds `source` to a `WaitKPolicy` one word at a time (as SimulEval's text evaluation
    does) and records when each target word was released."""
    policy = WaitKPolicy(translator, k, options)
    words = source.split()
    delays: list[int] = []
    for word in words:
        released = policy.feed(word + " ")
        delays += [policy.source_words] * len(released)
    released = policy.finish()
    delays += [policy.source_words] * len(released)
    return Simulation(policy.text, delays, len(words))
