"""The live route's worker: sessions written together in batched decoder steps each get exactly
what they get alone, and a session whose client leaves drops out of the batch at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from test_simultaneous import SENTENCES, alone, by_word, train_tiny_waitk

import nmt.simultaneous
from nmt.simultaneous import WaitKPolicy, WaitKStep
from nmt.translate import Translator
from serve.live import LiveWorker


@pytest.fixture(scope="module")
def translator(toy_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Translator:
    return Translator.load(train_tiny_waitk(toy_corpus, tmp_path_factory.getbasetemp()))


class Batches:
    """Records the policies of every `write_steps` call; `hold` pauses the worker thread inside
    the first call that includes that policy until `resume` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list[WaitKPolicy]] = []
        self.hold: WaitKPolicy | None = None
        self.held_at = -1  # the index of the call it held
        self.holding, self.resume = threading.Event(), threading.Event()
        write_steps = nmt.simultaneous.write_steps

        def recording(steps: Sequence[WaitKStep]) -> None:
            self.calls.append([s.policy for s in steps])
            if self.hold is not None and self.hold in self.calls[-1] and self.held_at < 0:
                self.held_at = len(self.calls) - 1
                self.holding.set()
                assert self.resume.wait(10)
            write_steps(steps)

        monkeypatch.setattr(nmt.simultaneous, "write_steps", recording)


async def new_policy(worker: LiveWorker, served: Translator, k: int) -> WaitKPolicy:
    policy: WaitKPolicy = await worker.run(lambda: WaitKPolicy(worker.translator(served), k))
    return policy


async def type_frames(worker: LiveWorker, policy: WaitKPolicy, frames: list[str | None]
                      ) -> list[tuple[list[str], int]]:  # fmt: skip
    """Sends the frames one at a time as a route does, each once the last is answered."""
    return [await asyncio.wrap_future(worker.submit(policy, frame)) for frame in frames]


def test_sessions_batched_on_the_worker_get_what_each_gets_alone(
    translator: Translator, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = Batches(monkeypatch)
    plan = [(1, SENTENCES[0]), (2, SENTENCES[1]), (4, SENTENCES[2]), (30, SENTENCES[3]),
            (2, SENTENCES[4]), (3, SENTENCES[1])]  # fmt: skip

    async def main() -> list[list[tuple[list[str], int]]]:
        worker = LiveWorker()
        policies = [await new_policy(worker, translator, k) for k, _ in plan]
        return await asyncio.gather(*(type_frames(worker, policy, by_word(text))
                                      for policy, (_, text) in zip(policies, plan, strict=True)))  # fmt: skip

    answers = asyncio.run(main())
    for got, (k, text) in zip(answers, plan, strict=True):
        assert got == alone(translator, k, by_word(text)).answers, (k, text)
    assert max(len(call) for call in batches.calls) >= 3  # the sessions shared decoder calls
    assert any(len({p.k for p in call}) > 1 for call in batches.calls)


def test_a_session_that_leaves_mid_flush_drops_out_of_the_batch_at_once(
    translator: Translator, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = Batches(monkeypatch)

    async def main() -> None:
        worker = LiveWorker(drafts=False)  # the end is written when it comes
        leaving = await new_policy(worker, translator, 30)  # writes nothing before the end
        others = [await new_policy(worker, translator, k) for k in (1, 2)]
        await type_frames(worker, leaving, [w + " " for w in SENTENCES[1].split()])
        batches.hold = leaving
        flush = worker.submit(leaving, None)  # the end: every step of the sentence
        typing = asyncio.gather(*(type_frames(worker, policy, by_word(text))
                                  for policy, text in zip(others, SENTENCES, strict=False)))  # fmt: skip
        assert await asyncio.to_thread(batches.holding.wait, 10)  # its first flush step
        worker.drop(leaving)  # the client left
        batches.resume.set()
        answers = await typing
        assert not flush.done()  # never answered
        # the held step was its last: the next tick, and all after it, went on without it
        assert [i for i, call in enumerate(batches.calls) if leaving in call] == [batches.held_at]
        assert len(batches.calls) > batches.held_at + 1
        own = alone(translator, 30, by_word(SENTENCES[1])).policies[0]
        assert leaving.tokens == own.tokens[:1] and len(own.tokens) > 1 and not leaving.done
        for got, policy, text in zip(answers, others, SENTENCES, strict=False):
            assert got == alone(translator, policy.k, by_word(text)).answers

    asyncio.run(main())


def test_words_go_out_as_each_step_completes_them(translator: Translator) -> None:
    # with on_words, a frame that allows several steps (here the end of a k=30 sentence: the
    # whole translation) releases its words tick by tick; with the answer's rest they are
    # exactly what the frame releases alone, in order
    async def main() -> tuple[list[list[list[str]]], list[tuple[list[str], int]]]:
        worker = LiveWorker(drafts=False)  # the end is written when it comes
        policy = await new_policy(worker, translator, 30)
        pieces: list[list[list[str]]] = []
        answers = []
        for frame in by_word(SENTENCES[3]):
            early: list[list[str]] = []
            answer = await asyncio.wrap_future(
                worker.submit(policy, frame, lambda words, read, early=early: early.append(words))
            )
            pieces.append([*early, answer[0]])
            answers.append(([w for piece in pieces[-1] for w in piece], answer[1]))
        return pieces, answers

    pieces, answers = asyncio.run(main())
    assert answers == alone(translator, 30, by_word(SENTENCES[3])).answers
    flush = [piece for piece in pieces[-1] if piece]
    assert len(flush) > 1  # the end flush went out in several releases
    assert all(len(p) == 0 for frame in pieces[:-1] for p in frame)  # k=30: nothing before


async def draft_complete(worker: LiveWorker, policy: WaitKPolicy) -> bool:
    """Waits (up to 10 s) for the worker to have written the end of the policy's sentence
    ahead, in its idle time; asks on the worker thread, which owns the policy."""
    for _ in range(1000):
        draft = await worker.run(policy.end_draft)
        if draft is not None and draft.done:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize("drafts", [True, False])
def test_an_idle_worker_writes_the_end_ahead_and_the_end_releases_it_at_once(
    translator: Translator, monkeypatch: pytest.MonkeyPatch, drafts: bool
) -> None:
    # k=30 writes nothing before the end, so the end flush is the whole translation; with
    # drafts the worker wrote it while waiting, and the end frame needs no decoder step
    batches = Batches(monkeypatch)
    frames = by_word(SENTENCES[3])
    own = alone(translator, 30, frames)

    async def main() -> None:
        worker = LiveWorker(drafts=drafts)
        policy = await new_policy(worker, translator, 30)
        other = await new_policy(worker, translator, 2)  # types on meanwhile: its own steps
        typing = asyncio.create_task(type_frames(worker, other, by_word(SENTENCES[1])))
        answers = await type_frames(worker, policy, frames[:-1])
        await typing
        if drafts:
            assert await draft_complete(worker, policy)
        calls = len(batches.calls)
        early: list[list[str]] = []
        words, read = await asyncio.wrap_future(
            worker.submit(policy, None, lambda words, read: early.append(words))
        )
        answers.append(([w for piece in [*early, words] for w in piece], read))
        assert answers == own.answers
        assert policy.tokens == own.policies[0].tokens and policy.done
        flush_calls = [c for c in batches.calls[calls:] if policy in c]
        if drafts:  # released at once, in one piece, with no step of its own
            assert flush_calls == [] and early == []
            assert any(policy not in c and len(c) > 0 for c in batches.calls[:calls])
        else:
            assert len(flush_calls) == len(policy.tokens) + 1  # every token and EOS
        assert await worker.run(lambda: worker._open) == {}  # an ended sentence is not drafted

    asyncio.run(main())


def test_a_bf16_live_copy_keeps_bf16_weights_and_batches_exactly(translator: Translator) -> None:
    # NMT_LIVE_PRECISION=bf16: the worker's own model copy holds bf16 weights (the served one
    # keeps its fp32), and sessions batched on it write what each writes alone on it
    plan = [(1, SENTENCES[0]), (2, SENTENCES[1]), (3, SENTENCES[2]), (30, SENTENCES[3])]

    async def main() -> tuple[Translator, list[list[tuple[list[str], int]]]]:
        worker = LiveWorker(precision="bf16")
        live = await worker.run(worker.translator, translator)
        policies = [await new_policy(worker, translator, k) for k, _ in plan]
        answers = await asyncio.gather(*(type_frames(worker, policy, by_word(text))
                                         for policy, (_, text) in zip(policies, plan, strict=True)))  # fmt: skip
        return live, answers

    live, answers = asyncio.run(main())
    assert live.precision == "bf16"
    assert {p.dtype for p in live.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in translator.model.parameters()} == {torch.float32}
    for got, (k, text) in zip(answers, plan, strict=True):
        assert got == alone(live, k, by_word(text)).answers, (k, text)
    assert any(words for got in answers for words, _ in got)
