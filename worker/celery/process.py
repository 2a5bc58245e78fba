"""The worker process's :class:`~worker.runtime.context.Context`: built as the process starts, closed
as it stops, handed to each job by the task.

Built on Celery's ``worker_init`` (threads and solo pools: the one process) and again on
``worker_process_init`` in each prefork child (a loop thread and sockets do not survive a fork).
"""

from __future__ import annotations

from typing import Any

from celery import signals

from worker.core.settings import get_settings, get_tier_table
from worker.runtime.context import Context

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
