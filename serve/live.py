"""The live route: simultaneous translation over a WebSocket, `/v1/translate/live`.

The client sends the source as it is typed (or recognised) and the server answers with target
words as soon as a wait-k policy (`nmt.simultaneous.WaitKPolicy`) commits them; they are never
revised. Frames are JSON text:

client -> server
    {"type": "start", "k": 3, "api_key": "KEY"}   optional, first: k and, for browsers (which
                                                    cannot set headers), the key
    {"type": "text", "text": "El gato co"}         the next piece of source, any size
    {"type": "end"}                                the sentence is complete: flush it
server -> client
    {"type": "ready", "k": 3, "model": "...", "limits": {...}}
    {"type": "words", "words": ["The", "cat"], "text": "The cat", "source_words": 3, "frame": 4}
    {"type": "done", "text": "...", "source_words": 5}          after "end"; the next "text"
                                                                 starts a new sentence
    {"type": "error", "error": {"status", "code", "message", "request_id"}}  then the close

`source_words` is the number of source words read when the words were released, and `frame` the
number of client frames received when they were (the start frame counted): the frame that
released them, so a client can time each release from the frame that caused it. A frame that
allows several decoder steps (a word of several subwords; the end of input, which writes the
rest of the sentence) may release its words in several words frames, each sent as soon as the
step that completes them has run. Auth is the REST routes' (`Authorization: Bearer KEY` or
`X-API-Key` on the upgrade request, or `api_key` in the start frame); limits are theirs too
(characters and subwords per sentence, output length).
Any bad frame gets an error frame and the connection is closed; other sessions carry on.

The model is not thread-safe, and the batching worker owns the served one; live sessions run on
one thread of their own (`LiveWorker`) over a private copy of the model, taken once from the
loaded translator, so they never touch the batcher's model and never block the event loop.

That thread batches the sessions. A route hands it each frame and awaits the answer (the words
released and the source words read). Every tick the thread reads the frames that arrived and
encodes their new words, batched (`nmt.simultaneous.encode_pending`: the sessions advance their
encoders in one call, states stacked, new subwords padded to the longest), answers the sessions
with nothing left to write, and runs the next decoder step of all the others as one batched call
(`nmt.simultaneous.write_steps`: decoder states and previous tokens stacked, the source each
step reads padded and masked), so a session writes exactly what it writes alone. A release waits
behind at most one batched step of other sessions' work, and an end-of-sentence flush takes one
step per tick beside everyone else's steps instead of holding the thread until it is done.
Between frames the thread writes the end of every open sentence ahead (`WaitKPolicy.end_draft`:
the rest of the translation as if the input ended now, one batched step at a time, so a frame
that arrives waits at most one step); an end of input that comes with nothing new since adopts
it and releases the rest at once. `NMT_LIVE_DRAFTS=false` turns this off (the spare time then
goes to other work on the machine). While a frame is in the worker its route already listens for
the next one, so a client that leaves mid-flush leaves the batch at the next tick; its sentence
state is freed with it (only the route and a frame in flight hold it). The thread's model copy
is in `NMT_LIVE_PRECISION` (default: the service's precision); in bf16 it keeps bf16 weights, so
that a step of a few rows, whose cost is reading the weights, reads half as much.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from prometheus_client import Gauge, Histogram

from serve.batcher import Batcher, ServiceError
from serve.metrics import LATENCY_BUCKETS, Metrics
from serve.routes import ready_translator
from serve.settings import Settings

logger = logging.getLogger(__name__)

LIVE_PATH = "/v1/translate/live"
MAX_LIVE_SESSIONS = 64  # open live connections; more get an "overloaded" error frame
MAX_WAIT_K = 64
IDLE_TIMEOUT_S = 300.0  # a connection that sends nothing for this long is closed
START_TIMEOUT_S = 10.0  # for the start frame that carries the key, when the headers do not
T = TypeVar("T")

# WebSocket close codes (RFC 6455, sec. 7.4.1)
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED = 1003  # a binary frame
CLOSE_INVALID = 1007  # a frame that is not the JSON we expect
CLOSE_POLICY = 1008  # auth, limits
CLOSE_TOO_BIG = 1009
CLOSE_ERROR = 1011
CLOSE_TRY_LATER = 1013


class LiveError(ServiceError):
    """Ends a live session with an error frame and a close code."""

    def __init__(self, status: int, code: str, message: str, close_code: int) -> None:
        super().__init__(message)
        self.status, self.code, self.close_code = status, code, close_code


@dataclass(eq=False)
class _Frame:
    """A session's frame on its way through the live worker: read it, write what it allows,
    answer with the words released and the source words read."""

    policy: Any  # the session's nmt.simultaneous.WaitKPolicy
    text: str | None  # None: the end of input
    answer: Future[tuple[list[str], int]]
    # called on the worker thread with the words a tick's step completed before the answer
    # (a frame that allows several steps: a word of several subwords, the end flush)
    on_words: Callable[[list[str], int], None] | None = None


class LiveWorker:
    """The one thread live sessions' model work runs on, with its own copy of the model.

    A session has at most one frame in the worker at a time (its route awaits the answer). Each
    tick the worker drops the sessions whose clients left, runs queued calls (making policies),
    reads the frames that arrived (their new words encoded in batches), answers the
    sessions with nothing left to write, and runs one decoder step of every other session in
    one batched call (`nmt.simultaneous.write_steps`), so an end-of-sentence flush advances a
    step per tick beside everyone else's steps instead of holding the thread.

    With `drafts`, the time between ticks writes each open sentence's end ahead
    (`WaitKPolicy.end_draft`), one batched step at a time, a new frame waiting at most one
    step: an end of input that comes with nothing new releases the rest of the sentence at
    once.
    """

    def __init__(self, drafts: bool = True, precision: str | None = None) -> None:
        self.drafts = drafts
        self.precision = precision  # of the model copy; None: the served translator's
        self._source: object | None = None  # the served translator the copy was taken from
        self._translator: Any = None
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        # handed over under _wake
        self._calls: list[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = []
        self._inbox: list[_Frame] = []
        self._dropped: list[Any] = []  # policies whose clients left
        self._frames: list[_Frame] = []  # being written (worker thread only)
        self._open: dict[int, Any] = {}  # policies of sentences in progress (worker thread only)
        self._drafting = False  # some open sentence's end draft has steps left (worker only)

    def translator(self, served: Any) -> Any:
        """The live copy of `served` (worker thread only, `nmt.simultaneous.live_translator`),
        in the worker's precision; copied again when the served translator changes."""
        if self._source is not served:
            from nmt.simultaneous import live_translator

            self._translator = live_translator(served, self.precision)
            self._source = served
        return self._translator

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the live thread; a caller that goes away cancels it if not started."""
        future: Future[T] = Future()
        self._hand_over(lambda: self._calls.append((fn, args, future)))
        return await asyncio.wrap_future(future)

    def submit(
        self,
        policy: Any,
        text: str | None,
        on_words: Callable[[list[str], int], None] | None = None,
    ) -> Future[tuple[list[str], int]]:
        """Queues a session's frame (`text`, or None for the end of input); the answer is the
        target words it released and the source words read by then. With `on_words`, words
        complete after a tick's step go to it at once (on the worker thread), and the answer
        has the rest. The policy's ValueError (a source over its limit) comes back as the
        answer's exception."""
        frame = _Frame(policy, text, Future(), on_words)
        self._hand_over(lambda: self._inbox.append(frame))
        return frame.answer

    def drop(self, policy: Any) -> None:
        """The session's client left: its frame, if any, leaves the batch at the next tick."""
        self._hand_over(lambda: self._dropped.append(policy))

    def _hand_over(self, put: Callable[[], None]) -> None:
        with self._wake:
            put()
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="nmt-live", daemon=True)
                self._thread.start()
            self._wake.notify()

    # -- the worker thread ----------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._calls or self._inbox or self._dropped or self._frames
                           or self._drafting):  # fmt: skip
                    self._wake.wait()
                calls, inbox, dropped = self._calls, self._inbox, self._dropped
                self._calls, self._inbox, self._dropped = [], [], []
            try:
                if calls or inbox or dropped or self._frames:
                    self._tick(calls, inbox, dropped)
                    self._drafting = self.drafts and bool(self._open)
                else:
                    self._drafting = self._draft_step()
            except Exception as err:  # a bug, not a frame's fault: fail what is in hand
                logger.exception("the live worker failed a tick")
                for frame in self._frames:
                    if not frame.answer.done():
                        frame.answer.set_exception(err)
                self._frames = []
                self._drafting = False

    def _tick(self, calls: list[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]],
              inbox: list[_Frame], dropped: list[Any]) -> None:  # fmt: skip
        gone = {id(policy) for policy in dropped}
        self._frames = [f for f in self._frames if id(f.policy) not in gone]
        for key in gone:
            self._open.pop(key, None)
        for fn, args, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except Exception as err:
                    future.set_exception(err)
        for frame in inbox:
            if id(frame.policy) not in gone and frame.answer.set_running_or_notify_cancel():
                self._read(frame)
        if inbox:
            from nmt.simultaneous import encode_pending

            encode_pending([frame.policy for frame in self._frames])  # the new words, batched
        self._write()

    def _read(self, frame: _Frame) -> None:
        try:
            if frame.text is None:
                self._open.pop(id(frame.policy), None)
                frame.policy.end()  # adopts its end draft if nothing was read since
            else:
                self._open[id(frame.policy)] = frame.policy
                frame.policy.read(frame.text)
        except Exception as err:  # a source over the limit, ...
            frame.answer.set_exception(err)
            return
        self._frames.append(frame)

    def _draft_step(self) -> bool:
        """One batched step of the open sentences' end drafts, run while no frame waits (so no
        open sentence has a step of its own left); False when no draft has a step left."""
        from nmt.simultaneous import encode_pending, write_steps

        drafts = [d for p in self._open.values() if (d := p.end_draft()) is not None]
        encode_pending(drafts)  # the word each sentence's draft ends on, if still being typed
        steps = [step for draft in drafts if (step := draft.next_step()) is not None]
        write_steps(steps)
        return bool(steps)

    def _write(self) -> None:
        """Answers the frames with nothing left to write; one batched step for the others."""
        from nmt.simultaneous import write_steps

        writing: list[_Frame] = []
        steps = []
        for frame in self._frames:
            step = frame.policy.next_step()
            if step is None:
                frame.answer.set_result((frame.policy.release(), frame.policy.source_words))
            else:
                writing.append(frame)
                steps.append(step)
        self._frames = writing
        write_steps(steps)  # one call per model: the sessions of a replaced model finish too
        for frame in writing:  # words the step completed go out now, not after the last step
            if frame.on_words is not None and (words := frame.policy.release()):
                frame.on_words(words, frame.policy.source_words)


class LiveMetrics:
    """The live route's own series, in the app's registry beside the REST routes' ones."""

    def __init__(self, metrics: Metrics) -> None:
        self.requests = metrics.requests
        self.sessions = Gauge(
            "nmt_live_sessions", "Open live translation connections.", registry=metrics.registry
        )
        self.release_seconds = Histogram(
            "nmt_live_release_seconds",
            "Time from a source frame's arrival to the target words it released being sent.",
            buckets=LATENCY_BUCKETS,
            registry=metrics.registry,
        )


def _key_ok(presented: list[str], keys: list[bytes]) -> bool:
    """Constant-time comparison of every presented value with every key (as the REST routes)."""
    ok = False
    for value in presented:
        given = value.encode("latin-1", "replace")
        for key in keys:
            ok |= bool(value) and hmac.compare_digest(given, key)
    return ok


def _header_keys(websocket: WebSocket) -> list[str]:
    auth = websocket.headers.get("authorization", "")
    bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    return [bearer, websocket.headers.get("x-api-key", "")]


def default_batcher(app: Any) -> Batcher:
    """The default model's batching worker as loaded now (after any reload)."""
    registry = getattr(getattr(app.state, "service", None), "registry", None)
    batcher: Batcher = registry.default.batcher if registry is not None else app.state.batcher
    return batcher


def build_live_router(settings: Settings, api_keys: list[str], metrics: Metrics) -> APIRouter:
    """The WebSocket route; `api_keys` empty means no auth, as for the REST routes."""
    router = APIRouter()
    keys = [k.encode() for k in api_keys]
    worker = LiveWorker(settings.live_drafts, settings.live_precision)
    live_metrics = LiveMetrics(metrics)
    active = [0]  # open sessions (event loop thread only)
    max_frame = 4 * settings.max_chars + 1024  # UTF-8 and JSON escaping, plus the envelope

    async def receive_frame(websocket: WebSocket, timeout_s: float) -> dict[str, Any] | None:
        """The next JSON frame as a dict; None when the client has gone."""
        try:
            message = await asyncio.wait_for(websocket.receive(), timeout_s)
        except TimeoutError:
            raise LiveError(408, "timeout", f"no frame for {timeout_s:g} s; closing",
                            CLOSE_POLICY) from None  # fmt: skip
        if message["type"] == "websocket.disconnect":
            return None
        text = message.get("text")
        if text is None:
            raise LiveError(422, "invalid_request", "frames must be JSON text, not binary",
                            CLOSE_UNSUPPORTED)  # fmt: skip
        if len(text) > max_frame:
            raise LiveError(413, "payload_too_large",
                            f"a frame may carry at most {max_frame} characters", CLOSE_TOO_BIG)  # fmt: skip
        try:
            frame = json.loads(text)
        except ValueError:
            raise LiveError(422, "invalid_request", "a frame is not valid JSON",
                            CLOSE_INVALID) from None  # fmt: skip
        if not isinstance(frame, dict) or frame.get("type") not in ("start", "text", "end"):
            raise LiveError(422, "invalid_request",
                            'a frame must be a JSON object with "type" start, text or end',
                            CLOSE_INVALID)  # fmt: skip
        return frame

    def start_options(frame: dict[str, Any] | None, default_k: int) -> int:
        k = default_k if frame is None else frame.get("k", default_k)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_WAIT_K:
            raise LiveError(422, "invalid_request",
                            f"k must be an integer from 1 to {MAX_WAIT_K}, got {k!r}", CLOSE_POLICY)  # fmt: skip
        return k

    def served(batcher: Batcher) -> Any:
        translator = ready_translator(batcher)  # NotReadyError while loading
        if not batcher.ready:
            raise LiveError(503, "not_ready", "the model worker is not ready", CLOSE_TRY_LATER)
        from nmt.simultaneous import check_streaming_model

        try:
            check_streaming_model(getattr(translator, "model", None))
        except ValueError as err:
            raise LiveError(409, "not_streaming", str(err), CLOSE_POLICY) from None
        return translator

    def new_policy(translator: Any, k: int) -> Any:
        from dataclasses import replace

        from nmt.simultaneous import WaitKPolicy

        live = worker.translator(translator)
        options = replace(live.options, max_len_cap=settings.max_output_length)
        return WaitKPolicy(live, k, options, max_source_tokens=settings.max_tokens)

    async def answer(policy: Any, text: str | None, ahead: asyncio.Task[Any],
                     send: Callable[[list[str], int], Awaitable[None]]) -> int | None:  # fmt: skip
        """Sends the words a frame releases as the worker writes them (`send`); returns the
        source words read by the end, or None when the client leaves first (`ahead`, its next
        frame, finds it gone), and then the session leaves the worker's batch at once."""
        loop = asyncio.get_running_loop()
        early: asyncio.Queue[tuple[list[str], int]] = asyncio.Queue()  # words before the answer

        def on_words(words: list[str], read: int) -> None:  # on the worker thread
            loop.call_soon_threadsafe(early.put_nowait, (words, read))

        result = asyncio.wrap_future(worker.submit(policy, text, on_words))
        waiting: set[asyncio.Future[Any]] = {result, ahead}
        while True:
            getter = asyncio.ensure_future(early.get())
            done, _ = await asyncio.wait({*waiting, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                await send(*getter.result())
                continue
            getter.cancel()
            if result in done:  # the early words were queued before the answer: all sent
                words, read = await result
                await send(words, read)
                return read
            waiting.discard(ahead)
            if ahead.exception() is None and ahead.result() is None:
                worker.drop(policy)
                result.cancel()
                return None
            # a frame received meanwhile waits its turn in `ahead`

    @router.websocket(LIVE_PATH)
    async def live(websocket: WebSocket) -> None:
        request_id = uuid.uuid4().hex
        status = 101
        await websocket.accept()
        active[0] += 1
        live_metrics.sessions.set(active[0])
        try:
            status = await session(websocket, request_id)
        except LiveError as err:
            status = err.status
            await close_with_error(websocket, err, request_id)
        except ServiceError as err:  # not ready, ...
            status = err.status
            await close_with_error(websocket, LiveError(err.status, err.code, err.message,
                                                        CLOSE_TRY_LATER), request_id)  # fmt: skip
        except WebSocketDisconnect:
            status = 499
        except Exception:
            logger.exception("live session %s failed", request_id)
            status = 500
            error = LiveError(500, "internal_error", "translation failed on the server; the "
                              "server log has the details under this request id", CLOSE_ERROR)  # fmt: skip
            await close_with_error(websocket, error, request_id)
        finally:
            active[0] -= 1
            live_metrics.sessions.set(active[0])
            live_metrics.requests.labels(LIVE_PATH, "WEBSOCKET", str(status)).inc()

    async def session(websocket: WebSocket, request_id: str) -> int:
        """Serves one connection until it closes; returns the status it is counted under."""
        batcher = default_batcher(websocket.app)
        first: dict[str, Any] | None = None
        if keys and not _key_ok(_header_keys(websocket), keys):
            first = await receive_frame(websocket, START_TIMEOUT_S)
            if first is None:
                return 499
            if first.get("type") != "start" or not _key_ok([str(first.get("api_key") or "")], keys):
                raise LiveError(401, "unauthorized", "missing or invalid API key", CLOSE_POLICY)
        if active[0] > MAX_LIVE_SESSIONS:
            raise LiveError(503, "overloaded",
                            f"the server has {MAX_LIVE_SESSIONS} live sessions open; retry later",
                            CLOSE_TRY_LATER)  # fmt: skip
        translator = served(batcher)
        if first is None:
            first = await receive_frame(websocket, IDLE_TIMEOUT_S)
            if first is None:
                return 499
        from nmt.simultaneous import default_wait_k

        k = start_options(first if first.get("type") == "start" else None,
                          default_wait_k(translator.cfg))  # fmt: skip
        await websocket.send_json({"type": "ready", "k": k, "model": translator.cfg.name,
                                   "request_id": request_id,
                                   "limits": {"max_chars": settings.max_chars,
                                              "max_tokens": settings.max_tokens,
                                              "max_output_length": settings.max_output_length}})  # fmt: skip
        return await converse(websocket, translator, k,
                              None if first.get("type") == "start" else first)  # fmt: skip

    async def converse(websocket: WebSocket, translator: Any, k: int,
                       pending: dict[str, Any] | None) -> int:  # fmt: skip
        """The frames of a session after its ready frame, `pending` the first one if it was not
        a start frame; returns the status the session is counted under."""
        received = 1  # client frames so far, the first included
        policy: Any = None  # the sentence's WaitKPolicy, made at its first frame
        chars = 0
        ahead: asyncio.Task[dict[str, Any] | None] | None = None  # the next frame, received
        try:  # while the worker works, so that a client that leaves is seen at once
            while True:
                if pending is None:
                    frame = await (receive_frame(websocket, IDLE_TIMEOUT_S) if ahead is None
                                   else ahead)  # fmt: skip
                    ahead = None
                    received += 1
                else:
                    frame, pending = pending, None
                if frame is None:
                    return 101  # the client left; its policy goes with this frame
                kind = frame["type"]
                if kind == "start":
                    raise LiveError(422, "invalid_request", "start may only be the first frame",
                                    CLOSE_INVALID)  # fmt: skip
                text = frame.get("text") if kind == "text" else None
                if kind == "text" and not isinstance(text, str):
                    raise LiveError(422, "invalid_request", 'a text frame needs a string "text"',
                                    CLOSE_INVALID)  # fmt: skip
                chars += len(text or "")
                if chars > settings.max_chars:
                    raise LiveError(422, "too_long",
                                    f"a sentence may have at most {settings.max_chars} characters; "
                                    'send {"type": "end"} sooner', CLOSE_POLICY)  # fmt: skip
                arrived = time.perf_counter()
                if policy is None:
                    policy = await worker.run(new_policy, translator, k)
                ahead = asyncio.create_task(receive_frame(websocket, IDLE_TIMEOUT_S))

                async def send(words: list[str], read: int, frame_no: int = received,
                               since: float = arrived) -> None:  # fmt: skip
                    if words:
                        await websocket.send_json({"type": "words", "words": words,
                                                   "text": " ".join(words), "source_words": read,
                                                   "frame": frame_no})  # fmt: skip
                        live_metrics.release_seconds.observe(time.perf_counter() - since)

                try:
                    read = await answer(policy, text, ahead, send)
                except ValueError as err:  # the source is over the subword limit
                    raise LiveError(422, "too_long", str(err), CLOSE_POLICY) from None
                if read is None:
                    return 101  # the client left while its frame was in the worker
                if kind == "end":
                    await websocket.send_json({"type": "done", "text": policy.text,
                                               "source_words": read})  # fmt: skip
                    policy, chars = None, 0
        finally:
            if ahead is not None:
                ahead.cancel()
                if ahead.done() and not ahead.cancelled():
                    ahead.exception()  # a bad next frame, moot once the session ended first
            if policy is not None:
                worker.drop(policy)

    async def close_with_error(websocket: WebSocket, err: LiveError, request_id: str) -> None:
        body = {"status": err.status, "code": err.code, "message": err.message,
                "request_id": request_id}  # fmt: skip
        try:
            await websocket.send_json({"type": "error", "error": body})
            await websocket.close(err.close_code, err.message[:120])
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client is gone already

    return router
