"""isolation: fast-tier latency with the slow tier idle vs holding a 10x backlog.

Two tierq pools as an operator runs them: fast (threads, tier default) and slow (few threads).
Each run has an idle phase (fast jobs one at a time, slow pool idle) and a backlog phase (the
slow pool busy with long jobs and 10x its threads more queued, topped up between fast jobs so it
stays near 10x, while the same fast jobs run). The
simulator runs without jitter, so a fast job's model time is the same in both phases; what
differs is only what the slow tier's work does to the fast tier (CPU, Redis, simulator).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from bench.docs import make_doc
from bench.harness import Harness, Sim
from bench.procs import Child, wait_until
from bench.result import Options, ScenarioResult, Target
from bench.stats import median, ratio, summarize

__all__ = ["TITLE", "run"]

TITLE = "isolation: fast tier, slow tier idle vs 10x backlog"
SLOW_THREADS = 4
BACKLOG_FACTOR = 10
#: 0.05: 20x faster than the published speeds; a slow job (~2,000 output tokens of Opus) takes ~2.5 s
TIME_SCALE = 0.05
SLOW_QUEUE = "tierq.slow"


def run(harness: Harness, options: Options) -> ScenarioResult:
    runs = options.runs_or(3, quick=1)
    fast_jobs = 8 if options.quick else 100
    fast_doc, slow_doc = make_doc(24, seed=2), make_doc(480, seed=3)
    backlog = SLOW_THREADS * BACKLOG_FACTOR
    result = ScenarioResult(
        "isolation",
        TITLE,
        config={
            "runs": runs,
            "fast_jobs_per_phase": fast_jobs,
            "slow_threads": SLOW_THREADS,
            "slow_jobs_queued": backlog,
            "slow_jobs_running": SLOW_THREADS,
            "sim_time_scale": TIME_SCALE,
            "sim_jitter": 0,
            "fast_doc_chars": len(fast_doc),
            "slow_doc_chars": len(slow_doc),
        },
        pools=["tierq fast: threads -c32 (tier default)", f"tierq slow: threads -c{SLOW_THREADS}"],
    )
    with harness.stage("isolation") as stage:
        sim = stage.start_sim(time_scale=TIME_SCALE, jitter=0.0)
        fast = stage.start_worker("fast", sim)
        slow = stage.start_worker("slow", sim, concurrency=SLOW_THREADS)
        from bench.producer import submit

        for _ in range(5):  # warm the fast pool's SDK client and connections
            submit(fast_doc, "high").result(timeout=30)
        with contextlib.closing(harness.client()) as client:
            for i in range(runs):
                idle = _phase(fast_jobs, fast_doc, [fast, slow, sim.child])
                busy = _backlog_phase(
                    client, fast_jobs, fast_doc, slow_doc, backlog, [fast, slow, sim.child], sim
                )
                result.runs.append(_run_figures(i, idle, busy))
    _summarize(result)
    return result


def _phase(
    count: int, doc: str, watched: list[Child], between: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Fast jobs one at a time; their submit → result and total_ms, and the CPU the processes used.

    ``between`` runs after each fast job has ended, outside what is timed.
    """
    from bench.producer import submit

    cpu_before = [c.cpu_s() for c in watched]
    started = time.monotonic()
    e2e: list[float] = []
    totals: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        value = submit(doc, "high").result(timeout=30).to_json()
        e2e.append((time.perf_counter() - t0) * 1000)
        totals.append(value["timings"]["total_ms"])
        if between is not None:
            between()
        time.sleep(0.005)
    wall = time.monotonic() - started
    cpu = {c.name: round((c.cpu_s() - b) / wall, 3) for c, b in zip(watched, cpu_before, strict=True)}
    return {"e2e": e2e, "total": totals, "cpu_util": cpu}


def _backlog_phase(
    client: Any, count: int, fast_doc: str, slow_doc: str, backlog: int, watched: list[Child], sim: Sim
) -> dict[str, Any]:
    """Fill the slow tier (every thread busy, ``backlog`` more queued), run the fast jobs, drain."""
    from bench.producer import delete_queue, queue_length, submit

    slow_jobs = [submit(slow_doc, "low") for _ in range(SLOW_THREADS + backlog)]
    wait_until("slow pool busy", lambda: queue_length(client, SLOW_QUEUE) <= backlog, 30)
    time.sleep(0.3)  # the slow streams are under way
    depths = [queue_length(client, SLOW_QUEUE)]

    def top_up() -> None:
        depth = queue_length(client, SLOW_QUEUE)
        depths.append(depth)
        slow_jobs.extend(submit(slow_doc, "low") for _ in range(backlog - depth))

    phase = _phase(count, fast_doc, watched, between=top_up)
    phase["slow_queue_depth"] = [min(depths), max(depths)]
    # drop what is still queued, let the running slow jobs end before the next idle phase
    delete_queue(client, SLOW_QUEUE)
    wait_until("slow pool idle", lambda: sum(j.status() == "running" for j in slow_jobs) == 0, 60, 0.2)
    return phase


def _run_figures(index: int, idle: dict[str, Any], busy: dict[str, Any]) -> dict[str, Any]:
    idle_e2e, busy_e2e = summarize(idle["e2e"]), summarize(busy["e2e"])
    idle_total, busy_total = summarize(idle["total"]), summarize(busy["total"])
    return {
        "run": index,
        "idle_e2e_ms": idle_e2e,
        "backlog_e2e_ms": busy_e2e,
        "idle_total_ms": idle_total,
        "backlog_total_ms": busy_total,
        "ratio_p50": ratio(busy_e2e["p50"], idle_e2e["p50"]),
        "ratio_p99": ratio(busy_e2e["p99"], idle_e2e["p99"]),
        "ratio_total_p99": ratio(busy_total["p99"], idle_total["p99"]),
        "idle_cpu_util": idle["cpu_util"],
        "backlog_cpu_util": busy["cpu_util"],
        "slow_queue_depth_min_max": busy["slow_queue_depth"],
        "_idle": idle["e2e"],
        "_busy": busy["e2e"],
    }


def _summarize(result: ScenarioResult) -> None:
    runs = result.runs
    qs = ("p50", "p95", "p99")
    keys = ("idle_e2e_ms", "backlog_e2e_ms", "idle_total_ms", "backlog_total_ms")
    summary: dict[str, Any] = {key: {q: median(r[key][q] for r in runs) for q in qs} for key in keys}
    for key in ("ratio_p50", "ratio_p99", "ratio_total_p99"):
        summary[key] = median(r[key] for r in runs)
    for phase in ("idle_cpu_util", "backlog_cpu_util"):
        names = runs[0][phase].keys()
        summary[phase] = {n: median(r[phase][n] for r in runs) for n in names}
    summary["slow_queue_depth_min"] = min(r["slow_queue_depth_min_max"][0] for r in runs)
    summary["slow_queue_depth_max"] = max(r["slow_queue_depth_min_max"][1] for r in runs)
    result.summary = summary
    result.samples = {"idle_ms": runs[-1]["_idle"], "backlog_ms": runs[-1]["_busy"]}
    for r in runs:
        r.pop("_idle")
        r.pop("_busy")
    result.columns = ["fast job, median of runs (ms)", "p50", "p95", "p99"]
    result.rows = [
        ["submit → result, slow tier idle", *(summary["idle_e2e_ms"][q] for q in qs)],
        ["submit → result, slow tier backlog", *(summary["backlog_e2e_ms"][q] for q in qs)],
        ["total_ms (enqueue → done), idle", *(summary["idle_total_ms"][q] for q in qs)],
        ["total_ms (enqueue → done), backlog", *(summary["backlog_total_ms"][q] for q in qs)],
        ["ratio backlog/idle (submit → result)", summary["ratio_p50"], None, summary["ratio_p99"]],
    ]
    result.targets = [Target("isolation ratio p99(backlog)/p99(idle)", summary["ratio_p99"], "<=", 1.2, "x")]
    util = summary["backlog_cpu_util"]
    result.notes = [
        f"slow queue depth during backlog phases: {summary['slow_queue_depth_min']}"
        f"-{summary['slow_queue_depth_max']} jobs (topped up to {SLOW_THREADS * BACKLOG_FACTOR}"
        f" after each fast job), {SLOW_THREADS} running",
        "CPU share of one core during backlog: "
        + ", ".join(f"{name} {share:.0%}" for name, share in util.items())
        + " (idle: "
        + ", ".join(f"{name} {share:.0%}" for name, share in summary["idle_cpu_util"].items())
        + ")",
    ]
