"""Jobs on their way through the Message Batches API, kept in Redis so that no worker holds them.

A batch tier's job is *parked* by the task that received it (its message is then acknowledged):
its record says everything needed to send it, answer it and retry it. A runner in any worker of the
tier *gathers* parked jobs into a batch, records the batch and its members, and only then submits
it; whoever holds the batch's lease polls it and fans its results out. A worker killed at any point
leaves records another picks up::

    <prefix>tierq:bulk:job:<job_id>        one parked job (JSON: :class:`Parked`)
    <prefix>tierq:bulk:pending:<tier>      parked jobs not yet in a batch, by when parked (sorted set)
    <prefix>tierq:bulk:sizes:<tier>        their requests' sizes in bytes (hash)
    <prefix>tierq:bulk:batch:<id>          one batch: its members, its API id once submitted (JSON)
    <prefix>tierq:bulk:due                 batches by when they are next submitted or polled (sorted set)
    <prefix>tierq:bulk:lease:<id>          the worker advancing a batch right now
    <prefix>tierq:bulk:lease:gather:<tier> the worker gathering a tier's jobs right now
    <prefix>tierq:bulk:api-ids             API batch ids already held by a record (set; so a lost
                                           create's batch is adopted by one record only)
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections import Counter
from typing import Literal, TypeVar

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tierq.contract.job import JobSpec
from tierq.contract.tiers import BatchPolicy
from tierq.store.keys import Keys
from tierq.store.scripts import lua

__all__ = ["BatchRecord", "BatchStore", "Parked", "custom_id_for"]

#: a parked job's record outlives its deadline by this much (its batch may end late)
JOB_TTL_MARGIN_S = 86_400
#: a batch's record expires if nobody touched it this long (a batch ends within 24 h)
BATCH_TTL_S = 3 * 86_400

#: ``custom_id`` (https://platform.claude.com/docs/en/api/messages/batches/create): 1 to 64
#: letters, digits, ``_`` or ``-``
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

#: job records read per round trip
_CHUNK = 256


def custom_id_for(job_id: str) -> str:
    """The job id itself when the API takes it as a ``custom_id``; else (dots, colons, over 64
    characters) a hash of it, which the batch's record maps back."""
    if _CUSTOM_ID.fullmatch(job_id):
        return job_id
    return "h-" + hashlib.sha256(job_id.encode()).hexdigest()[:40]


class Parked(BaseModel):
    """A job waiting for a batch, or in one: what its request and its result are made of."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: JobSpec
    tier: str
    queue: str | None
    model: str
    system: str
    max_tokens: int = Field(ge=1)
    effort: str | None = None
    #: the request's size as JSON, counted toward the batch's bytes
    size: int = Field(ge=0)
    enqueued_at: float | None
    first_started_at: float
    #: the job's absolute deadline (epoch seconds)
    deadline: float
    parked_at: float
    #: retries spent (earlier attempts, in batches or not)
    retries: int = Field(default=0, ge=0)
    #: the log context the job came with (its producer's, bounded), for its lines when its batch ends
    log_context: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def custom_id(self) -> str:
        return custom_id_for(self.spec.job_id)


class BatchRecord(BaseModel):
    """A batch as tierq knows it: recorded before it is submitted, deleted once its results are out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    tier: str
    #: custom_id → job id, every member
    members: dict[str, str]
    created_at: float
    #: ``gathered``: not submitted yet (or not known to be); ``submitted``: the API holds it
    status: Literal["gathered", "submitted"] = "gathered"
    #: the API's ``msgbatch_...`` id, once known
    api_id: str | None = None
    #: creates sent (a create whose answer was lost may have made the batch: look before sending again)
    submit_attempts: int = Field(default=0, ge=0)
    #: when the last create was sent
    attempted_at: float | None = None
    submitted_at: float | None = None
    polls: int = Field(default=0, ge=0)


class BatchStore:
    """Parked jobs and batch records under one key prefix."""

    def __init__(self, client: redis.Redis, key_prefix: str = "") -> None:
        self.client = client
        self.keys = Keys(key_prefix)
        self._park = client.register_script(lua("batch_park"))
        self._renew = client.register_script(lua("renew_if_owner"))
        self._unlock_script = client.register_script(lua("release_if_owner"))

    # --- keys --------------------------------------------------------------------------------------
    def _job(self, job_id: str) -> str:
        return f"{self.keys.prefix}tierq:bulk:job:{job_id}"

    def _pending(self, tier: str) -> str:
        return f"{self.keys.prefix}tierq:bulk:pending:{tier}"

    def _sizes(self, tier: str) -> str:
        return f"{self.keys.prefix}tierq:bulk:sizes:{tier}"

    @property
    def _api_ids(self) -> str:
        return f"{self.keys.prefix}tierq:bulk:api-ids"

    def _batch(self, batch_id: str) -> str:
        return f"{self.keys.prefix}tierq:bulk:batch:{batch_id}"

    @property
    def _due(self) -> str:
        return f"{self.keys.prefix}tierq:bulk:due"

    def _lease(self, name: str) -> str:
        return f"{self.keys.prefix}tierq:bulk:lease:{name}"

    # --- parked jobs -------------------------------------------------------------------------------
    def park(self, job: Parked, now: float | None = None) -> bool:
        """Park a job for its tier's next batch; False when it already is (parked, or in a batch)."""
        now = time.time() if now is None else now
        ttl = int(max(0.0, job.deadline - now) + JOB_TTL_MARGIN_S)
        added = self._park(
            keys=[self._job(job.job_id), self._pending(job.tier), self._sizes(job.tier)],
            args=[job.model_dump_json(), ttl, job.parked_at, job.job_id, job.size],
        )
        return bool(added)

    def repark(self, job: Parked) -> None:
        """Put a job back among its tier's parked ones (its batch ended without its answer)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._job(job.job_id), job.model_dump_json(), keepttl=True)
        pipe.zadd(self._pending(job.tier), {job.job_id: job.parked_at})
        pipe.hset(self._sizes(job.tier), job.job_id, job.size)
        pipe.execute()

    def parked(self, job_ids: list[str]) -> dict[str, Parked]:
        """The records of these jobs that still exist (a missing one was answered, or expired)."""
        out: dict[str, Parked] = {}
        for start in range(0, len(job_ids), _CHUNK):
            chunk = job_ids[start : start + _CHUNK]
            for job_id, raw in zip(chunk, self.client.mget([self._job(j) for j in chunk]), strict=True):
                job = _parse(raw, Parked)
                if job is not None:
                    out[job_id] = job
        return out

    def done(self, job_id: str) -> None:
        """A job's batch answered it for good: its record goes."""
        self.client.delete(self._job(job_id))

    def pending_count(self, tier: str) -> int:
        """Jobs parked for ``tier`` and not yet in a batch."""
        return int(self.client.zcard(self._pending(tier)))

    # --- gathering ---------------------------------------------------------------------------------
    def gather(self, tier: str, policy: BatchPolicy, now: float | None = None) -> BatchRecord | None:
        """Make a batch of ``tier``'s parked jobs if it is time (``policy``: by count, bytes and the
        oldest's age), record it with its members and mark it due; None when it is not time, or
        another worker is gathering this tier."""
        now = time.time() if now is None else now
        lock = self._lease(f"gather:{tier}")
        token = uuid.uuid4().hex
        if not self.client.set(lock, token, nx=True, px=30_000):
            return None
        try:
            return self._gather(tier, policy, now)
        finally:
            self._unlock(lock, token)

    def _gather(self, tier: str, policy: BatchPolicy, now: float) -> BatchRecord | None:
        pending, sizes = self._pending(tier), self._sizes(tier)
        entries: list[tuple[bytes, float]] = self.client.zrange(
            pending, 0, policy.max_requests - 1, withscores=True
        )  # type: ignore[assignment]
        if not entries:
            return None
        ids = [member.decode() for member, _ in entries]
        chosen: list[str] = []
        total = 0
        for job_id, raw in zip(ids, self.client.hmget(sizes, ids), strict=True):
            size = int(raw) if raw is not None else 0
            if chosen and total + size > policy.max_bytes:
                break
            chosen.append(job_id)
            total += size
        oldest = min(float(score) for _, score in entries)
        full = len(chosen) >= policy.max_requests or len(chosen) < len(ids) or total >= policy.max_bytes
        if not full and now - oldest < policy.max_age_s:
            return None
        record = BatchRecord(
            id=f"tqb_{uuid.uuid4().hex}",
            tier=tier,
            members={custom_id_for(job_id): job_id for job_id in chosen},
            created_at=now,
        )
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._batch(record.id), record.model_dump_json(), ex=BATCH_TTL_S)
        pipe.zadd(self._due, {record.id: now})
        pipe.zrem(pending, *chosen)
        pipe.hdel(sizes, *chosen)
        pipe.execute()
        return record

    # --- batches -----------------------------------------------------------------------------------
    def due(self, now: float | None = None, limit: int = 16) -> list[str]:
        """Batches due to be submitted or polled, oldest due first."""
        now = time.time() if now is None else now
        due: list[bytes] = self.client.zrangebyscore(self._due, "-inf", now, start=0, num=limit)  # type: ignore[assignment]
        return [b.decode() for b in due]

    def next_due(self) -> float | None:
        """When the next batch is due (epoch seconds), None if there is none."""
        first: list[tuple[bytes, float]] = self.client.zrange(self._due, 0, 0, withscores=True)  # type: ignore[assignment]
        return float(first[0][1]) if first else None

    def in_flight_jobs(self) -> Counter[str]:
        """Jobs in batches recorded and not yet answered, by tier (``tierq stats``)."""
        ids: list[bytes] = self.client.zrange(self._due, 0, -1)  # type: ignore[assignment]
        jobs: Counter[str] = Counter()
        for start in range(0, len(ids), 500):
            chunk = [self._batch(i.decode()) for i in ids[start : start + 500]]
            for raw in self.client.mget(chunk):
                record = _parse(raw, BatchRecord)
                if record is not None:
                    jobs[record.tier] += len(record.members)
        return jobs

    def lease(self, batch_id: str, ttl_s: float) -> str | None:
        """Take the batch for ``ttl_s`` seconds: a token to :meth:`release` it with, or None when
        another worker holds it."""
        token = uuid.uuid4().hex
        if self.client.set(self._lease(batch_id), token, nx=True, px=int(ttl_s * 1000)):
            return token
        return None

    def renew(self, batch_id: str, token: str, ttl_s: float) -> bool:
        """Keep holding the batch; False when the lease was lost (it lapsed, another took it)."""
        return bool(self._renew(keys=[self._lease(batch_id)], args=[token, int(ttl_s * 1000)]))

    def release(self, batch_id: str, token: str) -> None:
        self._unlock(self._lease(batch_id), token)

    def claim_api_id(self, api_id: str) -> bool:
        """Mark an API batch as held by a record; False when one already holds it."""
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(self._api_ids, api_id)
        pipe.expire(self._api_ids, BATCH_TTL_S)
        added, _ = pipe.execute()
        return bool(added)

    def drop_api_id(self, api_id: str) -> None:
        self.client.srem(self._api_ids, api_id)

    def load(self, batch_id: str) -> BatchRecord | None:
        """A batch's record; None (and off the schedule) when it is gone."""
        record = _parse(self.client.get(self._batch(batch_id)), BatchRecord)
        if record is None:
            self.client.zrem(self._due, batch_id)
        return record

    def save(self, record: BatchRecord, due_at: float) -> None:
        """Record a batch's new state and when it is next due."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._batch(record.id), record.model_dump_json(), ex=BATCH_TTL_S)
        pipe.zadd(self._due, {record.id: due_at})
        pipe.execute()

    def close(self, record: BatchRecord) -> None:
        """A batch whose every member was answered: its record goes."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._batch(record.id))
        pipe.zrem(self._due, record.id)
        if record.api_id is not None:
            pipe.srem(self._api_ids, record.api_id)
        pipe.execute()

    def _unlock(self, key: str, token: str) -> None:
        self._unlock_script(keys=[key], args=[token])


_M = TypeVar("_M", bound=BaseModel)


def _parse(raw: object, model: type[_M]) -> _M | None:
    if not isinstance(raw, bytes | str) or not raw:
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        return None
