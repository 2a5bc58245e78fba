"""The Celery application. It names its task modules and never imports them."""

from __future__ import annotations

from celery import Celery

from worker.celery.config import celery_config
from worker.core.settings import get_settings, get_tier_table
from worker.observe.logging import connect_celery_signals

__all__ = ["app"]

app = Celery("tierq", include=["worker.celery.task"])
app.config_from_object(celery_config(get_settings(), get_tier_table()))
connect_celery_signals()
