"""The FastAPI application: `create_app(settings)`; the batching worker loads the model at startup."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.batcher import Batcher, ServiceError, TranslatorLike
from serve.cache import TranslationCache
from serve.libretranslate import add_libretranslate
from serve.live import build_live_router
from serve.metrics import Metrics
from serve.middleware import REQUEST_ID_HEADER, RequestContextMiddleware, error_body, request_id_of
from serve.registry import ModelRegistry, describe_model_dir
from serve.routes import (
    STATIC_DIR,
    InvalidRequestError,
    Service,
    api_key_dependency,
    build_router,
)
from serve.schemas import translate_request_model
from serve.settings import Settings

logger = logging.getLogger(__name__)

API_DESCRIPTION = """Neural machine translation with an attentional LSTM/GRU model.

Concurrent requests are translated together in token-bounded batches. Every response carries an
`X-Request-ID` header (the client's own when it sends a sane one), also found in JSON bodies.
Every error has the body `{"error": {"status", "code", "message", "request_id", "details"}}`;
`503` responses carry `Retry-After`. When the server has API keys, send one as
`Authorization: Bearer KEY` or `X-API-Key: KEY`; `/v1/health` and `/v1/ready` stay open, and
these docs need a key too unless the server was started with `NMT_DOCS=public`.
"""

_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}


def load_translator(settings: Settings) -> Callable[[], TranslatorLike]:
    """A function that loads NMT_MODEL_DIR with `Translator.load` (safetensors weights only)."""
    if settings.model_dir is None:
        raise ValueError("no model: set NMT_MODEL_DIR to a model directory (e.g. runs/NAME/model)")
    # "A,B" serves an ensemble of A and B as one model
    model_dirs = [Path(part) for part in str(settings.model_dir).split(",") if part.strip()]
    model_dir = model_dirs[0] if len(model_dirs) == 1 else model_dirs

    def load() -> TranslatorLike:
        from nmt.runtime import OnnxTranslator, is_exported_dir

        if len(model_dirs) == 1 and is_exported_dir(model_dirs[0]):
            # an `nmt export` directory: ONNX Runtime on the CPU (torch_threads: its threads)
            logger.info("loading exported %s (onnxruntime)", model_dirs[0])
            return OnnxTranslator.load(model_dirs[0], threads=settings.torch_threads)
        from nmt.translate import Translator

        if settings.torch_threads > 0:
            import torch

            # process-wide, which is what a server process wants (e.g. 1 per uvicorn worker)
            torch.set_num_threads(settings.torch_threads)

        logger.info("loading %s (%s, %s)", model_dir, settings.device, settings.precision)
        return Translator.load(
            model_dir, settings.device, settings.precision, quantize=settings.quantize
        )

    return load


def create_app(
    settings: Settings | None = None,
    *,
    translator: TranslatorLike | None = None,
    load: Callable[[], TranslatorLike] | None = None,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The service. The model comes from `translator` (already loaded), `load`, or
    `settings.model_dir`; the batching worker loads it at startup, and /v1/ready is 503 until
    it has. `on_load_failure(message)` is called from the worker when loading fails and
    `settings.load_retry_s` is 0 (`nmt serve` stops the server with it).

    Raises ValueError for settings that must not start a server (a key setting without keys)."""
    settings = settings or Settings()
    api_keys = settings.all_api_keys()
    metrics = Metrics()

    def make_batcher(load: Callable[[], TranslatorLike], is_reload: bool) -> Batcher:
        return Batcher(
            load,
            metrics=metrics,
            batching=settings.batching,
            batch_tokens=settings.batch_tokens,
            max_wait_s=settings.batch_wait_ms / 1000,
            max_queue=settings.max_queue,
            retry_after_s=settings.retry_after_s,
            warmup=settings.warmup,
            length_cap=settings.max_output_length,
            restart_delay_s=settings.restart_delay_s,
            # a failed reload leaves the old model serving: it must not stop the server
            load_retry_s=0.0 if is_reload else settings.load_retry_s,
            on_load_failure=None if is_reload else on_load_failure,
        )

    registry = ModelRegistry(make_batcher, metrics)
    if translator is not None:
        loaded = translator
        info = translator.info() if hasattr(translator, "info") else {}
        registry.add(str(info.get("name") or ""), str(info.get("src_lang") or ""),
                     str(info.get("tgt_lang") or ""), lambda: loaded)  # fmt: skip
    elif load is not None:
        registry.add("", "", "", load)
    else:
        if settings.model_dir is None:
            load_translator(settings)  # raises the error that names the missing setting
        # "A;B": two served models; "A,B" within one: an ensemble
        for part in [p.strip() for p in str(settings.model_dir).split(";") if p.strip()]:
            one = settings.model_copy(update={"model_dir": part})
            registry.add(*describe_model_dir(part), load_translator(one))
    batcher = registry.default.batcher
    cache = TranslationCache(settings.cache_size, metrics) if settings.cache_size > 0 else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry.start()
        try:
            yield
        finally:
            # joining the worker blocks: do it off the event loop, which may still be answering
            await asyncio.to_thread(registry.stop, settings.graceful_shutdown_s)

    docs_open = settings.docs == "public" or (settings.docs == "protected" and not api_keys)
    app = FastAPI(
        title="NMT translation service",
        version="1",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json" if docs_open else None,
        docs_url="/docs" if docs_open else None,
        redoc_url="/redoc" if docs_open else None,
    )
    if settings.docs == "protected" and api_keys:
        add_protected_docs(app, api_keys)
    app.state.settings = settings
    app.state.batcher = batcher  # the default model's, as started (reloads replace it)
    app.state.service = Service(settings, registry, cache)
    app.include_router(build_router(settings, translate_request_model(settings), api_keys,
                                    settings.admin_keys))  # fmt: skip
    add_libretranslate(app, api_keys)
    app.include_router(build_live_router(settings, api_keys, metrics))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    add_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER, "Retry-After"],
        )
    # outermost, so that CORS preflights and every error get a request id and are counted
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        max_concurrent=settings.max_concurrent_requests,
        retry_after_s=settings.retry_after_s,
    )
    return app


def run_server(host: str, port: int, workers: int = 1) -> int:
    """Runs the service from NMT_* settings with uvicorn until SIGTERM/SIGINT; the exit code.

    1 when the model cannot be loaded (unless NMT_LOAD_RETRY_S asks to keep retrying), so
    that a broken model directory stops a deployment instead of leaving it unready forever."""
    import uvicorn

    settings = Settings()
    settings.all_api_keys()  # a key setting without keys is an error before anything listens
    limits: dict[str, Any] = {
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_s,
        "timeout_graceful_shutdown": settings.graceful_shutdown_s,
    }
    if workers > 1:  # uvicorn's process manager imports the app in each worker
        uvicorn.run("serve.app:create_app", factory=True, host=host, port=port,
                    workers=workers, log_level="info", **limits)  # fmt: skip
        return 0
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def stop_on_load_failure(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=stop_on_load_failure)
    # what is loaded by now (torch, the framework, the app) lives as long as the process:
    # out of the collector's sight, a full collection no longer walks it (a pause of several
    # ms on every thread, live releases included); the model, loaded later, stays collectable
    gc.collect()
    gc.freeze()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", **limits))
    server.run()
    if failure:
        logger.error("the model failed to load: %s", failure[0])
        print(f"nmt serve: error: the model failed to load: {failure[0]}", file=sys.stderr)
        return 1
    return 0


def add_protected_docs(app: FastAPI, api_keys: list[str]) -> None:
    """/openapi.json, /docs and /redoc behind the API key, like the routes they describe."""
    auth = [Depends(api_key_dependency(api_keys))]

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=auth)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False, dependencies=auth)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")


def _json_error(
    request: Request,
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(status, code, message, request_id_of(request.scope))
    body["error"]["details"] = details or []
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(err: dict[str, Any]) -> tuple[list[str | int], str]:
    """Where and what, in words a client can act on."""
    loc = [p if isinstance(p, int) else str(p) for p in err.get("loc", ())]
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    kind = err.get("type", "")
    if kind == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "")
        return ["body"], f"the body is not valid JSON ({reason} at position {loc[-1]})"
    if kind == "missing" and loc == ["body"]:
        return loc, "a JSON request body is required"
    if kind == "extra_forbidden":
        msg = "unknown field"
    ctx = err.get("ctx") or {}
    items = "texts per request" if loc == ["body", "text"] else "items"
    if kind == "too_long" and "max_length" in ctx:
        msg = f"at most {ctx['max_length']} {items} allowed (got {ctx.get('actual_length')})"
    if kind == "too_short" and "min_length" in ctx:
        msg = f"at least {ctx['min_length']} {items} needed (got {ctx.get('actual_length')})"
        if loc == ["body", "text"] and ctx["min_length"] == 1:
            msg = "at least one text is needed (got an empty list)"
    return loc, msg


def add_error_handlers(app: FastAPI) -> None:
    """Every error answers with the `ErrorResponse` body; none leaks internals."""

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = []
        for err in exc.errors():
            loc, message = _validation_message(err)
            details.append({"loc": loc, "message": message, "type": str(err.get("type", ""))})
        first = details[0] if details else {"loc": [], "message": "invalid request"}
        where = ".".join(str(p) for p in first["loc"][1:] if p != "function-after[check_text()]")
        message = f"{where}: {first['message']}" if where else str(first["message"])
        return _json_error(request, 422, "invalid_request", message, details)

    @app.exception_handler(InvalidRequestError)
    async def on_invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        details = [{"loc": exc.loc, "message": exc.message, "type": "value_error"}]
        return _json_error(request, exc.status, exc.code, exc.message, details)

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return _json_error(request, exc.status, exc.code, exc.message, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body that is not UTF-8; the API calls every bad body a 422
            message = "the body is not valid JSON (it must be UTF-8 encoded)"
            details = [{"loc": ["body"], "message": message, "type": "json_invalid"}]
            return _json_error(request, 422, "invalid_request", message, details)
        code = _CODES.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "error")
        headers = dict(exc.headers) if exc.headers else None
        return _json_error(request, exc.status_code, code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return _json_error(request, 500, "internal_error", "internal server error")
