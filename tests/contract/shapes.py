"""What the SDK says a reply looks like: every event and error body checked against anthropic's own types.

Used on the transcripts and on the simulator alike. An event type, content block type or delta type
the SDK does not know must be one the SDK rejects (an "unknown" the worker has to ignore), never a
known type with a malformed body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol, get_args

import anthropic
import httpx2
import pydantic
from anthropic.types import RawContentBlockDelta, RawMessageStreamEvent
from anthropic.types.raw_content_block_start_event import ContentBlock
from anthropic.types.shared import ErrorObject, ErrorResponse

__all__ = [
    "KNOWN_BLOCKS",
    "KNOWN_DELTAS",
    "KNOWN_ERRORS",
    "KNOWN_EVENTS",
    "Reply",
    "check_error_body",
    "check_events",
    "fetch",
    "key_paths",
    "shape",
]


class ServerSentEvent(Protocol):
    """One raw event as ``anthropic.Stream.raw_events`` yields it: its name and its data."""

    @property
    def event(self) -> str | None: ...

    @property
    def data(self) -> str: ...


EVENTS = pydantic.TypeAdapter(RawMessageStreamEvent)
ERRORS = pydantic.TypeAdapter(ErrorResponse)


def _literals(union: Any) -> frozenset[str]:
    """The ``type`` values of a discriminated union of the SDK's models."""
    names: set[str] = set()
    for variant in get_args(get_args(union)[0]):
        names.update(get_args(variant.model_fields["type"].annotation))
    return frozenset(names)


#: event types the SDK parses into its models (``ping`` and ``error`` it handles by name)
KNOWN_EVENTS = _literals(RawMessageStreamEvent)
KNOWN_BLOCKS = _literals(ContentBlock)
KNOWN_DELTAS = _literals(RawContentBlockDelta)
KNOWN_ERRORS = _literals(ErrorObject)


@dataclass
class Reply:
    """One response to ``POST /v1/messages`` as the SDK read it."""

    status: int
    headers: dict[str, str]
    events: list[ServerSentEvent] = field(default_factory=list)
    #: the JSON body of an HTTP error
    error_body: Any = None
    #: the stream ended without its end (the connection was cut)
    cut: bool = False

    def data(self) -> list[dict[str, Any]]:
        """Each event's JSON."""
        return [json.loads(e.data) for e in self.events]

    def text(self) -> str:
        """The reply's text: its ``text_delta`` deltas, joined."""
        return "".join(
            d["delta"]["text"]
            for d in self.data()
            if d.get("type") == "content_block_delta" and d["delta"].get("type") == "text_delta"
        )


def fetch(client: anthropic.Anthropic, extra_headers: dict[str, str] | None = None, **kwargs: Any) -> Reply:
    """Send one streamed request with the real SDK and read its raw server-sent events."""
    body: dict[str, Any] = {
        "model": "claude-haiku-4-5",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "Summarize: tiered queues keep urgent work fast."}],
        **kwargs,
    }
    try:
        raw = client.messages.with_raw_response.create(**body, stream=True, extra_headers=extra_headers)
    except anthropic.APIStatusError as exc:
        return Reply(exc.status_code, dict(exc.response.headers), error_body=exc.body)
    response = raw.http_response
    reply = Reply(response.status_code, dict(response.headers))
    try:
        for sse in anthropic.Stream.raw_events(response):
            reply.events.append(sse)
    except httpx2.TransportError:
        reply.cut = True
    finally:
        response.close()
    return reply


def _rejected(adapter: pydantic.TypeAdapter[Any], data: object) -> bool:
    try:
        adapter.validate_python(data)
    except pydantic.ValidationError:
        return True
    return False


def check_events(events: list[ServerSentEvent]) -> list[str]:
    """Check every event against the SDK's types and the documented order; the unknown types seen.

    Raises AssertionError naming the event that does not fit.
    """
    unknown: list[str] = []
    open_blocks: set[int] = set()
    started = stopped = ended = False
    for n, sse in enumerate(events):
        where = f"event {n} ({sse.event!r})"
        assert not ended, f"{where}: after the stream's end"
        assert sse.event, f"{where}: every event is named"
        data = json.loads(sse.data)
        assert isinstance(data, dict) and data.get("type") == sse.event, f"{where}: data type {data!r}"
        kind = sse.event
        if kind == "ping":
            assert data == {"type": "ping"}, f"{where}: {data}"
            continue
        if kind == "error":
            ERRORS.validate_python(data)
            ended = True
            continue
        if kind not in KNOWN_EVENTS:
            assert _rejected(EVENTS, data), f"{where}: an unknown event the SDK parses"
            unknown.append(f"event:{kind}")
            continue
        assert started or kind == "message_start", f"{where}: before message_start"
        assert not stopped or kind == "message_stop", f"{where}: after message_delta"
        if kind in ("content_block_start", "content_block_delta"):
            inner = data["content_block"] if kind == "content_block_start" else data["delta"]
            known = KNOWN_BLOCKS if kind == "content_block_start" else KNOWN_DELTAS
            if inner["type"] not in known:
                assert _rejected(EVENTS, data), f"{where}: an unknown {inner['type']!r} the SDK parses"
                assert isinstance(data["index"], int)
                unknown.append(f"{kind}:{inner['type']}")
                if kind == "content_block_start":
                    open_blocks.add(data["index"])
                else:
                    assert data["index"] in open_blocks, f"{where}: a delta outside its block"
                continue
        event = EVENTS.validate_python(data)
        if kind == "message_start":
            assert not started, f"{where}: a second message_start"
            started = True
        elif kind == "content_block_start":
            assert event.index not in open_blocks, f"{where}: block {event.index} started twice"
            open_blocks.add(event.index)
        elif kind == "content_block_delta":
            assert event.index in open_blocks, f"{where}: a delta outside its block"
        elif kind == "content_block_stop":
            assert event.index in open_blocks, f"{where}: stops a block that is not open"
            open_blocks.discard(event.index)
        elif kind == "message_delta":
            assert not open_blocks, f"{where}: blocks {open_blocks} still open"
            stopped = True
        elif kind == "message_stop":
            assert stopped, f"{where}: message_stop without message_delta"
            ended = True
    return unknown


def check_error_body(body: object) -> str:
    """Check an HTTP error body: the documented envelope, and the SDK's type for a type it knows.

    Returns the error type; one the SDK does not list must be one the SDK rejects.
    """
    assert isinstance(body, dict) and body.get("type") == "error", body
    error = body["error"]
    assert isinstance(error, dict) and isinstance(error.get("type"), str), body
    assert isinstance(error.get("message"), str) and error["message"], body
    if error["type"] in KNOWN_ERRORS:
        ERRORS.validate_python(body)
    else:
        assert _rejected(ERRORS, body), f"{error['type']!r} is not unknown to the SDK"
    return str(error["type"])


def key_paths(value: object, prefix: str = "") -> set[str]:
    """Every key path in a JSON value (``a.b``, lists as ``a[]``)."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            paths.add(path)
            paths |= key_paths(item, path)
    elif isinstance(value, list):
        for item in value:
            paths |= key_paths(item, f"{prefix}[]")
    return paths


def shape(reply: Reply) -> dict[str, set[str]]:
    """The key paths of a reply, by event type (and block or delta type), for the types the SDK knows.

    ``"http"`` holds the API's own header names (``request-id``, ``retry-after``, ``x-should-retry``,
    ``anthropic-ratelimit-*``), ``"error_body"`` the paths of an HTTP error's body.
    """
    shapes: dict[str, set[str]] = {
        "http": {
            name
            for name in reply.headers
            if name in ("request-id", "retry-after", "x-should-retry")
            or name.startswith("anthropic-ratelimit-")
        }
    }
    if reply.error_body is not None:
        shapes["error_body"] = key_paths(reply.error_body)
    for data in reply.data():
        kind = str(data.get("type"))
        if kind == "content_block_start":
            kind = f"{kind}:{data['content_block'].get('type')}"
        elif kind == "content_block_delta":
            kind = f"{kind}:{data['delta'].get('type')}"
        if kind.split(":")[-1] in KNOWN_EVENTS | KNOWN_BLOCKS | KNOWN_DELTAS | {"ping", "error"}:
            shapes.setdefault(kind, set()).update(key_paths(data))
    return shapes
