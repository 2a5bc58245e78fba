"""What one attempt of a job knows as it starts: its message's headers (:class:`Attempt`) and the
job it carries, checked against its queue's tier (:class:`JobRef`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from pydantic import JsonValue, TypeAdapter, ValidationError

from tierq.contract.errors import (
    CapacityWaitError,
    InvalidJobError,
    OverloadedError,
)
from tierq.contract.job import (
    DEADLINE_HEADER,
    ENQUEUED_AT_HEADER,
    FIRST_STARTED_AT_HEADER,
    LIMITER_WAIT_S_HEADER,
    LIMITER_WAITS_HEADER,
    OVERLOADS_HEADER,
    STREAM_HEADER,
    JobSpec,
    check_job,
    kwargs_repr,
)
from tierq.contract.tiers import Tier, TierTable

__all__ = ["Attempt", "JobRef"]


@dataclass(frozen=True, slots=True)
class Attempt:
    """What the worker knows about this attempt, from the message and the clock."""

    task_id: str
    retries: int
    started_at: float
    enqueued_at: float | None
    deadline_hint: float | None
    first_started_at: float
    #: the queue the message came from
    queue: str | None = None
    #: earlier attempts that ended overloaded (529)
    overloads: int = 0
    #: earlier attempts sent back to wait for rate-limit capacity (not retries), and their wait
    limiter_waits: int = 0
    limiter_wait_s: float = 0.0

    @classmethod
    def from_headers(
        cls, task_id: str, retries: int, headers: dict[str, Any], queue: str | None = None
    ) -> Attempt:
        """Read the producer's timestamps from message headers (absent when sent by plain Celery)."""
        now = time.time()
        return cls(
            task_id=task_id,
            retries=retries,
            started_at=now,
            enqueued_at=_float_or_none(headers.get(ENQUEUED_AT_HEADER)),
            deadline_hint=_float_or_none(headers.get(DEADLINE_HEADER)),
            first_started_at=_float_or_none(headers.get(FIRST_STARTED_AT_HEADER)) or now,
            queue=queue,
            overloads=int(_float_or_none(headers.get(OVERLOADS_HEADER)) or 0),
            limiter_waits=int(_float_or_none(headers.get(LIMITER_WAITS_HEADER)) or 0),
            limiter_wait_s=max(0.0, _float_or_none(headers.get(LIMITER_WAIT_S_HEADER)) or 0.0),
        )

    @property
    def spent_retries(self) -> int:
        """Retries this job has spent: its attempts after the first, less those that only waited
        for rate-limit capacity (never below zero, whatever a sender's headers say)."""
        return max(0, self.retries - min(self.limiter_waits, self.retries))

    def deadline(self, tier: Tier) -> float:
        """The job's absolute deadline: the producer's, never later than the tier allows."""
        limit = (self.enqueued_at or self.first_started_at) + tier.deadline_s
        return min(limit, self.deadline_hint) if self.deadline_hint else limit

    @property
    def enqueued_at_source(self) -> str:
        """Where the job's start of time comes from: its producer's stamp, or the first attempt's start."""
        return "producer" if self.enqueued_at is not None else "first_seen"

    @property
    def queue_wait_ms(self) -> float | None:
        """Enqueue → first attempt started, in milliseconds."""
        if self.enqueued_at is None:
            return None
        return round(max(0.0, self.first_started_at - self.enqueued_at) * 1000, 2)

    def total_ms(self, now: float) -> float:
        """Enqueue (or first start) → now, in milliseconds."""
        return round((now - (self.enqueued_at or self.first_started_at)) * 1000, 2)

    def retry_headers(self, headers: dict[str, Any], exc: BaseException, delay: float) -> dict[str, Any]:
        """Headers for the retried message: the producer's, when the first attempt started,
        overloads, and the waits for rate-limit capacity (``delay``: the countdown it goes back with)."""
        overloads = self.overloads + (1 if isinstance(exc, OverloadedError) else 0)
        waited = isinstance(exc, CapacityWaitError)
        return {
            **headers,
            FIRST_STARTED_AT_HEADER: self.first_started_at,
            OVERLOADS_HEADER: overloads,
            LIMITER_WAITS_HEADER: self.limiter_waits + (1 if waited else 0),
            LIMITER_WAIT_S_HEADER: round(self.limiter_wait_s + (delay if waited else 0.0), 3),
        }

    def model(self, tier: Tier) -> str:
        """The tier's model, or its fallback once enough attempts ended overloaded."""
        if tier.fallback_model and self.overloads >= tier.fallback_after:
            return tier.fallback_model
        return tier.model


def _float_or_none(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True, slots=True)
class JobRef:
    """A delivered job as every path sees it: checked once, where the message is read.

    ``spec`` and ``tier`` are set when the job is valid for the queue it came from; otherwise
    ``problem`` says why, and ``tier`` is the queue's own tier (never a name the sender made up).
    """

    job_id: str
    #: a tier of the table (the job's, else its queue's), or None when neither is known
    tier: Tier | None
    stream: bool
    spec: JobSpec | None = None
    problem: InvalidJobError | None = None
    #: the body's job as sent, kept for the dead letter of a job that did not check
    raw: dict[str, JsonValue] | None = None

    @classmethod
    def read(cls, task_id: str, job: object, queue: str | None, tiers: TierTable) -> JobRef:
        """Check a delivered job (:func:`tierq.contract.job.check_job`); never raises."""
        try:
            if queue is None:  # never from tierq's transports: without it the tier cannot be checked
                raise InvalidJobError("queue: the message names no queue it came from", field="queue")
            spec, tier = check_job(job, tiers, queue)
        except InvalidJobError as exc:
            raw = _json_object(job)
            stream = raw is not None and raw.get("stream") is True
            return cls(task_id, _queue_tier(queue, tiers), stream, problem=exc, raw=raw)
        return cls(spec.job_id, tier, spec.stream, spec)

    @classmethod
    def queued(cls, task_id: str, headers: dict[str, Any], queue: str | None, tiers: TierTable) -> JobRef:
        """A job known only by its message's headers (dropped unrun by Celery as expired)."""
        return cls(task_id, _queue_tier(queue, tiers), headers.get(STREAM_HEADER) is True)

    @property
    def tier_name(self) -> str:
        """The tier, for labels and logs: always one of the table's names, or "unknown"."""
        return self.tier.name if self.tier is not None else "unknown"

    def kwargs_repr(self) -> str:
        """What Celery events show for the job: its tier and size, never its text."""
        text = self.spec.text if self.spec is not None else (self.raw or {}).get("text")
        return kwargs_repr(self.tier_name, text)

    def payload(self) -> dict[str, JsonValue] | None:
        """What a dead letter keeps to replay the job: the checked job, else the job as sent."""
        if self.spec is not None:
            return self.spec.model_dump(mode="json", exclude_none=True)
        return self.raw


def _json_object(job: object) -> dict[str, JsonValue] | None:
    """A job as sent, when it is a JSON object (the consumer has checked that a body's job is)."""
    try:
        return _JSON_OBJECT.validate_python(job)
    except ValidationError:
        return None


_JSON_OBJECT: TypeAdapter[dict[str, JsonValue]] = TypeAdapter(dict[str, JsonValue])


def _queue_tier(queue: str | None, tiers: TierTable) -> Tier | None:
    return next((t for t in tiers.tiers.values() if t.queue == queue), None)
