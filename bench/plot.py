"""The PNG: one panel per scenario (CDFs of latencies, bars of throughput and CPU)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from bench.result import ScenarioResult

__all__ = ["save_figure"]


def _cdf(ax: Axes, series: dict[str, list[float]], xlabel: str) -> None:
    """Step CDFs; the x axis stops a little past the largest p99, so one outlier does not squash them."""
    p99s = [sorted(v)[int((len(v) - 1) * 0.99)] for v in series.values() if v]
    for label, values in series.items():
        if not values:
            continue
        ordered = sorted(values)
        n = len(ordered)
        ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=f"{label} (n={n})")
    if p99s:
        ax.set_xlim(right=max(p99s) * 1.25)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of jobs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _overhead(ax: Axes, r: ScenarioResult) -> None:
    s = r.samples
    series = {
        "raw Celery no-op": s.get("raw_ms", []),
        "raw + events + track_started": s.get("raw_events_ms", []),
        "tierq fast (to request at sim)": s.get("tierq_ms", []),
    }
    _cdf(ax, series, "enqueue → start (ms)")


def _isolation(ax: Axes, r: ScenarioResult) -> None:
    s = r.samples
    _cdf(
        ax,
        {"slow tier idle": s.get("idle_ms", []), "slow tier backlog": s.get("backlog_ms", [])},
        "fast job submit → result (ms)",
    )


def _streaming(ax: Axes, r: ScenarioResult) -> None:
    s = r.samples
    series = {
        "producer TTFT": s.get("producer_ttft_ms", []),
        "simulator TTFT": s.get("sim_ttft_ms", []),
        "difference": s.get("diff_ms", []),
    }
    _cdf(ax, series, "ms")


def _concurrency(ax: Axes, r: ScenarioResult) -> None:
    s = r.samples
    ns = sorted({int(n) for n in s.get("n", [])})
    variants = list(dict.fromkeys(s.get("variant", [])))
    x = list(range(len(ns)))
    width = 0.8 / (len(variants) + 1)
    ax.bar([i - 0.4 + width / 2 for i in x], [n / 0.5 for n in ns], width=width, label="ideal", color="0.8")
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
    for k, variant in enumerate(variants):
        picks = [j for j, v in enumerate(s["variant"]) if v == variant]
        pos = [ns.index(int(s["n"][j])) - 0.4 + width * (k + 1.5) for j in picks]
        values = [s["jobs_per_s"][j] for j in picks]
        ax.bar(pos, values, width=width, label=variant, color=colors[k % len(colors)])
        for p, j in zip(pos, picks, strict=True):
            ax.annotate(
                f"{s['fraction'][j]:.0%}", (p, s["jobs_per_s"][j]), ha="center", va="bottom", fontsize=6
            )
    ax.set_xticks(x, [f"N={n}" for n in ns])
    ax.set_ylabel("jobs/s (label: share of ideal)")
    ax.legend(fontsize=7, loc="upper left")


def _cost(ax: Axes, r: ScenarioResult) -> None:
    s = r.samples
    labels = ["raw no-op", "SDK parse", "raw + SDK", "tierq fast"]
    values = [s.get(k, [0.0])[0] for k in ("raw_ms", "sdk_ms", "baseline_ms", "tierq_ms")]
    colors = ["0.6", "0.75", "0.45", "tab:blue"]
    if s.get("tierq_stream_ms"):
        labels.append("tierq stream=True")
        values.append(s["tierq_stream_ms"][0])
        colors.append("tab:cyan")
    ax.bar(labels, values, color=colors)
    if s.get("baseline_ms"):
        ax.axhline(1.5 * s["baseline_ms"][0], color="tab:red", ls="--", lw=1, label="target 1.5x (raw + SDK)")
        ax.legend(fontsize=7)
    ax.set_ylabel("CPU ms per job")
    ax.tick_params(axis="x", labelsize=7)


def _http(ax: Axes, r: ScenarioResult) -> None:
    s = r.samples
    series = {"tierq.submit()": s.get("python_ms", []), "POST /v1/jobs": s.get("http_ms", [])}
    _cdf(ax, series, "submit → request at simulator (ms)")


def _ratelimit(ax: Axes, r: ScenarioResult) -> None:
    s = r.samples
    series = {
        "A: limiter on, no burst": s.get("fast_queue_added_ms_A", []),
        "B: limiter on, slow burst": s.get("fast_queue_added_ms_B", []),
        "C: limiter off, slow burst": s.get("fast_queue_added_ms_C", []),
    }
    _cdf(ax, series, "fast job queue-added latency, total_ms - llm_ms (ms)")


def _dollars(ax: Axes, r: ScenarioResult) -> None:
    names = [str(row[0]) for row in r.rows]
    values = [float(row[2]) for row in r.rows]
    ax.bar(names, values, color="tab:green")
    for i, value in enumerate(values):
        ax.text(i, value, f"${value:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("$ per 1,000 jobs of the mix")
    ax.tick_params(axis="x", labelsize=7)


_PANELS: dict[str, Callable[[Axes, ScenarioResult], None]] = {
    "overhead": _overhead,
    "isolation": _isolation,
    "streaming": _streaming,
    "concurrency": _concurrency,
    "cost": _cost,
    "http": _http,
    "ratelimit": _ratelimit,
    "dollars": _dollars,
}


def _panel(ax: Axes, result: ScenarioResult) -> None:
    ax.set_title(result.title, fontsize=9)
    if result.skipped:
        ax.text(0.5, 0.5, result.skipped[:120], ha="center", va="center", wrap=True, fontsize=8)
        ax.set_axis_off()
        return
    _PANELS[result.scenario](ax, result)


def save_figure(results: Sequence[ScenarioResult], path: Path) -> None:
    """One panel per result, in a grid of up to three columns."""
    count = max(1, len(results))
    cols = min(3, count)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, result in zip(flat, results, strict=False):
        _panel(ax, result)
    for ax in flat[len(results) :]:
        ax.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
