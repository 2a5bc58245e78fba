"""The shared rate limiter (``tierq/store/ratelimit.py``) against a real Redis: several limiters
(as several worker processes would hold) sharing one model's buckets."""

from __future__ import annotations

import itertools
import json
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Queue

from tests.conftest import KEY_PREFIX
from tests.helpers import run_tierq, wait_until
from tierq import submit
from tierq.admission import Admission
from tierq.celery.app import app as celery_app
from tierq.contract.errors import (
    CapacityWaitError,
    ConfigError,
    DeadlineUnmeetableError,
    JobFailedError,
    RequestRejectedError,
)
from tierq.contract.job import build_prompt
from tierq.contract.tiers import load_tier_table
from tierq.core.settings import Settings
from tierq.core.tokens import estimate_tokens
from tierq.llm.client import LLMRequest
from tierq.producer import Producer
from tierq.runtime import capacity
from tierq.runtime.attempt import Attempt, JobRef
from tierq.runtime.context import Context
from tierq.runtime.jobs import run_attempt
from tierq.sim import SimServer
from tierq.sim.ratelimit import DEFAULT_LIMITS
from tierq.store.ratelimit import (
    FAIR_MAX_PRODUCERS,
    FairShare,
    LimiterStats,
    ModelLimits,
    SharedRateLimiter,
)

#: one request a second, 6,000 input and 600 output tokens a second
LIMITS = ModelLimits(requests=60, input_tokens=360_000, output_tokens=36_000)
#: the limits the workers start from (the shipped TIERQ_RATE_LIMITS)
SHIPPED = ModelLimits.parse(Settings().rate_limits)


@pytest.fixture
def model(redis_client: redis.Redis) -> Iterator[str]:
    name = f"test-model-{uuid.uuid4().hex[:8]}"
    yield name
    redis_client.delete(f"{KEY_PREFIX}tierq:ratelimit:{name}")


def _limiter(redis_client: redis.Redis, limits: ModelLimits = LIMITS) -> SharedRateLimiter:
    return SharedRateLimiter(redis_client, limits, KEY_PREFIX)


def test_requests_share_one_bucket_across_limiters(redis_client: redis.Redis, model: str) -> None:
    first, second = _limiter(redis_client), _limiter(redis_client)
    granted = [(first if i % 2 else second).reserve(model, 100, 100).granted for i in range(60)]
    assert all(granted), "a full bucket takes its limit at once"
    refused = first.reserve(model, 100, 100)
    assert not refused.granted and 0 < refused.wait_s <= 1.05, "then one request a second"
    wait_until(lambda: second.reserve(model, 100, 100).granted, 3, "the bucket to refill")


def test_a_reservation_is_all_or_nothing_and_says_how_long_to_wait(
    redis_client: redis.Redis, model: str
) -> None:
    limiter = _limiter(redis_client)
    assert limiter.reserve(model, 0, 30_000).granted
    refused = limiter.reserve(model, 0, 12_000)
    # 6,000 output tokens left, 600 a second: 6,000 more take ~10 s
    assert not refused.granted and 9 < refused.wait_s <= 10.1
    assert limiter.reserve(model, 0, 5_000).granted, "the refused one took nothing"
    too_big = limiter.reserve(model, 0, 40_000)
    assert not too_big.granted and math.isinf(too_big.wait_s), "more than the limit never fits"


def test_finish_gives_back_what_the_request_did_not_use(redis_client: redis.Redis, model: str) -> None:
    limiter = _limiter(redis_client)
    taken = limiter.reserve(model, 1_000, 36_000)
    assert taken.granted and not limiter.reserve(model, 0, 20_000).granted
    limiter.finish(taken, "t-settle", input_tokens=900, output_tokens=100)
    assert limiter.reserve(model, 0, 30_000).granted, "the unused output tokens came back"


def test_a_floor_keeps_a_share_for_the_fast_tier(redis_client: redis.Redis, model: str) -> None:
    limiter = _limiter(redis_client)
    assert limiter.reserve(model, 0, 18_000, floor=0.5).granted
    lower = limiter.reserve(model, 0, 1_000, floor=0.5)
    assert not lower.granted, "a lower tier stops at the floor"
    assert limiter.reserve(model, 0, 17_000).granted, "the fast tier (no floor) takes the rest"


def test_the_apis_headers_lower_the_buckets_and_set_the_limits(redis_client: redis.Redis, model: str) -> None:
    limiter = _limiter(redis_client)
    limiter.correct(
        model,
        {
            "anthropic-ratelimit-requests-limit": "120",
            "anthropic-ratelimit-requests-remaining": "2",
            "Anthropic-RateLimit-Output-Tokens-Limit": "36000",
            "anthropic-ratelimit-output-tokens-remaining": "not a number",
        },
    )
    assert limiter.reserve(model, 10, 10).granted and limiter.reserve(model, 10, 10).granted
    refused = limiter.reserve(model, 10, 10)
    assert not refused.granted and refused.wait_s <= 0.55, "the learned limit: two requests a second"
    stored = redis_client.hgetall(f"{KEY_PREFIX}tierq:ratelimit:{model}")
    assert stored[b"limit:requests"] == b"120"


def test_a_429_holds_every_request_of_the_model(redis_client: redis.Redis, model: str) -> None:
    limiter = _limiter(redis_client)
    limiter.block(model, 2.0)
    held = limiter.reserve(model, 10, 10)
    assert not held.granted and 1.5 < held.wait_s <= 2.0
    other = limiter.reserve(f"{model}-other", 10, 10)
    assert other.granted, "other models are not held"
    redis_client.delete(f"{KEY_PREFIX}tierq:ratelimit:{model}-other")


def test_release_returns_a_request_never_sent(redis_client: redis.Redis, model: str) -> None:
    limiter = _limiter(redis_client, ModelLimits(requests=1, input_tokens=1_000, output_tokens=1_000))
    taken = limiter.reserve(model, 500, 500)
    assert taken.granted and not limiter.reserve(model, 1, 1).granted
    limiter.release(taken)
    assert limiter.reserve(model, 500, 500).granted


DOC = " ".join(f"Sentence {i} of a document the shared rate limit meters." for i in range(30))


@pytest.mark.usefixtures("workers")
def test_a_workers_calls_teach_the_limiter_and_a_429_holds_the_model(
    redis_client: redis.Redis, sim: SimServer
) -> None:
    job = submit(DOC, urgency="critical")
    result = job.result(timeout=30)
    key = f"{KEY_PREFIX}tierq:ratelimit:{result.model}"
    stored = redis_client.hgetall(key)
    assert int(stored[b"limit:requests"]) == DEFAULT_LIMITS.rpm, "learned from the API's headers"
    assert int(stored[b"limit:output_tokens"]) == DEFAULT_LIMITS.otpm

    held = f"ratelimited-{uuid.uuid4().hex[:12]}"
    sim.state.add_faults(["429:2"], job_id=held)
    before = time.time()
    assert submit(DOC, urgency="critical", job_id=held).result(timeout=30).retries == 1
    blocked_until = float(redis_client.hget(key, "blocked_until") or 0)
    assert blocked_until >= before + 1.9, "the 429's retry-after held every call of the model"
    assert sim.state.request_count(held) == 2


def _request(model: str, max_tokens: int = 100) -> LLMRequest:
    return LLMRequest(job_id="j", model=model, system="Summarize.", prompt="x" * 350, max_tokens=max_tokens)


def test_a_call_waits_for_capacity_within_its_share_of_the_deadline(
    redis_client: redis.Redis, model: str
) -> None:
    limiter = _limiter(redis_client, ModelLimits(requests=60, input_tokens=60_000, output_tokens=60_000))
    for _ in range(60):
        assert limiter.reserve(model, 1, 1).granted
    started = time.monotonic()
    reservation, waited = capacity.take(limiter, _request(model), deadline=time.time() + 60, wait_s=5)
    assert reservation is not None and reservation.granted
    assert 0.5 < time.monotonic() - started < 3, "it waited about a second for the next request"
    assert 0.5 < waited < 3
    assert reservation.input_tokens == capacity.estimate_input_tokens(_request(model)) > 100

    with pytest.raises(CapacityWaitError) as raised:  # a second is more than 1/4 of 2 s
        capacity.take(limiter, _request(model), deadline=time.time() + 2, wait_s=5)
    assert raised.value.retry_after is not None and 0 < raised.value.retry_after <= 1.05
    with pytest.raises(CapacityWaitError):  # the tier's own wait is shorter than the second
        capacity.take(limiter, _request(model), deadline=time.time() + 60, wait_s=0.5)
    with pytest.raises(RequestRejectedError, match="exceeds"):
        capacity.take(limiter, _request(model, max_tokens=70_000), deadline=time.time() + 60)
    with pytest.raises(RequestRejectedError, match="more urgent tiers keep the rest"):
        capacity.take(limiter, _request(model, max_tokens=50_000), deadline=time.time() + 60, floor=0.25)


def test_a_tier_leaves_the_shares_of_more_urgent_tiers_on_its_model(tmp_path: Path) -> None:
    table = load_tier_table(None)
    assert table.floor(table.tiers["fast"], "claude-haiku-4-5") == 0
    assert table.floor(table.tiers["slow"], "claude-opus-5-5") == 0, "no faster tier calls Opus"
    shared = tmp_path / "tiers.toml"
    shared.write_text(
        '[tiers.standard]\nmodel = "claude-haiku-4-5"\nrate_limit_share = 0.25\n'
        '[tiers.slow]\nfallback_model = "claude-haiku-4-5"\n'
    )
    table = load_tier_table(shared)
    assert table.floor(table.tiers["fast"], "claude-haiku-4-5") == 0
    assert table.floor(table.tiers["standard"], "claude-haiku-4-5") == 0.25, "the fast tier's share"
    assert table.floor(table.tiers["slow"], "claude-haiku-4-5") == 0.5, "fast's and standard's"
    assert table.floor(table.tiers["slow"], "claude-opus-5-5") == 0
    greedy = tmp_path / "greedy.toml"
    greedy.write_text('[tiers.standard]\nmodel = "claude-haiku-4-5"\nrate_limit_share = 0.7\n')
    with pytest.raises(ConfigError, match=r"keep 0.95 of its rate limit"):
        load_tier_table(greedy)


@pytest.mark.usefixtures("workers")
def test_a_job_waits_for_capacity_in_its_queue_without_spending_retries(
    redis_client: redis.Redis, sim: SimServer
) -> None:
    """The standard tier waits half a second in a thread at most: a model held for 2 s sends its job
    back to the queue, and it runs once the hold ends, its retries untouched."""
    model = load_tier_table(None).tiers["standard"].model
    limiter = _limiter(
        redis_client, ModelLimits.parse("requests=4000,input_tokens=2000000,output_tokens=400000")
    )
    job_id = f"waits-{uuid.uuid4().hex[:12]}"
    try:
        limiter.block(model, 2.0)
        result = submit(DOC, urgency="normal", job_id=job_id).result(timeout=60)
    finally:
        redis_client.hdel(f"{KEY_PREFIX}tierq:ratelimit:{model}", "blocked_until")
    assert result.retries == 0, "a wait for capacity is not a retry"
    assert result.timings.limiter_wait_ms >= 1500
    assert sim.state.request_count(job_id) == 1, "nothing was sent while the model was held"


@pytest.mark.usefixtures("workers")
def test_a_fast_job_the_limit_cannot_serve_in_time_ends_rate_limited(redis_client: redis.Redis) -> None:
    model = load_tier_table(None).tiers["fast"].model
    limiter = _limiter(
        redis_client, ModelLimits.parse("requests=4000,input_tokens=2000000,output_tokens=400000")
    )
    # a sender that skips admission (another language, a submit before the hold began)
    unadmitted = Producer(Settings(admission=False))
    try:
        limiter.block(model, 30.0)  # past the fast tier's 15 s deadline
        started = time.monotonic()
        job = submit(DOC, urgency="critical", producer=unadmitted)
        with pytest.raises(JobFailedError) as failed:
            job.result(timeout=30)
    finally:
        redis_client.hdel(f"{KEY_PREFIX}tierq:ratelimit:{model}", "blocked_until")
    assert failed.value.error_type == "CapacityWaitError"
    assert time.monotonic() - started < 5, "it ended at once instead of waiting out its deadline"


def test_finish_corrects_refunds_holds_and_counts_in_one_pipeline(
    redis_client: redis.Redis, model: str
) -> None:
    limiter = _limiter(redis_client)
    stats = LimiterStats(redis_client, KEY_PREFIX)
    before = stats.read(2)
    reservation = limiter.reserve(model, 1000, 2000)
    headers = {
        "anthropic-ratelimit-output-tokens-remaining": "30000",
        "anthropic-ratelimit-output-tokens-limit": "36000",
    }
    limiter.finish(reservation, "t-finish", 900, 500, headers)
    state = limiter.peek(model)
    # lowered to the API's 30,000, then 1,500 unused given back (plus a little refill)
    assert 31_500 <= state.levels[2] < 31_500 + 36_000 / 60 * 2
    assert state.limits == (60, 360_000, 36_000) and state.held_s == 0
    assert limiter.peek(model).levels[0] <= state.levels[0] + 1, "peek takes nothing"
    limiter.finish(limiter.reserve(model, 10, 10), "t-finish", rate_limited_s=5.0)
    assert 4 < limiter.peek(model).held_s <= 5
    assert limiter.peek(model).wait_s((1, 1, 1)) > 4, "held: nothing fits until the hold ends"
    after = stats.read(2)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta["calls:t-finish"] == 2 and delta["429:t-finish"] == 1
    assert delta[f"reserved_output:{model}"] == 2010 and delta[f"used_output:{model}"] == 500
    redis_client.hdel(f"{KEY_PREFIX}tierq:ratelimit:{model}", "blocked_until")


def test_admission_refuses_what_the_rate_limit_cannot_start_in_time(
    redis_client: redis.Redis, model: str
) -> None:
    limiter = _limiter(redis_client)
    tier = (
        load_tier_table(None).tiers["fast"].model_copy(update={"model": model, "queue": f"tierq.t-{model}"})
    )
    admission = Admission(celery_app, load_tier_table(None), limiter, LimiterStats(redis_client, KEY_PREFIX))
    assert admission.check(tier, 3500, 100, allowed_s=15).cause == "none"
    limiter.block(model, 30)
    admission = Admission(celery_app, load_tier_table(None), limiter, LimiterStats(redis_client, KEY_PREFIX))
    with pytest.raises(DeadlineUnmeetableError) as refused:  # a new snapshot: one is kept half a second
        admission.check(tier, 3500, 100, allowed_s=15)
    assert "rate limit" in str(refused.value) and "nothing was enqueued" in str(refused.value)
    assert refused.value.retry_after is not None and 15 <= refused.value.retry_after <= 17
    assert admission.check(tier, 3500, 100, allowed_s=60).cause == "rate limit", "a later deadline fits"


def test_admission_refuses_what_the_queue_cannot_start_in_time(redis_client: redis.Redis, model: str) -> None:
    """A queue no worker reads holds 40 jobs; its tier made 60 calls in the last minute or two (about
    half a call a second): the next job would start in about a minute once the tier is saturated
    (its jobs waited in the queue), not while its workers keep up (the calls measure demand)."""
    queue = f"tierq.t-{model}"
    tier = (
        load_tier_table(None).tiers["fast"].model_copy(update={"name": model, "model": model, "queue": queue})
    )
    stats = LimiterStats(redis_client, KEY_PREFIX)
    admission = Admission(celery_app, load_tier_table(None), _limiter(redis_client), stats)
    with celery_app.producer_or_acquire() as producer:
        for i in range(40):
            producer.publish({"n": i}, routing_key=queue, declare=[Queue(queue, routing_key=queue)])
    limiter = _limiter(redis_client)
    try:
        assert admission.check(tier, 350, 100, allowed_s=15).ahead == 40, (
            "no calls yet: cannot tell, admitted"
        )
        for _ in range(60):
            limiter.count(model, "calls")
        keeping_up = Admission(celery_app, load_tier_table(None), limiter, stats)
        assert keeping_up.check(tier, 350, 100, allowed_s=15).cause == "none", (
            "jobs did not wait: not saturated"
        )
        limiter.finish(limiter.reserve(model, 1, 1), model, queue_wait_ms=5000)  # a job waited 5 s
        fresh = Admission(celery_app, load_tier_table(None), limiter, stats)
        with pytest.raises(DeadlineUnmeetableError, match="queue, 40 jobs queued ahead") as refused:
            fresh.check(tier, 350, 100, allowed_s=15)
        # 40 jobs at 61 calls over this minute and the last (60 to 120 s): 39 to 79 s
        assert refused.value.predicted_start_s is not None and 30 < refused.value.predicted_start_s <= 85
        assert stats.read(1).get(f"refused:{model}") == 1
    finally:
        redis_client.delete(*(k for k in redis_client.keys(f"*{queue}*")))


@pytest.mark.usefixtures("workers")
def test_a_submit_that_cannot_start_in_time_is_refused_and_counted(redis_client: redis.Redis) -> None:
    model = load_tier_table(None).tiers["fast"].model
    producer = Producer(Settings())
    try:
        _limiter(redis_client, SHIPPED).block(model, 30.0)
        with pytest.raises(DeadlineUnmeetableError) as refused:
            submit(DOC, urgency="critical", job_id=f"refused-{uuid.uuid4().hex[:8]}", producer=producer)
    finally:
        redis_client.hdel(f"{KEY_PREFIX}tierq:ratelimit:{model}", "blocked_until")
    job_id = refused.value.args[0]
    assert "could not start this job before its deadline" in job_id
    done = run_tierq(["stats", "--json", "--last", "20"])
    assert done.returncode == 0, done.stderr
    fast = json.loads(done.stdout).get("fast") or {}
    assert fast.get("admissions_refused", 0) >= 1


def _contend(
    limiter: SharedRateLimiter, model: str, tier: str, attempts: dict[str, int], grants: int
) -> dict[str, int]:
    """Producers that always have work ask for one request each, ``attempts[name]`` times a round
    (as that many worker threads would), until ``grants`` requests were granted in all. A round
    starts once the bucket holds a request again, so that every round is contended."""
    limiter.correct(model, {"anthropic-ratelimit-requests-remaining": "0"})  # start empty: contended
    got = dict.fromkeys(attempts, 0)
    while sum(got.values()) < grants:
        wait_until(lambda: limiter.peek(model).levels[0] >= 1, 10, "the bucket to hold a request")
        for name, count in attempts.items():
            for _ in range(count):
                share = FairShare(tier, name) if tier else None
                if limiter.reserve(model, 1, 1, share=share).granted:
                    got[name] += 1
    return got


@pytest.mark.slow  # seconds of contention, measured
def test_producers_get_their_fair_share_of_a_contended_limit(redis_client: redis.Redis, model: str) -> None:
    """A producer with five threads asking and one with one thread asking, on a limit of ten
    requests a second: without fair shares the one-thread producer gets about a sixth, with them
    half; with weights 3:1, a quarter."""
    limits = ModelLimits(requests=600, input_tokens=600_000, output_tokens=600_000)
    tier = f"t-{model}"
    try:
        unfair = _contend(_limiter(redis_client, limits), model, "", {"burst": 5, "steady": 1}, 40)
        assert unfair["steady"] / 40 < 0.3, unfair
        fair = _contend(_limiter(redis_client, limits), model, tier, {"burst": 5, "steady": 1}, 40)
        assert fair["steady"] / 40 >= 0.8 * 0.5, fair
        redis_client.delete(f"{KEY_PREFIX}tierq:fairshare:{tier}:{model}")
        weighted = SharedRateLimiter(redis_client, limits, KEY_PREFIX, weights={"burst": 3})
        got = _contend(weighted, model, tier, {"burst": 5, "steady": 1}, 40)
        assert 0.8 * 0.25 <= got["steady"] / 40 <= 0.4, got
        usage = weighted.fair_usage(tier, model)
        assert set(usage) == {"burst", "steady"} and usage["burst"] > usage["steady"]
    finally:
        redis_client.delete(f"{KEY_PREFIX}tierq:fairshare:{tier}:{model}")


def test_with_token_counting_a_call_reserves_the_input_the_api_counts(sim: SimServer) -> None:
    """TIERQ_COUNT_TOKENS: the attempt asks the API's token-counting endpoint first, and reserves
    what it counted; the call then uses exactly that many input tokens."""
    settings = Settings(count_tokens=True)
    ctx = Context.build(settings, load_tier_table(None))
    try:
        job = {"job_id": f"counted-{uuid.uuid4().hex[:8]}", "tier": "fast", "text": DOC}
        ref = JobRef.read(str(job["job_id"]), job, "tierq.fast", ctx.tiers)
        request = LLMRequest("j", "claude-haiku-4-5", ref.tier.system_prompt if ref.tier else "", DOC, 100)
        counted = ctx.llm.count_input_tokens(request, 5.0)
        assert counted is not None and counted != capacity.estimate_input_tokens(request)
        stats = LimiterStats(ctx.redis, KEY_PREFIX) if ctx.redis is not None else None
        assert stats is not None
        before = stats.read(2).get("reserved_input:claude-haiku-4-5", 0)
        now = time.time()
        result = run_attempt(ref, Attempt(ref.job_id, 0, now, now, now + 15, now), ctx)
        reserved = stats.read(2).get("reserved_input:claude-haiku-4-5", 0) - before
        assert ref.spec is not None and ref.tier is not None
        chars = len(ref.tier.system_prompt) + len(build_prompt(ref.spec))
        assert reserved == result.usage.input_tokens != estimate_tokens(chars), (
            "the call reserved what the API counted, which it then used, not the characters' estimate"
        )
    finally:
        ctx.close()


def test_refused_requests_get_appointments_one_after_another(redis_client: redis.Redis, model: str) -> None:
    """An empty bucket refills a request a second: ten refused requests are told to come back a
    second apart, not all at the next refill (each would be refused again nine times in ten)."""
    limiter = _limiter(redis_client)
    limiter.correct(model, {"anthropic-ratelimit-requests-remaining": "0"})
    # a less urgent tier: it waits for the quarter kept for the fast tier too (16 s), then 1 s apart
    waits = [limiter.reserve(model, 1, 1, floor=0.25).wait_s for _ in range(10)]
    assert 15.9 < waits[0] <= 16.01
    gaps = [later - earlier for earlier, later in itertools.pairwise(waits)]
    assert all(0.95 < gap < 1.05 for gap in gaps), waits
    # the fast tier (no floor) keeps appointments of its own: it is not behind those
    assert limiter.reserve(model, 1, 1).wait_s <= 1.01


def test_a_sender_cannot_grow_the_fair_share_without_bound(redis_client: redis.Redis, model: str) -> None:
    """Producer ids come from senders: past FAIR_MAX_PRODUCERS a tier's new ones share one entry."""
    limiter = _limiter(redis_client, ModelLimits(requests=100_000, input_tokens=10**9, output_tokens=10**9))
    tier = f"t-{model}"
    key = f"{KEY_PREFIX}tierq:fairshare:{tier}:{model}"
    try:
        for i in range(FAIR_MAX_PRODUCERS + 20):
            assert limiter.reserve(model, 1, 1, share=FairShare(tier, f"p{i}")).granted
        assert redis_client.hlen(key) <= FAIR_MAX_PRODUCERS + 1
        assert redis_client.hexists(key, "-"), "the later ones share the anonymous entry"
    finally:
        redis_client.delete(key)
