"""Every Redis key tierq itself writes, in one place (kombu's queues and Celery's result keys are theirs).

All of them live under ``TIERQ_KEY_PREFIX``, so several deployments, or a test run, can share a
database::

    <prefix>tierq:result:<job_id>      a finished job's result, for a redelivered message (guard)
    <prefix>tierq:running:<job_id>     the run lock an attempt holds while it runs (guard)
    <prefix>tierq:starts:<job_id>      how many times the job started (guard: poison)
    <prefix>tierq:submitted:<job_id>   a job id, claimed with its request's fingerprint by its first submit
    <prefix>tierq:cancel:<job_id>      a job cancelled by its producer (checked before and during a run)
    <prefix>tierq:tokens:<job_id>      a streamed job's text (Redis stream)
    <prefix>tierq:dlq                  dead letters by time (sorted set)
    <prefix>tierq:dlq:<job_id>         one dead letter (hash)
    <prefix>tierq:stats:jobs           recent jobs' figures for ``tierq stats`` (Redis stream)
    <prefix>tierq:recovered            deliveries of dead workers put back, per queue (hash; transport)
    <prefix>tierq:ratelimit:<model>    the model's shared rate-limit buckets and learned limits (hash)
    <prefix>tierq:fairshare:<tier>:<model>  each producer's recent grants, for its fair share (hash)
    <prefix>tierq:ratelimit-stats:<minute>  calls, 429s, waits, refusals and tokens of one minute (hash)

The transport's own keys (``tierq/celery/transport.py``) are named after kombu's, under the same
prefix: ``unacked:<queue>``, ``unacked_index:<queue>``, ``unacked_mutex:<queue>``,
``inflight:<queue>:<consumer>``, ``inflight_index:<queue>``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LEGACY_UNACKED_KEYS", "Keys", "in_flight_keys", "unacked_keys"]


@dataclass(frozen=True, slots=True)
class Keys:
    """The key names under one prefix."""

    prefix: str = ""

    def result(self, job_id: str) -> str:
        """A finished job's recorded result."""
        return f"{self.prefix}tierq:result:{job_id}"

    def running(self, job_id: str) -> str:
        """The run lock of a job's running attempt."""
        return f"{self.prefix}tierq:running:{job_id}"

    def rate_limit(self, model: str) -> str:
        """A model's shared rate-limit buckets (a hash)."""
        return f"{self.prefix}tierq:ratelimit:{model}"

    def fair_share(self, tier: str, model: str) -> str:
        """Each producer's recent grants of ``model`` on ``tier``, for their fair share (a hash)."""
        return f"{self.prefix}tierq:fairshare:{tier}:{model}"

    def rate_limit_stats(self, minute: int) -> str:
        """What the rate limit saw in one minute (``time() // 60``): counts per tier and model (a hash)."""
        return f"{self.prefix}tierq:ratelimit-stats:{minute}"

    def recovered(self) -> str:
        """How many deliveries of dead workers were put back on each queue (a hash)."""
        return f"{self.prefix}tierq:recovered"

    def starts(self, job_id: str) -> str:
        """How many times a job started."""
        return f"{self.prefix}tierq:starts:{job_id}"

    def submitted(self, job_id: str) -> str:
        """The claim on a caller-given job id."""
        return f"{self.prefix}tierq:submitted:{job_id}"

    def cancelled(self, job_id: str) -> str:
        """The mark of a job its producer cancelled."""
        return f"{self.prefix}tierq:cancel:{job_id}"

    def tokens(self, job_id: str) -> str:
        """A streamed job's text."""
        return f"{self.prefix}tierq:tokens:{job_id}"

    def dead_letter(self, job_id: str) -> str:
        """One dead letter."""
        return f"{self.prefix}tierq:dlq:{job_id}"

    @property
    def dead_letters(self) -> str:
        """The index of dead letters by time."""
        return f"{self.prefix}tierq:dlq"

    @property
    def stats(self) -> str:
        """The stream of recent jobs' figures."""
        return f"{self.prefix}tierq:stats:jobs"


#: kombu's own unacked keys (one namespace for every queue), read only to recover deliveries that
#: a version before leases left there
LEGACY_UNACKED_KEYS = ("unacked", "unacked_index", "unacked_mutex")


def in_flight_keys(queue: str, consumer: str) -> tuple[str, str]:
    """The list where ``consumer`` receives ``queue``'s entries (moved there atomically as they are
    popped, gone once recorded as unacknowledged), and the index of those lists' leases."""
    return f"inflight:{queue}:{consumer}", f"inflight_index:{queue}"


def unacked_keys(queue: str | None) -> tuple[str, str, str]:
    """The unacked hash, lease index and restore mutex of ``queue`` (None: kombu's shared ones).

    Each queue (tier) has its own: a worker restores only the queues it consumes, so restoring one
    tier never touches another's.
    """
    if queue is None:
        return LEGACY_UNACKED_KEYS
    return f"unacked:{queue}", f"unacked_index:{queue}", f"unacked_mutex:{queue}"
