"""Nothing twice and nothing lost: duplicate deliveries, dead letters, malformed messages, poison jobs."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import redis

from tests.conftest import KEY_PREFIX, WorkerProcess
from tests.helpers import run_tierq, wait_until
from tierq import get_job, submit
from tierq.celery.app import app
from tierq.contract.errors import JobFailedError
from tierq.contract.job import SUMMARIZE_TASK
from tierq.core.settings import get_tier_table
from tierq.sim import SimServer
from tierq.store.keys import Keys

DOC = " ".join(f"Item {i}: a job must run once, or be told apart and kept for a replay." for i in range(30))

pytestmark = pytest.mark.usefixtures("workers")


def _send_raw(job_id: str, job: dict[str, Any], **headers: Any) -> None:
    """Publish the job as plain Celery would, twice if asked: no producer-side claim."""
    app.send_task(
        SUMMARIZE_TASK,
        kwargs={"job": job},
        task_id=job_id,
        headers={"tierq_enqueued_at": time.time(), "tierq_tier": job.get("tier"), **headers},
        kwargsrepr="<redacted>",
    )


def _publish_bytes(body: bytes, content_type: str, headers: dict[str, Any]) -> None:
    queue = get_tier_table().tiers["fast"].queue
    with app.connection_for_write() as conn:
        conn.Producer().publish(
            body,
            exchange="tierq",
            routing_key=queue,
            content_type=content_type,
            content_encoding="utf-8",
            headers=headers,
        )


def _dlq(job_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """``tierq dlq show JOB_ID``, once the dead letter is there."""
    done = wait_until(
        lambda: (shown := run_tierq(["dlq", "show", job_id])).returncode == 0 and shown,
        timeout,
        f"the dead letter of {job_id}",
        interval=0.2,
    )
    letter: dict[str, Any] = json.loads(done.stdout)
    return letter


def test_a_redelivered_finished_job_does_not_call_the_model_again(
    sim: SimServer, workers: dict[str, WorkerProcess]
) -> None:
    job_id = f"again-{uuid.uuid4()}"
    job = {"job_id": job_id, "tier": "fast", "text": DOC}
    _send_raw(job_id, job)
    first = get_job(job_id).result(timeout=30).to_json()
    _send_raw(job_id, job)  # the same message again, as a redelivery would bring it
    assert workers["fast"].wait_for(job_id, "summarize.deduplicated")
    assert get_job(job_id).result(timeout=30).to_json() == first
    assert sim.state.request_count(job_id) == 1
    assert len(workers["fast"].events_for(job_id, "summarize.completed")) == 1


def test_a_duplicate_delivery_waits_instead_of_running_beside_the_first(
    sim: SimServer, workers: dict[str, WorkerProcess]
) -> None:
    job_id = f"twin-{uuid.uuid4()}"
    sim.state.add_faults(["stall:1.5"], job_id=job_id)
    job = {"job_id": job_id, "tier": "fast", "text": DOC}
    _send_raw(job_id, job)
    _send_raw(job_id, job)
    assert get_job(job_id).result(timeout=30).job_id == job_id
    [line] = workers["fast"].wait_for(job_id, "summarize.deduplicated")
    assert line["reason"] == "another attempt finished it"
    assert sim.state.request_count(job_id) == 1


@pytest.mark.slow  # every attempt of its tier, then a replay
def test_a_permanent_failure_is_dead_lettered_and_replayable(sim: SimServer) -> None:
    job_id = f"dead-{uuid.uuid4()}"
    sim.state.add_faults(["400"], job_id=job_id)
    with pytest.raises(JobFailedError):
        submit(DOC, urgency="high", job_id=job_id).result(timeout=30)
    letter = _dlq(job_id)
    assert (letter["reason"], letter["error_type"], letter["tier"]) == (
        "not retryable",
        "RequestRejectedError",
        "fast",
    )
    assert letter["attempts"] == 1 and letter["timings"]["total_ms"] > 0
    assert letter["payload"] == f"<{len(DOC)} chars of text>"
    listed = json.loads(run_tierq(["dlq", "list", "--json"]).stdout)
    assert any(row["job_id"] == job_id for row in listed)
    assert DOC[:30] not in run_tierq(["dlq", "list"]).stdout
    narrow = run_tierq(["dlq", "list", "--limit", "5"], {"COLUMNS": "80"}).stdout
    assert job_id in narrow, "a whole job id to copy into show or replay, even 80 columns wide"
    assert json.loads(run_tierq(["dlq", "show", job_id, "--payload"]).stdout)["payload"]["text"] == DOC

    replayed = run_tierq(["dlq", "replay", job_id])  # the simulator's fault was used up: it succeeds now
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == job_id
    assert get_job(job_id).result(timeout=30).job_id == job_id
    assert sim.state.request_count(job_id) == 2
    assert run_tierq(["dlq", "show", job_id]).returncode == 1, "a replayed job leaves the dead-letter store"


def test_a_job_that_keeps_crashing_its_worker_is_given_up(
    sim: SimServer, redis_client: redis.Redis, workers: dict[str, WorkerProcess]
) -> None:
    job_id = f"poison-{uuid.uuid4()}"
    # as if it had started (and killed its worker) as often as its attempts and crash allowance
    redis_client.set(Keys(KEY_PREFIX).starts(job_id), 5, ex=60)
    _send_raw(job_id, {"job_id": job_id, "tier": "fast", "text": DOC})
    with pytest.raises(JobFailedError, match="PoisonJobError"):
        get_job(job_id).result(timeout=30)
    assert sim.state.request_count(job_id) == 0
    assert "given up" in _dlq(job_id)["error"]
