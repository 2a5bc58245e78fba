"""Deadlines that end in a clear ``expired`` state, and idempotent submits, with real workers."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from tests.conftest import KEY_PREFIX, WorkerProcess
from tests.helpers import run_tierq, wait_until
from tierq import Producer, get_job, submit
from tierq.contract.errors import InvalidJobError, JobExpiredError
from tierq.core.settings import Settings
from tierq.sim import SimServer
from tierq.store.keys import Keys

DOC = " ".join(
    f"Clause {i} says the job must end before its deadline or say why it did not." for i in range(30)
)

pytestmark = pytest.mark.usefixtures("workers")


@pytest.mark.parametrize("deadline_s", [0, -1, 16, "soon", True])
def test_deadline_must_be_positive_and_within_the_tier(deadline_s: object) -> None:
    with pytest.raises(InvalidJobError) as info:
        submit(DOC, urgency="critical", deadline_s=deadline_s)  # type: ignore[arg-type]
    assert info.value.field == "deadline_s"


def test_a_job_whose_deadline_passes_in_the_queue_expires_unrun(
    sim: SimServer, workers: dict[str, WorkerProcess]
) -> None:
    blockers = []
    for _ in range(2):  # the slow pool has 2 threads: hold both for 2 s
        blocker_id = f"blocker-{uuid.uuid4()}"
        sim.state.add_faults(["stall:2"], job_id=blocker_id)
        blockers.append(submit(DOC, urgency="low", job_id=blocker_id))
    wait_until(lambda: all(sim.state.request_count(b.id) for b in blockers), 10, "both slow threads busy")
    # admission would refuse it (the slow pool is busy): sent as a sender that skips admission,
    # it must expire in the queue
    unadmitted = Producer(Settings(admission=False))
    job = submit(DOC, urgency="low", deadline_s=0.5, producer=unadmitted)
    with pytest.raises(JobExpiredError):
        job.result(timeout=30)
    assert job.status() == "expired"
    assert sim.state.request_count(job.id) == 0, "an expired job never reaches the model"
    [line] = workers["slow"].wait_for(job.id, "summarize.failed")
    assert line["reason"] == "expired" and line["tier"] == "slow"
    assert line["queue_wait_ms"] >= 500 and line["total_ms"] >= 500
    for blocker in blockers:
        blocker.result(timeout=30)
    # the dead letter kept the job: it can be replayed, with a fresh deadline
    replayed = run_tierq(["dlq", "replay", job.id])
    assert replayed.returncode == 0, replayed.stderr
    assert get_job(job.id).result(timeout=60).tier == "slow"


def test_a_deadline_that_passes_mid_stream_expires_the_job(
    sim: SimServer, workers: dict[str, WorkerProcess]
) -> None:
    job_id = f"late-{uuid.uuid4()}"
    sim.state.add_faults(["stall:5"], job_id=job_id)
    started = time.monotonic()
    job = submit(DOC, urgency="critical", job_id=job_id, deadline_s=1.5)
    with pytest.raises(JobExpiredError):
        job.result(timeout=30)
    assert time.monotonic() - started < 4, "the HTTP timeout is what was left of the deadline"
    assert job.status() == "expired"
    assert sim.state.request_count(job_id) == 1
    [line] = workers["fast"].wait_for(job_id, "summarize.failed")
    assert line["reason"] == "expired" and line["error_type"] == "DeadlineExceededError"


def test_the_same_job_id_is_enqueued_once(sim: SimServer, workers: dict[str, WorkerProcess]) -> None:
    job_id = f"once-{uuid.uuid4()}"
    first = submit(DOC, urgency="high", job_id=job_id)
    second = submit(DOC, urgency="high", job_id=job_id)
    assert not first.duplicate and second.duplicate
    assert first.result(timeout=30) == second.result(timeout=30)
    third = submit(DOC, urgency="high", job_id=job_id)  # after it finished, too
    assert third.duplicate
    # a job sent after them on the same queue: a message published by either duplicate submit would
    # have been delivered before it, and logged as deduplicated (the run guard keeps the model out)
    submit(DOC, urgency="high").result(timeout=30)
    assert workers["fast"].events_for(job_id, "summarize.deduplicated") == []
    assert len(workers["fast"].events_for(job_id, "summarize.completed")) == 1
    assert sim.state.request_count(job_id) == 1
    assert get_job(job_id).status() == "succeeded"


def test_a_generated_job_id_is_claimed_by_the_worker_not_at_submit(redis_client: redis.Redis) -> None:
    keys = Keys(KEY_PREFIX)
    job_id = f"claimed-{uuid.uuid4()}"
    claimed = submit(DOC, urgency="high", job_id=job_id)  # a caller's id: claimed before publishing
    fingerprint = redis_client.get(keys.submitted(job_id))
    assert fingerprint is not None and len(fingerprint) == 32
    claimed.result(timeout=30)
    assert redis_client.get(keys.submitted(job_id)) == fingerprint, "the worker found its own claim"
    job = submit(DOC, urgency="high")  # a generated id: no round trip at submit, the worker claims it
    job.result(timeout=30)
    assert redis_client.get(keys.submitted(job.id)) == fingerprint, "same request, same fingerprint"


def test_the_fast_tier_falls_back_after_repeated_overloads(
    sim: SimServer, workers: dict[str, WorkerProcess]
) -> None:
    job_id = f"fallback-{uuid.uuid4()}"
    sim.state.add_faults(["529", "529"], job_id=job_id)
    result = submit(DOC, urgency="critical", job_id=job_id).result(timeout=30).to_json()
    assert result["model"] == "claude-sonnet-4-6"
    assert result["fallback"] == {"from": "claude-haiku-4-5", "after_overloads": 2}
    assert result["retries"] == 2
    assert sim.state.request_count(job_id) == 3
    [line] = workers["fast"].wait_for(job_id, "summarize.completed")
    assert line["fallback_from"] == "claude-haiku-4-5" and line["model"] == "claude-sonnet-4-6"


def test_the_slow_tier_waits_out_overloads_on_its_own_model(sim: SimServer) -> None:
    job_id = f"patient-{uuid.uuid4()}"
    sim.state.add_faults(["529", "529"], job_id=job_id)
    result = submit(DOC, urgency="low", job_id=job_id).result(timeout=60).to_json()
    assert (result["model"], result["fallback"], result["retries"]) == ("claude-opus-5-5", None, 2)


def test_status_follows_a_job_through_its_life(sim: SimServer) -> None:
    job_id = f"life-{uuid.uuid4()}"
    sim.state.add_faults(["stall:1.5"], job_id=job_id)
    job = submit(DOC, urgency="high", job_id=job_id)
    wait_until(lambda: sim.state.request_count(job_id), 10, "the model call", interval=0.02)
    assert job.status() == "running"
    job.result(timeout=30)
    assert job.status() == "succeeded"
    never = f"never-{uuid.uuid4()}"
    assert get_job(never).status() == "unknown", "an id nobody submitted is not pending"
    shown = run_tierq(["result", never])
    assert (shown.returncode, shown.stdout.strip()) == (1, f"{never} unknown")
