"""Every error the API answers, as RFC 9457 problem details, and the handlers that turn tierq's
errors and FastAPI's into them. No handler echoes request input: a field is named, never its value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierq.api.models import PROBLEM_JSON, FieldError, Problem
from tierq.contract.errors import (
    BrokerUnavailableError,
    DeadlineUnmeetableError,
    IdempotencyConflictError,
    InvalidJobError,
)

__all__ = [
    "BODY_TOO_LARGE",
    "BROKER_UNAVAILABLE",
    "DEADLINE_UNMEETABLE",
    "IDEMPOTENCY_CONFLICT",
    "INVALID_REQUEST",
    "JOB_ENDED",
    "MALFORMED_JSON",
    "ProblemError",
    "install_problem_handlers",
    "problem_body",
    "problem_response",
]

#: problem types of tierq's own (plain HTTP errors, 401, 404, 405, are ``about:blank``)
INVALID_REQUEST = "urn:tierq:problem:invalid-request"
MALFORMED_JSON = "urn:tierq:problem:malformed-json"
IDEMPOTENCY_CONFLICT = "urn:tierq:problem:idempotency-conflict"
JOB_ENDED = "urn:tierq:problem:job-ended"
BODY_TOO_LARGE = "urn:tierq:problem:body-too-large"
BROKER_UNAVAILABLE = "urn:tierq:problem:broker-unavailable"
DEADLINE_UNMEETABLE = "urn:tierq:problem:deadline-unmeetable"

#: seconds a client is asked to wait before trying again after a 503
RETRY_AFTER_S = 5
#: validation errors listed in one problem
MAX_LISTED_ERRORS = 10


class ProblemError(Exception):
    """Raised by a route to answer with a problem."""

    def __init__(self, problem: Problem, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(problem.title)
        self.problem = problem
        self.headers = dict(headers or {})


def problem_body(problem: Problem) -> bytes:
    """The problem as JSON bytes, absent members left out."""
    return problem.model_dump_json(exclude_none=True).encode()


def problem_response(problem: Problem, headers: Mapping[str, str] | None = None) -> Response:
    """A ``application/problem+json`` response."""
    return Response(
        problem_body(problem), problem.status, headers=dict(headers or {}), media_type=PROBLEM_JSON
    )


def _field(loc: Sequence[Any]) -> str:
    """``("body", "metadata", "k")`` → ``metadata.k``; ``("header", "Idempotency-Key")`` → the header."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "header", "query", "path"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def _validation_problem(exc: RequestValidationError) -> Problem:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return Problem(
            type=MALFORMED_JSON,
            title="Malformed JSON",
            status=400,
            detail="the body is not valid JSON",
            field="body",
        )
    listed = [FieldError(field=_field(e.get("loc", ())), message=str(e.get("msg", ""))) for e in errors]
    first = listed[0] if listed else FieldError(field="body", message="invalid")
    return Problem(
        type=INVALID_REQUEST,
        title="Invalid request",
        status=422,
        detail=f"{first.field}: {first.message}",
        field=first.field,
        errors=listed[:MAX_LISTED_ERRORS],
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error as problem details."""

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProblemError)
        return problem_response(exc.problem, exc.headers)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return problem_response(_validation_problem(exc))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail.lower() != title.lower() else None
        return problem_response(Problem(title=title, status=exc.status_code, detail=detail), exc.headers)

    async def on_conflict(request: Request, exc: Exception) -> Response:
        problem = Problem(
            type=IDEMPOTENCY_CONFLICT,
            title="Idempotency key reused",
            status=409,
            detail="this Idempotency-Key was already used for a different request; use a new key",
            field="Idempotency-Key",
        )
        return problem_response(problem)

    async def on_invalid_job(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, InvalidJobError)
        field = exc.field or "body"
        problem = Problem(type=INVALID_REQUEST, title="Invalid job", status=422, detail=str(exc), field=field)
        return problem_response(problem)

    async def on_unavailable(request: Request, exc: Exception) -> Response:
        problem = Problem(
            type=BROKER_UNAVAILABLE,
            title="Broker unavailable",
            status=503,
            detail="the broker or the result backend did not answer in time; try again",
        )
        return problem_response(problem, {"Retry-After": str(RETRY_AFTER_S)})

    async def on_unmeetable(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DeadlineUnmeetableError)
        problem = Problem(
            type=DEADLINE_UNMEETABLE,
            title="Deadline cannot be met",
            status=429,
            detail=str(exc),
            field="deadline_s",
        )
        return problem_response(problem, {"Retry-After": str(math.ceil(exc.retry_after or 1))})

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Starlette logs the exception after this answer; the body says nothing of it
        return problem_response(Problem(title="Internal server error", status=500))

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    # Starlette picks the most specific class: a conflict is an InvalidJobError too
    app.add_exception_handler(IdempotencyConflictError, on_conflict)
    app.add_exception_handler(InvalidJobError, on_invalid_job)
    app.add_exception_handler(BrokerUnavailableError, on_unavailable)
    app.add_exception_handler(DeadlineUnmeetableError, on_unmeetable)
    app.add_exception_handler(Exception, on_unexpected)
