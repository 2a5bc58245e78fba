"""The process's Redis client for tierq's own keys (stats, token streams), in the result backend's Redis."""

from __future__ import annotations

import threading

import redis

from worker.core.settings import Settings, get_settings

__all__ = ["backend_redis"]

#: seconds a Redis command may take; token-stream readers block for at most 1 s per call
SOCKET_TIMEOUT_S = 5.0

_clients: dict[str, redis.Redis] = {}
_lock = threading.Lock()


def backend_redis(settings: Settings | None = None) -> redis.Redis | None:
    """A client (shared by the process's threads) for the result backend, or None if it is not Redis."""
    settings = settings or get_settings()
    url = settings.backend_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.get(url)
            if client is None:
                client = redis.Redis.from_url(
                    url,
                    socket_timeout=SOCKET_TIMEOUT_S,
                    socket_connect_timeout=SOCKET_TIMEOUT_S,
                    max_connections=settings.redis_max_connections,
                )
                _clients[url] = client
    return client
