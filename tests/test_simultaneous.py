"""Simultaneous translation: the streaming encoder, the wait-k mask, the live policy, latency."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import torch

from nmt.cli import main
from nmt.config import ConfigError, load_config
from nmt.model import EncoderMemory, Seq2Seq, build_model
from nmt.model.attention import wait_k_mask
from nmt.simultaneous import (
    WaitKPolicy,
    average_lagging,
    average_proportion,
    corpus_latency,
    differentiable_average_lagging,
    encode_pending,
    simulate,
    stack_states,
    state_row,
    translate_wait_k,
    wait_k_search,
    write_steps,
)
from nmt.train import wait_k_of_rows, wait_k_of_step
from nmt.translate import Translator

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
VOCAB, PAD, BOS = 40, 0, 2

# (name, overrides): every attention arrangement and both teacher-forcing paths of Luong
VARIANTS = [
    ("luong", []),  # whole-sequence fast path
    ("luong-input-feeding", ["model.decoder.input_feeding=true"]),  # fused step loop
    (
        "luong-dot-input-feeding",
        [
            "model.decoder.input_feeding=true",
            "model.attention.score=dot",
            "model.decoder.hidden_dim=32",
        ],
    ),  # fmt: skip
    ("bahdanau", ["model.attention.type=bahdanau", "model.attention.score=additive"]),
    ("gnmt", ["model.attention.type=gnmt"]),
    ("lstm_ln", ["model.cell=lstm_ln"]),
    ("gru", ["model.cell=gru"]),
]


def uni_model(overrides: list[str], seed: int = 0) -> Seq2Seq:
    cfg = load_config(TINY, ["model.encoder.layout=uni", "model.encoder.num_layers=3", *overrides])
    torch.manual_seed(seed)
    return build_model(cfg.model, VOCAB, VOCAB, PAD).eval()


def padded_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (len(lengths), max(lengths)), generator=gen)
    lens = torch.tensor(lengths)
    mask = torch.arange(max(lengths)) < lens[:, None]
    return src.masked_fill(~mask, PAD), lens, mask


def train_tiny_waitk(toy_corpus: Path, base: Path) -> Path:
    """configs/tiny.yaml with a `uni` encoder, trained multi-k (k in 1..4) on the toy corpus;
    kept under `base`, so the test modules that need it train it once per session."""
    from nmt.train import train

    run = base / "tiny-waitk-run"
    if not (run / "model" / "model.safetensors").exists():
        cfg = load_config(TINY, [f"data.corpus={toy_corpus}", "model.encoder.layout=uni",
                                 "train.wait_k=[1, 4]", "train.max_steps=150",
                                 "train.valid_every=150", "train.valid_max_sentences=10"])  # fmt: skip
        train(cfg, run, progress=False)
    return run / "model"


@pytest.fixture(scope="session")
def tiny_waitk_model_dir(toy_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_waitk(toy_corpus, tmp_path_factory.getbasetemp())


# -- the streaming encoder ---------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "lstm_ln", "gru"])
def test_incremental_encoding_equals_whole_sequence_encoding(cell: str) -> None:
    model = uni_model([f"model.cell={cell}"])
    src, lens, mask = padded_batch([7, 4])
    with torch.no_grad():
        whole, _ = model.encode(src, lens, mask)
        for row, n in enumerate(lens.tolist()):
            pieces, keys, state = [], [], None
            start = 0
            for size in (1, 2, 1, 3):  # token by token and a few at once
                stop = min(start + size, n)
                if start >= stop:
                    break
                out, k, state = model.encode_more(src[row : row + 1, start:stop], state)
                pieces.append(out)
                keys.append(k)
                start = stop
            assert state is not None and state.length == n
            enc = torch.cat(pieces, dim=1)[0]
            torch.testing.assert_close(enc, whole.enc_out[row, :n], rtol=1e-5, atol=1e-6)
            assert whole.keys is not None
            torch.testing.assert_close(
                torch.cat(keys, dim=1)[0], whole.keys[row, :n], rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize("cell", ["lstm", "lstm_ln", "gru"])
def test_encoders_advanced_together_equal_each_advanced_alone(cell: str) -> None:
    # what encode_pending does for the live worker: sentences that have read different
    # prefixes (one nothing yet) advance by the same number of tokens in one call
    model = uni_model([f"model.cell={cell}"])
    gen = torch.Generator().manual_seed(5)
    prefixes = [torch.randint(4, VOCAB, (1, n), generator=gen) for n in (3, 0, 5)]
    new = torch.randint(4, VOCAB, (3, 2), generator=gen)
    with torch.no_grad():
        states = [None if p.size(1) == 0 else model.encode_more(p)[2] for p in prefixes]
        stacked = stack_states(states)
        together, keys, after = model.encode_more(new, stacked)
        for i, state in enumerate(states):
            alone, alone_keys, alone_after = model.encode_more(new[i : i + 1], state)
            torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-6)
            assert keys is not None and alone_keys is not None
            torch.testing.assert_close(keys[i : i + 1], alone_keys, rtol=1e-5, atol=1e-6)
            row = state_row(after, i)
            for got, want in zip(row.layers, alone_after.layers, strict=True):
                got_parts = [got] if isinstance(got, torch.Tensor) else list(got)
                want_parts = [want] if isinstance(want, torch.Tensor) else list(want)
                for g, w in zip(got_parts, want_parts, strict=True):
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_encoders_advanced_by_different_numbers_of_tokens_together_equal_each_alone(
    cell: str,
) -> None:
    # the fused cells take ragged rows: sentences that read 1, 3 and 2 new subwords (one with
    # nothing read before) advance in one call, padded, each row's state after its own tokens
    model = uni_model([f"model.cell={cell}"])
    assert model.encoder.ragged_advance
    gen = torch.Generator().manual_seed(6)
    prefixes = [torch.randint(4, VOCAB, (1, n), generator=gen) for n in (2, 0, 4)]
    counts = [1, 3, 2]
    new = torch.randint(4, VOCAB, (3, 3), generator=gen)
    with torch.no_grad():
        states = [None if p.size(1) == 0 else model.encode_more(p)[2] for p in prefixes]
        padded = new.clone()
        for i, n in enumerate(counts):
            padded[i, n:] = PAD
        together, keys, after = model.encode_more(padded, stack_states(states),
                                                  torch.tensor(counts))  # fmt: skip
        assert keys is not None
        for i, (state, n) in enumerate(zip(states, counts, strict=True)):
            alone, alone_keys, alone_after = model.encode_more(new[i : i + 1, :n], state)
            torch.testing.assert_close(together[i : i + 1, :n], alone, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(keys[i : i + 1, :n], alone_keys, rtol=1e-5, atol=1e-6)
            row, want = state_row(after, i), alone_after
            for got_layer, want_layer in zip(row.layers, want.layers, strict=True):
                got_parts = [got_layer] if isinstance(got_layer, torch.Tensor) else got_layer
                want_parts = [want_layer] if isinstance(want_layer, torch.Tensor) else want_layer
                for g, w in zip(got_parts, want_parts, strict=True):
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    ours = uni_model(["model.cell=lstm_ln"])
    assert not ours.encoder.ragged_advance  # our cells advance equal lengths only
    with pytest.raises(ValueError, match="ragged"):
        ours.encode_more(padded, None, torch.tensor(counts))


@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_ln", "lstm_cifg", "lstm_peephole"])
def test_a_model_with_bf16_weights_advances_and_steps_as_in_fp32(cell: str) -> None:
    # the live worker's bf16 copy (NMT_LIVE_PRECISION=bf16) runs every cell: the source
    # encoded in pieces and decoder steps match fp32 within bf16 rounding
    src = torch.randint(4, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    results = []
    for bf16 in (False, True):
        model = uni_model([f"model.cell={cell}", "model.decoder.input_feeding=true"])
        model = model.to(torch.bfloat16) if bf16 else model
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            first, first_keys, state = model.encode_more(src[:, :3])
            rest, rest_keys, _ = model.encode_more(src[:, 3:], state)
            enc_out = torch.cat([first, rest], dim=1)
            keys = None if rest_keys is None else torch.cat([first_keys, rest_keys], dim=1)
            dec = model.decoder.init_state(enc_out[:, 2])
            memory = EncoderMemory(enc_out, torch.ones(2, 5, dtype=torch.bool), keys)
            prev = torch.tensor([BOS, BOS])
            logits = []
            for _ in range(3):
                out, dec, _ = model.decode_step(prev, dec, memory)
                logits.append(model.output_logits(out).float())
                prev = torch.tensor([7, 9])  # the same inputs for both precisions
        results.append((enc_out.float(), torch.stack(logits)))
    (enc32, logits32), (enc16, logits16) = results
    tol = 0.05 if cell == "lstm_ln" else 0.02  # layer norms magnify bf16 rounding
    torch.testing.assert_close(enc16, enc32, atol=tol, rtol=0)
    torch.testing.assert_close(logits16, logits32, atol=tol * float(logits32.abs().max()), rtol=0)


def test_a_bidirectional_encoder_refuses_to_advance() -> None:
    cfg = load_config(TINY)
    model = build_model(cfg.model, VOCAB, VOCAB, PAD)
    with pytest.raises(ValueError, match="layout 'uni'"):
        model.encode_more(torch.tensor([[5, 6]]))


# -- the wait-k mask ----------------------------------------------------------------------------


def step_loop(model: Seq2Seq, src, lens, mask, tgt_in, k: int):  # type: ignore[no-untyped-def]
    """Logits and attention of the step loop that wait-k decoding runs: step t's memory shows
    the first t + k source tokens."""
    memory, state = model.encode(src, lens, mask, wait_k=k)
    positions = torch.arange(src.size(1))
    logits, attns = [], []
    for t in range(tgt_in.size(1)):
        step_memory = memory._replace(src_mask=mask & (positions < t + k))
        out, state, attn = model.step(tgt_in[:, t], state, step_memory)
        logits.append(out)
        attns.append(attn)
    return torch.stack(logits, 1), torch.stack(attns, 1)


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("k", [1, 3])
def test_the_wait_k_mask_hides_exactly_the_unread_source(
    name: str, overrides: list[str], k: int
) -> None:
    model = uni_model(overrides)
    src, lens, mask = padded_batch([6, 3, 5])
    tgt_in = torch.randint(4, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, attn = model.forward_with_attention(src, lens, mask, tgt_in, wait_k=k)
        for b, n in enumerate(lens.tolist()):
            for t in range(tgt_in.size(1)):
                read = min(t + k, n)
                assert bool((attn[b, t, :read] > 0).all()), (b, t)
                assert bool((attn[b, t, read:] == 0).all()), (b, t)
                assert float(attn[b, t].sum()) == pytest.approx(1.0, abs=1e-5)
        # the teacher-forced paths (fast or looped) and the decoding step agree
        loop_logits, loop_attn = step_loop(model, src, lens, mask, tgt_in, k)
    torch.testing.assert_close(logits, loop_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attn, loop_attn, rtol=1e-4, atol=1e-5)


def test_wait_k_at_least_the_source_length_is_full_sentence_training() -> None:
    model = uni_model(["model.decoder.input_feeding=true"])
    src, lens, mask = padded_batch([6, 3])
    tgt_in = torch.randint(4, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(src, lens, mask, tgt_in)
        waited = model(src, lens, mask, tgt_in, wait_k=6)
    torch.testing.assert_close(full, waited)


def test_wait_k_mask_rows() -> None:
    assert wait_k_mask(3, 4, 2).tolist() == [
        [True, True, False, False],
        [True, True, True, False],
        [True, True, True, True],
    ]


def test_wait_k_mask_with_a_k_per_row_stacks_the_rows_masks() -> None:
    ks = torch.tensor([1, 3, 2])
    per_row = wait_k_mask(4, 5, ks)
    assert per_row.shape == (3, 4, 5)
    for b, k in enumerate(ks.tolist()):
        assert torch.equal(per_row[b], wait_k_mask(4, 5, k))
    with pytest.raises(ValueError, match="k >= 1"):
        wait_k_mask(4, 5, torch.tensor([2, 0]))


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_a_k_per_sentence_equals_each_sentence_with_its_own_k(
    name: str, overrides: list[str]
) -> None:
    # train.wait_k_sampling: sentence: one batch, a k per row; each row must get exactly what
    # it gets alone with its k (logits and attention), on every teacher-forcing path
    model = uni_model(overrides)
    src, lens, mask = padded_batch([6, 4, 5])
    tgt_in = torch.randint(4, VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    ks = torch.tensor([1, 3, 2])
    with torch.no_grad():
        logits, attn = model.forward_with_attention(src, lens, mask, tgt_in, wait_k=ks)
        features = model(src, lens, mask, tgt_in, features=True, wait_k=ks)  # training's path
        for b, k in enumerate(ks.tolist()):
            alone, alone_attn = model.forward_with_attention(src, lens, mask, tgt_in, wait_k=k)
            alone_features = model(src, lens, mask, tgt_in, features=True, wait_k=k)
            torch.testing.assert_close(features[b], alone_features[b], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(logits[b], alone[b], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(attn[b], alone_attn[b], rtol=1e-4, atol=1e-5)
            read = torch.minimum(torch.arange(5) + k, lens[b])
            for t in range(5):
                assert bool((attn[b, t, read[t] :] == 0).all()), (name, b, t)


def test_per_sentence_draws_cover_the_range_and_repeat_on_resume() -> None:
    draws = wait_k_of_rows((2, 5), 7, 11, 0, 0, 400)
    assert draws.shape == (400,) and set(draws.tolist()) == {2, 3, 4, 5}
    assert torch.equal(draws, wait_k_of_rows((2, 5), 7, 11, 0, 0, 400))  # resumable
    others = [wait_k_of_rows((2, 5), *key, 400) for key in [(7, 12, 0, 0), (7, 11, 1, 0),
                                                            (7, 11, 0, 1), (8, 11, 0, 0)]]  # fmt: skip
    assert all(not torch.equal(draws, other) for other in others)  # step, micro, rank, seed
    cfg = load_config(TINY, ["model.encoder.layout=uni", "train.wait_k=[2, 5]",
                             "train.wait_k_sampling=sentence"])  # fmt: skip
    assert cfg.train.wait_k_sampling == "sentence"
    with pytest.raises(ConfigError, match="wait_k_sampling"):
        load_config(TINY, ["model.encoder.layout=uni", "train.wait_k_sampling=word"])


def test_training_with_a_k_per_sentence_learns(toy_corpus: Path, tmp_path: Path) -> None:
    from nmt.train import train

    cfg = load_config(TINY, [f"data.corpus={toy_corpus}", "model.encoder.layout=uni",
                             "train.wait_k=[1, 4]", "train.wait_k_sampling=sentence",
                             "train.max_steps=60", "train.valid_every=60", "train.log_every=10",
                             "train.valid_max_sentences=5", "train.test_at_end=false"])  # fmt: skip
    train(cfg, tmp_path / "run", progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_train_wait_k_config_and_per_batch_draws() -> None:
    cfg = load_config(TINY, ["model.encoder.layout=uni", "train.wait_k=[2, 5]"])
    assert cfg.train.wait_k == (2, 5)
    draws = {wait_k_of_step(cfg.train.wait_k, 7, step) for step in range(200)}
    assert draws == {2, 3, 4, 5}
    assert wait_k_of_step((2, 5), 7, 11) == wait_k_of_step((2, 5), 7, 11)  # resumable
    assert wait_k_of_step(3, 7, 11) == 3 and wait_k_of_step(None, 7, 11) is None
    with pytest.raises(ConfigError, match="layout: uni"):
        load_config(TINY, ["train.wait_k=3"])
    with pytest.raises(ConfigError, match="train.wait_k"):
        load_config(TINY, ["model.encoder.layout=uni", "train.wait_k=[4, 2]"])


# -- the live policy against offline wait-k ---------------------------------------------------


@pytest.fixture(scope="module")
def waitk_translator(tiny_waitk_model_dir: Path) -> Translator:
    return Translator.load(tiny_waitk_model_dir)


SENTENCES = [
    "El gato come pan hoy.",
    "La niña busca una casa mañana.",
    "Mi amigo tiene flores.",
    "El hombre ve la luna ahora.",
    "Agua.",
]


def offline(translator: Translator, text: str, k: int) -> list[int]:
    batch = translator._batch(translator.tokenizer.encode_src([text]))
    with torch.no_grad():
        (hyp,) = wait_k_search(translator.model, batch, k, translator.options)  # type: ignore[arg-type]
    return hyp.tokens


@pytest.mark.parametrize("k", [1, 2, 4, 30])
def test_the_live_policy_fed_a_whole_sentence_at_once_matches_offline_wait_k(
    waitk_translator: Translator, k: int
) -> None:
    for text in SENTENCES:
        policy = WaitKPolicy(waitk_translator, k)
        words = policy.feed(text) + policy.finish()
        assert policy.tokens == offline(waitk_translator, text, k), text
        assert " ".join(words) == waitk_translator.tokenizer.decode_tgt([policy.tokens])[0]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_the_live_policy_fed_word_by_word_or_typed_gives_the_same_output(
    waitk_translator: Translator, k: int
) -> None:
    for text in SENTENCES:
        expected = offline(waitk_translator, text, k)
        by_word = WaitKPolicy(waitk_translator, k)
        released, delays = [], []
        for word in text.split():
            words = by_word.feed(word + " ")
            released += words
            delays += [by_word.source_words] * len(words)
        released += by_word.finish()
        delays += [by_word.source_words] * (len(released) - len(delays))
        assert by_word.tokens == expected, text
        assert simulate(waitk_translator, text, k).delays == delays
        typed = WaitKPolicy(waitk_translator, k)
        for ch in text:  # one character at a time, as typed
            typed.feed(ch)
        typed.finish()
        assert typed.tokens == expected and typed.text == " ".join(released), text


def test_the_batched_offline_search_matches_one_sentence_at_a_time(
    waitk_translator: Translator,
) -> None:
    texts = translate_wait_k(waitk_translator, SENTENCES, 2)
    singles = [waitk_translator.tokenizer.decode_tgt([offline(waitk_translator, t, 2)])[0]
               for t in SENTENCES]  # fmt: skip
    assert texts == singles
    assert any(t.strip() for t in texts)


@dataclass
class Typist:
    """A live client as the live worker sees it: frames of text (None: the end of a sentence)
    sent one at a time, the next once the last is answered, from tick `start`; at tick `leaves`
    it goes. A sentence's frames go to a policy of its own, made at its first frame."""

    translator: Translator
    k: int
    frames: list[str | None]
    start: int = 0
    leaves: int | None = None
    sent: int = 0
    policies: list[WaitKPolicy] = field(default_factory=list)  # one per sentence
    answers: list[tuple[list[str], int]] = field(default_factory=list)  # (words, source words)
    ended: bool = True  # the last policy's sentence has ended

    def send(self) -> None:
        if self.ended:
            self.policies.append(WaitKPolicy(self.translator, self.k))
        frame = self.frames[self.sent]
        self.sent += 1
        self.ended = frame is None
        self.policies[-1].end() if frame is None else self.policies[-1].read(frame)


def alone(translator: Translator, k: int, frames: list[str | None]) -> Typist:
    """`frames` fed to policies by themselves (`feed`, `finish`), one sentence at a time."""
    typist = Typist(translator, k, frames)
    policy = None
    for frame in frames:
        policy = policy or WaitKPolicy(translator, k)
        words = policy.finish() if frame is None else policy.feed(frame)
        typist.answers.append((words, policy.source_words))
        if frame is None:
            typist.policies.append(policy)
            policy = None
    typist.policies += [policy] if policy else []
    return typist


def write_together(typists: list[Typist], encoded: list[int] | None = None) -> list[int]:
    """Runs the typists as the live worker does: each tick, reads the frames sent, encodes
    their words together (`encode_pending`), answers those with nothing left to write and
    writes one step of all the others in one `write_steps` call. Returns the number of
    sentences in each call (and appends those of each encoder call to `encoded`)."""
    sizes: list[int] = []
    in_flight: set[int] = set()
    tick = 0
    while True:
        for i, typist in enumerate(typists):
            if typist.leaves == tick:
                in_flight.discard(i)
                typist.sent = len(typist.frames)  # gone: sends nothing more
            if i not in in_flight and tick >= typist.start and typist.sent < len(typist.frames):
                typist.send()
                in_flight.add(i)
        groups = encode_pending([typists[i].policies[-1] for i in sorted(in_flight)])
        if encoded is not None:
            encoded.extend(groups)
        steps = []
        for i in sorted(in_flight):
            policy = typists[i].policies[-1]
            step = policy.next_step()
            if step is None:
                typists[i].answers.append((policy.release(), policy.source_words))
                in_flight.remove(i)
            else:
                steps.append(step)
        if steps:
            write_steps(steps)
            sizes.append(len(steps))
        elif all(t.sent == len(t.frames) for t in typists) and not in_flight:
            return sizes
        tick += 1


def by_word(text: str) -> list[str | None]:
    return [word + " " for word in text.split()] + [None]


def test_sentences_written_together_give_what_each_writes_alone(
    waitk_translator: Translator,
) -> None:
    # (k, frames, start tick, tick it leaves at): different k and lengths, typed by word, by
    # character or all at once, one starting late, short ones ending while others go on
    # (and starting again), one leaving mid-sentence
    plan: list[tuple[int, list[str | None], int, int | None]] = [
        (1, by_word(SENTENCES[0]), 0, None),
        (2, by_word(SENTENCES[1]) + by_word(SENTENCES[4]), 0, None),
        (4, [*SENTENCES[2], None], 3, None),  # character by character
        (30, [SENTENCES[3], None], 1, None),  # all at once: the whole flush at the end
        (2, by_word(SENTENCES[4]), 2, None),
        (1, by_word(SENTENCES[1]), 0, 6),  # leaves mid-sentence
    ]
    typists = [Typist(waitk_translator, k, frames, start, leaves)
               for k, frames, start, leaves in plan]  # fmt: skip
    encoded: list[int] = []
    sizes = write_together(typists, encoded)
    assert max(sizes) >= 4  # the sentences really shared decoder calls
    assert max(encoded) >= 2  # and encoder calls
    for typist, (k, frames, _, leaves) in zip(typists, plan, strict=True):
        own = alone(waitk_translator, k, frames)
        if leaves is None:
            assert typist.answers == own.answers, (k, frames)
            assert [p.tokens for p in typist.policies] == [p.tokens for p in own.policies]
            assert all(p.done for p in typist.policies)
        else:  # what it wrote before it left is what it writes alone, so far
            assert 0 < len(typist.answers) < len(own.answers)
            assert typist.answers == own.answers[: len(typist.answers)]
            (policy,) = typist.policies
            assert policy.tokens == own.policies[0].tokens[: len(policy.tokens)]
            assert not policy.done


def test_a_batch_of_sentences_by_write_steps_matches_offline_wait_k(
    waitk_translator: Translator,
) -> None:
    for k in (1, 3):
        typists = [Typist(waitk_translator, k, by_word(text)) for text in SENTENCES]
        write_together(typists)
        for typist, text in zip(typists, SENTENCES, strict=True):
            assert typist.policies[0].tokens == offline(waitk_translator, text, k), (k, text)


def test_a_word_is_encoded_only_once_complete_and_output_is_never_revised(
    waitk_translator: Translator,
) -> None:
    policy = WaitKPolicy(waitk_translator, 1)
    assert policy.feed("El ga") == [] and policy.source_words == 1
    policy.feed("to")
    assert policy.source_words == 1  # "gato" may still go on
    shown: list[str] = []
    for chunk in [" come", " pan ", "hoy."]:
        shown += policy.feed(chunk)
        assert policy.text == " ".join(shown)  # committed text only grows
    shown += policy.finish()
    assert policy.source_words == 5 and policy.done
    assert policy.text == " ".join(shown) and shown
    with pytest.raises(ValueError, match="ended"):
        policy.feed("más")


@pytest.mark.parametrize("k", [1, 2, 30])
def test_an_end_written_ahead_is_what_the_end_writes(waitk_translator: Translator, k: int) -> None:
    # after each frame the end is drafted some steps ahead (none, one, all); a frame read
    # afterwards discards the draft, and the end adopts it: every release is as without drafts,
    # and an end whose draft is complete has nothing left to write
    for text in SENTENCES:
        for frames in (by_word(text), [*text, None]):  # by word; by character (the last word
            own = alone(waitk_translator, k, frames)  # is still being typed at the end)
            for ahead in (0, 1, 1000):
                policy = WaitKPolicy(waitk_translator, k)
                answers, draft = [], None
                for frame in frames:
                    if frame is not None:
                        answers.append((policy.feed(frame), policy.source_words))
                        assert draft is None or policy.end_draft() is not draft  # discarded
                        draft = policy.end_draft()
                        assert draft is not None and draft.source_ended
                        for _ in range(ahead):
                            if (step := draft.next_step()) is None:
                                break
                            write_steps([step])
                        continue
                    complete = cast(WaitKPolicy, draft).done
                    policy.end()
                    assert policy.end_draft() is None  # the input has ended
                    if complete:
                        assert policy.next_step() is None and policy.done
                    while (step := policy.next_step()) is not None:
                        write_steps([step])
                    answers.append((policy.release(), policy.source_words))
                assert answers == own.answers, (k, frames, ahead)
                assert policy.tokens == own.policies[0].tokens
                assert complete or ahead < 1000


def test_no_end_is_drafted_past_the_subword_limit(waitk_translator: Translator) -> None:
    from nmt.simultaneous import SourceTooLongError

    read = "El gato come "
    limit = sum(len(p) for p in waitk_translator.tokenizer.encode_src(read.split()))
    policy = WaitKPolicy(waitk_translator, 2, max_source_tokens=limit)
    policy.feed(read)
    assert policy.end_draft() is not None  # ending here is within the limit
    policy.feed("pan")  # still being typed: over the limit if the input ends now
    assert policy.end_draft() is None
    with pytest.raises(SourceTooLongError, match=f"limit is {limit}"):
        policy.end()


def test_the_policy_refuses_a_source_over_its_limit(waitk_translator: Translator) -> None:
    from nmt.simultaneous import SourceTooLongError

    policy = WaitKPolicy(waitk_translator, 2, max_source_tokens=4)
    with pytest.raises(SourceTooLongError, match="limit is 4"):
        policy.feed("El gato come pan hoy mañana ahora ")


def test_a_bidirectional_model_cannot_translate_live(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="layout: uni"):
        WaitKPolicy(Translator.load(tiny_model_dir), 3)


# -- latency metrics ----------------------------------------------------------------------------


def test_latency_metrics_equal_hand_computed_values() -> None:
    # 4 source words, 4 target words written after reading 2, 3, 4, 4 words (wait-2)
    delays, src_len = [2, 3, 4, 4], 4
    # gamma = 1: AL = ((2 - 0) + (3 - 1) + (4 - 2)) / 3, stopping at the first d = |X|
    assert average_lagging(delays, src_len) == pytest.approx(2.0)
    assert average_proportion(delays, src_len) == pytest.approx(13 / 16)
    # d' = 2, 3, 4, 5: DAL = (2 + 2 + 2 + 2) / 4
    assert differentiable_average_lagging(delays, src_len) == pytest.approx(2.0)
    # against a 2-word reference: gamma = 1/2, AL = ((2 - 0) + (3 - 2) + (4 - 4)) / 3
    assert average_lagging(delays, src_len, reference_length=2) == pytest.approx(1.0)
    assert average_proportion(delays, src_len, reference_length=2) == pytest.approx(13 / 8)
    # 2 source words, 3 target words after reading 1, 2, 2: gamma = 3/2
    assert average_lagging([1, 2, 2], 2) == pytest.approx(((1 - 0) + (2 - 2 / 3)) / 2)
    # d' = 1, 2, 2 + 2/3: DAL = (1 + (2 - 2/3) + (8/3 - 4/3)) / 3
    assert differentiable_average_lagging([1, 2, 2], 2) == pytest.approx(11 / 9)
    lat = corpus_latency([[2, 3, 4, 4], [], [1, 2, 2]], [4, 3, 2])
    assert lat.sentences == 2 and lat.al == pytest.approx((2.0 + 7 / 6) / 2)


# a real output: the tiny wait-k model of these tests (`train_tiny_waitk`) translating the first
# toy test sentences with k = 2 (`simulate`): (delays, source words, reference words), and
# SimulEval 1.1.4's ALScorer / APScorer / DALScorer on them (run once, with its default
# use_ref_len), e.g. 'Mi amigo busca un libro ahora.' -> 'My friend wants a house...'
REAL_DELAYS = [([2, 3, 4, 4], 4, 4), ([2, 3, 5, 6, 6], 6, 7), ([2, 5, 5, 5], 5, 5)]
SIMULEVAL = [
    (2.0, 0.8125, 2.0),
    (2.7142857142857144, 0.5238095238095238, 2.3600000000000003),
    (3.0, 0.68, 3.3125),
]


def test_latency_metrics_equal_simuleval_on_a_real_output() -> None:
    for (delays, src_len, ref_len), (al, ap, dal) in zip(REAL_DELAYS, SIMULEVAL, strict=True):
        assert average_lagging(delays, src_len, ref_len) == pytest.approx(al)
        assert average_proportion(delays, src_len, ref_len) == pytest.approx(ap)
        assert differentiable_average_lagging(delays, src_len) == pytest.approx(dal)


def test_latency_metrics_equal_the_installed_simuleval(waitk_translator: Translator) -> None:
    scorers = pytest.importorskip("simuleval.evaluator.scorers.latency_scorer")
    refs = ["The cat eats bread today.", "The girl looks for a house tomorrow.", "Bread."]
    for source, ref in zip(SENTENCES[:2] + SENTENCES[-1:], refs, strict=True):
        for k in (1, 3):
            sim = simulate(waitk_translator, source, k)
            if not sim.delays:
                continue
            ins = SimpleNamespace(delays=sim.delays, source_length=sim.source_length,
                                  reference=ref, reference_length=len(ref.split()))  # fmt: skip
            ref_len = len(ref.split())
            ours = [average_lagging(sim.delays, sim.source_length, ref_len),
                    average_proportion(sim.delays, sim.source_length, ref_len),
                    differentiable_average_lagging(sim.delays, sim.source_length)]  # fmt: skip
            theirs = [scorers.ALScorer().compute(ins), scorers.APScorer().compute(ins),
                      scorers.DALScorer().compute(ins)]  # fmt: skip
            assert ours == pytest.approx(theirs)


def test_evaluate_with_wait_k_reports_bleu_and_latency(
    tiny_waitk_model_dir: Path, toy_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src, ref = tmp_path / "src.es", tmp_path / "ref.en"
    src.write_text(
        "".join(line + "\n" for line in (toy_corpus / "test.es").read_text().split("\n")[:8])
    )
    ref.write_text(
        "".join(line + "\n" for line in (toy_corpus / "test.en").read_text().split("\n")[:8])
    )
    out = tmp_path / "hyp.en"
    code = main(["evaluate", "--model", str(tiny_waitk_model_dir), "--src", str(src), "--ref",
                 str(ref), "--wait-k", "2", "--json", "--bootstrap", "0", "--output", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    lat = report["latency"]
    assert lat["wait_k"] == 2 and lat["sentences"] == 8
    assert 0 < lat["ap"] <= 1.5 and math.isfinite(lat["al"]) and lat["dal"] >= 1
    translator = Translator.load(tiny_waitk_model_dir)
    sources = src.read_text().splitlines()
    assert out.read_text().splitlines() == [simulate(translator, s, 2).text for s in sources]


def test_a_wait_k_model_is_validated_and_scored_by_wait_k_decoding(
    tiny_waitk_model_dir: Path, toy_corpus: Path
) -> None:
    """Checkpoints of a wait-k model are chosen on wait-k BLEU at its live k (3 within 1..4),
    and its model card carries the wait-k test score beside the full-sentence one."""
    from nmt.metrics import corpus_scores
    from nmt.validate import score_on_dev

    record = score_on_dev(tiny_waitk_model_dir)
    assert record["dev_wait_k"] == 3 and record["dev_sentences"] == 10
    translator = Translator.load(tiny_waitk_model_dir, precision="fp32")
    src = (toy_corpus / "dev.es").read_text().split("\n")[:10]
    refs = (toy_corpus / "dev.en").read_text().split("\n")[:10]
    hyps = translate_wait_k(translator, src, 3)
    assert record["dev_bleu"] == pytest.approx(corpus_scores(hyps, [refs]).bleu)
    scores = json.loads((tiny_waitk_model_dir / "meta.json").read_text())["scores"]
    assert scores["dev_wait_k"] == 3 and scores["test_wait_k"] == 3
    assert 0 <= scores["test_wait_k_bleu"] <= 100
    card = (tiny_waitk_model_dir / "README.md").read_text()
    assert "wait-3 decoding" in card and "Test BLEU, wait-3" in card
