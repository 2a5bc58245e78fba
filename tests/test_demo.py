"""``tierq demo`` as ``make demo`` runs it: embedded Redis, simulator, pools, Flower; and Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.helpers import run_tierq, spawn, wait_until
from tierq.contract.errors import ConfigError
from tierq.ops.demo import parse_mix, plan_urgencies

URGENCIES = ["critical", "high", "normal", "low"]


def _demo_env() -> dict[str, str]:
    """The environment of a fresh machine: nothing tierq-specific configured."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TIERQ_", "ANTHROPIC_"))}


def _ports(output: str) -> list[int]:
    return [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", output)]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _reader(proc: subprocess.Popen[bytes], out: bytearray, marker: bytes) -> Callable[[], bool]:
    """A probe that reads what ``proc`` printed into ``out`` and says whether ``marker`` came."""
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> bool:
        # raw reads: a buffered readline could hold the line where select() cannot see it
        ready, _, _ = select.select([stdout], [], [], 0.2)
        if ready:
            out.extend(os.read(stdout.fileno(), 65536))
        return marker in out

    return read


def test_parse_mix_and_plan() -> None:
    assert parse_mix("critical=1,low=3", URGENCIES) == {"critical": 0.25, "low": 0.75}
    assert sum(parse_mix(None, URGENCIES).values()) == pytest.approx(1.0)
    for bad in ("urgent=1", "critical", "critical=x", "critical=-1", "critical=0"):
        with pytest.raises(ConfigError, match="--mix"):
            parse_mix(bad, URGENCIES)
    plan = plan_urgencies(8, {"critical": 0.25, "low": 0.75})
    assert plan.count("critical") == 2 and plan.count("low") == 6
    assert plan[:4].count("critical") == 1, "interleaved, not in blocks"


@pytest.mark.slow
def test_demo_runs_to_the_end_on_embedded_defaults() -> None:
    done = run_tierq(
        ["demo", "--jobs", "12", "--time-scale", "0.05"], _demo_env(), timeout=180, inherit_env=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "embedded redis-server" in out and "simulator at" in out and "flower" in out
    assert "tierq demo: per tier" in out and "12 jobs in" in out
    for tier, model in (
        ("fast", "claude-haiku-4-5"),
        ("standard", "claude-sonnet-5-5"),
        ("slow", "claude-opus-5-5"),
    ):
        assert re.search(rf"│ {tier}\s+│\s+(\d+)/\1 │\s+0 │", out), f"{tier} row: all done, none failed"
        assert model in out
    assert not [p for p in _ports(out) if _listening(p)], "every process the demo started is gone"
    table = [line for line in out.splitlines() if line.startswith(("┏", "┃", "│", "└"))]
    assert table and max(len(line) for line in table) <= 80, "the table fits 80 columns"
    assert "queue s" in out and "cost $" in out, "units in the headers"


@contextmanager
def _running_demo(args: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], bytearray, Callable[[], None]]]:
    """``tierq demo ARGS`` as a child; what it printed so far; a check that it is still running."""
    proc = spawn(
        "tierq",
        ["demo", *args],
        _demo_env(),
        inherit_env=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()

    def check() -> None:
        assert proc.poll() is None, out.decode()

    try:
        yield proc, out, check
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.slow
def test_demo_ctrl_c_stops_everything_it_started() -> None:
    with _running_demo(["--jobs", "3000", "--time-scale", "1"]) as (proc, out, check):
        wait_until(_reader(proc, out, b"logs"), 90, "the demo's start-up lines", check, interval=0)
        text = out.decode()
        ports = _ports(text)
        assert len(ports) >= 6  # redis, simulator, three metrics ports, flower
        (sim_url,) = re.findall(r"simulator at (http://127\.0\.0\.1:\d+)", text)

        def model_calls() -> int:
            with urllib.request.urlopen(f"{sim_url}/_sim/requests", timeout=5) as response:
                return int(json.loads(response.read())["total"])

        # Ctrl-C with jobs in flight: the simulator has taken their first model calls
        wait_until(lambda: model_calls() >= 3, 30, "the demo's jobs to reach the model", check, interval=0.2)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        assert time.monotonic() - started < 30
        assert code == 130
        assert proc.stderr is not None
        assert b"every process the demo started has been stopped" in proc.stderr.read()
        assert not [p for p in ports if _listening(p)], "a process the demo started is still listening"


@pytest.mark.slow
def test_demo_keep_leaves_flower_up_until_ctrl_c() -> None:
    with _running_demo(["--jobs", "6", "--time-scale", "0.05", "--keep"]) as (proc, out, check):
        wait_until(_reader(proc, out, b"Ctrl-C stops it all"), 120, "the run to end, everything kept", check)
        text = out.decode()
        (flower_port,) = [int(p) for p in re.findall(r"flower\s+http://127\.0\.0\.1:(\d+)", text)]
        assert "6 jobs in" in text and _listening(flower_port), "Flower is still reachable after the run"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, "Ctrl-C ends a kept demo normally"
        assert not [p for p in _ports(text) if _listening(p)], "a process the demo started is still listening"
