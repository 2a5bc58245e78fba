"""The simulator's ASGI app: an Anthropic-compatible API (Messages, token counting, Models) and admin.

API endpoints (what the official SDK calls), each needing an ``anthropic-version`` header:
    ``POST /v1/messages``               summarize the user messages, whole or streamed (SSE)
    ``POST /v1/messages/count_tokens``  ``{"input_tokens": N}``
    ``GET  /v1/models``                 the catalogue, newest first, paginated (``limit``,
                                        ``after_id``, ``before_id``; ``data``, ``first_id``,
                                        ``last_id``, ``has_more``)
    ``GET  /v1/models/{model_id}``      one ``ModelInfo`` (an alias answers with its model)
    ``POST /v1/messages/batches``       create a Message Batch (:mod:`tierq.sim.batches`)
    ``GET  /v1/messages/batches``       the batches, newest first, paginated as the models
    ``GET  /v1/messages/batches/{id}``  one ``MessageBatch``
    ``POST /v1/messages/batches/{id}/cancel``   start canceling it
    ``DELETE /v1/messages/batches/{id}``        delete an ended batch
    ``GET  /v1/messages/batches/{id}/results``  its results, JSON lines, once it has ended

Admin endpoints:
    ``POST /_sim/faults``               append to a job's (or the global) fault script:
                                        ``{"job_id": "<optional>", "faults": ["529", "ok"]}``
    ``GET  /_sim/faults``               the faults still scripted, and the probability table
    ``POST /_sim/rates``                ``{"529": 0.1}``: replace the fault probability table
    ``GET  /_sim/requests``             ``{"total": N, "by_job": {job_id: count}}``
    ``GET  /_sim/requests/{job_id}``    ``{"job_id": ..., "count": N}``
    ``GET  /_sim/limits``               per model, requests the rate limit admitted and refused
                                        (429) and the requests left in its bucket:
                                        ``{"models": {model: {"admitted", "rate_limited",
                                        "requests_remaining"}}, "at": time}``
    ``GET  /_sim/timings``              ``{"by_job": {job_id: [timing, ...]}}``
    ``GET  /_sim/timings/{job_id}``     ``{"job_id": ..., "requests": [timing, ...]}``, each timing
                                        ``{"arrived_at", "first_delta_at", "ttft_ms"}``
    ``GET  /_sim/batches``              ``{"batches": [{"id", "processing_status", "requests",
                                        "cancel_initiated", "custom_ids"}]}``, newest first
    ``POST /_sim/reset``                clear scripts, rates, counts, timings, the prompt cache,
                                        the rate-limit buckets and the batches
    ``GET  /_sim/health``               ``{"ok": true}``

Every response carries a ``request-id`` header (``req_sim_<hex>``); every ``/v1/`` response also
carries the ``anthropic-ratelimit-*`` headers (:mod:`tierq.sim.ratelimit`), and every error
``x-should-retry`` and a top-level ``request_id`` equal to the header (:mod:`tierq.sim.errors`).
Requests with an ``x-tierq-job-id`` header are timed (``time.time()`` when the request reached the
app, and when its first text delta was sent); see :class:`~tierq.sim.state.RequestTiming`.

What a ``/v1/messages`` request goes through, in order: body size (413), ``anthropic-version``
(400), API key (401, when required), the injected fault, the body schema of its version (400),
the model (404 unknown or retired), the model's limits (400), the prompt cache, the rate-limit
buckets (429), then the answer.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tierq.sim.batches import (
    BATCH_BASE_S,
    BATCH_EXPIRY_S,
    BATCH_PER_REQUEST_S,
    CUSTOM_ID_PATTERN,
    MAX_BATCH_BYTES,
    MAX_BATCH_REQUESTS,
    Batch,
    BatchItem,
    BatchStore,
)
from tierq.sim.cache import CachePlan
from tierq.sim.catalogue import Catalogue, ModelEntry, load_catalogue
from tierq.sim.errors import (
    SHOULD_RETRY_HEADER,
    ApiError,
    api_error_response,
    error_body,
    error_response,
    should_retry,
)
from tierq.sim.faults import BATCH_ONLY_FAULTS, FAULT_HEADER, JOB_HEADER, Fault, fault_error
from tierq.sim.latency import LatencyModel
from tierq.sim.messages import PING_INTERVAL_S, Reply, StreamProgress, build_reply, stream_reply
from tierq.sim.ratelimit import DEFAULT_LIMITS, Limits, RateLimited, RateLimiter
from tierq.sim.state import DEFAULT_MAX_TIMED_JOBS, RequestTiming, SimState
from tierq.sim.validation import (
    API_VERSIONS,
    InvalidRequest,
    Prompt,
    check_against_model,
    parse_count_tokens_request,
    parse_messages_request,
    peek_model,
)

__all__ = ["MAX_REQUEST_BYTES", "SimConfig", "create_app"]

#: Largest request body of the Messages and token counting APIs; larger is 413 ``request_too_large``
#: (https://platform.claude.com/docs/en/api/errors, "Request size limits": 32 MB; read as 32 * 10^6
#: bytes, the stricter of the two readings of "MB").
MAX_REQUEST_BYTES: Final = 32_000_000
VERSION_HEADER: Final = "anthropic-version"


@dataclass
class SimConfig:
    """How the simulator behaves; every field has a working default."""

    #: Multiplies every simulated delay: 1.0 is real speed, 0.01 is 100x faster, 0 is no delay.
    time_scale: float = 1.0
    #: Seed for latency jitter, delta splitting and fault probabilities; ``None`` for a random one.
    seed: int | None = None
    #: Answer 401 to requests without an ``x-api-key`` or ``Authorization: Bearer`` header.
    require_api_key: bool = False
    #: ``retry-after`` of an injected ``429`` fault, in seconds.
    retry_after_s: float = 1.0
    #: How long a ``stall`` fault sends nothing, in seconds (not scaled by ``time_scale``).
    stall_s: float = 30.0
    #: Text deltas a ``midstream`` (or ``refusal``) fault sends before it strikes.
    midstream_deltas: int = 2
    #: Fault probabilities for chaos runs, e.g. ``{"529": 0.1, "429": 0.05}``.
    fault_rates: dict[str, float] = field(default_factory=dict)
    #: Replaces every model's latency jitter (0: each call of a model takes the same time).
    jitter: float | None = None
    #: Fixed time to first text delta, in seconds (not scaled), instead of the model's.
    fixed_ttft_s: float | None = None
    #: Fixed duration of a whole call, in seconds (not scaled): the deltas are spread over it.
    fixed_total_s: float | None = None
    #: Jobs whose request timings are kept (the oldest are dropped beyond).
    max_timed_jobs: int = DEFAULT_MAX_TIMED_JOBS
    #: Per-model rate limits (requests, input and output tokens per minute); generous by default.
    limits: Limits = DEFAULT_LIMITS
    #: Wall clock (seconds) of the rate-limit buckets and cache TTLs; tests inject a fake one.
    clock: Callable[[], float] | None = None
    #: The model catalogue; ``None`` reads the packaged ``tierq/sim/catalogue.toml``.
    catalogue: Catalogue | None = None
    #: The day the catalogue is served as of (models retired by then 404); ``None``: today, UTC.
    #: Tests pin it so that a retirement date passing does not change what they judge.
    today: date | None = None
    #: Longest silence in a stream before a ``ping`` (seconds, real time).
    ping_interval_s: float = PING_INTERVAL_S


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


def _state(request: Request) -> SimState:
    state: SimState = request.app.state.sim
    return state


def _config(request: Request) -> SimConfig:
    config: SimConfig = request.app.state.config
    return config


def _catalogue(request: Request) -> Catalogue:
    catalogue: Catalogue = request.app.state.catalogue
    return catalogue


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _check_version(request: Request) -> str:
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


def _check_api_key(request: Request) -> None:
    """With ``require_api_key``: an ``x-api-key``, or ``Authorization: Bearer <key>`` as SDK 2.x sends
    it (https://platform.claude.com/docs/en/api/versioning, 2026-10-21 SDKs)."""
    if not _config(request).require_api_key:
        return
    if request.headers.get("x-api-key"):
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return
    raise ApiError("authentication_error", "x-api-key or Authorization: Bearer header is required")


async def _read_body(request: Request, limit: int = MAX_REQUEST_BYTES) -> bytes:
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


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(
            "invalid_request_error", "There was an error parsing the body of your request: invalid JSON"
        ) from None


async def _json_body(request: Request) -> Any:
    return _json(await _read_body(request))


def _model_entry(request: Request, model: str) -> ModelEntry:
    """The model a request names: unknown or retired is 404 ``model: <id>``
    (https://platform.claude.com/docs/en/api/errors; retired models "fail",
    https://platform.claude.com/docs/en/about-claude/model-deprecations)."""
    entry = _catalogue(request).resolve(model)
    if entry is None or entry.lifecycle == "retired":
        raise ApiError("not_found_error", f"model: {model}")
    return entry


def _known_model(request: Request, model: str | None) -> str | None:
    """The canonical id of ``model`` when the catalogue knows it (rate-limit buckets are keyed by it)."""
    if model is None:
        return None
    entry = _catalogue(request).resolve(model)
    return entry.id if entry is not None else None


def _fail(request: Request, exc: ApiError, model: str | None) -> Response:
    headers = _state(request).limiter.headers(model)
    headers.update(exc.headers)
    exc.headers = headers
    return api_error_response(exc, _request_id(request))


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sleep_unless_disconnected(request: Request, seconds: float) -> bool:
    """Sleep ``seconds``; return ``False`` early when the client goes away first."""
    if seconds <= 0:
        return True
    sleeper = asyncio.ensure_future(asyncio.sleep(seconds))
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    done, pending = await asyncio.wait({sleeper, watcher}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return sleeper in done


async def _accepted(request: Request) -> tuple[str, Any, str | None]:
    """The checks every Messages endpoint makes first, in order: body size, API version, key, JSON,
    ``(version, body, model id)``, the model id (when the catalogue knows it) naming its rate-limit bucket."""
    raw = await _read_body(request)
    version = _check_version(request)
    _check_api_key(request)
    body = _json(raw)
    return version, body, _known_model(request, peek_model(body))


async def create_message(request: Request) -> Response:
    """``POST /v1/messages``."""
    state, config = _state(request), _config(request)
    job_id = request.headers.get(JOB_HEADER)
    state.record_request(job_id)
    timed: RequestTiming | None = None
    if job_id is not None:
        timed = state.record_arrival(job_id, getattr(request.state, "arrived_at", None) or time.time())
    bucket: str | None = None
    try:
        version, body, bucket = await _accepted(request)
        try:
            fault = state.next_fault(job_id, request.headers.get(FAULT_HEADER))
        except ValueError as exc:
            raise ApiError("invalid_request_error", f"{FAULT_HEADER}: {exc}") from None
        rate_headers = (
            state.limiter.exhausted_headers(
                bucket, fault.arg if fault.arg is not None else config.retry_after_s
            )
            if fault.kind == "429"
            else state.limiter.headers(bucket)
        )
        failed = fault_error(fault, retry_after_s=config.retry_after_s, rate_headers=rate_headers)
        if failed is not None:
            raise failed
        if fault.kind in BATCH_ONLY_FAULTS:
            raise ApiError(
                "invalid_request_error", f"fault {fault.kind!r} applies only to Message Batch requests"
            )
        try:
            entry = _catalogue(request).resolve(peek_model(body) or "")
            prompt = parse_messages_request(body, version, entry)
            entry = _model_entry(request, prompt.model)
            check_against_model(prompt, entry, entry.id)
        except InvalidRequest as exc:
            raise ApiError("invalid_request_error", str(exc)) from None
        plan = state.cache.plan(prompt, entry.id, entry.min_cacheable_tokens)
        try:
            admission, headers = state.limiter.admit(
                entry.id, plan.input_tokens + plan.creation_tokens, prompt.max_tokens
            )
        except RateLimited as exc:
            state.record_limit(entry.id, admitted=False)
            raise ApiError("rate_limit_error", exc.message, headers=exc.headers) from None
        state.record_limit(entry.id, admitted=True)
        state.cache.commit(plan)
    except ApiError as exc:
        return _fail(request, exc, bucket)

    reply = _build_reply(prompt, plan, fault, config)
    timing: LatencyModel = request.app.state.latency
    drawn = timing.timing_for(prompt.model, reply.output_tokens)
    stall_s = 0.0
    if fault.kind == "stall":
        stall_s = fault.arg if fault.arg is not None else config.stall_s

    if prompt.stream:
        fail_after: int | None = None
        if fault.kind == "midstream":
            fail_after = int(fault.arg) if fault.arg is not None else config.midstream_deltas
        on_first_delta = None if timed is None else _marker(state, timed)
        progress = StreamProgress()
        frames = stream_reply(
            reply,
            drawn,
            stall_s=stall_s,
            fail_after=fail_after,
            on_first_delta=on_first_delta,
            unknown_events=fault.kind == "unknown_event",
            ping_interval_s=config.ping_interval_s,
            progress=progress,
        )

        async def settled() -> AsyncIterator[bytes]:
            try:
                async for frame in frames:
                    yield frame
            finally:
                admission.settle(progress.output_tokens)

        return StreamingResponse(
            settled(), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"}
        )

    if fault.kind == "midstream":
        # A request that does not stream cannot fail mid-stream: it gets the whole-request form.
        admission.settle(0)
        return _fail(request, ApiError("overloaded_error", "Overloaded"), entry.id)
    if not await _sleep_unless_disconnected(request, stall_s + drawn.total(reply.output_tokens)):
        admission.settle(reply.output_tokens)
        return Response(status_code=499)
    admission.settle(reply.output_tokens)
    return JSONResponse(reply.message(), headers=state.limiter.headers(entry.id))


def _marker(state: SimState, timed: RequestTiming) -> Callable[[], None]:
    def mark() -> None:
        state.mark_first_delta(timed, time.time())

    return mark


async def count_tokens(request: Request) -> Response:
    """``POST /v1/messages/count_tokens``."""
    bucket: str | None = None
    try:
        version, body, bucket = await _accepted(request)
        try:
            entry = _catalogue(request).resolve(peek_model(body) or "")
            prompt = parse_count_tokens_request(body, version, entry)
            entry = _model_entry(request, prompt.model)
        except InvalidRequest as exc:
            raise ApiError("invalid_request_error", str(exc)) from None
    except ApiError as exc:
        return _fail(request, exc, bucket)
    return JSONResponse(
        {"input_tokens": prompt.input_tokens}, headers=_state(request).limiter.headers(entry.id)
    )


class _ListModelsQuery(BaseModel):
    """Query of ``GET /v1/models`` (https://platform.claude.com/docs/en/api/models-list)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int = Field(default=20, ge=1, le=1000)
    after_id: str | None = None
    before_id: str | None = None


def _slice(ids: list[str], query: _ListModelsQuery, what: str) -> tuple[int, int, bool]:
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


def _page(models: list[ModelEntry], query: _ListModelsQuery) -> dict[str, Any]:
    begin, end, has_more = _slice([m.id for m in models], query, "model")
    chosen = models[begin:end]
    return {
        "data": [m.model_info() for m in chosen],
        "first_id": chosen[0].id if chosen else None,
        "last_id": chosen[-1].id if chosen else None,
        "has_more": has_more,
    }


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: the catalogue, most recently released first (aliases not listed)."""
    try:
        _check_version(request)
        _check_api_key(request)
        try:
            query = _ListModelsQuery.model_validate(dict(request.query_params))
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ApiError("invalid_request_error", f"{loc}: {first['msg']}") from None
        page = _page(_catalogue(request).models(), query)
    except ApiError as exc:
        return _fail(request, exc, None)
    return JSONResponse(page)


async def get_model(request: Request) -> Response:
    """``GET /v1/models/{model_id}``: one ``ModelInfo``; an alias answers with the model it names."""
    model_id: str = request.path_params["model_id"]
    try:
        _check_version(request)
        _check_api_key(request)
        entry = _catalogue(request).resolve(model_id)
        if entry is None:
            raise ApiError("not_found_error", f"model: {model_id}")
    except ApiError as exc:
        return _fail(request, exc, None)
    return JSONResponse(entry.model_info())


# --- Message Batches (https://platform.claude.com/docs/en/api/messages/batches) --------------------


class _BatchRequestItem(BaseModel):
    """One entry of ``requests`` (https://platform.claude.com/docs/en/api/messages/batches/create):
    exactly ``custom_id`` and ``params``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    custom_id: str = Field(pattern=CUSTOM_ID_PATTERN)
    params: dict[str, Any]


class _BatchCreateBody(BaseModel):
    """A ``POST /v1/messages/batches`` body: ``requests``, at least one (stricter: an empty batch is
    refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    requests: list[_BatchRequestItem] = Field(min_length=1)


def _pydantic_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return ApiError("invalid_request_error", f"{loc}: {first['msg']}" if loc else str(first["msg"]))


def _batch_body(body: Any) -> _BatchCreateBody:
    """Check the shape and the batch limits; the count is checked before anything else is parsed."""
    if not isinstance(body, dict):
        raise ApiError("invalid_request_error", "Request body must be a JSON object")
    requests = body.get("requests")
    # https://platform.claude.com/docs/en/build-with-claude/batch-processing ("Batch limitations":
    # 100,000 Message requests)
    if isinstance(requests, list) and len(requests) > MAX_BATCH_REQUESTS:
        raise ApiError(
            "invalid_request_error",
            f"requests: a Message Batch may contain at most {MAX_BATCH_REQUESTS} requests, "
            f"got {len(requests)}",
        )
    try:
        parsed = _BatchCreateBody.model_validate(body)
    except ValidationError as exc:
        raise _pydantic_error(exc) from None
    # https://platform.claude.com/docs/en/api/messages/batches/create (custom_id: "Must be unique for
    # each request within the Message Batch")
    first_index: dict[str, int] = {}
    for index, item in enumerate(parsed.requests):
        if item.custom_id in first_index:
            raise ApiError(
                "invalid_request_error",
                f"requests.{index}.custom_id: {item.custom_id!r} is already used by requests."
                f"{first_index[item.custom_id]}; each custom_id must be unique within the batch",
            )
        first_index[item.custom_id] = index
    return parsed


def _batch_prompt(request: Request, version: str, index: int, params: dict[str, Any]) -> tuple[Prompt, str]:
    """Validate one request's ``params`` as a whole ``/v1/messages`` body (stricter than the API,
    which may report some of these only as an ``errored`` result: the whole create is refused with
    a 400 naming the request). Return its prompt and canonical model id."""
    where = f"requests.{index}.params"
    # https://platform.claude.com/docs/en/api/messages/batches/create (params are
    # MessageCreateParamsNonStreaming: ``stream`` may only be false)
    if params.get("stream") is True:
        raise ApiError(
            "invalid_request_error", f"{where}.stream: streaming is not supported in Message Batches"
        )
    try:
        entry = _catalogue(request).resolve(peek_model(params) or "")
        prompt = parse_messages_request(params, version, entry)
        entry = _catalogue(request).resolve(prompt.model)
        if entry is None or entry.lifecycle == "retired":
            raise InvalidRequest(f"model: {prompt.model} was not found")
        check_against_model(prompt, entry, entry.id)
    except InvalidRequest as exc:
        raise ApiError("invalid_request_error", f"{where}.{exc}") from None
    # https://platform.claude.com/docs/en/build-with-claude/batch-processing ("max_tokens of at least
    # 1. max_tokens: 0 (cache pre-warming) is not supported inside a batch")
    if prompt.max_tokens < 1:
        raise ApiError("invalid_request_error", f"{where}.max_tokens: must be at least 1 in a Message Batch")
    return prompt, entry.id


def _build_reply(prompt: Prompt, plan: CachePlan, fault: Fault, config: SimConfig) -> Reply:
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


def _batch_item(
    request: Request,
    custom_id: str,
    prompt: Prompt,
    model_id: str,
    fault: Fault,
    done_at: float,
    deadline: float,
) -> BatchItem:
    """How one batch request ends, by its fault (see :mod:`tierq.sim.faults`)."""
    state, config = _state(request), _config(request)
    if fault.kind in BATCH_ONLY_FAULTS:
        return BatchItem(custom_id, "expired", deadline)
    failed = fault_error(fault, retry_after_s=config.retry_after_s, rate_headers={})
    if fault.kind == "midstream":
        failed = ApiError("overloaded_error", "Overloaded")
    if failed is not None:
        # the errored result's ``error`` is an ErrorResponse, the body of the API's HTTP errors
        error = error_body(failed.error_type, failed.message, details=failed.details)
        return BatchItem(custom_id, "errored", done_at, error=error)
    if fault.kind == "stall":
        done_at += fault.arg if fault.arg is not None else config.stall_s
    entry = _catalogue(request).resolve(model_id)
    plan = state.cache.plan(prompt, model_id, entry.min_cacheable_tokens if entry is not None else 0)
    state.cache.commit(plan)
    reply = _build_reply(prompt, plan, fault, config)
    message = reply.message()
    # a batch request runs on the batch tier (SDK ``Usage.service_tier``: "If the request used the
    # priority, standard, or batch tier"); token counts are those of a normal call
    message["usage"] = {**message["usage"], "service_tier": "batch"}
    return BatchItem(custom_id, "succeeded", done_at, message=message)


def _results_base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def create_batch(request: Request) -> Response:
    """``POST /v1/messages/batches``: body size (413 over 256 MB), version, key, JSON, the batch
    limits and every request's ``params`` (400 naming the first bad one); then each request draws its
    fault and its outcome is worked out."""
    state, config = _state(request), _config(request)
    store: BatchStore = state.batches
    try:
        raw = await _read_body(request, MAX_BATCH_BYTES)
        version = _check_version(request)
        _check_api_key(request)
        body = _batch_body(_json(raw))
        checked = [
            (item.custom_id, *_batch_prompt(request, version, index, item.params))
            for index, item in enumerate(body.requests)
        ]
        # drawn only once the whole batch is accepted, so a refused batch consumes no script
        faults = [state.next_fault(custom_id) for custom_id, _, _ in checked]
    except ApiError as exc:
        return _fail(request, exc, None)
    now = store.clock()
    scale = config.time_scale
    deadline = now + BATCH_EXPIRY_S * scale
    items = tuple(
        _batch_item(
            request,
            custom_id,
            prompt,
            model_id,
            fault,
            now + (BATCH_BASE_S + (index + 1) * BATCH_PER_REQUEST_S) * scale,
            deadline,
        )
        for index, ((custom_id, prompt, model_id), fault) in enumerate(zip(checked, faults, strict=True))
    )
    batch = Batch(
        id=store.new_id(),
        created_at=now,
        deadline=deadline,
        items=items,
        time_scale=scale,
        order_seed=uuid.uuid4().int,
    )
    store.add(batch)
    return JSONResponse(batch.as_dict(now, _results_base(request), fresh=True))


def _known_batch(request: Request) -> Batch:
    """The batch the path names; unknown (or deleted) is 404 ``not_found_error``."""
    batch_id: str = request.path_params["batch_id"]
    batch = _state(request).batches.get(batch_id)
    if batch is None:
        raise ApiError("not_found_error", f"message_batch_id: no Message Batch with id {batch_id!r}")
    return batch


def _checked(request: Request) -> None:
    _check_version(request)
    _check_api_key(request)


async def get_batch(request: Request) -> Response:
    """``GET /v1/messages/batches/{id}``."""
    try:
        _checked(request)
        batch = _known_batch(request)
    except ApiError as exc:
        return _fail(request, exc, None)
    store: BatchStore = _state(request).batches
    return JSONResponse(batch.as_dict(store.clock(), _results_base(request)))


async def list_batches(request: Request) -> Response:
    """``GET /v1/messages/batches``: most recently created first, paginated as ``/v1/models``
    (https://platform.claude.com/docs/en/api/messages/batches/list: ``limit`` 1 to 1000, default 20,
    ``after_id``, ``before_id``)."""
    try:
        _checked(request)
        try:
            query = _ListModelsQuery.model_validate(dict(request.query_params))
        except ValidationError as exc:
            raise _pydantic_error(exc) from None
        store: BatchStore = _state(request).batches
        batches = store.newest_first()
        begin, end, has_more = _slice([b.id for b in batches], query, "Message Batch")
        chosen = batches[begin:end]
    except ApiError as exc:
        return _fail(request, exc, None)
    now, base = store.clock(), _results_base(request)
    return JSONResponse(
        {
            "data": [b.as_dict(now, base) for b in chosen],
            "first_id": chosen[0].id if chosen else None,
            "last_id": chosen[-1].id if chosen else None,
            "has_more": has_more,
        }
    )


async def cancel_batch(request: Request) -> Response:
    """``POST /v1/messages/batches/{id}/cancel`` (https://platform.claude.com/docs/en/api/messages/batches/cancel):
    an ``in_progress`` batch becomes ``canceling``; a ``canceling`` one is answered as it is; an
    ``ended`` one is refused with 400 (stricter: the API may answer it unchanged)."""
    store: BatchStore = _state(request).batches
    try:
        _checked(request)
        batch = _known_batch(request)
        now = store.clock()
        if batch.status(now) == "ended":
            raise ApiError(
                "invalid_request_error", f"Message Batch {batch.id} has ended and can no longer be canceled"
            )
        store.cancel(batch.id, now)
    except ApiError as exc:
        return _fail(request, exc, None)
    return JSONResponse(batch.as_dict(now, _results_base(request)))


async def delete_batch(request: Request) -> Response:
    """``DELETE /v1/messages/batches/{id}`` (https://platform.claude.com/docs/en/api/messages/batches/delete:
    "Message Batches can only be deleted once they've finished processing"; otherwise 400)."""
    store: BatchStore = _state(request).batches
    try:
        _checked(request)
        batch = _known_batch(request)
        if batch.status(store.clock()) != "ended":
            raise ApiError(
                "invalid_request_error",
                f"Message Batch {batch.id} is still processing; cancel it and wait for it to end "
                "before deleting it",
            )
        store.delete(batch.id)
    except ApiError as exc:
        return _fail(request, exc, None)
    return JSONResponse({"id": batch.id, "type": "message_batch_deleted"})


async def batch_results(request: Request) -> Response:
    """``GET /v1/messages/batches/{id}/results`` (https://platform.claude.com/docs/en/api/messages/batches/results):
    one ``MessageBatchIndividualResponse`` per line, only once the batch has ended ("Results ...
    are not available until processing of the entire batch ends",
    https://platform.claude.com/docs/en/build-with-claude/batch-processing); before, 400."""
    store: BatchStore = _state(request).batches
    try:
        _checked(request)
        batch = _known_batch(request)
        status = batch.status(store.clock())
        if status != "ended":
            raise ApiError(
                "invalid_request_error",
                f"Message Batch {batch.id} has not ended (processing_status: {status}); "
                "its results are not available yet",
            )
    except ApiError as exc:
        return _fail(request, exc, None)
    lines = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in batch.results())
    return Response(lines.encode(), media_type="application/binary")


async def _admin_json(request: Request) -> dict[str, Any]:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    return body


def _admin_error(request: Request, message: str) -> Response:
    return error_response("invalid_request_error", message, request_id=_request_id(request))


async def add_faults(request: Request) -> Response:
    """``POST /_sim/faults``: append faults to a job's script, or to the global one."""
    try:
        body = await _admin_json(request)
        job_id = body.get("job_id")
        faults = body.get("faults")
        if job_id is not None and not isinstance(job_id, str):
            raise InvalidRequest("job_id: Input should be a valid string")
        if not isinstance(faults, list) or not all(isinstance(f, str) for f in faults):
            raise InvalidRequest("faults: Input should be a list of fault names")
        _state(request).add_faults(faults, job_id)
    except ApiError as exc:
        return api_error_response(exc, _request_id(request))
    except ValueError as exc:
        return _admin_error(request, str(exc))
    return JSONResponse({"ok": True, **_state(request).scripts()})


async def get_faults(request: Request) -> Response:
    """``GET /_sim/faults``: what is still scripted, and the probability table."""
    state = _state(request)
    return JSONResponse({**state.scripts(), "rates": state.rates()})


async def set_rates(request: Request) -> Response:
    """``POST /_sim/rates``: replace the fault probability table."""
    try:
        body = await _admin_json(request)
        rates = body.get("rates", body)
        if not isinstance(rates, dict):
            raise InvalidRequest("rates: Input should be a valid dictionary")
        _state(request).set_rates(rates)
    except ApiError as exc:
        return api_error_response(exc, _request_id(request))
    except ValueError as exc:
        return _admin_error(request, str(exc))
    return JSONResponse({"ok": True, "rates": _state(request).rates()})


async def request_counts(request: Request) -> Response:
    """``GET /_sim/requests``."""
    return JSONResponse(_state(request).counts())


async def limit_counts(request: Request) -> Response:
    """``GET /_sim/limits``."""
    return JSONResponse(_state(request).limit_counts())


async def job_request_count(request: Request) -> Response:
    """``GET /_sim/requests/{job_id}``."""
    job_id: str = request.path_params["job_id"]
    return JSONResponse({"job_id": job_id, "count": _state(request).request_count(job_id)})


async def all_timings(request: Request) -> Response:
    """``GET /_sim/timings``."""
    return JSONResponse({"by_job": _state(request).all_timings()})


async def job_timings(request: Request) -> Response:
    """``GET /_sim/timings/{job_id}``."""
    job_id: str = request.path_params["job_id"]
    return JSONResponse({"job_id": job_id, "requests": _state(request).timings(job_id)})


async def batch_summary(request: Request) -> Response:
    """``GET /_sim/batches``."""
    return JSONResponse({"batches": _state(request).batches.summary()})


async def reset(request: Request) -> Response:
    """``POST /_sim/reset``."""
    _state(request).reset()
    return JSONResponse({"ok": True})


async def health(request: Request) -> Response:
    """``GET /_sim/health``."""
    return JSONResponse({"ok": True})


_HTTP_ERROR_TYPES: Mapping[int, str] = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
}


async def http_error(request: Request, exc: Exception) -> Response:
    """Answer Starlette's HTTP errors (unknown path, wrong method) with API-shaped bodies."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    error_type = _HTTP_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    detail = exc.detail if isinstance(exc, HTTPException) else "Internal server error"
    return error_response(
        error_type,
        f"{request.method} {request.url.path}: {detail}",
        status=status,
        request_id=_request_id(request),
    )


def create_app(config: SimConfig | None = None) -> Starlette:
    """Build the simulator app; its :class:`SimState` is ``app.state.sim``."""
    config = config or SimConfig()
    state = SimState(
        fault_rates=config.fault_rates,
        seed=config.seed,
        max_timed_jobs=config.max_timed_jobs,
        limits=config.limits,
        clock=config.clock,
    )
    app = Starlette(
        routes=[
            Route("/v1/messages", create_message, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
            Route("/v1/messages/batches", create_batch, methods=["POST"]),
            Route("/v1/messages/batches", list_batches, methods=["GET"]),
            Route("/v1/messages/batches/{batch_id}", get_batch, methods=["GET"]),
            Route("/v1/messages/batches/{batch_id}", delete_batch, methods=["DELETE"]),
            Route("/v1/messages/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
            Route("/v1/messages/batches/{batch_id}/results", batch_results, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
            Route("/_sim/faults", add_faults, methods=["POST"]),
            Route("/_sim/faults", get_faults, methods=["GET"]),
            Route("/_sim/rates", set_rates, methods=["POST"]),
            Route("/_sim/requests", request_counts, methods=["GET"]),
            Route("/_sim/requests/{job_id:path}", job_request_count, methods=["GET"]),
            Route("/_sim/limits", limit_counts, methods=["GET"]),
            Route("/_sim/timings", all_timings, methods=["GET"]),
            Route("/_sim/timings/{job_id:path}", job_timings, methods=["GET"]),
            Route("/_sim/batches", batch_summary, methods=["GET"]),
            Route("/_sim/reset", reset, methods=["POST"]),
            Route("/_sim/health", health, methods=["GET"]),
        ],
        middleware=[Middleware(ApiHeadersMiddleware, limiter=state.limiter)],
        exception_handlers={HTTPException: http_error},
    )
    app.state.config = config
    app.state.sim = state
    catalogue = config.catalogue if config.catalogue is not None else load_catalogue()
    app.state.catalogue = catalogue.as_of(config.today or datetime.now(UTC).date())
    app.state.latency = LatencyModel(
        time_scale=config.time_scale,
        seed=config.seed,
        jitter=config.jitter,
        fixed_ttft_s=config.fixed_ttft_s,
        fixed_total_s=config.fixed_total_s,
    )
    return app
