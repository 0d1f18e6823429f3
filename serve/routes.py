"""HTTP routes: translate, stream, health, readiness, model info, metrics and the web page.

Routes stay thin: they turn a request into `SearchOptions` (the model's own, changed by what the
request asks, with `dataclasses.replace`: the rules live there), queue the texts on the batcher, await
the worker's results and shape the response. This module is imported at runtime by FastAPI's
annotation reading, so its annotations are real objects (no `from __future__ import annotations`).
"""

import asyncio
import contextlib
import dataclasses
import hmac
import json
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from serve.batcher import Batcher, NotReadyError, ServiceError, TranslatorLike
from serve.middleware import error_body, request_id_of
from serve.schemas import (
    Alignment,
    DoneEvent,
    ErrorResponse,
    Health,
    Hypothesis,
    Limits,
    ModelInfo,
    Ready,
    TokenEvent,
    TranslateRequestBase,
    TranslateResponse,
    Translation,
)
from serve.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class UnauthorizedError(ServiceError):
    status, code = 401, "unauthorized"


class ClientGoneError(ServiceError):
    """The client closed the connection before its answer was ready (nginx's 499)."""

    status, code = 499, "client_closed_request"


class InvalidRequestError(ServiceError):
    status, code = 422, "invalid_request"

    def __init__(self, message: str, loc: list[str | int]) -> None:
        super().__init__(message)
        self.loc = loc


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


ERRORS: dict[int | str, dict[str, Any]] = {
    413: _error("Request body larger than the configured limit."),
    422: _error("Invalid request: bad JSON, wrong types, unknown fields or a limit exceeded."),
    503: _error("Queue full, model loading or server stopping; see the Retry-After header."),
    504: _error("Translation did not finish within the request timeout."),
    500: _error("The model failed on this batch (a bug); the server keeps serving."),
}
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {401: _error("Missing or invalid API key.")}

STREAM_DESCRIPTION = """Server-Sent Events, each `data` a JSON object:

* `token` (`{"index", "text"}`): the translation so far, after each new subword. Only for one
  text decoded greedily or sampled (`beam_size` 1, asked or the model's default; `n_best` 1; no
  alignments), with every other option applied as in `/v1/translate`.
* `translation` (`{"index", "text", "score", "finished", "n_best", "alignment"}`): a text is done;
  one per text, in input order.
* `error` (the `ErrorResponse` body): translation failed or timed out; the stream ends.
* `done` (`{"request_id", "count"}`): the last event of a successful stream.
"""


SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["token", "translation", "error", "done"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}


ALIGNMENT_DECIMALS = 4  # attention weights are rounded: 7 characters of JSON each, not 20


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _weights(rows: list[list[float]] | None) -> list[list[float | None]] | None:
    """Attention rows rounded, non-finite weights as null (JSON has no NaN)."""
    if rows is None:
        return None
    return [
        [round(w, ALIGNMENT_DECIMALS) if math.isfinite(w) else None for w in row] for row in rows
    ]


def to_translation(result: Any, options: Any) -> Translation:
    """A `nmt.translate.TranslationResult` as the API's `Translation`."""
    alignment = None
    if options.return_attention:
        alignment = Alignment(
            src_tokens=list(result.src_tokens),
            tgt_tokens=list(result.tgt_tokens),
            attention=_weights(result.attention),
        )
    return Translation(
        text=result.text,
        score=_finite(result.score),
        finished=bool(getattr(result, "finished", True)),
        n_best=[Hypothesis(text=t, score=_finite(s)) for t, s in result.n_best],
        alignment=alignment,
    )


def sse(event: str, data: dict[str, Any]) -> str:
    """One Server-Sent Event; JSON never contains a raw newline, so one data line suffices."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def get_batcher(request: Request) -> Batcher:
    batcher: Batcher = request.app.state.batcher
    return batcher


BatcherDep = Annotated[Batcher, Depends(get_batcher)]


def api_key_dependency(keys: list[str]) -> Callable[..., Any]:
    """A dependency accepting `Authorization: Bearer KEY` or `X-API-Key: KEY`.

    Every presented value is compared with every key in constant time, and the 401 says the same
    whatever was wrong, so a client learns nothing about which keys exist.
    """
    encoded = [k.encode() for k in keys]
    bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer KEY`")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: KEY`")

    async def require_api_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        api_key: Annotated[str | None, Depends(header)],
    ) -> None:
        presented = [credentials.credentials if credentials else "", api_key or ""]
        ok = False
        for value in presented:
            # the server decoded the header bytes as latin-1: encoding back gives those bytes
            given = value.encode("latin-1", "replace")
            for key in encoded:
                ok |= bool(value) and hmac.compare_digest(given, key)
        if not ok:
            raise UnauthorizedError("missing or invalid API key")

    return require_api_key


def body_model(model: type[TranslateRequestBase]) -> Callable[[F], F]:
    """Makes FastAPI parse a route's `body` with this app's request model (its limits)."""

    def apply(route: F) -> F:
        route.__annotations__["body"] = model
        return route

    return apply


def build_router(
    settings: Settings, request_model: type[TranslateRequestBase], api_keys: list[str]
) -> APIRouter:
    """All routes; the ones that translate or describe the model need a key when keys exist."""
    auth = [Depends(api_key_dependency(api_keys))] if api_keys else []
    auth_errors = AUTH_ERRORS if api_keys else {}
    router = APIRouter()
    protected = APIRouter(dependencies=auth, responses=auth_errors)
    timeout_s = settings.request_timeout_s

    def resolve(body: TranslateRequestBase, batcher: Batcher) -> Any:
        """The model's SearchOptions changed by the request; SearchOptions checks them (a bad
        combination is a 422 naming the field)."""
        if body.return_alignments and len(body.text) > settings.max_alignment_texts:
            raise InvalidRequestError(
                f"return_alignments is allowed for at most {settings.max_alignment_texts} texts "
                f"per request (got {len(body.text)})",
                ["body", "return_alignments"],
            )
        base = ready_translator(batcher).options
        changes = {
            field: getattr(body, name)
            for name, field in body.SEARCH_FIELDS.items()
            if getattr(body, name) is not None
        }
        if body.sampling is not None:
            changes.setdefault("beam_size", 1)
        if body.max_length is not None:  # an absolute limit instead of the length rule
            changes.update(max_len_a=0.0, max_len_b=float(body.max_length))
        changes["max_len_cap"] = settings.max_output_length
        changes["return_attention"] = body.return_alignments
        try:
            return dataclasses.replace(base, **changes)
        except ValueError as err:
            message = str(err)
            if message.startswith("n_best") and body.beam_size is None:
                message += " (the model's default beam size); ask for a larger beam_size"
            field = next(
                (n for n, f in body.SEARCH_FIELDS.items() if message.startswith(f)), "body"
            )
            raise InvalidRequestError(message, ["body", field]) from None

    async def subword_counts(body: TranslateRequestBase, batcher: Batcher) -> list[int]:
        """Each text's source subwords after the tokenizer's normalisation; 422 over the limit
        (characters are counted before normalisation, which can multiply them), and for a target
        prefix longer than the output limit."""
        texts = body.text
        tokenizer = ready_translator(batcher).tokenizer
        for i, prefix in enumerate(body.target_prefix or []):
            n = len(tokenizer.encode_tgt([prefix])[0]) if prefix else 0
            if n > settings.max_output_length:
                raise InvalidRequestError(
                    f"target prefix {i} is {n} subwords long; the output limit is "
                    f"{settings.max_output_length}",
                    ["body", "target_prefix", i],
                )
        if sum(map(len, texts)) <= INLINE_ENCODE_CHARS:
            encoded = tokenizer.encode_src(texts)
        else:  # long texts take milliseconds: keep the event loop free meanwhile
            encoded = await asyncio.to_thread(tokenizer.encode_src, texts)
        counts = [len(ids) for ids in encoded]
        for i, n in enumerate(counts):
            if n > settings.max_tokens:
                raise InvalidRequestError(
                    f"text {i} is {n} subwords long after normalisation; the limit is "
                    f"{settings.max_tokens} (split it into sentences)",
                    ["body", "text", i],
                )
        return counts

    @protected.post(
        "/v1/translate",
        response_model=TranslateResponse,
        responses=ERRORS,
        tags=["translation"],
        summary="Translate one text or a list of texts",
    )
    @body_model(request_model)
    async def translate(
        body: TranslateRequestBase,
        request: Request,
        batcher: BatcherDep,
    ) -> TranslateResponse:
        """Translations in input order, with scores and the n-best list; with
        `return_alignments`, the subwords and attention matrix. Concurrent requests with the same
        decoding options are translated together."""
        options = resolve(body, batcher)
        lengths = await subword_counts(body, batcher)
        request_id = request_id_of(request.scope)
        prefixes: list[str | None] | None = list(body.target_prefix) if body.target_prefix else None
        results = await unless_disconnected(
            request,
            batcher.translate(
                body.text,
                options,
                timeout_s,
                lengths=lengths,
                request_id=request_id,
                prefixes=prefixes,
            ),
        )
        return TranslateResponse(
            request_id=request_id_of(request.scope),
            model=model_name(batcher),
            translations=[to_translation(r, options) for r in results],
        )

    @protected.post(
        "/v1/translate/stream",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": STREAM_DESCRIPTION,
                "content": {"text/event-stream": {"itemSchema": SSE_EVENT_SCHEMA}},
            },
            **ERRORS,
        },
        tags=["translation"],
        summary="Translate with Server-Sent Events as results arrive",
    )
    @body_model(request_model)
    async def translate_stream(
        body: TranslateRequestBase,
        request: Request,
        batcher: BatcherDep,
    ) -> StreamingResponse:
        """One `translation` event per text as it finishes (in input order), `token` events for
        a single greedily decoded text, then `done`. The request is queued before the response
        starts, so a full queue is still a plain 503."""
        options = resolve(body, batcher)
        texts: list[str] = body.text
        lengths = await subword_counts(body, batcher)
        token_mode = len(texts) == 1 and options.mode != "beam" and not options.return_attention
        request_id = request_id_of(request.scope)
        prefixes: list[str | None] | None = list(body.target_prefix) if body.target_prefix else None
        job = batcher.submit(
            texts,
            options,
            timeout_s,
            lengths=lengths,
            request_id=request_id,
            stream=token_mode,
            prefixes=prefixes,
        )

        async def events() -> AsyncIterator[str]:
            last = ""
            try:
                async for event in job.stream():
                    if event.kind == "token":
                        last = event.value
                        yield sse("token", TokenEvent(index=event.index, text=last).model_dump())
                    else:  # "result", or "end" after token events: the finished translation
                        data = to_translation(event.value, options).model_dump()
                        yield sse("translation", {"index": event.index, **data})
                yield sse("done", DoneEvent(request_id=request_id, count=len(texts)).model_dump())
            except ServiceError as err:
                yield sse("error", error_body(err.status, err.code, err.message, request_id))

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @protected.get(
        "/v1/model",
        response_model=ModelInfo,
        responses={503: ERRORS[503]},
        tags=["service"],
        summary="The model being served",
    )
    async def model_info(batcher: BatcherDep) -> ModelInfo:
        """Languages, configuration, parameter counts and the scores recorded in training."""
        info = ready_info(batcher)
        return ModelInfo(
            name=str(info.get("name", "")),
            src_lang=str(info.get("src_lang", "")),
            tgt_lang=str(info.get("tgt_lang", "")),
            default_beam_size=default_beam_size(batcher),
            parameters=dict(info.get("parameters", {})),
            config=_json_safe(public_config(info.get("config", {}))),
            scores=_json_safe(info.get("scores", {})),
            precision=str(info.get("precision", "")),
            device=str(info.get("device", "")),
            limits=Limits(
                max_chars=settings.max_chars,
                max_tokens=settings.max_tokens,
                max_texts=settings.max_texts,
                max_alignment_texts=settings.max_alignment_texts,
                max_beam_size=settings.max_beam_size,
                max_output_length=settings.max_output_length,
                request_timeout_s=settings.request_timeout_s,
            ),
            batching=batcher.batching,
            auth=bool(api_keys),
        )

    @protected.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        tags=["service"],
        summary="Prometheus metrics",
    )
    async def metrics(batcher: BatcherDep) -> Response:
        """Requests by route and status, latency, batch sizes, queue depth, model readiness."""
        return Response(batcher.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/health", response_model=Health, tags=["service"], summary="Liveness")
    async def health() -> Health:
        """200 whenever the process serves HTTP, model loaded or not."""
        return Health()

    @router.get(
        "/v1/ready",
        response_model=Ready,
        responses={503: {"model": Ready, "description": "Model loading, failed, or stopping."}},
        tags=["service"],
        summary="Readiness",
    )
    async def ready(batcher: BatcherDep, response: Response) -> Ready:
        """200 while requests are accepted; 503 while the model loads, after it failed to load,
        while the model worker restarts, and while the server stops."""
        if batcher.ready:
            return Ready(status="ready")
        response.status_code = 503
        response.headers["Retry-After"] = str(batcher.retry_after_s)
        if batcher.stopping:
            return Ready(status="stopping")
        if batcher.load_error is not None:
            return Ready(status="failed", error="the model failed to load; see the server log")
        if batcher.restarting:
            return Ready(status="restarting", error="the model worker is restarting")
        return Ready(status="loading")

    @router.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    router.include_router(protected)
    return router


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Awaits `work`, cancelling it (and so its queued texts) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()  # the job leaves the queue: nobody is waiting for it
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGoneError("the client closed the connection")


INLINE_ENCODE_CHARS = 4096  # texts shorter than this are encoded on the event loop


def ready_translator(batcher: Batcher) -> TranslatorLike:
    if batcher.translator is None:
        if batcher.load_error is not None:
            raise NotReadyError("the model failed to load; see the server log")
        raise NotReadyError("the model is still loading", batcher.retry_after_s)
    return batcher.translator


def ready_info(batcher: Batcher) -> dict[str, Any]:
    return ready_translator(batcher).info()


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of the config that describe the model (not the server's file paths)."""
    public = {k: v for k, v in config.items() if k in ("name", "tokenizer", "model", "decode")}
    data = config.get("data") or {}
    public["data"] = {k: data[k] for k in ("src_lang", "tgt_lang") if k in data}
    return public


def default_beam_size(batcher: Batcher) -> int:
    """The beam size the model was configured to decode with."""
    translator = batcher.translator
    if translator is None:
        raise NotReadyError("the model is still loading", batcher.retry_after_s)
    cfg = getattr(translator, "cfg", None)
    return int(getattr(getattr(cfg, "decode", None), "beam_size", 1) or 1)


def model_name(batcher: Batcher) -> str:
    cfg = getattr(batcher.translator, "cfg", None)
    return str(getattr(cfg, "name", "") or "")


def _json_safe(value: Any) -> Any:
    """Non-finite floats become null (JSON has no NaN); containers are copied."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)
