"""Each transcript on its own: served by the replay server, read by the real SDK, checked against its types.

A transcript that the SDK could not read, or that breaks the documented event order, would make
every outcome test built on it meaningless; so would one whose text is not what the outcome tests
expect.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

from tests.contract import shapes
from tests.contract.conftest import TEXTS
from tests.contract.replay import ReplayServer, load_transcripts

#: what the SDK must not know in each transcript (it is there to be ignored)
UNKNOWN = {
    "unknown_event": ["event:future_event", "event:future_event"],
    "unknown_block": [
        "content_block_start:future_block",
        "content_block_delta:future_delta",
        "content_block_delta:future_delta",
    ],
}
#: HTTP error transcripts: status, error type
ERRORS = {
    "http_429": (429, "rate_limit_error"),
    "spend_limit": (429, "rate_limit_error"),
    "http_529": (529, "overloaded_error"),
    "http_404": (404, "not_found_error"),
    "http_413": (413, "request_too_large"),
}
RATELIMIT_HEADERS = {
    f"anthropic-ratelimit-{kind}-{field}"
    for kind in ("requests", "input-tokens", "output-tokens", "tokens")
    for field in ("limit", "remaining", "reset")
}


@pytest.fixture(scope="module")
def client(replay: ReplayServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key="contract-test", base_url=replay.url, max_retries=0) as sdk:
        yield sdk


def _fetch(replay: ReplayServer, client: anthropic.Anthropic, name: str) -> shapes.Reply:
    job_id = f"transcript-{name}"
    replay.script(job_id, [name])
    return shapes.fetch(client, {"x-tierq-job-id": job_id})


def test_every_transcript_is_covered() -> None:
    assert set(load_transcripts()) == set(TEXTS) | set(ERRORS)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_stream_transcript_fits_the_sdk(replay: ReplayServer, client: anthropic.Anthropic, name: str) -> None:
    transcript = replay.transcripts[name]
    reply = _fetch(replay, client, name)

    assert transcript.sources and all(s.startswith("https://") for s in transcript.sources)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.headers["request-id"].startswith("req_")
    assert set(reply.headers) >= RATELIMIT_HEADERS
    assert shapes.check_events(reply.events) == UNKNOWN.get(name, [])
    assert reply.text() == TEXTS[name]
    kinds = [e.event for e in reply.events]
    assert reply.cut == (name == "dropped_connection")
    if name in ("error_before_text", "error_after_text"):
        assert kinds[-1] == "error" and "message_stop" not in kinds
    elif name == "dropped_connection":
        assert "message_delta" not in kinds and "message_stop" not in kinds
    else:
        assert kinds[-1] == "message_stop"


def _message_delta(reply: shapes.Reply) -> anthropic.types.RawMessageDeltaEvent:
    [data] = [d for d in reply.data() if d["type"] == "message_delta"]
    event = shapes.EVENTS.validate_python(data)
    assert isinstance(event, anthropic.types.RawMessageDeltaEvent)
    return event


def test_transcript_details_read_by_the_sdk(replay: ReplayServer, client: anthropic.Anthropic) -> None:
    """The figures the outcome tests assert come through the SDK's own types."""
    refusal = _message_delta(_fetch(replay, client, "refusal")).delta
    assert refusal.stop_reason == "refusal"
    assert refusal.stop_details is not None and refusal.stop_details.category == "cyber"

    thinking = _fetch(replay, client, "thinking_then_text")
    usage = _message_delta(thinking).usage
    assert usage.output_tokens_details is not None and usage.output_tokens_details.thinking_tokens == 61
    deltas = [d["delta"]["type"] for d in thinking.data() if d["type"] == "content_block_delta"]
    assert deltas[:3] == ["thinking_delta", "thinking_delta", "signature_delta"]
    assert set(deltas[3:]) == {"text_delta"}

    cache = _fetch(replay, client, "cache_hit")
    usage = _message_delta(cache).usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (50, 4000, 60)
    assert cache.data()[0]["message"]["model"] == "claude-haiku-4-5"

    assert _message_delta(_fetch(replay, client, "max_tokens_stop")).delta.stop_reason == "max_tokens"


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_error_transcript_fits_the_sdk(replay: ReplayServer, client: anthropic.Anthropic, name: str) -> None:
    status, error_type = ERRORS[name]
    reply = _fetch(replay, client, name)

    assert reply.status == status
    assert shapes.check_error_body(reply.error_body) == error_type
    if name == "http_413":
        # answered by Cloudflare before the API: none of the API's headers, no request_id
        assert "request-id" not in reply.headers and "request_id" not in reply.error_body
        assert error_type not in shapes.KNOWN_ERRORS
        return
    assert reply.error_body["request_id"] == reply.headers["request-id"]
    assert set(reply.headers) >= RATELIMIT_HEADERS
    should_retry = name in ("http_429", "http_529")
    assert reply.headers["x-should-retry"] == str(should_retry).lower()
    assert ("retry-after" in reply.headers) == (name == "http_429")
    details = reply.error_body["error"].get("details")
    assert (details == {"error_code": "enforced_spend_limit_reached"}) == (name == "spend_limit")


def test_replay_server_follows_the_script(replay: ReplayServer, client: anthropic.Anthropic) -> None:
    replay.script("scripted", ["http_529", "ok"])
    first = shapes.fetch(client, {"x-tierq-job-id": "scripted"})
    second = shapes.fetch(client, {"x-tierq-job-id": "scripted"})
    third = shapes.fetch(client, {"x-tierq-job-id": "scripted"})  # past the script: ok

    assert [first.status, second.status, third.status] == [529, 200, 200]
    recorded = replay.requests("scripted")
    assert [r.transcript for r in recorded] == ["http_529", "ok", "ok"]
    assert recorded[0].body["model"] == "claude-haiku-4-5" and recorded[0].body["stream"] is True
    assert recorded[0].at <= recorded[1].at <= recorded[2].at
    with pytest.raises(KeyError):
        replay.script("scripted", ["no_such_transcript"])
