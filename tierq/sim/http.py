"""What every route of the simulator shares: the request's app state, the version and key checks,
body reading within the API's size limit, error responses, disconnect-aware sleeps, one pagination
(``limit``, ``after_id``, ``before_id``) for models and batches, and the reply builder."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tierq.sim.cache import CachePlan
from tierq.sim.catalogue import Catalogue, ModelEntry
from tierq.sim.config import SimConfig
from tierq.sim.errors import (
    SHOULD_RETRY_HEADER,
    ApiError,
    api_error_response,
    should_retry,
)
from tierq.sim.faults import Fault
from tierq.sim.messages import Reply, build_reply
from tierq.sim.ratelimit import RateLimiter
from tierq.sim.state import SimState
from tierq.sim.validation import (
    API_VERSIONS,
    Prompt,
)

__all__ = [
    "MAX_REQUEST_BYTES",
    "VERSION_HEADER",
    "ApiHeadersMiddleware",
    "PageQuery",
    "build_any_reply",
    "catalogue_of",
    "check_api_key",
    "check_version",
    "config_of",
    "fail",
    "json_body",
    "known_model",
    "model_entry",
    "new_request_id",
    "page_slice",
    "parse_json",
    "pydantic_error",
    "read_body",
    "request_id_of",
    "sleep_unless_disconnected",
    "state_of",
    "wait_disconnect",
]


#: Largest request body of the Messages and token counting APIs; larger is 413 ``request_too_large``
#: (https://platform.claude.com/docs/en/api/errors, "Request size limits": 32 MB; read as 32 * 10^6
#: bytes, the stricter of the two readings of "MB").
MAX_REQUEST_BYTES: Final = 32_000_000


VERSION_HEADER: Final = "anthropic-version"


def new_request_id() -> str:
    """Return a fresh request id, ``req_sim_<hex>``."""
    return f"req_sim_{uuid.uuid4().hex[:24]}"


class ApiHeadersMiddleware:
    """Give every response a ``request-id``; give ``/v1/`` responses the rate-limit headers and
    errors ``x-should-retry`` when the handler did not set them; note when a request arrived."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived_at = time.time()
        request_id = new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["arrived_at"] = arrived_at
        api = str(scope.get("path", "")).startswith("/v1/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                extra: dict[str, str] = {}
                if b"request-id" not in names:
                    extra["request-id"] = request_id
                if api:
                    status = int(message["status"])
                    if status >= 400 and SHOULD_RETRY_HEADER.encode() not in names:
                        extra[SHOULD_RETRY_HEADER] = "true" if should_retry(status) else "false"
                    if b"anthropic-ratelimit-requests-limit" not in names:
                        extra.update(self.limiter.headers(None))
                headers.extend((k.encode(), v.encode()) for k, v in extra.items())
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def state_of(request: Request) -> SimState:
    state: SimState = request.app.state.sim
    return state


def config_of(request: Request) -> SimConfig:
    config: SimConfig = request.app.state.config
    return config


def catalogue_of(request: Request) -> Catalogue:
    catalogue: Catalogue = request.app.state.catalogue
    return catalogue


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def check_version(request: Request) -> str:
    """The request's ``anthropic-version`` (https://platform.claude.com/docs/en/api/versioning:
    "you must send an anthropic-version request header"); only the served versions pass."""
    version = request.headers.get(VERSION_HEADER)
    if version is None:
        raise ApiError("invalid_request_error", f"{VERSION_HEADER}: header is required")
    if version not in API_VERSIONS:
        raise ApiError(
            "invalid_request_error",
            f"{VERSION_HEADER}: invalid version {version!r}; "
            f"supported versions are {', '.join(API_VERSIONS)}",
        )
    return version


def check_api_key(request: Request) -> None:
    """With ``require_api_key``: an ``x-api-key``, or ``Authorization: Bearer <key>`` as SDK 2.x sends
    it (https://platform.claude.com/docs/en/api/versioning, 2026-10-21 SDKs)."""
    if not config_of(request).require_api_key:
        return
    if request.headers.get("x-api-key"):
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return
    raise ApiError("authentication_error", "x-api-key or Authorization: Bearer header is required")


async def read_body(request: Request, limit: int = MAX_REQUEST_BYTES) -> bytes:
    """Read the body, refusing one over ``limit`` bytes (by ``Content-Length`` first, and by counting
    while reading); an oversized body is drained so the client sees the 413."""
    declared = request.headers.get("content-length")
    too_large = False
    if declared is not None:
        try:
            too_large = int(declared) > limit
        except ValueError:
            raise ApiError("invalid_request_error", "content-length: invalid header value") from None
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            too_large = True
        if not too_large:
            chunks.append(chunk)
    if too_large:
        raise ApiError("request_too_large", f"Request exceeds the maximum allowed number of bytes ({limit}).")
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(
            "invalid_request_error", "There was an error parsing the body of your request: invalid JSON"
        ) from None


async def json_body(request: Request) -> Any:
    return parse_json(await read_body(request))


def model_entry(request: Request, model: str) -> ModelEntry:
    """The model a request names: unknown or retired is 404 ``model: <id>``
    (https://platform.claude.com/docs/en/api/errors; retired models "fail",
    https://platform.claude.com/docs/en/about-claude/model-deprecations)."""
    entry = catalogue_of(request).resolve(model)
    if entry is None or entry.lifecycle == "retired":
        raise ApiError("not_found_error", f"model: {model}")
    return entry


def known_model(request: Request, model: str | None) -> str | None:
    """The canonical id of ``model`` when the catalogue knows it (rate-limit buckets are keyed by it)."""
    if model is None:
        return None
    entry = catalogue_of(request).resolve(model)
    return entry.id if entry is not None else None


def fail(request: Request, exc: ApiError, model: str | None) -> Response:
    headers = state_of(request).limiter.headers(model)
    headers.update(exc.headers)
    exc.headers = headers
    return api_error_response(exc, request_id_of(request))


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def sleep_unless_disconnected(request: Request, seconds: float) -> bool:
    """Sleep ``seconds``; return ``False`` early when the client goes away first."""
    if seconds <= 0:
        return True
    sleeper = asyncio.ensure_future(asyncio.sleep(seconds))
    watcher = asyncio.ensure_future(wait_disconnect(request))
    done, pending = await asyncio.wait({sleeper, watcher}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return sleeper in done


class PageQuery(BaseModel):
    """Query of ``GET /v1/models`` (https://platform.claude.com/docs/en/api/models-list)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int = Field(default=20, ge=1, le=1000)
    after_id: str | None = None
    before_id: str | None = None


def page_slice(ids: list[str], query: PageQuery, what: str) -> tuple[int, int, bool]:
    """The page ``query`` asks for of a list with ``ids``, as ``(begin, end, has_more)``: cursors
    that name no item, or both cursors at once, are a 400 (https://platform.claude.com/docs/en/api/
    models-list, messages/batches/list)."""
    for name in ("after_id", "before_id"):
        cursor = getattr(query, name)
        if cursor is not None and cursor not in ids:
            raise ApiError("invalid_request_error", f"{name}: no {what} with id {cursor!r}")
    if query.after_id is not None and query.before_id is not None:
        raise ApiError("invalid_request_error", "Only one of after_id and before_id may be given")
    if query.before_id is not None:
        end = ids.index(query.before_id)
        begin = max(0, end - query.limit)
        return begin, end, begin > 0
    begin = ids.index(query.after_id) + 1 if query.after_id is not None else 0
    return begin, begin + query.limit, begin + query.limit < len(ids)


def pydantic_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return ApiError("invalid_request_error", f"{loc}: {first['msg']}" if loc else str(first["msg"]))


def build_any_reply(prompt: Prompt, plan: CachePlan, fault: Fault, config: SimConfig) -> Reply:
    """The reply to ``prompt`` (streamed or not, in a batch or not), shaped by its ``fault``:
    a ``refusal`` after some deltas, an ``unknown_block`` before the text."""
    refusal_after: int | None = None
    if fault.kind == "refusal":
        refusal_after = int(fault.arg) if fault.arg is not None else config.midstream_deltas
    return build_reply(
        model=prompt.model,
        document=prompt.user_text,
        max_tokens=prompt.max_tokens,
        input_usage=plan.usage(),
        thinks=prompt.thinks,
        thinking_budget=prompt.thinking_budget,
        thinking_display=prompt.thinking_display,
        refusal_after=refusal_after,
        unknown_block=fault.kind == "unknown_block",
    )
