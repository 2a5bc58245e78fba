"""What an operator sees: Prometheus metrics, ``tierq stats``, Flower's API, the caller's context in logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import KEY_PREFIX, RUN_TAG, WorkerProcess
from tests.helpers import run_tierq, spawn, wait_until
from tierq import get_job, submit
from tierq.celery.request import redact_result_repr
from tierq.ops.embedded import free_port
from tierq.sim import SimServer
from tierq.store.keys import Keys
from tierq.store.stats import StatsStream, percentile, summarize

DOC = " ".join(
    f"Line {i} of a report about queues, tiers and the latency that users feel." for i in range(30)
)

pytestmark = pytest.mark.usefixtures("workers")


def _get(url: str, auth: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _scrape(worker: WorkerProcess) -> dict[str, list[Any]]:
    status, body = _get(worker.metrics_url)
    assert status == 200
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def _value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_worker_metrics_have_per_tier_histograms(workers: dict[str, WorkerProcess], sim: SimServer) -> None:
    failing = f"metrics-fail-{uuid.uuid4()}"
    sim.state.add_faults(["400"], job_id=failing)
    jobs = [submit(DOC, urgency="critical") for _ in range(3)]
    for job in jobs:
        job.result(timeout=30)
    with pytest.raises(Exception, match="RequestRejectedError"):
        submit(DOC, urgency="high", job_id=failing).result(timeout=30)

    samples = _scrape(workers["fast"])
    labels = {"tier": "fast", "model": "claude-haiku-4-5"}
    for histogram in ("tierq_queue_wait_seconds", "tierq_ttft_seconds", "tierq_job_duration_seconds"):
        assert _value(samples, f"{histogram}_count", **labels) >= 3, histogram
        assert _value(samples, f"{histogram}_sum", **labels) > 0, histogram
    assert _value(samples, "tierq_output_tokens_per_second_count", **labels) >= 3
    assert _value(samples, "celery_task_succeeded_total", tier="fast", queue_name="tierq.fast") >= 3
    assert _value(samples, "celery_task_failed_total", tier="fast", exception="RequestRejectedError") >= 1
    assert _value(samples, "tierq_tokens_total", tier="fast", direction="output") > 0
    assert _value(samples, "tierq_cost_usd_total", tier="fast") > 0
    # the shared rate limit: every call counted (the failed one too), reserved and used tokens
    assert _value(samples, "tierq_api_calls_total", **labels) >= 4
    assert _value(samples, "tierq_ratelimit_wait_seconds_count", tier="fast") >= 3
    reserved = _value(samples, "tierq_ratelimit_tokens_total", kind="output", stage="reserved")
    used = _value(samples, "tierq_ratelimit_tokens_total", kind="output", stage="used")
    assert reserved >= used > 0, "output is reserved at max_tokens and used at most that"
    depth = {s.labels["tier"]: s.labels["queue_name"] for s in samples["celery_queue_length"]}
    assert depth == {
        "fast": "tierq.fast",
        "standard": "tierq.standard",
        "slow": "tierq.slow",
        "bulk": "tierq.bulk",
    }
    # the slow worker serves its own figures only
    assert _value(_scrape(workers["slow"]), "tierq_ttft_seconds_count", tier="fast") == 0


def test_stats_reports_per_tier_percentiles() -> None:
    for urgency in ("critical", "normal", "critical"):
        submit(DOC, urgency=urgency).result(timeout=30)
    done = run_tierq(["stats", "--json", "--last", "50"])
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["fast"]["succeeded"] >= 2
    assert summary["standard"]["succeeded"] >= 1
    fast = summary["fast"]
    assert 0 < fast["ttft_p50_ms"] <= fast["ttft_p95_ms"] <= fast["ttft_p99_ms"]
    assert fast["queue_wait_p50_ms"] is not None and fast["total_p95_ms"] >= fast["total_p50_ms"]


def test_stats_stream_is_bounded(redis_client: Any) -> None:
    stream = StatsStream(redis_client, KEY_PREFIX + "bounded-", maxlen=100)
    for i in range(1000):
        stream.record(tier="fast", outcome="succeeded", ttft_ms=i)
    assert redis_client.xlen(Keys(KEY_PREFIX + "bounded-").stats) < 300  # MAXLEN ~ trims in whole nodes
    assert len(stream.recent(10)) == 10


def test_summarize_and_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([1, 2, 3, 4], 50) == 2.5
    entries = [{"tier": "fast", "outcome": "succeeded", "ttft_ms": str(v)} for v in range(1, 101)]
    entries.append({"tier": "fast", "outcome": "failed", "total_ms": "5"})
    row = summarize(entries)["fast"]
    assert (row["jobs"], row["succeeded"], row["failed"]) == (101, 100, 1)
    assert row["ttft_p50_ms"] == 50.5
    assert row["queue_wait_p50_ms"] is None


def test_producer_context_reaches_the_worker_log(workers: dict[str, WorkerProcess]) -> None:
    request_id = f"req-{uuid.uuid4()}"
    with structlog.contextvars.bound_contextvars(request_id=request_id, caller="billing", job_id="not-this"):
        job = submit(DOC, urgency="high")
    job.result(timeout=30)
    [line] = workers["fast"].wait_for(job.id, "summarize.completed")
    assert line["request_id"] != request_id  # the LLM request id keeps its name in the canonical line...
    received = [e for e in workers["fast"].log_events() if e.get("task_id") == job.id]
    assert all(e.get("caller") == "billing" for e in received)  # ...the caller's context rides along
    assert line["job_id"] == job.id, "the job's own fields win over the caller's"


def test_redact_result_repr() -> None:
    shown = "{'job_id': 'a', 'timings': {'ttft_ms': 12.0}, '<redacted>': '<metadata and summary>'}"
    text = "{'job_id': 'a', 'timings': {'ttft_ms': 12.0}, 'summary': 'secret words that go on"
    assert redact_result_repr(text) == shown
    text = "{'job_id': 'a', 'timings': {'ttft_ms': 12.0}, 'metadata': {'k': 'secret'}, 'summary': 'words"
    assert redact_result_repr(text) == shown
    assert redact_result_repr("None") == "None"


@pytest.fixture(scope="module")
def flower(tmp_dir: Path) -> Iterator[tuple[str, str]]:
    port = free_port()
    auth = f"ops:{uuid.uuid4().hex}"
    log = (tmp_dir / "flower.log").open("wb")
    env = {"TIERQ_FLOWER_BASIC_AUTH": auth}
    proc = spawn("tierq", ["flower", "--port", str(port)], env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def check() -> None:
        assert proc.poll() is None, (tmp_dir / "flower.log").read_text()[-2000:]

    def healthy() -> bool:
        try:
            return _get(f"{url}/healthcheck", timeout=1)[0] == 200
        except OSError:
            return False

    def hears_every_worker() -> bool:
        # Flower's event consumer has the workers' heartbeats: it is attached, and sees the jobs sent next
        status, body = _get(f"{url}/api/workers?status=true", auth=auth)
        alive = {name for name, up in json.loads(body).items() if up} if status == 200 else set()
        return {f"{tier}-{RUN_TAG}@test" for tier in ("fast", "standard", "slow")} <= alive

    try:
        wait_until(healthy, 30, "Flower's healthcheck", check, interval=0.2)
        wait_until(hears_every_worker, 30, "Flower to hear the workers' events", check, interval=0.2)
        yield url, auth
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_flower_lists_jobs_with_their_queues_behind_auth(flower: tuple[str, str]) -> None:
    url, auth = flower
    jobs = {submit(DOC, urgency=u).id: u for u in ("critical", "normal", "low")}
    for job_id in jobs:
        get_job(job_id).result(timeout=60)
    expected_queue = {"critical": "tierq.fast", "normal": "tierq.standard", "low": "tierq.slow"}

    def all_succeeded() -> dict[str, Any] | None:
        status, body = _get(f"{url}/api/tasks", auth=auth)
        assert status == 200
        tasks: dict[str, Any] = json.loads(body)
        return tasks if all(tasks.get(j, {}).get("state") == "SUCCESS" for j in jobs) else None

    tasks = wait_until(all_succeeded, 15, "Flower to list the jobs as succeeded", interval=0.3)
    for job_id, urgency in jobs.items():
        task = tasks[job_id]
        assert task["state"] == "SUCCESS"
        assert task["name"] == "tierq.summarize"
        assert task["routing_key"] == expected_queue[urgency]
        assert "chars redacted" in task["kwargs"] and DOC[:30] not in json.dumps(task)
        assert "'<redacted>': '<metadata and summary>'" in task["result"] and "ttft_ms" in task["result"]

    status, page = _get(f"{url}/tasks", auth=auth)  # the task list's columns: the queue, not the arguments
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", page.decode())
    assert status == 200 and "Routing Key" in headers and not {"args", "kwargs", "Result"} & set(headers), (
        headers
    )

    def fast_worker_listed() -> bool:
        # /api/workers asks the workers live (a broadcast with a 1 s reply window): a busy machine
        # can miss a reply, so ask until the fast pool answers
        status, body = _get(f"{url}/api/workers", auth=auth)
        assert status == 200
        return any(name.startswith("fast-") for name in json.loads(body))

    wait_until(fast_worker_listed, 15, "Flower's worker list to include the fast pool", interval=0.5)
    status, body = _get(f"{url}/api/queues/length", auth=auth)  # Flower's broker view of the queues
    assert status == 200
    assert {"tierq.fast", "tierq.standard", "tierq.slow"} <= {
        q["name"] for q in json.loads(body)["active_queues"]
    }

    assert _get(f"{url}/api/tasks")[0] == 401
    assert _get(f"{url}/api/tasks", auth="ops:wrong")[0] == 401
    assert _get(f"{url}/")[0] == 401


def test_flower_refuses_to_start_without_auth() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TIERQ_FLOWER_BASIC_AUTH"}
    done = run_tierq(["flower", "--port", str(free_port())], env, inherit_env=False)
    assert done.returncode == 2
    assert "TIERQ_FLOWER_BASIC_AUTH" in done.stderr


def test_doctor_checks_what_tierq_needs(sim: SimServer) -> None:
    done = run_tierq(["doctor"])
    assert done.returncode == 0, done.stdout + done.stderr
    for row in (
        "broker",
        "redis maxmemory-policy",
        "API",
        "model claude-haiku-4-5",
        "price claude-sonnet-5-5",
    ):
        assert row in done.stdout, row
    assert "reachable, key accepted" in done.stdout
    assert "FAIL" not in done.stdout
    # the built-in system prompt is far under every model's minimum: doctor says it is not cached
    flowing = " ".join(done.stdout.replace("│", " ").split())  # a cell's wrapped lines, joined
    assert (
        "prompt cache fast note system prompt ~34 tokens, below the 4096 claude-haiku-4-5 caches" in flowing
    )


def _tiers_file(tmp_dir: Path, model: str) -> str:
    path = tmp_dir / f"tiers-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(f'[tiers.fast]\nmodel = "{model}"\n', encoding="utf-8")
    return str(path)


@pytest.mark.slow  # a worker process started per model
@pytest.mark.parametrize(
    ("model", "word"),
    [
        ("claude-sonnet-4-20250514", "retired"),
        # deprecated in the catalogue, retired by its date (2026-11-30): the simulator's day decides
        ("claude-sonnet-4-5", "retired"),
        ("claude-nope-1", "unknown"),
    ],
)
def test_a_worker_refuses_to_start_on_a_retired_or_unknown_model(
    sim: SimServer, tmp_dir: Path, model: str, word: str
) -> None:
    env = {"TIERQ_TIERS_FILE": _tiers_file(tmp_dir, model)}
    done = run_tierq(["worker", "--tier", "fast"], env)
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.strip()]
    assert f"model {model} is {word}" in line and "tier fast" in line
    doctor = run_tierq(["doctor"], env)
    assert doctor.returncode == 1 and "FAIL" in doctor.stdout


def test_doctor_warns_on_a_deprecated_model_with_its_retirement_date(sim: SimServer, tmp_dir: Path) -> None:
    done = run_tierq(["doctor"], {"TIERQ_TIERS_FILE": _tiers_file(tmp_dir, "claude-opus-4-5")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "claude-opus-4-5 is deprecated (retires 2027-01-22)" in done.stdout
