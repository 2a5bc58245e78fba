"""What a benchmark runs against: one Redis per bench invocation, and per scenario a :class:`Stage`.

:class:`Harness` starts an :class:`~tierq.ops.embedded.EmbeddedRedis` and points this process's
environment at it *before* anything imports ``tierq.celery.app`` or ``tierq.producer`` (their settings
are read once). Each scenario runs in a :class:`Stage`: the Redis is flushed, and the simulator and
workers it starts are stopped when the stage ends, on error and on Ctrl-C too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from bench.procs import Child, wait_until
from tierq.ops.embedded import EmbeddedRedis, free_port

__all__ = ["ROOT", "Api", "Harness", "Sim", "Stage"]

#: the project's root: the working directory of every child
ROOT = Path(__file__).resolve().parent.parent
#: variables of ours that must not leak from the caller's environment into a run
_OWN_PREFIXES = ("TIERQ_", "ANTHROPIC_", "BENCH_", "PROMETHEUS_MULTIPROC_DIR")
STARTUP_TIMEOUT_S = 60.0


class Harness:
    """The Redis and environment shared by every scenario of one ``python -m bench`` run."""

    def __init__(self, keep_logs: bool = False) -> None:
        self.redis = EmbeddedRedis()
        self.workdir = Path(tempfile.mkdtemp(prefix="tierq-bench-"))
        self.keep_logs = keep_logs
        self.failed = False

    @property
    def broker_url(self) -> str:
        return f"{self.redis.url}/0"

    def __enter__(self) -> Harness:
        for name in [n for n in os.environ if n.startswith(_OWN_PREFIXES)]:
            del os.environ[name]
        try:
            self.redis.start()
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        os.environ.update(
            {
                "TIERQ_BROKER_URL": self.broker_url,
                "BENCH_BROKER_URL": self.broker_url,
                "TIERQ_LOG_FORMAT": "json",
                "TIERQ_LOG_LEVEL": "WARNING",
            }
        )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.redis.stop()
        crashed = exc_type is not None and not issubclass(exc_type, KeyboardInterrupt)
        if self.keep_logs or self.failed or crashed:
            sys.stderr.write(f"bench logs kept in {self.workdir}\n")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self) -> redis.Redis:
        """A new client of the bench's Redis."""
        return redis.Redis.from_url(self.broker_url)

    def stage(self, name: str) -> Stage:
        """A fresh stage for scenario ``name``: Redis flushed, its own log directory."""
        with contextlib.closing(self.client()) as client:
            client.flushall()
        logs = self.workdir / name
        logs.mkdir(parents=True, exist_ok=True)
        return Stage(self, logs)

    def child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a child: ours without the caller's tierq/Anthropic variables, plus ``extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
        env.update(
            {
                "TIERQ_BROKER_URL": self.broker_url,
                "BENCH_BROKER_URL": self.broker_url,
                "TIERQ_LOG_FORMAT": "json",
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
            }
        )
        env.update(extra or {})
        return env


class Sim:
    """The simulator as a separate process (``python -m tierq.sim``), so its CPU is not ours."""

    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> Any:
        """GET an admin endpoint; return its JSON."""
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def timings(self) -> dict[str, list[dict[str, float | None]]]:
        """``{job_id: [{arrived_at, first_delta_at, ttft_ms}, ...]}`` of every timed request."""
        by_job: dict[str, list[dict[str, float | None]]] = self.get("/_sim/timings")["by_job"]
        return by_job

    def reset(self) -> None:
        """Clear the simulator's counts and timings."""
        request = urllib.request.Request(self.url + "/_sim/reset", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=30):
            pass

    def _ready(self) -> bool:
        self.child.check()
        try:
            return bool(self.get("/_sim/health")["ok"])
        except OSError:
            return False


class Stage:
    """The processes one scenario runs; a context manager that stops them all, last started first."""

    def __init__(self, harness: Harness, logs: Path) -> None:
        self.harness = harness
        self.logs = logs
        self._children: list[Child] = []

    def __enter__(self) -> Stage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self.harness.failed = True
        self.stop_all()

    def stop_all(self) -> None:
        """Stop every child this stage started."""
        while self._children:
            child = self._children.pop()
            with contextlib.suppress(Exception):
                child.stop()

    def stop(self, child: Child) -> None:
        """Stop one child now."""
        if child in self._children:
            self._children.remove(child)
        child.stop()

    def _spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Child:
        log = self.logs / f"{name}-{uuid.uuid4().hex[:6]}.log"
        child = Child(name, argv, self.harness.child_env(extra_env), log)
        self._children.append(child)
        return child

    def start_sim(
        self,
        time_scale: float = 0.0,
        jitter: float | None = None,
        fixed_ttft_s: float | None = None,
        fixed_total_s: float | None = None,
        seed: int = 7,
        limits: str | None = None,
    ) -> Sim:
        """Start ``python -m tierq.sim`` on a free port and wait until it answers.

        ``limits``: the per-model rate limits, ``rpm=N,itpm=N,otpm=N`` (None: the simulator's default).
        """
        port = free_port()
        argv = [sys.executable, "-m", "tierq.sim", "--port", str(port), "--time-scale", str(time_scale)]
        argv += ["--seed", str(seed)]
        for flag, value in (("--jitter", jitter), ("--fixed-ttft-s", fixed_ttft_s)):
            if value is not None:
                argv += [flag, str(value)]
        if fixed_total_s is not None:
            argv += ["--fixed-total-s", str(fixed_total_s)]
        if limits is not None:
            argv += ["--limits", limits]
        sim = Sim(self._spawn("sim", argv), port)
        wait_until("simulator", sim._ready, STARTUP_TIMEOUT_S)
        return sim

    def write_tiers(self, toml: str) -> Path:
        """Write a tiers file (TOML) for workers and the producer; return its path."""
        path = self.logs / f"tiers-{uuid.uuid4().hex[:6]}.toml"
        path.write_text(toml, encoding="utf-8")
        return path

    def start_worker(
        self,
        tier: str,
        sim: Sim,
        concurrency: int | None = None,
        tiers_file: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Child:
        """Start ``python -m tierq worker --tier TIER`` against ``sim`` and wait until it answers ping."""
        node = f"{tier}-{uuid.uuid4().hex[:6]}@bench"
        argv = [sys.executable, "-m", "tierq", "worker", "--tier", tier, "--name", node, "-l", "WARNING"]
        if concurrency is not None:
            argv += ["--concurrency", str(concurrency)]
        env = {"ANTHROPIC_BASE_URL": sim.url, **(extra_env or {})}
        if tiers_file is not None:
            env["TIERQ_TIERS_FILE"] = str(tiers_file)
        child = self._spawn(f"worker-{tier}", argv, env)
        from tierq.celery.app import app

        _wait_for_node(app, node, child)
        return child

    def start_api(self) -> Api:
        """Start ``python -m tierq api`` on a free port with one producer token; wait for ``/healthz``."""
        port = free_port()
        token = secrets.token_urlsafe(24)
        digest = hashlib.sha256(token.encode()).hexdigest()
        argv = [sys.executable, "-m", "tierq", "api", "--port", str(port)]
        api = Api(self._spawn("api", argv, {"TIERQ_API_TOKENS": f"bench:{digest}"}), port, token)
        wait_until("api", api._ready, STARTUP_TIMEOUT_S)
        return api

    def start_raw_worker(self, concurrency: int = 32, events: bool = False) -> Child:
        """Start the baseline Celery worker (``bench.rawapp``) and wait until it answers ping.

        ``events``: the variant with tierq's extra Celery settings (``app_events``, ``-E``).
        """
        from bench import rawapp

        app, target, queue = (
            (rawapp.app_events, "bench.rawapp:app_events", rawapp.EVENTS_QUEUE)
            if events
            else (rawapp.app, "bench.rawapp:app", rawapp.RAW_QUEUE)
        )
        name = "raw-events" if events else "raw"
        node = f"{name}-{uuid.uuid4().hex[:6]}@bench"
        argv = [sys.executable, "-m", "celery", "-A", target, "worker", "-P", "threads"]
        argv += ["-c", str(concurrency), "-Q", queue, "-n", node, "-l", "WARNING"]
        if events:
            argv.append("-E")
        child = self._spawn(f"worker-{name}", argv)
        _wait_for_node(app, node, child)
        return child


class Api:
    """``tierq api`` as a separate process, with one producer (``bench``) and its token."""

    def __init__(self, child: Child, port: int, token: str) -> None:
        self.child = child
        self.url = f"http://127.0.0.1:{port}"
        #: what a client sends as ``Authorization``
        self.headers = {"Authorization": f"Bearer {token}"}

    def _ready(self) -> bool:
        self.child.check()
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False


def _wait_for_node(app: Any, node: str, child: Child) -> None:
    end = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < end:
        child.check()
        replies = app.control.ping(destination=[node], timeout=0.5)
        if any(node in reply for reply in replies):
            child.node = node
            return
    raise TimeoutError(f"{child.name} ({node}) did not answer ping within {STARTUP_TIMEOUT_S} s")
