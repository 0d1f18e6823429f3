"""Dynamic batching: a bounded queue of texts, work-bounded batches, one supervised worker thread.

Routes call `Batcher.submit` (never blocks) and then `await` the job's events, which the worker
hands over with `loop.call_soon_threadsafe`, so the event loop never waits on the model. The worker
takes the waiting text whose request has been served least (oldest first among equals, so a
64-text request cannot starve a one-text request behind it), waits up to `max_wait_s` for company
with the same decoding options, and adds texts until the batch's work (longest source x texts x
beams) reaches the budget. Batches only ever mix texts with identical options; whether a text's
translation can depend on its batch mates is up to the model (padding is masked), which the
service tests check.

The worker is supervised: an error in one batch fails that batch's requests only (500, with the
request id in the log), and anything that escapes the serving loop, even a BaseException, is
logged, fails the batch in hand, and restarts the loop after a short pause; `ready` is False
meanwhile. Between decoding steps the search asks whether anyone still waits for the batch, so a
request that timed out or whose client left stops costing model time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from serve.metrics import Metrics

logger = logging.getLogger(__name__)


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
    options: Any  # the model's own nmt.search.SearchOptions

    def translate(
        self,
        texts: list[str],
        options: Any = ...,
        *,
        prefixes: Sequence[str | None] | None = ...,
        should_stop: Callable[[], bool] | None = ...,
    ) -> list[Any]: ...

    def translate_stream(
        self,
        text: str,
        options: Any = ...,
        *,
        prefix: str | None = ...,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool] | None = ...,
    ) -> Any: ...

    def info(self) -> dict[str, Any]: ...


def beams_of(options: Any) -> int:
    """Decoder rows one source text occupies under these options (nmt.search.SearchOptions)."""
    return int(options.beam_size)


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
    key: Any  # its nmt.search.SearchOptions: texts are only batched with texts that share them
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() by which the request must be answered
    timeout_s: float
    request_id: str = ""
    tokens: bool = False  # streamed token by token: runs alone, `token` events before its `end`
    prefixes: list[str | None] | None = None  # a target prefix per text
    events: asyncio.Queue[JobEvent] = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the route (timeout, client gone); the worker skips the job
    batches: int = 0  # batches of this job taken so far (worker thread only): fair scheduling

    @property
    def abandoned(self) -> bool:
        """Nobody waits for this job any more: cancelled, or past its deadline."""
        return self.cancelled or time.monotonic() > self.deadline

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
    tokens: int = 0  # source subwords: given by the route, or counted by the worker
    work: int = 0  # what it was admitted as (tokens x beams, or a guess): set by submit

    @property
    def priority(self) -> tuple[int, float]:
        return (self.job.batches, self.enqueued)


UNKNOWN_LENGTH = 32  # subwords assumed for a text submitted without its length
RATE_SMOOTHING = 0.3  # weight of the newest batch in the measured work rate


class Batcher:
    """A queue of texts and the one supervised thread that loads the model and translates them."""

    def __init__(
        self,
        load: Callable[[], TranslatorLike],
        *,
        metrics: Metrics,
        batching: bool = True,
        batch_tokens: int = 16384,
        max_wait_s: float = 0.005,
        max_queue: int = 1024,
        retry_after_s: int = 1,
        warmup: bool = False,
        length_cap: int | None = None,
        restart_delay_s: float = 1.0,
        load_retry_s: float = 0.0,
        on_load_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._load = load
        self.warmup = warmup
        self.metrics = metrics
        self.batching = batching
        self.batch_tokens = batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.length_cap = length_cap
        self.restart_delay_s = restart_delay_s
        self.load_retry_s = load_retry_s
        self.on_load_failure = on_load_failure
        self.translator: TranslatorLike | None = None
        self.load_error: str | None = None
        self.restarts = 0  # times the serving loop died and was started again
        self._ready = threading.Event()  # the model is loaded
        self._serving = False  # the serving loop runs (False while it restarts)
        self._cond = threading.Condition()
        self._inbound: list[_Item] = []  # guarded by _cond
        self._queued = 0  # texts submitted and not yet taken into a batch; guarded by _cond
        self._queued_work = 0  # their work (subwords x beams); guarded by _cond
        self.work_rate: float | None = None  # work per second the model got through, smoothed
        self.max_wait_fraction = 0.8  # admit while the queue is expected to clear in this
        self._stopping = False
        self._stop_by = math.inf  # when stopping, the batch in hand is cut off at this time
        self._pending: list[_Item] = []  # worker thread only
        self._in_hand: list[_Item] = []  # the batch being translated; worker thread only
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the worker, which loads the model first; `ready` turns True once it has."""
        with self._thread_lock:
            self._thread = threading.Thread(target=self._run, name="nmt-batcher", daemon=True)
            self._thread.start()

    def ensure_worker(self) -> bool:
        """Starts a new worker if the thread died (it never should: see `_run`). True if it had."""
        with self._thread_lock:
            thread = self._thread
            if thread is None or thread.is_alive() or self._stopping:
                return False
            logger.error("the model worker thread had died; starting a new one")
            self.restarts += 1
            self.metrics.worker_restarts.inc()
            self._thread = threading.Thread(target=self._run, name="nmt-batcher", daemon=True)
            self._thread.start()
            return True

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops taking work, answers everything still queued with 503 and joins the worker.

        Blocks up to timeout_s: call it from a thread, not the event loop. The batch in hand, if
        any, finishes if it can within timeout_s, else stops at a decoding step then."""
        with self._cond:
            self._stop_by = time.monotonic() + timeout_s
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning("batcher worker still busy after %.0f s; leaving it", timeout_s)
        self.metrics.ready.set(0)

    def drain(self, timeout_s: float = 30.0) -> None:
        """Stops once every text queued so far has been translated (a model being replaced:
        new requests already go elsewhere). Blocks: call it from a thread."""
        deadline = time.monotonic() + timeout_s
        while self._queued > 0 and time.monotonic() < deadline and self.ready:
            time.sleep(0.01)
        self.stop(max(deadline - time.monotonic(), 1.0))

    @property
    def ready(self) -> bool:
        """Whether requests are accepted now: model loaded, worker serving, not stopping."""
        if self._thread is not None and not self._thread.is_alive():
            self.ensure_worker()
            return False
        return self._ready.is_set() and self._serving and not self._stopping

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def restarting(self) -> bool:
        """The model is loaded but the serving loop is down, about to start again."""
        return self._ready.is_set() and not self._serving and not self._stopping

    def wait_ready(self, timeout_s: float) -> bool:
        """Blocks until requests are accepted (True), or loading failed or timed out (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready:
                return True
            if self.load_error is not None and self.load_retry_s <= 0:
                return False
            time.sleep(0.02)
        return False

    @property
    def queue_depth(self) -> int:
        return self._queued

    # -- the route side (event loop thread) ---------------------------------------------------

    def submit(
        self,
        texts: list[str],
        options: Any,
        timeout_s: float,
        *,
        lengths: list[int] | None = None,
        request_id: str = "",
        stream: bool = False,
        prefixes: list[str | None] | None = None,
    ) -> Job:
        """Queues texts for translation with these options (nmt.search.SearchOptions); raises a
        ServiceError at once when that cannot happen.

        `lengths`: each text's source subwords, when the route has counted them already.
        `stream`: one text decoded token by token (greedy search or sampling).
        `prefixes`: a target prefix per text (None or '': none)."""
        if stream and (len(texts) != 1 or beams_of(options) != 1):
            raise ValueError("token streaming takes one text and beam_size 1")
        if not self._ready.is_set():
            if self.load_error is not None:
                raise NotReadyError("the model failed to load; see the server log")
            raise NotReadyError("the model is still loading", self.retry_after_s)
        if not self.ready and not self._stopping:
            raise NotReadyError("the model worker is restarting", self.retry_after_s)
        now = time.monotonic()
        job = Job(texts, options, asyncio.get_running_loop(), now + timeout_s, timeout_s,
                  request_id, stream, prefixes)  # fmt: skip
        counts = lengths if lengths is not None else [0] * len(texts)
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
            items = [
                _Item(job, i, now, max(n, 1) if lengths is not None else 0)
                for i, n in enumerate(counts)
            ]
            for item in items:
                item.work = (item.tokens or UNKNOWN_LENGTH) * beams_of(options)
            self._admit(sum(it.work for it in items), timeout_s)
            self._inbound.extend(items)
            self._queued += len(texts)
            self._queued_work += sum(it.work for it in items)
            self.metrics.queue_depth.set(self._queued)
            self._cond.notify()
        return job

    def _admit(self, work: int, timeout_s: float) -> None:
        """Refuses work that the queue ahead of it would keep from finishing in time (503 with
        Retry-After now beats a 504 after the timeout). Caller holds _cond."""
        if self.work_rate is None:
            return
        wait_s = (self._queued_work + work) / self.work_rate
        if wait_s > self.max_wait_fraction * timeout_s and self._queued > 0:
            self.metrics.rejected.labels("queue_time").inc()
            raise QueueFullError(
                f"the server is busy: the queued work would take about {wait_s:.0f} s, longer "
                f"than the request timeout of {timeout_s:g} s allows; retry later",
                max(self.retry_after_s, min(60, round(wait_s - timeout_s / 2))),
            )

    async def translate(
        self, texts: list[str], options: Any, timeout_s: float, **submit: Any
    ) -> list[Any]:
        """Translations of `texts` in input order, translated together with other requests."""
        job = self.submit(texts, options, timeout_s, **submit)
        results: list[Any] = [None] * len(texts)
        async for event in job.stream():
            results[event.index] = event.value
        return results

    # -- the worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        """The worker thread: load the model, then serve; restart serving whenever it dies."""
        try:
            if not self._ready.is_set() and not self._load_model():
                return
            while not self._stopping:
                try:
                    self._serving = True
                    self.metrics.ready.set(1)
                    self._serve()
                except BaseException:  # noqa: BLE001 - supervision: nothing may end the worker
                    self._serving = False
                    self.metrics.ready.set(0)
                    self.restarts += 1
                    self.metrics.worker_restarts.inc()
                    logger.exception(
                        "the model worker failed outside a batch; restarting in %.1f s",
                        self.restart_delay_s,
                    )
                    self._fail_in_hand()
                    with self._cond:
                        if not self._stopping:
                            self._cond.wait(self.restart_delay_s)
        finally:
            self._serving = False
            self.metrics.ready.set(0)
            if self._stopping:
                self._fail_all(ShuttingDownError("the server is shutting down", self.retry_after_s))

    def _load_model(self) -> bool:
        """Loads (and warms up) the model, retrying every load_retry_s if asked. True on success."""
        while not self._stopping:
            try:
                translator = self._load()
                if self.warmup:
                    self._warm_up(translator)
            except Exception as err:
                self.load_error = f"{type(err).__name__}: {err}"
                logger.exception("loading the model failed")
                if self.load_retry_s <= 0:
                    if self.on_load_failure is not None:
                        self.on_load_failure(self.load_error)
                    return False
                logger.info("retrying in %g s", self.load_retry_s)
                with self._cond:
                    self._cond.wait(self.load_retry_s)
                continue
            self.translator, self.load_error = translator, None
            self._ready.set()
            logger.info(
                "model loaded; batching=%s batch_tokens=%d", self.batching, self.batch_tokens
            )
            return True
        return False

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._in_hand = batch
            self._process(batch)
            self._in_hand = []

    def _warm_up(self, translator: TranslatorLike) -> None:
        """One short translation, so the first client does not pay for kernel setup."""
        start = time.perf_counter()
        options = self._capped(translator.options)
        translator.translate(["Hello, world."], replace(options, beam_size=1, n_best=1))
        translator.translate(["Hello, world."], options)
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
        uncounted = [it for it in new if it.tokens == 0]
        if uncounted:
            failed = self._count_tokens(uncounted)
            if failed:  # those requests fail; everyone else is served
                self._fail_jobs([it for it in new if id(it.job) in failed])
                self._dequeued([it for it in new if id(it.job) in failed])
                new = [it for it in new if id(it.job) not in failed]
        self._pending.extend(new)
        return not stopping

    def _count_tokens(self, items: list[_Item]) -> set[int]:
        """Sets each item's subword count; returns the ids of the jobs whose texts failed."""
        assert self.translator is not None
        encode = self.translator.tokenizer.encode_src
        try:
            lengths = encode([it.job.texts[it.index] for it in items])
        except Exception:  # find the culprits one by one
            lengths, failed = [], set()
            for it in items:
                try:
                    lengths.append(encode([it.job.texts[it.index]])[0])
                except Exception:
                    logger.exception("counting subwords failed (request %s)", it.job.request_id)
                    lengths.append([])
                    failed.add(id(it.job))
        else:
            failed = set()
        for item, ids in zip(items, lengths, strict=True):
            item.tokens = max(len(ids), 1)  # an empty encoding still costs one position
        return failed

    def _drop_cancelled(self) -> None:
        kept = [it for it in self._pending if not it.job.cancelled]
        if len(kept) != len(self._pending):
            self._dequeued([it for it in self._pending if it.job.cancelled])
            self._pending = kept

    def _dequeued(self, items: list[_Item]) -> None:
        with self._cond:
            self._queued -= len(items)
            self._queued_work -= sum(it.work for it in items)
            self.metrics.queue_depth.set(self._queued)

    def _next_batch(self) -> list[_Item] | None:
        """The next batch (one option set, within the work budget), or None to stop."""
        while True:
            if not self._collect(0.0 if self._pending else 0.25):
                return None
            self._drop_cancelled()
            if not self._pending:
                continue
            first = min(self._pending, key=lambda it: it.priority)
            if self.batching and not first.job.tokens:
                fill_by = first.enqueued + self.max_wait_s
                while (left := fill_by - time.monotonic()) > 0 and not self._full(first.job.key):
                    if not self._collect(left):
                        return None
                self._drop_cancelled()
                if not self._pending or min(self._pending, key=lambda it: it.priority) is not first:
                    continue  # the chosen text went away or lost its turn while waiting
            batch = self._take(first)
            for job in {id(it.job): it.job for it in batch}.values():
                job.batches += 1
            self._dequeued(batch)
            return batch

    def _work(self, longest: int, n: int, key: Any) -> int:
        """The budgeted work of n texts padded to `longest` subwords: decoder rows x length."""
        return longest * n * beams_of(key)

    def _full(self, key: Any) -> bool:
        same = [it.tokens for it in self._pending if it.job.key == key and not it.job.tokens]
        return self._work(max(same), len(same), key) >= self.batch_tokens

    def _take(self, first: _Item) -> list[_Item]:
        """`first` and the texts with its options that fit the budget, least-served first
        (first's request only without batching)."""
        key = first.job.key
        if first.job.tokens:
            chosen = [first]
        else:
            candidates = sorted(
                (
                    it
                    for it in self._pending
                    if it.job.key == key
                    and not it.job.tokens
                    and (self.batching or it.job is first.job)
                ),
                key=lambda it: it.priority,
            )
            chosen, longest = [], 0
            for item in candidates:
                longest_if = max(longest, item.tokens)
                if chosen and self._work(longest_if, len(chosen) + 1, key) > self.batch_tokens:
                    break
                chosen.append(item)
                longest = longest_if
            chosen.sort(key=lambda it: it.enqueued)
        taken = set(map(id, chosen))
        self._pending = [it for it in self._pending if id(it) not in taken]
        return chosen

    def _process(self, batch: list[_Item]) -> None:
        assert self.translator is not None
        key = batch[0].job.key
        start = time.perf_counter()
        stream = batch[0].job.tokens
        try:
            if stream:
                self._stream_one(batch[0])
            else:
                self._translate_batch(batch, key)
        except Exception as err:  # a bug or a model failure: answer every request, keep serving
            if _is_cancellation(err):
                logger.info("a batch of %d texts stopped: nobody waits for it", len(batch))
                self.metrics.cancelled_batches.inc()
                stopping = ShuttingDownError("the server is shutting down", self.retry_after_s)
                for job in {id(it.job): it.job for it in batch}.values():
                    if not job.abandoned:
                        job.emit(JobEvent("error", value=stopping))
                return
            ids = sorted({it.job.request_id for it in batch if it.job.request_id})
            logger.exception(
                "translation failed for a batch of %d texts (requests %s)", len(batch), ids
            )
            self._fail_jobs(batch)
            return
        seconds = time.perf_counter() - start
        work = self._work(max(it.tokens for it in batch), len(batch), key)
        if not stream and seconds > 0:
            rate = sum(it.work for it in batch) / seconds
            old = self.work_rate
            self.work_rate = rate if old is None else old + RATE_SMOOTHING * (rate - old)
        self.metrics.batch_seconds.observe(seconds)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(work)
        self.metrics.texts.inc(len(batch))

    def _capped(self, options: Any) -> Any:
        """options with the server's hard cap on output length applied."""
        if self.length_cap is None:
            return options
        cap = options.max_len_cap
        return replace(
            options, max_len_cap=self.length_cap if cap is None else min(cap, self.length_cap)
        )

    def _nobody_waits(self, jobs: list[Job]) -> Callable[[], bool]:
        def nobody_waits() -> bool:
            return all(job.abandoned for job in jobs) or time.monotonic() > self._stop_by

        return nobody_waits

    def _translate_batch(self, batch: list[_Item], options: Any) -> None:
        assert self.translator is not None
        jobs = list({id(it.job): it.job for it in batch}.values())
        prefixes = [it.job.prefixes[it.index] if it.job.prefixes else None for it in batch]
        results = self.translator.translate(
            [it.job.texts[it.index] for it in batch],
            self._capped(options),
            prefixes=prefixes if any(prefixes) else None,
            should_stop=self._nobody_waits(jobs),
        )
        for item, result in zip(batch, results, strict=True):
            item.job.emit(JobEvent("result", item.index, result))

    def _stream_one(self, item: _Item) -> None:
        assert self.translator is not None
        job = item.job

        def on_text(text: str) -> None:
            job.emit(JobEvent("token", item.index, text))

        result = self.translator.translate_stream(
            job.texts[item.index],
            self._capped(job.key),
            prefix=job.prefixes[item.index] if job.prefixes else None,
            on_text=on_text,
            should_stop=self._nobody_waits([job]),
        )
        job.emit(JobEvent("end", item.index, result))

    def _fail_jobs(self, items: list[_Item]) -> None:
        """Answers the requests of these texts with a 500 that names no internals."""
        failure = TranslationFailedError(
            "translation failed on the server; the server log has the details under this request id"
        )
        for job in {id(it.job): it.job for it in items}.values():
            job.emit(JobEvent("error", value=failure))

    def _fail_in_hand(self) -> None:
        batch, self._in_hand = self._in_hand, []
        if batch:
            self._fail_jobs(batch)

    def _fail_all(self, error: ServiceError) -> None:
        with self._cond:
            items, self._inbound = self._pending + self._inbound, []
            self._pending = []
            self._queued = 0
            self._queued_work = 0
            self.metrics.queue_depth.set(0)
        for job in {id(it.job): it.job for it in items}.values():
            job.emit(JobEvent("error", value=error))


def _is_cancellation(err: BaseException) -> bool:
    """Whether err is nmt.search's SearchCancelledError (matched by name: this module stays
    importable without torch)."""
    return any(cls.__name__ == "SearchCancelledError" for cls in type(err).__mro__)
