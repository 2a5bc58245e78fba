"""The ``/_sim/`` admin routes tests drive: fault scripts and rates, request counts, limits,
timings, batches, reset and health."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tierq.sim.errors import (
    ApiError,
    api_error_response,
    error_response,
)
from tierq.sim.http import json_body, request_id_of, state_of
from tierq.sim.validation import (
    InvalidRequest,
)

__all__ = [
    "add_faults",
    "all_timings",
    "batch_summary",
    "get_faults",
    "health",
    "job_request_count",
    "job_timings",
    "limit_counts",
    "request_counts",
    "reset",
    "set_rates",
]


async def _admin_json(request: Request) -> dict[str, Any]:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    return body


def _admin_error(request: Request, message: str) -> Response:
    return error_response("invalid_request_error", message, request_id=request_id_of(request))


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
        state_of(request).add_faults(faults, job_id)
    except ApiError as exc:
        return api_error_response(exc, request_id_of(request))
    except ValueError as exc:
        return _admin_error(request, str(exc))
    return JSONResponse({"ok": True, **state_of(request).scripts()})


async def get_faults(request: Request) -> Response:
    """``GET /_sim/faults``: what is still scripted, and the probability table."""
    state = state_of(request)
    return JSONResponse({**state.scripts(), "rates": state.rates()})


async def set_rates(request: Request) -> Response:
    """``POST /_sim/rates``: replace the fault probability table."""
    try:
        body = await _admin_json(request)
        rates = body.get("rates", body)
        if not isinstance(rates, dict):
            raise InvalidRequest("rates: Input should be a valid dictionary")
        state_of(request).set_rates(rates)
    except ApiError as exc:
        return api_error_response(exc, request_id_of(request))
    except ValueError as exc:
        return _admin_error(request, str(exc))
    return JSONResponse({"ok": True, "rates": state_of(request).rates()})


async def request_counts(request: Request) -> Response:
    """``GET /_sim/requests``."""
    return JSONResponse(state_of(request).counts())


async def limit_counts(request: Request) -> Response:
    """``GET /_sim/limits``."""
    return JSONResponse(state_of(request).limit_counts())


async def job_request_count(request: Request) -> Response:
    """``GET /_sim/requests/{job_id}``."""
    job_id: str = request.path_params["job_id"]
    return JSONResponse({"job_id": job_id, "count": state_of(request).request_count(job_id)})


async def all_timings(request: Request) -> Response:
    """``GET /_sim/timings``."""
    return JSONResponse({"by_job": state_of(request).all_timings()})


async def job_timings(request: Request) -> Response:
    """``GET /_sim/timings/{job_id}``."""
    job_id: str = request.path_params["job_id"]
    return JSONResponse({"job_id": job_id, "requests": state_of(request).timings(job_id)})


async def batch_summary(request: Request) -> Response:
    """``GET /_sim/batches``."""
    return JSONResponse({"batches": state_of(request).batches.summary()})


async def reset(request: Request) -> Response:
    """``POST /_sim/reset``."""
    state_of(request).reset()
    return JSONResponse({"ok": True})


async def health(request: Request) -> Response:
    """``GET /_sim/health``."""
    return JSONResponse({"ok": True})
