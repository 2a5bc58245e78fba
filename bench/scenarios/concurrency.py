"""concurrency: how many ~0.5 s model calls ONE worker process keeps in flight, and at what CPU.

For each N, one ``tierq worker --tier fast --concurrency N`` against a simulator whose every call
takes 0.5 s. The worker stops consuming (Celery's ``cancel_consumer``), 3N jobs are queued, then it
consumes again (``add_consumer``): the run is the worker alone draining a full queue, without the
producer's publishing rate in the way. Throughput is jobs / (first job started → last job done),
against the ideal N / 0.5 s. CPU of the worker, the simulator and Redis comes from ``/proc``.

Three ways, same N, same run:

- ``asyncio``: tierq as shipped (``io = "asyncio"``): pool threads hand calls to one event loop;
- ``threads``: tierq with ``io = "threads"``: each pool thread reads its own stream;
- ``raw sleep``: plain Celery (``bench.rawapp``), a task that only sleeps 0.5 s: the floor, what
  Celery itself keeps in flight in one process with no model call at all.

The fast tier's ``max_tokens`` is 64 here: a 0.5 s call at Haiku 4.5's published ~110 output
tokens/s carries ~55 tokens (../shared/FINDINGS.md); 256 tokens in 0.5 s would be 5x the model.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial
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
#: deadline long enough for 3N queued jobs (the default 15 s counts from enqueue); a reply the
#: length a 0.5 s call carries; how the call is made
TIERS_TOML = '[tiers.fast]\ndeadline_s = 600\nmax_tokens = 64\nio = "{io}"\n'
#: the ways compared: (name, runs taken of it; None = the scenario's runs)
VARIANTS: tuple[tuple[str, int | None], ...] = (("asyncio", None), ("threads", 1), ("raw sleep", 1))
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
            "runs": {name: n or runs for name, n in VARIANTS},
            "n": list(levels),
            "jobs_per_run": f"{JOBS_PER_SLOT}*N",
            "sim_call_s": CALL_S,
            "sim_ttft_s": TTFT_S,
            "doc_chars": len(doc),
            "max_tokens": 64,
        },
        pools=[
            "tierq fast: threads pool -cN, io=asyncio (AsyncAnthropic, aiohttp, one loop)",
            "tierq fast: threads pool -cN, io=threads (sync Anthropic per thread)",
            "raw Celery: threads pool -cN, task = time.sleep(0.5)",
        ],
    )
    with harness.stage("concurrency") as stage:
        sim = stage.start_sim(fixed_ttft_s=TTFT_S, fixed_total_s=CALL_S)
        from tierq.contract.tiers import load_tier_table

        with contextlib.closing(harness.client()) as client:
            redis_pid = int(client.info("server")["process_id"])
            for variant, variant_runs in VARIANTS:
                io = variant if variant in ("asyncio", "threads") else "asyncio"  # raw: unused
                tiers_file = stage.write_tiers(TIERS_TOML.format(io=io))
                tiers = load_tier_table(tiers_file)
                for n in levels:
                    if variant == "raw sleep":
                        worker = stage.start_raw_worker(concurrency=n)
                    else:
                        worker = stage.start_worker(
                            "fast",
                            sim,
                            concurrency=n,
                            tiers_file=tiers_file,
                            extra_env={"TIERQ_REDIS_MAX_CONNECTIONS": str(2 * n + 64)},
                        )
                    one = partial(_one_run, client, worker, sim, redis_pid, n, doc, tiers, variant)
                    one(slots=1)  # warm-up: connections, imports
                    for i in range(min(runs, variant_runs or runs)):
                        sim.reset()
                        result.runs.append({"variant": variant, "n": n, "run": i, **one()})
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
    variant: str,
    slots: int = JOBS_PER_SLOT,
) -> dict[str, Any]:
    from bench import rawapp
    from bench.producer import EnqueueStamps, submit, wait_results
    from tierq.celery.app import app as tierq_app

    assert worker.node is not None
    raw = variant == "raw sleep"
    app, queue = (rawapp.app, rawapp.RAW_QUEUE) if raw else (tierq_app, FAST_QUEUE)
    app.control.cancel_consumer(queue, destination=[worker.node], reply=True, timeout=5)
    stamps = EnqueueStamps()
    try:
        if raw:
            ids = [rawapp.send_sleep(CALL_S).id for _ in range(slots * n)]
        else:
            ids = [submit(doc, "high", tiers=tiers).id for _ in range(slots * n)]
    finally:
        stamps.close()
    rss_idle = worker.rss_mb()
    procs = {"worker": worker.pid, "sim": sim.child.pid, "redis": redis_pid}
    cpu_before = {name: cpu_s(pid) for name, pid in procs.items()}
    started = time.monotonic()
    app.control.add_consumer(queue, destination=[worker.node], reply=True, timeout=5)
    metas = wait_results(client, ids, timeout=300, interval=0.1)
    wall = time.monotonic() - started
    cpu = {name: cpu_s(pid) - cpu_before[name] for name, pid in procs.items()}
    ok = [(i, m["result"]) for i, m in metas.items() if m.get("status") == "SUCCESS"]
    if raw:
        spans = [(r["started_at"], r["done_at"]) for _, r in ok]
        busy_s = [e - s for s, e in spans]
    else:
        spans = [_span(stamps[i], r["timings"]) for i, r in ok]
        busy_s = [r["timings"]["llm_ms"] / 1000 for _, r in ok]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    jobs_per_s = len(ok) / (last - first) if last > first else float("nan")
    ideal = n / CALL_S
    return {
        "jobs": len(ids),
        "failed": len(ids) - len(ok),
        "jobs_per_s": round(jobs_per_s, 1),
        "ideal_jobs_per_s": ideal,
        "fraction_of_ideal": ratio(jobs_per_s, ideal),
        "peak_in_flight": _peak(spans),
        "mean_in_flight": round(sum(busy_s) / (last - first), 1) if last > first else None,
        "call_s_p50": median(busy_s),
        "worker_cpu_ms_per_job": round(cpu["worker"] * 1000 / max(1, len(ok)), 3),
        "cpu_util": {name: round(seconds / wall, 3) for name, seconds in cpu.items()},
        "output_tokens": None if raw or not ok else ok[0][1]["usage"]["output_tokens"],
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
        "way", "N", "jobs/s", "ideal", "% of ideal", "peak in flight", "worker CPU ms/job",
        "worker CPU", "sim CPU", "redis CPU", "RSS MB", "failed",
    ]  # fmt: skip
    samples: dict[str, list[Any]] = {
        k: [] for k in ("variant", "n", "jobs_per_s", "ideal_jobs_per_s", "fraction", "cpu_ms_per_job")
    }
    for variant, _ in VARIANTS:
        held = []
        for n in levels:
            runs = [r for r in result.runs if r["n"] == n and r["variant"] == variant]
            if not runs:
                continue
            row = {
                "jobs_per_s": median(r["jobs_per_s"] for r in runs),
                "fraction_of_ideal": median(r["fraction_of_ideal"] for r in runs),
                "peak_in_flight": median(r["peak_in_flight"] for r in runs),
                "worker_cpu_ms_per_job": median(r["worker_cpu_ms_per_job"] for r in runs),
                "cpu_util": {p: median(r["cpu_util"][p] for r in runs) for p in ("worker", "sim", "redis")},
                "worker_rss_mb": median(r["worker_rss_mb_after"] for r in runs),
                "failed": sum(r["failed"] for r in runs),
                "runs": len(runs),
            }
            result.summary[f"{variant}/n{n}"] = row
            if row["fraction_of_ideal"] >= 0.9:
                held.append(n)
            util = row["cpu_util"]
            result.rows.append(
                [
                    variant, n, row["jobs_per_s"], n / CALL_S, f"{row['fraction_of_ideal']:.0%}",
                    row["peak_in_flight"], row["worker_cpu_ms_per_job"], f"{util['worker']:.0%}",
                    f"{util['sim']:.0%}", f"{util['redis']:.0%}", row["worker_rss_mb"], row["failed"],
                ]
            )  # fmt: skip
            for key, value in (
                ("variant", variant),
                ("n", n),
                ("jobs_per_s", row["jobs_per_s"]),
                ("ideal_jobs_per_s", n / CALL_S),
                ("fraction", row["fraction_of_ideal"]),
                ("cpu_ms_per_job", row["worker_cpu_ms_per_job"]),
            ):
                samples[key].append(value)
            bottleneck = [p for p in ("worker", "sim") if util[p] >= SATURATED]
            if bottleneck:
                which = ", ".join(f"{p} at {util[p]:.0%} of a core" for p in bottleneck)
                result.notes.append(f"{variant} N={n}: saturated ({which})")
        top = result.summary.get(f"{variant}/n{levels[-1]}")
        if top is None:
            continue
        ceiling = round(1000 / top["worker_cpu_ms_per_job"], 1) if top["worker_cpu_ms_per_job"] else None
        result.summary[f"{variant}/held_at_90pct"] = max(held, default=None)
        result.summary[f"{variant}/cpu_bound_ceiling_jobs_per_s"] = ceiling
        result.notes.append(
            f"{variant}: largest N at >= 90% of ideal: {max(held, default='none')}; one process tops out "
            f"near 1 / (CPU per job) = {ceiling} jobs/s"
            + (f" (~{ceiling * CALL_S:.0f} calls of {CALL_S} s in flight)" if ceiling else "")
        )
    result.samples = samples
    top = result.summary[f"asyncio/n{levels[-1]}"]
    result.targets = [
        Target(f"tierq share of ideal at N={levels[-1]}", top["fraction_of_ideal"], ">=", 0.9),
        Target(
            f"tierq peak in flight at N={levels[-1]}",
            top["peak_in_flight"],
            ">=",
            500 if levels[-1] >= 500 else levels[-1],
        ),
    ]
