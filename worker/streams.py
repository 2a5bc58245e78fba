"""Tokens streamed back to the producer: one bounded, expiring Redis stream per job.

The worker appends each text delta as it arrives from the model (``XADD``, so a reader that
subscribes late still reads everything from the start) and an end marker when the job ends;
:meth:`tasks.producer.Job.stream` reads them with ``XREAD BLOCK``. Entries::

    {"t": "<text>", "a": "<attempt>"}      a text delta of attempt N (0 for the first)
    {"end": "succeeded" | "failed"}       the job ended; its result is in the result backend
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from worker.logging import get_logger

__all__ = ["STREAM_PREFIX", "StreamEntry", "TokenPublisher", "read_entries", "stream_key"]

#: key of a job's stream, after ``TIERQ_KEY_PREFIX``: ``tierq:tokens:<job_id>``
STREAM_PREFIX = "tierq:tokens:"
#: entries kept per stream (a reply of 64k tokens in deltas of a few tokens fits)
MAXLEN = 50_000
#: seconds a stream lives after its last write
TTL_S = 3600
#: milliseconds one ``XREAD`` blocks, so a reader can notice a job that ended without streaming
BLOCK_MS = 1000

_log = get_logger("tierq.streams")


def stream_key(job_id: str, key_prefix: str = "") -> str:
    """The Redis key of a job's token stream."""
    return f"{key_prefix}{STREAM_PREFIX}{job_id}"


class TokenPublisher:
    """Appends one job's text deltas and end marker; Redis errors are logged once, never raised."""

    def __init__(self, client: redis.Redis, key: str, attempt: int = 0) -> None:
        self._client = client
        self._key = key
        self._attempt = str(attempt)
        self._expiring = False
        self._broken = False

    def _write(self, fields: dict[str, str]) -> None:
        if self._broken:
            return
        try:
            if self._expiring:
                self._client.xadd(self._key, fields, maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
                return
            pipe = self._client.pipeline(transaction=False)
            pipe.xadd(self._key, fields, maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
            pipe.expire(self._key, TTL_S)
            pipe.execute()
            self._expiring = True
        except redis.RedisError as exc:
            # the summary still reaches the result backend: streaming is a preview, not the record
            self._broken = True
            _log.warning("stream.publish_failed", error=str(exc))

    def text(self, delta: str) -> None:
        """Append a text delta."""
        self._write({"t": delta, "a": self._attempt})

    def end(self, outcome: str) -> None:
        """Mark the job ended (``succeeded`` or ``failed``) and renew the stream's expiry."""
        self._expiring = False
        self._broken = False
        self._write({"end": outcome})


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One entry read back: a text delta (``text``) or the end marker (``end``)."""

    text: str | None = None
    attempt: int = 0
    end: str | None = None


def read_entries(
    client: redis.Redis, key: str, deadline: float | None = None
) -> Iterator[StreamEntry | None]:
    """Entries from the start of the stream as they come; ``None`` after each idle ``BLOCK_MS``.

    Stops after the end marker, or at ``deadline`` (a ``time.monotonic()`` instant).
    """
    last: bytes | str = "0-0"
    while True:
        block = BLOCK_MS
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            block = max(1, min(block, int(left * 1000)))
        reply: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
        reply = client.xread({key: last}, count=512, block=block)  # type: ignore[assignment]
        if not reply:
            yield None
            continue
        for entry_id, fields in reply[0][1]:
            last = entry_id
            if b"end" in fields:
                yield StreamEntry(end=fields[b"end"].decode())
                return
            yield StreamEntry(text=fields[b"t"].decode(), attempt=int(fields.get(b"a", b"0")))
