"""The chaos harness: a Redis of its own (AOF on) that may be killed, the simulator behind a counter of
completed streams, real worker subprocesses that may be killed, and a producer subprocess.

Nothing here touches the main test session's Redis or simulator: this process's settings
(``tierq.core.settings.get_settings`` is read once) belong to the main session, so every tierq call on
the producer side runs in a subprocess (``tests/chaos/driver.py``) with the chaos environment.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.helpers import spawn, wait_until
from tierq.sim import SimConfig, SimServer

#: the chaos simulator runs 10x faster than the published model speeds
SIM_TIME_SCALE = 0.1
#: output tokens of a "long" slow-tier job (with a document of 320 sentences): ~2 s of streaming
LONG_TOKENS = 800

#: the chaos tier table: few threads, a short retry budget on the standard tier (poison loop)
TIERS_TOML = """
[tiers.fast]
concurrency = 4
fallback_model = "claude-sonnet-4-6"
fallback_after = 2

[tiers.standard]
concurrency = 2
max_retries = 1
retry_backoff_s = 0.5

[tiers.slow]
concurrency = 2
retry_backoff_s = 0.5
"""

#: Job statuses that end a job (``Job.status()``)
TERMINAL = frozenset({"succeeded", "failed", "expired", "revoked"})


def document(tag: str, sentences: int = 40) -> str:
    """A document whose every sentence carries ``tag``, so that any piece of it in a log is found."""
    return " ".join(
        f"Ledger {tag} entry {i} notes that region {i % 7} shipped {i * 13 % 101} crates on day {i}."
        for i in range(sentences)
    )


def new_id(kind: str) -> str:
    """A job id naming its kind, with nothing of the document in it (ids are logged, text is not)."""
    return f"{kind}-{uuid.uuid4().hex[:16]}"


def new_tag() -> str:
    """A marker put in every sentence of a document: ``CHAOSDOC`` and random hex."""
    return f"CHAOSDOC{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------
# the simulator, wrapped to count completed streams per job
# ---------------------------------------------------------------------------------------------


class StreamCounter:
    """ASGI middleware: per ``x-tierq-job-id``, requests, streams that sent text, completed streams.

    A stream counts as completed when its body carried ``event: message_stop``, i.e. the model's
    whole answer went out: two of those for one job is a duplicate LLM call. A job marked with
    :meth:`garble` gets a 200 event stream whose first event is not JSON, as a broken proxy would send.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._texts: Counter[str] = Counter()
        self._completed: Counter[str] = Counter()
        self._arrivals: dict[str, list[float]] = {}
        self._garbled: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        job_id = None
        if scope["type"] == "http" and scope.get("path") == "/v1/messages":
            for name, value in scope.get("headers", []):
                if name.lower() == b"x-tierq-job-id":
                    job_id = value.decode("latin-1")
        if job_id is None:
            await self.app(scope, receive, send)
            return
        with self._lock:
            self._requests[job_id] += 1
            self._arrivals.setdefault(job_id, []).append(time.time())
            garbled = job_id in self._garbled
        if garbled:
            await _drain(receive)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            await send({"type": "http.response.body", "body": b"event: message_start\ndata: {garbled\n\n"})
            return
        seen = {"text": False, "stop": False}
        tail = b""

        async def counting_send(message: Message) -> None:
            nonlocal tail
            await send(message)
            if message["type"] != "http.response.body":
                return
            chunk = tail + bytes(message.get("body", b""))
            tail = chunk[-64:]
            with self._lock:
                # text, not thinking: the slow tier's model thinks before it writes
                if not seen["text"] and b"text_delta" in chunk:
                    seen["text"] = True
                    self._texts[job_id] += 1
                if not seen["stop"] and b"event: message_stop" in chunk:
                    seen["stop"] = True
                    self._completed[job_id] += 1

        await self.app(scope, receive, counting_send)

    def garble(self, job_id: str) -> None:
        """Answer every request of the job with an event stream that is not JSON."""
        with self._lock:
            self._garbled.add(job_id)

    def requests(self, job_id: str) -> int:
        """Requests made for the job (LLM calls, failed ones too)."""
        with self._lock:
            return self._requests[job_id]

    def arrivals(self, job_id: str) -> list[float]:
        """When each request of the job reached the simulator (wall clock), in order."""
        with self._lock:
            return list(self._arrivals.get(job_id, []))

    def streamed_text(self, job_id: str) -> int:
        """Responses for the job that sent at least one text delta."""
        with self._lock:
            return self._texts[job_id]

    def completed(self, job_id: str) -> int:
        """Responses for the job that sent the whole answer (``message_stop``)."""
        with self._lock:
            return self._completed[job_id]


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


class ChaosSim(SimServer):
    """The simulator wrapped in :class:`StreamCounter`, served by :class:`SimServer` in a thread."""

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config, wrap=StreamCounter)
        self.counter: StreamCounter = self.asgi  # type: ignore[assignment]

    def start(self) -> ChaosSim:  # type: ignore[override]
        super().start()
        return self


# ---------------------------------------------------------------------------------------------
# worker subprocesses
# ---------------------------------------------------------------------------------------------


class ChaosWorker:
    """``python -m tierq worker --tier T --name N``; stdout and stderr (JSON lines) go to a file."""

    def __init__(
        self, tier: str, name: str, env: dict[str, str], log_path: Path, concurrency: int | None = None
    ) -> None:
        self.tier = tier
        self.node = f"{name}@chaos"
        self.log_path = log_path
        self._log = log_path.open("wb")
        threads = [] if concurrency is None else ["--concurrency", str(concurrency)]
        self.proc = spawn(
            "tierq",
            ["worker", "--tier", tier, "--name", self.node, *threads],
            env,
            inherit_env=False,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far."""
        out = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def events_for(self, job_id: str, event: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events()
            if e.get("job_id") == job_id and (event is None or e.get("event") == event)
        ]

    def wait_ready(self, timeout: float = 60.0) -> ChaosWorker:
        """Wait for Celery's ``<node> ready.`` line (connected to the broker, consuming)."""
        wait_until(lambda: f"{self.node} ready." in self.text(), timeout, f"{self.node} ready", self.check)
        return self

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError(f"worker {self.node} exited ({self.proc.returncode}):\n{self.text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no ack, no cleanup."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def terminate(self) -> None:
        """SIGTERM: Celery's warm shutdown."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def stop(self, grace_s: float = 20.0) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)
        self._log.close()


# ---------------------------------------------------------------------------------------------
# the producer subprocess
# ---------------------------------------------------------------------------------------------


class Producer:
    """``python -m tests.chaos.driver``: tierq's producer API over JSON lines, with the chaos environment."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self._log = log_path.open("ab")
        self.proc: subprocess.Popen[str] = spawn(
            "tests.chaos.driver",
            env=env,
            inherit_env=False,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="chaos-producer-reader", daemon=True)
        self._reader.start()
        self.call("hello", timeout=60)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> Any:
        """Run one operation in the driver; raise RuntimeError if it failed or took too long."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"the producer driver did not answer {op!r} within {timeout} s") from None
        if line is None:
            raise RuntimeError(f"the producer driver exited during {op!r} ({self.proc.poll()})")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            raise RuntimeError(
                f"the producer driver wrote something else than its answer: {line[:500]!r}"
            ) from None
        if "driver_error" in reply:
            raise RuntimeError(f"driver {op!r} failed: {reply['driver_error']}")
        return reply["value"]

    def submit(self, text: str, urgency: str, **kwargs: Any) -> dict[str, Any]:
        """``{"job_id", "ok", "error_type", "field", "elapsed_s"}`` of one ``tierq.producer.submit``."""
        [one] = self.call("submit", jobs=[{"text": text, "urgency": urgency, **kwargs}])
        return dict(one)

    def statuses(self, ids: Iterable[str]) -> dict[str, str]:
        return dict(self.call("status", ids=list(ids)))

    def wait_ended(self, ids: Iterable[str], timeout: float) -> dict[str, str]:
        """Poll ``Job.status()`` until every job ended or ``timeout`` passed; the last statuses."""
        ids = list(ids)
        statuses: dict[str, str] = {}

        def ended() -> bool:
            statuses.update(self.statuses(ids))
            return all(s in TERMINAL for s in statuses.values())

        # the scenario then counts what did not end (as lost): a timeout is an outcome, not an error
        with contextlib.suppress(AssertionError):
            wait_until(ended, timeout, "every job to end", interval=0.25)
        return statuses

    def outcomes(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """``Job.result()`` of each job, as ``{"status", "error_type", "model", "retries", ...}``."""
        return dict(self.call("outcome", ids=list(ids), timeout=120))

    def dead_letters(self, ids: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        """The dead letter of each job (its summary, payload redacted), or None."""
        return dict(self.call("dlq", ids=list(ids)))

    def publish(self, body: bytes, content_type: str, headers: dict[str, Any], queue: str) -> None:
        """Publish raw bytes to a tier's queue, as a broken or foreign producer would."""
        body_b64 = base64.b64encode(body).decode()
        self.call("publish", body_b64=body_b64, content_type=content_type, headers=headers, queue=queue)

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # the driver ends at the end of its input
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


# ---------------------------------------------------------------------------------------------
# counting
# ---------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What happened to a scenario's jobs, computed from the simulator and the result backend."""

    scenario: str
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    expired: int = 0
    duplicates: int = 0
    lost: int = 0
    llm_calls: int = 0
    notes: list[str] = field(default_factory=list)
    #: seconds from a kill to each interrupted job's next LLM request (recovery scenarios only)
    recovery_s: list[float] = field(default_factory=list)

    def recovery(self, q: float) -> float | None:
        """The ``q`` quantile (0..1, nearest rank) of the recovery times, None without any."""
        if not self.recovery_s:
            return None
        ordered = sorted(self.recovery_s)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def line(self) -> str:
        note = f"  ({'; '.join(self.notes)})" if self.notes else ""
        recovery = ""
        if self.recovery_s:
            recovery = f" recovery_p50={self.recovery(0.5):.2f}s recovery_p99={self.recovery(0.99):.2f}s"
        return (
            f"chaos {self.scenario}: submitted={self.submitted} completed={self.completed} "
            f"failed={self.failed} expired={self.expired} duplicates={self.duplicates} lost={self.lost} "
            f"llm_calls={self.llm_calls}{recovery}{note}"
        )


def tally(
    scenario: str, outcomes: dict[str, dict[str, Any]], counter: StreamCounter, notes: Iterable[str] = ()
) -> Tally:
    """Count a scenario's jobs: ended how, LLM calls made, LLM calls completed more than once."""
    row = Tally(scenario, notes=list(notes))
    for job_id, outcome in outcomes.items():
        row.submitted += 1
        status = outcome["status"]
        if status == "succeeded":
            row.completed += 1
        elif status == "expired":
            row.expired += 1
        elif status in ("failed", "revoked"):
            row.failed += 1
        else:
            row.lost += 1
        row.llm_calls += counter.requests(job_id)
        if counter.completed(job_id) > 1:
            row.duplicates += 1
    return row


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without the main session's TIERQ_/ANTHROPIC_ variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERQ_", "ANTHROPIC_"))}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def queued(client: redis.Redis, prefix: str, queue_name: str) -> int:
    """Messages waiting in a queue (all four Redis priority sub-lists)."""
    names = [queue_name] + [f"{queue_name}\x06\x16{p}" for p in (3, 6, 9)]
    return sum(int(client.llen(f"{prefix}{name}")) for name in names)  # type: ignore[arg-type]


def unacked_ids(client: redis.Redis, prefix: str) -> set[str]:
    """Task ids of the messages delivered to a worker and not acknowledged yet (every queue's)."""
    ids = set()
    values: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}unacked:*"):
        values += client.hvals(key)  # type: ignore[operator]
    for value in values:
        try:
            message = json.loads(value)[0]
            ids.add(str(message["headers"]["id"]))
        except (ValueError, KeyError, IndexError, TypeError):
            continue
    return ids


# ---------------------------------------------------------------------------------------------
# a memory limit the kernel enforces
# ---------------------------------------------------------------------------------------------

#: where cgroup v1's memory controller is mounted (these machines), else cgroup v2's unified tree
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


class MemoryCgroup:
    """A memory cgroup of its own: processes moved into it are OOM-killed by the kernel (SIGKILL, as
    a container's memory limit does) once what they allocate after the move passes ``limit_bytes``.

    :meth:`create` returns None where no cgroup can be made (not root, a read-only cgroupfs).
    """

    def __init__(self, path: Path, v1: bool) -> None:
        self.path = path
        self.v1 = v1

    @classmethod
    def create(cls, name: str) -> MemoryCgroup | None:
        for root, v1 in ((CGROUP_V1_MEMORY, True), (CGROUP_V2, False)):
            control = "memory.limit_in_bytes" if v1 else "memory.max"
            if not root.is_dir() or (not v1 and not (root / "cgroup.controllers").exists()):
                continue
            path = root / name
            try:
                path.mkdir()
            except OSError:
                continue
            if (path / control).exists():
                return cls(path, v1)
            with contextlib.suppress(OSError):
                path.rmdir()
        return None

    def limit(self, limit_bytes: int) -> None:
        (self.path / ("memory.limit_in_bytes" if self.v1 else "memory.max")).write_text(str(limit_bytes))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def usage(self) -> int:
        return int((self.path / ("memory.usage_in_bytes" if self.v1 else "memory.current")).read_text())

    def peak(self) -> int:
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        return int((self.path / name).read_text())

    def oom_kills(self) -> int:
        """Processes of this cgroup the kernel killed for memory."""
        text = (self.path / ("memory.oom_control" if self.v1 else "memory.events")).read_text()
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def whereabouts(client: redis.Redis, prefix: str, job_id: str) -> list[str]:
    """Every key under ``prefix`` that holds ``job_id`` (its own keys, lists and hashes naming it in
    an entry): where a job that never ended is stuck."""
    found = []
    needle = job_id.encode()
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        name = key.decode(errors="replace")
        if job_id in name:
            found.append(name)
            continue
        kind = client.type(key)
        if kind == b"list":
            entries: list[bytes] = client.lrange(key, 0, -1)  # type: ignore[assignment]
        elif kind == b"hash":
            entries = list(client.hvals(key))  # type: ignore[arg-type]
        else:
            continue
        if any(needle in entry or base64.b64encode(needle)[:12] in entry for entry in entries):
            found.append(f"{name} ({kind.decode()})")
    return found
