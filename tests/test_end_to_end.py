"""Producer → Redis → a real worker pool per tier → the SDK → the simulator, and back.

The workers are ``tierq worker --tier X`` subprocesses (see ``conftest.workers``); nothing is eager.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import WorkerProcess
from tests.helpers import run_tierq, wait_until
from tierq import get_job, submit
from tierq.contract.errors import InvalidJobError, JobFailedError
from tierq.core.settings import get_tier_table
from tierq.sim import SimServer

DOC = " ".join(
    f"Paragraph {i} says that tiered queues keep urgent work fast while slow work waits its turn."
    for i in range(60)
)

pytestmark = pytest.mark.usefixtures("workers")


@pytest.mark.parametrize(
    ("urgency", "tier", "model"),
    [
        ("critical", "fast", "claude-haiku-4-5"),
        ("high", "fast", "claude-haiku-4-5"),
        ("normal", "standard", "claude-sonnet-5-5"),
        ("low", "slow", "claude-opus-5-5"),
    ],
)
def test_each_urgency_runs_on_its_tier(
    urgency: str, tier: str, model: str, workers: dict[str, WorkerProcess], sim: SimServer
) -> None:
    job = submit(DOC, urgency=urgency, metadata={"caller": "test"})
    result = job.result(timeout=30).to_json()
    queue = get_tier_table().tiers[tier].queue
    assert (result["tier"], result["model"]) == (tier, model)
    [line] = workers[tier].wait_for(job.id, "summarize.completed")
    assert (line["tier"], line["queue"], line["model"]) == (tier, queue, model)
    assert sim.state.request_count(job.id) == 1
    assert job.status() == "succeeded"


def test_result_shape_and_completed_log_line(workers: dict[str, WorkerProcess]) -> None:
    job = submit(
        DOC, urgency="high", instructions="Summarize in two sentences.", job_id=f"shape-{uuid.uuid4()}"
    )
    result = job.result(timeout=30).to_json()
    assert set(result) >= {"job_id", "tier", "model", "summary", "stop_reason", "usage", "timings"}
    assert result["job_id"] == job.id
    assert result["summary"].strip()
    assert result["stop_reason"] in ("end_turn", "max_tokens")
    assert result["usage"]["input_tokens"] > 0 and 0 < result["usage"]["output_tokens"] <= 256
    timings = result["timings"]
    assert 0 <= timings["queue_wait_ms"] < timings["total_ms"]
    assert 0 < timings["ttft_ms"] <= timings["llm_ms"] <= timings["total_ms"]
    assert timings["output_tokens_per_s"] > 0
    assert result["cost_usd"] > 0 and result["retries"] == 0 and result["request_id"].startswith("req_")

    lines = workers["fast"].wait_for(job.id, "summarize.completed")
    assert len(lines) == 1, "exactly one canonical line per job"
    line = lines[0]
    assert line["task_id"] == job.id and line["level"] == "info"
    for key in (
        "queue_wait_ms",
        "ttft_ms",
        "total_ms",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "retries",
    ):
        assert line[key] == {**timings, **result["usage"], **result}[key], key
    text = workers["fast"].log_path.read_text()
    assert DOC[:50] not in text and result["summary"][:40] not in text, "no prompt or summary text in logs"


def test_max_tokens_truncates() -> None:
    result = submit(DOC, urgency="critical", max_tokens=8).result(timeout=30).to_json()
    assert result["stop_reason"] == "max_tokens"
    assert result["usage"]["output_tokens"] <= 8


def test_529_then_success_is_retried_once(sim: SimServer, workers: dict[str, WorkerProcess]) -> None:
    job_id = f"retry-{uuid.uuid4()}"
    sim.state.add_faults(["529"], job_id=job_id)
    result = submit(DOC, urgency="high", job_id=job_id).result(timeout=30).to_json()
    assert result["retries"] == 1
    assert sim.state.request_count(job_id) == 2
    assert len(workers["fast"].wait_for(job_id, "summarize.retrying")) == 1
    assert len(workers["fast"].wait_for(job_id, "summarize.completed")) == 1
    assert workers["fast"].events_for(job_id, "summarize.failed") == []


def test_400_is_not_retried(sim: SimServer, workers: dict[str, WorkerProcess]) -> None:
    job_id = f"bad-{uuid.uuid4()}"
    sim.state.add_faults(["400"], job_id=job_id)
    job = submit(DOC, urgency="high", job_id=job_id)
    with pytest.raises(JobFailedError) as info:
        job.result(timeout=30)
    assert info.value.error_type == "RequestRejectedError"
    assert job.status() == "failed"
    assert sim.state.request_count(job_id) == 1
    [line] = workers["fast"].wait_for(job_id, "summarize.failed")
    assert line["status_code"] == 400 and line["reason"] == "not retryable" and line["level"] == "error"
    assert workers["fast"].events_for(job_id, "summarize.retrying") == []


def test_bad_input_never_reaches_the_broker(workers: dict[str, WorkerProcess]) -> None:
    before = workers["fast"].queue_depths()
    for kwargs in ({"text": ""}, {"text": "ok", "urgency": "bogus"}, {"text": "ok", "max_tokens": 10**6}):
        with pytest.raises(InvalidJobError):
            submit(**kwargs)  # type: ignore[arg-type]
    assert workers["fast"].queue_depths() == before


def test_fast_tier_finishes_while_slow_queue_holds_a_backlog(
    sim: SimServer, workers: dict[str, WorkerProcess]
) -> None:
    backlog = []
    for _ in range(8):  # the slow pool has 2 threads; each job stalls 2 s in the simulator
        job_id = f"backlog-{uuid.uuid4()}"
        sim.state.add_faults(["stall:2"], job_id=job_id)
        backlog.append(submit(DOC, urgency="low", job_id=job_id))
    wait_until(
        lambda: sum(sim.state.request_count(job.id) for job in backlog) >= 2, 10, "the slow pool to be busy"
    )
    # what an operator sees on the fast worker's /metrics: the slow tier's queue, at the same moment
    assert workers["fast"].queue_depths()["slow"] >= 4, "the slow tier has a backlog"

    fast = submit(DOC, urgency="critical").result(timeout=10).to_json()
    assert fast["tier"] == "fast"
    assert workers["fast"].queue_depths()["slow"] >= 2, "the backlog was still there when fast work finished"
    assert sum(job.ready() for job in backlog) <= 2
    assert fast["timings"]["queue_wait_ms"] < 1000
    for job in backlog:  # nothing lost: the backlog drains
        assert job.result(timeout=60).tier == "slow"


def test_cli_submit_wait_json(workers: dict[str, WorkerProcess]) -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    done = run_tierq(["submit", "--urgency", "high", "--file", str(readme), "--wait", "--json"])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["model"] == "claude-haiku-4-5"
    assert result["usage"]["output_tokens"] <= 256
    assert result["timings"]["queue_wait_ms"] is not None and result["timings"]["ttft_ms"] > 0
    assert len(workers["fast"].wait_for(result["job_id"], "summarize.completed")) == 1


def test_cli_submit_then_result() -> None:
    done = run_tierq(["submit", "--urgency", "normal", "--json"], stdin=DOC)
    assert done.returncode != 0  # no text given: stdin is read only with --file -
    done = run_tierq(["submit", "--urgency", "normal", "--file", "-", "--json"], stdin=DOC)
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["job_id"]
    fetched = run_tierq(["result", job_id, "--wait", "--json"])
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["job_id"] == job_id
    assert get_job(job_id).status() == "succeeded"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("submit", "--urgency", "bogus", "some text"), "urgency: 'bogus' is not one of"),
        (("submit", "--urgency", "high", ""), "text: is empty"),
        (("submit", "--urgency", "high", "--max-tokens", "999", "text"), "max_tokens: 999 is above"),
        (("submit", "--metadata", "{nope", "text"), "metadata: not valid JSON"),
        (("submit", "--file", "/does/not/exist"), "cannot read --file"),
        (("worker", "--tier", "turbo"), "unknown tier 'turbo'"),
    ],
)
def test_cli_bad_input_fails_fast_with_one_line(
    args: tuple[str, ...], message: str, workers: dict[str, WorkerProcess]
) -> None:
    before = workers["fast"].queue_depths()
    started = time.monotonic()
    done = run_tierq(args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert time.monotonic() - started < 10
    assert workers["fast"].queue_depths() == before


def test_submit_with_the_broker_down_fails_fast_with_one_line() -> None:
    from tierq.ops.embedded import free_port

    started = time.monotonic()
    done = run_tierq(["submit", "some text"], {"TIERQ_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert done.returncode == 2
    assert "broker unavailable, job not enqueued" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert time.monotonic() - started < 15
