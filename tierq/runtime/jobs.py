"""Running a summarization job as plain functions: one attempt, its timings, the retry decision.

The Celery task in ``tierq/celery/task.py`` is a thin shell over :func:`run_attempt` and
:func:`plan_retry`; what a job is and how producer input is checked lives in ``tierq.contract.job``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import JsonValue, TypeAdapter, ValidationError

from tierq.contract.errors import (
    CancelRequestedError,
    CapacityWaitError,
    ConfigError,
    DeadlineExceededError,
    IdempotencyConflictError,
    InvalidJobError,
    LLMError,
    OverloadedError,
    PoisonJobError,
    RefusedError,
    RetryableLLMError,
    SpendLimitError,
    StreamInterruptedError,
    TierqError,
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
    carried_context,
    check_job,
    kwargs_repr,
    prompt_parts,
)
from tierq.contract.message import bounded
from tierq.contract.result import Fallback, JobResult, Timings
from tierq.contract.tiers import Tier, TierTable
from tierq.core.cancel import CancelToken
from tierq.core.settings import MAX_CRASHES, Settings
from tierq.llm.batches import request_size
from tierq.llm.client import LLMReply, LLMRequest
from tierq.llm.pricing import cost_usd
from tierq.observe import metrics
from tierq.observe.logging import get_logger
from tierq.runtime import capacity
from tierq.runtime.context import Context
from tierq.store.batches import Parked, custom_id_for
from tierq.store.deadletter import FailureTimings
from tierq.store.ratelimit import FairShare, Reservation
from tierq.store.streams import FLUSH_INTERVAL_S, TokenPublisher, stream_key

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "FAILED",
    "REFUSED",
    "RETRYING",
    "WAITING",
    "Attempt",
    "JobParked",
    "JobRef",
    "build_result",
    "plan_retry",
    "report_completed",
    "report_expired",
    "report_failure",
    "run_attempt",
]

#: event names of the canonical log lines
COMPLETED = "summarize.completed"
FAILED = "summarize.failed"
RETRYING = "summarize.retrying"
#: an attempt sent back to its queue to wait for rate-limit capacity (logged at debug)
WAITING = "summarize.waiting"
#: the job's end when the model refused: neither a summary nor a failure of tierq or the API
REFUSED = "summarize.refused"
#: the job's end when its producer cancelled it
CANCELLED = "summarize.cancelled"

DEDUPLICATED = "summarize.deduplicated"
#: a batch tier's job parked for its next Message Batch (its message is done with)
PARKED = "summarize.parked"

#: a retry is planned only if at least this many seconds of the deadline would remain for it
MIN_ATTEMPT_S = 1.0
#: seconds a call to the token-counting endpoint may take (TIERQ_COUNT_TOKENS)
COUNT_TIMEOUT_S = 2.0
#: seconds the start count outlives the tier's deadline
STARTS_TTL_MARGIN_S = 600

_log = get_logger("tierq.jobs")


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


def run_attempt(ref: JobRef, attempt: Attempt, ctx: Context) -> JobResult:
    """Run one attempt of a job: call the model, build the result, log ``summarize.completed``."""
    if ref.problem is not None:
        raise ref.problem
    spec, tier = ref.spec, ref.tier
    assert spec is not None and tier is not None  # a JobRef without a problem has both
    deadline = attempt.deadline(tier)
    if time.time() >= deadline:
        raise DeadlineExceededError(f"deadline passed before the job started (tier {tier.name})")
    guard = ctx.guard
    request = _llm_request(spec, tier, attempt)
    if tier.takes_batch(deadline - time.time()):
        return _park(spec, tier, attempt, deadline, ctx, request)
    if ctx.cache is not None:
        request = ctx.cache.mark(request)
    if ctx.limiter is not None and ctx.settings.count_tokens:
        counted = ctx.llm.count_input_tokens(request, min(COUNT_TIMEOUT_S, max(0.1, deadline - time.time())))
        request = dataclasses.replace(request, input_tokens=counted)
    floor = ctx.tiers.floor(tier, request.model)
    if guard is None:
        return _call_model(spec, tier, attempt, deadline, ctx, request, floor=floor)
    share = FairShare(tier.name, spec.producer_id)
    begin = guard.begin(
        spec.job_id,
        starts_ttl_s=tier.deadline_s + STARTS_TTL_MARGIN_S,
        fingerprint=spec.fingerprint(),
        claim_ttl_s=ctx.settings.result_expires_s,
        # the call's rate-limit share, in the same round trip
        also=capacity.reserving(ctx.limiter, request, floor, share),
    )
    reservation = capacity.reservation_of(ctx.limiter, request, begin.also)
    poison = begin.starts > tier.max_retries + 1 + MAX_CRASHES
    if begin.cancel is None or begin.conflict or begin.result is not None or begin.cancelled or poison:
        capacity.release(ctx.limiter, reservation)  # not called now (or not at all)
        reservation = None
    if begin.conflict:
        if begin.acquired:
            guard.release(spec.job_id)
        raise IdempotencyConflictError(
            f"job_id: {spec.job_id!r} already names a different request; this one was not run"
        )
    if begin.result is not None:
        _log.info(DEDUPLICATED, reason="result already recorded", starts=begin.starts)
        return begin.result
    if begin.cancelled or poison:
        if begin.acquired:
            guard.release(spec.job_id)
        if begin.cancelled:
            raise CancelRequestedError("cancelled by its producer before it ran")
        raise PoisonJobError(f"started {begin.starts} times without finishing; given up unrun")
    cancel = begin.cancel
    if cancel is None:
        # another delivery of this job is running: wait for its result, or for its lock to lapse
        other = guard.wait_for_other(spec.job_id, deadline)
        if isinstance(other, JobResult):
            _log.info(DEDUPLICATED, reason="another attempt finished it", starts=begin.starts)
            return other
        if other is None:
            raise DeadlineExceededError("deadline passed waiting for another attempt of this job")
        cancel = other
    try:
        result = _call_model(
            spec,
            tier,
            attempt,
            deadline,
            ctx,
            request,
            run=begin.starts,
            cancel=cancel,
            reservation=reservation,
            floor=floor,
        )
    except CapacityWaitError:
        # nothing was sent: the start does not count toward the crashes a job may cause
        guard.release(spec.job_id, uncount=True)
        raise
    except BaseException:
        guard.release(spec.job_id)
        raise
    guard.finish(spec.job_id, result, ctx.settings.result_expires_s)
    return result


class JobParked(Exception):
    """The job waits in Redis for its tier's next Message Batch; its message is done with."""


def _park(
    spec: JobSpec, tier: Tier, attempt: Attempt, deadline: float, ctx: Context, request: LLMRequest
) -> JobResult:
    """Park a batch tier's job for its next batch (:mod:`tierq.runtime.bulk` sends it) and raise
    :class:`JobParked`; the recorded result instead if the job already succeeded."""
    guard, store = ctx.guard, ctx.batches
    if guard is None or store is None:
        raise ConfigError(
            f"the {tier.name} tier goes through Message Batches, which needs a Redis result backend"
        )
    begin = guard.begin(
        spec.job_id,
        starts_ttl_s=tier.deadline_s + STARTS_TTL_MARGIN_S,
        fingerprint=spec.fingerprint(),
        claim_ttl_s=ctx.settings.result_expires_s,
    )
    if begin.acquired:  # parking holds no lock, and is not a start that may crash a worker
        guard.release(spec.job_id, uncount=True)
    if begin.conflict:
        raise IdempotencyConflictError(
            f"job_id: {spec.job_id!r} already names a different request; this one was not run"
        )
    if begin.result is not None:
        _log.info(DEDUPLICATED, reason="result already recorded", starts=begin.starts)
        return begin.result
    if begin.cancelled:
        raise CancelRequestedError("cancelled by its producer before it ran")
    custom_id = custom_id_for(spec.job_id)
    parked = Parked(
        spec=spec,
        tier=tier.name,
        queue=attempt.queue,
        model=request.model,
        system=request.system,
        max_tokens=request.max_tokens,
        effort=request.effort,
        size=request_size(custom_id, request),
        enqueued_at=attempt.enqueued_at,
        first_started_at=attempt.first_started_at,
        deadline=deadline,
        parked_at=time.time(),
        retries=attempt.spent_retries,
        log_context=carried_context(structlog.contextvars.get_contextvars()),
    )
    if store.park(parked):
        _log.info(PARKED, tier=tier.name, queue_wait_ms=attempt.queue_wait_ms, request_bytes=parked.size)
    else:
        _log.info(PARKED, tier=tier.name, already=True)
    raise JobParked()


def _llm_request(spec: JobSpec, tier: Tier, attempt: Attempt) -> LLMRequest:
    """The request this attempt sends (its cache breakpoints are set as it is sent)."""
    instructions, document = prompt_parts(spec)
    return LLMRequest(
        job_id=spec.job_id,
        model=attempt.model(tier),
        system=tier.system_prompt,
        prompt=document,
        instructions=instructions,
        max_tokens=spec.max_tokens or tier.max_tokens,
        effort=tier.effort,
    )


def _call_model(
    spec: JobSpec,
    tier: Tier,
    attempt: Attempt,
    deadline: float,
    ctx: Context,
    request: LLMRequest,
    run: int | None = None,
    cancel: CancelToken | None = None,
    reservation: Reservation | None = None,
    floor: float = 0.0,
) -> JobResult:
    """Call the model and report success. ``run``: this start's number (streamed with the text);
    ``reservation``: the call's rate-limit share, if already reserved; ``floor``: the share of the
    model's limit kept for more urgent tiers."""
    run = attempt.retries if run is None else run
    publisher = _publisher(ctx, spec.job_id, run) if spec.stream else None
    on_text: Callable[[str], None] | None = None
    if publisher is not None:
        # on the loop, texts are gathered there and written as they come here, in this job's thread
        on_text = publisher.send if tier.io == "asyncio" else publisher.text
    reservation, waited_s = capacity.take(
        ctx.limiter,
        request,
        deadline,
        first=reservation,
        floor=floor,
        wait_s=tier.rate_limit_wait_s,
        share=FairShare(tier.name, spec.producer_id),
    )
    try:
        reply = ctx.llm.call(request, deadline, tier.io, on_text, gather_s=FLUSH_INTERVAL_S, cancel=cancel)
    except BaseException as exc:
        capacity.give_back(ctx.limiter, reservation, exc, tier.name, request.model)
        raise
    first_wait = attempt.queue_wait_ms if attempt.retries == 0 else None
    capacity.settle(ctx.limiter, reservation, reply, tier.name, request.model, first_wait)
    if reply.refusal is not None:
        category, explanation = reply.refusal
        raise RefusedError(
            f"the model refused to summarize (category: {category or 'none given'})",
            category,
            explanation,
            reply.request_id,
        )
    result = build_result(spec, tier, attempt, reply, time.time(), waited_s)
    report_completed(spec, attempt, result, ctx)
    if publisher is not None:
        publisher.end("succeeded")
    return result


def report_completed(spec: JobSpec, attempt: Attempt, result: JobResult, ctx: Context) -> None:
    """The one ``summarize.completed`` line, the metrics and the stats entry of a job that succeeded."""
    _log.info(
        COMPLETED,
        enqueued_at=attempt.enqueued_at_source,
        **_log_figures(result),
        **_content(ctx.settings, spec, result),
    )
    metrics.observe_completed(result, attempt.queue)
    if ctx.stats is not None:
        timings = result.timings
        ctx.stats.record(
            tier=result.tier,
            outcome="succeeded",
            model=result.model,
            cost_usd=result.cost_usd,
            queue_wait_ms=timings.queue_wait_ms,
            ttft_ms=timings.ttft_ms,
            total_ms=timings.total_ms,
            output_tokens_per_s=timings.output_tokens_per_s,
            limiter_wait_ms=timings.limiter_wait_ms,
            prompt_tokens=result.usage.prompt_tokens,
            cache_read_tokens=result.usage.cache_read_input_tokens,
        )


def build_result(
    spec: JobSpec, tier: Tier, attempt: Attempt, reply: LLMReply, now: float, waited_s: float = 0.0
) -> JobResult:
    """The job's result, from its spec, its attempt and the model's reply; ``waited_s``: this
    attempt's wait for rate-limit capacity (earlier attempts' are in its headers)."""
    ttft_s = reply.first_token_at - reply.sent_at if reply.first_token_at is not None else None
    llm_s = reply.done_at - reply.sent_at
    gen_s = reply.done_at - reply.first_token_at if reply.first_token_at is not None else None
    usage = reply.usage
    tokens_per_s = round(usage.output_tokens / gen_s, 1) if gen_s and gen_s > 0 else None
    timings = Timings(
        queue_wait_ms=attempt.queue_wait_ms,
        prep_ms=round(max(0.0, reply.sent_wall - attempt.started_at) * 1000, 2),
        ttft_ms=round(ttft_s * 1000, 2) if ttft_s is not None else None,
        llm_ms=round(llm_s * 1000, 2),
        total_ms=attempt.total_ms(now),
        output_tokens_per_s=tokens_per_s,
        limiter_wait_ms=round((attempt.limiter_wait_s + waited_s) * 1000, 2),
    )
    fell_back = attempt.model(tier) != tier.model
    return JobResult(
        job_id=spec.job_id,
        tier=tier.name,
        model=reply.model,
        stop_reason=reply.stop_reason,
        truncated=reply.stop_reason == "max_tokens",
        usage=usage,
        timings=timings,
        cost_usd=cost_usd(reply.model, usage),
        fallback=Fallback.model_validate({"from": tier.model, "after_overloads": attempt.overloads})
        if fell_back
        else None,
        retries=attempt.spent_retries,
        request_id=reply.request_id,
        metadata=spec.metadata,
        summary=reply.text,
    )


def _log_figures(result: JobResult) -> dict[str, Any]:
    return {
        "model": result.model,
        "stop_reason": result.stop_reason,
        "truncated": result.truncated,
        **result.usage.model_dump(),
        **result.timings.model_dump(exclude={"producer_ttft_ms"}),
        "cost_usd": result.cost_usd,
        "retries": result.retries,
        "request_id": result.request_id,
        "path": result.path,
        "batch_id": result.batch_id,
        "fallback_from": result.fallback.from_model if result.fallback else None,
        "summary_chars": len(result.summary),
    }


def _content(settings: Settings, spec: JobSpec, result: JobResult) -> dict[str, Any]:
    if not settings.log_content:
        return {}
    return {"text": spec.text, "summary": result.summary}


def report_expired(
    task_id: str, headers: dict[str, Any], queue: str | None, ctx: Context, job: object = None
) -> None:
    """Report a job Celery dropped unrun because its message expired (the deadline passed in the queue).

    ``job`` is the message's job, when Celery had decoded it: the dead letter keeps it for a replay.
    """
    attempt = Attempt.from_headers(task_id, 0, headers, queue)
    ref = (
        JobRef.queued(task_id, headers, queue, ctx.tiers)
        if job is None
        else JobRef.read(task_id, job, queue, ctx.tiers)
    )
    report_failure(
        DeadlineExceededError("deadline passed while the job was queued"), attempt, ref, None, "expired", ctx
    )


#: errors no retry can help, and the reason a job that ends with one gives (checked in this order)
_NEVER_RETRIED: tuple[tuple[type[BaseException], str], ...] = (
    (DeadlineExceededError, "expired"),
    (RefusedError, "refused"),
    (SpendLimitError, "spend_limit"),
    (IdempotencyConflictError, "idempotency_conflict"),
    (CancelRequestedError, "cancelled"),
    (InvalidJobError, "invalid job"),
)


def plan_retry(
    exc: BaseException, attempt: Attempt, ref: JobRef, rng: random.Random | None = None
) -> tuple[float | None, str]:
    """Seconds to wait before the next attempt, or None to give up, and why.

    429 waits what ``retry-after`` says; 529, 5xx and connection errors back off exponentially
    with jitter. No retry is planned past the tier's ``max_retries`` or one that could not start
    at least :data:`MIN_ATTEMPT_S` before the deadline.
    """
    for kind, why in _NEVER_RETRIED:
        if isinstance(exc, kind):
            return None, why
    tier = ref.tier if ref.spec is not None else None
    after_text = isinstance(exc, StreamInterruptedError) and tier is not None and tier.retry_after_text
    if not isinstance(exc, RetryableLLMError) and not after_text:
        return None, "not retryable"
    if tier is None:
        return None, "unknown tier"
    capacity_wait = isinstance(exc, CapacityWaitError)
    if attempt.spent_retries >= tier.max_retries and not capacity_wait:
        return None, f"retries exhausted ({tier.max_retries})"
    retry_after = exc.retry_after if isinstance(exc, RetryableLLMError) else None
    if retry_after is not None:
        delay = retry_after
    else:
        ceiling = min(tier.retry_backoff_max_s, tier.retry_backoff_s * 2**attempt.spent_retries)
        delay = (rng or random).uniform(ceiling / 2, ceiling)
    if time.time() + delay + MIN_ATTEMPT_S >= attempt.deadline(tier):
        if capacity_wait:
            return None, "rate_limited"
        return None, "deadline would pass before another attempt"
    return round(delay, 3), "retryable"


def _publisher(ctx: Context, job_id: str, run: int) -> TokenPublisher | None:
    if ctx.redis is None:
        return None
    return TokenPublisher(ctx.redis, stream_key(job_id, ctx.settings.key_prefix), run)


def report_failure(
    exc: BaseException, attempt: Attempt, ref: JobRef, delay: float | None, why: str, ctx: Context
) -> None:
    """Log and count ``summarize.retrying`` if another attempt follows, else the one ``summarize.failed``.

    A job that failed for good is dead-lettered under its id, except an idempotency conflict: its
    dead letter gets an id of its own, so the job that holds the id keeps its result and dead letter.
    """
    if isinstance(exc, RefusedError):
        _report_refused(exc, attempt, ref, ctx)
        return
    if isinstance(exc, CancelRequestedError):
        _report_cancelled(exc, attempt, ref, ctx)
        return
    tier = ref.tier_name
    figures: dict[str, Any] = {
        "job_id": ref.job_id,
        "tier": tier,
        "error_type": type(exc).__name__,
        "error": bounded(str(exc), 1000),
        "status_code": getattr(exc, "status_code", None),
        "request_id": getattr(exc, "request_id", None),
        "retries": attempt.spent_retries,
        "limiter_waits": attempt.limiter_waits,
        "queue_wait_ms": attempt.queue_wait_ms,
        "total_ms": attempt.total_ms(time.time()),
    }
    if isinstance(exc, InvalidJobError):
        figures["field"] = exc.field
    if delay is not None and isinstance(exc, CapacityWaitError):
        # not a retry: a backlog waiting for the rate limit sends thousands of these; they are
        # counted in tierq_ratelimit_capacity_waits_total and tierq stats' "waits"
        _log.debug(WAITING, delay_s=delay, **figures)
        return
    if delay is not None:
        _log.warning(RETRYING, delay_s=delay, **figures)
        metrics.observe_retried(tier, attempt.queue, figures["error_type"])
        return
    if isinstance(exc, LLMError | TierqError):
        _log.error(FAILED, reason=why, **figures)
    else:
        _log.error(FAILED, reason="unexpected error", exc_info=exc, **figures)
    metrics.observe_failed(tier, attempt.queue, figures["error_type"])
    timings = FailureTimings(queue_wait_ms=figures["queue_wait_ms"], total_ms=figures["total_ms"])
    conflict = isinstance(exc, IdempotencyConflictError) and ref.spec is not None
    # a conflicting request's stream is the job's that holds the id: it is not ended here
    _record_end(ctx, ref, attempt, "failed", timings, end_stream=not conflict)
    letter_id = f"{ref.job_id}~{ref.spec.fingerprint()[:12]}" if conflict and ref.spec else ref.job_id
    if ctx.dead_letters is not None:
        ctx.dead_letters.add(
            letter_id,
            why,
            exc,
            ref.tier.name if ref.tier else None,
            attempt.retries + 1,
            timings,
            ref.payload(),
        )


def _record_end(
    ctx: Context,
    ref: JobRef,
    attempt: Attempt,
    outcome: str,
    timings: FailureTimings,
    end_stream: bool = True,
) -> None:
    """A job's end without a summary: its stats entry, and its stream's end marker if it streams."""
    if ctx.stats is not None:
        ctx.stats.record(
            tier=ref.tier_name,
            outcome=outcome,
            queue_wait_ms=timings.queue_wait_ms,
            total_ms=timings.total_ms,
        )
    if ref.stream and end_stream:
        publisher = _publisher(ctx, ref.job_id, attempt.retries)
        if publisher is not None:
            publisher.end(outcome)


def _report_cancelled(exc: CancelRequestedError, attempt: Attempt, ref: JobRef, ctx: Context) -> None:
    """The one ``summarize.cancelled`` line, a metric and the stream's end; no dead letter: its
    producer asked for it."""
    tier = ref.tier_name
    queue_wait_ms, total_ms = attempt.queue_wait_ms, attempt.total_ms(time.time())
    _log.info(
        CANCELLED,
        tier=tier,
        job_id=ref.job_id,
        detail=str(exc),
        queue_wait_ms=queue_wait_ms,
        total_ms=total_ms,
    )
    metrics.observe_failed(tier, attempt.queue, type(exc).__name__)
    _record_end(
        ctx, ref, attempt, "cancelled", FailureTimings(queue_wait_ms=queue_wait_ms, total_ms=total_ms)
    )


def _report_refused(exc: RefusedError, attempt: Attempt, ref: JobRef, ctx: Context) -> None:
    """The one ``summarize.refused`` line, a metric and the stream's end; no dead letter: a replay
    would be refused again, and the job's result (the stored error) says why."""
    tier = ref.tier_name
    queue_wait_ms, total_ms = attempt.queue_wait_ms, attempt.total_ms(time.time())
    _log.warning(
        REFUSED,
        tier=tier,
        job_id=ref.job_id,
        category=exc.category,
        request_id=exc.request_id,
        retries=attempt.retries,
        queue_wait_ms=queue_wait_ms,
        total_ms=total_ms,
    )
    metrics.observe_refused(tier, attempt.queue)
    _record_end(ctx, ref, attempt, "refused", FailureTimings(queue_wait_ms=queue_wait_ms, total_ms=total_ms))
