"""What a job gives back: its result, typed, as the worker builds it and the producer reads it.

On the wire (Celery's result backend, ``Job.stream()``, ``tierq result --json``) a result is this
model as JSON (``JobResult.to_json()``), so producers in any language read the same fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

__all__ = ["STATUSES", "Fallback", "JobResult", "JobStatus", "Timings", "Usage"]

#: what ``Job.status()`` and ``GET /v1/jobs/{id}`` say (``docs/schemas/v1/status.json``): ``unknown``
#: when no job of the id was submitted or taken by a worker, or its records expired
JobStatus = Literal[
    "pending",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "refused",
    "expired",
    "cancelled",
    "unknown",
]
#: every :data:`JobStatus`, in order
STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)


class Usage(BaseModel):
    """Tokens one call used, as the API reports them (``usage`` of the Message, cumulative in a stream).

    Total prompt tokens are ``input_tokens + cache_creation_input_tokens + cache_read_input_tokens``:
    ``input_tokens`` counts only what came after the last cache breakpoint.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    #: written to the prompt cache, both lifetimes together
    cache_creation_input_tokens: int = Field(default=0, ge=0)
    #: of which with a 5-minute and a 1-hour lifetime (``usage.cache_creation``)
    cache_creation_5m_input_tokens: int = Field(default=0, ge=0)
    cache_creation_1h_input_tokens: int = Field(default=0, ge=0)
    #: read from the prompt cache
    cache_read_input_tokens: int = Field(default=0, ge=0)
    #: of ``output_tokens``, how many were thinking (``usage.output_tokens_details``); None if not reported
    thinking_tokens: int | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, data: Any) -> Any:
        """Read the API's nested ``cache_creation`` and ``output_tokens_details`` objects."""
        if not isinstance(data, Mapping):
            return data
        flat = {k: v for k, v in data.items() if v is not None}
        breakdown = flat.pop("cache_creation", None)
        if isinstance(breakdown, Mapping):
            flat.setdefault("cache_creation_5m_input_tokens", breakdown.get("ephemeral_5m_input_tokens") or 0)
            flat.setdefault("cache_creation_1h_input_tokens", breakdown.get("ephemeral_1h_input_tokens") or 0)
        elif flat.get("cache_creation_input_tokens"):
            # no breakdown: the API's default lifetime is 5 minutes
            flat.setdefault("cache_creation_5m_input_tokens", flat["cache_creation_input_tokens"])
        details = flat.pop("output_tokens_details", None)
        if isinstance(details, Mapping) and details.get("thinking_tokens") is not None:
            flat.setdefault("thinking_tokens", details["thinking_tokens"])
        return flat

    @classmethod
    def from_api(cls, usage: Mapping[str, Any]) -> Usage:
        """Usage from the API's JSON; fields it does not send (or sends malformed) count as zero."""
        try:
            return cls.model_validate(usage)
        except ValidationError:
            return cls(
                input_tokens=_count(usage.get("input_tokens")),
                output_tokens=_count(usage.get("output_tokens")),
            )

    @property
    def prompt_tokens(self) -> int:
        """Every input token of the request, cached or not."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class Timings(BaseModel):
    """Where a job's time went, in milliseconds (wall clock, one machine's view)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: enqueue → first attempt started; None when the message carried no enqueue time
    queue_wait_ms: float | None
    #: this attempt's start → its request sent: the worker's own overhead before the model
    prep_ms: float
    #: request sent → first text; None when no text came
    ttft_ms: float | None
    #: request sent → reply complete
    llm_ms: float
    #: enqueue (or first start) → result
    total_ms: float
    #: output tokens per second after the first text
    output_tokens_per_s: float | None
    #: enqueue → first text in the producer's hands, set by ``Job.stream()``
    producer_ttft_ms: float | None = None
    #: waited for the deployment's shared rate limit (in a pool thread, and back in the queue)
    limiter_wait_ms: float = 0.0
    #: a job that went through the Message Batches API: parked → its batch's results read (the
    #: batch's own processing time is ``llm_ms``); None for a job that made its own call
    batch_wait_ms: float | None = None


class Fallback(BaseModel):
    """The tier's model was overloaded this many times, and its fallback model answered."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    from_model: str = Field(alias="from")
    after_overloads: int


class JobResult(BaseModel):
    """A job that produced a summary."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str
    tier: str
    #: the model that answered (the tier's, or its fallback)
    model: str
    stop_reason: str | None
    #: the summary stopped at ``max_tokens``: it may end mid-sentence (absent from results stored
    #: before tierq recorded it, which read as False)
    truncated: bool = False
    usage: Usage
    timings: Timings
    #: from the price table; None when the model has no price there
    cost_usd: float | None
    fallback: Fallback | None = None
    retries: int
    request_id: str | None
    #: how the model was called: ``messages`` (one streamed call) or ``batch`` (a Message Batch, every
    #: token at the batch price; ``batch_id`` names it)
    path: Literal["messages", "batch"] = "messages"
    batch_id: str | None = None
    metadata: dict[str, JsonValue] | None = None
    # last, so that Celery's truncated repr of the result can be cut here (see tierq.celery.request)
    summary: str

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready data, as it is stored and sent (``fallback.from``, not ``from_model``)."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_json(cls, data: object) -> JobResult:
        """A result from its stored JSON; ``ValueError`` when it is not one."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"not a job result: {exc.error_count()} problems") from None
