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
released them, so a client can time each release from the frame that caused it. Auth is the
REST routes' (`Authorization: Bearer KEY` or `X-API-Key` on the upgrade request, or `api_key` in
the start frame); limits are theirs too (characters and subwords per sentence, output length).
Any bad frame gets an error frame and the connection is closed; other sessions carry on.

The model is not thread-safe, and the batching worker owns the served one; live sessions run on
one thread of their own (`LiveWorker`) over a private copy of the model, taken once from the
loaded translator, so they never touch the batcher's model and never block the event loop. A
client that leaves frees its sentence state at once (it is only referenced by its route).
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


class LiveWorker:
    """The one thread live sessions' model work runs on, with its own copy of the model."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nmt-live")
        self._source: object | None = None  # the served translator the copy was taken from
        self._translator: Any = None

    def translator(self, served: Any) -> Any:
        """The live copy of `served` (worker thread only): the same tokenizer and options, a
        model of its own, copied again when the served translator changes."""
        if self._source is not served:
            from nmt.translate import Translator

            model = copy.deepcopy(served.model)
            self._translator = Translator(model, served.tokenizer, served.cfg, served.meta,
                                          served.device, served.precision)  # fmt: skip
            self._source = served
        return self._translator

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the live thread; a caller that goes away cancels it if not started."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


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
    worker = LiveWorker()
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

    def step(policy: Any, text: str | None) -> tuple[list[str], int]:
        """One frame's work on the live thread: the words released and the words read."""
        words = policy.finish() if text is None else policy.feed(text)
        return words, policy.source_words

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
        pending = None if first.get("type") == "start" else first
        received = 1  # client frames so far, the first included
        policy: Any = None  # the sentence's WaitKPolicy, made at its first frame
        chars = 0
        while True:
            if pending is None:
                frame = await receive_frame(websocket, IDLE_TIMEOUT_S)
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
            try:
                words, read = await worker.run(step, policy, text)
            except ValueError as err:  # the source is over the subword limit
                raise LiveError(422, "too_long", str(err), CLOSE_POLICY) from None
            if words:
                await websocket.send_json({"type": "words", "words": words, "text": " ".join(words),
                                           "source_words": read, "frame": received})  # fmt: skip
                live_metrics.release_seconds.observe(time.perf_counter() - arrived)
            if kind == "end":
                await websocket.send_json({"type": "done", "text": policy.text,
                                           "source_words": read})  # fmt: skip
                policy, chars = None, 0

    async def close_with_error(websocket: WebSocket, err: LiveError, request_id: str) -> None:
        body = {"status": err.status, "code": err.code, "message": err.message,
                "request_id": request_id}  # fmt: skip
        try:
            await websocket.send_json({"type": "error", "error": body})
            await websocket.close(err.close_code, err.message[:120])
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client is gone already

    return router
