"""A job's server-sent events, read from its token stream in Redis.

::

    id: 1732233170415-0          the Redis stream entry id: send it back as Last-Event-ID to resume
    event: text
    data: {"text": "The report finds"}

    event: restarted             the job started over: drop the text received so far (no id)
    data: {"run": 1}

    id: 1732233171002-0
    event: result                the JobResult, last
    data: {"job_id": "...", "summary": "...", ...}

    event: error                 or the job ended without a summary (or the stream could not be read)
    data: {"status": "failed", "type": "RequestRejectedError", "message": "..."}

Every ``data`` is one line of JSON. Blocking Redis reads run in worker threads (a limiter of their
own, so that streams cannot starve the routes), never on the event loop.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import redis

from tierq import Job
from tierq.contract.errors import BrokerUnavailableError, JobFailedError, JobRefusedError, JobTimeoutError
from tierq.store.streams import StreamEntry, read_entries

__all__ = ["KEEPALIVE_S", "RESULT_WAIT_S", "encode_event", "job_events"]

#: seconds between keep-alive comments on an idle stream (proxies drop silent connections)
KEEPALIVE_S = 15.0
#: seconds to wait for the stored result once the stream says the job ended
RESULT_WAIT_S = 30.0


def encode_event(event: str, data: Any, event_id: str | None = None) -> bytes:
    """One server-sent event; ``data`` as one line of JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _step(entries: Iterator[StreamEntry | None]) -> tuple[bool, StreamEntry | None]:
    """The next entry (in a worker thread); ``(False, None)`` when the reader stopped."""
    try:
        return True, next(entries)
    except StopIteration:
        return False, None


def _final(job: Job, event_id: str | None) -> bytes:
    """The last event: the result, or why there is none (in a worker thread)."""
    try:
        return encode_event("result", job.result(timeout=RESULT_WAIT_S).to_json(), event_id)
    except JobFailedError as exc:
        error: dict[str, Any] = {"status": job.status(), "type": exc.error_type, "message": str(exc)}
        if isinstance(exc, JobRefusedError):
            error |= {"category": exc.category, "explanation": exc.explanation}
        return encode_event("error", error, event_id)
    except JobTimeoutError as exc:
        return encode_event("error", {"status": job.status(), "type": "JobTimeoutError", "message": str(exc)})


async def job_events(
    job: Job,
    client: redis.Redis,
    key: str,
    *,
    after: str | None,
    limiter: anyio.CapacityLimiter,
    max_s: float,
    disconnected: Callable[[], Awaitable[bool]],
) -> AsyncIterator[bytes]:
    """The job's events from the start of its stream, or after entry ``after``, until its result.

    Ends after ``max_s`` seconds without a result (the client may reconnect) or when the client has
    gone away.
    """
    entries = read_entries(client, key, time.monotonic() + max_s, after)
    quiet_since = time.monotonic()
    try:
        while True:
            going, entry = await anyio.to_thread.run_sync(_step, entries, limiter=limiter)
            if not going:
                return
            if entry is None:  # idle: a job that streams nothing ends without an end marker
                if await disconnected():
                    return
                if await anyio.to_thread.run_sync(job.ready, limiter=limiter):
                    yield await anyio.to_thread.run_sync(_final, job, None, limiter=limiter)
                    return
                if time.monotonic() - quiet_since >= KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield b": keep-alive\n\n"
                continue
            quiet_since = time.monotonic()
            if entry.end is not None:
                yield await anyio.to_thread.run_sync(_final, job, entry.id, limiter=limiter)
                return
            if entry.restarted:
                yield encode_event("restarted", {"run": entry.run})
            elif entry.text:
                yield encode_event("text", {"text": entry.text}, entry.id)
    except (redis.RedisError, BrokerUnavailableError) as exc:
        message = f"the job's stream could not be read ({type(exc).__name__}); reconnect to resume"
        yield encode_event(
            "error", {"status": "unknown", "type": "BrokerUnavailableError", "message": message}
        )
    finally:
        # not running in a thread now: a cancelled ``run_sync`` waits for its thread to return
        if isinstance(entries, Generator):
            entries.close()
