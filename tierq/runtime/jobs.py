"""Running a summarization job as plain functions: one attempt, from its checks to its model call.

The Celery task in ``tierq/celery/task.py`` is a thin shell over :func:`run_attempt`,
:func:`tierq.runtime.retry.plan_retry` and :mod:`tierq.runtime.report`; the attempt's identity is in
:mod:`tierq.runtime.attempt`; what a job is and how producer input is checked lives in
``tierq.contract.job``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import structlog

from tierq.contract.errors import (
    CancelRequestedError,
    CapacityWaitError,
    ConfigError,
    DeadlineExceededError,
    IdempotencyConflictError,
    PoisonJobError,
    RefusedError,
)
from tierq.contract.job import (
    JobSpec,
    carried_context,
    prompt_parts,
)
from tierq.contract.result import JobResult
from tierq.contract.tiers import Tier
from tierq.core.cancel import CancelToken
from tierq.core.settings import MAX_CRASHES
from tierq.llm.batches import request_size
from tierq.llm.client import LLMRequest
from tierq.observe.logging import get_logger
from tierq.runtime import capacity
from tierq.runtime.attempt import Attempt, JobRef
from tierq.runtime.context import Context
from tierq.runtime.report import build_result, publisher_for, report_completed
from tierq.store.batches import Parked, custom_id_for
from tierq.store.ratelimit import FairShare, Reservation
from tierq.store.streams import FLUSH_INTERVAL_S

__all__ = ["COUNT_TIMEOUT_S", "DEDUPLICATED", "PARKED", "STARTS_TTL_MARGIN_S", "JobParked", "run_attempt"]

DEDUPLICATED = "summarize.deduplicated"
#: a batch tier's job parked for its next Message Batch (its message is done with)
PARKED = "summarize.parked"
#: seconds a call to the token-counting endpoint may take (TIERQ_COUNT_TOKENS)
COUNT_TIMEOUT_S = 2.0
#: seconds the start count outlives the tier's deadline
STARTS_TTL_MARGIN_S = 600
_log = get_logger("tierq.jobs")


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
    publisher = publisher_for(ctx, spec.job_id, run) if spec.stream else None
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
