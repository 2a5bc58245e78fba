"""The Celery application. It names its task modules and never imports them.

``app`` is built from the environment as this module is imported (what ``tierq worker`` and
``celery -A worker.celery.app`` run); :func:`make_app` builds another from explicit settings.
"""

from __future__ import annotations

from celery import Celery

from tasks.tiers import TierTable
from worker.celery.config import celery_config
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
    built = Celery("tierq", include=["worker.celery.task"], set_as_current=False)
    built.config_from_object(celery_config(settings, tiers))
    return built


app = make_app(get_settings(), get_tier_table())
app.set_current()
connect_celery_signals()
