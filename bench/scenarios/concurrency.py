"""concurrency: how many ~0.5 s model calls ONE worker process keeps in flight, and at what CPU.

For each N, one ``tierq worker --tier fast --concurrency N`` against a simulator whose every call
takes 0.5 s. The worker stops consuming (Celery's ``cancel_consumer``), 3N jobs are queued, then it
consumes again (``add_consumer``): the run is the worker alone draining a full queue, without the
producer's publishing rate in the way. Throughput is jobs / (first job started → last job done),
against the ideal N / 0.5 s. CPU of the worker, the simulator and Redis comes from ``/proc``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from bench.docs import make_doc
from bench.harness import Harness, Sim
from bench.procs import Child, cpu_s
from bench.result import Options, ScenarioResult, Target
from bench.stats import median, ratio

__all__ = ["TITLE", "run"]

TITLE = "concurrency: one fast worker process, N in-flight 0.5 s calls"
CALL_S = 0.5
TTFT_S = 0.2
JOBS_PER_SLOT = 3
FAST_QUEUE = "tierq.fast"
#: deadline long enough for 3N queued jobs (the default 15 s counts from enqueue)
TIERS_TOML = "[tiers.fast]\ndeadline_s = 600\n"
#: a process is called saturated above this share of one core
SATURATED = 0.85


def run(harness: Harness, options: Options) -> ScenarioResult:
    runs = options.runs_or(3, quick=1)
    levels: tuple[int, ...] = (16,) if options.quick else (64, 256, 512)
    import os

    if os.environ.get("BENCH_LEVELS"):
        levels = tuple(int(x) for x in os.environ["BENCH_LEVELS"].split(","))
    doc = make_doc(8, seed=5)
    result = ScenarioResult(
        "concurrency",
        TITLE,
        config={
            "runs": runs,
            "n": list(levels),
            "jobs_per_run": f"{JOBS_PER_SLOT}*N",
            "sim_call_s": CALL_S,
            "sim_ttft_s": TTFT_S,
            "doc_chars": len(doc),
        },
        pools=[f"tierq fast: threads -c{n}" for n in levels],
    )
    with harness.stage("concurrency") as stage:
        sim = stage.start_sim(fixed_ttft_s=TTFT_S, fixed_total_s=CALL_S)
        tiers_file = stage.write_tiers(TIERS_TOML)
        from worker.tiers import load_tier_table

        tiers = load_tier_table(tiers_file)
        with contextlib.closing(harness.client()) as client:
            redis_pid = int(client.info("server")["process_id"])
            for n in levels:
                worker = stage.start_worker(
                    "fast",
                    sim,
                    concurrency=n,
                    tiers_file=tiers_file,
                    extra_env={"TIERQ_REDIS_MAX_CONNECTIONS": str(2 * n + 64)},
                )
                _one_run(client, worker, sim, redis_pid, n, doc, tiers, slots=1)  # warm-up: connections
                for i in range(runs):
                    sim.reset()
                    figures = _one_run(client, worker, sim, redis_pid, n, doc, tiers)
                    result.runs.append({"n": n, "run": i, **figures})
                stage.stop(worker)
    _summarize(result, levels)
    return result


def _one_run(
    client: Any,
    worker: Child,
    sim: Sim,
    redis_pid: int,
    n: int,
    doc: str,
    tiers: Any,
    slots: int = JOBS_PER_SLOT,
) -> dict[str, Any]:
    from bench.producer import EnqueueStamps, submit, wait_results
    from worker.app import app

    assert worker.node is not None
    app.control.cancel_consumer(FAST_QUEUE, destination=[worker.node], reply=True, timeout=5)
    stamps = EnqueueStamps()
    try:
        ids = [submit(doc, "high", tiers=tiers).id for _ in range(slots * n)]
    finally:
        stamps.close()
    rss_idle = worker.rss_mb()
    procs = {"worker": worker.pid, "sim": sim.child.pid, "redis": redis_pid}
    cpu_before = {name: cpu_s(pid) for name, pid in procs.items()}
    started = time.monotonic()
    app.control.add_consumer(FAST_QUEUE, destination=[worker.node], reply=True, timeout=5)
    metas = wait_results(client, ids, timeout=300, interval=0.1)
    wall = time.monotonic() - started
    cpu = {name: cpu_s(pid) - cpu_before[name] for name, pid in procs.items()}
    ok = [(i, m["result"]) for i, m in metas.items() if m.get("status") == "SUCCESS"]
    spans = [_span(stamps[i], r["timings"]) for i, r in ok]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    jobs_per_s = len(ok) / (last - first) if last > first else float("nan")
    ideal = n / CALL_S
    llm_s = [r["timings"]["llm_ms"] / 1000 for _, r in ok]
    return {
        "jobs": len(ids),
        "failed": len(ids) - len(ok),
        "jobs_per_s": round(jobs_per_s, 1),
        "ideal_jobs_per_s": ideal,
        "fraction_of_ideal": ratio(jobs_per_s, ideal),
        "peak_in_flight": _peak(spans),
        "mean_in_flight": round(sum(llm_s) / (last - first), 1) if last > first else None,
        "llm_s_p50": median(llm_s),
        "worker_cpu_ms_per_job": round(cpu["worker"] * 1000 / max(1, len(ok)), 3),
        "cpu_util": {name: round(seconds / wall, 3) for name, seconds in cpu.items()},
        "output_tokens": ok[0][1]["usage"]["output_tokens"] if ok else None,
        "worker_rss_mb_idle": round(rss_idle, 1),
        "worker_rss_mb_after": round(worker.rss_mb(), 1),
    }


def _span(enqueued: float, timings: dict[str, Any]) -> tuple[float, float]:
    """(job started, job done) as ``time.time()`` instants."""
    return enqueued + timings["queue_wait_ms"] / 1000, enqueued + timings["total_ms"] / 1000


def _peak(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def _summarize(result: ScenarioResult, levels: tuple[int, ...]) -> None:
    result.columns = [
        "N (threads)", "jobs/s", "ideal", "% of ideal", "peak in flight", "worker CPU ms/job",
        "worker CPU", "sim CPU", "redis CPU", "RSS MB", "failed",
    ]  # fmt: skip
    samples: dict[str, list[float]] = {
        k: [] for k in ("n", "jobs_per_s", "ideal_jobs_per_s", "fraction", "cpu_ms_per_job")
    }
    for n in levels:
        runs = [r for r in result.runs if r["n"] == n]
        row = {
            "jobs_per_s": median(r["jobs_per_s"] for r in runs),
            "fraction_of_ideal": median(r["fraction_of_ideal"] for r in runs),
            "peak_in_flight": median(r["peak_in_flight"] for r in runs),
            "worker_cpu_ms_per_job": median(r["worker_cpu_ms_per_job"] for r in runs),
            "cpu_util": {p: median(r["cpu_util"][p] for r in runs) for p in ("worker", "sim", "redis")},
            "worker_rss_mb": median(r["worker_rss_mb_after"] for r in runs),
            "failed": sum(r["failed"] for r in runs),
        }
        result.summary[f"n{n}"] = row
        util = row["cpu_util"]
        result.rows.append(
            [
                n, row["jobs_per_s"], n / CALL_S, f"{row['fraction_of_ideal']:.0%}", row["peak_in_flight"],
                row["worker_cpu_ms_per_job"], f"{util['worker']:.0%}", f"{util['sim']:.0%}",
                f"{util['redis']:.0%}", row["worker_rss_mb"], row["failed"],
            ]
        )  # fmt: skip
        samples["n"].append(n)
        samples["jobs_per_s"].append(row["jobs_per_s"])
        samples["ideal_jobs_per_s"].append(n / CALL_S)
        samples["fraction"].append(row["fraction_of_ideal"])
        samples["cpu_ms_per_job"].append(row["worker_cpu_ms_per_job"])
        bottleneck = [p for p in ("worker", "sim") if util[p] >= SATURATED]
        if bottleneck:
            which = ", ".join(f"{p} at {util[p]:.0%} of a core" for p in bottleneck)
            why = (
                "the simulator (one Python process) is a bottleneck too"
                if "sim" in bottleneck
                else "the worker process is CPU-bound (GIL), the simulator is not"
            )
            result.notes.append(f"N={n}: saturated ({which}); {why}")
    result.samples = samples
    top = result.summary[f"n{levels[-1]}"]
    ceiling = round(1000 / top["worker_cpu_ms_per_job"], 1)
    result.summary["cpu_bound_ceiling_jobs_per_s"] = ceiling
    result.notes.append(
        f"one process tops out near 1 / (CPU per job) = {ceiling:.0f} jobs/s, "
        f"i.e. about {ceiling * CALL_S:.0f} calls of {CALL_S} s in flight at full speed"
    )
    result.targets = [
        Target(f"share of ideal at N={levels[-1]}", top["fraction_of_ideal"], ">=", 0.9),
        Target(
            f"peak in flight at N={levels[-1]}",
            top["peak_in_flight"],
            ">=",
            500 if levels[-1] >= 500 else levels[-1],
        ),
    ]
