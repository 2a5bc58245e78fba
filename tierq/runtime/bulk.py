"""Batch tiers: parked jobs gathered into Message Batches, submitted, polled, and answered one by one.

A batch tier's task parks each job (:func:`tierq.runtime.jobs.run_attempt`) and its message is
acknowledged; from then on the job lives in Redis (:mod:`tierq.store.batches`). A
:class:`BatchRunner` in every worker serving the tier, in a thread of its own:

1. gathers parked jobs into a batch when the tier's :class:`~tierq.contract.tiers.BatchPolicy` says so (by
   count, bytes or the oldest job's age), recording the batch and its members first;
2. submits it (``custom_id``: the job id), recording that a create was sent before sending it, so
   that a create whose answer was lost is looked for, not sent twice;
3. polls it, the gap doubling from ``poll_s`` to ``poll_max_s``;
4. once it has ended, answers each member: its result (at the batch price) or its failure, stored
   where its producer reads it; ``errored`` (when retryable), ``expired`` and ``canceled``
   requests, and members the results leave out, are parked again for the next batch while the
   job's retries and deadline allow, else fail and are dead-lettered like any job.

Every step is done under the batch's lease (renewed while it runs, lapsing ``lease_s`` after its
worker died), so a worker killed at any point leaves a batch another one takes over.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import structlog

from tierq.contract.errors import (
    CancelRequestedError,
    DeadlineExceededError,
    LLMError,
    RefusedError,
    RequestRejectedError,
    RetryableLLMError,
    UpstreamServerError,
    UpstreamUnavailableError,
)
from tierq.contract.job import prompt_parts
from tierq.contract.result import JobResult, Timings
from tierq.contract.tiers import BatchPolicy, Tier
from tierq.llm.batches import BatchAPI, BatchOutcome, BatchState
from tierq.llm.client import LLMRequest
from tierq.llm.pricing import cost_usd
from tierq.observe import metrics
from tierq.observe.logging import get_logger
from tierq.runtime.attempt import Attempt, JobRef
from tierq.runtime.context import Context
from tierq.runtime.report import RETRYING, report_completed, report_failure
from tierq.store.batches import BatchRecord, Parked
from tierq.store.streams import TokenPublisher, stream_key

__all__ = ["BatchRunner", "ResultSink"]

#: seconds between the runner's looks at parked jobs and due batches
TICK_S = 0.5
#: a member is sent again only if at least this much of its deadline would remain
MIN_BATCH_ATTEMPT_S = 60.0
#: a lost create's batch is looked for among those created this long before it was sent
CREATE_SKEW_S = 60.0

GATHERED = "batch.gathered"
SUBMITTED = "batch.submitted"
ENDED = "batch.ended"

_log = get_logger("tierq.bulk")

#: where a rejected create names its first bad request (the simulator: ``requests.3.params...``)
_BAD_INDEX = re.compile(r"requests[.\[](\d+)")


class ResultSink(Protocol):
    """Where a job's end is stored for its producer (the Celery result backend)."""

    def succeeded(self, job_id: str, result: JobResult) -> None: ...

    def failed(self, job_id: str, exc: BaseException) -> None: ...

    def cancelled(self, job_id: str) -> None: ...


class BatchRunner:
    """Gathers, submits, polls and answers the batches of ``tiers`` (those with a batch policy)."""

    def __init__(
        self,
        ctx: Context,
        tiers: list[Tier],
        sink: ResultSink,
        api: BatchAPI | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ctx.batches is None or ctx.guard is None:
            raise ValueError("batch tiers need a Redis result backend")
        self.ctx = ctx
        self.store = ctx.batches
        self.guard = ctx.guard
        self.tiers = {t.name: t for t in tiers if t.batch is not None}
        self.sink = sink
        self.api = api or BatchAPI(ctx.llm.client)
        self.clock = clock
        self.lease_s = ctx.settings.lease_s

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop`` is set; an error in one tick is logged and the next goes on."""
        _log.info("batch.runner_started", tiers=sorted(self.tiers))
        while not stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # Redis away, a bug: the next tick tries again
                _log.error("batch.runner_failed", error_type=type(exc).__name__, error=str(exc)[:500])
            stop.wait(TICK_S)

    def tick(self) -> None:
        """Gather each tier's parked jobs if it is time, then advance every due batch this worker can take."""
        for tier in self.tiers.values():
            assert tier.batch is not None
            record = self.store.gather(tier.name, tier.batch, self.clock())
            if record is not None:
                _log.info(GATHERED, tier=tier.name, batch=record.id, requests=len(record.members))
        for batch_id in self.store.due(self.clock()):
            with self._leased(batch_id) as held:
                if held:
                    self.advance(batch_id)

    @contextmanager
    def _leased(self, batch_id: str) -> Iterator[bool]:
        """Hold the batch's lease while the body runs (renewed every third of it), if it is free."""
        token = self.store.lease(batch_id, self.lease_s)
        if token is None:
            yield False
            return
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lease_s / 3):
                try:
                    self.store.renew(batch_id, token, self.lease_s)
                except Exception as exc:  # it lapses, and another worker takes the batch over
                    _log.warning("batch.lease_renew_failed", batch=batch_id, error=str(exc)[:200])

        keeper = threading.Thread(target=renew, name="tierq-batch-lease", daemon=True)
        keeper.start()
        try:
            yield True
        finally:
            done.set()
            keeper.join()
            self.store.release(batch_id, token)

    def advance(self, batch_id: str) -> None:
        """Take one batch one step on: submit it, or poll it and answer its members once it ended."""
        record = self.store.load(batch_id)
        if record is None:
            return
        tier = self.tiers.get(record.tier)
        if tier is None or tier.batch is None:
            return  # another worker serves that tier
        try:
            if record.status == "gathered":
                self._submit(record, tier.batch)
            else:
                self._poll(record, tier, tier.batch)
        except LLMError as exc:
            # the API is away, busy or refusing us for now: the batch is looked at again later,
            # nothing is lost (a submit records its own attempt before it is sent)
            latest = self.store.load(batch_id) or record
            wait = _backoff(tier.batch, latest.polls + latest.submit_attempts)
            _log.warning("batch.api_unavailable", batch=record.id, error=str(exc)[:300], retry_in_s=wait)
            self.store.save(latest, self.clock() + wait)

    # --- submit ------------------------------------------------------------------------------------
    def _submit(self, record: BatchRecord, policy: BatchPolicy) -> None:
        now = self.clock()
        jobs = self.store.parked(list(record.members.values()))
        if record.submit_attempts and record.attempted_at is not None:
            found = self._find_lost(record, record.attempted_at)
            if found is not None:
                self._submitted(record, found, policy, jobs)
                return
        live = self._still_wanted(record, jobs, now)
        if not live:
            self.store.close(record)
            return
        record = record.model_copy(
            update={
                "members": {job.custom_id: job.job_id for job in live},
                "submit_attempts": record.submit_attempts + 1,
                "attempted_at": now,
            }
        )
        self.store.save(record, now + _backoff(policy, record.submit_attempts))
        try:
            state = self.api.create([(job.custom_id, self._marked(_request(job))) for job in live])
        except RequestRejectedError as exc:
            if exc.status_code in (401, 403, 404):  # this deployment, not these requests
                raise
            self._rejected(record, live, exc)
            return
        self._submitted(record, state, policy, {job.job_id: job for job in live})

    def _submitted(
        self, record: BatchRecord, state: BatchState, policy: BatchPolicy, jobs: dict[str, Parked]
    ) -> None:
        self.store.claim_api_id(state.api_id)
        now = self.clock()
        record = record.model_copy(
            update={"status": "submitted", "api_id": state.api_id, "submitted_at": now}
        )
        self.store.save(record, now + policy.poll_s)
        waits = [now - job.parked_at for job in jobs.values()]
        _log.info(
            SUBMITTED,
            tier=record.tier,
            batch=record.id,
            api_batch=state.api_id,
            requests=len(record.members),
            oldest_wait_s=round(max(waits), 3) if waits else None,
        )

    def _marked(self, request: LLMRequest) -> LLMRequest:
        """The request with its prompt-cache breakpoints (members of one batch share prefixes)."""
        return request if self.ctx.cache is None else self.ctx.cache.mark(request)

    def _find_lost(self, record: BatchRecord, attempted_at: float) -> BatchState | None:
        """The batch a create whose answer was lost made, if it did: created since the create was
        sent, of the same size, and held by no other record."""
        for state in self.api.recent(attempted_at - CREATE_SKEW_S):
            if state.requests == len(record.members) and self.store.claim_api_id(state.api_id):
                _log.warning("batch.adopted", batch=record.id, api_batch=state.api_id)
                return state
        return None

    def _still_wanted(self, record: BatchRecord, jobs: dict[str, Parked], now: float) -> list[Parked]:
        """The members to send: not answered already, not cancelled, not past their deadline."""
        live: list[Parked] = []
        for job_id in record.members.values():
            job = jobs.get(job_id)
            if job is None:
                continue
            if self.guard.not_ended(job_id) == "cancelled":
                self._end_cancelled(job)
            elif now >= job.deadline:
                self._fail(
                    job,
                    DeadlineExceededError("deadline passed while the job waited for its batch"),
                    "expired",
                )
            else:
                live.append(job)
        return live

    def _rejected(self, record: BatchRecord, live: list[Parked], exc: RequestRejectedError) -> None:
        """The API refused the whole batch: fail the request it names and send the rest again, or
        fail every member when it names none (the batch is then dead-lettered job by job)."""
        match = _BAD_INDEX.search(str(exc))
        index = int(match.group(1)) if match else None
        _log.error("batch.rejected", batch=record.id, error=str(exc)[:300], bad_request=index)
        if index is None or not 0 <= index < len(live):
            for job in live:
                with _job_context(job):
                    self._fail(job, exc, "not retryable")
            self.store.close(record)
            return
        with _job_context(live[index]):
            self._fail(live[index], exc, "not retryable")
        rest = [job for i, job in enumerate(live) if i != index]
        if not rest:
            self.store.close(record)
            return
        retry = record.model_copy(
            update={
                "members": {job.custom_id: job.job_id for job in rest},
                "submit_attempts": 0,
                "attempted_at": None,
            }
        )
        self.store.save(retry, self.clock())

    # --- poll and answer ---------------------------------------------------------------------------
    def _poll(self, record: BatchRecord, tier: Tier, policy: BatchPolicy) -> None:
        assert record.api_id is not None
        try:
            state = self.api.retrieve(record.api_id)
        except RequestRejectedError as exc:
            if exc.status_code != 404:
                raise
            # deleted or gone: its members go in another batch
            _log.error("batch.lost", batch=record.id, api_batch=record.api_id)
            self._answer(record, tier, iter(()), self.clock())
            return
        now = self.clock()
        if state.status != "ended":
            polls = record.polls + 1
            self.store.save(record.model_copy(update={"polls": polls}), now + _backoff(policy, polls))
            return
        _log.info(ENDED, tier=tier.name, batch=record.id, api_batch=record.api_id, polls=record.polls + 1)
        self._answer(record, tier, self.api.results(record.api_id), now)

    def _answer(
        self, record: BatchRecord, tier: Tier, outcomes: Iterator[BatchOutcome], ended_at: float
    ) -> None:
        """Answer every member from the batch's results; a member they leave out is sent again."""
        jobs = self.store.parked(list(record.members.values()))
        seen: set[str] = set()
        for outcome in outcomes:
            job_id = record.members.get(outcome.custom_id)
            if job_id is None or job_id in seen:
                continue
            seen.add(job_id)
            job = jobs.get(job_id)
            if job is not None:
                with _job_context(job):
                    self._settle(record, tier, job, outcome, ended_at)
        for job_id in record.members.values():
            job = jobs.get(job_id)
            if job_id not in seen and job is not None:
                missing = UpstreamServerError("the batch's results had no result for this request")
                with _job_context(job):
                    self._again_or_fail(tier, job, missing)
        self.store.close(record)

    def _settle(
        self, record: BatchRecord, tier: Tier, job: Parked, outcome: BatchOutcome, ended_at: float
    ) -> None:
        if self.guard.recorded(job.job_id) is not None:  # answered before a crash
            self.store.done(job.job_id)
            return
        if outcome.kind == "succeeded" and outcome.reply is not None:
            reply = outcome.reply
            if reply.refusal is not None:
                category, explanation = reply.refusal
                refused = RefusedError(
                    f"the model refused to summarize (category: {category or 'none given'})",
                    category,
                    explanation,
                    reply.message_id,
                )
                self._fail(job, refused, "refused")
                return
            self._succeed(record, tier, job, outcome, ended_at)
            return
        if outcome.kind == "errored" and outcome.error is not None:
            error: LLMError = outcome.error
        elif outcome.kind == "expired":
            error = UpstreamUnavailableError("the batch expired (24 h) before this request was processed")
        else:
            error = UpstreamUnavailableError("the batch was canceled before this request was processed")
        self._again_or_fail(tier, job, error)

    def _succeed(
        self, record: BatchRecord, tier: Tier, job: Parked, outcome: BatchOutcome, ended_at: float
    ) -> None:
        reply = outcome.reply
        assert reply is not None and record.submitted_at is not None
        now = self.clock()
        attempt = _attempt(job, now)
        timings = Timings(
            queue_wait_ms=attempt.queue_wait_ms,
            prep_ms=0.0,
            ttft_ms=None,
            llm_ms=round(max(0.0, ended_at - record.submitted_at) * 1000, 2),
            total_ms=attempt.total_ms(now),
            output_tokens_per_s=None,
            batch_wait_ms=round(max(0.0, now - job.parked_at) * 1000, 2),
        )
        result = JobResult(
            job_id=job.job_id,
            tier=tier.name,
            model=reply.model,
            stop_reason=reply.stop_reason,
            truncated=reply.stop_reason == "max_tokens",
            usage=reply.usage,
            timings=timings,
            cost_usd=cost_usd(reply.model, reply.usage, batch=True),
            retries=job.retries,
            request_id=None,
            path="batch",
            batch_id=record.api_id,
            metadata=job.spec.metadata,
            summary=reply.text,
        )
        self.guard.finish(job.job_id, result, self.ctx.settings.result_expires_s)
        self.sink.succeeded(job.job_id, result)
        report_completed(job.spec, attempt, result, self.ctx)
        if job.spec.stream and self.ctx.redis is not None:
            publisher = TokenPublisher(
                self.ctx.redis, stream_key(job.job_id, self.ctx.settings.key_prefix), job.retries
            )
            publisher.send(result.summary)
            publisher.end("succeeded")
        self.store.done(job.job_id)

    def _again_or_fail(self, tier: Tier, job: Parked, error: LLMError) -> None:
        """Park a member again for the next batch if a retry may help and is allowed, else fail it."""
        now = self.clock()
        if not isinstance(error, RetryableLLMError):
            self._fail(job, error, "not retryable")
        elif job.retries >= tier.max_retries:
            self._fail(job, error, f"retries exhausted ({tier.max_retries})")
        elif now + MIN_BATCH_ATTEMPT_S >= job.deadline:
            self._fail(job, error, "deadline would pass before another attempt")
        else:
            _log.warning(
                RETRYING,
                error_type=type(error).__name__,
                error=str(error)[:500],
                retries=job.retries,
                path="batch",
            )
            metrics.observe_retried(tier.name, job.queue, type(error).__name__)
            self.store.repark(job.model_copy(update={"retries": job.retries + 1, "parked_at": now}))

    def _fail(self, job: Parked, exc: LLMError, why: str) -> None:
        """A member's end in failure: logged, counted, dead-lettered (see ``report_failure``), stored."""
        tier = self.ctx.tiers.tiers.get(job.tier)
        ref = JobRef(job.job_id, tier, job.spec.stream, job.spec)
        report_failure(exc, _attempt(job, self.clock()), ref, None, why, self.ctx)
        self.sink.failed(job.job_id, exc)
        self.store.done(job.job_id)

    def _end_cancelled(self, job: Parked) -> None:
        tier = self.ctx.tiers.tiers.get(job.tier)
        ref = JobRef(job.job_id, tier, job.spec.stream, job.spec)
        exc = CancelRequestedError("cancelled by its producer before its batch was sent")
        report_failure(exc, _attempt(job, self.clock()), ref, None, "cancelled", self.ctx)
        self.sink.cancelled(job.job_id)
        self.store.done(job.job_id)


@contextmanager
def _job_context(job: Parked) -> Iterator[None]:
    """The job's log context, as a task binds it: its producer's, then its own fields."""
    with structlog.contextvars.bound_contextvars(
        **{
            **job.log_context,
            "task_id": job.job_id,
            "job_id": job.job_id,
            "tier": job.tier,
            "queue": job.queue,
        }
    ):
        yield


def _attempt(job: Parked, now: float) -> Attempt:
    """The job's last attempt as the rest of the runtime sees one."""
    return Attempt(
        task_id=job.job_id,
        retries=job.retries,
        started_at=now,
        enqueued_at=job.enqueued_at,
        deadline_hint=job.deadline,
        first_started_at=job.first_started_at,
        queue=job.queue,
    )


def _request(job: Parked) -> LLMRequest:
    instructions, document = prompt_parts(job.spec)
    return LLMRequest(
        job_id=job.job_id,
        model=job.model,
        system=job.system,
        prompt=document,
        instructions=instructions,
        max_tokens=job.max_tokens,
        effort=job.effort,  # type: ignore[arg-type]
    )


def _backoff(policy: BatchPolicy, step: int) -> float:
    """Seconds until the next look: ``poll_s`` doubling with each step, at most ``poll_max_s``."""
    return float(min(policy.poll_max_s, policy.poll_s * 2 ** min(step, 30)))
