"""The bulk tier end to end: jobs parked, gathered into Message Batches, answered one by one.

A real ``tierq worker --tier bulk`` on the shipped batch policy (gathered for 5 s, polled from 1 s)
against the simulator's batch endpoints (a batch of n requests ends after (120 + 0.25 n) s, scaled
by the session's time scale: about 6 s).
"""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import KEY_PREFIX, WorkerProcess, wait_for_nodes
from tierq import JobFailedError, JobRefusedError, submit
from tierq.contract.result import JobResult
from tierq.contract.tiers import load_tier_table
from tierq.llm.pricing import cost_usd
from tierq.sim import SimServer
from tierq.store.deadletter import DeadLetterStore

#: a deployment of its own, or processes killed and restarted: in `make test`, not `make check`
pytestmark = pytest.mark.slow

DOC = " ".join(f"Sentence {i} of a document that can wait a day for its summary." for i in range(30))
#: seconds a job of these tests may take: gathering, the scaled batch, polls, and a retry's second batch
RESULT_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def bulk_worker(tmp_dir: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(["bulk"], tmp_dir / "worker-bulk.log")
    try:
        wait_for_nodes([proc.node], [proc])
        yield proc
    finally:
        proc.stop()


def sim_batches(sim: SimServer) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{sim.url}/_sim/batches", timeout=5) as response:
        batches: list[dict[str, Any]] = json.load(response)["batches"]
    return batches


def script(sim: SimServer, job_id: str, faults: list[str]) -> None:
    body = json.dumps({"job_id": job_id, "faults": faults}).encode()
    request = urllib.request.Request(
        f"{sim.url}/_sim/faults", data=body, headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=5):
        pass


def sent(sim: SimServer, ids: list[str]) -> Counter[str]:
    """How many times the simulator was sent each of these custom ids, across every batch."""
    wanted = set(ids)
    return Counter(cid for batch in sim_batches(sim) for cid in batch["custom_ids"] if cid in wanted)


def test_a_bulk_burst_goes_out_as_batches_and_every_job_gets_its_own_result(
    bulk_worker: WorkerProcess, sim: SimServer
) -> None:
    tag = "burst"
    jobs = [
        submit(f"{DOC} Item {i}.", urgency="bulk", job_id=f"bulk-{tag}-{i}", metadata={"i": i}, stream=i == 0)
        for i in range(40)
    ]
    ids = [job.id for job in jobs]
    results = [job.result(timeout=RESULT_TIMEOUT_S) for job in jobs]
    for i, (job, result) in enumerate(zip(jobs, results, strict=True)):
        assert result.job_id == job.id and result.metadata == {"i": i}
        assert result.summary and result.path == "batch" and result.batch_id
        assert result.tier == "bulk" and result.retries == 0
        assert result.usage.output_tokens > 0
        assert result.cost_usd == cost_usd(result.model, result.usage, batch=True)
        full = cost_usd(result.model, result.usage)
        assert full is not None and result.cost_usd is not None and result.cost_usd < full
        timings = result.timings
        assert timings.batch_wait_ms is not None and timings.batch_wait_ms > timings.llm_ms > 0
        assert timings.total_ms >= timings.batch_wait_ms
    # one call each, in few batches: a burst is gathered, not sent job by job
    counts = sent(sim, ids)
    assert counts == Counter(ids), f"sent more or less than once: {counts - Counter(ids)}"
    holding = [b for b in sim_batches(sim) if set(b["custom_ids"]) & set(ids)]
    assert 1 <= len(holding) <= 3, f"{len(holding)} batches for one burst"
    # the streamed job's reader gets its text, then its result
    items = list(jobs[0].stream(timeout=10))
    assert items[0] == results[0].summary
    assert isinstance(items[-1], JobResult) and items[-1].job_id == jobs[0].id
    # the canonical line says which path the job took; no document text in any log line
    done = bulk_worker.wait_for(ids[1], "summarize.completed")[0]
    assert done["path"] == "batch" and done["batch_id"] == results[1].batch_id
    assert "Sentence 3 of a document" not in bulk_worker.log_path.read_text()


def test_partial_failures_are_retried_or_dead_lettered_and_nothing_else_is_sent_twice(
    bulk_worker: WorkerProcess, sim: SimServer, redis_client: redis.Redis
) -> None:
    tag = "partial"
    plain = [f"bulk-{tag}-ok-{i}" for i in range(6)]
    flaky, broken, overloaded, refused = (f"bulk-{tag}-{k}" for k in ("500", "400", "529", "refusal"))
    script(sim, flaky, ["500"])
    script(sim, broken, ["400"])
    script(sim, overloaded, ["529"])
    script(sim, refused, ["refusal"])
    ids = [*plain, flaky, broken, overloaded, refused]
    jobs = {job_id: submit(DOC, urgency="bulk", job_id=job_id) for job_id in ids}
    for job_id in (*plain, flaky, overloaded):
        result = jobs[job_id].result(timeout=RESULT_TIMEOUT_S)
        assert result.summary and result.path == "batch"
    assert jobs[flaky].result().retries == 1
    assert jobs[overloaded].result().retries == 1
    with pytest.raises(JobFailedError) as failed:
        jobs[broken].result(timeout=RESULT_TIMEOUT_S)
    assert failed.value.error_type == "RequestRejectedError"
    with pytest.raises(JobRefusedError):
        jobs[refused].result(timeout=RESULT_TIMEOUT_S)
    letter = DeadLetterStore(redis_client, KEY_PREFIX).get(broken)
    assert letter is not None and letter.reason == "not retryable" and letter.tier == "bulk"
    # retried members went out again, in a later batch; every other job exactly once
    expected = Counter({**dict.fromkeys(ids, 1), flaky: 2, overloaded: 2})
    assert sent(sim, ids) == expected
    retrying = bulk_worker.events_for(flaky, "summarize.retrying")
    assert retrying and retrying[0]["path"] == "batch" and retrying[0]["error_type"] == "UpstreamServerError"


def test_the_bulk_urgency_maps_to_the_batch_tier() -> None:
    tiers = load_tier_table()
    bulk = tiers.for_urgency("bulk")
    assert bulk.name == "bulk" and bulk.batch is not None and bulk.deadline_s == 86_400
    assert all(t.batch is None for name, t in tiers.tiers.items() if name != "bulk")
