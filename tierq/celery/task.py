"""The summarize task: a thin shell over :mod:`tierq.runtime`; Celery's retry is the one retry loop."""

from __future__ import annotations

import math
from typing import Any

from celery import Task, shared_task, signals
from celery.exceptions import Ignore
from celery.worker import state as worker_state

from tierq.celery.config import is_amqp
from tierq.celery.delivery import delivered_queue
from tierq.celery.process import context
from tierq.contract.errors import CancelRequestedError, IdempotencyConflictError, TierqError
from tierq.contract.job import SUMMARIZE_TASK
from tierq.observe.metrics import in_flight
from tierq.runtime.attempt import Attempt, JobRef
from tierq.runtime.jobs import JobParked, run_attempt
from tierq.runtime.report import report_expired, report_failure
from tierq.runtime.retry import plan_retry

__all__ = ["summarize"]


@shared_task(
    bind=True,
    name=SUMMARIZE_TASK,
    max_retries=None,
    acks_late=True,
    Request="tierq.celery.request:RedactedRequest",
    # tierq's own errors are logged once, as summarize.failed: Celery logs them as expected (one
    # line at info, no traceback) instead of "raised unexpected" with a traceback
    throws=(TierqError,),
)  # type: ignore[untyped-decorator]
def summarize(self: Task, job: dict[str, Any]) -> dict[str, Any]:
    """Summarize ``job["text"]`` with its tier's model; retry what is worth retrying, in time.

    The message was checked by the consumer (:mod:`tierq.celery.consumer`); the job itself is
    checked here, against the tier of the queue it came from. Returns the
    :class:`~tierq.contract.result.JobResult` as JSON: what Celery stores and producers read.
    """
    request = self.request
    headers = dict(request.headers or {})
    queue = delivered_queue(request.delivery_info)
    ctx = context()
    ref = JobRef.read(request.id, job, queue, ctx.tiers)
    attempt = Attempt.from_headers(request.id, request.retries or 0, headers, queue)
    try:
        with in_flight(ref.tier_name):
            return run_attempt(ref, attempt, ctx).to_json()
    except JobParked:
        # a batch tier's job waits in Redis for its batch (tierq.runtime.bulk), which stores its
        # result: nothing is stored now, and the message is done with
        raise Ignore() from None
    except Exception as exc:
        delay, why = plan_retry(exc, attempt, ref)
        report_failure(exc, attempt, ref, delay, why, ctx)
        if isinstance(exc, IdempotencyConflictError):
            # the id's result belongs to the request that holds it: store nothing over it
            raise Ignore() from exc
        if isinstance(exc, CancelRequestedError):
            # stored as Celery stores a revoked task, which producers read as "cancelled"
            self.backend.mark_as_revoked(request.id, "cancelled", request=request)
            raise Ignore() from exc
        if delay is None:
            raise
        raise self.retry(
            exc=exc,
            countdown=_countdown(is_amqp(str(self.app.conf.broker_url)), delay),
            headers=attempt.retry_headers(headers, exc, delay),
            # Celery would show the real arguments in the retry's events: keep them redacted
            argsrepr="()",
            kwargsrepr=ref.kwargs_repr(),
        ) from exc


@signals.task_revoked.connect(weak=False, dispatch_uid="tierq.summarize.revoked")  # type: ignore[untyped-decorator]
def _on_revoked(request: Any = None, expired: bool = False, **_: Any) -> None:
    """A message past its deadline (``expires``) is dropped unrun by Celery: report it as expired."""
    if expired and request is not None and request.task == SUMMARIZE_TASK:
        # Celery remembers an expired id as revoked for hours, and would drop its replay (same id)
        # unrun: the message is acknowledged and reported here, so nothing needs that memory
        worker_state.revoked.discard(request.id)
        queue = delivered_queue(request.delivery_info)
        kwargs = request.kwargs if isinstance(request.kwargs, dict) else {}
        report_expired(request.id, dict(request.headers or {}), queue, context(), kwargs.get("job"))


def _countdown(amqp: bool, delay: float) -> float:
    """RabbitMQ's native delayed delivery (quorum queues) counts whole seconds, at least one."""
    if amqp:
        return max(1, math.ceil(delay))
    return delay
