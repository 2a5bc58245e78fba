"""structlog, configured once, with Celery's and kombu's records in the same format.

JSON lines off a terminal, the console renderer on one (``TIERQ_LOG_FORMAT`` overrides).
Inside a worker the setup runs from Celery's ``setup_logging`` signal, so Celery leaves the
root logger alone, and ``task_prerun``/``task_postrun`` bind and clear the job's context.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from celery import signals
from structlog.tracebacks import ExceptionDictTransformer

from tierq.contract.job import CONTEXT_HEADER, carried_context
from tierq.core.settings import Settings, get_settings

__all__ = ["configure_logging", "connect_celery_signals", "get_logger"]

#: loggers kept at WARNING: Celery's task trace would log each return value (the summary text) at
#: INFO, its strategy a "received" line per job (on the fast path, and the canonical line says it
#: all), and the HTTP clients every request
_QUIET_LOGGERS = ("celery.app.trace", "celery.worker.strategy", "httpx", "httpx2", "httpcore", "httpcore2")

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def _use_json(settings: Settings) -> bool:
    if settings.log_format == "auto":
        return not sys.stdout.isatty()
    return settings.log_format == "json"


def configure_logging(settings: Settings | None = None, level: str | int | None = None) -> None:
    """Configure structlog and the stdlib root logger to write one format to stdout."""
    settings = settings or get_settings()
    renderer: list[Any]
    # tracebacks without their frames' locals: those hold the job, the prompt and the request body
    if _use_json(settings):
        tracebacks = ExceptionDictTransformer(show_locals=False)
        renderer = [structlog.processors.ExceptionRenderer(tracebacks), structlog.processors.JSONRenderer()]
    else:
        rich_tracebacks = structlog.dev.RichTracebackFormatter(show_locals=False)
        renderer = [structlog.dev.ConsoleRenderer(exception_formatter=rich_tracebacks)]
    structlog.configure(
        processors=[
            *_SHARED,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level or settings.log_level.upper())
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named like a stdlib one."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


def _on_setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    configure_logging(level=loglevel or None)


def _on_task_prerun(task_id: str | None = None, task: Any = None, kwargs: Any = None, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    job = kwargs.get("job") if isinstance(kwargs, dict) else None
    request = getattr(task, "request", None)
    delivery = getattr(request, "delivery_info", None) or {}
    headers = getattr(request, "headers", None) or {}
    carried = headers.get(CONTEXT_HEADER)
    if isinstance(carried, dict):
        # the producer's context first, so the job's own fields below win on a clash
        structlog.contextvars.bind_contextvars(**carried_context(carried))
    structlog.contextvars.bind_contextvars(
        task_id=task_id,
        job_id=job.get("job_id") if isinstance(job, dict) else None,
        tier=job.get("tier") if isinstance(job, dict) else None,
        queue=delivery.get("routing_key"),
    )


def _on_task_postrun(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()


def connect_celery_signals() -> None:
    """Hook logging into Celery: setup once per worker, context per task. Safe to call twice."""
    signals.setup_logging.connect(_on_setup_logging, weak=False, dispatch_uid="tierq.logging.setup")
    signals.task_prerun.connect(_on_task_prerun, weak=False, dispatch_uid="tierq.logging.prerun")
    signals.task_postrun.connect(_on_task_postrun, weak=False, dispatch_uid="tierq.logging.postrun")
