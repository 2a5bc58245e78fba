"""The Celery application. It names its task modules and never imports them.

Nothing is built as this module is imported: :func:`make_app` builds an app from explicit settings,
:func:`get_app` builds the process's default one from the environment on first use (what
``tierq worker`` runs, and what ``celery -A tierq.celery.app`` finds as ``app``), :func:`set_app`
replaces it. The worker's signal handlers are connected by the task modules a worker imports
(:mod:`tierq.celery.process`), never here.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from tierq.celery.config import celery_config
from tierq.celery.transport import use_for_redis_urls
from tierq.contract.tiers import TierTable
from tierq.core.settings import Settings, get_settings, get_tier_table

__all__ = ["TASK_MODULES", "get_app", "make_app", "set_app"]

#: the modules a worker imports for its tasks (and the signal handlers they connect)
TASK_MODULES = ("tierq.celery.task", "tierq.celery.bulk")

_default: list[Celery] = []
_default_lock = threading.Lock()


def make_app(settings: Settings, tiers: TierTable) -> Celery:
    """A tierq Celery app for ``settings`` and ``tiers``.

    With a ``redis://`` or ``rediss://`` broker this points kombu's ``redis`` and ``rediss`` aliases,
    for the whole process, at :mod:`tierq.celery.transport` (leased deliveries, one client per pool).
    """
    if settings.broker_url.startswith(("redis://", "rediss://")):
        use_for_redis_urls()
    built = Celery("tierq", include=list(TASK_MODULES), set_as_current=False)
    built.config_from_object(celery_config(settings, tiers))
    return built


def get_app() -> Celery:
    """The process's default app, built from the environment on first use (then Celery's current)."""
    with _default_lock:
        if not _default:
            built = make_app(get_settings(), get_tier_table())
            built.set_current()
            _default.append(built)
        return _default[0]


def set_app(app: Celery) -> None:
    """Make ``app`` the process's default (what :func:`get_app` returns from now on)."""
    with _default_lock:
        _default[:] = [app]
    app.set_current()


def __getattr__(name: str) -> Any:
    # ``celery -A tierq.celery.app`` reads the module's ``app``: the default, built on that first use
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
