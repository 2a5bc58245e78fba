"""Celery's consumer, with malformed messages dead-lettered and logged without their body.

Celery rejects a message it cannot decode, whose format it does not know, that names an unknown
task or that is otherwise invalid, and the worker keeps running; but it logs the message body,
which here is a document. This consumer (set as ``worker_consumer``) records each such message in
the dead-letter store and logs one ``message.rejected`` line with its id, task name and sizes.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import signals
from celery.exceptions import NotRegistered
from celery.utils.log import get_logger as celery_logger
from celery.worker.consumer import Consumer

from worker.celery.process import context
from worker.observe.logging import get_logger

__all__ = ["TierqConsumer"]

#: bytes of a malformed message's body kept in its dead letter
MAX_KEPT_BYTES = 65_536

_log = get_logger("tierq.consumer")
_celery_log = celery_logger("celery.worker.consumer")


def _record(message: Any, reason: str, exc: BaseException | None) -> None:
    headers = getattr(message, "headers", None) or {}
    body = getattr(message, "body", b"")
    raw = body if isinstance(body, bytes) else str(body).encode("utf-8", "replace")
    job_id = str(headers.get("id") or f"malformed-{uuid.uuid4().hex}")
    content_type = getattr(message, "content_type", None)
    _log.error(
        "message.rejected",
        reason=reason,
        job_id=job_id,
        task=headers.get("task"),
        content_type=content_type,
        body_bytes=len(raw),
        error_type=type(exc).__name__ if exc is not None else None,
    )
    payload = {
        "raw": raw[:MAX_KEPT_BYTES].decode("utf-8", "replace"),
        "content_type": content_type,
        "task": headers.get("task"),
    }
    store = context().dead_letters
    if store is not None:
        store.add(job_id, reason, exc, None, 0, {}, payload, error_type=type(exc).__name__ if exc else reason)


class TierqConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer; malformed messages go to the dead-letter store, their bodies stay out of logs."""

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        _record(message, "undecodable message", exc)
        message.ack()

    def on_unknown_message(self, body: Any, message: Any) -> None:
        _record(message, "unknown message format", None)
        message.reject_log_error(_celery_log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        _record(message, "unknown task", exc)
        headers = message.headers or {}
        job_id, name = headers.get("id"), headers.get("task")
        message.reject_log_error(_celery_log, self.connection_errors)
        if job_id:
            self.app.backend.mark_as_failure(job_id, NotRegistered(name))
        signals.task_unknown.send(sender=self, message=message, exc=exc, name=name, id=job_id)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        _record(message, "invalid task message", exc)
        message.reject_log_error(_celery_log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)
