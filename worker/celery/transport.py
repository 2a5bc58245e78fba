"""kombu's Redis transport, keeping one redis-py client per channel instead of making one per command.

kombu 5.7's Redis channel builds a new ``redis.Redis`` object for every command it sends outside
its consumer's BRPOP (each publish, each ack's pipeline, each unacked-index update): redis-py 8's
client constructor copies its response-callback table each time, which came to ~10% of a busy
worker's CPU (py-spy, docs/latency.md). A ``redis.Redis`` object is a thread-safe handle over the
channel's connection pool, so one per pool is enough; a new pool (after a reconnect or a fork)
gets a new client.

Used for ``redis://`` brokers: :func:`use_for_redis_urls` (called by :func:`worker.celery.app.make_app`)
points kombu's alias ``redis`` at it, so URLs, Celery and Flower still see the scheme ``redis``
(a ``broker_transport`` class path would show in every URL, and Flower's broker page knows brokers
by scheme). Everything else, including ``driver_type == "redis"`` that Celery checks, is kombu's.
"""

from __future__ import annotations

from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis

__all__ = ["TRANSPORT", "Channel", "Transport", "use_for_redis_urls"]

#: the value of Celery's ``broker_transport`` that selects this module
TRANSPORT = "worker.celery.transport:Transport"


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with its synchronous client made once per connection pool."""

    _tierq_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool
        client = self._tierq_client
        if client is None or client.connection_pool is not pool:
            client = self._tierq_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def use_for_redis_urls() -> None:
    """Make kombu resolve ``redis://`` URLs to :class:`Transport` in this process.

    Takes effect for connections made afterwards (kombu caches a resolved alias): call it before
    the first connection, as building tierq's Celery config does.
    """
    kombu.transport.TRANSPORT_ALIASES["redis"] = TRANSPORT
