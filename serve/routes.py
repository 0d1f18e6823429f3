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

from nmt.segment import Segmented, segment_html, segment_text
from serve.batcher import Batcher, NotReadyError, ServiceError, ShuttingDownError, TranslatorLike
from serve.cache import TranslationCache
from serve.middleware import error_body, request_id_of
from serve.registry import ModelRegistry, ServedModel
from serve.schemas import (
    Alignment,
    DoneEvent,
    ErrorResponse,
    Health,
    Hypothesis,
    Limits,
    ModelInfo,
    ModelsResponse,
    Ready,
    ReloadRequest,
    ReloadResponse,
    ServedModelInfo,
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
        confidence=_finite(getattr(result, "confidence", None)),
        finished=bool(getattr(result, "finished", True)),
        n_best=[Hypothesis(text=t, score=_finite(s)) for t, s in result.n_best],
        alignment=alignment,
    )


@dataclasses.dataclass
class Document:
    """A text translated sentence by sentence and put back together."""

    text: str
    score: float | None
    confidence: float | None
    finished: bool
    n_best: list[tuple[str, float | None]]
    src_tokens: tuple[str, ...] = ()
    tgt_tokens: tuple[str, ...] = ()
    attention: None = None


def join_document(segmented: Segmented, results: list[Any], n_best: int) -> Document:
    """The translations of a document's sentences put back into it: the best one, and the k-th
    alternative made of each sentence's k-th hypothesis (its best where it has fewer). Score and
    finished as for one sentence (mean, all); confidence the mean weighted by sentence length."""
    if not results:  # nothing to translate (markup or whitespace only)
        return Document(segmented.join([]), None, None, True, [(segmented.join([]), None)])
    scores = [_finite(r.score) for r in results]
    finite = [x for x in scores if x is not None]
    score = sum(finite) / len(finite) if len(finite) == len(scores) else None
    weights = [max(len(s), 1) for s in segmented.sentences]
    confidences = [_finite(getattr(r, "confidence", None)) for r in results]
    confidence = None
    if all(c is not None for c in confidences):
        confidence = sum(w * c for w, c in zip(weights, confidences) if c is not None) / sum(
            weights
        )
    alternatives = []
    for k in range(max(1, min(n_best, max(len(r.n_best) for r in results)))):
        texts = [r.n_best[k][0] if k < len(r.n_best) else r.text for r in results]
        alt_scores = [_finite(r.n_best[k][1] if k < len(r.n_best) else r.score) for r in results]
        ok = [x for x in alt_scores if x is not None]
        mean = sum(ok) / len(ok) if len(ok) == len(alt_scores) else None
        alternatives.append((segmented.join(texts), mean))
    text = segmented.join([r.text for r in results])
    alternatives[0] = (text, score)
    finished = all(bool(getattr(r, "finished", True)) for r in results)
    return Document(text, score, confidence, finished, alternatives)


def segment(texts: list[str], html: bool, lang: str) -> list[Segmented]:
    """Each text cut into sentences (plain text or HTML)."""
    cut = segment_html if html else segment_text
    return [cut(text, lang or "en") for text in texts]


@dataclasses.dataclass
class Service:
    """What the translating routes share: settings, the served models and the cache."""

    settings: Settings
    registry: ModelRegistry
    cache: TranslationCache | None

    async def encode(
        self, translator: TranslatorLike, texts: list[str], what: str = "text"
    ) -> list[list[int]]:
        """Each text's source subwords after the tokenizer's normalisation; 422 over the limit
        (characters are counted before normalisation, which can multiply them)."""
        tokenizer = translator.tokenizer
        if sum(map(len, texts)) <= INLINE_ENCODE_CHARS:
            encoded = tokenizer.encode_src(texts)
        else:  # long texts take milliseconds: keep the event loop free meanwhile
            encoded = await asyncio.to_thread(tokenizer.encode_src, texts)
        limit = self.settings.max_tokens
        for i, ids in enumerate(encoded):
            if len(ids) > limit:
                raise InvalidRequestError(
                    f"{what} {i} is {len(ids)} subwords long after normalisation; the limit is "
                    f"{limit} (split it into sentences)",
                    ["body", "text", i],
                )
        return [list(ids) for ids in encoded]

    def check_sentences(self, segmented: list[Segmented]) -> list[str]:
        """All sentences of these documents, within the per-request limits (422 otherwise)."""
        sentences = [s for doc in segmented for s in doc.sentences]
        limits = self.settings
        if len(sentences) > limits.max_texts:
            raise InvalidRequestError(
                f"the texts hold {len(sentences)} sentences; at most {limits.max_texts} per "
                "request are allowed",
                ["body", "text"],
            )
        for i, sentence in enumerate(sentences):
            if len(sentence) > limits.max_chars:
                raise InvalidRequestError(
                    f"sentence {i} is {len(sentence)} characters long; the limit is "
                    f"{limits.max_chars}",
                    ["body", "text"],
                )
        return sentences

    async def translate(
        self,
        request: Request,
        choose: Callable[[], ServedModel],
        sentences: list[str],
        options_for: Callable[[TranslatorLike], Any],
        *,
        prefixes: list[str | None] | None = None,
        what: str = "text",
    ) -> tuple[ServedModel, Any, list[Any]]:
        """Translations of sentences, from the cache where it has them, else from the chosen
        model's batcher, with `options_for(translator)`; (model, options, results).

        A model swapped by a reload while the request was on its way is asked again on the new
        model, so that a reload never fails a request."""
        for attempt in range(3):
            entry = choose()
            translator = ready_translator(entry.batcher)
            options = options_for(translator)
            if not sentences:
                return entry, options, []
            ids = await self.encode(translator, sentences, what)
            try:
                results = await self._cached(request, entry, sentences, ids, options, prefixes)
            except (ShuttingDownError, NotReadyError):
                now = self.registry.current(entry.name)
                if attempt == 2 or now is None or now.batcher is entry.batcher:
                    raise
                continue
            return entry, options, results
        raise AssertionError("unreachable")

    async def _cached(
        self,
        request: Request,
        entry: ServedModel,
        sentences: list[str],
        ids: list[list[int]],
        options: Any,
        prefixes: list[str | None] | None,
    ) -> list[Any]:
        cache = self.cache
        prefix_of = prefixes or [None] * len(sentences)
        keys = [
            cache.key(entry.cache_name, options, ids[i], prefix_of[i])
            if cache is not None
            else None
            for i in range(len(sentences))
        ]
        results: list[Any] = [cache.get(k) if cache is not None else None for k in keys]
        # repeats within one request are each translated: a request's work stays what it asks
        missing = [i for i, result in enumerate(results) if result is None]
        if missing:
            asked = [prefix_of[i] for i in missing]
            got = await unless_disconnected(
                request,
                entry.batcher.translate(
                    [sentences[i] for i in missing],
                    options,
                    self.settings.request_timeout_s,
                    lengths=[max(len(ids[i]), 1) for i in missing],
                    request_id=request_id_of(request.scope),
                    prefixes=asked if any(asked) else None,
                ),
            )
            for i, result in zip(missing, got, strict=True):
                if cache is not None:
                    cache.put(keys[i], result)
                results[i] = result
        return results

    def served(self) -> list[ServedModelInfo]:
        models = self.registry.models
        return [
            ServedModelInfo(
                name=m.name,
                source=m.src_lang,
                target=m.tgt_lang,
                ready=m.batcher.ready,
                generation=m.generation,
                default=i == 0,
            )
            for i, m in enumerate(models)
        ]


def sse(event: str, data: dict[str, Any]) -> str:
    """One Server-Sent Event; JSON never contains a raw newline, so one data line suffices."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def get_batcher(request: Request) -> Batcher:
    """The default model's batcher (the one answering when a request names no model)."""
    return get_service(request).registry.default.batcher


BatcherDep = Annotated[Batcher, Depends(get_batcher)]
ServiceDep = Annotated[Service, Depends(get_service)]


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
    settings: Settings,
    request_model: type[TranslateRequestBase],
    api_keys: list[str],
    admin_keys: list[str] | None = None,
) -> APIRouter:
    """All routes; the ones that translate or describe the model need a key when keys exist,
    and /v1/admin/reload an admin key (without admin keys it is refused)."""
    auth = [Depends(api_key_dependency(api_keys))] if api_keys else []
    auth_errors = AUTH_ERRORS if api_keys else {}
    router = APIRouter()
    protected = APIRouter(dependencies=auth, responses=auth_errors)
    timeout_s = settings.request_timeout_s

    def resolve(body: TranslateRequestBase, translator: TranslatorLike) -> Any:
        """The model's SearchOptions changed by the request; SearchOptions checks them (a bad
        combination is a 422 naming the field)."""
        if body.return_alignments and len(body.text) > settings.max_alignment_texts:
            raise InvalidRequestError(
                f"return_alignments is allowed for at most {settings.max_alignment_texts} texts "
                f"per request (got {len(body.text)})",
                ["body", "return_alignments"],
            )
        base = translator.options
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

    async def subword_counts(body: TranslateRequestBase, translator: TranslatorLike) -> list[int]:
        """Each text's source subwords after the tokenizer's normalisation; 422 over the limit
        (characters are counted before normalisation, which can multiply them), and for a target
        prefix longer than the output limit."""
        texts = body.text
        tokenizer = translator.tokenizer
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
        service: ServiceDep,
    ) -> TranslateResponse:
        """Translations in input order, with scores, confidence and the n-best list; with
        `return_alignments`, the subwords and attention matrix. Concurrent requests with the same
        decoding options are translated together. With `split: sentences` each text may hold
        paragraphs: its sentences are translated in one batch and put back in place."""
        registry = service.registry

        def choose() -> ServedModel:
            return registry.find(body.source, body.target, body.model)

        if body.split == "none":
            prefixes: list[str | None] | None = (
                list(body.target_prefix) if body.target_prefix else None
            )
            if prefixes is not None:
                await subword_counts(body, ready_translator(choose().batcher))
            entry, options, results = await service.translate(
                request, choose, body.text, lambda t: resolve(body, t), prefixes=prefixes
            )
            translations = [to_translation(r, options) for r in results]
        else:
            lang = body.source or choose().src_lang
            segmented = segment(body.text, False, lang)
            sentences = service.check_sentences(segmented)
            entry, options, results = await service.translate(
                request, choose, sentences, lambda t: resolve(body, t), what="sentence"
            )
            translations = []
            start = 0
            for doc in segmented:
                part = results[start : start + len(doc.sentences)]
                start += len(doc.sentences)
                translations.append(to_translation(join_document(doc, part, body.n_best), options))
        return TranslateResponse(
            request_id=request_id_of(request.scope),
            model=model_name(entry.batcher),
            translations=translations,
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
        service: ServiceDep,
    ) -> StreamingResponse:
        """One `translation` event per text as it finishes (in input order), `token` events for
        a single greedily decoded text, then `done`. The request is queued before the response
        starts, so a full queue is still a plain 503. One sentence per text (split 'none')."""
        if body.split != "none":
            raise InvalidRequestError(
                "the stream translates one sentence per text; use split 'none' or /v1/translate",
                ["body", "split"],
            )
        batcher = service.registry.find(body.source, body.target, body.model).batcher
        translator = ready_translator(batcher)
        options = resolve(body, translator)
        texts: list[str] = body.text
        lengths = await subword_counts(body, translator)
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

    @protected.get(
        "/v1/models",
        response_model=ModelsResponse,
        tags=["service"],
        summary="The served models and their language pairs",
    )
    async def models(service: ServiceDep) -> ModelsResponse:
        """Every served model: name, source and target language, readiness, reload count. A
        request chooses one with `source`/`target` or `model`; the first is the default."""
        return ModelsResponse(models=service.served())

    admin = [Depends(api_key_dependency(admin_keys))] if admin_keys else [Depends(_no_admin)]

    @router.post(
        "/v1/admin/reload",
        response_model=ReloadResponse,
        dependencies=admin,
        responses={
            **AUTH_ERRORS,
            403: _error("No admin keys are configured (NMT_ADMIN_KEYS)."),
            400: _error("No served model has that name."),
            500: _error("Loading failed; the old model keeps serving."),
        },
        tags=["service"],
        summary="Reload models from their directories without downtime",
    )
    async def reload(service: ServiceDep, body: ReloadRequest | None = None) -> ReloadResponse:
        """Loads the model (default: every served model) again from its directory, swaps it in
        once it is ready, and lets requests already queued finish on the old one. Needs an admin
        key (`NMT_ADMIN_KEYS`), sent like an API key."""
        name = body.model if body is not None else None
        timeout = max(settings.request_timeout_s, 300.0)
        reloaded = await asyncio.to_thread(service.registry.reload, name, timeout)
        return ReloadResponse(reloaded=reloaded, models=service.served())

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
    async def ready(service: ServiceDep, response: Response) -> Ready:
        """200 while requests are accepted; 503 while the model loads, after it failed to load,
        while the model worker restarts, and while the server stops (every served model)."""
        models = service.registry.models
        batcher = next((m.batcher for m in models if not m.batcher.ready), None)
        if batcher is None:
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


class ForbiddenError(ServiceError):
    status, code = 403, "forbidden"


async def _no_admin() -> None:
    raise ForbiddenError("reloading is disabled: the server has no admin keys (NMT_ADMIN_KEYS)")


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
