"""The benchmark harness: ``python -m bench SCENARIO --quick`` runs, cleans up and writes JSON and PNG.

Behaviour only (keys present, numbers positive, processes gone), never timing thresholds: the
figures depend on the machine.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.result import Options, ScenarioResult, Target
from bench.stats import median, percentile, ratio, summarize
from tests.helpers import spawn, wait_until

ENV_KEYS = {"python", "celery", "kombu", "redis-py", "anthropic", "cores"}


def run_bench(tmp_path: Path, scenario: str, timeout: float = 90) -> dict[str, Any]:
    out_json, out_png = tmp_path / f"{scenario}.json", tmp_path / f"{scenario}.png"
    args = [scenario, "--quick", "--json", str(out_json), "--png", str(out_png)]
    proc = spawn("bench", args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Ctrl-C first: the bench stops what it started; SIGKILL only if it will not
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        tail = stdout[-3000:] + stderr[-3000:]
        raise AssertionError(f"bench {scenario} ran past {timeout} s:\n{tail}") from None
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "environment" in stdout
    assert out_png.stat().st_size > 1000
    document: dict[str, Any] = json.loads(out_json.read_text())
    assert set(document["environment"]) >= ENV_KEYS
    assert document["scenario"] == scenario
    assert document["skipped"] is None
    for target in document["targets"]:
        assert {"name", "value", "op", "limit", "met"} <= set(target)
        assert target["met"] in (True, False)
    return document


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_overhead_quick(tmp_path: Path) -> None:
    doc = run_bench(tmp_path, "overhead")
    summary = doc["summary"]
    for key in ("raw_ms", "raw_events_ms", "tierq_ms", "tierq_enqueue_to_body_ms"):
        assert all(positive(summary[key][q]) for q in ("p50", "p95", "p99")), key
    assert all(positive(summary[f"ratio_{q}"]) for q in ("p50", "p95", "p99"))
    assert [t["name"] for t in doc["targets"]] == ["overhead ratio p50", "overhead ratio p99"]
    assert doc["samples"]["raw_ms"] and doc["samples"]["tierq_ms"]
    assert len(doc["runs"]) == doc["config"]["runs"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_concurrency_quick(tmp_path: Path) -> None:
    doc = run_bench(tmp_path, "concurrency", timeout=180)
    (level,) = doc["config"]["n"]
    for variant in ("asyncio", "threads", "raw sleep"):
        row = doc["summary"][f"{variant}/n{level}"]
        for key in (
            "jobs_per_s",
            "fraction_of_ideal",
            "peak_in_flight",
            "worker_cpu_ms_per_job",
            "worker_rss_mb",
        ):
            assert positive(row[key]), (variant, key)
        assert row["failed"] == 0, variant
        assert set(row["cpu_util"]) == {"worker", "sim", "redis"}
    assert all(r["jobs"] == 3 * level for r in doc["runs"])
    assert {r["output_tokens"] for r in doc["runs"] if r["variant"] != "raw sleep"} <= set(range(1, 65))


def test_stats_helpers() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    stats = summarize([float(v) for v in range(1, 101)])
    assert (stats["n"], stats["min"], stats["max"]) == (100, 1.0, 100.0)
    assert stats["p50"] == pytest.approx(50.5)
    assert median([3.0, None, 1.0, math.nan, 2.0]) == 2.0
    assert math.isnan(ratio(1.0, 0.0))


def test_targets_options_and_json_safety() -> None:
    assert Target("t", 1.2, "<=", 1.5).met is True
    assert Target("t", 0.8, ">=", 0.9).met is False
    assert Target("t", math.nan, "<=", 1.0).met is None
    assert Options().runs_or(3) == 3
    assert Options(quick=True).runs_or(3, quick=1) == 1
    assert Options(runs=5, quick=True).runs_or(3) == 5
    result = ScenarioResult(
        "x", "X", summary={"a": math.nan, "b": [1.0, math.inf]}, targets=[Target("t", None, "<=", 1)]
    )
    cleaned = result.as_dict()
    assert cleaned["summary"] == {"a": None, "b": [1.0, None]}
    json.dumps(cleaned, allow_nan=False)


def _children(pid: int) -> set[int]:
    """Pids whose parent is ``pid``."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _gone(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rindex(")") + 2] == "Z"


@pytest.mark.slow
def test_interrupt_stops_every_process(tmp_path: Path) -> None:
    output = (tmp_path / "bench.out").open("wb")
    proc = spawn(
        "bench",
        ["overhead", "--quick", "--json", str(tmp_path / "o.json")],
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    try:
        seen: set[int] = set()

        def three_children() -> bool:  # redis, simulator, a worker
            seen.update(_children(proc.pid))
            return len(seen) >= 3

        wait_until(three_children, 60, "the bench's redis, simulator and worker", interval=0.1)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        assert code == 130, (tmp_path / "bench.out").read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        output.close()
    wait_until(lambda: all(_gone(pid) for pid in seen), 10, "the bench's processes to end", interval=0.1)
    assert not (tmp_path / "o.json").exists()
