"""dollars: what 1,000 jobs of a realistic mix cost, with and without Message Batches and the prompt
cache; and how long the bulk tier's jobs take against the simulator.

The same mix of jobs runs four times through real workers (fast, standard, slow, and bulk when
batches are on) against the simulator, each run from a fresh simulator (an empty prompt cache) and
a flushed Redis:

- **messages only**: the ``bulk`` urgency sent to the standard tier (a tiers file's
  ``[urgencies]``), ``TIERQ_PROMPT_CACHE=false``: every job one streamed call at full price;
- **+ prompt cache**: as above, the workers marking shared prefixes;
- **+ batches**: the bulk urgency on the bulk tier (Message Batches), no cache;
- **+ both**: the shipped defaults.

Dollars are each job's ``cost_usd``: the simulator's token usage priced by the product's table
(``tierq/llm/prices.toml``: batch discount, cache writes and reads). The mix, per 100 jobs: 15
critical and 10 high (fast tier: short documents, no instructions), 35 normal (standard: a
6,000-character document and one of three shared rubrics of ~3,000 characters), 10 low (slow: a
20,000-character document and a rubric), 30 bulk (a 6,000-character document and a rubric). The
bulk tier's jobs, submitted as one burst, give the completion time distribution: submit → result,
and the part of it that is the batch's own processing at the simulator (``created_at`` →
``ended_at`` of its batch, scaled by ``--time-scale``) against the part tierq adds (gathering,
polls, fan-out).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic

from bench.docs import make_doc
from bench.harness import Harness, Sim, Stage
from bench.result import Options, ScenarioResult
from bench.stats import median, percentile

__all__ = ["TITLE", "run"]

TITLE = "dollars: cost per 1,000 jobs of a realistic mix, with and without batches and the prompt cache"
TIME_SCALE = 0.05
#: (urgency, share of the mix per 100 jobs, document sentences, takes a rubric)
MIX = (
    ("critical", 15, 18, False),
    ("high", 10, 36, False),
    ("normal", 35, 75, True),
    ("low", 10, 250, True),
    ("bulk", 30, 75, True),
)
RUBRICS = 3
#: (name, batches on, prompt cache on)
CONFIGS = (
    ("messages", False, False),
    ("+cache", False, True),
    ("+batches", True, False),
    ("+both", True, True),
)
RESULT_TIMEOUT_S = 600.0


@dataclass
class _Run:
    name: str
    jobs: int
    results: list[dict[str, Any]]
    failed: int
    elapsed_s: float

    def dollars_per_1000(self) -> float:
        return sum(r.get("cost_usd") or 0.0 for r in self.results) * 1000 / max(1, self.jobs)

    def cache_hit_ratio(self) -> float | None:
        usage = [r["usage"] for r in self.results]
        prompt = sum(
            u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"] for u in usage
        )
        return sum(u["cache_read_input_tokens"] for u in usage) / prompt if prompt else None

    def batched(self) -> int:
        return sum(1 for r in self.results if r.get("path") == "batch")

    def by_urgency(self, urgency: str) -> float:
        """Dollars per 1,000 jobs of one urgency."""
        mine = [r for r in self.results if (r.get("metadata") or {}).get("urgency") == urgency]
        return sum(r.get("cost_usd") or 0.0 for r in mine) * 1000 / max(1, len(mine))


def _rubric(i: int) -> str:
    rules = " ".join(
        f"Rule {i}.{n}: state claim {n} of the document, who makes it and on what evidence, in one "
        "plain sentence; leave out anything the document does not say."
        for n in range(22)
    )
    return f"Summarize the document below for reviewer team {i}. {rules}"


def _jobs(total: int) -> list[tuple[str, str, str | None]]:
    """``total`` jobs of the mix, interleaved: (urgency, text, instructions)."""
    per_100 = sum(share for _, share, _, _ in MIX)
    jobs: list[tuple[str, str, str | None]] = []
    for kind, (urgency, share, sentences, rubric) in enumerate(MIX):
        count = max(1, round(total * share / per_100))
        for i in range(count):
            doc = make_doc(sentences, seed=kind * 1000 + i % 50)
            jobs.append((urgency, doc, _rubric(i % RUBRICS) if rubric else None))
    random.Random(14).shuffle(jobs)  # the urgencies interleaved, as they would arrive
    return jobs


@contextlib.contextmanager
def _deployment(stage: Stage, batches: bool, cache: bool) -> Iterator[tuple[Sim, Any]]:
    """A fresh simulator, the tiers' workers, and a producer of the same tiers file."""
    from tierq.celery.app import make_app
    from tierq.contract.tiers import load_tier_table
    from tierq.core.settings import Settings
    from tierq.producer import Producer

    sim = stage.start_sim(time_scale=TIME_SCALE, jitter=0.0)
    tiers_file = stage.write_tiers("" if batches else '[urgencies]\nbulk = "standard"\n')
    env = {"TIERQ_PROMPT_CACHE": "true" if cache else "false"}
    tiers = ["fast", "standard", "slow", *(["bulk"] if batches else [])]
    children = [stage.start_worker(tier, sim, None, tiers_file, env) for tier in tiers]
    settings = Settings(tiers_file=tiers_file)
    table = load_tier_table(tiers_file)
    app = make_app(settings, table)
    try:
        yield sim, Producer(settings, table, app)
    finally:
        app.close()
        for child in reversed(children):
            stage.stop(child)
        stage.stop(sim.child)


def _one(
    harness: Harness,
    index: int,
    name: str,
    batches: bool,
    cache: bool,
    jobs: list[tuple[str, str, str | None]],
) -> _Run:
    from bench.producer import wait_results
    from tierq.producer import submit

    with harness.stage(f"dollars-{index}") as stage, _deployment(stage, batches, cache) as (sim, producer):
        started = time.monotonic()
        ids = [
            submit(
                text, urgency, instructions=instructions, metadata={"urgency": urgency}, producer=producer
            ).id
            for urgency, text, instructions in jobs
        ]
        with contextlib.closing(harness.client()) as client:
            metas = wait_results(client, ids, timeout=RESULT_TIMEOUT_S)
        elapsed = time.monotonic() - started
        results = [m["result"] for m in metas.values() if m.get("status") == "SUCCESS"]
        run = _Run(name, len(jobs), results, len(jobs) - len(results), elapsed)
        if batches:
            _batch_windows(sim, run)
    return run


def _batch_windows(sim: Sim, run: _Run) -> None:
    """Each batch's processing time at the simulator (``ended_at - created_at``), on its results."""
    client = anthropic.Anthropic(base_url=sim.url, api_key="bench", max_retries=2)
    spans: dict[str, float] = {}
    for result in run.results:
        batch_id = result.get("batch_id")
        if batch_id and batch_id not in spans:
            batch = client.messages.batches.retrieve(batch_id)
            ended = batch.ended_at or batch.created_at
            spans[batch_id] = (ended - batch.created_at).total_seconds() * 1000
        if batch_id:
            result["_batch_processing_ms"] = spans[batch_id]
    client.close()


def run(harness: Harness, options: Options) -> ScenarioResult:
    total = 40 if options.quick else 400
    jobs = _jobs(total)
    result = ScenarioResult(
        "dollars",
        TITLE,
        config={
            "jobs_per_config": len(jobs),
            "mix_per_100": {u: share for u, share, _, _ in MIX},
            "rubrics": RUBRICS,
            "rubric_chars": len(_rubric(0)),
            "sim_time_scale": TIME_SCALE,
        },
        pools=["tierq fast, standard, slow (and bulk with batches): tier defaults"],
    )
    runs = [_one(harness, i, name, batches, cache, jobs) for i, (name, batches, cache) in enumerate(CONFIGS)]
    base = runs[0].dollars_per_1000()
    result.columns = [
        "config",
        "failed",
        "$/1k jobs",
        "vs base",
        "cache hit",
        "batched",
        *(f"$/1k {u[:4]}" for u, *_ in MIX),
    ]
    for one in runs:
        dollars = one.dollars_per_1000()
        hit = one.cache_hit_ratio()
        result.rows.append(
            [
                one.name,
                one.failed,
                round(dollars, 3),
                f"{dollars / base:.0%}" if base else "-",
                "-" if hit is None else f"{hit:.0%}",
                one.batched(),
                *(round(one.by_urgency(u), 3) for u, *_ in MIX),
            ]
        )
        result.runs.append(
            {
                "config": one.name,
                "dollars_per_1000": dollars,
                "cache_hit_ratio": hit,
                "elapsed_s": one.elapsed_s,
            }
        )
    both = runs[-1]
    result.summary = {
        "dollars_per_1000_messages_only": round(base, 4),
        "dollars_per_1000_defaults": round(both.dollars_per_1000(), 4),
        "defaults_vs_messages_only": round(both.dollars_per_1000() / base, 4) if base else None,
    }
    _completion(result, both)
    return result


def _completion(result: ScenarioResult, both: _Run) -> None:
    """The bulk tier's completion time distribution, and tierq's share of it."""
    bulk = [r for r in both.results if r.get("path") == "batch"]
    totals = [r["timings"]["total_ms"] / 1000 for r in bulk]
    processing = [r.get("_batch_processing_ms", 0.0) / 1000 for r in bulk]
    added = [t - p for t, p in zip(totals, processing, strict=True)]
    batches = len({r["batch_id"] for r in bulk})
    for name, values in (
        ("bulk_total_s", totals),
        ("bulk_batch_processing_s", processing),
        ("bulk_added_s", added),
    ):
        for q in (50, 90, 99):
            result.summary[f"{name}_p{q}"] = None if not values else round(percentile(values, q) or 0.0, 2)
    result.samples["bulk_total_s"] = sorted(totals)
    if totals:
        scale = TIME_SCALE
        result.notes.append(
            f"bulk tier: {len(bulk)} jobs in {batches} batch(es); submit → result "
            f"p50 {median(totals):.1f} s, p90 {percentile(totals, 90):.1f} s, "
            f"p99 {percentile(totals, 99):.1f} s, max {max(totals):.1f} s at time scale {scale}"
        )
        result.notes.append(
            f"of which the batch's processing at the simulator ((120 + 0.25 n) s x scale after its create): "
            f"p50 {median(processing):.1f} s (~{median(processing) / scale / 60:.1f} min at real speed); "
            f"tierq's share (gathering up to max_age_s 5 s, polls from 1 s doubling, fan-out), not scaled: "
            f"p50 {median(added):.1f} s, p99 {percentile(added, 99):.1f} s"
        )
    result.notes.append(
        "$/1k <urgency>: dollars per 1,000 jobs of that urgency; dollars: each job's cost_usd, the "
        "simulator's token usage priced by tierq/llm/prices.toml; the simulator's output length "
        "follows the document, so the mix's dollars are a model of a workload, not an invoice"
    )
