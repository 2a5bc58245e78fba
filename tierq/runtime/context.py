"""What a worker process runs with: built once as the process starts, passed to every job.

Nothing below this layer reads the environment or keeps a process-wide client: settings, the
tier table, the result backend's Redis (with the run guard, dead letters and stats on it) and the
way to the model (both SDK clients and the event loop) all come from here. Reconfiguring means
building another :class:`Context`, never editing the environment.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from tierq.contract.tiers import TierTable, load_tier_table
from tierq.core.settings import Settings
from tierq.llm.caching import CachePlanner
from tierq.llm.client import LLM
from tierq.store.batches import BatchStore
from tierq.store.clients import backend_redis
from tierq.store.deadletter import DeadLetterStore
from tierq.store.guard import RunGuard
from tierq.store.ratelimit import SharedRateLimiter
from tierq.store.stats import StatsStream

__all__ = ["Context"]


@dataclass
class Context:
    """One worker process's settings, tiers and clients."""

    settings: Settings
    tiers: TierTable
    llm: LLM
    #: the result backend's Redis; None (and the three below with it) when the backend is not Redis
    redis: redis.Redis | None
    guard: RunGuard | None
    dead_letters: DeadLetterStore | None
    stats: StatsStream | None
    #: the deployment's shared rate limit per model; None without a Redis backend or when turned off
    limiter: SharedRateLimiter | None = None
    #: batch tiers' parked jobs and batches; None without a Redis backend
    batches: BatchStore | None = None
    #: sets requests' prompt-cache breakpoints; None when ``prompt_cache`` is off
    cache: CachePlanner | None = None

    @classmethod
    def build(cls, settings: Settings, tiers: TierTable | None = None) -> Context:
        """Everything a job needs, from ``settings`` (the tier table from its tiers file unless given)."""
        client = backend_redis(settings)
        prefix = settings.key_prefix
        return cls(
            settings=settings,
            tiers=tiers if tiers is not None else load_tier_table(settings.tiers_file),
            llm=LLM(settings),
            redis=client,
            guard=None if client is None else RunGuard(client, prefix, settings.lease_s),
            dead_letters=None if client is None else DeadLetterStore(client, prefix),
            stats=None if client is None else StatsStream(client, prefix, settings.stats_maxlen),
            limiter=SharedRateLimiter.from_settings(client, settings),
            batches=None if client is None else BatchStore(client, prefix),
            cache=CachePlanner() if settings.prompt_cache else None,
        )

    def close(self) -> None:
        """Stop the event loop and close the clients (as the process exits)."""
        self.llm.close()
        if self.redis is not None:
            self.redis.close()
