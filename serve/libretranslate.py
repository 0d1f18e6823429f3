"""LibreTranslate's API (/translate, /languages, /detect) over the served models, in its shapes.

Clients written for LibreTranslate (Mastodon, SearXNG, Weblate, deep-translator, browser
extensions, the `libretranslatepy` package) work against this server unchanged. Requests share
the `/v1` API's models, batching, cache, limits (counted after sentence splitting), auth and
metrics; bodies are JSON or form-encoded; every error is `{"error": "..."}` with 400, 403, 429
or 5xx. Language detection (`source: auto`, `/detect`) uses `lingua`, restricted to the source
languages the server has models for.
"""

import asyncio
import dataclasses
import functools
import hmac
import json
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from serve.batcher import ServiceError
from serve.registry import ServedModel, UnknownModelError
from serve.routes import Service, get_service, join_document, segment
from serve.schemas import (
    ErrorResponse,
    LTDetectedLanguage,
    LTDetectRequest,
    LTError,
    LTLanguage,
    LTTranslateRequest,
    LTTranslateResponse,
    check_document,
)


class LibreTranslateError(Exception):
    """An error answered as `{"error": message}`."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def _error(description: str) -> dict[str, Any]:
    return {"model": LTError, "description": description}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid request: what is wrong, and which language pairs exist."),
    403: _error("Missing or invalid API key."),
    413: {"model": ErrorResponse, "description": "Request body larger than the limit."},
    429: _error("The server is busy; see Retry-After."),
    500: _error("The model failed on this batch (a bug)."),
    503: _error("The model is loading or the server is stopping; see Retry-After."),
    504: _error("Translation did not finish within the request timeout."),
}


def _body_schema(model: type[Any]) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "application/x-www-form-urlencoded": {"schema": schema},
            },
        }
    }


# -- languages and detection ----------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def language_name(code: str) -> str:
    """English name of an ISO 639-1 code ("es" -> "Spanish"), or the code itself."""
    from lingua import IsoCode639_1, Language

    try:
        return str(Language.from_iso_code_639_1(IsoCode639_1.from_str(code)).name).title()
    except ValueError:
        return code


@functools.lru_cache(maxsize=16)
def _detector(languages: tuple[str, ...]) -> Any:
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    codes = []
    for code in languages:
        try:
            codes.append(IsoCode639_1.from_str(code))
        except ValueError:  # a language lingua does not know is never detected
            continue
    if not codes:
        return None
    return LanguageDetectorBuilder.from_iso_codes_639_1(*codes).build()


def detect(text: str, languages: list[str]) -> list[tuple[str, float]]:
    """(language, confidence 0-100) among `languages`, most likely first."""
    if len(languages) == 1:
        return [(languages[0], 100.0)]
    detector = _detector(tuple(sorted(set(languages))))
    if detector is None:
        return [(languages[0], 0.0)]
    found = [
        (value.language.iso_code_639_1.name.lower(), round(100 * value.value, 1))
        for value in detector.compute_language_confidence_values(text)
    ]
    return [(code, conf) for code, conf in found if code in languages] or [(languages[0], 0.0)]


# -- request parsing ------------------------------------------------------------------------


async def read_fields(request: Request) -> dict[str, Any]:
    """The body's fields (JSON object or form) over the query string's, as LibreTranslate reads
    `request.values`; a repeated form field (`q=a&q=b`) becomes a list."""
    fields: dict[str, Any] = {k: v for k, v in request.query_params.items()}
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await request.body()
    if kind == "application/json" or (not kind and raw.strip().startswith(b"{")):
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise LibreTranslateError(400, "Invalid request: the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise LibreTranslateError(400, "Invalid request: the JSON body must be an object")
        fields.update(data)
    elif kind == "application/x-www-form-urlencoded" or (not kind and raw):
        try:
            form = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except (ValueError, UnicodeDecodeError):
            raise LibreTranslateError(400, "Invalid request: the form is not valid") from None
        fields.update({k: v[0] if len(v) == 1 else v for k, v in form.items()})
    elif raw:
        raise LibreTranslateError(
            400,
            f"Invalid request: send JSON or application/x-www-form-urlencoded (got {kind})",
        )
    return fields


def _string(fields: dict[str, Any], name: str, default: str | None = None) -> str:
    value = fields.get(name, default)
    if value is None:
        raise LibreTranslateError(400, f"Invalid request: missing {name} parameter")
    if not isinstance(value, str):
        raise LibreTranslateError(400, f"Invalid request: {name} must be a string")
    return value.strip()


def _texts(fields: dict[str, Any]) -> tuple[list[str], bool]:
    """q as a list, and whether it was one."""
    q = fields.get("q")
    if q is None:
        raise LibreTranslateError(400, "Invalid request: missing q parameter")
    many = isinstance(q, list)
    texts = q if many else [q]
    if not texts:
        raise LibreTranslateError(400, "Invalid request: q is an empty list")
    for i, text in enumerate(texts):
        where = f"q[{i}]" if many else "q"
        if not isinstance(text, str):
            raise LibreTranslateError(400, f"Invalid request: {where} must be a string")
        try:
            check_document(text)
        except ValueError as err:
            raise LibreTranslateError(400, f"Invalid request: {where}: {err}") from None
    return texts, many


def _alternatives(fields: dict[str, Any], limit: int) -> int:
    value = fields.get("alternatives", 0)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LibreTranslateError(
            400, "Invalid request: alternatives must be a whole number, 0 or more"
        )
    if value + 1 > limit:
        raise LibreTranslateError(
            400,
            f"Invalid request: at most {limit - 1} alternatives (the beam limit is {limit}); "
            f"got {value}",
        )
    return value


def check_key(fields: dict[str, Any], request: Request, keys: list[str]) -> None:
    """403 unless a configured key came as `api_key`, `Authorization: Bearer` or `X-API-Key`."""
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    presented = [
        fields.get("api_key"),
        auth[7:] if auth.lower().startswith("bearer ") else "",
        request.headers.get("x-api-key", ""),
    ]
    ok = False
    for value in presented:
        if not isinstance(value, str) or not value:
            continue
        given = value.encode("utf-8", "replace")
        for key in keys:
            ok |= hmac.compare_digest(given, key.encode())
    if not ok:
        given_any = any(isinstance(v, str) and v for v in presented)
        raise LibreTranslateError(
            403,
            "Invalid API key" if given_any else "An API key is required: send it as api_key",
        )


# -- routes ---------------------------------------------------------------------------------


def _as_lt_error(err: ServiceError) -> LibreTranslateError:
    """A /v1 error in LibreTranslate's terms (a full queue is its 429 "slow down")."""
    status = {422: 400, 401: 403, 499: 400}.get(err.status, err.status)
    if err.code == "overloaded":
        status = 429
    prefix = "Invalid request: " if status == 400 else ""
    return LibreTranslateError(status, prefix + err.message, err.retry_after)


def build_router(api_keys: list[str]) -> APIRouter:
    """POST /translate, GET /languages, POST /detect and GET /frontend/settings."""
    router = APIRouter(tags=["LibreTranslate"])

    @router.post(
        "/translate",
        response_model=LTTranslateResponse,
        response_model_exclude_none=True,
        responses=ERRORS,
        openapi_extra=_body_schema(LTTranslateRequest),
        summary="Translate (LibreTranslate-compatible)",
    )
    async def translate(request: Request) -> LTTranslateResponse:
        """`q` (a text with any number of sentences and paragraphs, or a list of them) from
        `source` (or `auto`) to `target`; `format` `text` or `html`; `alternatives` N."""
        service = get_service(request)
        fields = await read_fields(request)
        check_key(fields, request, api_keys)
        try:
            return await _translate(request, service, fields)
        except ServiceError as err:
            raise _as_lt_error(err) from None

    @router.get(
        "/languages",
        response_model=list[LTLanguage],
        responses={403: ERRORS[403]},
        summary="Languages and their targets (LibreTranslate-compatible)",
    )
    async def languages(request: Request) -> list[LTLanguage]:
        """Every language the server translates from or to, with the targets it has models
        for (none for a language it only translates into)."""
        check_key(dict(request.query_params), request, api_keys)
        models = get_service(request).registry.models
        targets: dict[str, list[str]] = {}
        for m in models:
            targets.setdefault(m.src_lang, [])
            if m.tgt_lang not in targets[m.src_lang]:
                targets[m.src_lang].append(m.tgt_lang)
        for m in models:
            targets.setdefault(m.tgt_lang, [])
        return [
            LTLanguage(code=code, name=language_name(code), targets=t)
            for code, t in targets.items()
            if code
        ]

    @router.post(
        "/detect",
        response_model=list[LTDetectedLanguage],
        responses={k: ERRORS[k] for k in (400, 403, 413)},
        openapi_extra=_body_schema(LTDetectRequest),
        summary="Detect the language of a text (LibreTranslate-compatible)",
    )
    async def detect_language(request: Request) -> list[LTDetectedLanguage]:
        """The served source languages, most likely first, with confidence 0-100."""
        fields = await read_fields(request)
        check_key(fields, request, api_keys)
        texts, _ = _texts(fields)
        languages = get_service(request).registry.source_languages()
        if not languages:
            raise LibreTranslateError(503, "The models are still loading", 1)
        found = await asyncio.to_thread(detect, " ".join(texts)[:2000], languages)
        return [LTDetectedLanguage(confidence=c, language=code) for code, c in found]

    @router.get("/frontend/settings", include_in_schema=False)
    async def frontend_settings(request: Request) -> dict[str, Any]:
        service = get_service(request)
        models = service.registry.models
        first = models[0]
        settings = service.settings
        return {
            "charLimit": settings.max_chars * settings.max_texts,
            "frontendTimeout": 500,
            "apiKeys": bool(api_keys),
            "keyRequired": bool(api_keys),
            "suggestions": False,
            "filesTranslation": False,
            "supportedFilesFormat": [],
            "language": {
                "source": {"code": first.src_lang, "name": language_name(first.src_lang)},
                "target": {"code": first.tgt_lang, "name": language_name(first.tgt_lang)},
            },
        }

    return router


async def _translate(
    request: Request, service: Service, fields: dict[str, Any]
) -> LTTranslateResponse:
    texts, many = _texts(fields)
    source = _string(fields, "source").lower()
    target = _string(fields, "target").lower()
    kind = _string(fields, "format", "text").lower()
    if kind not in ("text", "html"):
        raise LibreTranslateError(
            400, f"Invalid request: format must be 'text' or 'html' (got {kind!r})"
        )
    settings = service.settings
    if len(texts) > settings.max_texts:
        raise LibreTranslateError(
            400, f"Invalid request: at most {settings.max_texts} texts in q (got {len(texts)})"
        )
    n = _alternatives(fields, settings.max_beam_size) + 1
    registry = service.registry
    # the model of each text: by pair, or by the detected language among those that have one
    detected: list[tuple[str, float] | None] = [None] * len(texts)
    if source == "auto":
        sources = [m.src_lang for m in registry.models if m.tgt_lang == target and m.src_lang]
        if not sources:
            raise UnknownModelError(
                f"no model translates into {target!r}; served language pairs: "
                f"{', '.join(m.pair for m in registry.models)}"
            )
        for i, text in enumerate(texts):
            detected[i] = (await asyncio.to_thread(detect, text[:2000], sources))[0]
    langs = [d[0] if d is not None else source for d in detected]
    entries = {lang: registry.find(lang, target) for lang in set(langs)}
    html = kind == "html"
    segmented = [segment([t], html, lang)[0] for t, lang in zip(texts, langs)]
    service.check_sentences(segmented)  # the limits apply to the request's sentences together

    def options_for(translator: Any) -> Any:
        base = translator.options
        return dataclasses.replace(
            base,
            beam_size=max(base.beam_size, n),
            n_best=n,
            max_len_cap=settings.max_output_length,
        )

    async def run(lang: str) -> None:
        entry: ServedModel = entries[lang]
        idx = [i for i, x in enumerate(langs) if x == lang]
        sentences = [s for i in idx for s in segmented[i].sentences]
        _, _, results = await service.translate(
            request, lambda: registry.find(entry.src_lang, entry.tgt_lang), sentences,
            options_for, what="sentence",
        )  # fmt: skip
        start = 0
        for i in idx:
            k = len(segmented[i].sentences)
            documents[i] = join_document(segmented[i], results[start : start + k], n)
            start += k

    documents: list[Any] = [None] * len(texts)
    await asyncio.gather(*(run(lang) for lang in entries))
    translated = [d.text for d in documents]
    alternatives = [[text for text, _ in d.n_best[1:n]] for d in documents]
    confidence = [d.confidence for d in documents]
    found = [LTDetectedLanguage(confidence=d[1], language=d[0]) for d in detected if d is not None]
    return LTTranslateResponse(
        translatedText=translated if many else translated[0],
        alternatives=(alternatives if many else alternatives[0]) if n > 1 else None,
        detectedLanguage=(found if many else found[0]) if found else None,
        confidence=confidence if many else confidence[0],
    )


def add_libretranslate(app: FastAPI, api_keys: list[str]) -> None:
    """The LibreTranslate-compatible routes and their error shape."""
    app.include_router(build_router(api_keys))

    @app.exception_handler(LibreTranslateError)
    async def on_lt_error(request: Request, exc: LibreTranslateError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)
