"""tierq used from Node: celery-node on the broker (docs/contract.md), fetch on ``tierq api`` (docs/http.md).

The scripts live in ``tests/node``; each prints one JSON line of what it saw and exits non-zero when
a check fails. Their packages come from ``npm ci`` against the committed lock, run again only when
the lock changes. Without ``node``/``npm``, or without a reachable npm registry, the tests skip
with the reason.

celery-node knows nothing of ``TIERQ_KEY_PREFIX``, which this session sets: the broker test runs a
fast-tier worker of its own, without a prefix, on another database of the session's Redis, and
deletes the keys it made there (never the database).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from tests.conftest import WorkerProcess
from tests.helpers import ROOT, spawn, wait_until
from tierq.ops.embedded import free_port

#: a deployment of its own, or processes killed and restarted: in `make test`, not `make check`
pytestmark = pytest.mark.slow

NODE_DIR = ROOT / "tests" / "node"
#: seconds ``npm ci`` may take (a cold cache fetches ~30 small packages)
NPM_TIMEOUT_S = 60
#: seconds a Node script may take; each one times its own waits well within this
SCRIPT_TIMEOUT_S = 45
#: the database of the session's Redis that the broker test uses (another one if the session's is this)
BARE_DB = 13
#: every job id of the broker test starts with this, in every run, so an earlier run's leftovers are found
#: (two runs of this module at once on one Redis are not supported: their workers would share a queue)
JOB_MARK = "tierq-node-"
#: keys a fast-tier worker and kombu keep in a database without a key prefix, besides each job's
WORKER_KEYS = (
    "tierq.fast",
    "unacked:tierq.fast",
    "unacked_index:tierq.fast",
    "unacked_mutex:tierq.fast",
    "tierq:dlq",
    "tierq:stats:jobs",
)
WORKER_KEY_PATTERNS = ("_kombu.binding*", "*.reply.celery.pidbox")
#: one retry, soon: an unreachable registry is a skip within seconds, not npm's minute of backoff
NPM_FETCH = ("--fetch-retries=1", "--fetch-retry-mintimeout=1000", "--fetch-retry-maxtimeout=3000")
#: what npm prints when it cannot reach its registry
OFFLINE_SIGNS = (
    "ENOTFOUND",
    "EAI_AGAIN",
    "ECONNREFUSED",
    "ECONNRESET",
    "ETIMEDOUT",
    "ENETUNREACH",
    "EHOSTUNREACH",
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH: the Node tests need Node 20 and npm")
    return path


@pytest.fixture(scope="module")
def node() -> str:
    """The ``node`` executable, with ``tests/node/node_modules`` installed from the lock."""
    node, npm = _tool("node"), _tool("npm")
    lock = NODE_DIR / "package-lock.json"
    digest = hashlib.sha256(lock.read_bytes() + (NODE_DIR / "package.json").read_bytes()).hexdigest()
    # npm ci removes node_modules first, so a stamp inside it never outlives the install it describes
    stamp = NODE_DIR / "node_modules" / ".tierq-lock.sha256"
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == digest:
        return node
    try:
        done = subprocess.run(
            [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error", *NPM_FETCH],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm ci did not finish within {NPM_TIMEOUT_S} s: is the npm registry reachable?")
    if done.returncode != 0:
        output = f"{done.stdout}\n{done.stderr}"
        offline = [line for line in output.splitlines() if any(sign in line for sign in OFFLINE_SIGNS)]
        if offline:  # the longest such line is npm's "request to ... failed, reason: ..."
            pytest.skip(f"npm cannot reach its registry: {max(offline, key=len)[:300]}")
        pytest.fail(f"npm ci failed in {NODE_DIR}:\n{output[-3000:]}")
    stamp.write_text(digest, encoding="utf-8")
    return node


def run_script(node: str, script: str, env: dict[str, str]) -> dict[str, Any]:
    """Run a Node script of tests/node; what it saw (its JSON line), once it exited 0."""
    try:
        done = subprocess.run(
            [node, script],
            cwd=NODE_DIR,
            env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), **env},
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{script} still running after {SCRIPT_TIMEOUT_S} s: {exc.stdout!r}") from None
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, f"{script} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    saw: dict[str, Any] = json.loads(lines[-1])
    assert saw["ok"] is True, saw
    print(f"{script} saw: {lines[-1]}")  # shown by pytest -rP
    return saw


# -- (a) celery-node straight to the broker --------------------------------------------------------


def _bare_url(session_url: str) -> str:
    """The session's Redis with another database number (BARE_DB, or one more if the session uses it)."""
    parts = urlsplit(session_url)
    db = BARE_DB if parts.path.strip("/") != str(BARE_DB) else BARE_DB + 1
    return urlunsplit(parts._replace(path=f"/{db}"))


def _all_keys(client: redis.Redis) -> set[bytes]:
    return set(client.scan_iter(count=1000))


def _remove_ours(client: redis.Redis, job_prefix: str, before: set[bytes], stats_last: bytes | None) -> None:
    """Delete what this run made in the database: its jobs' keys, and the worker's and kombu's keys
    that were not there ``before``; where those were, only this run's members of them."""
    ours = set(client.scan_iter(match=f"*{job_prefix}*", count=1000))
    made = _all_keys(client) - before
    ours |= {key for key in made if key.decode() in WORKER_KEYS}
    for pattern in WORKER_KEY_PATTERNS:
        ours |= made & set(client.scan_iter(match=pattern, count=1000))
    if ours:
        client.delete(*ours)
    if b"tierq:dlq" in before:
        members = [m for m in client.zrange("tierq:dlq", 0, -1) if m.startswith(job_prefix.encode())]
        if members:
            client.zrem("tierq:dlq", *members)
    if b"tierq:stats:jobs" in before:
        # stats entries carry no job id: this run's are those after the newest one before it
        start = b"(" + stats_last if stats_last else b"-"
        added = [entry_id for entry_id, _ in client.xrange("tierq:stats:jobs", min=start)]
        if added:
            client.xdel("tierq:stats:jobs", *added)


@dataclass(frozen=True)
class BareBroker:
    """A database without a key prefix, a fast-tier worker on it, and the start of this run's job ids."""

    url: str
    worker: WorkerProcess
    job_prefix: str


@pytest.fixture(scope="module")
def bare_broker(tmp_dir: Path) -> Iterator[BareBroker]:
    """A fast-tier worker without a key prefix on a database of its own."""
    url = _bare_url(os.environ["TIERQ_BROKER_URL"])
    job_prefix = f"{JOB_MARK}{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    leftovers = list(client.scan_iter(match=f"*{JOB_MARK}*", count=1000))
    if leftovers:  # an earlier run that was killed before it cleaned up
        client.delete(*leftovers)
    stale = [m for m in client.zrange("tierq:dlq", 0, -1) if m.startswith(JOB_MARK.encode())]
    if stale:
        client.zrem("tierq:dlq", *stale)
    before = _all_keys(client)
    stats: Any = client.xrevrange("tierq:stats:jobs", count=1) if b"tierq:stats:jobs" in before else []
    env = {
        "TIERQ_BROKER_URL": url,
        "TIERQ_KEY_PREFIX": "",
        "ANTHROPIC_BASE_URL": os.environ["ANTHROPIC_BASE_URL"],
        "TIERQ_TIERS_FILE": os.environ["TIERQ_TIERS_FILE"],
    }
    worker = WorkerProcess(["fast"], tmp_dir / "worker-node-bare.log", env)
    try:
        wait_until(
            lambda: f"{worker.node} ready." in worker.log_path.read_text(errors="replace"),
            60,
            f"{worker.node} ready on {url}",
            worker.check,
        )
        yield BareBroker(url, worker, job_prefix)
    finally:
        worker.stop()
        _remove_ours(client, job_prefix, before, stats[0][0] if stats else None)
        client.close()


def test_celery_node_sends_jobs_by_the_contract(node: str, bare_broker: BareBroker) -> None:
    worker, prefix = bare_broker.worker, bare_broker.job_prefix
    saw = run_script(
        node, "broker.mjs", {"TIERQ_NODE_BROKER_URL": bare_broker.url, "TIERQ_NODE_JOB_PREFIX": prefix}
    )

    assert saw["plain"]["status"] == saw["streamed"]["status"] == "SUCCESS", saw
    assert saw["plain"]["tier"] == "fast" and saw["plain"]["summary_chars"] > 0
    assert saw["streamed"]["end"] == "succeeded" and saw["streamed"]["chunks"] >= 1
    assert saw["timed"]["status"] == "SUCCESS" and saw["timed"]["queue_wait_ms"] >= 0
    assert saw["late"]["exc_type"] == "DeadlineExceededError"
    assert saw["wrong_tier"]["exc_type"] == saw["positional"]["exc_type"] == "InvalidJobError"
    # the worker's side: the queue wait is known only with tierq_enqueued_at; one line per failed job
    (completed,) = worker.wait_for(f"{prefix}.plain", "summarize.completed")
    assert completed["enqueued_at"] == "first_seen" and completed["queue_wait_ms"] is None
    assert completed["tier"] == "fast"
    (completed,) = worker.wait_for(f"{prefix}.timed", "summarize.completed")
    assert completed["enqueued_at"] == "producer" and completed["queue_wait_ms"] >= 0
    (expired,) = worker.wait_for(f"{prefix}.late", "summarize.failed")
    assert expired["reason"] == "expired"
    (failed,) = worker.wait_for(f"{prefix}.wrong-tier", "summarize.failed")
    assert failed["reason"] == "invalid job"
    (rejected,) = worker.wait_for(f"{prefix}.positional", "message.rejected")
    assert rejected["kind"] == "body"
    worker.check()


# -- (b) fetch on the HTTP API ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_dir: Path, workers: dict[str, WorkerProcess]) -> Iterator[tuple[str, str]]:
    """``tierq api`` on a free port, in this session's environment, with a token for producer ``node``;
    its URL and the token."""
    token = secrets.token_urlsafe(32)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_dir / "api-node.log"
    with log_path.open("wb") as log:
        proc = spawn(
            "tierq",
            ["api", "--host", "127.0.0.1", "--port", str(port)],
            {"TIERQ_API_TOKENS": f"node:{hashlib.sha256(token.encode()).hexdigest()}"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"tierq api exited early:\n{log_path.read_text(errors='replace')[-3000:]}")

    try:
        wait_until(healthy, 30, f"tierq api to answer {url}/healthz", alive)
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_fetch_submits_streams_resumes_and_reads(node: str, api: tuple[str, str]) -> None:
    url, token = api
    saw = run_script(node, "http.mjs", {"TIERQ_NODE_API_URL": url, "TIERQ_NODE_API_TOKEN": token})

    events = saw["events"]
    assert events["before_reconnect"][-1] == "text" and events["after_reconnect"][-1] == "result", events
    assert events["ids_increasing"] is True and events["repeated"] == 0
    assert saw["read"]["status"] == "succeeded" and saw["read"]["tier"] == "fast"
    assert saw["quiet"]["events"] == ["result"]
