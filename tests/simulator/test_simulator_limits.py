"""Rate limits from token buckets, and the spend-limit 429: the arithmetic, through the real SDK.

The simulator's clock is frozen (``SimConfig.clock``), so every remaining count, ``retry-after``
and refill below is exact: nothing waits on wall time.
"""

from __future__ import annotations

import math
from typing import Any

import anthropic
import pytest
from typer.testing import CliRunner

from tests.helpers import FakeClock, wait_until
from tierq.sim import SimConfig, SimServer
from tierq.sim.__main__ import parse_args
from tierq.sim.ratelimit import DEFAULT_LIMITS, Limits

MODEL = "claude-haiku-4-5"
DOC = "Tierq runs Celery workers. Each tier has its own pool. Redis is the broker. Haiku is fast."
MESSAGES: list[Any] = [{"role": "user", "content": DOC}]
PREFIX = "anthropic-ratelimit-"


def limited_sim(limits: Limits, clock: FakeClock) -> SimServer:
    return SimServer(SimConfig(time_scale=0, seed=1, limits=limits, clock=clock))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _client(sim: SimServer, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="k", base_url=sim.url, **{"max_retries": 0, **kwargs})


def _create(client: anthropic.Anthropic, **kwargs: Any) -> Any:
    params: dict[str, Any] = {"model": MODEL, "max_tokens": 100, "messages": MESSAGES, **kwargs}
    return client.messages.with_raw_response.create(**params)


def test_requests_per_minute_bucket(clock: FakeClock) -> None:
    with limited_sim(Limits(rpm=3), clock) as sim, _client(sim) as client:
        remaining = [_create(client).headers[f"{PREFIX}requests-remaining"] for _ in range(3)]
        assert remaining == ["2", "1", "0"]
        with pytest.raises(anthropic.RateLimitError) as info:
            _create(client)
        headers = info.value.response.headers
        # one request refills in 60 / 3 = 20 s
        assert headers["retry-after"] == "20"
        assert headers["x-should-retry"] == "true"
        assert headers[f"{PREFIX}requests-limit"] == "3"
        assert headers[f"{PREFIX}requests-remaining"] == "0"
        body: Any = info.value.body
        assert body["error"]["type"] == "rate_limit_error"
        assert "3 requests per minute" in body["error"]["message"]
        assert body["request_id"] == headers["request-id"]
        clock.advance(19)
        with pytest.raises(anthropic.RateLimitError) as again:
            _create(client)
        assert again.value.response.headers["retry-after"] == "1"
        clock.advance(1)
        assert _create(client).headers[f"{PREFIX}requests-remaining"] == "0"
        # another model has its own buckets
        other = _create(client, model="claude-sonnet-4-6")
        assert other.headers[f"{PREFIX}requests-remaining"] == "2"


def test_output_charged_at_max_tokens_then_settled(clock: FakeClock) -> None:
    with limited_sim(Limits(otpm=1000), clock) as sim, _client(sim) as client:
        first = _create(client, max_tokens=600)
        used = first.parse().usage.output_tokens
        assert 0 < used < 600
        # a finished call keeps only what it generated
        assert first.headers[f"{PREFIX}output-tokens-remaining"] == str(1000 - used)
        # a stream in flight holds its whole max_tokens
        held = client.messages.create(
            model=MODEL,
            max_tokens=600,
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-sim-fault": "stall:1"},
        )
        with held:
            assert held.response.headers[f"{PREFIX}output-tokens-remaining"] == str(1000 - used - 600)
            with pytest.raises(anthropic.RateLimitError) as info:
                _create(client, max_tokens=600)
            # 600 needed, 400 - used there, at 1000 / 60 per second
            wait = (600 - (400 - used)) / (1000 / 60)
            assert info.value.response.headers["retry-after"] == str(math.ceil(wait))

        # the dropped stream generated nothing: all 600 come back once the server notices (after
        # the stall, at its next write); count_tokens shows the buckets without charging them
        def refunded() -> bool:
            counted = client.messages.with_raw_response.count_tokens(model=MODEL, messages=MESSAGES)
            return counted.headers[f"{PREFIX}output-tokens-remaining"] == str(1000 - used)

        wait_until(refunded, timeout=10, what="the abandoned stream's output tokens refunded")


def test_cache_reads_do_not_count_toward_input_tokens(clock: FakeClock) -> None:
    system: list[Any] = [{"type": "text", "text": "word " * 5000, "cache_control": {"type": "ephemeral"}}]
    with limited_sim(Limits(itpm=30_000), clock) as sim, _client(sim) as client:
        first = _create(client, system=system)
        usage = first.parse().usage
        assert usage.cache_creation_input_tokens == 5000
        after_first = 30_000 - usage.input_tokens - 5000
        assert first.headers[f"{PREFIX}input-tokens-remaining"] == str(after_first)
        second = _create(client, system=system)
        assert second.parse().usage.cache_read_input_tokens == 5000
        assert second.headers[f"{PREFIX}input-tokens-remaining"] == str(after_first - usage.input_tokens)


def test_tokens_headers_show_the_tighter_bucket(clock: FakeClock) -> None:
    with limited_sim(Limits(itpm=100_000, otpm=1_000), clock) as sim, _client(sim) as client:
        headers = _create(client, max_tokens=1).headers
        assert headers[f"{PREFIX}tokens-limit"] == "1000"
        assert headers[f"{PREFIX}tokens-remaining"] == headers[f"{PREFIX}output-tokens-remaining"]


def test_spend_limit_fault_is_never_retried() -> None:
    with SimServer(SimConfig(time_scale=0)) as sim, _client(sim, max_retries=2) as client:
        job = "job-spend"
        sim.state.add_faults(["spend_limit", "spend_limit", "spend_limit"], job)
        with pytest.raises(anthropic.RateLimitError) as info:
            _create(client, extra_headers={"x-tierq-job-id": job})
        assert sim.state.request_count(job) == 1  # the SDK obeyed x-should-retry: false
        response = info.value.response
        assert response.status_code == 429
        assert response.headers["x-should-retry"] == "false"
        assert "retry-after" not in response.headers
        body: Any = info.value.body
        assert body["error"]["type"] == "rate_limit_error"
        assert body["error"]["details"] == {"error_code": "enforced_spend_limit_reached"}
        assert body["request_id"] == response.headers["request-id"]


def test_limits_option_parsing() -> None:
    assert Limits.parse("rpm=5,itpm=1_000,otpm=20") == Limits(rpm=5, itpm=1000, otpm=20)
    assert Limits.parse("otpm=8000") == Limits(otpm=8000)
    assert Limits.parse(str(DEFAULT_LIMITS)) == DEFAULT_LIMITS
    for bad in ("rpm", "rpm=x", "tpm=5", "rpm=0", "rpm=1,rpm=2"):
        with pytest.raises(ValueError):
            Limits.parse(bad)
    assert parse_args(["--limits", "rpm=7"])[2].limits == Limits(rpm=7)
    assert parse_args([])[2].limits == DEFAULT_LIMITS
    with pytest.raises(SystemExit):
        parse_args(["--limits", "rpm=-1"])


def test_tierq_sim_refuses_bad_limits() -> None:
    from tierq.ops.cli import cli

    result = CliRunner().invoke(cli, ["sim", "--limits", "rpm=lots"])
    assert result.exit_code == 2
    assert "--limits" in result.output
