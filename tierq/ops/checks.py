"""Checks a worker runs as it starts, and ``tierq doctor`` runs on demand: the broker's Redis.

The eviction policy is only ever a warning. The models are checked by :mod:`tierq.llm.models`.
"""

from __future__ import annotations

import redis

__all__ = ["redis_eviction_warning"]


def redis_eviction_warning(url: str, timeout_s: float = 2.0) -> str | None:
    """A warning when the broker's Redis may evict keys (queued jobs would vanish), else None.

    Redis that cannot be reached or that disables ``CONFIG`` (some managed services) is not
    reported: the worker starts anyway and connects when the broker answers.
    """
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError:
        return None
    finally:
        client.close()
    if policy in (None, "noeviction"):
        return None
    return (
        f"the broker's Redis has maxmemory-policy {policy}: under memory pressure it may evict queued "
        "jobs and results; set maxmemory-policy noeviction"
    )
