"""Fixtures of the contract tests: the replay server, a worker that calls it, and one run of every job.

The contract worker is a real ``tierq worker`` subprocess with its own ``TIERQ_KEY_PREFIX`` (under the
session's, so the session's cleanup removes its keys) and ``ANTHROPIC_BASE_URL`` pointing at the
replay server: it consumes its own queues and never the session's, and the session's workers
(started too) never take its jobs. Jobs are submitted and waited for by ``tests.contract.client``, a
subprocess with the contract worker's environment.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KEY_PREFIX, RUN_TAG, WorkerProcess
from tests.contract.replay import RecordedRequest, ReplayServer
from tests.helpers import run_tierq, spawn, wait_until

#: the producer side, run as its own process: ``python -m tests.contract.client``
CLIENT = "tests.contract.client"
#: seconds every job of the run may take, all together (the fast tier's deadline is 15 s)
RUN_TIMEOUT_S = 45.0
#: the document every job summarizes (the replay server answers whatever it is)
DOC = " ".join(
    f"Paragraph {i}: tiered queues keep urgent work fast while slow work waits." for i in range(20)
)


#: the text each transcript's reply carries, decoded (what a summary made of it must be)
TEXTS = {
    "ok": "Tiered queues keep urgent work fast while slow work waits its turn.",
    "padded_json": 'Café — "padded" JSON,\tsplit over lines parses the same.',
    "pings": "Pings carry no text at all.",
    "unknown_event": "New event types are ignored.",
    "unknown_block": "Only the text block is the summary.",
    "thinking_then_text": "Separate pools per tier keep fast work from queueing behind slow work.",
    "refusal": "Hello..",
    "cache_hit": "A cached prefix is read at a tenth of the input price.",
    "max_tokens_stop": "This summary was cut short by the token limit and ends mid",
    "error_before_text": "",
    "error_after_text": "Half of a summary that never",
    "dropped_connection": "Half of a summary that never",
}


@dataclass(frozen=True)
class Case:
    """One job of the run: the transcripts its requests get, in order, and its urgency."""

    name: str
    script: tuple[str, ...]
    urgency: str = "high"


#: every job of the run, by case name; a transcript that must not be retried is followed by ``ok``, so
#: that a wrong retry would succeed and be seen
CASES = {
    c.name: c
    for c in (
        Case("ok", ("ok",)),
        Case("padded_json", ("padded_json",)),
        Case("pings", ("pings",)),
        Case("unknown_event", ("unknown_event",)),
        Case("unknown_block", ("unknown_block",)),
        Case("thinking_then_text", ("thinking_then_text",)),
        Case("refusal", ("refusal", "ok")),
        Case("cache_hit", ("cache_hit",)),
        Case("max_tokens_stop", ("max_tokens_stop",)),
        Case("error_before_text", ("error_before_text", "ok")),
        Case("error_after_text", ("error_after_text", "ok")),
        Case("error_after_text_standard", ("error_after_text", "ok"), urgency="normal"),
        Case("dropped_connection", ("dropped_connection", "ok")),
        Case("http_429", ("http_429", "ok")),
        Case("spend_limit", ("spend_limit", "ok")),
        Case("http_529", ("http_529", "ok")),
        Case("http_404", ("http_404", "ok")),
        Case("http_413", ("http_413", "ok")),
    )
}


@dataclass(frozen=True, repr=False)
class Outcome:
    """How one job ended, as the producer saw it, and the requests the replay server got for it."""

    case: Case
    job_id: str
    status: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    dead_letter: dict[str, Any] | None
    requests: list[RecordedRequest]

    def __repr__(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "status": self.status,
                "result": self.result,
                "error": self.error,
                "dead_letter": self.dead_letter,
                "requests": [r.transcript for r in self.requests],
            },
            indent=1,
            default=str,
        )


def run_client(args: list[str], env: dict[str, str], stdin: str = "", timeout: float = 90.0) -> str:
    """Run ``python -m tests.contract.client ARGS`` with ``env`` over the test's environment."""
    done = run_tierq(args, env, timeout, stdin=stdin, module=CLIENT)
    if done.returncode != 0:
        raise RuntimeError(f"client {args} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


@pytest.fixture(scope="session")
def replay() -> Iterator[ReplayServer]:
    with ReplayServer() as server:
        yield server


@pytest.fixture(scope="session")
def contract_env(replay: ReplayServer) -> dict[str, str]:
    """What the contract worker and client run with: their own key prefix, the replay server's URL."""
    return {
        "TIERQ_KEY_PREFIX": f"{KEY_PREFIX}contract:",
        # the replay server answers the Messages API only, like a gateway without /v1/models: the
        # worker warns that it cannot check its models, and starts
        "ANTHROPIC_BASE_URL": replay.url,
    }


@pytest.fixture(scope="session")
def contract_worker(
    contract_env: dict[str, str], tmp_dir: Path, workers: dict[str, WorkerProcess]
) -> Iterator[WorkerProcess]:
    """One worker process serving the fast and standard tiers against the replay server.

    ``workers`` (the session's, calling the simulator) run beside it, so that isolation is tested.
    """
    proc = WorkerProcess(["fast", "standard"], tmp_dir / "worker-contract.log", env=contract_env)
    try:
        _wait_until_ready(proc, contract_env)
        yield proc
    finally:
        proc.stop()


def _wait_until_ready(proc: WorkerProcess, env: dict[str, str], timeout: float = 60.0) -> None:
    """Ping the worker from a client with its environment; fail at once if the worker exits."""
    ping = spawn(
        CLIENT, ["ping", proc.node], env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        # the ping's own exit code says whether it succeeded, after this wait or a timeout
        with contextlib.suppress(AssertionError):
            wait_until(lambda: ping.poll() is not None or proc.proc.poll() is not None, timeout, "the ping")
    finally:
        if ping.poll() is None:
            ping.kill()
        _, stderr = ping.communicate()
    if ping.returncode != 0:
        log = proc.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"contract worker not ready (ping exited {ping.returncode}):\n{stderr}\n{log}")


@pytest.fixture(scope="session")
def outcomes(
    replay: ReplayServer, contract_env: dict[str, str], contract_worker: WorkerProcess
) -> dict[str, Outcome]:
    """Every case's job, submitted at once and waited for: how each ended, by case name."""
    job_ids = {name: f"contract-{name}-{RUN_TAG}-{uuid.uuid4().hex[:6]}" for name in CASES}
    for name, case in CASES.items():
        replay.script(job_ids[name], list(case.script))
    specs = [
        {"job_id": job_ids[n], "urgency": c.urgency, "text": DOC, "timeout": RUN_TIMEOUT_S}
        for n, c in CASES.items()
    ]
    raw = json.loads(run_client(["run"], contract_env, json.dumps(specs), timeout=RUN_TIMEOUT_S + 30))
    return {
        name: Outcome(
            case=case,
            job_id=job_ids[name],
            status=raw[job_ids[name]]["status"],
            result=raw[job_ids[name]]["result"],
            error=raw[job_ids[name]]["error"],
            dead_letter=raw[job_ids[name]]["dead_letter"],
            requests=replay.requests(job_ids[name]),
        )
        for name, case in CASES.items()
    }
