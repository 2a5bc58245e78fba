"""``tierq demo``: the main job on embedded defaults, end to end, with a result table.

Starts a Redis server (unless ``TIERQ_BROKER_URL`` is set), the simulator (unless
``ANTHROPIC_API_KEY`` is set), one worker pool per tier as subprocesses, submits a mix of
urgencies, waits for every job and prints what each one took. Everything it started is stopped
on the way out, Ctrl-C included.
"""

from __future__ import annotations

import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["SAMPLE_DOCS", "WorkerPool", "run_demo"]

#: documents the demo summarizes (the simulator's summary is extractive, so these are what it quotes)
SAMPLE_DOCS = (
    "Queue wait is the time a job spends between the producer's enqueue and a worker picking it up. "
    "In a shared pool, a burst of slow jobs fills every slot, and an urgent job waits behind them. "
    "Dedicated pools per latency tier remove that wait: the fast tier's threads never run slow work. "
    "Prefetch of one and late acknowledgement keep a worker from hoarding messages it cannot start. "
    "The cost is capacity that sits idle when the fast tier is quiet, which operators size per tier.",
    "Time to first token is what a reader feels. Streaming the reply lets the first words arrive "
    "while the rest are still being generated. A small model with a tight output cap answers sooner "
    "and costs less. Larger models think longer and write more, which suits reports nobody waits for. "
    "Each job records its queue wait, its time to first token, its total latency and its cost.",
    "Retries are decided in one place. Rate limits are honoured with the server's retry-after hint. "
    "Overload and server errors back off with jitter. Bad requests are never retried, since the same "
    "request would fail the same way. No retry is attempted when the job's deadline would pass first, "
    "so a fast job fails fast instead of finishing late. Every failure names its cause in one log line.",
)

_URGENCY_CYCLE = ("critical", "normal", "high", "low", "critical", "normal")


class WorkerPool:
    """One ``tierq worker`` subprocess serving one tier, logging to a file."""

    def __init__(self, tier: str, log_dir: Path, env: dict[str, str]) -> None:
        self.tier = tier
        self.log_path = log_dir / f"worker-{tier}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "worker", "--tier", tier, "--name", f"{tier}-demo@%h"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL after ``grace_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _p50(values: list[float]) -> str:
    return f"{statistics.median(values):.0f}" if values else "-"


def run_demo(jobs: int = 12, time_scale: float = 0.25, console: Console | None = None) -> int:
    """Run the demo; return a process exit code (0 when every job succeeded)."""
    from worker.embedded import EmbeddedRedis

    # off a terminal rich assumes 80 columns, too narrow for the tables
    console = console or Console(width=None if sys.stdout.isatty() else 120)
    env = dict(os.environ)
    with ExitStack() as stack:
        if not env.get("TIERQ_BROKER_URL"):
            redis_server = stack.enter_context(EmbeddedRedis())
            env["TIERQ_BROKER_URL"] = f"{redis_server.url}/0"
            console.print(f"redis: embedded redis-server at {env['TIERQ_BROKER_URL']}")
        else:
            console.print(f"redis: {env['TIERQ_BROKER_URL']}")
        if not env.get("ANTHROPIC_API_KEY"):
            from simulator import SimConfig, SimServer

            sim = stack.enter_context(SimServer(SimConfig(time_scale=time_scale)))
            env["ANTHROPIC_BASE_URL"] = sim.url
            console.print(f"model: simulator at {sim.url} (time scale {time_scale}; ANTHROPIC_API_KEY unset)")
        else:
            console.print("model: the Anthropic API (ANTHROPIC_API_KEY is set)")
        os.environ.update(env)
        from worker.settings import get_settings
        from worker.tiers import get_tier_table

        get_settings.cache_clear()
        get_tier_table.cache_clear()
        tiers = get_tier_table()
        log_dir = Path(tempfile.mkdtemp(prefix="tierq-demo-"))
        pools = [WorkerPool(name, log_dir, env) for name in tiers.tiers]
        for pool in pools:
            stack.callback(pool.stop)
        console.print(f"workers: {', '.join(p.tier for p in pools)} (logs in {log_dir})")
        _wait_for_workers(len(pools), pools)
        return _run_jobs(jobs, console)
    return 1  # pragma: no cover - ExitStack does not swallow exceptions


def _wait_for_workers(count: int, pools: list[WorkerPool], timeout: float = 60.0) -> None:
    from worker.app import app
    from worker.errors import TierqError

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for pool in pools:
            if pool.proc.poll() is not None:
                raise TierqError(f"the {pool.tier} worker exited; see {pool.log_path}")
        if len(app.control.ping(timeout=0.5)) >= count:
            return
    raise TierqError(f"workers did not answer within {timeout:.0f} s")


def _run_jobs(count: int, console: Console) -> int:
    from tasks.producer import Job, submit
    from worker.errors import JobError

    submitted: list[tuple[str, Job]] = []
    for i, urgency in zip(range(count), itertools.cycle(_URGENCY_CYCLE), strict=False):
        doc = SAMPLE_DOCS[i % len(SAMPLE_DOCS)]
        submitted.append((urgency, submit(doc, urgency=urgency, metadata={"demo": i})))
    results: list[tuple[str, Job, dict[str, Any] | str]] = []
    columns = (TextColumn("jobs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("jobs", total=len(submitted))
        for urgency, job in submitted:
            try:
                results.append((urgency, job, job.result(timeout=120)))
            except JobError as exc:
                results.append((urgency, job, str(exc)))
            progress.advance(task)
    console.print(_results_table(results))
    console.print(_tier_table(results))
    first = next((r for _, _, r in results if isinstance(r, dict)), None)
    if first is not None:
        console.print(f"[bold]A summary ({first['tier']} tier, {first['model']}):[/] {first['summary']}")
    failed = sum(1 for _, _, r in results if not isinstance(r, dict))
    return 1 if failed else 0


def _results_table(results: list[tuple[str, Any, dict[str, Any] | str]]) -> Table:
    table = Table(title="jobs")
    for column in (
        "job",
        "urgency",
        "tier",
        "model",
        "queue ms",
        "TTFT ms",
        "total ms",
        "out tok",
        "tok/s",
        "stop",
    ):
        table.add_column(column, justify="right" if "ms" in column or "tok" in column else "left")
    for urgency, job, result in results:
        if isinstance(result, str):
            table.add_row(job.id[:8], urgency, "-", "-", "-", "-", "-", "-", "-", f"[red]{result}[/]")
            continue
        t = result["timings"]
        table.add_row(
            job.id[:8], urgency, result["tier"], result["model"].removeprefix("claude-"),
            f"{t['queue_wait_ms']:.0f}", f"{t['ttft_ms']:.0f}", f"{t['total_ms']:.0f}",
            str(result["usage"]["output_tokens"]), f"{t['output_tokens_per_s'] or 0:.0f}",
            str(result["stop_reason"]),
        )  # fmt: skip
    return table


def _tier_table(results: list[tuple[str, Any, dict[str, Any] | str]]) -> Table:
    table = Table(title="per tier (p50)")
    for column in ("tier", "jobs", "failed", "queue ms", "TTFT ms", "total ms", "cost $"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    by_tier: dict[str, list[dict[str, Any]]] = {}
    failed: dict[str, int] = {}
    for _, _, result in results:
        if isinstance(result, dict):
            by_tier.setdefault(result["tier"], []).append(result)
        else:
            failed["?"] = failed.get("?", 0) + 1
    for tier, rows in sorted(by_tier.items()):
        timings = [r["timings"] for r in rows]
        table.add_row(
            tier, str(len(rows)), str(failed.get(tier, 0)),
            _p50([t["queue_wait_ms"] for t in timings]), _p50([t["ttft_ms"] for t in timings]),
            _p50([t["total_ms"] for t in timings]), f"{sum(r['cost_usd'] or 0 for r in rows):.5f}",
        )  # fmt: skip
    if failed:
        table.add_row("(failed)", "0", str(sum(failed.values())), "-", "-", "-", "-")
    return table
