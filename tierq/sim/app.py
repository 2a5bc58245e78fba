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

from collections.abc import Mapping
from datetime import UTC, datetime

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tierq.sim.catalogue import load_catalogue
from tierq.sim.config import SimConfig
from tierq.sim.errors import (
    error_response,
)
from tierq.sim.http import ApiHeadersMiddleware, request_id_of
from tierq.sim.latency import LatencyModel
from tierq.sim.routes_admin import (
    add_faults,
    all_timings,
    batch_summary,
    get_faults,
    health,
    job_request_count,
    job_timings,
    limit_counts,
    request_counts,
    reset,
    set_rates,
)
from tierq.sim.routes_batches import (
    batch_results,
    cancel_batch,
    create_batch,
    delete_batch,
    get_batch,
    list_batches,
)
from tierq.sim.routes_messages import count_tokens, create_message
from tierq.sim.routes_models import get_model, list_models
from tierq.sim.state import SimState

__all__ = ["create_app"]


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
        request_id=request_id_of(request),
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
