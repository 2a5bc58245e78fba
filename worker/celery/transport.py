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

It also keeps one line on a queue from stopping the worker: kombu pops a message with ``BRPOP`` and
parses it before anything can catch an error, so a list entry that is not a kombu envelope (not
JSON, no ``properties``, a body that is not base64 ...) stopped the worker with "Unrecoverable
error" (and was lost). :meth:`Channel._brpop_read` hands such an entry to ``Channel.on_malformed``
(set by the worker's consumer to :func:`worker.celery.consumer.refuse`: dead letter, log line,
metric) and goes on; a producer's channel never consumes, so it needs none.
"""

from __future__ import annotations

from collections.abc import Callable
from queue import Empty
from typing import Any, ClassVar

import kombu.transport
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from tasks.message import bounded

__all__ = ["TRANSPORT", "Channel", "Transport", "use_for_redis_urls"]

#: the value of Celery's ``broker_transport`` that selects this module
TRANSPORT = "worker.celery.transport:Transport"


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with its synchronous client made once per connection pool."""

    _tierq_client: Any = None
    #: what to do with a list entry that is not a kombu message: ``(raw, reason, queue)``
    on_malformed: ClassVar[Callable[[bytes, str, str], object] | None] = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool
        client = self._tierq_client
        if client is None or client.connection_pool is not pool:
            client = self._tierq_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client

    def _brpop_read(self, **options: Any) -> bool:
        """kombu 5.7's ``Channel._brpop_read``, with a malformed list entry refused instead of raised."""
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next iteration will reconnect
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]  # type: ignore[no-untyped-call]
            self._queue_cycle.rotate(dest)
            self._deliver_entry(item, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7
            if flush is not None:
                flush()

    def _refuse(self, item: bytes, reason: str, queue: str) -> None:
        raw = item if isinstance(item, bytes) else str(item).encode()
        hook = type(self).on_malformed
        if hook is None:
            raise ValueError(reason)  # kombu's own behaviour: the error reaches the worker
        hook(raw, reason, queue)

    def _deliver_entry(self, item: bytes, queue: str) -> None:
        try:
            payload = loads(bytes_to_str(item))  # type: ignore[no-untyped-call]
        except Exception as exc:  # not JSON: nothing of it is trusted, not even an id
            self._refuse(item, f"envelope: not JSON ({type(exc).__name__})", queue)
            return
        if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict):
            self._refuse(item, "envelope: not a kombu message (no properties)", queue)
            return
        # the queue is the list the entry was popped from, whatever the sender wrote: the worker
        # checks a job's tier against it, and kombu restores an unacked message to it
        properties = payload["properties"]
        info = properties.get("delivery_info")
        properties["delivery_info"] = {**(info if isinstance(info, dict) else {}), "routing_key": queue}
        tag = properties.get("delivery_tag")
        try:
            self.connection._deliver(payload, queue)
        except self.connection_errors:
            raise
        except Exception as exc:  # kombu could not make a message of it (body encoding ...)
            if tag is not None and tag in self.qos._delivered:
                self.basic_ack(tag)  # type: ignore[no-untyped-call]
            self._refuse(item, f"envelope: {type(exc).__name__}: {bounded(str(exc))}", queue)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def use_for_redis_urls() -> None:
    """Make kombu resolve ``redis://`` URLs to :class:`Transport` in this process.

    Takes effect for connections made afterwards (kombu caches a resolved alias): call it before
    the first connection, as building tierq's Celery config does.
    """
    kombu.transport.TRANSPORT_ALIASES["redis"] = TRANSPORT
