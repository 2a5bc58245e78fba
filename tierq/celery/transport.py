"""kombu's Redis transport, keeping one redis-py client per channel instead of making one per command.

kombu 5.7's Redis channel builds a new ``redis.Redis`` object for every command it sends outside
its consumer's BRPOP (each publish, each ack's pipeline, each unacked-index update): redis-py 8's
client constructor copies its response-callback table each time, which came to ~10% of a busy
worker's CPU (py-spy, docs/latency.md). A ``redis.Redis`` object is a thread-safe handle over the
channel's connection pool, so one per pool is enough; a new pool (after a reconnect or a fork)
gets a new client.

Used for ``redis://`` and ``rediss://`` brokers: :func:`use_for_redis_urls` (called by
:func:`tierq.celery.app.make_app`) points kombu's aliases ``redis`` and ``rediss`` at it, so URLs,
Celery and Flower still see their scheme (a ``broker_transport`` class path would show in every URL,
and Flower's broker page knows brokers by scheme). Everything else, including
``driver_type == "redis"`` that Celery checks, is kombu's.

It also keeps one line on a queue from stopping the worker: kombu pops a message with ``BRPOP`` and
parses it before anything can catch an error, so a list entry that is not a kombu envelope (not
JSON, no ``properties``, a body that is not base64 ...) stopped the worker with "Unrecoverable
error" (and was lost). :meth:`Channel._brpop_read` hands such an entry to ``Channel.on_malformed``
(set by the worker's consumer to :func:`tierq.celery.consumer.refuse`: dead letter, log line,
metric) and goes on; a producer's channel never consumes, so it needs none.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from queue import Empty
from typing import Any, ClassVar

import kombu.transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from tierq.contract.message import bounded
from tierq.core.settings import DEFAULT_LEASE_S
from tierq.observe.logging import get_logger
from tierq.observe.metrics import observe_recovered
from tierq.store.keys import Keys, in_flight_keys, unacked_keys
from tierq.store.scripts import lua

__all__ = ["TRANSPORT", "Channel", "LeasedQoS", "Poller", "Transport", "use_for_redis_urls"]

_log = get_logger("tierq.transport")

#: the value of Celery's ``broker_transport`` that selects this module
TRANSPORT = "tierq.celery.transport:Transport"


# ---------------------------------------------------------------------------------------------
# leases: a dead worker's deliveries come back in seconds, a live one's never
# ---------------------------------------------------------------------------------------------

#: seconds after its last renewal that a dead consumer's in-flight list stops being watched. Not at
#: once: a consumer that stalled past its lease (swap, memory pressure just before an OOM kill) may
#: still move one more entry into its list before it dies, and only its index entry leads there
IN_FLIGHT_FORGET_S = 600
#: returns a lapsed consumer's in-flight entries to the head of their queue; forgets the consumer
#: (ARGV[2] == "1") once it lapsed IN_FLIGHT_FORGET_S ago and nothing was left
_RETURN_IN_FLIGHT = """
local moved = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'RIGHT') do moved = moved + 1 end
if ARGV[2] == '1' and moved == 0 then redis.call('ZREM', KEYS[3], ARGV[1]) end
return moved
"""
#: moves a queue's priority sub-lists to the back of the queue (a consumer that moves entries
#: atomically reads one list only; tierq sends no priorities, a foreign sender may)
_FLATTEN = """
local moved = 0
for i = 2, #KEYS do
  while redis.call('LMOVE', KEYS[i], KEYS[1], 'RIGHT', 'LEFT') do moved = moved + 1 end
end
return moved
"""


class LeasedQoS(kombu_redis.QoS):
    """kombu's Redis ack emulation with a lease per delivery, kept alive by its worker.

    kombu keeps each unacknowledged delivery in a hash and scores it with its delivery time in a
    sorted set; any worker restores the ones older than the visibility timeout, which must outlast
    the slowest job (40 minutes here), so a killed worker's jobs waited that long. Here the score is
    a lease: a thread of the worker that holds the delivery renews it every ``lease_s / 3`` seconds
    while it is unacknowledged, however long the job runs; a worker of the same queue restores
    deliveries whose lease was not renewed for ``lease_s`` (their worker is dead), scanning every
    ``unacked_restore_interval`` seconds, as Sidekiq Pro's super_fetch does. Each queue has its own
    hash, index and mutex (:func:`unacked_keys`).

    A worker that has just (re)connected does not restore anything for ``lease_s``: after a Redis
    outage every lease looks lapsed until the live workers have renewed theirs.

    Leases are scored and compared with Redis's clock (``TIME``, in :file:`lease_stamp.lua`), never a
    worker's: hosts whose clocks disagree by more than a lease still agree on which lapsed.

    The QoS talks to Redis through a client of its own, on the pool its channel had when the QoS was
    made, so it outlives the channel: when the broker connection breaks, Celery's consumer closes
    the channel and starts another, while the jobs this QoS holds go on running. kombu would put
    them back on their queue as the channel closes (another worker would pay for them again) and,
    with the connection gone, failed doing so ("Unrecoverable error": the worker stopped consuming).
    Here they stay leased: renewed by this QoS once Redis answers again and acknowledged when they
    end, or, if this worker dies meanwhile, restored by another one once their lease lapsed.

    A consumer of one queue does not ``BRPOP``: Redis would drop the entry as it replies, and a worker
    killed while reading the reply (an OOM kill lands there: a large message is being allocated)
    loses it. It moves the entry (``BLMOVE``) into a list of its own (:func:`in_flight_keys`), leased like
    its deliveries, and removes it from there in the same round trip that records it unacknowledged;
    a dead consumer's list goes back to the queue.
    """

    #: kombu puts a closing channel's unacknowledged deliveries back on their queue; here they stay
    #: leased (see :meth:`restore_unacked`)
    restore_at_shutdown = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        #: delivery tag → its queue, for the deliveries this channel holds unacknowledged
        self._leases: dict[str, str] = {}
        #: monotonic time since which renewals have succeeded without a break (None: not yet)
        self._connected_since: float | None = None
        self._keeper: threading.Thread | None = None
        #: deliveries of dead workers this channel put back on their queue
        self.recovered = 0
        #: this consumer's name in in-flight lists
        self.consumer = uuid.uuid4().hex[:16]
        #: queues this channel moves entries from (their in-flight lists are leased)
        self.moving: set[str] = set()
        self._redis: Any = None

    def client(self) -> Any:
        """A client on the pool this channel had first (kombu's key prefix applied): it outlives the
        channel, so held deliveries can be renewed and acknowledged after the connection broke."""
        if self._redis is None:
            self._redis = self.channel.Client(connection_pool=self.channel.pool)
        return self._redis

    def stamp(self, pipe: Any, index_key: str, members: list[str], renew: bool = False) -> None:
        """Score ``members`` of a lease index with Redis's clock (in ``pipe``, or at once)."""
        key = self.channel.prefixed(index_key)
        pipe.execute_command("EVAL", lua("lease_stamp"), 1, key, "XX" if renew else "-", *members)

    def redis_now(self, client: Any) -> float:
        """Redis's clock, in seconds: what leases are scored and compared with."""
        seconds, micros = client.time()
        return float(seconds) + float(micros) / 1_000_000

    @property
    def lease_s(self) -> float:
        return float(getattr(self.channel, "lease_s", DEFAULT_LEASE_S))

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        exchange, queue = delivery["exchange"], delivery["routing_key"]
        hash_key, index_key, _ = unacked_keys(queue)
        received = self.channel.take_in_flight()
        with self.client().pipeline() as pipe:
            self.stamp(pipe, index_key, [delivery_tag])
            pipe.hset(hash_key, delivery_tag, dumps([message._raw, exchange, queue]))  # type: ignore[no-untyped-call]
            if received is not None:  # recorded: out of the in-flight list in the same round trip
                pipe.lrem(self.channel.prefixed(in_flight_keys(*received[:2])[0]), 1, received[2])
            pipe.execute()
        self._leases[delivery_tag] = queue
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
        self._keep_leases()

    def ack(self, delivery_tag: str) -> None:
        self._remove_from_indices(delivery_tag, queue=self._leases.pop(delivery_tag, None)).execute()
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        queue = self._leases.pop(delivery_tag, None)
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True, queue=queue)
        else:
            self._remove_from_indices(delivery_tag, queue=queue).execute()
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def restore_unacked(self, client: Any = None) -> list[Any]:
        """kombu calls this as the channel closes (a broken connection, a shutdown): the deliveries
        stay leased instead. A job still running is acknowledged when it ends; one this worker no
        longer runs is restored by a live worker once its lease lapsed (``lease_s`` after this
        process stopped renewing it)."""
        if self._delivered:
            _log.info("delivery.kept_leased", held=len(self._delivered))
        return []

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None, queue: str | None = None) -> Any:
        hash_key, index_key, _ = unacked_keys(queue)
        if pipe is None:
            pipe = self.client().pipeline()
        return pipe.zrem(index_key, delivery_tag).hdel(hash_key, delivery_tag)

    def restore_by_tag(
        self, tag: str, client: Any = None, leftmost: bool = False, queue: str | None = None
    ) -> None:
        hash_key = unacked_keys(queue)[0]

        def restore_transaction(pipe: Any) -> None:
            raw = pipe.hget(hash_key, tag)
            pipe.multi()
            self._remove_from_indices(tag, pipe, queue=queue)
            if raw:
                message, exchange, routing_key = loads(bytes_to_str(raw))  # type: ignore[no-untyped-call]
                self.channel._do_restore_message(message, exchange, routing_key, pipe, leftmost)

        (client or self.client()).transaction(restore_transaction, hash_key)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """Put back the deliveries of this channel's queues whose lease lapsed (their worker died).

        Called by kombu every ``unacked_restore_interval`` seconds. Also restores what kombu's
        shared keys still hold past the old visibility timeout (left by a version before leases).
        """
        since = self._connected_since
        if since is None or time.monotonic() - since < self.lease_s:
            return  # not sure yet that a lapsed lease means a dead worker
        queues: list[str | None] = sorted(self.channel.active_queues)
        client = self.client()
        now = self.redis_now(client)
        for queue in queues:
            self._restore_lapsed(client, queue, now - self.lease_s, num)
        for queue in sorted(self.moving):
            self._return_in_flight(client, queue, now - self.lease_s, now)
        legacy_s = getattr(self.channel, "visibility_timeout", None)
        if legacy_s:  # kombu's own shared keys, scored with its workers' clocks
            self._restore_lapsed(client, None, time.time() - float(legacy_s), num)

    def _restore_lapsed(self, client: Any, queue: str | None, ceil: float, num: int | None) -> None:
        _, index_key, mutex_key = unacked_keys(queue)

        def lapsed() -> list[Any]:
            found = client.zrange(
                index_key, ceil, 0, desc=True, byscore=True, offset=0 if num else None, num=num or None
            )
            return list(found or [])

        if not lapsed():  # the usual scan: one read, no mutex to take and give back
            return
        try:
            with kombu_redis.Mutex(client, mutex_key, self.channel.unacked_mutex_expire):
                for tag in lapsed():
                    tag = bytes_to_str(tag)  # type: ignore[no-untyped-call]
                    if tag in self._leases:
                        continue  # ours: alive (a renewal is late, not lost)
                    self.restore_by_tag(tag, client, queue=queue)
                    self._count_recovered(client, queue or "unacked", 1)
                    _log.warning("delivery.recovered", queue=queue or "unacked", delivery_tag=tag)
        except kombu_redis.MutexHeld:
            pass

    def _return_in_flight(self, client: Any, queue: str, ceil: float, now: float) -> None:
        """Return the in-flight lists of ``queue``'s dead consumers to it; move its priority
        sub-lists to its back (this consumer reads the queue's own list only)."""
        prefixed = self.channel.prefixed
        _, index_key = in_flight_keys(queue, self.consumer)
        forget_before = now - IN_FLIGHT_FORGET_S
        for raw, renewed in client.zrange(index_key, ceil, 0, desc=True, byscore=True, withscores=True) or []:
            consumer = bytes_to_str(raw)  # type: ignore[no-untyped-call]
            if consumer == self.consumer:
                continue
            lists = (in_flight_keys(queue, consumer)[0], queue, index_key)
            forget = "1" if renewed < forget_before else "0"
            moved = int(
                client.execute_command("EVAL", _RETURN_IN_FLIGHT, 3, *map(prefixed, lists), consumer, forget)
            )
            if moved:
                self._count_recovered(client, queue, moved)
                _log.warning("delivery.recovered", queue=queue, in_flight=moved)
        subs = [self.channel._q_for_pri(queue, p) for p in self.channel.priority_steps]
        subs = [name for name in subs if name != queue]
        if subs:
            client.execute_command("EVAL", _FLATTEN, 1 + len(subs), *map(prefixed, [queue, *subs]))

    def _count_recovered(self, client: Any, queue: str, count: int) -> None:
        self.recovered += count
        observe_recovered(queue, count)
        key = Keys(self.channel.global_keyprefix or "").recovered()
        client.execute_command("HINCRBY", key, queue, count)

    def _keep_leases(self) -> None:
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._renew_forever, name="tierq-leases", daemon=True)
            self._keeper.start()

    def start_keeping(self) -> None:
        """Renew this channel's leases from now on (as it starts consuming)."""
        self._keep_leases()

    def renew(self) -> None:
        """Renew the lease of every delivery this channel holds (one round trip)."""
        held = list(self._leases.items())
        by_queue: dict[str, list[str]] = {}
        for tag, queue in held:
            by_queue.setdefault(queue, []).append(tag)
        pipe = self.client().pipeline(transaction=False)
        pipe.ping()
        for queue, tags in by_queue.items():
            self.stamp(pipe, unacked_keys(queue)[1], tags, renew=True)
        for queue in list(self.moving):
            self.stamp(pipe, in_flight_keys(queue, self.consumer)[1], [self.consumer])
        pipe.execute()

    def _renew_forever(self) -> None:
        while not (self.channel.closed and not self._leases):
            try:
                self.renew()
            except Exception as exc:  # Redis away: the leases lapse unless it comes back in time
                if self._connected_since is not None:
                    _log.warning(
                        "delivery.lease_renewal_failed", held=len(self._leases), error=bounded(str(exc))
                    )
                self._connected_since = None
            else:
                if self._connected_since is None:
                    self._connected_since = time.monotonic()
            time.sleep(self.lease_s / 3)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with its synchronous client made once per connection pool, and leased
    deliveries (:class:`LeasedQoS`)."""

    QoS = LeasedQoS
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "lease_s")  # type: ignore[assignment]
    #: seconds a delivery's lease outlives its worker's last renewal
    lease_s: float = DEFAULT_LEASE_S
    _tierq_client: Any = None
    #: the queue whose entry the pending blocking read moves (None: a BRPOP of several queues)
    _moving_from: str | None = None
    #: (queue, consumer, entry) moved to this consumer's in-flight list and not yet recorded
    _in_flight: tuple[str, str, bytes] | None = None
    #: whether the server has LMOVE/BLMOVE (Redis 6.2); None until asked
    _can_move: bool | None = None
    #: queues consumed with acknowledgements (only those are moved into in-flight lists and leased)
    _acked_queues: frozenset[str] = frozenset()

    def prefixed(self, key: str) -> str:
        """``key`` with the deployment's key prefix, for commands kombu does not prefix."""
        return f"{self.global_keyprefix or ''}{key}"

    def take_in_flight(self) -> tuple[str, str, bytes] | None:
        """The entry being delivered, if it came through this consumer's in-flight list; the caller
        removes it from there."""
        received, self._in_flight = self._in_flight, None
        return received

    def _single_queue(self) -> str | None:
        queues = self.active_queues
        if len(queues) != 1 or next(iter(queues)) not in self._acked_queues:
            return None
        if self._can_move is None:
            try:
                with self.conn_or_acquire() as client:
                    version = str(client.info("server").get("redis_version", "6.2"))
            except self.connection_errors:
                raise
            except Exception:  # INFO refused (some managed services): Redis 6.2 is from 2021
                version = "6.2"
            self._can_move = tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) >= (6, 2)
            if not self._can_move:  # kombu's BRPOP: a worker killed mid-read may lose that message
                _log.warning("transport.no_blmove", redis_version=version)
        return next(iter(queues)) if self._can_move else None

    def _brpop_start(self, timeout: float | None = None) -> None:
        """kombu 5.7's ``_brpop_start``; a consumer of one queue moves the entry instead (BLMOVE)."""
        queue = self._single_queue()
        self._moving_from = queue
        if queue is None:
            super()._brpop_start(timeout)  # type: ignore[no-untyped-call]
            return
        qos: LeasedQoS = self.qos
        if queue not in qos.moving:  # leased before the first entry can land in the list
            qos.stamp(qos.client(), in_flight_keys(queue, qos.consumer)[1], [qos.consumer])
            qos.moving.add(queue)
        in_flight = in_flight_keys(queue, qos.consumer)[0]
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        wait = self.brpop_timeout if timeout is None else timeout
        command = ("BLMOVE", self.prefixed(queue), self.prefixed(in_flight), "RIGHT", "LEFT", wait or 0)
        self.client.connection.send_command(*command)

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

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        tag = super().basic_consume(queue, no_ack, *args, **kwargs)  # type: ignore[no-untyped-call]
        if not no_ack:  # a worker's queue (a control client's replies are not acknowledged)
            self._acked_queues = self._acked_queues | {queue}
            self.qos.start_keeping()
        return tag

    def _restore(self, message: Any, leftmost: bool = False) -> None:
        queue = message.delivery_info.get("routing_key")
        self.qos.restore_by_tag(message.delivery_tag, leftmost=leftmost, queue=queue)

    def _brpop_read(self, **options: Any) -> bool:
        """kombu 5.7's ``Channel._brpop_read``, with a malformed list entry refused instead of raised."""
        try:
            moving = self._moving_from
            try:
                reply = self.client.parse_response(
                    self.client.connection, "BRPOP" if moving is None else "BLMOVE", **options
                )
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next iteration will reconnect
                self.client.connection.disconnect()
                raise
            if not reply:
                raise Empty()
            if moving is None:
                dest, item = reply
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]  # type: ignore[no-untyped-call]
                self._queue_cycle.rotate(dest)
                self._deliver_entry(item, dest)
                return True
            self._in_flight = (moving, self.qos.consumer, reply)
            try:
                self._deliver_entry(reply, moving)
            except BaseException:
                self._in_flight = None  # stays in the in-flight list: a live consumer returns it
                raise
            left = self.take_in_flight()  # not recorded: refused (dead-lettered), or put back by kombu
            if left is not None:
                with self.conn_or_acquire() as client:
                    client.execute_command("LREM", self.prefixed(in_flight_keys(*left[:2])[0]), 1, left[2])
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


class Poller(kombu_redis.MultiChannelPoller):
    """kombu's poller, scanning every consuming channel for lapsed leases: kombu scans the first
    one only (its unacked keys are shared; ours are per queue, and a worker may consume a queue
    of control replies beside its tier's)."""

    def maybe_restore_messages(self) -> None:
        for channel in list(self._channels):
            if not channel.active_queues:
                continue
            try:
                channel.qos.restore_visible(
                    num=channel.unacked_restore_limit, interval=channel.unacked_restore_throttle
                )
            except channel.connection_errors:
                return  # the connection is broken: the poll loop reconnects; the next tick scans


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel` and :class:`Poller`."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.cycle = Poller()  # type: ignore[no-untyped-call,assignment]


def use_for_redis_urls() -> None:
    """Make kombu resolve ``redis://`` and ``rediss://`` (TLS) URLs to :class:`Transport` in this
    process: both get leased deliveries (kombu's own ``rediss`` transport has none).

    Takes effect for connections made afterwards (kombu caches a resolved alias): call it before
    the first connection, as building tierq's Celery config does.
    """
    kombu.transport.TRANSPORT_ALIASES["redis"] = TRANSPORT
    kombu.transport.TRANSPORT_ALIASES["rediss"] = TRANSPORT
