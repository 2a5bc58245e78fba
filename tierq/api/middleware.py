"""ASGI middleware of the API: who is calling, the body size limit, one log line and metrics per request.

Outermost first: :class:`RequestLog`, :class:`BearerAuth`, :class:`BodyLimit`, then the routes. A
request without a valid token is refused before its body is read or parsed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tierq.api.auth import ANONYMOUS, TokenTable
from tierq.api.models import AUTHORIZATION, PROBLEM_JSON, Problem
from tierq.api.problems import BODY_TOO_LARGE, problem_body
from tierq.observe.logging import get_logger

__all__ = [
    "AUTH_PREFIX",
    "PRODUCER_STATE",
    "REQUEST_EVENT",
    "ApiMetrics",
    "BearerAuth",
    "BodyLimit",
    "RequestLog",
]

#: the one log line each request writes
REQUEST_EVENT = "api.request"
#: paths under this prefix need a token; /healthz, /metrics and /openapi.json do not
AUTH_PREFIX = "/v1/"
#: where the caller's producer name is kept in the request's state (``request.state.producer``)
PRODUCER_STATE = "producer"
#: what the route label says of a path no route matches (bounded label values)
UNMATCHED = "<unmatched>"

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60, 300, 1800)
#: methods whose body is read and counted
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_AUTHORIZATION = AUTHORIZATION.lower().encode()

_log = get_logger("tierq.api")


class ApiMetrics:
    """The API's Prometheus metrics, on the registry given (one per app: no module-level state)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "tierq_api_requests",
            "HTTP requests answered, by route template and status.",
            ["method", "route", "status", "producer"],
            registry=registry,
        )
        self.duration = Histogram(
            "tierq_api_request_duration_seconds",
            "Request received to response complete (an event stream: to its end).",
            ["method", "route"],
            buckets=_BUCKETS,
            registry=registry,
        )


async def _send_problem(send: Send, problem: Problem, headers: list[tuple[bytes, bytes]]) -> None:
    body = problem_body(problem)
    await send(
        {
            "type": "http.response.start",
            "status": problem.status,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BearerAuth:
    """Finds the producer behind ``Authorization: Bearer <token>`` and keeps its name in the
    request's state; 401 for a missing or unknown token. Without a token table every caller is
    :data:`~tierq.api.auth.ANONYMOUS`."""

    def __init__(self, app: ASGIApp, tokens: TokenTable | None) -> None:
        self.app = app
        self.tokens = tokens

    def _producer(self, scope: Scope) -> str | None:
        if self.tokens is None:
            return ANONYMOUS
        header = dict(scope["headers"]).get(_AUTHORIZATION, b"").decode("latin-1")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.tokens.authenticate(token.strip())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(AUTH_PREFIX):
            await self.app(scope, receive, send)
            return
        producer = self._producer(scope)
        if producer is None:
            problem = Problem(
                title="Unauthorized", status=401, detail="send Authorization: Bearer <your producer's token>"
            )
            await _send_problem(send, problem, [(b"www-authenticate", b'Bearer realm="tierq"')])
            return
        scope.setdefault("state", {})[PRODUCER_STATE] = producer
        await self.app(scope, receive, send)


class BodyLimit:
    """Answers 413 to a body larger than ``max_bytes``, before anything parses it.

    A declared ``Content-Length`` over the limit is refused unread; otherwise the body is read (and
    counted, chunked ones too) up to the limit, then handed on whole.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _WITH_BODY:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        problem = Problem(
            type=BODY_TOO_LARGE,
            title="Request body too large",
            status=413,
            detail=f"the body is larger than {self.max_bytes} bytes",
            field="body",
        )
        await _send_problem(send, problem, [(b"connection", b"close")])


def _template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The matched route's path template (``/v1/jobs/{job_id}``), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    for candidate in routes:  # not routed (refused before the router): match it here
        match, _ = candidate.matches(scope)
        path = getattr(candidate, "path", None)
        if match == Match.FULL and isinstance(path, str):
            return path
    return UNMATCHED


class RequestLog:
    """One ``api.request`` line per request (method, route template, status, duration, producer; no
    body, no query) and the request metrics."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute], metrics: ApiMetrics) -> None:
        self.app = app
        self.routes = routes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - started
            method, route = scope["method"], _template(scope, self.routes)
            state = scope.get("state")
            producer = state.get(PRODUCER_STATE) if isinstance(state, dict) else None
            self.metrics.requests.labels(method, route, str(status), producer or "").inc()
            self.metrics.duration.labels(method, route).observe(elapsed)
            log = _log.warning if status >= 500 else _log.info
            log(
                REQUEST_EVENT,
                method=method,
                path=route,
                status=status,
                duration_ms=round(elapsed * 1000, 2),
                producer=producer,
            )
