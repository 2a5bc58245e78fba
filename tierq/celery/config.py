"""The Celery configuration, built in one place from :class:`Settings` and the tier table."""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue  # type: ignore[attr-defined]

from tierq.contract.job import SUMMARIZE_TASK
from tierq.contract.message import DELIVERY_LIMIT_QUEUE, UNROUTABLE_QUEUE
from tierq.contract.tiers import Tier, TierTable
from tierq.core.settings import MAX_CRASHES, Settings

__all__ = ["TierRouter", "celery_config", "delivery_limit_queue", "is_amqp"]


#: seconds added to the slowest deadline: a delivery left in kombu's shared unacked keys (by a
#: version before leases) older than this is restored; and the result backend's visibility timeout
VISIBILITY_MARGIN_S = 600
#: seconds a worker holds the mutex of a queue's restore scan at most (if it dies holding it)
RESTORE_MUTEX_EXPIRE_S = 2


def is_amqp(broker_url: str) -> bool:
    """Whether the broker is RabbitMQ (AMQP)."""
    return broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))


def delivery_limit(tier: Tier) -> int:
    """Returns of one message to a RabbitMQ queue before RabbitMQ dead-letters it: one more than the
    run guard allows (tierq gives a crashing job up itself, with a dead letter and a status, first);
    RabbitMQ's limit catches what crashes a worker before the guard is reached."""
    return tier.max_retries + 1 + MAX_CRASHES + 1


def delivery_limit_queue() -> Queue:
    """The quorum queue where RabbitMQ puts messages past their delivery limit (the worker declares it)."""
    return Queue(
        DELIVERY_LIMIT_QUEUE,
        Exchange(""),
        routing_key=DELIVERY_LIMIT_QUEUE,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


class TierRouter:
    """Celery router: a summarize job goes to its tier's queue; nothing else is routed here."""

    def __init__(self, tiers: TierTable) -> None:
        self._queues = {name: tier.queue for name, tier in tiers.tiers.items()}

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
    ) -> dict[str, str] | None:
        if name != SUMMARIZE_TASK or not isinstance(kwargs, dict):
            return None
        job = kwargs.get("job")
        tier = job.get("tier") if isinstance(job, dict) else None
        if tier is None:
            return None
        # an unknown tier maps to a queue name Celery does not know, which fails loudly
        return {"queue": self._queues.get(tier, f"unknown-tier:{tier}")}


def celery_config(settings: Settings, tiers: TierTable) -> dict[str, Any]:
    """Celery settings: JSON only, explicit queues, late acks, task events when Flower asks."""
    visibility_timeout = int(tiers.slowest_deadline_s) + VISIBILITY_MARGIN_S
    amqp = is_amqp(settings.broker_url)
    queue_arguments: dict[str, dict[str, Any] | None] = {name: None for name in tiers.tiers}
    consumer_arguments: dict[str, Any] | None = None
    if amqp:
        # RabbitMQ: durable quorum queues (replicated, poison-message aware) and publisher confirms;
        # a topic exchange, so that retry countdowns use RabbitMQ's native delayed delivery. A
        # message returned more often than its tier allows goes to the delivery-limit queue
        exchange = Exchange("tierq", type="topic", durable=True)
        for name, tier in tiers.tiers.items():
            queue_arguments[name] = {
                "x-queue-type": "quorum",
                "x-delivery-limit": delivery_limit(tier),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": DELIVERY_LIMIT_QUEUE,
            }
        # RabbitMQ closes the channel of a consumer that holds a delivery longer than its consumer
        # timeout (30 min by default: the slow tier's deadline): each consumer asks for more
        # (RabbitMQ 3.11.15 and later; older servers ignore it: set consumer_timeout in rabbitmq.conf)
        consumer_arguments = {"x-consumer-timeout": visibility_timeout * 1000}
        transport_options: dict[str, Any] = {"confirm_publish": True}
    else:
        exchange = Exchange("tierq", type="direct")
        transport_options = {
            # each delivery is leased: its worker renews it, a live worker of its queue restores it
            # lease_s after its worker died (tierq/celery/transport.py: LeasedQoS), scanning every
            # restore_interval_s
            "lease_s": settings.lease_s,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": RESTORE_MUTEX_EXPIRE_S,
            # only for deliveries in kombu's shared keys, left by a version before leases
            "visibility_timeout": visibility_timeout,
            "max_connections": settings.redis_max_connections,
            # consume a multi-tier worker's queues in the order given (fast first), not round-robin
            "queue_order_strategy": "priority",
            "socket_connect_timeout": 5,
            # a message whose routing key matches no queue lands here (kombu drops it otherwise),
            # where doctor, stats and tierq_stray_messages show it
            "deadletter_queue": UNROUTABLE_QUEUE,
        }
        if settings.key_prefix:
            transport_options["global_keyprefix"] = settings.key_prefix
    queues = [
        Queue(
            t.queue,
            exchange,
            routing_key=t.queue,
            durable=True,
            queue_arguments=queue_arguments[name],
            consumer_arguments=consumer_arguments,
        )
        for name, t in tiers.tiers.items()
    ]
    default_queue = tiers.for_urgency("normal").queue if "normal" in tiers.urgencies else queues[0].name
    backend_options: dict[str, Any] = {
        "visibility_timeout": visibility_timeout,
        # reconnect attempts of the result backend, a few seconds in all (Celery's default is ~20 s)
        "retry_policy": {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
    }
    if settings.key_prefix:
        backend_options["global_keyprefix"] = settings.key_prefix
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "result_backend": settings.backend_url,
        "broker_transport_options": transport_options,
        "result_backend_transport_options": backend_options,
        "redis_max_connections": settings.redis_max_connections,
        "broker_connection_retry_on_startup": True,
        # JSON only: pickle is refused both ways
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_queues": queues,
        "task_default_queue": default_queue,
        "task_default_exchange": exchange.name,
        "task_default_routing_key": default_queue,
        "task_create_missing_queues": False,
        "task_routes": (TierRouter(tiers),),
        # a job is acknowledged when it ends, and goes back to the queue if its worker dies
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # no STARTED write before each job (a Redis round trip on the fast path): Job.status() reads
        # "running" from the job's run lock instead, and Flower from the task-started event
        "task_track_started": False,
        # malformed messages are dead-lettered and logged without their body
        "worker_consumer": "tierq.celery.consumer:TierqConsumer",
        # workers' task events for Flower: off until Flower asks (it enables them on every worker),
        # unless set; producers always say "task-sent" (after the publish), which tells Flower the queue
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": True,
        # no extended results: they would keep every job's arguments (its document) in the result
        # backend for result_expires; a job's tier is in its result, its queue in Flower's events
        "result_extended": False,
        "result_expires": settings.result_expires_s,
        # a producer facing a dead broker gives up after a few seconds instead of hanging
        "task_publish_retry_policy": {
            "max_retries": 3,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
    }
    return config
