"""A bulk worker killed mid-batch loses nothing and calls nothing twice.

Real ``tierq worker --tier bulk`` processes killed with SIGKILL at two points: with jobs parked and
not yet gathered, and with their batch submitted and not yet ended. Another worker, started after,
takes the jobs over on the shipped defaults (a batch's lease lapses ``lease_s`` after its worker
died). And a create whose answer was lost is found, not sent twice.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import RUN_TAG, WorkerProcess, wait_for_nodes
from tests.helpers import run_tierq, wait_until
from tierq import submit
from tierq.contract.job import JobSpec
from tierq.contract.result import JobResult
from tierq.contract.tiers import load_tier_table
from tierq.core.settings import Settings
from tierq.llm.batches import request_size
from tierq.llm.client import LLMRequest
from tierq.runtime.bulk import BatchRunner
from tierq.runtime.context import Context
from tierq.sim import SimServer
from tierq.store.batches import BatchRecord, Parked

#: a deployment of its own, or processes killed and restarted: in `make test`, not `make check`
pytestmark = pytest.mark.slow

DOC = " ".join(f"Sentence {i} of a document that can wait a day for its summary." for i in range(30))
RESULT_TIMEOUT_S = 90


def sent(sim: SimServer, ids: list[str]) -> Counter[str]:
    with urllib.request.urlopen(f"{sim.url}/_sim/batches", timeout=5) as response:
        batches: list[dict[str, Any]] = json.load(response)["batches"]
    wanted = set(ids)
    return Counter(cid for batch in batches for cid in batch["custom_ids"] if cid in wanted)


@pytest.fixture
def start_worker(tmp_dir: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def start(name: str) -> WorkerProcess:
        proc = WorkerProcess(["bulk"], tmp_dir / f"worker-{name}.log", name=name)
        started.append(proc)
        wait_for_nodes([proc.node], [proc])
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


def _events(proc: WorkerProcess, event: str) -> list[dict[str, Any]]:
    return [e for e in proc.log_events() if e.get("event") == event]


@pytest.mark.parametrize("kill_when", ["parked", "submitted"])
def test_a_worker_killed_mid_batch_loses_nothing_and_calls_nothing_twice(
    start_worker: Any, sim: SimServer, kill_when: str
) -> None:
    first = start_worker(f"bulk-kill-{kill_when}-1")
    ids = [f"bulk-kill-{kill_when}-{i}" for i in range(12)]
    jobs = [submit(f"{DOC} Item {i}.", urgency="bulk", job_id=job_id) for i, job_id in enumerate(ids)]
    if kill_when == "parked":
        wait_until(lambda: len(_events(first, "summarize.parked")) == len(ids), 30, "every job parked")
        assert not _events(first, "batch.gathered"), "gathered before the kill: the test lost its point"
    else:
        wait_until(lambda: _events(first, "batch.submitted"), 30, "the batch submitted")
    first.proc.kill()
    first.proc.wait()
    assert not any(job.ready() for job in jobs), "answered before the kill: the test lost its point"
    # an operator sees where they wait
    stats = run_tierq(["stats", "--json"])
    assert stats.returncode == 0, stats.stderr
    bulk = json.loads(stats.stdout)["bulk"]
    assert bulk["batch_parked"] + bulk["batch_in_flight"] == len(ids)
    assert bulk["batch_parked" if kill_when == "parked" else "batch_in_flight"] > 0
    second = start_worker(f"bulk-kill-{kill_when}-2")
    results = [job.result(timeout=RESULT_TIMEOUT_S) for job in jobs]
    assert [r.job_id for r in results] == ids
    assert all(r.summary and r.path == "batch" and r.retries == 0 for r in results)
    assert sent(sim, ids) == Counter(ids), "a job was sent twice, or not at all"
    assert _events(second, "batch.ended")
    if kill_when == "submitted":
        # the second worker polled the batch the first one submitted
        submitted = {e["api_batch"] for e in _events(first, "batch.submitted")}
        assert {r.batch_id for r in results} <= submitted


class Sink:
    def __init__(self) -> None:
        self.results: dict[str, JobResult] = {}
        self.failures: dict[str, BaseException] = {}

    def succeeded(self, job_id: str, result: JobResult) -> None:
        self.results[job_id] = result

    def failed(self, job_id: str, exc: BaseException) -> None:
        self.failures[job_id] = exc

    def cancelled(self, job_id: str) -> None:
        self.failures[job_id] = RuntimeError("cancelled")


def test_a_create_whose_answer_was_lost_is_found_not_sent_again(
    sim: SimServer, redis_client: redis.Redis, redis_url: str
) -> None:
    """The runner records a create before sending it; a worker that died before reading the answer
    leaves a record that says so, and the next one looks for the batch before sending another."""
    prefix = f"tierq-test-{RUN_TAG}-lostcreate:"
    settings = Settings(broker_url=redis_url, key_prefix=prefix, anthropic_base_url=sim.url)
    tiers = load_tier_table()
    tier = tiers.tiers["bulk"]
    ctx = Context.build(settings, tiers)
    try:
        assert ctx.batches is not None
        runner = BatchRunner(ctx, [tier], Sink())
        now = time.time()
        jobs = []
        for i in range(3):
            spec = JobSpec(job_id=f"bulk-lost-{i}", tier="bulk", text=f"{DOC} {i}")
            request = LLMRequest(
                spec.job_id, tier.model, tier.system_prompt, "p", tier.max_tokens, tier.effort
            )
            job = Parked(
                spec=spec,
                tier="bulk",
                queue=tier.queue,
                model=tier.model,
                system=tier.system_prompt,
                max_tokens=tier.max_tokens,
                effort=tier.effort,
                size=request_size(spec.job_id, request),
                enqueued_at=now,
                first_started_at=now,
                deadline=now + tier.deadline_s,
                parked_at=now,
            )
            assert ctx.batches.park(job)
            jobs.append(job)
        # the create went out (here, sent by hand) and the worker died before recording its answer
        lost = runner.api.create(
            [(j.custom_id, LLMRequest(j.job_id, j.model, j.system, "p", 64)) for j in jobs]
        )
        record = BatchRecord(
            id="tqb_lost",
            tier="bulk",
            members={j.custom_id: j.job_id for j in jobs},
            created_at=now,
            submit_attempts=1,
            attempted_at=now,
        )
        ctx.batches.save(record, now)
        runner.advance(record.id)
        adopted = ctx.batches.load(record.id)
        assert adopted is not None and adopted.status == "submitted" and adopted.api_id == lost.api_id
        assert sent(sim, [j.job_id for j in jobs]) == Counter(j.job_id for j in jobs), "sent twice"
    finally:
        keys = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            redis_client.delete(*keys)
        ctx.close()
