"""Nothing rots unseen: messages on queues no tierq worker reads show in doctor, stats and a metric."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator

import pytest
import redis
from kombu.transport.virtual.base import UndeliverableWarning

from tests.conftest import KEY_PREFIX, WorkerProcess
from tests.helpers import run_tierq, wait_until
from tierq.celery.app import app
from tierq.contract.job import SUMMARIZE_TASK
from tierq.contract.message import DEFAULT_CELERY_QUEUE, DELIVERY_LIMIT_QUEUE, UNROUTABLE_QUEUE


@pytest.fixture
def stray(redis_client: redis.Redis) -> Iterator[None]:
    """One message on Celery's default queue, one published with a routing key no queue is bound to."""
    body = json.dumps([[], {"job": {"job_id": "stray", "tier": "fast", "text": "x"}}, {}]).encode()
    envelope = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"id": f"stray-{uuid.uuid4().hex[:8]}", "task": SUMMARIZE_TASK},
        "properties": {"body_encoding": "base64", "delivery_tag": "1", "delivery_info": {}, "priority": 0},
    }
    redis_client.lpush(KEY_PREFIX + DEFAULT_CELERY_QUEUE, json.dumps(envelope))
    with app.connection_for_write() as conn, pytest.warns(UndeliverableWarning):
        conn.Producer().publish(
            body, exchange="tierq", routing_key="tierq.nowhere", content_type="application/json"
        )
    try:
        yield
    finally:
        redis_client.delete(KEY_PREFIX + DEFAULT_CELERY_QUEUE, KEY_PREFIX + UNROUTABLE_QUEUE)


@pytest.mark.usefixtures("stray")
def test_stray_messages_show_in_doctor_stats_and_metrics(workers: dict[str, WorkerProcess]) -> None:
    assert wait_until(
        lambda: (
            workers["fast"].metric("tierq_stray_messages", "queue_name")
            == {DEFAULT_CELERY_QUEUE: 1, UNROUTABLE_QUEUE: 1, DELIVERY_LIMIT_QUEUE: 0}
        ),
        10,
        "the stray messages in the worker's metrics",
    )
    doctor = run_tierq(["doctor"])
    assert f"stray queue {DEFAULT_CELERY_QUEUE}" in doctor.stdout and "1 message(s)" in doctor.stdout
    assert f"stray queue {UNROUTABLE_QUEUE}" in doctor.stdout
    stats = run_tierq(["stats"])
    assert stats.returncode == 0, stats.stderr
    assert f"1 message(s) on '{DEFAULT_CELERY_QUEUE}'" in stats.stderr
    assert f"1 message(s) on '{UNROUTABLE_QUEUE}'" in stats.stderr
