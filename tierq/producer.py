"""The API other services call: ``submit()`` a text with an urgency, get a :class:`Job` back.

    from tierq.producer import submit
    job = submit(document, urgency="high")
    result = job.result(timeout=30)       # JobResult: summary, model, usage, timings, cost_usd, ...

The caller's structlog context (``structlog.contextvars.bind_contextvars(request_id=...)``)
travels with the job and is bound in the worker's log lines for it.

Input is validated before anything is enqueued: a bad field raises
:class:`~tierq.contract.errors.InvalidJobError` naming it, and nothing reaches the broker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import structlog
from celery import Celery, signals
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from pydantic import JsonValue

from tierq.admission import Admission
from tierq.celery.app import get_app, make_app
from tierq.contract.errors import (
    BrokerUnavailableError,
    DeadlineExceededError,
    DeadlineUnmeetableError,
    IdempotencyConflictError,
    InvalidJobError,
    JobCancelledError,
    JobExpiredError,
    JobFailedError,
    JobRefusedError,
    JobTimeoutError,
    RefusedError,
)
from tierq.contract.job import (
    CONTEXT_HEADER,
    DEADLINE_HEADER,
    ENQUEUED_AT_HEADER,
    STREAM_HEADER,
    SUMMARIZE_TASK,
    TIER_HEADER,
    JobSpec,
    build_job,
    build_prompt,
    carried_context,
    check_deadline,
    check_job,
    kwargs_repr,
)
from tierq.contract.result import JobResult, JobStatus
from tierq.contract.tiers import Tier, TierTable, load_tier_table
from tierq.core.settings import Settings, get_settings, get_tier_table
from tierq.observe.logging import get_logger
from tierq.observe.metrics import observe_admission_refused
from tierq.store.clients import backend_redis
from tierq.store.deadletter import DeadLetterStore
from tierq.store.guard import RunGuard
from tierq.store.keys import Keys
from tierq.store.ratelimit import LimiterStats, SharedRateLimiter
from tierq.store.streams import read_entries

__all__ = ["Job", "Producer", "Restarted", "default_producer", "get_job", "replay", "submit"]


class Producer:
    """What a producer needs, built once: settings, the tier table, the Celery app, one Redis client.

    ``Producer(settings)`` configures one explicitly, with a Celery app of its own built from those
    settings (its broker, its result backend); the module's :func:`submit`, :func:`get_job` and
    :func:`replay` use :func:`default_producer`, read from the environment on first use.
    """

    def __init__(self, settings: Settings, tiers: TierTable | None = None, app: Celery | None = None) -> None:
        self.settings = settings
        self.tiers = tiers if tiers is not None else load_tier_table(settings.tiers_file)
        self.app = app if app is not None else make_app(settings, self.tiers)
        signals.before_task_publish.connect(
            _stamp_enqueued_at, sender=SUMMARIZE_TASK, weak=False, dispatch_uid="tierq.producer.stamp"
        )
        #: the result backend's Redis (claims, token streams, run locks, dead letters); None if not Redis
        self.redis = backend_redis(settings)
        self.keys = Keys(settings.key_prefix)
        self.guard = None if self.redis is None else RunGuard(self.redis, settings.key_prefix)
        self.dead_letters = None if self.redis is None else DeadLetterStore(self.redis, settings.key_prefix)
        #: refuses what could not start before its deadline (None: ``TIERQ_ADMISSION`` off)
        self.admission = (
            Admission(
                self.app,
                self.tiers,
                SharedRateLimiter.from_settings(self.redis, settings),
                None if self.redis is None else LimiterStats(self.redis, settings.key_prefix),
            )
            if settings.admission
            else None
        )


_log = get_logger("tierq.producer")

_default: list[Producer] = []
_default_lock = threading.Lock()


def default_producer() -> Producer:
    """The producer the module-level functions use: from the environment, built on first use, with
    the process's default Celery app (:func:`tierq.celery.app.get_app`)."""
    with _default_lock:
        if not _default:
            _default.append(Producer(get_settings(), get_tier_table(), get_app()))
        return _default[0]


#: Celery state → the status a producer sees
_STATUS: dict[str, JobStatus] = {
    "PENDING": "pending",  # queued, or unknown: Celery cannot tell the two apart
    "RECEIVED": "pending",
    "STARTED": "running",
    "RETRY": "retrying",
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "REVOKED": "cancelled",
}


def _refused(outcome: object) -> bool:
    """Whether a stored failure is the model's refusal (the worker's ``RefusedError``)."""
    return isinstance(outcome, RefusedError)


@contextmanager
def _reachable(what: str) -> Iterator[None]:
    """Turn the ways Redis, kombu and Celery say "cannot connect" into BrokerUnavailableError."""
    try:
        yield
    except (OperationalError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise BrokerUnavailableError(f"{what}: {exc}") from exc
    except RuntimeError as exc:
        # Celery's result consumer gives up reconnecting with a RuntimeError from the redis error
        if isinstance(exc.__cause__, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            raise BrokerUnavailableError(f"{what}: {exc.__cause__}") from exc
        raise


def _stamp_enqueued_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Stamp the enqueue time as the message is published, after the producer's one-time setup.

    ``submit`` leaves the header None; a retried message keeps its original stamp.
    """
    if headers is not None and ENQUEUED_AT_HEADER in headers and headers[ENQUEUED_AT_HEADER] is None:
        headers[ENQUEUED_AT_HEADER] = _stamped.at = time.time()


#: the last enqueue stamp this thread published, read back by ``submit``
_stamped = threading.local()


def _expired(outcome: object) -> bool:
    """Whether a stored failure means the deadline passed (in the queue, or while running)."""
    if isinstance(outcome, DeadlineExceededError):
        return True
    # Celery revokes a message past its `expires` with TaskRevokedError('expired')
    return type(outcome).__name__ == "TaskRevokedError" and "expired" in str(outcome)


@dataclass(frozen=True, slots=True)
class Restarted:
    """Yielded by :meth:`Job.stream` when the job started over from the top after text was yielded.

    The worker running it was lost mid-reply and another one took the job again: the text yielded so
    far belongs to a reply that will never finish; what follows is the new run's, from its start.
    """

    #: the new run's number (the job's Nth start)
    run: int


class Job:
    """A submitted job: its id, its status and, when it is done, its result."""

    def __init__(
        self,
        job_id: str,
        app: Celery | None = None,
        enqueued_at: float | None = None,
        duplicate: bool = False,
        producer: Producer | None = None,
    ) -> None:
        self.id = job_id
        #: True when ``submit`` found this job id already submitted and enqueued nothing
        self.duplicate = duplicate
        #: ``time.time()`` just before the job was published, when this process submitted it
        self.enqueued_at = enqueued_at
        self._producer = producer or default_producer()
        self._async = AsyncResult(job_id, app=app or self._producer.app)

    def __repr__(self) -> str:
        return f"Job(id={self.id!r})"

    def status(self) -> JobStatus:
        """One of pending, running, retrying, succeeded, failed, refused, expired, cancelled, unknown
        (no job of this id was submitted or taken by a worker, or its records expired)."""
        with _reachable("result backend unavailable"):
            state = str(self._async.state)
            if state in ("FAILURE", "REVOKED") and _expired(self._async.result):
                return "expired"
            if state == "FAILURE" and _refused(self._async.result):
                return "refused"
            guard = self._producer.guard
            if state == "PENDING" and guard is not None:
                return guard.not_ended(self.id)
        return _STATUS.get(state, "unknown")

    def ready(self) -> bool:
        """Whether the job has ended, in success or failure."""
        with _reachable("result backend unavailable"):
            return bool(self._async.ready())

    def result(self, timeout: float | None = None) -> JobResult:
        """Wait up to ``timeout`` seconds for the result.

        Raises:
            JobTimeoutError: the job did not end in time (it may still end later).
            JobFailedError: the job ended in failure; ``error_type`` names why.
            JobRefusedError: the model refused (a JobFailedError; ``category`` and ``explanation``).
            JobCancelledError: the job was cancelled before it ended (a JobFailedError).
            JobFailedError: the stored result is not a tierq result (``error_type`` "MalformedResult").
        """
        try:
            with _reachable("result backend unavailable"):
                value = self._async.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
                state = self._async.state
        except CeleryTimeoutError:
            raise JobTimeoutError(f"job {self.id} did not finish within {timeout} s") from None
        if state == "SUCCESS":
            try:
                return JobResult.from_json(value)
            except ValueError as exc:
                raise JobFailedError(f"job {self.id}: {exc}", error_type="MalformedResult") from None
        error_type = type(value).__name__ if isinstance(value, BaseException) else str(state)
        if _expired(value):
            raise JobExpiredError(f"job {self.id} expired: {value}", error_type=error_type)
        if state == "REVOKED":
            raise JobCancelledError(f"job {self.id} was cancelled", error_type=error_type)
        if isinstance(value, RefusedError):
            raise JobRefusedError(
                f"job {self.id} refused: {value}", error_type, value.category, value.explanation
            )
        raise JobFailedError(f"job {self.id} failed: {error_type}: {value}", error_type=error_type)

    def stream(self, timeout: float | None = None) -> Iterator[str | Restarted | JobResult]:
        """Yield the summary's text as the worker produces it, then the :class:`JobResult` last.

        A caller that starts reading late still gets the whole text. Jobs submitted with
        ``stream=True`` are streamed delta by delta; others yield their summary in one piece when
        they end. The result's ``timings`` gain ``producer_ttft_ms``: enqueue → first text here.
        If the job's worker is lost mid-reply and the job runs again, a :class:`Restarted` comes
        before the new run's text: drop what was yielded before it.

        Raises:
            JobTimeoutError: the job did not end within ``timeout`` seconds.
            JobFailedError: the job ended in failure (after any text it streamed).
            BrokerUnavailableError: the result backend could not be reached.
        """
        client = self._producer.redis
        deadline = None if timeout is None else time.monotonic() + timeout
        first_at: float | None = None
        if client is not None:
            with _reachable("result backend unavailable"):
                for entry in read_entries(client, self._producer.keys.tokens(self.id), deadline):
                    if entry is None:  # idle: a job that streams nothing ends without an end marker
                        if self.ready():
                            break
                        continue
                    if entry.end is not None:
                        break
                    if entry.restarted:
                        yield Restarted(entry.run)
                    elif entry.text:
                        first_at = first_at or time.time()
                        yield entry.text
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        result = self.result(timeout=left)
        if first_at is None and result.summary:
            first_at = time.time()
            yield result.summary
        if first_at is not None and self.enqueued_at is not None:
            ttft_ms = round((first_at - self.enqueued_at) * 1000, 2)
            result = result.model_copy(
                update={"timings": result.timings.model_copy(update={"producer_ttft_ms": ttft_ms})}
            )
        yield result

    def forget(self) -> None:
        """Drop the stored result."""
        self._async.forget()

    def cancel(self) -> bool:
        """Cancel the job: unrun if it is still queued, stopped if it is running; False if it had ended.

        The worker that takes (or runs) it sees the mark and ends it ``cancelled`` without a summary.
        """
        if self.ready():
            return False
        client = self._producer.redis
        if client is not None:
            with _reachable("result backend unavailable, job not cancelled"):
                ttl = self._producer.settings.result_expires_s
                client.set(self._producer.keys.cancelled(self.id), time.time(), ex=ttl)
        with _reachable("broker unavailable, job not cancelled"):
            self._producer.app.control.revoke(self.id)
        return True


def submit(
    text: str,
    urgency: str = "normal",
    instructions: str | None = None,
    max_tokens: int | None = None,
    job_id: str | None = None,
    metadata: Mapping[str, JsonValue] | None = None,
    *,
    stream: bool = False,
    deadline_s: float | None = None,
    producer_id: str | None = None,
    app: Celery | None = None,
    tiers: TierTable | None = None,
    producer: Producer | None = None,
) -> Job:
    """Validate and enqueue one summarization job on its urgency's tier.

    With ``stream=True`` the worker publishes text as the model produces it, for :meth:`Job.stream`.
    ``deadline_s`` shortens the tier's deadline (seconds from now); the job then expires unrun if it
    is still queued at the deadline, and every attempt's HTTP timeout is what is left of it.
    A caller's ``job_id`` is an idempotency key: submitting the same request under it again
    enqueues nothing and returns the first job (``duplicate=True``). ``producer_id`` names the
    sender in the job, its log line and result.

    Raises:
        InvalidJobError: a field is invalid (``.field`` names it); nothing was enqueued.
        IdempotencyConflictError: ``job_id`` was already used for a different request.
        DeadlineUnmeetableError: the job was predicted to start too late to finish before its
            deadline (its tier's queue, its model's shared rate limit); ``retry_after`` says when
            it would fit. Nothing was enqueued.
        BrokerUnavailableError: the broker did not take the job within a few seconds.
    """
    producer = producer or default_producer()
    tiers = tiers or producer.tiers
    app = app or producer.app
    spec, tier = build_job(
        tiers,
        text,
        urgency,
        instructions,
        max_tokens,
        job_id or uuid.uuid4().hex,
        dict(metadata) if isinstance(metadata, Mapping) else metadata,
        stream,
        producer_id,
    )
    allowed_s = check_deadline(deadline_s, tier)
    # a caller's own job id is an idempotency key: the second submit of it enqueues nothing
    claim = _claim(producer, spec) if job_id is not None else None
    if claim is False:
        return Job(spec.job_id, app, None, duplicate=True, producer=producer)
    try:
        # a batched job's call does not draw on the Messages rate limit, and it waits by design
        if producer.admission is not None and not tier.takes_batch(allowed_s):
            _admit(producer.admission, tier, spec, allowed_s)
        return _enqueue(producer, app, spec, tier.name, time.time() + allowed_s)
    except BaseException:
        if claim:
            _unclaim(producer, spec.job_id)
        raise


def _admit(admission: Admission, tier: Tier, spec: JobSpec, allowed_s: float) -> None:
    """Refuse the job when it could not start in time (counted, logged without its text)."""
    chars = len(tier.system_prompt) + len(build_prompt(spec))
    try:
        admission.check(tier, chars, spec.max_tokens or tier.max_tokens, allowed_s, spec.producer_id)
    except DeadlineUnmeetableError as exc:
        observe_admission_refused(tier.name)
        _log.warning(
            "submit.refused",
            tier=tier.name,
            job_id=spec.job_id,
            producer=spec.producer_id,
            predicted_start_s=exc.predicted_start_s,
            deadline_s=round(allowed_s, 3),
            retry_after_s=exc.retry_after,
        )
        raise


def _enqueue(producer: Producer, app: Celery, spec: JobSpec, tier: str, deadline: float) -> Job:
    headers: dict[str, Any] = {ENQUEUED_AT_HEADER: None, DEADLINE_HEADER: deadline, TIER_HEADER: tier}
    if spec.stream:
        headers[STREAM_HEADER] = True
    context = carried_context(structlog.contextvars.get_contextvars())
    if context:
        headers[CONTEXT_HEADER] = context
    _stamped.at = None
    _publish(app, spec, headers, deadline)
    return Job(spec.job_id, app, _stamped.at, producer=producer)


def replay(job_id: str, *, app: Celery | None = None, tiers: TierTable | None = None) -> Job:
    """Submit a dead-lettered job again, under the same id, with a fresh deadline; drop its dead letter.

    Raises:
        InvalidJobError: there is no dead letter for ``job_id``, or it kept no replayable payload.
    """
    producer = default_producer()
    app = app or producer.app
    tiers = tiers or producer.tiers
    store = producer.dead_letters
    letter = store.get(job_id) if store is not None else None
    if store is None or letter is None:
        raise InvalidJobError(f"job_id: no dead letter for {job_id!r}", field="job_id")
    if not isinstance(letter.payload, dict) or "text" not in letter.payload:
        raise InvalidJobError(f"job_id: the dead letter of {job_id!r} kept no job to replay", field="job_id")
    # through the worker's own checks: a job that broke its tier's rules is refused here, not re-enqueued
    spec, tier = check_job(letter.payload, tiers, None)
    with _reachable("result backend unavailable, job not replayed"):
        if producer.guard is not None:
            producer.guard.forget(job_id)
        AsyncResult(job_id, app=app).forget()
        store.client.delete(producer.keys.tokens(job_id))
        job = _enqueue(producer, app, spec, tier.name, time.time() + tier.deadline_s)
        store.delete(job_id)
    return job


def _claim(producer: Producer, spec: JobSpec) -> bool | None:
    """Claim a job id with its request's fingerprint; None when there is no Redis to claim it in.

    False when the same request already holds it; IdempotencyConflictError when another does.
    """
    if producer.guard is None:
        return None
    fingerprint = spec.fingerprint()
    with _reachable("result backend unavailable, job not enqueued"):
        holder = producer.guard.claim(spec.job_id, fingerprint, producer.settings.result_expires_s)
    if holder is None:
        return True
    if holder != fingerprint:
        raise IdempotencyConflictError(
            f"job_id: {spec.job_id!r} was already used for a different request; use a new job id"
        )
    return False


def _unclaim(producer: Producer, job_id: str) -> None:
    """Release a claim whose publish failed, so that the caller can submit the same id again."""
    if producer.redis is not None:
        with suppress(redis.RedisError):
            producer.redis.delete(producer.keys.submitted(job_id))


def _publish(app: Celery, spec: JobSpec, headers: dict[str, Any], deadline: float) -> None:
    with _reachable("broker unavailable, job not enqueued"):
        app.send_task(
            SUMMARIZE_TASK,
            kwargs={"job": spec.model_dump(exclude_none=True)},
            task_id=spec.job_id,
            headers=headers,
            expires=datetime.fromtimestamp(deadline, UTC),
            # what Flower and task events show instead of the document
            argsrepr="()",
            kwargsrepr=kwargs_repr(spec.tier, spec.text),
        )


def get_job(job_id: str, app: Celery | None = None, *, producer: Producer | None = None) -> Job:
    """A handle on a job submitted earlier, by id."""
    return Job(job_id, app, producer=producer)
