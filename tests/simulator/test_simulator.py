"""The Anthropic-compatible simulator, driven over HTTP by the real ``anthropic`` SDK (never patched)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types import Message

from tests.helpers import SIM_TODAY
from tierq.sim import SimConfig, SimServer
from tierq.sim.__main__ import parse_args
from tierq.sim.faults import Fault
from tierq.sim.latency import LatencyModel, profile_for
from tierq.sim.state import SimState
from tierq.sim.text import count_tokens, split_deltas, summarize, tokenize

MODEL = "claude-haiku-4-5"
DOC = (
    "Tierq runs Celery workers that summarize documents with Claude. "
    "Each tier has its own worker pool, so slow jobs never block fast ones. "
    "The fast tier uses Haiku because its time to first token is short. "
    "The slow tier uses Opus for long documents that need careful summaries. "
    "Redis is the broker and keeps the queues for every tier. "
    "Workers retry overloaded errors with backoff, and they honour retry-after on rate limits. "
    "The simulator stands in for the API in tests. "
    "It answers with an extractive summary of the documents it is given."
)
MESSAGES: list[Any] = [{"role": "user", "content": DOC}]
STREAM_EVENTS = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
]


@pytest.fixture(scope="module")
def sim_config() -> SimConfig:
    return SimConfig(time_scale=0.01, seed=7, stall_s=2.0, today=SIM_TODAY)


def new_job() -> str:
    return f"job-{uuid.uuid4().hex[:8]}"


def job_headers(job_id: str) -> dict[str, str]:
    return {"x-tierq-job-id": job_id}


def http(sim: SimServer, method: str, path: str, body: object | None = None) -> tuple[int, dict[str, Any]]:
    """Call the simulator with the standard library; return (status, JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json", "anthropic-version": "2026-10-21"}
    request = urllib.request.Request(sim.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.load(err)


def create(client: anthropic.Anthropic, **kwargs: Any) -> Message:
    params: dict[str, Any] = {"model": MODEL, "max_tokens": 400, "messages": MESSAGES, **kwargs}
    message: Message = client.messages.create(**params)
    return message


# --- happy paths -------------------------------------------------------------------------------


def test_create_returns_summary_usage_and_stop_reason(client: anthropic.Anthropic) -> None:
    message = create(client)
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == MODEL
    assert message.id.startswith("msg_sim_")
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    text = message.content[0].text  # type: ignore[union-attr]
    assert text
    assert text in DOC or all(sentence in DOC for sentence in text.split(". "))
    assert len(text) < len(DOC)
    assert message.usage.input_tokens == count_tokens(DOC)
    assert message.usage.output_tokens == count_tokens(text)
    assert message.usage.cache_read_input_tokens == 0
    assert message._request_id is not None
    assert message._request_id.startswith("req_sim_")


def test_summary_is_deterministic_and_ignores_system(client: anthropic.Anthropic) -> None:
    first = create(client)
    second = create(
        client,
        system="You are a terse summarizer.",
        metadata={"user_id": "u1"},
        output_config={"effort": "low"},
        model="claude-sonnet-4-6",
    )
    assert first.content == second.content
    assert second.usage.input_tokens == first.usage.input_tokens + count_tokens("You are a terse summarizer.")


def test_raw_stream_events_in_order_and_text_matches_create(client: anthropic.Anthropic) -> None:
    expected = create(client)
    with client.messages.create(model=MODEL, max_tokens=400, messages=MESSAGES, stream=True) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    # ping is consumed by the SDK; collapse the run of deltas to compare the sequence
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert collapsed == STREAM_EVENTS
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]  # type: ignore[union-attr]
    assert len(deltas) > 1
    assert all(1 <= len(tokenize(d)) <= 4 for d in deltas)
    assert "".join(deltas) == expected.content[0].text  # type: ignore[union-attr]
    start, delta = events[0], events[-2]
    assert start.type == "message_start"
    assert start.message.usage.output_tokens == 1
    assert start.message.content == []
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == expected.usage.output_tokens


def test_stream_helper_final_message_has_usage(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=400, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.usage.input_tokens == count_tokens(DOC)
    assert final.usage.output_tokens == count_tokens(text)
    assert final.stop_reason == "end_turn"


def test_max_tokens_truncates(client: anthropic.Anthropic) -> None:
    message = create(client, max_tokens=7)
    assert message.stop_reason == "max_tokens"
    assert 0 < message.usage.output_tokens <= 7
    with client.messages.stream(model=MODEL, max_tokens=7, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens"
    assert final.content[0].text == message.content[0].text  # type: ignore[union-attr]


def test_count_tokens_matches_usage(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=MODEL, messages=MESSAGES, system="Be brief.")
    used = create(client, system="Be brief.")
    assert counted.input_tokens == used.usage.input_tokens > 0


def test_request_id_header(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=50, messages=MESSAGES)
    assert raw.headers["request-id"].startswith("req_sim_")
    assert raw.parse()._request_id == raw.headers["request-id"]


# --- request validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": -1},
        {"messages": []},
        {"messages": [{"role": "system", "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        {"extra_body": {"temperature": 0.5}},
        {"extra_body": {"temperature": 3}, "extra_headers": {"anthropic-version": "2023-06-01"}},
        {"extra_body": {"top_k": -1}, "extra_headers": {"anthropic-version": "2023-06-01"}},
    ],
)
def test_bad_body_is_bad_request(client: anthropic.Anthropic, params: dict[str, Any]) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        create(client, **params)
    assert info.value.status_code == 400
    body: Any = info.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"type", "message"}


def test_missing_fields_and_unknown_path(sim: SimServer) -> None:
    status, body = http(sim, "POST", "/v1/messages", {"messages": MESSAGES, "max_tokens": 5})
    assert (status, body["error"]["type"]) == (400, "invalid_request_error")
    assert "model" in body["error"]["message"]
    status, body = http(sim, "POST", "/v1/messages", {"model": MODEL, "messages": MESSAGES})
    assert status == 400
    assert "max_tokens" in body["error"]["message"]
    status, body = http(sim, "GET", "/v1/nothing-here")
    assert (status, body["type"], body["error"]["type"]) == (404, "error", "not_found_error")


def test_require_api_key() -> None:
    with SimServer(SimConfig(time_scale=0, require_api_key=True)) as locked:
        status, body = http(
            locked, "POST", "/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": MESSAGES}
        )
        assert (status, body["error"]["type"]) == (401, "authentication_error")
        with anthropic.Anthropic(api_key="sim-key", base_url=locked.url, max_retries=0) as c:
            assert create(c).stop_reason == "end_turn"


# --- faults ------------------------------------------------------------------------------------


def test_scripted_faults_by_job_id(sim: SimServer, client: anthropic.Anthropic) -> None:
    job = new_job()
    sim.state.add_faults(["529", "429", "500", "400", "401", "ok"], job)
    headers = job_headers(job)
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        create(client, extra_headers=headers)
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    with pytest.raises(anthropic.RateLimitError) as limited:
        create(client, extra_headers=headers)
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert "anthropic-ratelimit-tokens-reset" in limited.value.response.headers
    assert limited.value.request_id is not None
    with pytest.raises(anthropic.InternalServerError):
        create(client, extra_headers=headers)
    with pytest.raises(anthropic.BadRequestError):
        create(client, extra_headers=headers)
    with pytest.raises(anthropic.AuthenticationError):
        create(client, extra_headers=headers)
    assert create(client, extra_headers=headers).stop_reason == "end_turn"
    assert create(client, extra_headers=headers).stop_reason == "end_turn"  # script used up
    assert sim.state.request_count(job) == 7
    assert http(sim, "GET", f"/_sim/requests/{job}") == (200, {"job_id": job, "count": 7})
    status, counts = http(sim, "GET", "/_sim/requests")
    assert status == 200
    assert counts["by_job"][job] == 7
    assert counts["total"] >= 7


def test_other_jobs_do_not_consume_a_jobs_script(sim: SimServer, client: anthropic.Anthropic) -> None:
    job, other = new_job(), new_job()
    sim.state.add_faults(["529"], job)
    assert create(client, extra_headers=job_headers(other)).stop_reason == "end_turn"
    with pytest.raises(anthropic.OverloadedError):
        create(client, extra_headers=job_headers(job))


def test_header_fault_wins_over_script(sim: SimServer, client: anthropic.Anthropic) -> None:
    job = new_job()
    sim.state.add_faults(["529"], job)
    with pytest.raises(anthropic.RateLimitError) as limited:
        create(client, extra_headers={**job_headers(job), "x-sim-fault": "429:3"})
    assert limited.value.response.headers["retry-after"] == "3"
    with pytest.raises(anthropic.OverloadedError):
        create(client, extra_headers=job_headers(job))
    with pytest.raises(anthropic.BadRequestError, match="x-sim-fault"):
        create(client, extra_headers={"x-sim-fault": "bogus"})


def test_admin_global_script_rates_and_reset() -> None:
    with (
        SimServer(SimConfig(time_scale=0, seed=1)) as own,
        anthropic.Anthropic(api_key="sim-key", base_url=own.url, max_retries=0) as c,
    ):
        assert http(own, "GET", "/_sim/health") == (200, {"ok": True})
        assert http(own, "POST", "/_sim/faults", {"faults": ["500"]})[0] == 200
        with pytest.raises(anthropic.InternalServerError):
            create(c, extra_headers=job_headers(new_job()))
        assert http(own, "POST", "/_sim/faults", {"faults": ["nope"]})[0] == 400
        assert http(own, "POST", "/_sim/rates", {"529": 1.0}) == (
            200,
            {"ok": True, "rates": {"529": 1.0}},
        )
        with pytest.raises(anthropic.OverloadedError):
            create(c)
        assert http(own, "POST", "/_sim/rates", {"529": 2.0})[0] == 400
        assert http(own, "POST", "/_sim/reset") == (200, {"ok": True})
        assert create(c).stop_reason == "end_turn"
        assert http(own, "GET", "/_sim/requests") == (200, {"total": 1, "by_job": {}})


def test_midstream_error_after_some_deltas(sim: SimServer, client: anthropic.Anthropic) -> None:
    job = new_job()
    sim.state.add_faults(["midstream", "midstream:0"], job)
    seen: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        client.messages.create(
            model=MODEL, max_tokens=400, messages=MESSAGES, stream=True, extra_headers=job_headers(job)
        ) as stream,
    ):
        seen.extend(event.type for event in stream)
    assert info.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert seen.count("content_block_delta") == 2
    assert "message_stop" not in seen
    seen.clear()
    with (
        pytest.raises(anthropic.APIStatusError),
        client.messages.stream(
            model=MODEL, max_tokens=400, messages=MESSAGES, extra_headers=job_headers(job)
        ) as helper,
    ):
        seen.extend(helper.text_stream)
    assert seen == []


def test_stall_fires_sdk_timeout(sim: SimServer, client: anthropic.Anthropic) -> None:
    job = new_job()
    sim.state.add_faults(["stall", "stall"], job)
    started = time.monotonic()
    with pytest.raises(anthropic.APITimeoutError):
        create(client, timeout=0.5, extra_headers=job_headers(job))
    assert time.monotonic() - started < 1.5
    # Streaming: headers and message_start arrive, then the read timeout fires while iterating.
    # Which exception the SDK raises for that is its own choice (httpx's TimeoutException up to 2.16,
    # APITimeoutError from 2.17): the simulator's part is the silence. tierq's mapping of both is
    # tests/test_units.py's (test_a_read_timeout_maps_into_the_tree_whatever_the_sdk_raises).
    seen: list[str] = []
    with (
        pytest.raises((anthropic.APITimeoutError, httpx2.TimeoutException)),
        client.messages.create(
            model=MODEL,
            max_tokens=400,
            messages=MESSAGES,
            stream=True,
            timeout=0.5,
            extra_headers=job_headers(job),
        ) as stream,
    ):
        seen.extend(event.type for event in stream)
    assert seen == ["message_start", "content_block_start"]


def test_short_stall_then_completes(sim: SimServer, client: anthropic.Anthropic) -> None:
    started = time.monotonic()
    with client.messages.stream(
        model=MODEL, max_tokens=400, messages=MESSAGES, extra_headers={"x-sim-fault": "stall:0.3"}
    ) as stream:
        final = stream.get_final_message()
    assert time.monotonic() - started >= 0.3
    assert final.stop_reason == "end_turn"


# --- pure parts --------------------------------------------------------------------------------


def test_text_helpers() -> None:
    assert "".join(tokenize(DOC)) == DOC
    assert count_tokens("Hello, world!") == 4
    summary, tokens, stop = summarize(DOC, "", 1000)
    assert (tokens, stop) == (count_tokens(summary), "end_turn")
    assert summarize(DOC, "", 1000) == (summary, tokens, stop)
    assert summarize(DOC, "", 3) == ("".join(tokenize(summary)[:3]), 3, "max_tokens")
    assert summarize("One sentence only.", "", 100)[0] == "One sentence only."
    assert summarize("   ", "", 100) == ("", 0, "end_turn")
    deltas = split_deltas(summary)
    assert "".join(text for text, _ in deltas) == summary
    assert sum(n for _, n in deltas) == tokens


def test_latency_profiles_and_fault_specs() -> None:
    assert profile_for("claude-haiku-4-5").ttft_s < profile_for("claude-sonnet-4-5").ttft_s
    assert profile_for("claude-opus-4-1").tokens_per_s < profile_for("claude-sonnet-4-5").tokens_per_s
    assert profile_for("mystery-model") == profile_for("claude-sonnet-4-5")
    assert Fault.parse("midstream:0") == Fault("midstream", 0.0)
    assert str(Fault.parse("STALL:2.5")) == "stall:2.5"
    for bad in ("boom", "529:1", "stall:-1", "stall:x"):
        with pytest.raises(ValueError):
            Fault.parse(bad)


# --- benchmark knobs: request timings, fixed latency, jitter, `python -m tierq.sim` --------------


def test_request_timings_per_job(sim: SimServer, client: anthropic.Anthropic) -> None:
    job = new_job()
    before = time.time()
    with client.messages.create(
        model=MODEL, max_tokens=400, messages=MESSAGES, stream=True, extra_headers=job_headers(job)
    ) as stream:
        for _ in stream:
            pass
    create(client, extra_headers=job_headers(job))  # not streamed: no first delta
    status, body = http(sim, "GET", f"/_sim/timings/{job}")
    assert status == 200
    assert body["job_id"] == job
    streamed, whole = body["requests"]
    assert before <= streamed["arrived_at"] <= streamed["first_delta_at"] <= time.time()
    expected_ms = (streamed["first_delta_at"] - streamed["arrived_at"]) * 1000
    assert streamed["ttft_ms"] == pytest.approx(expected_ms, abs=0.001)
    assert whole["first_delta_at"] is None
    assert whole["ttft_ms"] is None
    assert sim.state.timings(job) == body["requests"]
    status, every = http(sim, "GET", "/_sim/timings")
    assert status == 200
    assert every["by_job"][job] == body["requests"]
    other = new_job()
    assert http(sim, "GET", f"/_sim/timings/{other}") == (200, {"job_id": other, "requests": []})


def test_timings_are_bounded_and_reset() -> None:
    state = SimState(max_timed_jobs=2)
    for job in ("a", "b", "c"):
        state.record_arrival(job, time.time())
    assert set(state.all_timings()) == {"b", "c"}
    timing = state.record_arrival("c", 100.0)
    state.mark_first_delta(timing, 100.25)
    state.mark_first_delta(timing, 101.0)  # only the first delta counts
    assert state.timings("c")[-1] == {"arrived_at": 100.0, "first_delta_at": 100.25, "ttft_ms": 250.0}
    state.reset()
    assert state.all_timings() == {}


def test_jitter_override_and_fixed_latency() -> None:
    steady = LatencyModel(time_scale=0.5, seed=3, jitter=0)
    assert steady.timing_for(MODEL) == steady.timing_for(MODEL)
    assert steady.timing_for(MODEL).ttft_s == pytest.approx(profile_for(MODEL).ttft_s * 0.5)
    fixed = LatencyModel(time_scale=1.0, fixed_ttft_s=0.1, fixed_total_s=0.5)
    timing = fixed.timing_for(MODEL, output_tokens=40)
    assert timing.ttft_s == pytest.approx(0.1)
    assert timing.total(40) == pytest.approx(0.5)
    assert LatencyModel(fixed_total_s=0.2).timing_for(MODEL, 10).total(10) == pytest.approx(0.2)
    for bad in ({"jitter": 1.5}, {"fixed_ttft_s": -1.0}, {"fixed_total_s": -0.1}):
        with pytest.raises(ValueError):
            LatencyModel(**bad)  # type: ignore[arg-type]


def test_fixed_total_paces_a_streamed_call() -> None:
    config = SimConfig(fixed_ttft_s=0.05, fixed_total_s=0.2)
    with (
        SimServer(config) as own,
        anthropic.Anthropic(api_key="sim-key", base_url=own.url, max_retries=0) as c,
    ):
        job = new_job()
        started = time.monotonic()
        with c.messages.create(
            model=MODEL, max_tokens=400, messages=MESSAGES, stream=True, extra_headers=job_headers(job)
        ) as stream:
            for _ in stream:
                pass
        assert time.monotonic() - started >= 0.2
        (timing,) = own.state.timings(job)
        assert timing["ttft_ms"] is not None
        assert timing["ttft_ms"] >= 50


def test_module_cli_parses_benchmark_options() -> None:
    host, port, config = parse_args(
        [
            "--port",
            "9999",
            "--time-scale",
            "0.5",
            "--jitter",
            "0",
            "--fixed-ttft-s",
            "0.1",
            "--fixed-total-s",
            "0.5",
        ]
    )
    assert (host, port) == ("127.0.0.1", 9999)
    assert (config.time_scale, config.jitter, config.fixed_ttft_s, config.fixed_total_s) == (
        0.5,
        0.0,
        0.1,
        0.5,
    )
    with pytest.raises(SystemExit):
        parse_args(["--time-scale", "-1"])
