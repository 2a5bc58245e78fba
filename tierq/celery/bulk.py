"""Batch tiers in a worker: the :class:`~tierq.runtime.bulk.BatchRunner` thread, and where it stores
each job's end (the Celery result backend, where producers read it).

Started once the worker is ready, when it consumes a batch tier's queue; stopped as it shuts down
(a batch in flight stays recorded in Redis, and the next worker to start takes it over).
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery, signals, states

from tierq.celery.process import context
from tierq.contract.result import JobResult
from tierq.observe.logging import get_logger
from tierq.runtime.bulk import BatchRunner

__all__ = ["BackendSink"]

_log = get_logger("tierq.bulk")
_running: list[tuple[threading.Event, threading.Thread]] = []


class BackendSink:
    """Stores a batch member's end as Celery stores a task's: what ``Job.result()`` reads."""

    def __init__(self, app: Celery) -> None:
        self.backend = app.backend

    def succeeded(self, job_id: str, result: JobResult) -> None:
        self.backend.store_result(job_id, result.to_json(), states.SUCCESS)

    def failed(self, job_id: str, exc: BaseException) -> None:
        self.backend.mark_as_failure(job_id, exc)

    def cancelled(self, job_id: str) -> None:
        self.backend.mark_as_revoked(job_id, "cancelled")


@signals.worker_ready.connect(weak=False, dispatch_uid="tierq.bulk.start")  # type: ignore[untyped-decorator]
def _start(sender: Any = None, **_: Any) -> None:
    """Run a batch runner when this worker consumes a batch tier's queue."""
    app = sender.app
    consumed = set(app.amqp.queues.consume_from or ())
    ctx = context()
    tiers = [t for t in ctx.tiers.tiers.values() if t.batch is not None and t.queue in consumed]
    if not tiers or ctx.batches is None:
        return
    runner = BatchRunner(ctx, tiers, BackendSink(app))
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), name="tierq-batch-runner", daemon=True)
    thread.start()
    _running.append((stop, thread))


@signals.worker_shutting_down.connect(weak=False, dispatch_uid="tierq.bulk.stop")  # type: ignore[untyped-decorator]
def _stop(**_: Any) -> None:
    while _running:
        stop, thread = _running.pop()
        stop.set()
        thread.join(timeout=30)
        if thread.is_alive():
            _log.warning("batch.runner_still_busy", detail="left to finish as the process exits")
