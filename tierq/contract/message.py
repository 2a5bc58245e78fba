"""The message a producer in any language puts on a tier's queue, as the worker checks it.

A Celery task message (protocol 2): headers, and a JSON body ``[args, kwargs, embed]``. tierq's
worker takes exactly one shape of it and nothing else::

    headers: {"id": <job id>, "task": "tierq.summarize", ...Celery's optional headers, tierq_* headers}
    body:    [[], {"job": <JobSpec>}, {} | null]

Every delivery is checked against these models where it runs (``tierq.celery.consumer``), before
Celery builds a request from it: a message that does not fit is dead-lettered with the reason and
acknowledged, and the worker goes on. ``docs/contract.md`` and ``docs/schemas/`` are generated
from them.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator

from tierq.contract.job import (
    JOB_ID_PATTERN,
    MAX_CONTEXT_KEYS,
    MAX_CONTEXT_VALUE_CHARS,
    MAX_JOB_ID_CHARS,
    SUMMARIZE_TASK,
)

__all__ = [
    "DEFAULT_CELERY_QUEUE",
    "DELIVERY_LIMIT_QUEUE",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "STRAY_QUEUES",
    "UNROUTABLE_QUEUE",
    "Embed",
    "Envelope",
    "Kwargs",
    "MalformedMessage",
    "TaskBody",
    "TaskHeaders",
    "bounded",
    "check_message",
    "is_job_id",
    "job_id_of",
]

#: queues no tierq worker reads, where jobs can sit unseen: Celery's default queue (where a plain
#: Celery client sends when nobody routed it), and where kombu puts a message whose routing key
#: matched no queue (tierq sets it as the Redis transport's ``deadletter_queue``; kombu drops such
#: messages otherwise). Their lengths are in ``tierq doctor``, ``tierq stats`` and
#: ``tierq_stray_messages``.
DEFAULT_CELERY_QUEUE = "celery"
UNROUTABLE_QUEUE = "tierq.unroutable"
#: RabbitMQ dead-letters here a message returned more often than its queue's delivery limit
DELIVERY_LIMIT_QUEUE = "tierq.delivery-limit"
STRAY_QUEUES = (DEFAULT_CELERY_QUEUE, UNROUTABLE_QUEUE, DELIVERY_LIMIT_QUEUE)

#: headers a message may carry, and their size as JSON: Celery's own and tierq's fit many times over
MAX_HEADERS = 64
MAX_HEADER_BYTES = 32_768
#: characters of a sender-controlled string that go anywhere (log lines, errors, dead-letter fields)
MAX_ECHO_CHARS = 200

_Id = Annotated[str, Field(min_length=1, max_length=MAX_JOB_ID_CHARS, pattern=JOB_ID_PATTERN)]
_Short = Annotated[str, Field(max_length=256)]
_Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Scalar = bool | int | float | Annotated[str, Field(max_length=MAX_CONTEXT_VALUE_CHARS)]


class MalformedMessage(ValueError):
    """A delivery that is not a tierq job message; ``reason`` says what is wrong, bounded and text-free."""

    def __init__(self, reason: str, job_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        #: the message's ``id`` header when it is a valid job id, else None
        self.job_id = job_id


def bounded(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """A sender-controlled value as a string of at most ``limit`` characters, for logs and errors."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[: limit - 12]}...(+{len(text) - limit + 12})"


class TaskHeaders(BaseModel):
    """The headers the worker reads. Others (a client's own) are allowed, within the size bounds.

    The ``tierq_*`` aliases are the header names of :mod:`tierq.contract.job` (a unit test keeps them equal).
    """

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    id: _Id
    task: _Short
    lang: _Short | None = None
    shadow: _Short | None = None
    root_id: _Short | None = None
    parent_id: _Short | None = None
    group: _Short | None = None
    eta: datetime | None = None
    expires: datetime | None = None
    # a job waiting for rate-limit capacity is sent back many times within a long deadline
    retries: int = Field(default=0, ge=0, le=100_000)
    timelimit: tuple[_Seconds | None, _Seconds | None] | None = None
    ignore_result: bool | None = None
    # the sender's own reprs are never shown: the worker writes its own (tierq.celery.request)
    argsrepr: str | None = None
    kwargsrepr: str | None = None
    enqueued_at: _Seconds | None = Field(default=None, alias="tierq_enqueued_at")
    deadline: _Seconds | None = Field(default=None, alias="tierq_deadline")
    first_started_at: _Seconds | None = Field(default=None, alias="tierq_first_started_at")
    overloads: int = Field(default=0, ge=0, le=1000, alias="tierq_overloads")
    limiter_waits: int = Field(default=0, ge=0, le=100_000, alias="tierq_limiter_waits")
    limiter_wait_s: float = Field(default=0.0, ge=0.0, le=86_400.0, alias="tierq_limiter_wait_s")
    tier: _Short | None = Field(default=None, alias="tierq_tier")
    stream: bool = Field(default=False, alias="tierq_stream")
    context: dict[Annotated[str, Field(max_length=64)], _Scalar] | None = Field(
        default=None, alias="tierq_context", max_length=MAX_CONTEXT_KEYS
    )

    @field_validator("enqueued_at", "deadline", "first_started_at", mode="before")
    @classmethod
    def _epoch(cls, value: object) -> object:
        # seconds since the epoch (time.time()), as a number; Celery's retry keeps them numbers
        if isinstance(value, bool) or (value is not None and not isinstance(value, int | float)):
            raise ValueError("must be seconds since the epoch, as a number")
        return value


class Embed(BaseModel):
    """The body's third item: Celery's canvas fields. tierq jobs are never linked to other tasks."""

    model_config = ConfigDict(extra="allow", frozen=True)

    callbacks: None = None
    errbacks: None = None
    chain: None = None
    chord: None = None


class Kwargs(BaseModel):
    """The body's second item: exactly ``{"job": {...}}``; the job itself is checked by the task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: dict[str, JsonValue]


class TaskBody(BaseModel):
    """The body ``[args, kwargs, embed]``: no positional arguments, one keyword argument."""

    model_config = ConfigDict(frozen=True)

    args: tuple[()]
    kwargs: Kwargs
    embed: Embed | None


class Envelope(BaseModel):
    """A delivery that is a well-formed tierq job message."""

    model_config = ConfigDict(frozen=True)

    headers: TaskHeaders
    job: dict[str, JsonValue]


def _first_error(exc: ValidationError, where: str) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(p) for p in error["loc"])
    return f"{where}{'.' + loc if loc else ''}: {bounded(error['msg'])}"


def check_message(headers: object, body: object) -> Envelope:
    """Check a delivery's headers and decoded body; MalformedMessage naming what is wrong."""
    if not isinstance(headers, dict):
        raise MalformedMessage(f"headers: not an object ({type(headers).__name__})")
    job_id = job_id_of(headers)
    if len(headers) > MAX_HEADERS:
        raise MalformedMessage(f"headers: {len(headers)} of them, at most {MAX_HEADERS}", job_id)
    try:
        size = len(json.dumps(headers, default=str))
    except (TypeError, ValueError, RecursionError):
        raise MalformedMessage("headers: not JSON", job_id) from None
    if size > MAX_HEADER_BYTES:
        raise MalformedMessage(f"headers: {size} bytes as JSON, at most {MAX_HEADER_BYTES}", job_id)
    try:
        parsed = TaskHeaders.model_validate(headers)
    except ValidationError as exc:
        raise MalformedMessage(_first_error(exc, "headers"), job_id) from None
    if parsed.task != SUMMARIZE_TASK:
        raise MalformedMessage(f"unknown task {bounded(parsed.task)!r}; tierq runs {SUMMARIZE_TASK}", job_id)
    if not isinstance(body, list | tuple) or len(body) != 3:
        raise MalformedMessage("body: not [args, kwargs, embed]", job_id)
    try:
        checked = TaskBody.model_validate({"args": body[0], "kwargs": body[1], "embed": body[2]})
    except ValidationError as exc:
        raise MalformedMessage(_first_error(exc, "body"), job_id) from None
    if checked.kwargs.job.get("job_id") != parsed.id:
        raise MalformedMessage("body.kwargs.job.job_id: must equal the message's id header", job_id)
    return Envelope(headers=parsed, job=checked.kwargs.job)


def job_id_of(headers: object) -> str | None:
    """The message's ``id`` header when it is a usable job id, else None (never trusted otherwise)."""
    value = headers.get("id") if isinstance(headers, dict) else None
    return value if is_job_id(value) else None


def is_job_id(value: object) -> bool:
    """Whether a value is what ``JobSpec.job_id`` takes (and so a Celery task id and a key part)."""
    return (
        isinstance(value, str) and 0 < len(value) <= MAX_JOB_ID_CHARS and _ID_RE.fullmatch(value) is not None
    )


_ID_RE = re.compile(JOB_ID_PATTERN)
