"""The Celery application. It names its task modules and never imports them.

``app`` is built from the environment as this module is imported (what ``tierq worker`` and
``celery -A worker.celery.app`` run); :func:`make_app` builds another from explicit settings.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from tasks.tiers import TierTable
from worker.celery.config import celery_config, delivery_limit_queue, is_amqp
from worker.celery.transport import use_for_redis_urls
from worker.core.settings import Settings, get_settings, get_tier_table
from worker.observe.logging import connect_celery_signals

__all__ = ["app", "make_app"]


def make_app(settings: Settings, tiers: TierTable) -> Celery:
    """A tierq Celery app for ``settings`` and ``tiers``.

    With a ``redis://`` broker this points kombu's ``redis`` alias, for the whole process, at
    :mod:`worker.celery.transport` (kombu's Redis transport minus a client object per command).
    """
    if settings.broker_url.startswith("redis://"):
        use_for_redis_urls()
    built = Celery("tierq", include=["worker.celery.task", "worker.celery.bulk"], set_as_current=False)
    built.config_from_object(celery_config(settings, tiers))
    return built


app = make_app(get_settings(), get_tier_table())
app.set_current()
connect_celery_signals()


@signals.worker_init.connect(weak=False, dispatch_uid="tierq.declare_amqp_queues")  # type: ignore[untyped-decorator]
def _declare_amqp_queues(sender: Any = None, **_: Any) -> None:
    """On RabbitMQ, declare the queue that messages past their delivery limit are dead-lettered to
    (RabbitMQ drops them when it does not exist), and the tier queues this worker consumes, so that
    a queue declared earlier with other arguments stops the worker with what to do, not a traceback."""
    worker_app = getattr(sender, "app", None) or app
    if not is_amqp(str(worker_app.conf.broker_url)):
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
