"""ASGI middleware: request ids, the request body size limit, and per-route metrics."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.metrics import Metrics

REQUEST_ID_HEADER = "X-Request-ID"
UNLIMITED_PATHS = frozenset({"/v1/health", "/v1/ready"})  # probes work under any load
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")  # echoed only when it looks like an id


class BodyTooLargeError(HTTPException):
    """Raised from `receive` when a streamed body passes the limit (an HTTPException, so that
    FastAPI's body parsing passes it on to the error handlers as a 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


def request_id_of(scope: Scope) -> str:
    """The id this middleware gave the request ('' outside a request)."""
    return str(scope.get("state", {}).get("request_id", ""))


def error_body(status: int, code: str, message: str, request_id: str) -> dict[str, Any]:
    """The one error shape of the API: {"error": {"code", "message", "request_id", "details"}}."""
    return {
        "error": {
            "status": status,
            "code": code,
            "message": message,
            "request_id": request_id,
            "details": [],
        }
    }


class RequestContextMiddleware:
    """Gives every request an id (the client's X-Request-ID when sane), returns it as a header,
    enforces the body size limit (413), and records requests and latency by route template."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        max_body_bytes: int,
        max_concurrent: int | None = None,
        retry_after_s: int = 1,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_concurrent = max_concurrent
        self.retry_after_s = retry_after_s
        self.in_flight = 0  # requests being answered (the event loop is single-threaded)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        client_id = headers.get(REQUEST_ID_HEADER.lower(), "")
        request_id = client_id if _CLIENT_ID.match(client_id) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                raw = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                raw.append((REQUEST_ID_HEADER.lower().encode(), request_id.encode()))
                message = {**message, "headers": raw}
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLargeError(self.max_body_bytes)
            return message

        self.in_flight += 1
        try:
            declared = headers.get("content-length", "")
            if (
                self.max_concurrent is not None
                and self.in_flight > self.max_concurrent
                and scope.get("path") not in UNLIMITED_PATHS
            ):
                self.metrics.rejected.labels("too_many_requests").inc()
                message = (
                    f"the server is answering {self.max_concurrent} requests already; retry later"
                )
                await self._reply(send_with_id, request_id, 503, "overloaded", message)
            elif declared.isdigit() and int(declared) > self.max_body_bytes:
                await self._too_large(send_with_id, request_id)
            else:
                try:
                    await self.app(scope, limited_receive, send_with_id)
                except BodyTooLargeError:
                    if started:
                        raise
                    await self._too_large(send_with_id, request_id)
        finally:
            self.in_flight -= 1
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - start)

    async def _too_large(self, send: Send, request_id: str) -> None:
        message = f"request body is larger than the limit of {self.max_body_bytes} bytes"
        await self._reply(send, request_id, 413, "payload_too_large", message)

    async def _reply(
        self, send: Send, request_id: str, status: int, code: str, message: str
    ) -> None:
        """An error answered here, before the app: the body is not read, so the connection
        closes."""
        body = json.dumps(error_body(status, code, message, request_id)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        if status == 503:
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
