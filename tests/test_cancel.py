"""Cancelling a job: queued (with or without a worker to drop it) and running (stopped mid-reply)."""

from __future__ import annotations

import uuid

import pytest
import redis

from tests.conftest import KEY_PREFIX, WorkerProcess
from tests.helpers import wait_until
from tierq import JobCancelledError, get_job, submit
from tierq.sim import SimServer
from tierq.store.keys import Keys

DOC = " ".join(f"Point {i}: a cancelled job spends nothing more than it already has." for i in range(20))

pytestmark = pytest.mark.usefixtures("workers")


def test_a_running_job_stops_when_cancelled(
    sim: SimServer, workers: dict[str, WorkerProcess], redis_client: redis.Redis
) -> None:
    job_id = f"cancel-running-{uuid.uuid4().hex[:12]}"
    sim.state.add_faults(["stall:30"], job_id=job_id)  # the reply would take 30 s: far past the cancel
    job = submit(DOC, urgency="critical", job_id=job_id, stream=True)
    wait_until(lambda: job.status() == "running", 10, "the job to start")
    assert job.cancel() is True
    wait_until(lambda: job.status() == "cancelled", 10, "the running job to stop")
    with pytest.raises(JobCancelledError):
        job.result(timeout=5)
    [line] = workers["fast"].wait_for(job_id, "summarize.cancelled")
    assert line["total_ms"] < 10_000, "stopped within seconds, not at the end of the reply"
    assert not workers["fast"].events_for(job_id, "summarize.completed")
    assert not workers["fast"].events_for(job_id, "summarize.failed"), "no dead letter for a cancel"
    [(_, last)] = redis_client.xrevrange(Keys(KEY_PREFIX).tokens(job_id), count=1)
    assert last == {b"end": b"cancelled"}, "a stream reader is told how it ended"
    assert job.cancel() is False, "an ended job cannot be cancelled again"


def test_a_cancel_mark_drops_a_queued_job_unrun(sim: SimServer, redis_client: redis.Redis) -> None:
    # the mark is what a worker reads as it takes the job, whenever it starts (a revoke broadcast
    # reaches only the workers running at the time): set it before the job is published
    job_id = f"cancel-queued-{uuid.uuid4().hex[:12]}"
    redis_client.set(Keys(KEY_PREFIX).cancelled(job_id), 1, ex=600)
    job = submit(DOC, urgency="critical", job_id=job_id)
    wait_until(lambda: job.status() == "cancelled", 15, "the queued job to end cancelled")
    with pytest.raises(JobCancelledError):
        job.result(timeout=5)
    assert sim.state.request_count(job_id) == 0, "the model was never called"
    assert get_job(job_id).status() == "cancelled"
