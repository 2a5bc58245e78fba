"""``POST /v1/messages`` (whole or streamed) and ``POST /v1/messages/count_tokens``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tierq.sim.errors import (
    ApiError,
)
from tierq.sim.faults import BATCH_ONLY_FAULTS, FAULT_HEADER, JOB_HEADER, fault_error
from tierq.sim.http import (
    build_any_reply,
    catalogue_of,
    check_api_key,
    check_version,
    config_of,
    fail,
    known_model,
    model_entry,
    parse_json,
    read_body,
    sleep_unless_disconnected,
    state_of,
)
from tierq.sim.latency import LatencyModel
from tierq.sim.messages import StreamProgress, stream_reply
from tierq.sim.ratelimit import RateLimited
from tierq.sim.state import RequestTiming, SimState
from tierq.sim.validation import (
    InvalidRequest,
    check_against_model,
    parse_count_tokens_request,
    parse_messages_request,
    peek_model,
)

__all__ = ["count_tokens", "create_message"]


async def _accepted(request: Request) -> tuple[str, Any, str | None]:
    """The checks every Messages endpoint makes first, in order: body size, API version, key, JSON,
    ``(version, body, model id)``, the model id (when the catalogue knows it) naming its rate-limit bucket."""
    raw = await read_body(request)
    version = check_version(request)
    check_api_key(request)
    body = parse_json(raw)
    return version, body, known_model(request, peek_model(body))


async def create_message(request: Request) -> Response:
    """``POST /v1/messages``."""
    state, config = state_of(request), config_of(request)
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
            entry = catalogue_of(request).resolve(peek_model(body) or "")
            prompt = parse_messages_request(body, version, entry)
            entry = model_entry(request, prompt.model)
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
        return fail(request, exc, bucket)

    reply = build_any_reply(prompt, plan, fault, config)
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
        return fail(request, ApiError("overloaded_error", "Overloaded"), entry.id)
    if not await sleep_unless_disconnected(request, stall_s + drawn.total(reply.output_tokens)):
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
            entry = catalogue_of(request).resolve(peek_model(body) or "")
            prompt = parse_count_tokens_request(body, version, entry)
            entry = model_entry(request, prompt.model)
        except InvalidRequest as exc:
            raise ApiError("invalid_request_error", str(exc)) from None
    except ApiError as exc:
        return fail(request, exc, bucket)
    return JSONResponse(
        {"input_tokens": prompt.input_tokens}, headers=state_of(request).limiter.headers(entry.id)
    )
