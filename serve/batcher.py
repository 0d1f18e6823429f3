"""Dynamic batching: a bounded queue of texts, token-bounded batches, one worker thread owning the model.

Routes call `Batcher.submit` (never blocks) and then `await` the job's events, which the worker
hands over with `loop.call_soon_threadsafe`, so the event loop never waits on the model. The worker
takes the oldest waiting text, waits up to `max_wait_s` for company with the same decoding options,
and translates texts in arrival order until the padded token budget is reached. Batches only ever
mix texts with identical options; whether a text's translation can depend on its batch mates is up
to the model (padding is masked), which the service tests check.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve.metrics import Metrics

logger = logging.getLogger(__name__)

STREAM = "stream"  # the key of token-by-token jobs, which always run alone


class ServiceError(Exception):
    """An expected failure with an HTTP status and a stable error code."""

    status = 500
    code = "internal_error"
    retry_after: int | None = None

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after


class QueueFullError(ServiceError):
    status, code = 503, "overloaded"


class NotReadyError(ServiceError):
    status, code = 503, "not_ready"


class ShuttingDownError(ServiceError):
    status, code = 503, "shutting_down"


class TranslationTimeoutError(ServiceError):
    status, code = 504, "timeout"


class TranslationFailedError(ServiceError):
    status, code = 500, "translation_failed"


class TranslatorLike(Protocol):
    """What the worker needs from `nmt.translate.Translator`."""

    tokenizer: Any

    def translate(
        self,
        texts: list[str],
        *,
        beam_size: int | None = ...,
        n_best: int = ...,
        max_length: int | None = ...,
        return_alignments: bool = ...,
    ) -> list[Any]: ...

    def translate_stream(self, text: str) -> Iterator[str]: ...

    def info(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DecodeOptions:
    """One batch's decoding options; texts are only batched with texts that share them."""

    beam_size: int
    n_best: int = 1
    max_length: int | None = None
    return_alignments: bool = False


@dataclass(frozen=True)
class JobEvent:
    """What the worker reports: a finished text, a partial streamed text, the end, or an error."""

    kind: str  # "result" | "token" | "end" | "error"
    index: int = 0
    value: Any = None  # TranslationResult, str, or ServiceError


@dataclass(eq=False)
class Job:
    """One request's texts on their way through the queue."""

    texts: list[str]
    key: DecodeOptions | str  # STREAM for token streaming
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() by which the request must be answered
    timeout_s: float
    events: asyncio.Queue[JobEvent] = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the route (timeout, client gone); the worker skips the job

    def emit(self, event: JobEvent) -> None:
        """Called from the worker thread: hands one event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the client is long gone
            self.cancelled = True

    def cancel(self) -> None:
        self.cancelled = True

    async def next_event(self) -> JobEvent:
        """The next event, or TranslationTimeoutError once the deadline has passed."""
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                return self.events.get_nowait()
            return await asyncio.wait_for(self.events.get(), remaining)
        except (TimeoutError, asyncio.QueueEmpty):
            self.cancel()
            raise TranslationTimeoutError(
                f"translation did not finish within the request timeout of {self.timeout_s:g} s"
            ) from None

    async def stream(self) -> AsyncIterator[JobEvent]:
        """Events until the job ends; errors are raised. Cancels the job if the consumer leaves."""
        try:
            done = 0
            while done < len(self.texts):
                event = await self.next_event()
                if event.kind == "error":
                    raise event.value
                if event.kind in ("result", "end"):
                    done += 1
                yield event
        finally:
            self.cancel()  # harmless when finished; stops the worker when the client went away


@dataclass(eq=False)
class _Item:
    job: Job
    index: int
    enqueued: float
    tokens: int = 0  # source subwords, set by the worker


class Batcher:
    """A queue of texts and the one thread that loads the model and translates them."""

    def __init__(
        self,
        load: Callable[[], TranslatorLike],
        *,
        metrics: Metrics,
        batching: bool = True,
        batch_tokens: int = 4096,
        max_wait_s: float = 0.005,
        max_queue: int = 1024,
        retry_after_s: int = 1,
        warmup: bool = False,
    ) -> None:
        self._load = load
        self.warmup = warmup
        self.metrics = metrics
        self.batching = batching
        self.batch_tokens = batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.translator: TranslatorLike | None = None
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._cond = threading.Condition()
        self._inbound: list[_Item] = []  # guarded by _cond
        self._queued = 0  # texts submitted and not yet taken into a batch; guarded by _cond
        self._stopping = False
        self._pending: list[_Item] = []  # worker thread only
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the worker, which loads the model first; `ready` turns True once it has."""
        self._thread = threading.Thread(target=self._run, name="nmt-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops taking work, answers everything still queued with 503 and joins the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("batcher worker still busy after %.0f s; leaving it", timeout_s)
        self.metrics.ready.set(0)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping

    def wait_ready(self, timeout_s: float) -> bool:
        """Blocks until the model is loaded (True) or loading failed or timed out (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.load_error is None:
            if self._ready.wait(0.05):
                return True
        return False

    @property
    def queue_depth(self) -> int:
        return self._queued

    # -- the route side (event loop thread) ---------------------------------------------------

    def submit(self, texts: list[str], key: DecodeOptions | str, timeout_s: float) -> Job:
        """Queues texts for translation; raises a ServiceError at once when that cannot happen."""
        if self.load_error is not None:
            raise NotReadyError("the model failed to load; see the server log")
        if not self._ready.is_set():
            raise NotReadyError("the model is still loading", self.retry_after_s)
        now = time.monotonic()
        job = Job(texts, key, asyncio.get_running_loop(), now + timeout_s, timeout_s)
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down", self.retry_after_s)
            if self._queued + len(texts) > self.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFullError(
                    f"the translation queue is full ({self._queued} of {self.max_queue} texts "
                    "waiting); retry later",
                    self.retry_after_s,
                )
            self._inbound.extend(_Item(job, i, now) for i in range(len(texts)))
            self._queued += len(texts)
            self.metrics.queue_depth.set(self._queued)
            self._cond.notify()
        return job

    async def translate(
        self, texts: list[str], options: DecodeOptions, timeout_s: float
    ) -> list[Any]:
        """Translations of `texts` in input order, translated together with other requests."""
        job = self.submit(texts, options, timeout_s)
        results: list[Any] = [None] * len(texts)
        async for event in job.stream():
            results[event.index] = event.value
        return results

    # -- the worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.translator = self._load()
            if self.warmup:
                self._warm_up(self.translator)
        except Exception as err:
            self.load_error = f"{type(err).__name__}: {err}"
            logger.exception("loading the model failed")
            return
        self._ready.set()
        self.metrics.ready.set(1)
        logger.info("model loaded; batching=%s batch_tokens=%d", self.batching, self.batch_tokens)
        try:
            while (batch := self._next_batch()) is not None:
                self._process(batch)
        finally:
            self._fail_all(ShuttingDownError("the server is shutting down"))

    @staticmethod
    def _warm_up(translator: TranslatorLike) -> None:
        """One short translation, so the first client does not pay for kernel setup."""
        start = time.perf_counter()
        translator.translate(["Hello, world."], beam_size=1)
        translator.translate(["Hello, world."])
        logger.info("warm-up took %.2f s", time.perf_counter() - start)

    def _collect(self, timeout_s: float) -> bool:
        """Moves newly queued texts into the worker's list, waiting up to timeout_s for some.

        Returns False once the batcher is stopping.
        """
        with self._cond:
            if not self._inbound and not self._stopping and timeout_s > 0:
                self._cond.wait(timeout_s)
            new, self._inbound = self._inbound, []
            stopping = self._stopping
        if new:
            assert self.translator is not None
            lengths = self.translator.tokenizer.encode_src([it.job.texts[it.index] for it in new])
            for item, ids in zip(new, lengths, strict=True):
                item.tokens = max(len(ids), 1)  # an empty encoding still costs one position
            self._pending.extend(new)
        return not stopping

    def _drop_cancelled(self) -> None:
        kept = [it for it in self._pending if not it.job.cancelled]
        if len(kept) != len(self._pending):
            self._dequeued(len(self._pending) - len(kept))
            self._pending = kept

    def _dequeued(self, n: int) -> None:
        with self._cond:
            self._queued -= n
            self.metrics.queue_depth.set(self._queued)

    def _next_batch(self) -> list[_Item] | None:
        """The next batch (one option set, at most batch_tokens padded tokens), or None to stop."""
        while True:
            if not self._collect(0.0 if self._pending else 0.25):
                return None
            self._drop_cancelled()
            if not self._pending:
                continue
            first = self._pending[0]
            if self.batching and first.job.key != STREAM:
                fill_by = first.enqueued + self.max_wait_s
                while (left := fill_by - time.monotonic()) > 0 and not self._full(first.job.key):
                    if not self._collect(left):
                        return None
                self._drop_cancelled()
                if not self._pending or self._pending[0] is not first:
                    continue  # the oldest text went away while waiting; start again
            batch = self._take(first)
            self._dequeued(len(batch))
            return batch

    def _full(self, key: DecodeOptions | str) -> bool:
        same = [it.tokens for it in self._pending if it.job.key == key]
        return max(same) * len(same) >= self.batch_tokens

    def _take(self, first: _Item) -> list[_Item]:
        """Texts in arrival order with first's options (first's request only without batching)."""
        if first.job.key == STREAM:
            chosen = [first]
        else:
            chosen, longest = [], 0
            for item in self._pending:
                if item.job.key != first.job.key or (
                    not self.batching and item.job is not first.job
                ):
                    continue
                longest_if = max(longest, item.tokens)
                if chosen and longest_if * (len(chosen) + 1) > self.batch_tokens:
                    break
                chosen.append(item)
                longest = longest_if
        taken = set(map(id, chosen))
        self._pending = [it for it in self._pending if id(it) not in taken]
        return chosen

    def _process(self, batch: list[_Item]) -> None:
        assert self.translator is not None
        key = batch[0].job.key
        start = time.perf_counter()
        try:
            if key == STREAM:
                self._stream_one(batch[0])
            else:
                assert isinstance(key, DecodeOptions)
                self._translate_batch(batch, key)
        except Exception as err:  # a bug or a model failure: answer every request, keep serving
            logger.exception("translation failed for a batch of %d texts", len(batch))
            failure = TranslationFailedError(f"translation failed ({type(err).__name__})")
            for job in {id(it.job): it.job for it in batch}.values():
                job.emit(JobEvent("error", value=failure))
            return
        self.metrics.batch_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(max(it.tokens for it in batch) * len(batch))
        self.metrics.texts.inc(len(batch))

    def _translate_batch(self, batch: list[_Item], options: DecodeOptions) -> None:
        assert self.translator is not None
        results = self.translator.translate(
            [it.job.texts[it.index] for it in batch],
            beam_size=options.beam_size,
            n_best=options.n_best,
            max_length=options.max_length,
            return_alignments=options.return_alignments,
        )
        for item, result in zip(batch, results, strict=True):
            item.job.emit(JobEvent("result", item.index, result))

    def _stream_one(self, item: _Item) -> None:
        assert self.translator is not None
        job = item.job
        for text in self.translator.translate_stream(job.texts[item.index]):
            if job.cancelled or time.monotonic() > job.deadline:
                return  # the route has answered with a timeout or the client has left
            job.emit(JobEvent("token", item.index, text))
        job.emit(JobEvent("end", item.index))

    def _fail_all(self, error: ServiceError) -> None:
        with self._cond:
            items, self._inbound = self._pending + self._inbound, []
            self._pending = []
            self._queued = 0
            self.metrics.queue_depth.set(0)
        for job in {id(it.job): it.job for it in items}.values():
            job.emit(JobEvent("error", value=error))
