"""The baseline: a minimal Celery app with one no-op task, configured as tierq's pools are.

Same Redis (``BENCH_BROKER_URL``, read at import), JSON only, prefetch 1, late acks, its own
queue; the worker runs with the threads pool (``-P threads -c 32``). The producer stamps
``bench_sent_at`` (``time.time()``) into the message headers as it publishes, exactly where tierq
stamps ``tierq_enqueued_at``; the task returns it with the ``time.time()`` its body started at.

    python -m celery -A bench.rawapp:app worker -P threads -c 32 -Q bench.raw

``app_events`` is the same app with the Celery settings tierq adds on top (task events sent by
producer and worker, ``task_track_started``), on queue ``bench.raw.events``: it tells Celery's
share of tierq's overhead from tierq's own code. ``bench.sleep`` (on ``app``) only sleeps: the
concurrency scenario's floor, what Celery alone keeps in flight::

    python -m celery -A bench.rawapp:app_events worker -E -P threads -c 32 -Q bench.raw.events
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, Task, signals

__all__ = [
    "EVENTS_QUEUE",
    "NOOP_TASK",
    "RAW_QUEUE",
    "SENT_AT_HEADER",
    "SLEEP_TASK",
    "app",
    "app_events",
    "send_noop",
    "send_noop_events",
    "send_sleep",
]

RAW_QUEUE = "bench.raw"
EVENTS_QUEUE = "bench.raw.events"
NOOP_TASK = "bench.noop"
SLEEP_TASK = "bench.sleep"
SENT_AT_HEADER = "bench_sent_at"

_url = os.environ.get("BENCH_BROKER_URL") or os.environ.get("TIERQ_BROKER_URL", "redis://127.0.0.1:6379/0")


def _make_app(name: str, queue: str, **extra: Any) -> Celery:
    celery = Celery(name, broker=_url, backend=_url)
    celery.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=queue,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"max_connections": 512},
        redis_max_connections=512,
        result_expires=3600,
        **extra,
    )
    return celery


def _noop(self: Task) -> dict[str, Any]:
    """Do nothing; say when the producer published and when this body started."""
    started_at = time.time()
    headers = self.request.headers or {}
    sent_at = headers.get(SENT_AT_HEADER) or self.request.get(SENT_AT_HEADER)
    return {"sent_at": sent_at, "started_at": started_at}


def _sleep(seconds: float) -> dict[str, float]:
    """Stand in for an IO-bound call of ``seconds``; say when it started and ended."""
    started_at = time.time()
    time.sleep(seconds)
    return {"started_at": started_at, "done_at": time.time()}


app = _make_app("bench_raw", RAW_QUEUE)
app_events = _make_app(
    "bench_raw_events",
    EVENTS_QUEUE,
    task_track_started=True,
    worker_send_task_events=True,
    task_send_sent_event=True,
)
_noop_task = app.task(name=NOOP_TASK, bind=True)(_noop)
_noop_events_task = app_events.task(name=NOOP_TASK, bind=True)(_noop)
_sleep_task = app.task(name=SLEEP_TASK)(_sleep)


def _stamp(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None and SENT_AT_HEADER in headers and headers[SENT_AT_HEADER] is None:
        headers[SENT_AT_HEADER] = time.time()


signals.before_task_publish.connect(_stamp, sender=NOOP_TASK, weak=False, dispatch_uid="bench.raw.stamp")


def send_noop() -> Any:
    """Publish one no-op; return its ``AsyncResult``."""
    return _noop_task.apply_async(headers={SENT_AT_HEADER: None})


def send_sleep(seconds: float) -> Any:
    """Publish one sleep (the concurrency scenario's floor: Celery alone, no model call)."""
    return _sleep_task.apply_async((seconds,))


def send_noop_events() -> Any:
    """Publish one no-op on the app with tierq's extra Celery settings (events, track_started)."""
    return _noop_events_task.apply_async(headers={SENT_AT_HEADER: None})
