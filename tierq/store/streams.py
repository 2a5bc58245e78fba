"""Tokens streamed back to the producer: one bounded, expiring Redis stream per job.

The worker appends each text delta as it arrives from the model (``XADD``, so a reader that
subscribes late still reads everything from the start) and an end marker when the job ends;
:meth:`tierq.producer.Job.stream` reads them with ``XREAD BLOCK``. Entries::

    {"t": "<text>", "a": "<run>"}      text (one or a few deltas) of the job's Nth start
    {"end": "succeeded" | "failed" | "refused" | "cancelled"}   the job ended; read its result

A job starts again from the top when its worker was lost mid-reply (a redelivery) or it is retried,
so a stream can hold an abandoned run's text before the run that finished: :func:`read_entries`
drops it when it can see the later run in the same read, and the reader is told otherwise
(:class:`tierq.producer.Restarted`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from tierq.core.batching import TextBatcher
from tierq.observe.logging import get_logger
from tierq.store.keys import Keys

__all__ = ["StreamEntry", "TokenPublisher", "read_entries", "stream_key"]

#: entries kept per stream (a reply of 64k tokens in deltas of a few tokens fits)
MAXLEN = 50_000
#: seconds a stream lives after its last write
TTL_S = 3600
#: seconds between two sends of gathered deltas (the first delta is sent at once)
FLUSH_INTERVAL_S = 0.025
#: milliseconds one ``XREAD`` blocks, so a reader can notice a job that ended without streaming
BLOCK_MS = 1000

_log = get_logger("tierq.streams")


def stream_key(job_id: str, key_prefix: str = "") -> str:
    """The Redis key of a job's token stream."""
    return Keys(key_prefix).tokens(job_id)


class TokenPublisher:
    """Appends one job's text and end marker; Redis errors are logged once, never raised.

    The first delta goes out at once (it is the producer's time to first token); later ones are
    gathered and sent at most every :data:`FLUSH_INTERVAL_S`, one ``XADD`` per batch instead of
    one per delta, which is most of streaming's cost in the worker.
    """

    def __init__(self, client: redis.Redis, key: str, run: int = 0) -> None:
        self._client = client
        self._key = key
        self._run = str(run)
        self._batcher = TextBatcher(FLUSH_INTERVAL_S)
        self._expiring = False
        self._broken = False

    def _write(self, entries: list[dict[str, str]]) -> None:
        if self._broken or not entries:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for fields in entries:
                pipe.xadd(self._key, fields, maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
            if not self._expiring:
                pipe.expire(self._key, TTL_S)
            pipe.execute()
            self._expiring = True
        except redis.RedisError as exc:
            # the summary still reaches the result backend: streaming is a preview, not the record
            self._broken = True
            _log.warning("stream.publish_failed", error=str(exc))

    def _entries(self, text: str | None) -> list[dict[str, str]]:
        return [] if not text else [{"t": text, "a": self._run}]

    def text(self, delta: str) -> None:
        """Add a text delta; send what has gathered if the last send is old enough."""
        self._write(self._entries(self._batcher.add(delta)))

    def send(self, text: str) -> None:
        """Write text gathered elsewhere (``stream_reply_on_loop``) at once, after anything held."""
        self._write(self._entries((self._batcher.drain() or "") + text))

    def end(self, outcome: str) -> None:
        """Send what is left, mark the job ended (succeeded, failed or refused), renew the expiry."""
        self._expiring = False
        self._write([*self._entries(self._batcher.drain()), {"end": outcome}])


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One entry read back: a text delta (``text``) of a ``run``, the end marker (``end``), or
    ``restarted``: the job started over after text of an earlier run was read (drop that text).

    ``id`` is the Redis entry id of a text or end entry (None for ``restarted``, which is not stored):
    what a reader passes as ``after`` to resume behind it.
    """

    text: str | None = None
    run: int = 0
    end: str | None = None
    restarted: bool = False
    id: str | None = None


def read_entries(
    client: redis.Redis, key: str, deadline: float | None = None, after: str | None = None
) -> Iterator[StreamEntry | None]:
    """Entries from the start of the stream (or those after the entry id ``after``) as they come;
    ``None`` after each idle ``BLOCK_MS``.

    Stops after the end marker, or at ``deadline`` (a ``time.monotonic()`` instant). Text of a run
    that a later run follows within the same read is skipped: a late reader gets only the text of
    the run that finished. When a new run's text follows text already yielded (before ``after``,
    too), a ``restarted`` entry comes first.
    """
    last: bytes | str = after or "0-0"
    yielded_run: bytes | None = None
    if after is not None:
        # resuming: the run of the text read before, so that a later run's text is announced
        before: list[tuple[bytes, dict[bytes, bytes]]]
        before = client.xrevrange(key, max=after, count=1)  # type: ignore[assignment]
        if before and b"t" in before[0][1]:
            yielded_run = before[0][1].get(b"a", b"0")
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
        entries = reply[0][1]
        runs = [fields.get(b"a", b"0") for _, fields in entries if b"t" in fields]
        latest = runs[-1] if runs else None
        for entry_id, fields in entries:
            last = entry_id
            if b"end" in fields:
                yield StreamEntry(end=fields[b"end"].decode(), id=entry_id.decode())
                return
            run = fields.get(b"a", b"0")
            if run != latest:
                continue  # an abandoned run: a later one starts further on in this read
            if yielded_run is not None and run != yielded_run:
                yield StreamEntry(run=int(run), restarted=True)
            yielded_run = run
            yield StreamEntry(text=fields[b"t"].decode(), run=int(run), id=entry_id.decode())
