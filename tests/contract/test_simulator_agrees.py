"""The same requests go to the project's simulator: it must answer as the transcripts do.

Each case sends the simulator the request that plays one transcript's situation (a fault named in
``x-sim-fault``, a thinking model, a tiny ``max_tokens``, an unknown model, a body over 32 MB, a
cached prefix), reads the reply with the real SDK exactly like a transcript, checks every event and
error body against the SDK's types, and then holds it against the transcript: every key the
transcript's events and error body carry, and every API header it has, the simulator's must carry
too. The simulator cannot drift from the transcripts (and so from the API reference) unseen.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import pytest

from tests.contract import shapes
from tests.contract.replay import ReplayServer
from tierq.sim import SimServer

#: bytes over the Messages API's 32 MB request limit
OVER_32_MB = 32 * 1024 * 1024 + 1024


@dataclass(frozen=True)
class SimCase:
    """A request that makes the simulator play one transcript's situation."""

    transcript: str
    fault: str | None = None
    request: dict[str, Any] = field(default_factory=dict)


SIM_CASES = {
    "ok": SimCase("ok"),
    "refusal": SimCase("refusal", "refusal"),
    "unknown_event": SimCase("unknown_event", "unknown_event"),
    "unknown_block": SimCase("unknown_block", "unknown_block"),
    "thinking": SimCase("thinking_then_text", request={"model": "claude-opus-5-5", "max_tokens": 2048}),
    "max_tokens": SimCase("max_tokens_stop", request={"max_tokens": 5}),
    "midstream:0": SimCase("error_before_text", "midstream:0"),
    "midstream:2": SimCase("error_after_text", "midstream:2"),
    "429": SimCase("http_429", "429"),
    "spend_limit": SimCase("spend_limit", "spend_limit"),
    "529": SimCase("http_529", "529"),
    "unknown_model": SimCase("http_404", request={"model": "claude-nope"}),
    "over_32_mb": SimCase("http_413"),
    "cache_read": SimCase("cache_hit"),
}


@pytest.fixture(scope="module")
def sim_client(sim: SimServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key="contract-test", base_url=sim.url, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def replay_client(replay: ReplayServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key="contract-test", base_url=replay.url, max_retries=0) as client:
        yield client


def _ask_sim(client: anthropic.Anthropic, name: str, case: SimCase) -> shapes.Reply:
    headers = {"x-tierq-job-id": f"sim-contract-{name}-{uuid.uuid4().hex[:8]}"}
    if case.fault:
        headers["x-sim-fault"] = case.fault
    if name == "over_32_mb":
        return shapes.fetch(client, headers, messages=[{"role": "user", "content": "x" * OVER_32_MB}])
    if name == "cache_read":
        # a prefix well over Haiku 4.5's minimum cacheable prompt, unique to this run: written, then read
        system = [
            {
                "type": "text",
                "text": f"Run {uuid.uuid4().hex}. " + "Tiered queues keep urgent work fast. " * 3000,
                "cache_control": {"type": "ephemeral"},
            }
        ]
        first = shapes.fetch(client, headers, system=system)
        assert first.status == 200, first.error_body
        return shapes.fetch(client, headers, system=system)
    return shapes.fetch(client, headers, **case.request)


def _usage(reply: shapes.Reply) -> dict[str, Any]:
    [delta] = [d for d in reply.data() if d["type"] == "message_delta"]
    return dict(delta["usage"])


def _stop(reply: shapes.Reply) -> dict[str, Any]:
    [delta] = [d for d in reply.data() if d["type"] == "message_delta"]
    return dict(delta["delta"])


def _kinds(reply: shapes.Reply) -> list[str]:
    return [str(e.event) for e in reply.events]


def _check_refusal(reply: shapes.Reply) -> None:
    stop = _stop(reply)
    assert stop["stop_reason"] == "refusal"
    assert stop["stop_details"]["type"] == "refusal" and stop["stop_details"]["category"]


def _check_thinking(reply: shapes.Reply) -> None:
    starts = [d["content_block"]["type"] for d in reply.data() if d["type"] == "content_block_start"]
    assert starts[0] == "thinking" and "text" in starts[1:]
    deltas = [d["delta"]["type"] for d in reply.data() if d["type"] == "content_block_delta"]
    assert "thinking_delta" in deltas and "signature_delta" in deltas
    assert deltas.index("signature_delta") < deltas.index("text_delta")
    usage = _usage(reply)
    assert 0 < usage["output_tokens_details"]["thinking_tokens"] <= usage["output_tokens"]


def _check_midstream(deltas: int) -> Callable[[shapes.Reply], None]:
    def check(reply: shapes.Reply) -> None:
        kinds = _kinds(reply)
        assert kinds[-1] == "error" and "message_stop" not in kinds
        assert sum(1 for d in reply.data() if d["type"] == "content_block_delta") == deltas
        assert reply.data()[-1]["error"]["type"] == "overloaded_error"

    return check


def _check_spend_limit(reply: shapes.Reply) -> None:
    assert reply.headers["x-should-retry"] == "false" and "retry-after" not in reply.headers
    assert reply.error_body["error"]["details"] == {"error_code": "enforced_spend_limit_reached"}


def _check_429(reply: shapes.Reply) -> None:
    assert float(reply.headers["retry-after"]) > 0
    assert reply.headers["x-should-retry"] == "true"


def _check_cache_read(reply: shapes.Reply) -> None:
    usage = _usage(reply)
    assert usage["cache_read_input_tokens"] > 4096 and usage["cache_creation_input_tokens"] == 0


def _check_stop_reason(reason: str) -> Callable[[shapes.Reply], None]:
    def check(reply: shapes.Reply) -> None:
        assert _stop(reply)["stop_reason"] == reason

    return check


def _check_unknown_model(reply: shapes.Reply) -> None:
    assert "claude-nope" in reply.error_body["error"]["message"]


def _shape_only(reply: shapes.Reply) -> None:
    """Nothing beyond the shape (and the SDK's types) to check."""


#: what each case's reply must show beyond its shape
SPECIFIC: dict[str, Callable[[shapes.Reply], None]] = {
    "ok": _check_stop_reason("end_turn"),
    "refusal": _check_refusal,
    "unknown_event": _shape_only,
    "unknown_block": _shape_only,
    "thinking": _check_thinking,
    "max_tokens": _check_stop_reason("max_tokens"),
    "midstream:0": _check_midstream(0),
    "midstream:2": _check_midstream(2),
    "429": _check_429,
    "spend_limit": _check_spend_limit,
    "529": _shape_only,
    "unknown_model": _check_unknown_model,
    "over_32_mb": _shape_only,
    "cache_read": _check_cache_read,
}


@pytest.mark.parametrize("name", sorted(SIM_CASES))
def test_simulator_answers_as_the_transcript_does(
    name: str,
    sim_client: anthropic.Anthropic,
    replay_client: anthropic.Anthropic,
    replay: ReplayServer,
) -> None:
    case = SIM_CASES[name]
    replay.script(f"against-sim-{name}", [case.transcript])
    recorded = shapes.fetch(replay_client, {"x-tierq-job-id": f"against-sim-{name}"})
    reply = _ask_sim(sim_client, name, case)

    assert reply.status == recorded.status, (reply.status, reply.error_body)
    if recorded.error_body is not None:
        assert reply.error_body is not None
        assert shapes.check_error_body(reply.error_body) == shapes.check_error_body(recorded.error_body)
    else:
        # what the SDK does not know, the simulator sends as the transcript does (or not at all)
        unknown = shapes.check_events(reply.events)
        assert {u.split(":")[0] for u in unknown} == {
            u.split(":")[0] for u in shapes.check_events(recorded.events)
        }
        assert reply.text() or name == "midstream:0"
    SPECIFIC[name](reply)
    theirs, ours = shapes.shape(recorded), shapes.shape(reply)
    missing = {kind: sorted(paths - ours.get(kind, set())) for kind, paths in theirs.items()}
    assert not {k: v for k, v in missing.items() if v}, "what the simulator leaves out"


def test_every_transcript_has_a_simulator_case(replay: ReplayServer) -> None:
    played = {case.transcript for case in SIM_CASES.values()}
    # pings arrive only in long gaps, a padded or cut stream is the network's doing: not the simulator's
    assert set(replay.transcripts) - played == {"pings", "padded_json", "dropped_connection"}
