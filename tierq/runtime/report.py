"""How a job's end is told: the canonical log line (``summarize.completed|failed|refused|cancelled``
or ``summarize.retrying``), its metrics and stats, the stored result, the stream's end, the dead letter."""

from __future__ import annotations

import time
from typing import Any

from tierq.contract.errors import (
    CancelRequestedError,
    CapacityWaitError,
    DeadlineExceededError,
    IdempotencyConflictError,
    InvalidJobError,
    LLMError,
    RefusedError,
    TierqError,
)
from tierq.contract.job import (
    JobSpec,
)
from tierq.contract.message import bounded
from tierq.contract.result import Fallback, JobResult, Timings
from tierq.contract.tiers import Tier
from tierq.core.settings import Settings
from tierq.llm.client import LLMReply
from tierq.llm.pricing import cost_usd
from tierq.observe import metrics
from tierq.observe.logging import get_logger
from tierq.runtime.attempt import Attempt, JobRef
from tierq.runtime.context import Context
from tierq.store.deadletter import FailureTimings
from tierq.store.streams import TokenPublisher, stream_key

_log = get_logger("tierq.jobs")

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "FAILED",
    "REFUSED",
    "RETRYING",
    "WAITING",
    "build_result",
    "publisher_for",
    "report_completed",
    "report_expired",
    "report_failure",
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


def publisher_for(ctx: Context, job_id: str, run: int) -> TokenPublisher | None:
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
        publisher = publisher_for(ctx, ref.job_id, attempt.retries)
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
