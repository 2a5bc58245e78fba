"""The simulator's ASGI app: an Anthropic-compatible ``/v1/messages`` plus ``/_sim/`` admin endpoints.

API endpoints (what the official SDK calls):
    ``POST /v1/messages``               summarize the user messages, whole or streamed (SSE)
    ``POST /v1/messages/count_tokens``  ``{"input_tokens": N}``

Admin endpoints:
    ``POST /_sim/faults``               append to a job's (or the global) fault script:
                                        ``{"job_id": "<optional>", "faults": ["529", "ok"]}``
    ``GET  /_sim/faults``               the faults still scripted, and the probability table
    ``POST /_sim/rates``                ``{"529": 0.1}``: replace the fault probability table
    ``GET  /_sim/requests``             ``{"total": N, "by_job": {job_id: count}}``
    ``GET  /_sim/requests/{job_id}``    ``{"job_id": ..., "count": N}``
    ``GET  /_sim/timings``              ``{"by_job": {job_id: [timing, ...]}}``
    ``GET  /_sim/timings/{job_id}``     ``{"job_id": ..., "requests": [timing, ...]}``, each timing
                                        ``{"arrived_at", "first_delta_at", "ttft_ms"}``
    ``POST /_sim/reset``                clear scripts, rates, counts and timings
    ``GET  /_sim/health``               ``{"ok": true}``

Every response carries a ``request-id`` header (``req_sim_<hex>``). Requests with an
``x-tierq-job-id`` header are timed (``time.time()`` when the request reached the app, and when
its first text delta was sent); see :class:`~simulator.state.RequestTiming`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from simulator.errors import error_response
from simulator.faults import FAULT_HEADER, JOB_HEADER, fault_response
from simulator.latency import LatencyModel
from simulator.messages import Reply, new_message_id, stream_reply
from simulator.state import DEFAULT_MAX_TIMED_JOBS, RequestTiming, SimState
from simulator.text import summarize
from simulator.validation import InvalidRequest, parse_messages_request

__all__ = ["SimConfig", "create_app"]


@dataclass
class SimConfig:
    """How the simulator behaves; every field has a working default."""

    #: Multiplies every simulated delay: 1.0 is real speed, 0.01 is 100x faster, 0 is no delay.
    time_scale: float = 1.0
    #: Seed for latency jitter, delta splitting and fault probabilities; ``None`` for a random one.
    seed: int | None = None
    #: Answer 401 to requests without an ``x-api-key`` (or ``authorization``) header.
    require_api_key: bool = False
    #: ``retry-after`` of a simulated 429, in seconds.
    retry_after_s: float = 1.0
    #: How long a ``stall`` fault sends nothing, in seconds (not scaled by ``time_scale``).
    stall_s: float = 30.0
    #: Text deltas a ``midstream`` fault sends before its error event.
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


def new_request_id() -> str:
    """Return a fresh request id, ``req_sim_<hex>``."""
    return f"req_sim_{uuid.uuid4().hex[:24]}"


class RequestIdMiddleware:
    """Give every HTTP response a ``request-id`` header, as the API does; note when a request arrived."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived_at = time.time()
        request_id = new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["arrived_at"] = arrived_at

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"request-id" for name, _ in headers):
                    headers.append((b"request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _state(request: Request) -> SimState:
    state: SimState = request.app.state.sim
    return state


def _config(request: Request) -> SimConfig:
    config: SimConfig = request.app.state.config
    return config


def _unauthorized(request: Request) -> Response | None:
    if not _config(request).require_api_key:
        return None
    if request.headers.get("x-api-key") or request.headers.get("authorization"):
        return None
    return error_response("authentication_error", "x-api-key header is required")


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("There was an error parsing the body of your request: invalid JSON") from None


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


async def create_message(request: Request) -> Response:
    """``POST /v1/messages``."""
    state, config = _state(request), _config(request)
    job_id = request.headers.get(JOB_HEADER)
    state.record_request(job_id)
    timed: RequestTiming | None = None
    if job_id is not None:
        timed = state.record_arrival(job_id, getattr(request.state, "arrived_at", None) or time.time())
    if (denied := _unauthorized(request)) is not None:
        return denied
    try:
        fault = state.next_fault(job_id, request.headers.get(FAULT_HEADER))
    except ValueError as exc:
        return error_response("invalid_request_error", f"{FAULT_HEADER}: {exc}")
    if (failed := fault_response(fault, retry_after_s=config.retry_after_s)) is not None:
        return failed

    try:
        body = parse_messages_request(await _json_body(request))
    except InvalidRequest as exc:
        return error_response("invalid_request_error", str(exc))

    text, output_tokens, stop_reason = summarize(body.user_text, "", body.max_tokens)
    reply = Reply(
        message_id=new_message_id(),
        model=body.model,
        text=text,
        input_tokens=body.input_tokens,
        output_tokens=output_tokens,
        stop_reason=stop_reason,
    )
    timing: LatencyModel = request.app.state.latency
    drawn = timing.timing_for(body.model, output_tokens)
    stall_s = 0.0
    if fault.kind == "stall":
        stall_s = fault.arg if fault.arg is not None else config.stall_s

    if body.stream:
        fail_after: int | None = None
        if fault.kind == "midstream":
            fail_after = int(fault.arg) if fault.arg is not None else config.midstream_deltas
        on_first_delta = None if timed is None else _marker(state, timed)
        return StreamingResponse(
            stream_reply(reply, drawn, stall_s=stall_s, fail_after=fail_after, on_first_delta=on_first_delta),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    if fault.kind == "midstream":
        # A request that does not stream cannot fail mid-stream: it gets the whole-request form.
        return error_response("overloaded_error", "Overloaded")
    if not await _sleep_unless_disconnected(request, stall_s + drawn.total(output_tokens)):
        return Response(status_code=499)
    return JSONResponse(reply.message())


def _marker(state: SimState, timed: RequestTiming) -> Callable[[], None]:
    def mark() -> None:
        state.mark_first_delta(timed, time.time())

    return mark


async def count_tokens(request: Request) -> Response:
    """``POST /v1/messages/count_tokens``."""
    if (denied := _unauthorized(request)) is not None:
        return denied
    try:
        body = parse_messages_request(await _json_body(request), count_only=True)
    except InvalidRequest as exc:
        return error_response("invalid_request_error", str(exc))
    return JSONResponse({"input_tokens": body.input_tokens})


async def _admin_json(request: Request) -> dict[str, Any]:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    return body


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
    except ValueError as exc:
        return error_response("invalid_request_error", str(exc))
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
    except ValueError as exc:
        return error_response("invalid_request_error", str(exc))
    return JSONResponse({"ok": True, "rates": _state(request).rates()})


async def request_counts(request: Request) -> Response:
    """``GET /_sim/requests``."""
    return JSONResponse(_state(request).counts())


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


async def reset(request: Request) -> Response:
    """``POST /_sim/reset``."""
    _state(request).reset()
    return JSONResponse({"ok": True})


async def health(request: Request) -> Response:
    """``GET /_sim/health``."""
    return JSONResponse({"ok": True})


_HTTP_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


async def http_error(request: Request, exc: Exception) -> Response:
    """Answer Starlette's HTTP errors (unknown path, wrong method) with API-shaped bodies."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    error_type = _HTTP_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    detail = exc.detail if isinstance(exc, HTTPException) else "Internal server error"
    return error_response(error_type, f"{request.method} {request.url.path}: {detail}", status=status)


def create_app(config: SimConfig | None = None) -> Starlette:
    """Build the simulator app; its :class:`SimState` is ``app.state.sim``."""
    config = config or SimConfig()
    app = Starlette(
        routes=[
            Route("/v1/messages", create_message, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
            Route("/_sim/faults", add_faults, methods=["POST"]),
            Route("/_sim/faults", get_faults, methods=["GET"]),
            Route("/_sim/rates", set_rates, methods=["POST"]),
            Route("/_sim/requests", request_counts, methods=["GET"]),
            Route("/_sim/requests/{job_id:path}", job_request_count, methods=["GET"]),
            Route("/_sim/timings", all_timings, methods=["GET"]),
            Route("/_sim/timings/{job_id:path}", job_timings, methods=["GET"]),
            Route("/_sim/reset", reset, methods=["POST"]),
            Route("/_sim/health", health, methods=["GET"]),
        ],
        middleware=[Middleware(RequestIdMiddleware)],
        exception_handlers={HTTPException: http_error},
    )
    app.state.config = config
    app.state.sim = SimState(
        fault_rates=config.fault_rates, seed=config.seed, max_timed_jobs=config.max_timed_jobs
    )
    app.state.latency = LatencyModel(
        time_scale=config.time_scale,
        seed=config.seed,
        jitter=config.jitter,
        fixed_ttft_s=config.fixed_ttft_s,
        fixed_total_s=config.fixed_total_s,
    )
    return app
