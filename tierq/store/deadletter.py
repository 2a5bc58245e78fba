"""The dead-letter store: jobs that failed for good, with why, how many attempts and their timings.

Kept in the result backend's Redis: a hash per job (``tierq:dlq:<job_id>``, its payload as JSON)
and a sorted set of job ids by time (``tierq:dlq``). Listings show sizes, never the payload's text;
``tierq dlq show ID --payload`` prints it, ``tierq dlq replay`` submits it again.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError

from tierq.core.settings import Settings
from tierq.observe.logging import get_logger
from tierq.store.clients import backend_redis
from tierq.store.keys import Keys

__all__ = ["DeadLetter", "DeadLetterStore", "FailureTimings"]

#: seconds a dead letter is kept
TTL_S = 30 * 24 * 3600

_log = get_logger("tierq.deadletter")


class FailureTimings(BaseModel):
    """Where a failed job's time went, in milliseconds; None when unknown."""

    model_config = ConfigDict(frozen=True)

    queue_wait_ms: float | None = None
    total_ms: float | None = None


class DeadLetter(BaseModel):
    """One dead-lettered job."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    reason: str
    error_type: str
    error: str
    tier: str | None
    attempts: int
    failed_at: float
    timings: FailureTimings
    #: the job to replay (``tierq dlq replay``), or what was kept of a malformed message
    payload: dict[str, JsonValue] | None

    def summary(self) -> dict[str, Any]:
        """Everything but the payload's text, as JSON-ready data: safe to list and log."""
        text = self.payload.get("text") if self.payload is not None else None
        shown = self.model_dump(mode="json", exclude={"payload"})
        shown["payload"] = f"<{len(text)} chars of text>" if isinstance(text, str) else "<redacted>"
        return shown


class DeadLetterStore:
    """Record, list, read and delete dead letters."""

    def __init__(self, client: redis.Redis, key_prefix: str = "") -> None:
        self.client = client
        self.prefix = key_prefix
        self.keys = Keys(key_prefix)

    @classmethod
    def from_settings(cls, settings: Settings) -> DeadLetterStore | None:
        """The store in the result backend's Redis (a client of its own); None when that is not Redis."""
        client = backend_redis(settings)
        return None if client is None else cls(client, settings.key_prefix)

    def _key(self, job_id: str) -> str:
        return self.keys.dead_letter(job_id)

    def add(
        self,
        job_id: str,
        reason: str,
        exc: BaseException | None,
        tier: str | None,
        attempts: int,
        timings: FailureTimings,
        payload: dict[str, JsonValue] | None,
        error_type: str | None = None,
    ) -> None:
        """Record a job that failed for good (see :meth:`record`)."""
        self.record(
            DeadLetter(
                job_id=job_id,
                reason=reason,
                error_type=error_type or (type(exc).__name__ if exc is not None else "Unknown"),
                error=str(exc) if exc is not None else "",
                tier=tier,
                attempts=attempts,
                failed_at=time.time(),
                timings=timings,
                payload=payload,
            )
        )

    def record(self, letter: DeadLetter) -> None:
        """Store a dead letter; a Redis error is logged, never raised (the job already failed)."""
        fields = {
            "job_id": letter.job_id,
            "reason": letter.reason,
            "error_type": letter.error_type,
            "error": letter.error,
            "tier": letter.tier or "",
            "attempts": str(letter.attempts),
            "failed_at": repr(letter.failed_at),
            "timings": letter.timings.model_dump_json(),
            "payload": json.dumps(letter.payload),
        }
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(self._key(letter.job_id), mapping=fields)  # type: ignore[arg-type]
            pipe.expire(self._key(letter.job_id), TTL_S)
            pipe.zadd(self.keys.dead_letters, {letter.job_id: letter.failed_at})
            pipe.execute()
        except redis.RedisError as exc:
            _log.error("dlq.record_failed", job_id=letter.job_id, error=str(exc))

    def get(self, job_id: str) -> DeadLetter | None:
        """A dead letter by job id, or None."""
        raw: dict[bytes, bytes] = self.client.hgetall(self._key(job_id))  # type: ignore[assignment]
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            return DeadLetter(
                job_id=fields["job_id"],
                reason=fields["reason"],
                error_type=fields["error_type"],
                error=fields["error"],
                tier=fields["tier"] or None,
                attempts=int(fields["attempts"]),
                failed_at=float(fields["failed_at"]),
                timings=FailureTimings.model_validate_json(fields["timings"]),
                payload=json.loads(fields["payload"]),
            )
        except (KeyError, ValueError, ValidationError) as exc:  # not one of ours: shown, never trusted
            _log.warning("dlq.unreadable", job_id=job_id, error=str(exc)[:200])
            return None

    def list(self, limit: int = 100) -> list[DeadLetter]:
        """The newest dead letters first; ids whose entry expired are dropped from the index."""
        ids: list[bytes] = self.client.zrevrange(self.keys.dead_letters, 0, limit - 1)  # type: ignore[assignment]
        letters = []
        for raw_id in ids:
            letter = self.get(raw_id.decode())
            if letter is None:
                self.client.zrem(self.keys.dead_letters, raw_id)
            else:
                letters.append(letter)
        return letters

    def delete(self, job_id: str) -> None:
        """Remove a dead letter (after a replay)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._key(job_id))
        pipe.zrem(self.keys.dead_letters, job_id)
        pipe.execute()
