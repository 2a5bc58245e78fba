"""The producer side of a scenario: submitting tierq jobs, the enqueue stamps, reading results in bulk.

Imports ``tierq.producer`` lazily: the environment must point at the bench's Redis first
(:class:`bench.harness.Harness` does that).
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis

__all__ = [
    "EnqueueStamps",
    "has_job_stream",
    "queue_length",
    "submit",
    "supports_stream_flag",
    "wait_results",
]

#: the Redis transport's priority sub-lists of a queue (``queue``, ``queue\\x06\\x163``...)
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class EnqueueStamps:
    """Reads ``tierq_enqueued_at`` off every tierq message this process publishes, by job id.

    Connected after ``tierq.producer``'s own handler, so the stamp is already set when it runs.
    """

    def __init__(self) -> None:
        from celery import signals

        from tierq.contract.job import ENQUEUED_AT_HEADER, SUMMARIZE_TASK
        from tierq.producer import default_producer

        # the producer connects its stamping handler as it is built: before this one, so the
        # stamp is set when this one runs
        default_producer()

        self._header = ENQUEUED_AT_HEADER
        self._stamps: dict[str, float] = {}
        self._lock = threading.Lock()
        signals.before_task_publish.connect(self._capture, sender=SUMMARIZE_TASK, weak=False)
        self._signal = signals.before_task_publish
        self._sender = SUMMARIZE_TASK

    def _capture(self, headers: dict[str, Any] | None = None, **_: Any) -> None:
        if headers and isinstance(headers.get(self._header), float):
            with self._lock:
                self._stamps[str(headers["id"])] = headers[self._header]

    def __getitem__(self, job_id: str) -> float:
        with self._lock:
            return self._stamps[job_id]

    def get(self, job_id: str) -> float | None:
        with self._lock:
            return self._stamps.get(job_id)

    def close(self) -> None:
        """Stop capturing."""
        self._signal.disconnect(self._capture, sender=self._sender)


def supports_stream_flag() -> bool:
    """Whether ``submit`` takes ``stream=`` (jobs that publish their text as it arrives)."""
    from tierq.producer import submit as tierq_submit

    return "stream" in inspect.signature(tierq_submit).parameters


def has_job_stream() -> bool:
    """Whether ``Job.stream`` exists."""
    from tierq.producer import Job

    return callable(getattr(Job, "stream", None))


def submit(
    text: str,
    urgency: str,
    *,
    stream: bool = False,
    tiers: Any = None,
    producer_id: str | None = None,
    producer: Any = None,
) -> Any:
    """``tierq.producer.submit``; ``stream=True`` only passed when the producer supports it.

    ``producer_id``: the sender named in the job; ``producer``: a ``tierq.producer.Producer`` of
    the caller's settings (None: the one of the environment). Each is passed only when given.
    """
    from tierq.producer import submit as tierq_submit

    kwargs: dict[str, Any] = {"tiers": tiers}
    if stream and supports_stream_flag():
        kwargs["stream"] = True
    if producer_id is not None:
        kwargs["producer_id"] = producer_id
    if producer is not None:
        kwargs["producer"] = producer
    return tierq_submit(text, urgency, **kwargs)


def queue_length(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a queue (every priority sub-list)."""
    pipe = client.pipeline(transaction=False)
    for suffix in _PRIORITY_SUFFIXES:
        pipe.llen(queue + suffix)
    return sum(int(n) for n in pipe.execute())


def delete_queue(client: redis.Redis, queue: str) -> None:
    """Drop every message waiting in ``queue``."""
    client.delete(*(queue + suffix for suffix in _PRIORITY_SUFFIXES))


def _meta_key(task_id: str) -> str:
    return f"celery-task-meta-{task_id}"


def wait_results(
    client: redis.Redis, task_ids: Iterable[str], timeout: float, interval: float = 0.1
) -> dict[str, dict[str, Any]]:
    """Poll the result backend until every task has ended; return ``{task_id: meta}``.

    Cheaper for the bench process than one ``AsyncResult.get`` per task: one ``MGET`` per poll of
    the tasks still pending, a byte search for their final state, JSON only once at the end.
    """
    pending = list(task_ids)
    done: dict[str, bytes] = {}
    end = time.monotonic() + timeout
    while pending:
        still: list[str] = []
        for start in range(0, len(pending), 1000):
            chunk = pending[start : start + 1000]
            values = client.mget([_meta_key(t) for t in chunk])
            for task_id, raw in zip(chunk, values, strict=True):
                if isinstance(raw, bytes) and (b'"SUCCESS"' in raw or b'"FAILURE"' in raw):
                    done[task_id] = raw
                else:
                    still.append(task_id)
        pending = still
        if pending:
            if time.monotonic() > end:
                raise TimeoutError(f"{len(pending)} tasks did not end within {timeout} s")
            time.sleep(interval)
    return {task_id: json.loads(raw) for task_id, raw in done.items()}
