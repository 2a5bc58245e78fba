"""``tierq demo``: the main job on embedded defaults, end to end, watched live.

Starts a Redis server (unless ``TIERQ_BROKER_URL`` is set), the simulator (unless
``ANTHROPIC_API_KEY`` is set), one worker pool per tier and Flower, all as children of this
process; submits a mix of urgencies; shows a live per-tier table while the jobs run; ends with
a summary and a few summaries. Everything it started is stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tierq.celery.app import make_app
from tierq.contract.errors import ConfigError, DeadlineUnmeetableError, JobError, TierqError
from tierq.contract.result import JobResult
from tierq.contract.tiers import load_tier_table
from tierq.core.settings import Settings
from tierq.producer import Producer, submit
from tierq.store.stats import percentile

__all__ = [
    "DEFAULT_MIX",
    "SAMPLE_DOCS",
    "Board",
    "Child",
    "parse_mix",
    "plan_urgencies",
    "run_demo",
    "stop_all",
]

#: documents the demo summarizes by default (the simulator's summaries quote them)
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

#: share of jobs per urgency when ``--mix`` is not given
DEFAULT_MIX = {"critical": 0.25, "high": 0.25, "normal": 0.3, "low": 0.2}
#: characters of a ``--docs`` file sent (the fast tier's default input limit)
MAX_DOC_CHARS = 50_000
#: seconds to wait for any one job before the demo gives up on it
JOB_TIMEOUT_S = 300


def parse_mix(text: str | None, urgencies: list[str]) -> dict[str, float]:
    """``critical=0.2,normal=0.5,low=0.3`` → weights summing to 1; ConfigError on nonsense."""
    if not text:
        return {u: w for u, w in DEFAULT_MIX.items() if u in urgencies}
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in urgencies:
            raise ConfigError(
                f"--mix: {part!r} is not URGENCY=WEIGHT with URGENCY one of {', '.join(urgencies)}"
            )
        try:
            weights[name] = float(value)
        except ValueError:
            raise ConfigError(f"--mix: weight {value!r} of {name} is not a number") from None
        if weights[name] < 0:
            raise ConfigError(f"--mix: weight of {name} is negative")
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError("--mix: weights add up to zero")
    return {u: w / total for u, w in weights.items()}


def plan_urgencies(count: int, mix: dict[str, float]) -> list[str]:
    """``count`` urgencies in the proportions of ``mix``, interleaved (largest remainder)."""
    out: list[str] = []
    owed = dict.fromkeys(mix, 0.0)
    for _ in range(count):
        for urgency, weight in mix.items():
            owed[urgency] += weight
        pick = max(owed, key=lambda u: owed[u])
        owed[pick] -= 1.0
        out.append(pick)
    return out


def load_docs(directory: Path | None) -> list[str]:
    """The texts of ``*.txt``/``*.md`` files in ``directory``, or the built-in samples."""
    if directory is None:
        return list(SAMPLE_DOCS)
    if not directory.is_dir():
        raise ConfigError(f"--docs: {directory} is not a directory")
    docs = []
    for path in sorted(directory.rglob("*")):
        if path.suffix.lower() in (".txt", ".md") and path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                docs.append(text[:MAX_DOC_CHARS])
    if not docs:
        raise ConfigError(f"--docs: no non-empty .txt or .md files under {directory}")
    return docs


class Child:
    """A ``tierq`` subprocess in its own session (so Ctrl-C reaches only the demo), logging to a file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tierq", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def check(self) -> None:
        """Raise if the process has exited."""
        if self.proc.poll() is not None:
            raise TierqError(f"{self.name} exited with status {self.proc.returncode}; see {self.log_path}")

    def wait_or_kill(self, until: float) -> None:
        """Wait for the process until the ``time.monotonic()`` instant ``until``, then SIGKILL it."""
        try:
            self.proc.wait(timeout=max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def stop_all(children: list[Child], grace_s: float = 10.0) -> None:
    """SIGTERM every child at once (Celery's warm shutdown), SIGKILL what is left after ``grace_s``."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    until = time.monotonic() + grace_s
    for child in children:
        child.wait_or_kill(until)


@dataclass
class _Tracked:
    urgency: str
    tier: str
    job: Any
    status: str = "queued"
    result: JobResult | None = None
    error: str | None = None


@dataclass
class Board:
    """What the live table shows: every job's status and, once done, its figures."""

    tiers: list[str]
    jobs: list[_Tracked] = field(default_factory=list)

    def add(self, urgency: str, tier: str, job: Any) -> None:
        self.jobs.append(_Tracked(urgency, tier, job))

    def poll(self) -> int:
        """Refresh unfinished jobs; return how many are finished."""
        for tracked in self.jobs:
            if tracked.status in ("done", "failed"):
                continue
            status = tracked.job.status()
            if status in ("succeeded", "failed", "revoked"):
                try:
                    tracked.result = tracked.job.result(timeout=5)
                    tracked.status = "done"
                except JobError as exc:
                    tracked.error, tracked.status = str(exc), "failed"
            else:
                tracked.status = "running" if status in ("running", "retrying") else "queued"
        return sum(t.status in ("done", "failed") for t in self.jobs)

    def table(self, title: str = "tierq demo: per tier") -> Table:
        """Per tier: jobs done of all, failed, the p50/p95 seconds of finished jobs, cost; 80 columns."""
        table = Table(title=title, caption="seconds: p50/p95 of finished jobs")
        for column in ("tier", "done", "failed", "queue s", "TTFT s", "total s", "cost $"):
            table.add_column(column, justify="left" if column == "tier" else "right", no_wrap=True)
        for tier in self.tiers:
            rows = [t for t in self.jobs if t.tier == tier]
            if not rows:
                continue
            done = [t.result for t in rows if t.result is not None]
            finished = sum(t.status == "done" for t in rows)
            failed = sum(t.status == "failed" for t in rows)
            cells = [
                _p50_p95([r.timings.queue_wait_ms for r in done]),
                _p50_p95([r.timings.ttft_ms for r in done]),
                _p50_p95([r.timings.total_ms for r in done]),
            ]
            cost = sum(r.cost_usd or 0 for r in done)
            table.add_row(tier, f"{finished}/{len(rows)}", str(failed), *cells, f"{cost:.4f}")
        return table


def _seconds(ms: float | None) -> str:
    if ms is None:
        return "-"
    value = ms / 1000
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _p50_p95(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    return f"{_seconds(percentile(present, 50))}/{_seconds(percentile(present, 95))}"


def run_demo(
    jobs: int = 60,
    time_scale: float = 0.25,
    mix: str | None = None,
    docs: Path | None = None,
    flower: bool = True,
    console: Console | None = None,
    keep: bool = False,
) -> int:
    """Run the demo; return a process exit code (0 when every job succeeded).

    With ``keep``, everything it started stays up after the run (Flower, the pools' metrics) until
    Ctrl-C or SIGTERM, which then ends the demo normally.
    """
    from tierq.ops.embedded import EmbeddedRedis, free_port

    console = console or Console()
    texts = load_docs(docs)
    env = dict(os.environ)
    with ExitStack() as stack:
        # SIGTERM and SIGHUP unwind like Ctrl-C, so the children (in sessions of their own) are
        # stopped; SIGINT too, explicitly: a process started in the background of a script inherits
        # SIGINT ignored, and Python then leaves it so
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous = signal.signal(signum, _interrupt)
            stack.callback(signal.signal, signum, previous)
        if not env.get("TIERQ_BROKER_URL"):
            server = stack.enter_context(EmbeddedRedis())
            env["TIERQ_BROKER_URL"] = f"{server.url}/0"
            console.print(f"redis      embedded redis-server at {env['TIERQ_BROKER_URL']}")
        else:
            console.print(f"redis      {env['TIERQ_BROKER_URL']}")
        if not env.get("ANTHROPIC_API_KEY"):
            from tierq.sim import SimConfig, SimServer

            sim = stack.enter_context(SimServer(SimConfig(time_scale=time_scale)))
            env["ANTHROPIC_BASE_URL"] = sim.url
            console.print(
                f"model      simulator at {sim.url}, time scale {time_scale} (ANTHROPIC_API_KEY unset)"
            )
        else:
            console.print("model      the Anthropic API (ANTHROPIC_API_KEY is set)")
        # this process talks to what it started through objects built for them; the environment
        # is only what the child processes get
        settings = Settings(
            broker_url=env["TIERQ_BROKER_URL"], anthropic_base_url=env.get("ANTHROPIC_BASE_URL")
        )
        tiers = load_tier_table(settings.tiers_file)
        producer = Producer(settings, tiers, make_app(settings, tiers))
        weights = parse_mix(mix, list(tiers.urgencies))
        log_dir = Path(tempfile.mkdtemp(prefix="tierq-demo-"))
        children: list[Child] = []
        stack.callback(stop_all, children)
        # a pool for each tier the mix sends jobs to (the bulk tier's batches take minutes)
        used = [t for t in tiers.tiers if t in {tiers.urgencies[u] for u in weights}]
        for tier in used:
            port = free_port()
            args = ["worker", "--tier", tier, "--name", f"{tier}-demo@%h", "--metrics-port", str(port)]
            children.append(Child(f"worker-{tier}", args, log_dir, env))
            console.print(f"worker     {tier:<9} pool, metrics http://127.0.0.1:{port}/metrics")
        if flower:
            port = free_port()
            user, password = "tierq", secrets.token_urlsafe(9)
            flower_env = {**env, "TIERQ_FLOWER_BASIC_AUTH": f"{user}:{password}"}
            children.append(Child("flower", ["flower", "--port", str(port)], log_dir, flower_env))
            console.print(f"flower     http://127.0.0.1:{port}  (user {user}, password {password})")
        console.print(f"logs       {log_dir}")
        _wait_for_workers(producer, len(used), children)
        code = _run_jobs(producer, jobs, weights, texts, tiers.tiers, children, console)
        if keep:
            _keep_running(children, console)
        return code
    return 1  # pragma: no cover - ExitStack does not swallow exceptions


def _keep_running(children: list[Child], console: Console) -> None:
    """Wait for Ctrl-C (or SIGTERM) with everything still running; a child that exits ends the wait."""
    console.print("\neverything stays up (Flower, metrics); Ctrl-C stops it all")
    try:
        while True:
            for child in children:
                child.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping")


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _wait_for_workers(producer: Producer, count: int, children: list[Child], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for child in children:
            child.check()
        if len(producer.app.control.ping(timeout=0.5)) >= count:
            return
    raise TierqError(f"workers did not answer within {timeout:.0f} s")


def _run_jobs(
    producer: Producer,
    count: int,
    weights: dict[str, float],
    texts: list[str],
    tiers: dict[str, Any],
    children: list[Child],
    console: Console,
) -> int:
    table = producer.tiers
    board = Board(list(tiers))
    progress = Progress(TextColumn("jobs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    task = progress.add_task("jobs", total=count)
    started = time.monotonic()
    for i, urgency in enumerate(plan_urgencies(count, weights)):
        tier = table.for_urgency(urgency).name
        try:
            job = submit(texts[i % len(texts)], urgency=urgency, metadata={"demo": i}, producer=producer)
        except DeadlineUnmeetableError as exc:  # admission: it could not have started in time
            board.add(urgency, tier, None)
            board.jobs[-1].status, board.jobs[-1].error = "failed", str(exc)
            continue
        board.add(urgency, tier, job)
    with Live(Group(board.table(), progress), console=console, refresh_per_second=4) as live:
        while True:
            finished = board.poll()
            progress.update(task, completed=finished)
            live.update(Group(board.table(), progress))
            if finished == count:
                break
            if time.monotonic() - started > JOB_TIMEOUT_S:
                raise TierqError(f"jobs still unfinished after {JOB_TIMEOUT_S} s")
            for child in children:
                child.check()
            time.sleep(0.25)
    elapsed = time.monotonic() - started
    console.print(f"\n{count} jobs in {elapsed:.1f} s")
    shown: set[str] = set()
    for tracked in board.jobs:
        if tracked.result is not None and tracked.tier not in shown:
            shown.add(tracked.tier)
            result = tracked.result
            tokens, ttft = result.usage.output_tokens, result.timings.ttft_ms or 0.0
            console.print(
                f"[bold]{result.tier}[/] · {result.model} · {tokens} tokens · TTFT {ttft:.0f} ms\n"
                f"  {result.summary}",
                highlight=False,
            )
    failures = [t for t in board.jobs if t.status == "failed"]
    for tracked in failures[:5]:
        console.print(f"[red]failed[/] {tracked.job.id} ({tracked.tier}): {tracked.error}", highlight=False)
    return 1 if failures else 0
