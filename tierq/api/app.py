"""The HTTP front door: FastAPI routes over the producer API (``tierq.submit``, ``Job``).

Built by :func:`make_api` from a :class:`tierq.Producer` and a token table; it keeps no state of
its own besides them. Job ids made here are ``<producer>.<Idempotency-Key>`` (or
``<producer>.<random hex>``), so two producers' keys never name the same job and a producer reads
only ids under its own name.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import anyio
import anyio.to_thread
import redis
from fastapi import Depends, FastAPI, Header, Request, Response, Security
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tierq import Job, Producer, get_job, submit
from tierq.api.auth import TokenTable
from tierq.api.events import job_events
from tierq.api.middleware import PRODUCER_STATE, ApiMetrics, BearerAuth, BodyLimit, RequestLog
from tierq.api.models import (
    EVENT_ID_RE,
    IDEMPOTENCY_KEY,
    IDEMPOTENCY_KEY_RE,
    LAST_EVENT_ID,
    PROBLEM_JSON,
    Accepted,
    CancelAccepted,
    Health,
    JobError,
    JobView,
    Problem,
    SubmitRequest,
)
from tierq.api.problems import JOB_ENDED, ProblemError, install_problem_handlers
from tierq.contract.errors import BrokerUnavailableError, JobFailedError, JobRefusedError, JobTimeoutError
from tierq.contract.message import is_job_id

__all__ = ["DEFAULT_MAX_STREAMS", "body_limit", "make_api"]

#: bytes of JSON a body may carry on top of its text (instructions, metadata, the rest)
BODY_OVERHEAD_BYTES = 1024 * 1024
#: UTF-8 takes up to 4 bytes a character: the largest text any tier takes, as bytes
BYTES_PER_CHAR = 4
#: event streams reading Redis at once (each holds a pooled connection while it waits)
DEFAULT_MAX_STREAMS = 256
#: seconds an event stream stays open past the slowest tier's deadline before the server ends it
STREAM_MARGIN_S = 60.0
#: seconds ``GET /v1/jobs/{id}`` waits for the stored result of a job that has ended
RESULT_WAIT_S = 5.0
#: statuses of a job that has ended
ENDED = frozenset({"succeeded", "failed", "refused", "expired", "cancelled"})

_bearer = HTTPBearer(auto_error=False, description="A producer's token (see docs/http.md).")


def _problem(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    # ``model`` puts Problem in the components (under application/json too); the errors are sent as
    # application/problem+json
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        status: {"model": Problem, "description": description, "content": {PROBLEM_JSON: {"schema": schema}}}
    }


_AUTHED: dict[int | str, dict[str, Any]] = {
    **_problem(401, "No token, or an unknown one."),
    **_problem(503, "The broker or result backend did not answer."),
}
_A_JOB: dict[int | str, dict[str, Any]] = {**_AUTHED, **_problem(404, "No such job of this producer's.")}


async def caller(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> str:
    """The producer :class:`BearerAuth` found for this request (the bearer scheme is declared here
    for the OpenAPI document; the middleware has checked the token before the body was read)."""
    name: str = getattr(request.state, PRODUCER_STATE)
    return name


#: a route parameter: the calling producer's name
Caller = Annotated[str, Depends(caller)]


def body_limit(producer: Producer) -> int:
    """The default body limit: the largest text any tier takes, as UTF-8, plus 1 MiB."""
    largest = max(tier.max_input_chars for tier in producer.tiers.tiers.values())
    return BODY_OVERHEAD_BYTES + BYTES_PER_CHAR * largest


def _version() -> str:
    try:
        return version("tierq")
    except PackageNotFoundError:
        return "0"


@contextmanager
def _reachable() -> Iterator[None]:
    """Redis errors of the API's own reads as the producer API's BrokerUnavailableError."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise BrokerUnavailableError(f"result backend unavailable: {exc}") from exc


def _job_error(exc: JobFailedError, status: str) -> JobError:
    error = JobError(type=exc.error_type or status, message=str(exc))
    if isinstance(exc, JobRefusedError):
        error = error.model_copy(update={"category": exc.category, "explanation": exc.explanation})
    return error


def make_api(
    producer: Producer,
    tokens: TokenTable | None,
    *,
    max_body_bytes: int | None = None,
    max_streams: int = DEFAULT_MAX_STREAMS,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """The API app for ``producer``.

    Args:
        tokens: who may call it; None serves every caller as ``anonymous`` (local use only).
        max_body_bytes: the largest request body; default :func:`body_limit`.
        max_streams: event streams reading Redis at once; more wait their turn.
        registry: where the request metrics go (served at ``/metrics``); default a new one.
    """
    registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
    metrics = ApiMetrics(registry)
    stream_limiter = anyio.CapacityLimiter(max_streams)
    stream_max_s = producer.tiers.slowest_deadline_s + STREAM_MARGIN_S

    app = FastAPI(
        title="tierq",
        version=_version(),
        summary="Latency-tiered LLM summarization jobs over HTTP.",
        docs_url=None,
        redoc_url=None,
    )
    install_problem_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes or body_limit(producer))
    app.add_middleware(BearerAuth, tokens=tokens)
    app.add_middleware(RequestLog, routes=app.routes, metrics=metrics)

    def owned(job_id: str, name: str) -> Job:
        """The caller's job by id; 404 for another producer's, or one never submitted here."""
        mine = is_job_id(job_id) and job_id.startswith(f"{name}.")
        if mine and producer.redis is not None:
            # every job made here is claimed under its id as it is submitted
            with _reachable():
                mine = bool(producer.redis.exists(producer.keys.submitted(job_id)))
        if not mine:
            raise ProblemError(Problem(title="Not found", status=404, detail=f"no job {job_id!r}"))
        return get_job(job_id, producer=producer)

    def location(request: Request, job_id: str) -> str:
        return f"{request.scope.get('root_path', '')}/v1/jobs/{job_id}"

    @app.post(
        "/v1/jobs",
        status_code=202,
        responses={
            **_AUTHED,
            **_problem(409, "The Idempotency-Key was used for a different request."),
            **_problem(413, "The body is too large."),
            **_problem(422, "A field is invalid; `field` names it. Nothing was enqueued."),
            **_problem(
                429,
                "The job could not start before its deadline (its tier's queue, its model's rate limit); "
                "`Retry-After` says when it would. Nothing was enqueued.",
            ),
        },
    )
    def create_job(
        body: SubmitRequest,
        request: Request,
        response: Response,
        name: Caller,
        key: Annotated[
            str | None,
            Header(
                alias=IDEMPOTENCY_KEY,
                pattern=IDEMPOTENCY_KEY_RE,
                description="Submitting the same request under one key again enqueues nothing.",
            ),
        ] = None,
    ) -> Accepted:
        """Enqueue one summarization job on its urgency's tier."""
        job = submit(
            body.text,
            body.urgency,
            body.instructions,
            body.max_tokens,
            f"{name}.{key if key is not None else uuid.uuid4().hex}",
            body.metadata,
            stream=body.stream,
            deadline_s=body.deadline_s,
            producer_id=name,
            producer=producer,
        )
        response.headers["Location"] = location(request, job.id)
        status = job.status() if job.duplicate else "pending"
        return Accepted(job_id=job.id, status=status, duplicate=job.duplicate)

    @app.get("/v1/jobs/{job_id}", responses=_A_JOB)
    def read_job(job_id: str, name: Caller) -> JobView:
        """The job's status and, once it ended, its result or why it has none."""
        job = owned(job_id, name)
        status = job.status()
        if status not in ENDED:
            return JobView(job_id=job.id, status=status)
        try:
            return JobView(job_id=job.id, status=status, result=job.result(timeout=RESULT_WAIT_S))
        except JobFailedError as exc:
            return JobView(job_id=job.id, status=status, error=_job_error(exc, status))
        except JobTimeoutError:
            return JobView(job_id=job.id, status=status)

    @app.get(
        "/v1/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses={
            **_A_JOB,
            200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."},
        },
    )
    async def read_job_events(
        job_id: str,
        request: Request,
        name: Caller,
        last_event_id: Annotated[
            str | None,
            Header(alias=LAST_EVENT_ID, pattern=EVENT_ID_RE, description="Resume after this event."),
        ] = None,
    ) -> StreamingResponse:
        """The job's text as it is written (``text``, ``restarted``), then ``result`` or ``error``."""
        job = await anyio.to_thread.run_sync(owned, job_id, name)
        client = producer.redis
        if client is None:
            raise ProblemError(
                Problem(
                    title="Not implemented", status=501, detail="event streams need a Redis result backend"
                )
            )
        events = job_events(
            job,
            client,
            producer.keys.tokens(job.id),
            after=last_event_id,
            limiter=stream_limiter,
            max_s=stream_max_s,
            disconnected=request.is_disconnected,
        )
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    @app.delete(
        "/v1/jobs/{job_id}",
        status_code=202,
        responses={**_A_JOB, **_problem(409, "The job has already ended.")},
    )
    def cancel_job(job_id: str, request: Request, response: Response, name: Caller) -> CancelAccepted:
        """Cancel the job: dropped unrun if queued, stopped if running."""
        job = owned(job_id, name)
        if not job.cancel():
            problem = Problem(
                type=JOB_ENDED, title="Job already ended", status=409, detail=f"the job is {job.status()}"
            )
            raise ProblemError(problem)
        response.headers["Location"] = location(request, job.id)
        return CancelAccepted(job_id=job.id)

    @app.get("/healthz", responses=_problem(503, "Redis did not answer."))
    def healthz() -> Health:
        """200 when the result backend's Redis answers a ping; no token needed."""
        if producer.redis is not None:
            try:
                producer.redis.ping()
            except redis.RedisError as exc:
                raise BrokerUnavailableError(f"result backend unavailable: {exc}") from exc
        return Health()

    @app.get("/metrics", include_in_schema=False)
    def serve_metrics() -> Response:
        """The API's request metrics, in Prometheus' text format; no token needed."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
