"""The shared rate limiter (``worker/store/ratelimit.py``) against a real Redis: several limiters
(as several worker processes would hold) sharing one model's buckets."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from simulator import SimServer
from simulator.ratelimit import DEFAULT_LIMITS
from tasks.errors import RateLimitedError, RequestRejectedError
from tests.conftest import KEY_PREFIX
from tests.helpers import wait_until
from tierq import submit
from worker.llm.client import LLMRequest
from worker.runtime import capacity
from worker.store.ratelimit import ModelLimits, SharedRateLimiter

#: one request a second, 6,000 input and 600 output tokens a second
LIMITS = ModelLimits(requests=60, input_tokens=360_000, output_tokens=36_000)


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


def test_settle_gives_back_what_the_request_did_not_use(redis_client: redis.Redis, model: str) -> None:
    limiter = _limiter(redis_client)
    taken = limiter.reserve(model, 1_000, 36_000)
    assert taken.granted and not limiter.reserve(model, 0, 20_000).granted
    limiter.settle(taken, input_tokens=900, output_tokens=100)
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
    reservation = capacity.take(limiter, _request(model), deadline=time.time() + 60)
    assert reservation is not None and reservation.granted
    assert 0.5 < time.monotonic() - started < 3, "it waited about a second for the next request"
    assert reservation.input_tokens == capacity.estimate_input_tokens(_request(model)) > 100

    with pytest.raises(RateLimitedError) as raised:  # a second is more than 1/4 of 2 s
        capacity.take(limiter, _request(model), deadline=time.time() + 2)
    assert raised.value.retry_after is not None and 0 < raised.value.retry_after <= 1.05
    with pytest.raises(RequestRejectedError, match="exceeds"):
        capacity.take(limiter, _request(model, max_tokens=70_000), deadline=time.time() + 60)
