"""Leased deliveries on Redis (``tierq/celery/transport.py``), against the session's fast worker.

What a dead worker leaves behind is written straight into Redis, as a worker killed at that moment
would leave it: a delivery recorded unacknowledged whose lease nobody renews, an entry moved into a
consumer's in-flight list that it never recorded. The fast worker puts each back within seconds;
a delivery whose lease is renewed (its worker is alive) is never touched.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request
import uuid
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import KEY_PREFIX, WorkerProcess
from tests.helpers import run_tierq, wait_until
from tierq import get_job
from tierq.celery.transport import IN_FLIGHT_FORGET_S
from tierq.core.settings import DEFAULT_LEASE_S, get_tier_table
from tierq.sim import SimServer
from tierq.store.keys import in_flight_keys, unacked_keys

#: workers killed and leases left to lapse: in `make test`, not `make check`
pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.slow]

DOC = " ".join(f"Line {i}: a job its worker took to the grave comes back within seconds." for i in range(20))
#: seconds within which a lapsed delivery runs again: the lease, a scan interval, and slack
RECOVERY_S = DEFAULT_LEASE_S + 1.0 + 6.0


def _queue() -> str:
    return get_tier_table().tiers["fast"].queue


def _envelope(job_id: str) -> dict[str, Any]:
    """A kombu envelope of a fast job, as the transport parses a list entry."""
    body = json.dumps([[], {"job": {"job_id": job_id, "tier": "fast", "text": DOC}}, {}]).encode()
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"id": job_id, "task": "tierq.summarize", "lang": "py"},
        "properties": {
            "body_encoding": "base64",
            "delivery_info": {"exchange": "tierq", "routing_key": _queue()},
            "delivery_mode": 2,
            "delivery_tag": str(uuid.uuid4()),
            "priority": 0,
        },
    }


def _leave_unacked(client: redis.Redis, job_id: str, renewed_at: float) -> str:
    """Record a delivery of ``job_id`` unacknowledged, its lease last renewed at ``renewed_at``."""
    envelope = _envelope(job_id)
    tag = str(envelope["properties"]["delivery_tag"])
    hash_key, index_key, _ = unacked_keys(_queue())
    client.hset(f"{KEY_PREFIX}{hash_key}", tag, json.dumps([envelope, "tierq", _queue()]))
    client.zadd(f"{KEY_PREFIX}{index_key}", {tag: renewed_at})
    return tag


def _samples(worker: WorkerProcess) -> dict[tuple[str, str], float]:
    """The worker's samples by (sample name, its queue_name or tier label)."""
    with urllib.request.urlopen(worker.metrics_url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, sample.labels.get("queue_name") or sample.labels.get("tier", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _ran(sim: SimServer, job_id: str) -> bool:
    return get_job(job_id).status() == "succeeded" and sim.state.request_count(job_id) == 1


def test_a_dead_workers_delivery_runs_again_and_a_live_ones_is_left_alone(
    workers: dict[str, WorkerProcess], redis_client: redis.Redis, sim: SimServer
) -> None:
    dead_id, live_id = f"lease-dead-{uuid.uuid4().hex[:12]}", f"lease-live-{uuid.uuid4().hex[:12]}"
    _, index_key, _ = unacked_keys(_queue())
    live_tag = _leave_unacked(redis_client, live_id, time.time())
    planted = time.time()
    stop = threading.Event()

    def renew() -> None:  # what the live worker's lease keeper does
        while not stop.wait(DEFAULT_LEASE_S / 3):
            redis_client.zadd(f"{KEY_PREFIX}{index_key}", {live_tag: time.time()}, xx=True)

    keeper = threading.Thread(target=renew, daemon=True)
    keeper.start()
    try:
        dead_tag = _leave_unacked(redis_client, dead_id, time.time() - 60)
        wait_until(lambda: _ran(sim, dead_id), RECOVERY_S, "the dead worker's delivery to run again")
        assert redis_client.zscore(f"{KEY_PREFIX}{index_key}", dead_tag) is None
        workers["fast"].wait_for(dead_id, "summarize.completed")
        # scans keep restoring dead workers' deliveries for several leases, each one seen to run,
        # and the renewed delivery is still where its worker left it
        while time.time() - planted < 3 * DEFAULT_LEASE_S:
            probe = f"lease-probe-{uuid.uuid4().hex[:12]}"
            _leave_unacked(redis_client, probe, time.time() - 60)
            wait_until(lambda probe=probe: _ran(sim, probe), RECOVERY_S, "a scan to restore a dead delivery")
        assert redis_client.zscore(f"{KEY_PREFIX}{index_key}", live_tag) is not None
        assert sim.state.request_count(live_id) == 0, "a live worker's delivery is never redelivered"
    finally:
        stop.set()
        keeper.join(5)
    # its worker dies: the lease lapses and the job runs
    wait_until(lambda: _ran(sim, live_id), RECOVERY_S, "the lapsed delivery to run")


def test_an_entry_a_dead_consumer_moved_but_never_recorded_comes_back(
    workers: dict[str, WorkerProcess], redis_client: redis.Redis, sim: SimServer
) -> None:
    job_id = f"inflight-{uuid.uuid4().hex[:12]}"
    consumer = uuid.uuid4().hex[:16]
    in_flight, index_key = in_flight_keys(_queue(), consumer)
    redis_client.lpush(f"{KEY_PREFIX}{in_flight}", json.dumps(_envelope(job_id)))
    redis_client.zadd(f"{KEY_PREFIX}{index_key}", {consumer: time.time() - 60})
    # a consumer dead for longer than the in-flight lists are watched, with nothing left: forgotten
    gone = uuid.uuid4().hex[:16]
    redis_client.zadd(f"{KEY_PREFIX}{index_key}", {gone: time.time() - IN_FLIGHT_FORGET_S - 60})
    wait_until(lambda: _ran(sim, job_id), RECOVERY_S, "the in-flight entry to run")
    assert not redis_client.exists(f"{KEY_PREFIX}{in_flight}")
    # still watched: a consumer that stalled past its lease may move one more entry before it dies
    assert redis_client.zscore(f"{KEY_PREFIX}{index_key}", consumer) is not None
    wait_until(
        lambda: redis_client.zscore(f"{KEY_PREFIX}{index_key}", gone) is None,
        RECOVERY_S,
        "the old one forgotten",
    )
    redis_client.zrem(f"{KEY_PREFIX}{index_key}", consumer)
    workers["fast"].wait_for(job_id, "summarize.completed")


def test_a_message_sent_with_a_priority_still_runs(
    workers: dict[str, WorkerProcess], redis_client: redis.Redis, sim: SimServer
) -> None:
    """kombu keeps priorities 1-9 in sub-lists of the queue; a consumer of one queue moves them to it."""
    job_id = f"priority-{uuid.uuid4().hex[:12]}"
    redis_client.lpush(f"{KEY_PREFIX}{_queue()}\x06\x163", json.dumps(_envelope(job_id)))
    wait_until(lambda: _ran(sim, job_id), RECOVERY_S, "the job sent with a priority to run")


def test_metrics_and_stats_show_each_tiers_deliveries(
    workers: dict[str, WorkerProcess], redis_client: redis.Redis, sim: SimServer
) -> None:
    job_id = f"lease-counted-{uuid.uuid4().hex[:12]}"
    _leave_unacked(redis_client, job_id, time.time() - 60)
    wait_until(lambda: _ran(sim, job_id), RECOVERY_S, "the dead worker's delivery to run again")
    samples = _samples(workers["fast"])
    queue = _queue()
    assert samples[("tierq_deliveries_recovered_total", queue)] >= 1, "the worker counted what it put back"
    assert samples[("tierq_worker_up", "fast")] == 1
    assert samples[("tierq_worker_threads", "fast")] >= 1
    assert 0 <= samples[("tierq_worker_saturation", "fast")] <= 1
    assert samples[("tierq_jobs_in_flight", "fast")] >= 0
    assert samples[("tierq_unacked_messages", queue)] >= 0

    shown = run_tierq(["stats", "--json", "--last", "50"])
    assert shown.returncode == 0, shown.stderr
    fast = json.loads(shown.stdout)["fast"]
    assert fast["recovered"] >= 1 and fast["unacked"] >= 0 and fast["queued"] >= 0
    table = run_tierq(["stats", "--last", "50"])
    assert "deliveries per tier" in table.stdout and "recovered" in table.stdout
