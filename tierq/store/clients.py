"""Redis clients for tierq's own keys, in the result backend's Redis: made by whoever holds one."""

from __future__ import annotations

import redis

from tierq.core.settings import Settings

__all__ = ["SOCKET_TIMEOUT_S", "backend_redis"]

#: seconds a Redis command may take; token-stream readers block for at most 1 s per call
SOCKET_TIMEOUT_S = 5.0


def backend_redis(settings: Settings) -> redis.Redis | None:
    """A new client (thread-safe, pooled) for the result backend; None when the backend is not Redis.

    Build one per process (the worker's :class:`~tierq.runtime.context.Context`, a producer) and
    pass it on: each client keeps its own connection pool.
    """
    url = settings.backend_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        max_connections=settings.redis_max_connections,
    )
