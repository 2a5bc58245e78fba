"""The worker process's :class:`~tierq.runtime.context.Context`: built as the process starts, closed
as it stops, handed to each job by the task.

This module is imported by the worker as it loads its tasks (:data:`~tierq.celery.app.TASK_MODULES`),
before it sets up logging: that is when the worker's signal handlers are connected, never as a
producer imports tierq.

Built on Celery's ``worker_init`` (threads and solo pools: the one process) and again on
``worker_process_init`` in each prefork child (a loop thread and sockets do not survive a fork).
"""

from __future__ import annotations

from typing import Any

from celery import signals

from tierq.celery.config import delivery_limit_queue, is_amqp
from tierq.core.settings import get_settings, get_tier_table
from tierq.observe.logging import connect_celery_signals
from tierq.runtime.context import Context

__all__ = ["context"]

_current: list[Context] = []


def context() -> Context:
    """This worker process's context; RuntimeError outside a started worker."""
    if not _current:
        raise RuntimeError("no worker context: tierq jobs run in a started worker (tierq worker)")
    return _current[-1]


def _start(**_: Any) -> None:
    """Read the environment once, build the context (a prefork child builds its own)."""
    _current.clear()
    _current.append(Context.build(get_settings(), get_tier_table()))


def _stop(**_: Any) -> None:
    while _current:
        _current.pop().close()


signals.worker_init.connect(_start, weak=False, dispatch_uid="tierq.process.start")
signals.worker_process_init.connect(_start, weak=False, dispatch_uid="tierq.process.start-child")
signals.worker_shutdown.connect(_stop, weak=False, dispatch_uid="tierq.process.stop")
signals.worker_process_shutdown.connect(_stop, weak=False, dispatch_uid="tierq.process.stop-child")


def _declare_amqp_queues(sender: Any = None, **_: Any) -> None:
    """On RabbitMQ, declare the queue that messages past their delivery limit are dead-lettered to
    (RabbitMQ drops them when it does not exist), and the tier queues this worker consumes, so that
    a queue declared earlier with other arguments stops the worker with what to do, not a traceback."""
    worker_app = getattr(sender, "app", None)
    if worker_app is None or not is_amqp(str(worker_app.conf.broker_url)):
        return
    consumed = list(worker_app.amqp.queues.consume_from.values())
    with worker_app.connection_for_write() as connection:
        delivery_limit_queue()(connection.default_channel).declare()  # type: ignore[no-untyped-call]
        for queue in consumed:
            try:
                queue(connection.channel()).declare()
            except connection.channel_errors as exc:
                raise SystemExit(
                    f"tierq: cannot declare queue {queue.name!r} on RabbitMQ: {exc}. A queue declared "
                    "by an earlier tierq has no delivery limit: let it drain, delete it "
                    f"(rabbitmqctl delete_queue {queue.name}) and start the worker again."
                ) from None


connect_celery_signals()
signals.worker_init.connect(_declare_amqp_queues, weak=False, dispatch_uid="tierq.declare_amqp_queues")
