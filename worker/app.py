"""The Celery application. It names its task modules and never imports them."""

from __future__ import annotations

from celery import Celery

from worker.celeryconfig import celery_config
from worker.logging import connect_celery_signals
from worker.settings import get_settings
from worker.tiers import get_tier_table

__all__ = ["app"]

app = Celery("tierq", include=["tasks.summarize"])
app.config_from_object(celery_config(get_settings(), get_tier_table()))
connect_celery_signals()
