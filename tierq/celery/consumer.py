"""Celery's consumer, with every delivery checked before Celery builds a request from it.

Any sender may put anything on a tier's queue. Celery stops its worker for some malformed
messages (a body that is not ``[args, kwargs, embed]``, a ``timelimit`` that is not a pair: the
message goes back to the queue and every new worker dies on it), logs the body of others, and
runs any task it knows (its own built-ins included). This consumer (set as ``worker_consumer``)
checks each delivery against :func:`tierq.contract.message.check_message` first: one that does not fit is
dead-lettered with its reason, counted, logged once without its body, marked failed when its id is
free, and acknowledged; the worker goes on with the next message.
"""

from __future__ import annotations

import hashlib
from typing import Any

import redis
from celery.worker.consumer import Consumer
from pydantic import JsonValue

from tierq.celery.delivery import delivered_queue
from tierq.celery.process import context
from tierq.celery.transport import Channel
from tierq.contract.errors import InvalidJobError
from tierq.contract.message import MalformedMessage, bounded, check_message, job_id_of
from tierq.observe import metrics
from tierq.observe.logging import get_logger
from tierq.store.deadletter import FailureTimings

__all__ = ["KINDS", "TierqConsumer", "refuse"]

#: bytes of a malformed message's body kept in its dead letter
MAX_KEPT_BYTES = 65_536
#: what can be wrong with a delivery (the ``kind`` label of ``tierq_messages_rejected_total``)
KINDS = ("envelope", "undecodable", "headers", "unknown_task", "body", "unexpected")

_log = get_logger("tierq.consumer")


def _kind(reason: str) -> str:
    if reason.startswith("unknown task"):
        return "unknown_task"
    return next((kind for kind in KINDS if reason.startswith(kind)), "body")


def refuse(
    raw: bytes,
    reason: str,
    kind: str,
    job_id: str | None,
    queue: str | None,
    task: object = None,
    content_type: object = None,
    backend: Any = None,
) -> str:
    """Dead-letter a delivery that is not a tierq job, log it and count it; the dead letter's id.

    ``backend``: Celery's result backend, to mark the job failed (the transport has none to give).

    The dead letter is keyed by the message's job id when that id is free (and the job is marked
    failed under it, so its sender reads ``failed``, not ``pending`` forever); otherwise by a hash
    of the raw message, so a malformed message can never overwrite another job's result or dead letter.
    """
    digest = hashlib.sha256(raw).hexdigest()
    letter_id = f"malformed-{digest[:24]}"
    try:
        ctx = context()
    except RuntimeError:  # not in a started worker: nothing to record into
        ctx = None
    if job_id is not None and ctx is not None and ctx.guard is not None:
        mark = f"malformed:{digest[:32]}"
        try:
            holder = ctx.guard.claim(job_id, mark, ctx.settings.result_expires_s)
        except redis.RedisError as exc:  # the backend is away: keyed by hash, the worker goes on
            _log.warning("message.claim_failed", job_id=job_id, error=bounded(str(exc)))
        else:
            if holder is None or holder == mark:
                letter_id = job_id
    _log.error(
        "message.rejected",
        reason=reason,
        kind=kind,
        job_id=letter_id,
        queue=bounded(queue, 128) if queue is not None else None,
        task=bounded(task, 128) if task is not None else None,
        content_type=bounded(content_type, 128) if content_type is not None else None,
        body_bytes=len(raw),
    )
    metrics.observe_rejected(queue, kind)
    if ctx is None:
        return letter_id
    error = InvalidJobError(f"malformed message: {reason}", field="message")
    if ctx.dead_letters is not None:
        payload: dict[str, JsonValue] = {
            "raw": raw[:MAX_KEPT_BYTES].decode("utf-8", "replace"),
            "content_type": bounded(content_type, 128) if content_type is not None else None,
            "task": bounded(task, 128) if task is not None else None,
            "queue": queue,
        }
        ctx.dead_letters.add(
            letter_id, reason, error, None, 0, FailureTimings(), payload, error_type="MalformedMessage"
        )
    if letter_id == job_id and backend is not None:
        try:
            backend.mark_as_failure(job_id, error)
        except Exception as exc:  # the dead letter is written; a status write that fails is logged
            _log.warning("message.status_failed", job_id=job_id, error=bounded(str(exc)))
    return letter_id


def _raw(message: Any) -> bytes:
    body = getattr(message, "body", b"")
    return body if isinstance(body, bytes) else str(body).encode("utf-8", "replace")


def _refuse_entry(raw: bytes, reason: str, queue: str) -> None:
    """A Redis list entry that is not even a kombu message (see :mod:`tierq.celery.transport`)."""
    refuse(raw, reason, "envelope", None, queue)


class TierqConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer; deliveries that are not tierq job messages never reach Celery's strategy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # this process consumes: broken list entries on a Redis queue are refused, not raised
        Channel.on_malformed = _refuse_entry
        super().__init__(*args, **kwargs)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> None:
            headers = message.headers
            queue = delivered_queue(message.delivery_info)
            try:
                body = message.decode()
            except Exception as exc:  # refused content type, bad JSON, nesting too deep ...
                reason = f"undecodable: {type(exc).__name__}: {bounded(str(exc))}"
                self._refuse(message, reason, headers, queue, job_id_of(headers))
                return
            try:
                check_message(headers, body)
            except MalformedMessage as exc:
                self._refuse(message, exc.reason, headers, queue, exc.job_id)
                return
            try:
                handle(message)
            except Exception as exc:
                if message.acknowledged:
                    raise
                reason = f"unexpected: {type(exc).__name__}: {bounded(str(exc))}"
                self._refuse(message, reason, headers, queue, job_id_of(headers))

        return on_task_received

    def _refuse(
        self, message: Any, reason: str, headers: object, queue: object, job_id: str | None = None
    ) -> None:
        task = headers.get("task") if isinstance(headers, dict) else None
        refuse(
            _raw(message),
            reason,
            _kind(reason),
            job_id,
            queue if isinstance(queue, str) else None,
            task,
            getattr(message, "content_type", None),
            self.app.backend,
        )
        message.ack()
