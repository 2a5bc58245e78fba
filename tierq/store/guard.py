"""At most one attempt of a job runs at a time, none runs after it succeeded, and a job that keeps
crashing its worker is given up.

Celery delivers at least once: a message comes back when its worker dies before acknowledging it
(kill -9, a lost connection: its lease lapses). Before calling the model, an attempt:

- reads the job's recorded result (``tierq:result:<id>``, written when it succeeded) and returns
  it instead of calling the model again. Celery's own result cannot serve: ``task_track_started``
  overwrites it with STARTED as the redelivered message starts;
- takes the job's run lock (``tierq:running:<id>``, ``SET NX PX``), which a heartbeat thread keeps
  alive while the attempt runs and which expires ``lock_ttl_s`` (the deployment's lease, 3 s by
  default) after its worker died; a second delivery waits for the first to finish (or die) instead
  of running beside it;
- counts its start (``tierq:starts:<id>``); past the limit the job is dead-lettered unrun.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis

from tierq.contract.result import JobResult, JobStatus
from tierq.core.cancel import CancelToken
from tierq.core.settings import DEFAULT_LEASE_S
from tierq.observe.logging import get_logger
from tierq.store.keys import Keys
from tierq.store.scripts import lua

__all__ = ["Begin", "RunGuard"]
#: seconds between a waiting duplicate's looks at the lock and the result
WAIT_POLL_S = 0.25
#: seconds an attempt keeps trying to record its result while Redis is away
RECORD_RETRY_S = 60.0

_log = get_logger("tierq.guard")


@dataclass(frozen=True, slots=True)
class Begin:
    """What an attempt found as it began."""

    result: JobResult | None
    acquired: bool
    starts: int
    #: the job id is held by another request (a different fingerprint): this one must not run
    conflict: bool = False
    #: the job's producer cancelled it
    cancelled: bool = False
    #: set by the heartbeat when the job is cancelled while this attempt holds its lock
    cancel: CancelToken | None = None
    #: replies of the commands ``also`` added to the round trip
    also: tuple[object, ...] = ()


class RunGuard:
    """Run locks with a heartbeat, recorded results and start counts, in one Redis."""

    def __init__(
        self, client: redis.Redis, key_prefix: str = "", lock_ttl_s: float = DEFAULT_LEASE_S
    ) -> None:
        self.client = client
        #: seconds a run lock outlives its last heartbeat (a dead worker's job waits at most this long)
        self.lock_ttl_s = lock_ttl_s
        self.prefix = key_prefix
        self.keys = Keys(key_prefix)
        self._token = uuid.uuid4().hex
        #: run locks this process holds: lock key → (the job's cancel mark, its token)
        self._held: dict[str, tuple[str, CancelToken]] = {}
        self._lock = threading.Lock()
        self._release = client.register_script(lua("release_if_owner"))
        self._beating = False

    def claim(self, job_id: str, fingerprint: str, ttl_s: int) -> str | None:
        """Claim a job id for a request's fingerprint (``SET NX``): None when this call claimed it,
        else the fingerprint that already holds it (this one's for a repeat, another's for a conflict)."""
        key = self.keys.submitted(job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(key, fingerprint, nx=True, ex=ttl_s)
        pipe.get(key)
        claimed, holder = pipe.execute()
        if claimed or holder is None:
            return None
        return _holder(holder, fingerprint)

    def not_ended(self, job_id: str) -> JobStatus:
        """What a job without a stored result is, in one round trip: ``cancelled``, ``running``,
        ``pending`` (its id was claimed: submitted, or taken by a worker) or ``unknown``."""
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(self.keys.cancelled(job_id))
        pipe.exists(self.keys.running(job_id))
        pipe.exists(self.keys.submitted(job_id))
        cancelled, running, claimed = pipe.execute()
        if cancelled:
            return "cancelled"
        if running:
            return "running"
        return "pending" if claimed else "unknown"

    def begin(
        self,
        job_id: str,
        starts_ttl_s: float,
        fingerprint: str,
        claim_ttl_s: int,
        also: Callable[[redis.client.Pipeline], None] | None = None,
    ) -> Begin:
        """One round trip: the claim on the id, the recorded result, the run lock and the start count.

        The id is claimed for ``fingerprint`` (the request's) unless a submit or an earlier
        delivery already did; when another request holds it, ``conflict`` is set. ``also`` adds
        commands of the caller's to the same round trip (their replies: ``Begin.also``).
        """
        running = self.keys.running(job_id)
        starts = self.keys.starts(job_id)
        claim = self.keys.submitted(job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(claim, fingerprint, nx=True, ex=claim_ttl_s)
        pipe.get(claim)
        pipe.get(self.keys.result(job_id))
        pipe.set(running, self._token, nx=True, px=int(self.lock_ttl_s * 1000))
        pipe.incr(starts)
        pipe.expire(starts, int(starts_ttl_s))
        pipe.exists(self.keys.cancelled(job_id))
        if also is not None:
            also(pipe)
        _, holder, stored, acquired, count, _, cancelled, *extra = pipe.execute()
        cancel = self._hold(job_id) if acquired else None
        conflict = holder is not None and _holder(holder, fingerprint) != fingerprint
        result = None if conflict else _parse(stored)
        return Begin(
            result=result,
            acquired=bool(acquired),
            starts=int(count),
            conflict=conflict,
            cancelled=bool(cancelled),
            cancel=cancel,
            also=tuple(extra),
        )

    def acquire(self, job_id: str) -> CancelToken | None:
        """Take the run lock if it is free: the attempt's cancel token, else None."""
        running = self.keys.running(job_id)
        if self.client.set(running, self._token, nx=True, px=int(self.lock_ttl_s * 1000)):
            return self._hold(job_id)
        return None

    def recorded(self, job_id: str) -> JobResult | None:
        """The job's recorded result, if it succeeded."""
        return _parse(self.client.get(self.keys.result(job_id)))

    def wait_for_other(self, job_id: str, deadline: float) -> JobResult | CancelToken | None:
        """Wait while another attempt holds the lock: its result, or the cancel token once the lock
        is ours, or None at the deadline."""
        while time.time() < deadline:
            result = self.recorded(job_id)
            if result is not None:
                return result
            cancel = self.acquire(job_id)
            if cancel is not None:
                return cancel
            time.sleep(WAIT_POLL_S)
        return None

    def finish(self, job_id: str, result: JobResult, ttl_s: int, retry_s: float = RECORD_RETRY_S) -> None:
        """Record the result, then release the lock; never raises (the answer is already in hand).

        With Redis away the write is retried for ``retry_s`` seconds, so that a redelivery finds the
        answer instead of calling the model again; then the lock leaves the heartbeat and lapses.
        """
        payload, until = json.dumps(result.to_json()), time.monotonic() + retry_s
        failures = 0
        while True:
            try:
                self.client.set(self.keys.result(job_id), payload, ex=ttl_s)
                break
            except redis.RedisError as exc:
                if time.monotonic() >= until:
                    _log.error("guard.record_failed", job_id=job_id, error=str(exc))
                    break
                if failures == 0:  # once: an operator (and the chaos suite) can see the wait begin
                    _log.warning("guard.record_retrying", job_id=job_id, retry_s=retry_s, error=str(exc))
                failures += 1
                time.sleep(WAIT_POLL_S * 2)
        self.release(job_id)

    def release(self, job_id: str, uncount: bool = False) -> None:
        """Release the lock if this process holds it; ``uncount``: this start sent nothing (it only
        waited for rate-limit capacity), so it does not count toward the job's starts."""
        running = self.keys.running(job_id)
        with self._lock:
            self._held.pop(running, None)
        try:
            self._release(keys=[running], args=[self._token])
            if uncount:
                self.client.decr(self.keys.starts(job_id))
        except redis.RedisError as exc:  # it expires on its own
            _log.warning("guard.release_failed", job_id=job_id, error=str(exc))

    def forget(self, job_id: str) -> None:
        """Drop the recorded result and start count (before a dead letter is replayed)."""
        self.client.delete(self.keys.result(job_id), self.keys.starts(job_id))

    def _hold(self, job_id: str) -> CancelToken:
        cancel = CancelToken()
        with self._lock:
            self._held[self.keys.running(job_id)] = (self.keys.cancelled(job_id), cancel)
            if not self._beating:
                self._beating = True
                threading.Thread(target=self._heartbeat, name="tierq-guard-heartbeat", daemon=True).start()
        return cancel

    def _heartbeat(self) -> None:
        """Every third of the lock's life: keep the held locks, and see which jobs were cancelled."""
        while True:
            time.sleep(self.lock_ttl_s / 3)
            with self._lock:
                held = list(self._held.items())
            if not held:
                continue
            try:
                pipe = self.client.pipeline(transaction=False)
                for key, (mark, _) in held:
                    pipe.pexpire(key, int(self.lock_ttl_s * 1000))
                    pipe.exists(mark)
                replies = pipe.execute()
            except redis.RedisError as exc:
                _log.warning("guard.heartbeat_failed", held=len(held), error=str(exc))
                continue
            for (_, (_, cancel)), cancelled in zip(held, replies[1::2], strict=True):
                if cancelled:
                    cancel.cancel()


def _holder(raw: bytes, fingerprint: str) -> str:
    """The fingerprint a claim holds. A claim written before claims held fingerprints (a timestamp)
    is taken as this request's: the job it names was submitted by a previous version."""
    holder = bytes(raw).decode(errors="replace")
    if holder.startswith("malformed:") or (
        len(holder) == 32 and all(c in "0123456789abcdef" for c in holder)
    ):
        return holder
    return fingerprint


def _parse(stored: object) -> JobResult | None:
    """A recorded result, or None when there is none (or it is not one: the job runs again)."""
    if not isinstance(stored, bytes | str) or not stored:
        return None
    try:
        return JobResult.from_json(json.loads(stored))
    except ValueError:
        return None
