"""Streams and answers as the real API sends them, and prompt caching, through the real SDK.

Raw streams are read with the SDK's ``with_streaming_response`` and parsed here, so pings and
unknown events are seen too; every event of a known type is validated against the SDK's own
pydantic types (``RawMessageStreamEvent``).
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from tests.helpers import SIM_TODAY, FakeClock
from tierq.sim import SimConfig, SimServer
from tierq.sim.text import count_tokens

MODEL = "claude-haiku-4-5"
THINKER = "claude-opus-5"
DOC = (
    "Tierq runs Celery workers that summarize documents with Claude. "
    "Each tier has its own worker pool, so slow jobs never block fast ones. "
    "The fast tier uses Haiku because its time to first token is short. "
    "The slow tier uses Opus for long documents that need careful summaries. "
    "Redis is the broker and keeps the queues for every tier. "
    "Workers retry overloaded errors with backoff, and they honour retry-after on rate limits."
)
MESSAGES: list[Any] = [{"role": "user", "content": DOC}]
KNOWN_EVENTS = {
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
}
EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def sim_config(clock: FakeClock) -> SimConfig:
    return SimConfig(time_scale=0.01, seed=7, stall_s=2.0, clock=clock, today=SIM_TODAY)


def raw_events(client: anthropic.Anthropic, **kwargs: Any) -> list[tuple[str, dict[str, Any], str]]:
    """Stream a request; return ``(event name, data, raw data line)`` for every SSE event, validated."""
    params: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 400,
        "messages": MESSAGES,
        "stream": True,
        **kwargs,
    }
    events: list[tuple[str, dict[str, Any], str]] = []
    with client.messages.with_streaming_response.create(**params) as response:
        name: str | None = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert name is not None
                raw = line.removeprefix("data: ")
                data = json.loads(raw)
                assert data["type"] == name
                if name in KNOWN_EVENTS and not _unknown_inside(data):
                    EVENTS.validate_python(data)  # the SDK's own types accept every known event
                events.append((name, data, raw))
                name = None
    return events


def _unknown_inside(data: dict[str, Any]) -> bool:
    """A known event carrying a block or delta of a type the SDK does not know (fault unknown_block)."""
    inner = data.get("content_block") or data.get("delta") or {}
    return str(inner.get("type", "")).startswith("future_")


def names(events: list[tuple[str, dict[str, Any], str]]) -> list[str]:
    return [name for name, _, _ in events]


def text_of(events: list[tuple[str, dict[str, Any], str]]) -> str:
    return "".join(
        d["delta"]["text"]
        for n, d, _ in events
        if n == "content_block_delta" and d["delta"]["type"] == "text_delta"
    )


def final_delta(events: list[tuple[str, dict[str, Any], str]]) -> dict[str, Any]:
    (delta,) = [d for n, d, _ in events if n == "message_delta"]
    return delta


# --- the shape of a stream ------------------------------------------------------------------------


def test_plain_stream_is_padded_pinged_and_reports_cumulative_usage(client: anthropic.Anthropic) -> None:
    events = raw_events(client)
    assert names(events)[:3] == ["message_start", "content_block_start", "ping"]
    assert names(events)[-2:] == ["message_delta", "message_stop"]
    assert all(": " in raw for _, _, raw in events)  # padded as the API writes it
    start = events[0][1]["message"]
    assert start["usage"]["output_tokens"] == 1
    assert start["usage"]["input_tokens"] == count_tokens(DOC)
    usage = final_delta(events)["usage"]
    text = text_of(events)
    assert usage == {
        "input_tokens": count_tokens(DOC),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": count_tokens(text),
        "output_tokens_details": {"thinking_tokens": 0},
    }
    assert final_delta(events)["delta"] == {
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "stop_details": None,
    }


def test_pings_fill_long_silences() -> None:
    with (
        SimServer(SimConfig(fixed_ttft_s=2.2, fixed_total_s=2.4)) as slow,
        anthropic.Anthropic(api_key="k", base_url=slow.url, max_retries=0) as c,
    ):
        events = raw_events(c, max_tokens=20)
    before_text = names(events)[: names(events).index("content_block_delta")]
    # the ping after content_block_start, then one per second of the 2.2 s wait
    assert before_text.count("ping") >= 3


def test_a_stall_sends_nothing_not_even_pings(client: anthropic.Anthropic) -> None:
    events = raw_events(client, extra_headers={"x-sim-fault": "stall:1.5"})
    first_text = names(events).index("content_block_delta")
    assert names(events)[:first_text] == ["message_start", "content_block_start", "ping"]


# --- thinking -------------------------------------------------------------------------------------


def test_models_that_think_by_default_stream_a_thinking_block_first(client: anthropic.Anthropic) -> None:
    events = raw_events(client, model=THINKER)
    starts = [d["content_block"]["type"] for n, d, _ in events if n == "content_block_start"]
    assert starts == ["thinking", "text"]
    deltas = [d["delta"]["type"] for n, d, _ in events if n == "content_block_delta" and d["index"] == 0]
    assert deltas[-1] == "signature_delta"
    assert set(deltas[:-1]) == {"thinking_delta"}
    thinking = "".join(d["delta"].get("thinking", "") for n, d, _ in events if n == "content_block_delta")
    usage = final_delta(events)["usage"]
    assert usage["output_tokens_details"] == {"thinking_tokens": count_tokens(thinking)}
    assert usage["output_tokens"] == count_tokens(thinking) + count_tokens(text_of(events))
    # the SDK's helper builds the same message
    with client.messages.stream(model=THINKER, max_tokens=400, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.usage.output_tokens_details is not None
    assert final.usage.output_tokens_details.thinking_tokens == count_tokens(thinking)


def test_thinking_counts_toward_max_tokens_and_can_be_turned_off(client: anthropic.Anthropic) -> None:
    cut = client.messages.create(model=THINKER, max_tokens=10, messages=MESSAGES)
    assert [b.type for b in cut.content] == ["thinking"]
    assert (cut.stop_reason, cut.usage.output_tokens) == ("max_tokens", 10)
    plain = client.messages.create(
        model=THINKER, max_tokens=400, messages=MESSAGES, thinking={"type": "disabled"}
    )
    assert [b.type for b in plain.content] == ["text"]
    asked = client.messages.create(
        model=MODEL, max_tokens=2000, messages=MESSAGES, thinking={"type": "enabled", "budget_tokens": 1024}
    )
    assert [b.type for b in asked.content] == ["thinking", "text"]
    whole = client.messages.create(model=THINKER, max_tokens=400, messages=MESSAGES)
    thinking_block, text_block = whole.content
    assert thinking_block.type == "thinking" and thinking_block.signature
    assert text_block.type == "text"
    assert whole.usage.output_tokens == count_tokens(thinking_block.thinking) + count_tokens(text_block.text)


# --- injected stream faults -----------------------------------------------------------------------


def test_refusal_stops_the_text_with_stop_details(client: anthropic.Anthropic) -> None:
    events = raw_events(client, extra_headers={"x-sim-fault": "refusal"})
    text_deltas = [d for n, d, _ in events if n == "content_block_delta"]
    assert len(text_deltas) == 2
    delta = final_delta(events)
    assert delta["delta"]["stop_reason"] == "refusal"
    assert delta["delta"]["stop_details"]["type"] == "refusal"
    assert delta["delta"]["stop_details"]["category"] == "general_harms"
    assert delta["usage"]["output_tokens"] == count_tokens(text_of(events))
    assert names(events)[-1] == "message_stop"
    whole = client.messages.create(
        model=MODEL, max_tokens=400, messages=MESSAGES, extra_headers={"x-sim-fault": "refusal:0"}
    )
    assert whole.stop_reason == "refusal"
    assert whole.stop_details is not None and whole.stop_details.type == "refusal"
    assert whole.content[0].text == ""  # type: ignore[union-attr]


def test_unknown_events_are_sent_and_the_sdk_ignores_them(client: anthropic.Anthropic) -> None:
    normal = text_of(raw_events(client))
    events = raw_events(client, extra_headers={"x-sim-fault": "unknown_event"})
    assert names(events).count("future_event") == 2
    assert text_of(events) == normal
    with client.messages.stream(
        model=MODEL, max_tokens=400, messages=MESSAGES, extra_headers={"x-sim-fault": "unknown_event"}
    ) as stream:
        assert "".join(stream.text_stream) == normal


def test_unknown_blocks_come_before_the_text(client: anthropic.Anthropic) -> None:
    normal = text_of(raw_events(client))
    events = raw_events(client, extra_headers={"x-sim-fault": "unknown_block"})
    starts = [(d["index"], d["content_block"]["type"]) for n, d, _ in events if n == "content_block_start"]
    assert starts == [(0, "future_block"), (1, "text")]
    unknown_deltas = [
        d["delta"]["type"] for n, d, _ in events if n == "content_block_delta" and d["index"] == 0
    ]
    assert unknown_deltas and set(unknown_deltas) == {"future_delta"}
    assert text_of(events) == normal
    whole = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=400, messages=MESSAGES, extra_headers={"x-sim-fault": "unknown_block"}
    )
    content = json.loads(whole.http_response.text)["content"]
    assert [b["type"] for b in content] == ["future_block", "text"]


# --- prompt caching -------------------------------------------------------------------------------


def _cached_system(words: int, ttl: str = "5m") -> list[Any]:
    return [{"type": "text", "text": "policy " * words, "cache_control": {"type": "ephemeral", "ttl": ttl}}]


def test_cache_write_read_and_expiry(sim: SimServer, client: anthropic.Anthropic, clock: FakeClock) -> None:
    sim.state.reset()
    system = _cached_system(5000)
    user_tokens = count_tokens(DOC)
    first = client.messages.create(model=MODEL, max_tokens=50, system=system, messages=MESSAGES)
    assert first.usage.cache_creation_input_tokens == 5000
    assert first.usage.cache_creation is not None
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == 5000
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.input_tokens == user_tokens
    clock.advance(299)
    second = client.messages.create(model=MODEL, max_tokens=50, system=system, messages=MESSAGES)
    assert (second.usage.cache_read_input_tokens, second.usage.cache_creation_input_tokens) == (5000, 0)
    assert second.usage.input_tokens == user_tokens
    clock.advance(299)  # the read refreshed the TTL: still there
    events = raw_events(client, system=system)
    assert events[0][1]["message"]["usage"]["cache_read_input_tokens"] == 5000
    assert final_delta(events)["usage"]["cache_read_input_tokens"] == 5000
    clock.advance(301)  # expired
    third = client.messages.create(model=MODEL, max_tokens=50, system=system, messages=MESSAGES)
    assert (third.usage.cache_read_input_tokens, third.usage.cache_creation_input_tokens) == (0, 5000)
    # another model has its own cache
    other = client.messages.create(model="claude-sonnet-4-6", max_tokens=50, system=system, messages=MESSAGES)
    assert other.usage.cache_read_input_tokens == 0


def test_one_hour_ttl(sim: SimServer, client: anthropic.Anthropic, clock: FakeClock) -> None:
    sim.state.reset()
    system = _cached_system(5000, ttl="1h")
    first = client.messages.create(model=MODEL, max_tokens=50, system=system, messages=MESSAGES)
    assert first.usage.cache_creation is not None
    assert first.usage.cache_creation.ephemeral_1h_input_tokens == 5000
    clock.advance(3000)
    assert (
        client.messages.create(
            model=MODEL, max_tokens=50, system=system, messages=MESSAGES
        ).usage.cache_read_input_tokens
        == 5000
    )
    clock.advance(3601)
    assert (
        client.messages.create(
            model=MODEL, max_tokens=50, system=system, messages=MESSAGES
        ).usage.cache_read_input_tokens
        == 0
    )


def test_short_prefixes_are_silently_not_cached(sim: SimServer, client: anthropic.Anthropic) -> None:
    sim.state.reset()
    system = _cached_system(4000)  # haiku 4.5 caches from 4096 tokens
    for _ in range(2):
        message = client.messages.create(model=MODEL, max_tokens=50, system=system, messages=MESSAGES)
        assert (message.usage.cache_creation_input_tokens, message.usage.cache_read_input_tokens) == (0, 0)
        assert message.usage.input_tokens == 4000 + count_tokens(DOC)
    # the same prefix is long enough for a model with a lower minimum
    sonnet = client.messages.create(
        model="claude-sonnet-4-6", max_tokens=50, system=system, messages=MESSAGES
    )
    assert sonnet.usage.cache_creation_input_tokens == 4000


def test_automatic_caching_follows_a_growing_conversation(
    sim: SimServer, client: anthropic.Anthropic
) -> None:
    sim.state.reset()
    long_turn = "document " * 5000
    turns: list[Any] = [{"role": "user", "content": long_turn}]
    first = client.messages.create(
        model=MODEL, max_tokens=50, messages=turns, cache_control={"type": "ephemeral"}
    )
    assert (first.usage.cache_creation_input_tokens, first.usage.input_tokens) == (5000, 0)
    again = client.messages.create(
        model=MODEL, max_tokens=50, messages=turns, cache_control={"type": "ephemeral"}
    )
    assert (again.usage.cache_read_input_tokens, again.usage.input_tokens) == (5000, 0)
    grown = [*turns, {"role": "assistant", "content": "Noted."}, {"role": "user", "content": "Summarize it."}]
    third = client.messages.create(
        model=MODEL, max_tokens=50, messages=grown, cache_control={"type": "ephemeral"}
    )
    added = count_tokens("Noted.") + count_tokens("Summarize it.")
    assert third.usage.cache_read_input_tokens == 5000
    assert third.usage.cache_creation_input_tokens == added
    assert third.usage.input_tokens == 0
    # /_sim/reset empties the cache
    sim.state.reset()
    fresh = client.messages.create(
        model=MODEL, max_tokens=50, messages=turns, cache_control={"type": "ephemeral"}
    )
    assert fresh.usage.cache_read_input_tokens == 0
