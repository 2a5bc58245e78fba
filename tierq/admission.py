"""Admission at submit: a job that could not start before its deadline is refused, not enqueued.

A job is predicted to start when both of these allow it:

- **the shared rate limit** (:mod:`tierq.store.ratelimit`): the model's buckets must hold, above
  the floor its tier leaves for more urgent tiers, one request and the input of every job queued
  ahead of it and of itself, and its own ``max_tokens`` of output; and the appointments its
  producer's jobs already hold (jobs sent back to wait for capacity) must have come round. The
  jobs ahead count at their requests and input only: their output is charged at ``max_tokens``
  too but mostly given back, so counting it would refuse jobs that would run. A 429's hold counts in full;
- **the tier's queue**: the jobs queued ahead, over the calls per second the tier's workers made
  in the last minute or two (``LimiterStats.flow``), but only while the tier is saturated: its
  jobs' mean queue wait is at least :data:`SATURATED_S`. Below that the workers take what comes
  as it comes, their calls per second measure the demand rather than what they could do, and a
  burst after a quiet spell must not be refused for it. With no recent calls (the workers are
  starting, scaled to zero or away) the queue cannot be predicted and does not refuse.

When that start, plus :data:`MIN_RUN_S` for the call itself (half the job's time, for a deadline
shorter than twice that), is past the job's deadline,
:meth:`Admission.check` raises :class:`~tierq.contract.errors.DeadlineUnmeetableError` (the HTTP API answers
429 with ``Retry-After``). Both readings are kept for :data:`SNAPSHOT_S` per tier, with the jobs
this process admitted since added to the queue, so a burst of submits costs one broker and one Redis
round trip per tier and fraction of a second, not one per job. Anything unreadable admits the job:
admission only refuses what it can tell will expire.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import suppress
from dataclasses import dataclass

import redis
from celery import Celery

from tierq.contract.errors import DeadlineUnmeetableError
from tierq.contract.tiers import Tier, TierTable
from tierq.core.tokens import estimate_tokens
from tierq.store.ratelimit import (
    FairShare,
    LimiterStats,
    ModelState,
    SharedRateLimiter,
    TierFlow,
)

__all__ = ["MIN_RUN_S", "SATURATED_S", "SNAPSHOT_S", "Admission", "Prediction"]

#: seconds of its deadline a job needs once started (the call itself), as a retry does
MIN_RUN_S = 1.0
#: seconds a tier's readings (queue depth, buckets, calls per second) are reused
SNAPSHOT_S = 0.5
#: mean queue wait (seconds) from which a tier counts as saturated: its calls per second are then
#: what its workers can do, and the queue ahead predicts the wait
SATURATED_S = 1.0
#: (tier, producer) readings kept at most
MAX_SNAPSHOTS = 1024
#: seconds to wait for a broker connection of the pool to read a queue's depth
DEPTH_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Prediction:
    """When a job would start, and why."""

    #: seconds from now
    start_s: float
    #: what sets it: "rate limit", "queue" or "none"
    cause: str
    #: jobs queued ahead of it
    ahead: int


@dataclass(slots=True)
class _Snapshot:
    at: float
    depth: int | None
    state: ModelState | None
    flow: TierFlow | None
    #: jobs this process admitted to the tier since the snapshot was read
    admitted: int = 0


class Admission:
    """Predicts each job's start from its tier's queue and its model's shared rate limit."""

    def __init__(
        self,
        app: Celery,
        tiers: TierTable,
        limiter: SharedRateLimiter | None,
        stats: LimiterStats | None,
    ) -> None:
        self.app = app
        self.tiers = tiers
        self.limiter = limiter
        self.stats = stats
        self._snapshots: dict[tuple[str, str | None], _Snapshot] = {}
        self._lock = threading.Lock()

    def check(
        self, tier: Tier, chars: int, max_tokens: int, allowed_s: float, producer: str | None = None
    ) -> Prediction:
        """Admit a job of ``chars`` prompt characters and ``max_tokens`` with ``allowed_s`` until its
        deadline, and count it as queued; raise when it would start too late to finish.

        Raises:
            DeadlineUnmeetableError: it is predicted to start less than :data:`MIN_RUN_S` (or half
                its time) before its deadline (``retry_after``: how much later the same job would fit).
        """
        snapshot = self._snapshot(tier, producer)
        prediction = self.predict(tier, snapshot, estimate_tokens(chars), max_tokens)
        # the call needs MIN_RUN_S, or half the job's time when its deadline is shorter than that
        late_s = prediction.start_s + min(MIN_RUN_S, allowed_s / 2) - allowed_s
        if late_s > 0:
            if self.limiter is not None:
                with suppress(redis.RedisError):
                    self.limiter.count(tier.name, "refused")
            raise DeadlineUnmeetableError(
                f"the {tier.name} tier could not start this job before its deadline: predicted start in "
                f"{prediction.start_s:.1f} s ({prediction.cause}, {prediction.ahead} jobs queued ahead), "
                f"deadline in {allowed_s:.1f} s; nothing was enqueued",
                retry_after=float(max(1, math.ceil(late_s))),
                predicted_start_s=round(prediction.start_s, 3),
            )
        with self._lock:
            snapshot.admitted += 1
        return prediction

    def refresh(self) -> None:
        """Drop the readings kept: the next check of every tier reads afresh."""
        with self._lock:
            self._snapshots.clear()

    def predict(self, tier: Tier, snapshot: _Snapshot, input_tokens: int, max_tokens: int) -> Prediction:
        """When a job would start, from ``snapshot``."""
        ahead = (snapshot.depth or 0) + snapshot.admitted
        limit_s = 0.0
        if snapshot.state is not None:
            needs = (float(ahead + 1), float((ahead + 1) * input_tokens), float(max_tokens))
            limit_s = snapshot.state.wait_s(needs, self.tiers.floor(tier, tier.model))
        flow = snapshot.flow
        saturated = flow is not None and flow.queue_wait_s is not None and flow.queue_wait_s >= SATURATED_S
        queue_s = ahead / flow.calls_per_s if saturated and flow and flow.calls_per_s else 0.0
        if limit_s <= 0 and queue_s <= 0:
            return Prediction(0.0, "none", ahead)
        if limit_s >= queue_s:
            return Prediction(limit_s, "rate limit", ahead)
        return Prediction(queue_s, "queue", ahead)

    def _snapshot(self, tier: Tier, producer: str | None) -> _Snapshot:
        now = time.monotonic()
        key = (tier.name, producer)
        with self._lock:
            current = self._snapshots.get(key)
            if current is not None and now - current.at < SNAPSHOT_S:
                return current
        fresh = _Snapshot(now, self._depth(tier), self._state(tier, producer), self._flow(tier))
        with self._lock:
            if len(self._snapshots) >= MAX_SNAPSHOTS:  # producer ids are the caller's: bounded
                self._snapshots.clear()
            self._snapshots[key] = fresh
        return fresh

    def _depth(self, tier: Tier) -> int | None:
        """Messages waiting on the tier's queue (priority sub-lists included), or None if unreadable."""
        try:
            with self.app.pool.acquire(block=True, timeout=DEPTH_TIMEOUT_S) as conn:
                channel = conn.channel()
                try:
                    # kombu's virtual transports (Redis): a passive declare checks the lists with
                    # EXISTS, which kombu does not prefix with the deployment's key prefix (it
                    # answers NOT_FOUND); the lists' lengths (LLEN, prefixed) are what it would count
                    size = getattr(channel, "_size", None)
                    if size is not None:
                        return int(size(tier.queue))
                    return int(channel.queue_declare(tier.queue, passive=True).message_count)
                except conn.channel_errors:
                    return 0  # never declared (nothing was ever sent to it): nothing waits
                finally:
                    with suppress(*conn.channel_errors, *conn.connection_errors):
                        channel.close()
        except Exception:  # an unreadable queue admits the job: the publish will tell
            return None

    def _state(self, tier: Tier, producer: str | None) -> ModelState | None:
        if self.limiter is None:
            return None
        try:
            floor = self.tiers.floor(tier, tier.model)
            return self.limiter.peek(tier.model, floor, FairShare(tier.name, producer))
        except redis.RedisError:
            return None

    def _flow(self, tier: Tier) -> TierFlow | None:
        if self.stats is None:
            return None
        try:
            return self.stats.flow(tier.name)
        except redis.RedisError:
            return None
