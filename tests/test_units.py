"""The plain functions under the task: tiers, validation, the SDK boundary, retry planning, the log line.

LLM calls go through the real SDK over HTTP to the simulator; no worker is needed here.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
import redis
import structlog
from kombu.transport.native_delayed_delivery import calculate_routing_key

from tierq.celery.delivery import delivered_queue
from tierq.contract.errors import (
    CapacityWaitError,
    ConfigError,
    DeadlineExceededError,
    InvalidJobError,
    LLMError,
    OverloadedError,
    RateLimitedError,
    RequestRejectedError,
    StreamInterruptedError,
    UpstreamServerError,
    UpstreamUnavailableError,
)
from tierq.contract.job import build_job
from tierq.contract.tiers import TierTable, load_tier_table
from tierq.core.settings import Settings, get_settings
from tierq.llm.aioloop import EventLoopThread
from tierq.llm.client import (
    LLMReply,
    LLMRequest,
    _ReplyReader,
    astream_reply,
    make_async_client,
    make_client,
    stream_reply,
)
from tierq.llm.pricing import PRICES, Usage, cost_usd
from tierq.ops.embedded import free_port
from tierq.runtime.attempt import Attempt, JobRef
from tierq.runtime.context import Context
from tierq.runtime.jobs import run_attempt
from tierq.runtime.retry import plan_retry
from tierq.sim import SimServer

DOC = " ".join(
    f"Sentence {i} explains how queue number {i} keeps its latency under control with care."
    for i in range(40)
)


def test_default_tiers_match_the_spec() -> None:
    table = load_tier_table(None)
    fast, standard, slow = table.tiers["fast"], table.tiers["standard"], table.tiers["slow"]
    assert (fast.model, fast.max_tokens, fast.effort, fast.deadline_s) == ("claude-haiku-4-5", 256, None, 15)
    assert fast.retry_after_text and not standard.retry_after_text
    assert (standard.model, standard.max_tokens, standard.deadline_s) == ("claude-sonnet-5-5", 1024, 300)
    assert (slow.model, slow.max_tokens, slow.deadline_s) == ("claude-opus-5-5", 4096, 1800)
    assert {u: table.urgencies[u] for u in ("critical", "high", "normal", "low")} == {
        "critical": "fast",
        "high": "fast",
        "normal": "standard",
        "low": "slow",
    }


def test_tiers_file_overrides_field_by_field(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(
        '[tiers.fast]\nmax_tokens = 128\n[tiers.batch]\nqueue = "q.batch"\nmodel = "claude-haiku-4-5"\n'
        'max_tokens = 2048\ndeadline_s = 3600\n[urgencies]\nlow = "batch"\n'
    )
    table = load_tier_table(path)
    assert table.tiers["fast"].max_tokens == 128
    assert table.tiers["fast"].model == "claude-haiku-4-5"
    assert table.for_urgency("low").name == "batch"


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[urgencies]\nlow = "nope"\n', "unknown tier"),
        ("[tiers.fast]\nmax_tokens = 0\n", "max_tokens"),
        ("[tiers.fast]\nmodle = 'x'\n", "modle"),
        ('[tiers.fast]\nqueue = "tierq.slow"\n', "share a queue"),
        ("[tierz]\n", "unknown sections"),
        ("[tiers.fast\n", "cannot read"),
        ('[tiers.fast]\nio = "gevent"\n', "io"),
    ],
)
def test_bad_tiers_file_is_a_config_error(tmp_path: Path, toml: str, needle: str) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=needle):
        load_tier_table(path)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"text": ""}, "text"),
        ({"text": "   \n"}, "text"),
        ({"text": 42}, "text"),
        ({"text": "x" * 50_001, "urgency": "high"}, "text"),
        ({"urgency": "bogus"}, "urgency"),
        ({"urgency": None}, "urgency"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 257, "urgency": "critical"}, "max_tokens"),
        ({"metadata": {"when": object()}}, "metadata"),
        ({"metadata": {"x": float("nan")}}, "metadata"),
        ({"metadata": ["not", "an", "object"]}, "metadata"),
        ({"metadata": {1: "int key"}}, "metadata"),
        ({"instructions": 7}, "instructions"),
        ({"instructions": "x" * 5000}, "instructions"),
        ({"job_id": "has spaces"}, "job_id"),
        ({"job_id": "x" * 200}, "job_id"),
    ],
)
def test_bad_input_names_the_field(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {
        "text": "A document.",
        "urgency": "normal",
        "instructions": None,
        "max_tokens": None,
        "job_id": "job-1",
        "metadata": None,
    }
    args.update(kwargs)
    with pytest.raises(InvalidJobError) as info:
        build_job(load_tier_table(None), **args)  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")


def test_max_tokens_at_the_cap_is_accepted() -> None:
    spec, tier = build_job(load_tier_table(None), "Doc.", "high", None, 256, "j1", {"a": [1, 2]})
    assert tier.name == "fast"
    assert spec.max_tokens == 256


def _request(job_id: str, max_tokens: int = 64) -> LLMRequest:
    return LLMRequest(job_id, "claude-haiku-4-5", "Summarize.", DOC, max_tokens)


#: the two ways a tier can make its call (``Tier.io``)
WAYS = ("asyncio", "threads")


@pytest.fixture(scope="module")
def ctx() -> Iterator[Context]:
    """A worker process's context, from the test session's environment."""
    built = Context.build(get_settings(), load_tier_table(None))
    yield built
    built.close()


def _call(ctx: Context, way: str, request: LLMRequest, deadline: float, on_text: Any = None) -> LLMReply:
    return ctx.llm.call(request, deadline, way, on_text)


@pytest.mark.parametrize("way", WAYS)
def test_stream_reply_reads_text_usage_and_request_id(sim: SimServer, ctx: Context, way: str) -> None:
    reply = _call(ctx, way, _request(uuid.uuid4().hex, 256), time.time() + 10)
    assert reply.text
    assert reply.stop_reason == "end_turn"
    assert reply.usage.input_tokens > 0 and 0 < reply.usage.output_tokens <= 256
    assert reply.request_id and reply.request_id.startswith("req_")
    assert reply.first_token_at is not None and reply.sent_at < reply.first_token_at <= reply.done_at


@pytest.mark.parametrize("way", WAYS)
def test_texts_reach_the_calling_thread_in_order(sim: SimServer, ctx: Context, way: str) -> None:
    seen: list[tuple[str, int]] = []
    reply = _call(
        ctx,
        way,
        _request(uuid.uuid4().hex, 64),
        time.time() + 10,
        on_text=lambda text: seen.append((text, threading.get_ident())),
    )
    assert len(seen) > 1
    assert "".join(text for text, _ in seen) == reply.text
    assert {ident for _, ident in seen} == {threading.get_ident()}  # never on the event loop


def test_the_loop_hands_texts_over_gathered(sim: SimServer, ctx: Context) -> None:
    seen: list[str] = []
    reply = ctx.llm.call(
        _request(uuid.uuid4().hex, 256), time.time() + 10, "asyncio", seen.append, gather_s=0.05
    )
    assert "".join(seen) == reply.text
    assert reply.first_token_at is not None
    streaming_s = reply.done_at - reply.first_token_at
    assert 1 < len(seen) <= 2 + streaming_s / 0.05, "the first text at once, then one hand-off per 50 ms"


@pytest.mark.parametrize("way", WAYS)
def test_stream_reply_honours_max_tokens(sim: SimServer, ctx: Context, way: str) -> None:
    reply = _call(ctx, way, _request(uuid.uuid4().hex, 5), time.time() + 10)
    assert reply.stop_reason == "max_tokens"
    assert reply.usage.output_tokens <= 5


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(
    ("fault", "error", "retry_after"),
    [
        ("429:2", RateLimitedError, 2.0),
        ("529", OverloadedError, None),
        ("500", UpstreamServerError, None),
        ("400", RequestRejectedError, None),
        ("401", RequestRejectedError, None),
        ("midstream:0", OverloadedError, None),
        ("midstream:2", StreamInterruptedError, None),
    ],
)
def test_sdk_errors_map_into_the_tree(
    sim: SimServer, ctx: Context, way: str, fault: str, error: type[Exception], retry_after: float | None
) -> None:
    job_id = uuid.uuid4().hex
    sim.state.add_faults([fault], job_id=job_id)
    with pytest.raises(error) as info:
        _call(ctx, way, _request(job_id), time.time() + 10)
    assert getattr(info.value, "retry_after", None) == retry_after
    assert sim.state.request_count(job_id) == 1  # the SDK did not retry on its own


@pytest.mark.parametrize("way", WAYS)
def test_a_stalled_stream_ends_at_the_deadline(sim: SimServer, ctx: Context, way: str) -> None:
    job_id = uuid.uuid4().hex
    sim.state.add_faults(["stall:5"], job_id=job_id)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        _call(ctx, way, _request(job_id), time.time() + 0.5)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    "raised",
    [
        # what anthropic <= 2.16 let through from a stream being read, and what 2.17 raises instead
        httpx2.ReadTimeout("timed out"),
        anthropic.APITimeoutError(request=httpx2.Request("POST", "http://127.0.0.1/v1/messages")),
    ],
    ids=["transport", "sdk"],
)
def test_a_read_timeout_maps_into_the_tree_whatever_the_sdk_raises(raised: Exception) -> None:
    def mapped(reader: _ReplyReader) -> type[Exception]:
        with pytest.raises(LLMError) as info, reader.mapping_errors():
            raise raised
        return type(info.value)

    request = _request(uuid.uuid4().hex)
    before_text = _ReplyReader(request, time.time() + 60, None)
    assert mapped(before_text) is UpstreamUnavailableError  # retryable, nothing was produced
    before_text.first_token_at = time.perf_counter()
    assert mapped(before_text) is StreamInterruptedError
    assert mapped(_ReplyReader(request, time.time() - 1, None)) is DeadlineExceededError


@pytest.mark.parametrize("way", WAYS)
def test_a_refused_connection_is_upstream_unavailable(way: str) -> None:
    settings = Settings(anthropic_base_url=f"http://127.0.0.1:{free_port()}")
    request = _request(uuid.uuid4().hex)
    if way == "threads":
        with pytest.raises(UpstreamUnavailableError):
            stream_reply(make_client(settings), request, time.time() + 5)
        return
    client, loop = make_async_client(settings), EventLoopThread()
    try:
        with pytest.raises(UpstreamUnavailableError):
            loop.run(astream_reply(client, request, time.time() + 5))
    finally:
        loop.run(client.close())
        loop.shutdown()


def test_the_event_loop_runs_waits_and_gives_up() -> None:
    async def answer(after: float) -> int:
        await asyncio.sleep(after)
        return 42

    loop = EventLoopThread()
    assert loop.run(answer(0)) == 42
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        loop.run(answer(30), timeout=0.2)
    assert time.monotonic() - started < 2
    loop.shutdown()
    loop.shutdown()  # twice is fine


def _attempt(retries: int = 0, deadline_in: float = 15.0) -> Attempt:
    now = time.time()
    return Attempt("t1", retries, now, now, now + deadline_in, now)


def _ref(tiers: TierTable, job: dict[str, object], queue: str | None = "tierq.fast") -> JobRef:
    return JobRef.read(str(job.get("job_id", "t1")), job, queue, tiers)


def test_plan_retry_by_error_kind() -> None:
    tiers = load_tier_table(None)
    job = _ref(tiers, {"job_id": "t1", "tier": "fast", "text": "a document"})
    rng = random.Random(1)
    assert plan_retry(RateLimitedError("429", 429, None, 1.5), _attempt(), job, rng) == (
        1.5,
        "retryable",
    )
    delay, _ = plan_retry(OverloadedError("529", 529), _attempt(retries=1), job, rng)
    assert delay is not None and 0.5 <= delay <= 1.0  # base 0.5 s doubled once, jittered in [ceil/2, ceil]
    assert plan_retry(RequestRejectedError("400", 400), _attempt(), job)[0] is None
    assert plan_retry(ValueError("bug"), _attempt(), job)[0] is None
    exhausted = plan_retry(OverloadedError("529"), _attempt(retries=2), job)
    assert exhausted == (None, "retries exhausted (2)")
    late = plan_retry(RateLimitedError("429", 429, None, 30.0), _attempt(), job)
    assert late == (None, "deadline would pass before another attempt")
    # a wait for the shared rate limit spends no retry, and ends the job when the deadline cannot wait
    waited = Attempt("t1", 2, time.time(), None, time.time() + 15, time.time(), limiter_waits=2)
    assert waited.spent_retries == 0
    assert plan_retry(OverloadedError("529"), waited, job)[0] is not None
    assert plan_retry(CapacityWaitError("limit", None, None, 2.0), _attempt(retries=2), job) == (
        2.0,
        "retryable",
    )
    assert plan_retry(CapacityWaitError("limit", None, None, 20.0), _attempt(), job) == (None, "rate_limited")
    forged = Attempt("t1", 1, time.time(), None, None, time.time(), limiter_waits=50)
    assert forged.spent_retries == 0, "a sender's header never makes spent retries negative"
    headers = waited.retry_headers({}, CapacityWaitError("limit", None, None, 2.0), 2.0)
    assert headers["tierq_limiter_waits"] == 3 and headers["tierq_limiter_wait_s"] == 2.0
    invalid = _ref(tiers, {"job_id": "t1", "tier": "slow", "text": "a document"})
    assert invalid.problem is not None and invalid.tier_name == "fast", "the queue's tier, not the body's"
    assert plan_retry(invalid.problem, _attempt(), invalid) == (None, "invalid job")


def test_run_attempt_logs_one_completed_line_without_text(sim: SimServer, ctx: Context) -> None:
    job = _ref(ctx.tiers, {"job_id": uuid.uuid4().hex, "tier": "fast", "text": DOC})
    with structlog.testing.capture_logs() as logs:
        result = run_attempt(job, _attempt(), ctx)
    assert [e["event"] for e in logs] == ["summarize.completed"]
    line = logs[0]
    for key in ("queue_wait_ms", "ttft_ms", "llm_ms", "total_ms", "output_tokens_per_s", "input_tokens"):
        assert isinstance(line[key], int | float), key
    assert line["output_tokens"] == result.usage.output_tokens
    assert line["cost_usd"] == cost_usd("claude-haiku-4-5", result.usage)
    assert line["truncated"] is False and result.truncated is False
    assert DOC[:40] not in repr(logs)
    assert result.summary[:20] not in repr(logs)


def test_malformed_job_is_a_permanent_invalid_job(ctx: Context) -> None:
    cases = {
        "malformed job message": {"job_id": "x", "tier": "fast", "text": "t", "extra": 1},
        "unknown tier": {"job_id": "x", "tier": "nope", "text": "t"},
        "not the tier of queue": {"job_id": "x", "tier": "slow", "text": "t"},
        "the fast tier takes at most": {"job_id": "x", "tier": "fast", "text": "t" * 300_000},
        "above the fast tier's cap": {"job_id": "x", "tier": "fast", "text": "t", "max_tokens": 64_000},
        "nests deeper": {"job_id": "x", "tier": "fast", "text": "t", "metadata": {"a": [[[[[[[[[1]]]]]]]]]}},
    }
    for message, job in cases.items():
        with pytest.raises(InvalidJobError, match=message):
            run_attempt(_ref(ctx.tiers, job), _attempt(), ctx)


def test_cost_table() -> None:
    million = 1_000_000
    assert cost_usd("claude-haiku-4-5", Usage(input_tokens=million, output_tokens=million)) == 6.0
    assert cost_usd("claude-sonnet-4-5", Usage(input_tokens=1000, output_tokens=1000)) == 0.018
    assert cost_usd("claude-opus-4-5", Usage(output_tokens=million)) == 25.0
    # Opus 4.7 and 4.8 are priced as Opus 4.5 (not the Opus 4 row of $15/$75), matched by exact id
    assert cost_usd("claude-opus-4-7", Usage(input_tokens=million)) == 5.0
    assert cost_usd("claude-opus-4-8", Usage(output_tokens=million)) == 25.0
    with structlog.testing.capture_logs() as logs:
        assert cost_usd("gpt-x", Usage(input_tokens=1)) is None
        assert cost_usd("gpt-x", Usage(input_tokens=1)) is None
    assert [e["event"] for e in logs] == ["pricing.unknown_model"], "one warning per unknown model"


def test_cache_tokens_are_billed_at_their_own_prices() -> None:
    # Haiku 4.5: $1 in, $5 out, 5-minute write $1.25, 1-hour write $2, read $0.10 per MTok
    usage = Usage.from_api(
        {
            "input_tokens": 50,
            "output_tokens": 60,
            "cache_read_input_tokens": 4000,
            "cache_creation_input_tokens": 3000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
        }
    )
    by_hand = (50 * 1.0 + 60 * 5.0 + 4000 * 0.10 + 1000 * 1.25 + 2000 * 2.0) / 1e6
    assert cost_usd("claude-haiku-4-5", usage) == pytest.approx(by_hand, abs=1e-12)
    assert cost_usd("claude-haiku-4-5", usage, batch=True) == pytest.approx(by_hand / 2, abs=1e-12)
    # a total without its breakdown is billed at the default 5-minute write price
    total_only = Usage.from_api({"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 1000})
    assert cost_usd("claude-haiku-4-5", total_only) == pytest.approx(1000 * 1.25 / 1e6, abs=1e-12)


def test_long_context_band_prices_the_whole_request() -> None:
    band = PRICES.get("claude-haiku-5-5")
    assert band is not None and band.long_context is not None
    above = band.long_context.above_input_tokens
    small = Usage(input_tokens=above, output_tokens=1000)
    large = Usage(input_tokens=above - 10, cache_read_input_tokens=20, output_tokens=1000)
    assert cost_usd("claude-haiku-5-5", small) == pytest.approx(
        (above * band.input + 1000 * band.output) / 1e6, abs=1e-12
    )
    lc = band.long_context
    assert cost_usd("claude-haiku-5-5", large) == pytest.approx(
        ((above - 10) * lc.input + 20 * lc.cache_read + 1000 * lc.output) / 1e6, abs=1e-12
    )


@pytest.mark.parametrize(
    ("toml", "where"),
    [
        (
            '# ours\n[tiers.fast]\nmodel = "claude-haiku-4-5"\nmax_tokens = 0\n',
            ", line 4: tiers.fast: max_tokens",
        ),
        ("[tiers.standard]\nconcurrency = 4\n\n[tiers.slow]\nbogus = 1\n", ", line 5: tiers.slow: bogus"),
        ('tiers.fast.io = "gevent"\n', ", line 1: tiers.fast: io"),
        ("[tiers.bulk]\nbatch_when_slack_s = 9e9\n", ", line 2: tiers.bulk: batch_when_slack_s"),
        # a rule across fields: the tier's table
        ("\n[tiers.standard]\ndeadline_s = 60\nbatch_when_slack_s = 120\n", ", line 2: tiers.standard"),
    ],
)
def test_a_bad_tiers_file_names_its_line(tmp_path: Path, toml: str, where: str) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_tier_table(path)
    assert str(info.value).startswith(f"tiers file {path}{where}"), str(info.value)


def test_thinking_tokens_are_read_from_output_tokens_details() -> None:
    usage = Usage.from_api(
        {"input_tokens": 5, "output_tokens": 90, "output_tokens_details": {"thinking_tokens": 70}}
    )
    assert (usage.output_tokens, usage.thinking_tokens) == (90, 70)
    assert Usage.from_api({"input_tokens": 5, "output_tokens": 9}).thinking_tokens is None


def test_a_tiers_file_cannot_set_sampling_parameters(tmp_path: Path) -> None:
    for field in ("temperature", "top_p", "top_k"):
        path = tmp_path / f"{field}.toml"
        path.write_text(f"[tiers.fast]\n{field} = 0.2\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=f"{field}: not a tier setting.*2026-10-21"):
            load_tier_table(path)


def test_eviction_warning_names_the_policy() -> None:
    from tierq.ops.checks import redis_eviction_warning
    from tierq.ops.embedded import EmbeddedRedis, free_port

    with EmbeddedRedis() as server:
        assert redis_eviction_warning(server.url) is None  # started with noeviction
        client = redis.Redis.from_url(server.url)
        client.config_set("maxmemory-policy", "allkeys-lru")
        client.close()
        warning = redis_eviction_warning(server.url)
        assert warning is not None and "allkeys-lru" in warning
    assert redis_eviction_warning(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5) is None
    assert redis_eviction_warning("amqp://guest@localhost//") is None


def test_api_key_from_a_secrets_file(tmp_path: Path) -> None:
    from tierq.core.settings import Settings

    path = tmp_path / "key"
    path.write_text("sk-ant-from-file\n")
    settings = Settings(anthropic_api_key_file=path)
    key = settings.api_key()
    assert key is not None and key.get_secret_value() == "sk-ant-from-file"
    assert "sk-ant-from-file" not in repr(settings) and "sk-ant-from-file" not in str(key)
    assert Settings(anthropic_api_key_file=tmp_path / "missing").api_key() is None


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://127.0.0.1:6379/0?ssl_cert_reqs=required",
        "amqp://guest:guest@127.0.0.1:5672//",
    ],
)
def test_celery_config_transport_and_task_events(url: str) -> None:
    from kombu import Connection

    from tierq.celery.app import make_app
    from tierq.celery.config import celery_config
    from tierq.celery.transport import Transport
    from tierq.core.settings import Settings

    config = celery_config(Settings(broker_url=url), load_tier_table(None))
    assert "broker_transport" not in config, "URLs keep their scheme (Flower knows brokers by it)"
    if url.startswith(("redis://", "rediss://")):
        make_app(Settings(broker_url=url), load_tier_table(None))  # points kombu's aliases at tierq's
        conn = Connection(url)
        scheme = url.split("://", 1)[0]
        assert conn.transport_cls == scheme and conn.as_uri().startswith(f"{scheme}://")
        assert isinstance(conn.transport, Transport), f"kombu's alias {scheme!r} resolves to tierq's (leases)"
    assert config["worker_send_task_events"] is False, "off until Flower asks"
    assert config["task_send_sent_event"] is True, "producers tell Flower each job's queue"
    on = celery_config(Settings(broker_url=url, task_events=True), load_tier_table(None))
    assert on["worker_send_task_events"] is True


def test_the_transport_keeps_one_client_per_pool(redis_url: str) -> None:
    from kombu import Connection

    from tierq.celery.transport import TRANSPORT

    with Connection(redis_url, transport=TRANSPORT) as conn:
        channel = conn.default_channel
        first = channel._create_client()
        assert channel._create_client() is first
        channel.client.ping()  # the consumer's own (asynchronous) client still works
        channel._disconnect_pools()  # as after a reconnect or a fork: a new pool, a new client
        assert channel._create_client() is not first
        assert channel._create_client().connection_pool is channel.pool


def test_text_batcher_lets_the_first_through_then_gathers() -> None:
    from tierq.core.batching import TextBatcher

    batcher = TextBatcher(interval_s=60.0)
    assert batcher.add("a") == "a", "the first delta goes at once"
    assert batcher.add("b") is None and batcher.add("c") is None
    assert batcher.drain() == "bc" and batcher.drain() is None
    assert TextBatcher(interval_s=0.0).add("x") == "x"


def test_a_result_stored_by_the_previous_version_still_reads() -> None:
    from tierq.contract.result import JobResult

    stored = {  # what the worker stored before usage grew cache and thinking fields and truncated
        "job_id": "j1",
        "tier": "fast",
        "model": "claude-haiku-4-5",
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 10, "output_tokens": 20},
        "timings": {"queue_wait_ms": 1.0, "prep_ms": 0.5, "ttft_ms": 40.0, "llm_ms": 90.0, "total_ms": 95.0,
                    "output_tokens_per_s": 100.0},
        "cost_usd": 0.00011,
        "fallback": {"from": "claude-haiku-4-5", "after_overloads": 2},
        "retries": 0,
        "request_id": "req_1",
        "metadata": None,
        "summary": "A summary.",
    }  # fmt: skip
    result = JobResult.from_json(stored)
    assert (result.truncated, result.usage.cache_read_input_tokens, result.usage.thinking_tokens) == (
        False,
        0,
        None,
    )
    assert result.fallback is not None and result.fallback.from_model == "claude-haiku-4-5"
    assert result.to_json()["fallback"] == {"from": "claude-haiku-4-5", "after_overloads": 2}
    with pytest.raises(ValueError, match="not a job result"):
        JobResult.from_json({"summary": "only"})


def test_delivered_queue_strips_rabbitmqs_countdown_prefix() -> None:
    assert delivered_queue({"routing_key": "tierq.fast"}) == "tierq.fast"
    assert delivered_queue({"routing_key": calculate_routing_key(3, "tierq.fast")}) == "tierq.fast"
    assert delivered_queue({"routing_key": "1.0.tierq.fast"}) == "1.0.tierq.fast", (
        "only 28 levels are a countdown"
    )
    assert delivered_queue({"routing_key": None}) is None and delivered_queue(None) is None
