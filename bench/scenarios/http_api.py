"""http: what the HTTP front door adds to a submit, side by side with Python's ``submit()`` in the same run.

Both are timed from the caller's clock just before the call to the HTTP request reaching the
simulator (its recorded arrival for the job id), on the fast tier:
(a) ``tierq.submit(doc, "high")`` in this process;
(b) ``POST /v1/jobs`` to ``tierq api`` (a separate process, one bearer token, one request log line
each) over a kept-alive loopback connection; its ``202`` round trip is reported too.
Jobs run one at a time, (a) and (b) interleaved, each waited for before the next, so this is
latency, not queueing; the simulator answers at once.
"""

from __future__ import annotations

import time
from typing import Any

import httpx2

from bench.docs import make_doc
from bench.harness import Harness
from bench.result import Options, ScenarioResult
from bench.stats import median, summarize

__all__ = ["TITLE", "run"]

TITLE = "http: submit → request at simulator, Python submit() vs POST /v1/jobs"
RESULT_TIMEOUT_S = 15.0


def run(harness: Harness, options: Options) -> ScenarioResult:
    runs = options.runs_or(3, quick=1)
    jobs = 15 if options.quick else 200
    warmup = 3 if options.quick else 10
    doc = make_doc(24, seed=1)
    result = ScenarioResult(
        "http",
        TITLE,
        config={
            "runs": runs,
            "jobs_per_run": jobs,
            "warmup": warmup,
            "doc_chars": len(doc),
            "sim_time_scale": 0,
        },
        pools=["tierq fast: threads -c32 (tier default)", "tierq api: one uvicorn process, INFO request log"],
    )
    with harness.stage("http") as stage:
        sim = stage.start_sim(time_scale=0.0)
        stage.start_worker("fast", sim)
        api = stage.start_api()
        with httpx2.Client(base_url=api.url, headers=api.headers, timeout=RESULT_TIMEOUT_S) as client:
            for i in range(runs):
                _interleaved(client, warmup, doc)
                sim.reset()
                python, http, posts = _interleaved(client, jobs, doc)
                result.runs.append(_run_figures(i, python, http, posts, sim.timings()))
    _summarize(result)
    return result


def _interleaved(
    client: httpx2.Client, count: int, doc: str
) -> tuple[list[tuple[str, float]], list[tuple[str, float]], list[float]]:
    """One job through ``submit()``, one through ``POST /v1/jobs``, each waited for; ``count`` times.

    Returns (job id, wall-clock start) of each, and the POST round trips in ms.
    """
    from bench.producer import submit
    from tierq.producer import get_job

    python: list[tuple[str, float]] = []
    http: list[tuple[str, float]] = []
    posts: list[float] = []
    for _ in range(count):
        started = time.time()
        job = submit(doc, "high")
        python.append((job.id, started))
        job.result(timeout=RESULT_TIMEOUT_S)
        started = time.time()
        response = client.post("/v1/jobs", json={"text": doc, "urgency": "high"})
        posts.append((time.time() - started) * 1000)
        response.raise_for_status()
        job_id = str(response.json()["job_id"])
        http.append((job_id, started))
        get_job(job_id).result(timeout=RESULT_TIMEOUT_S)
        time.sleep(0.002)  # let the pool go back to waiting on Redis
    return python, http, posts


def _to_request(
    started: list[tuple[str, float]], timings: dict[str, list[dict[str, float | None]]]
) -> list[float]:
    out = []
    for job_id, at in started:
        requests = timings.get(job_id) or []
        arrived = requests[0]["arrived_at"] if requests else None
        if arrived is not None:
            out.append((arrived - at) * 1000)
    return out


def _run_figures(
    index: int,
    python: list[tuple[str, float]],
    http: list[tuple[str, float]],
    posts: list[float],
    timings: dict[str, list[dict[str, float | None]]],
) -> dict[str, Any]:
    python_ms, http_ms = _to_request(python, timings), _to_request(http, timings)
    python_s, http_s = summarize(python_ms), summarize(http_ms)
    return {
        "run": index,
        "python_ms": python_s,
        "http_ms": http_s,
        "post_202_ms": summarize(posts),
        **{f"added_{q}_ms": round(http_s[q] - python_s[q], 3) for q in ("p50", "p95", "p99")},
        "_python": python_ms,
        "_http": http_ms,
    }


def _summarize(result: ScenarioResult) -> None:
    runs = result.runs
    keys = ("python_ms", "http_ms", "post_202_ms")
    summary: dict[str, Any] = {
        key: {q: median(r[key][q] for r in runs) for q in ("p50", "p95", "p99")} for key in keys
    }
    for q in ("p50", "p95", "p99"):
        summary[f"added_{q}_ms"] = median(r[f"added_{q}_ms"] for r in runs)
    result.summary = summary
    last = runs[-1]
    result.samples = {"python_ms": last["_python"], "http_ms": last["_http"]}
    for r in runs:
        r.pop("_python", None)
        r.pop("_http", None)
    result.columns = ["median of runs (ms)", "p50", "p95", "p99"]
    labels = {
        "python_ms": "(a) tierq.submit() → request at simulator",
        "http_ms": "(b) POST /v1/jobs → request at simulator",
        "post_202_ms": "    POST /v1/jobs → 202 received",
    }
    for key, label in labels.items():
        result.rows.append([label, *(summary[key][q] for q in ("p50", "p95", "p99"))])
    result.rows.append(
        [
            "added by HTTP, (b) - (a), median of runs",
            *(summary[f"added_{q}_ms"] for q in ("p50", "p95", "p99")),
        ]
    )
