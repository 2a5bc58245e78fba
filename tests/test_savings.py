"""Savings on the standard tier: slack routing (a job goes through Message Batches only when its
deadline can wait) and the prompt cache (a stable prefix marked once it is sent again).

A deployment of its own (a key prefix, a tiers file giving the standard tier
``batch_when_slack_s = 120``) and one real standard worker, against the session's simulator.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import WorkerProcess, own_deployment
from tests.helpers import run_tierq
from tierq import Producer, submit
from tierq.contract.tiers import BatchPolicy, Tier
from tierq.llm.caching import REUSE_WINDOW_S, CachePlanner
from tierq.llm.client import LLMRequest, message_params
from tierq.llm.pricing import cost_usd

#: a deployment of its own, or processes killed and restarted: in `make test`, not `make check`
pytestmark = pytest.mark.slow

TIERS = """
[tiers.standard]
batch_when_slack_s = 120
"""
DOC = " ".join(f"Sentence {i} of a document whose deadline decides its path." for i in range(20))


@dataclass
class Deployment:
    producer: Producer
    worker: WorkerProcess
    env: dict[str, str]


@pytest.fixture(scope="module")
def deployment(tmp_dir: Path, redis_url: str) -> Iterator[Deployment]:
    with own_deployment("savings", tmp_dir, redis_url, TIERS, {"standard": ["standard"]}) as own:
        yield Deployment(own.producer, own.workers["standard"], own.env)


def test_a_job_with_slack_goes_through_a_batch_and_a_pressing_one_does_not(deployment: Deployment) -> None:
    pressing = submit(DOC, urgency="normal", deadline_s=60, producer=deployment.producer)
    relaxed = submit(DOC, urgency="normal", producer=deployment.producer)  # the tier's 300 s
    fast = pressing.result(timeout=30)
    assert fast.tier == "standard" and fast.path == "messages" and fast.batch_id is None
    assert fast.timings.batch_wait_ms is None and fast.timings.ttft_ms is not None
    assert fast.cost_usd == cost_usd(fast.model, fast.usage)
    slow = relaxed.result(timeout=90)
    assert slow.tier == "standard" and slow.path == "batch" and slow.batch_id
    assert slow.timings.batch_wait_ms is not None and slow.timings.batch_wait_ms > 0
    assert slow.cost_usd == cost_usd(slow.model, slow.usage, batch=True)
    lines = {
        job.id: deployment.worker.wait_for(job.id, "summarize.completed")[0] for job in (pressing, relaxed)
    }
    assert lines[pressing.id]["path"] == "messages" and lines[relaxed.id]["path"] == "batch"
    assert deployment.worker.events_for(relaxed.id, "summarize.parked")


def test_batch_when_slack_s_gives_the_tier_a_batch_policy_and_decides_by_slack() -> None:
    tier = Tier(
        name="t", queue="q", model="claude-sonnet-5-5", max_tokens=64, deadline_s=600, batch_when_slack_s=120
    )
    assert tier.batch == BatchPolicy()
    assert tier.takes_batch(121) and not tier.takes_batch(120) and not tier.takes_batch(5)
    always = tier.model_copy(update={"batch_when_slack_s": None})
    assert always.takes_batch(0)
    never = tier.model_copy(update={"batch": None, "batch_when_slack_s": None})
    assert not never.takes_batch(86_400)
    with pytest.raises(ValueError, match="batch_when_slack_s"):
        Tier(name="t", queue="q", model="m", max_tokens=64, deadline_s=600, batch_when_slack_s=0)
    # a threshold at or over the deadline would batch nothing: refused as the tiers file loads
    with pytest.raises(ValueError, match="must be below deadline_s"):
        Tier(name="t", queue="q", model="m", max_tokens=64, deadline_s=300, batch_when_slack_s=3600)


def test_instructions_sent_again_are_cached_and_paid_for_at_the_cache_price(deployment: Deployment) -> None:
    """A producer's long instructions (a rubric: with the system prompt over Sonnet 5.5's minimum of
    512 tokens): the first job goes uncached, the second writes the prefix, the third reads it."""
    rubric = f"Rubric {uuid.uuid4().hex}. " + " ".join(
        f"Rule {i}: name the document's claim number {i} and who makes it, in one plain sentence."
        for i in range(40)
    )
    results = []
    for i in range(3):
        job = submit(
            f"{DOC} Item {i}.",
            urgency="normal",
            instructions=rubric,
            deadline_s=60,
            producer=deployment.producer,
        )
        results.append(job.result(timeout=30))
    first, second, third = (r.usage for r in results)
    assert all(r.path == "messages" for r in results)
    assert first.cache_creation_input_tokens == 0 and first.cache_read_input_tokens == 0
    assert second.cache_creation_input_tokens >= 512 and second.cache_read_input_tokens == 0
    assert third.cache_read_input_tokens == second.cache_creation_input_tokens
    assert third.cache_creation_input_tokens == 0 and third.input_tokens < first.input_tokens
    # billed at the cache's prices: the third job's prompt costs less than the first's
    uncached = cost_usd(results[2].model, third.model_copy(update={
        "input_tokens": third.prompt_tokens, "cache_read_input_tokens": 0}))  # fmt: skip
    assert results[2].cost_usd is not None and uncached is not None and results[2].cost_usd < uncached
    assert results[2].cost_usd == cost_usd(results[2].model, third)
    # operators see it: the tokens metric, tierq stats' hit ratio
    tokens = deployment.worker.metric("tierq_tokens", "direction")
    assert tokens["cache_read"] >= third.cache_read_input_tokens and tokens["cache_write"] > 0
    stats = run_tierq(["stats", "--json"], deployment.env)
    assert stats.returncode == 0, stats.stderr
    ratio = json.loads(stats.stdout)["standard"]["cache_hit_ratio"]
    assert 0 < ratio < 1


def _request(system: str, instructions: str = "", model: str = "claude-sonnet-5-5") -> LLMRequest:
    return LLMRequest("j", model, system, "<document>\nText.\n</document>", 64, instructions=instructions)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_planner_marks_a_long_prefix_only_once_it_is_sent_again_within_minutes() -> None:
    clock = _Clock()
    planner = CachePlanner(clock=clock)
    long_system = "You summarize. " * 200  # ~860 estimated tokens: over Sonnet 5.5's 512
    short_system = "You summarize."
    first = planner.mark(_request(long_system))
    assert not first.cache_system
    again = planner.mark(_request(long_system))
    assert again.cache_system and not again.cache_instructions
    # another model is another cache
    assert not planner.mark(_request(long_system, model="claude-opus-5-5")).cache_system
    # under the model's minimum: never marked, however often it is sent
    for _ in range(3):
        assert not planner.mark(_request(short_system)).cache_system
    # Haiku 4.5 caches from 4096 tokens: the same long prompt is too short for it
    for _ in range(2):
        assert not planner.mark(_request(long_system, model="claude-haiku-4-5")).cache_system
    # instructions take the short system prompt over the minimum: marked on their second send
    rubric = "Rule: one plain sentence per claim. " * 60
    assert not planner.mark(_request(short_system, rubric)).cache_instructions
    marked = planner.mark(_request(short_system, rubric))
    assert marked.cache_instructions and not marked.cache_system
    # past the window the cache has gone: the next send writes nothing it would not read
    clock.now += REUSE_WINDOW_S + 1
    assert not planner.mark(_request(long_system)).cache_system
    assert planner.mark(_request(long_system)).cache_system


def test_the_planner_remembers_a_bounded_number_of_prefixes() -> None:
    planner = CachePlanner(max_prefixes=2)
    prompts = [f"Prompt {i}. " + "Summarize plainly. " * 120 for i in range(3)]
    for system in prompts:
        planner.mark(_request(system))
    assert len(planner._sent) == 2
    assert not planner.mark(_request(prompts[0])).cache_system  # forgotten: the oldest went first
    assert planner.mark(_request(prompts[2])).cache_system


def test_breakpoints_go_on_the_system_block_and_the_instructions_block() -> None:
    request = dataclasses.replace(_request("S " * 10, "Do this."), cache_system=True, cache_instructions=True)
    params = message_params(request)
    assert params["system"] == [{"type": "text", "text": "S " * 10, "cache_control": {"type": "ephemeral"}}]
    [turn] = params["messages"]
    assert turn["content"] == [
        {"type": "text", "text": "Do this.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "<document>\nText.\n</document>"},
    ]
    plain = message_params(_request("S", "Do this."))
    assert (
        plain["system"] == "S"
        and plain["messages"][0]["content"] == "Do this.\n\n<document>\nText.\n</document>"
    )
