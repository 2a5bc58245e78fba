"""The HTTP contract: header names, request and response bodies, problem details (RFC 9457)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from tierq.contract.result import JobResult, JobStatus

__all__ = [
    "AUTHORIZATION",
    "EVENT_ID_RE",
    "IDEMPOTENCY_KEY",
    "IDEMPOTENCY_KEY_RE",
    "LAST_EVENT_ID",
    "PROBLEM_JSON",
    "Accepted",
    "CancelAccepted",
    "FieldError",
    "Health",
    "JobError",
    "JobView",
    "Problem",
    "SubmitRequest",
]

#: request headers the API reads
AUTHORIZATION = "Authorization"
IDEMPOTENCY_KEY = "Idempotency-Key"
LAST_EVENT_ID = "Last-Event-ID"
#: what an idempotency key may be: it becomes the job id after the producer's name and a dot
IDEMPOTENCY_KEY_RE = r"^[A-Za-z0-9_.:-]{1,64}$"
#: a Redis stream entry id, as the events' ``id:`` fields carry it
EVENT_ID_RE = r"^[0-9]{1,20}-[0-9]{1,20}$"
#: the media type of every error body
PROBLEM_JSON = "application/problem+json"


class SubmitRequest(BaseModel):
    """``POST /v1/jobs``: one document to summarize. Limits that depend on the tier (text length,
    ``max_tokens`` cap, deadline) are checked as ``tierq.submit`` checks them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str = Field(description="The document to summarize.")
    urgency: str = Field(default="normal", description="critical, high, normal, low or bulk: picks the tier.")
    instructions: str | None = Field(default=None, description="What kind of summary to write.")
    max_tokens: int | None = Field(default=None, description="Output cap, at most the tier's.")
    deadline_s: float | None = Field(
        default=None, description="Seconds from now the job may take, at most the tier's deadline."
    )
    metadata: dict[str, JsonValue] | None = Field(
        default=None, description="A JSON object returned with the result."
    )
    stream: bool = Field(default=False, description="Publish text as it is written, for the events.")


class Accepted(BaseModel):
    """``202`` to ``POST /v1/jobs``: the job's id (also in ``Location``)."""

    job_id: str
    status: str
    #: the Idempotency-Key was used before for the same request: nothing new was enqueued
    duplicate: bool


class JobError(BaseModel):
    """Why a job ended without a summary."""

    #: the worker-side error's class (``DeadlineExceededError``, ``RequestRejectedError``, ...)
    type: str
    message: str
    #: for a refusal, the model's category and explanation when it gave them
    category: str | None = None
    explanation: str | None = None


class JobView(BaseModel):
    """``GET /v1/jobs/{id}``: the status and, once it ended, the result or the error."""

    job_id: str
    status: JobStatus
    result: JobResult | None = None
    error: JobError | None = None


class CancelAccepted(BaseModel):
    """``202`` to ``DELETE /v1/jobs/{id}``: the job will end ``cancelled`` unless it ends first."""

    job_id: str
    status: Literal["cancelling"] = "cancelling"


class Health(BaseModel):
    """``GET /healthz``."""

    status: Literal["ok"] = "ok"


class FieldError(BaseModel):
    """One invalid field of a request."""

    field: str
    message: str


class Problem(BaseModel):
    """An error, as RFC 9457 problem details (``application/problem+json``)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    #: the request field (body field or header) that is wrong, for 413 and 422
    field: str | None = None
    #: every invalid field, when a request has several (422)
    errors: list[FieldError] | None = None
