"""overhead: what tierq adds to a Celery hop, side by side with a raw Celery no-op in the same run.

(a) raw: ``bench.rawapp``'s no-op, publish stamp (``before_task_publish``) → task body starts.
(b) tierq fast tier: ``tierq_enqueued_at`` (stamped at the same point of publishing) → the HTTP
request reaches the simulator (its recorded arrival for the job id). Jobs run one at a time,
raw and tierq interleaved, so this is latency, not queueing; the simulator answers at once.
A third pool, (a') the raw no-op with the Celery settings tierq adds (task events, track_started),
splits tierq's extra time between Celery's features and tierq's own code.
"""

from __future__ import annotations

import time
from typing import Any

from bench.docs import make_doc
from bench.harness import Harness
from bench.result import Options, ScenarioResult, Target
from bench.stats import median, ratio, summarize

__all__ = ["TITLE", "run"]

TITLE = "overhead: enqueue → work starts, raw Celery vs tierq fast"
RESULT_TIMEOUT_S = 15.0


def run(harness: Harness, options: Options) -> ScenarioResult:
    runs = options.runs_or(3, quick=2)
    jobs = 15 if options.quick else 200
    warmup = 3 if options.quick else 10
    doc = make_doc(24, seed=1)
    result = ScenarioResult(
        "overhead",
        TITLE,
        config={
            "runs": runs,
            "jobs_per_run": jobs,
            "warmup": warmup,
            "doc_chars": len(doc),
            "sim_time_scale": 0,
        },
        pools=[
            "raw Celery: threads -c32, prefetch 1, acks_late",
            "raw Celery + events + track_started: same, -E",
            "tierq fast: threads -c32 (tier default)",
        ],
    )
    with harness.stage("overhead") as stage:
        sim = stage.start_sim(time_scale=0.0)
        stage.start_raw_worker(concurrency=32)
        stage.start_raw_worker(concurrency=32, events=True)
        stage.start_worker("fast", sim)
        from bench.producer import EnqueueStamps

        stamps = EnqueueStamps()
        try:
            for i in range(runs):
                _interleaved(warmup, doc)
                sim.reset()
                raw, raw_events, tierq = _interleaved(jobs, doc)
                result.runs.append(_run_figures(i, raw, raw_events, tierq, stamps, sim.timings()))
        finally:
            stamps.close()
    _summarize(result)
    return result


def _raw_ms(handle: Any) -> float:
    meta = handle.get(timeout=RESULT_TIMEOUT_S)
    return float(meta["started_at"] - meta["sent_at"]) * 1000


def _interleaved(count: int, doc: str) -> tuple[list[float], list[float], list[tuple[str, dict[str, Any]]]]:
    """One raw no-op, one with events, one tierq job, each waited for before the next; ``count`` times."""
    from bench.producer import submit
    from bench.rawapp import send_noop, send_noop_events

    raw: list[float] = []
    raw_events: list[float] = []
    tierq: list[tuple[str, dict[str, Any]]] = []
    for _ in range(count):
        raw.append(_raw_ms(send_noop()))
        raw_events.append(_raw_ms(send_noop_events()))
        job = submit(doc, "high")
        tierq.append((job.id, job.result(timeout=RESULT_TIMEOUT_S).to_json()))
        time.sleep(0.002)  # let every pool go back to waiting on Redis
    return raw, raw_events, tierq


def _run_figures(
    index: int,
    raw: list[float],
    raw_events: list[float],
    tierq: list[tuple[str, dict[str, Any]]],
    stamps: Any,
    timings: dict[str, list[dict[str, float | None]]],
) -> dict[str, Any]:
    to_request: list[float] = []
    to_body: list[float] = []
    body_to_request: list[float] = []
    for job_id, value in tierq:
        requests = timings.get(job_id) or []
        arrived = requests[0]["arrived_at"] if requests else None
        if arrived is None:
            continue
        total = (arrived - stamps[job_id]) * 1000
        to_request.append(total)
        wait = value["timings"]["queue_wait_ms"]
        if wait is not None:
            to_body.append(wait)
            body_to_request.append(total - wait)
    raw_s, tierq_s = summarize(raw), summarize(to_request)
    return {
        "run": index,
        "raw_ms": raw_s,
        "raw_events_ms": summarize(raw_events),
        "tierq_ms": tierq_s,
        "tierq_enqueue_to_body_ms": summarize(to_body),
        "tierq_body_to_request_ms": summarize(body_to_request),
        "ratio_p50": ratio(tierq_s["p50"], raw_s["p50"]),
        "ratio_p95": ratio(tierq_s["p95"], raw_s["p95"]),
        "ratio_p99": ratio(tierq_s["p99"], raw_s["p99"]),
        "_raw": raw,
        "_raw_events": raw_events,
        "_tierq": to_request,
    }


def _summarize(result: ScenarioResult) -> None:
    runs = result.runs
    keys = ("raw_ms", "raw_events_ms", "tierq_ms", "tierq_enqueue_to_body_ms", "tierq_body_to_request_ms")
    summary: dict[str, Any] = {
        key: {q: median(r[key][q] for r in runs) for q in ("p50", "p95", "p99")} for key in keys
    }
    for q in ("p50", "p95", "p99"):
        summary[f"ratio_{q}"] = median(r[f"ratio_{q}"] for r in runs)
    result.summary = summary
    last = runs[-1]
    result.samples = {
        "raw_ms": last["_raw"],
        "raw_events_ms": last["_raw_events"],
        "tierq_ms": last["_tierq"],
    }
    for r in runs:
        for key in ("_raw", "_raw_events", "_tierq"):
            r.pop(key, None)
    result.columns = ["median of runs (ms)", "p50", "p95", "p99"]
    labels = {
        "raw_ms": "(a) raw Celery no-op: publish → task body",
        "raw_events_ms": "(a') same + task events + track_started (tierq's settings)",
        "tierq_ms": "(b) tierq fast: enqueue → request at simulator",
        "tierq_enqueue_to_body_ms": "    of which enqueue → task body (queue_wait_ms)",
        "tierq_body_to_request_ms": "    of which task body → request at simulator",
    }
    for key, label in labels.items():
        result.rows.append([label, *(summary[key][q] for q in ("p50", "p95", "p99"))])
    result.rows.append(
        ["ratio (b)/(a), median of per-run ratios", *(summary[f"ratio_{q}"] for q in ("p50", "p95", "p99"))]
    )
    result.targets = [
        Target("overhead ratio p50", summary["ratio_p50"], "<=", 1.5, "x"),
        Target("overhead ratio p99", summary["ratio_p99"], "<=", 2.0, "x"),
    ]
