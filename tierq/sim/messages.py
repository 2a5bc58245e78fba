"""The simulator's answers: the Message JSON and the SSE event stream of ``/v1/messages``.

The stream is the documented sequence (https://platform.claude.com/docs/en/build-with-claude/streaming):
``message_start`` (usage so far), then for each content block ``content_block_start``, its
``content_block_delta`` events (a few tokens each) and ``content_block_stop``; then
``message_delta`` with the stop reason and the *cumulative* usage, and ``message_stop``. A ``ping``
follows the first ``content_block_start`` and one is sent every ``ping_interval_s`` of any silence
longer than that (time to first token, slow output). Each frame is ``event: <type>\\ndata: <json>\\n\\n``
with the JSON padded as the API writes it (``", "`` and ``": "`` separators).

Content: a ``thinking`` block first when the request thinks (``thinking_delta`` events then one
``signature_delta``; its tokens are output tokens, count toward ``max_tokens`` and are reported in
``usage.output_tokens_details.thinking_tokens``), an unknown ``future_block`` when that fault asks
for one, then the ``text`` block (none when ``max_tokens`` left no room for text).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from tierq.sim.errors import error_body
from tierq.sim.latency import Timing
from tierq.sim.text import count_tokens, split_deltas, split_sentences, summarize, tokenize

__all__ = [
    "PING_INTERVAL_S",
    "Block",
    "Reply",
    "StreamProgress",
    "build_reply",
    "new_message_id",
    "sse_frame",
    "stream_reply",
]

#: Longest silence in a stream before a ``ping`` (seconds, real time).
PING_INTERVAL_S: Final = 1.0
#: The event and block types of the ``unknown_event`` / ``unknown_block`` faults.
UNKNOWN_EVENT: Final = "future_event"
UNKNOWN_BLOCK: Final = "future_block"
UNKNOWN_DELTA: Final = "future_delta"
#: ``stop_details`` of the ``refusal`` fault (``anthropic.types.RefusalStopDetails``).
REFUSAL_DETAILS: Final = {
    "type": "refusal",
    "category": "general_harms",
    "explanation": "The simulator was asked to play a refusal (fault 'refusal').",
}


def new_message_id() -> str:
    """Return a fresh message id, ``msg_sim_<hex>``."""
    return f"msg_sim_{uuid.uuid4().hex[:24]}"


def sse_frame(event: str, data: dict[str, Any]) -> bytes:
    """Encode one server-sent event as the API writes it (padded JSON)."""
    payload = json.dumps(data, ensure_ascii=False)
    return f"event: {event}\ndata: {payload}\n\n".encode()


@dataclass(frozen=True)
class Block:
    """One content block of an answer: how it starts, its deltas, and its final form."""

    kind: Literal["thinking", "text", "unknown"]
    #: The ``content_block`` of ``content_block_start``.
    start: dict[str, Any]
    #: ``(delta, output tokens)`` of each ``content_block_delta``.
    deltas: tuple[tuple[dict[str, Any], int], ...]
    #: The block in a non-streamed Message.
    full: dict[str, Any]


def _thinking_text(document: str) -> str:
    sentences = split_sentences(document)
    return (
        f"The request asks for a summary of a document of {len(sentences)} sentences. "
        "The sentences that repeat its main terms carry its point, so I will keep those, "
        "in their original order, and stop within the token budget."
    )


def _thinking_block(text: str, display: str) -> Block:
    signature = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    shown = text if display != "omitted" else ""
    deltas: list[tuple[dict[str, Any], int]] = []
    if display == "omitted":
        # The tokens are still generated (and billed); only the text is withheld.
        deltas.append(({"type": "thinking_delta", "thinking": ""}, count_tokens(text)))
    else:
        deltas.extend(({"type": "thinking_delta", "thinking": t}, n) for t, n in split_deltas(text, seed=1))
    deltas.append(({"type": "signature_delta", "signature": signature}, 0))
    return Block(
        kind="thinking",
        start={"type": "thinking", "thinking": "", "signature": ""},
        deltas=tuple(deltas),
        full={"type": "thinking", "thinking": shown, "signature": signature},
    )


def _unknown_block(message_id: str) -> Block:
    parts = ["a block type ", "this client does not know"]
    return Block(
        kind="unknown",
        start={"type": UNKNOWN_BLOCK, "id": f"fb_{message_id[-12:]}", "data": ""},
        deltas=tuple(({"type": UNKNOWN_DELTA, "data": p}, 0) for p in parts),
        full={"type": UNKNOWN_BLOCK, "id": f"fb_{message_id[-12:]}", "data": "".join(parts)},
    )


def _text_block(deltas: list[tuple[str, int]]) -> Block:
    return Block(
        kind="text",
        start={"type": "text", "text": ""},
        deltas=tuple(({"type": "text_delta", "text": t}, n) for t, n in deltas),
        full={"type": "text", "text": "".join(t for t, _ in deltas)},
    )


@dataclass(frozen=True)
class Reply:
    """One assistant answer, before it is sent whole or streamed."""

    message_id: str
    model: str
    blocks: tuple[Block, ...]
    #: The input side of usage: input, cache creation (with its TTL split), cache read.
    input_usage: dict[str, Any]
    output_tokens: int
    thinking_tokens: int
    stop_reason: str
    stop_details: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(b.full["text"] for b in self.blocks if b.kind == "text")

    @property
    def input_tokens(self) -> int:
        tokens: int = self.input_usage["input_tokens"]
        return tokens

    def usage(self, output_tokens: int | None = None, thinking_tokens: int | None = None) -> dict[str, Any]:
        """The ``usage`` object (optionally as it stood earlier in a stream)."""
        return {
            **self.input_usage,
            "output_tokens": self.output_tokens if output_tokens is None else output_tokens,
            "output_tokens_details": {
                "thinking_tokens": self.thinking_tokens if thinking_tokens is None else thinking_tokens
            },
        }

    def message_usage(
        self, output_tokens: int | None = None, thinking_tokens: int | None = None
    ) -> dict[str, Any]:
        """The Message's ``usage`` (``Usage``, which adds ``service_tier`` to a delta's usage): the
        Messages API reports the tier a request ran on (https://platform.claude.com/docs/en/api/messages)."""
        return {**self.usage(output_tokens, thinking_tokens), "service_tier": "standard"}

    def message(self) -> dict[str, Any]:
        """Return the complete Message object of a non-streaming response."""
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [b.full for b in self.blocks],
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "stop_details": self.stop_details,
            "usage": self.message_usage(),
        }

    def message_start(self) -> dict[str, Any]:
        """Return the ``message_start`` event: the message with no content yet."""
        message = {
            **self.message(),
            "content": [],
            "stop_reason": None,
            "stop_details": None,
            "usage": self.message_usage(output_tokens=min(1, self.output_tokens), thinking_tokens=0),
        }
        return {"type": "message_start", "message": message}

    def message_delta(self, output_tokens: int) -> dict[str, Any]:
        """Return the ``message_delta`` event with cumulative usage."""
        return {
            "type": "message_delta",
            "delta": {
                "stop_reason": self.stop_reason,
                "stop_sequence": None,
                "stop_details": self.stop_details,
            },
            "usage": self.usage(output_tokens=output_tokens),
        }


def build_reply(
    *,
    model: str,
    document: str,
    max_tokens: int,
    input_usage: dict[str, Any],
    thinks: bool = False,
    thinking_budget: int | None = None,
    thinking_display: str = "summarized",
    refusal_after: int | None = None,
    unknown_block: bool = False,
) -> Reply:
    """Work out the whole answer to ``document``: thinking, text, stop reason, output tokens.

    ``refusal_after``: cut the text after that many deltas and stop with ``refusal``.
    """
    message_id = new_message_id()
    blocks: list[Block] = []
    thinking_tokens = 0
    budget = max_tokens
    stop_reason = "end_turn"
    if thinks and max_tokens > 0:
        wanted = _thinking_text(document)
        cap = min(max_tokens, thinking_budget if thinking_budget is not None else max_tokens)
        tokens = tokenize(wanted)
        kept = "".join(tokens[:cap])
        thinking_tokens = min(len(tokens), cap)
        if len(tokens) > max_tokens:
            stop_reason = "max_tokens"
        blocks.append(_thinking_block(kept, thinking_display))
        budget = max_tokens - thinking_tokens
    if unknown_block:
        blocks.append(_unknown_block(message_id))
    text, text_tokens, text_stop = summarize(document, "", budget)
    deltas = split_deltas(text)
    stop_details = None
    if refusal_after is not None:
        deltas = deltas[:refusal_after]
        text_tokens = sum(n for _, n in deltas)
        stop_reason, stop_details = "refusal", dict(REFUSAL_DETAILS)
    elif stop_reason == "end_turn":
        stop_reason = text_stop
    if not (text_tokens == 0 and stop_reason == "max_tokens"):
        blocks.append(_text_block(deltas))
    return Reply(
        message_id=message_id,
        model=model,
        blocks=tuple(blocks),
        input_usage=input_usage,
        output_tokens=thinking_tokens + text_tokens,
        thinking_tokens=thinking_tokens,
        stop_reason=stop_reason,
        stop_details=stop_details,
    )


async def _pace(deadline: float, interval: float) -> AsyncIterator[bytes]:
    """Wait until ``deadline`` (loop time), yielding a ``ping`` frame every ``interval`` of silence."""
    loop = asyncio.get_running_loop()
    while True:
        delay = deadline - loop.time()
        if delay <= 0:
            return
        if delay <= interval:
            await asyncio.sleep(delay)
            return
        await asyncio.sleep(interval)
        yield sse_frame("ping", {"type": "ping"})


@dataclass
class StreamProgress:
    """What a stream has sent so far (read when it ends, to settle the rate limits)."""

    output_tokens: int = 0
    done: bool = False


async def stream_reply(
    reply: Reply,
    timing: Timing,
    *,
    stall_s: float = 0.0,
    fail_after: int | None = None,
    on_first_delta: Callable[[], None] | None = None,
    unknown_events: bool = False,
    ping_interval_s: float = PING_INTERVAL_S,
    progress: StreamProgress | None = None,
) -> AsyncIterator[bytes]:
    """Yield the SSE frames of ``reply``, paced by ``timing``.

    Args:
        reply: the answer to stream.
        timing: the first delta comes after ``timing.ttft_s``, the rest at its token rate.
        stall_s: after the first ``ping``, send nothing at all for this long (not scaled), then go on.
        fail_after: end with an ``overloaded_error`` event after this many text deltas.
        on_first_delta: called just before the first text delta is handed to the server.
        unknown_events: also send ``future_event`` events clients must ignore.
        ping_interval_s: longest silence before a ``ping``.
        progress: updated with the output tokens sent, and ``done`` at the end.
    """
    sent = progress or StreamProgress()
    loop = asyncio.get_running_loop()
    start = loop.time()
    yield sse_frame("message_start", reply.message_start())
    if unknown_events:
        yield sse_frame(
            UNKNOWN_EVENT, {"type": UNKNOWN_EVENT, "detail": {"note": "clients must ignore this"}}
        )
    tokens_before = 0
    text_deltas = 0
    pinged = False
    for index, block in enumerate(reply.blocks):
        yield sse_frame(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block.start},
        )
        if not pinged:
            pinged = True
            yield sse_frame("ping", {"type": "ping"})
            if stall_s > 0:
                await asyncio.sleep(stall_s)
                start += stall_s
        for delta, n_tokens in block.deltas:
            async for ping in _pace(start + timing.offset(tokens_before), ping_interval_s):
                yield ping
            if block.kind == "text":
                if fail_after is not None and text_deltas >= fail_after:
                    break
                if text_deltas == 0 and on_first_delta is not None:
                    on_first_delta()
                text_deltas += 1
            yield sse_frame(
                "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
            )
            tokens_before += n_tokens
            sent.output_tokens = tokens_before
            if unknown_events and block.kind == "text" and text_deltas == 1:
                yield sse_frame(UNKNOWN_EVENT, {"type": UNKNOWN_EVENT, "detail": {"index": index}})
        if block.kind == "text" and fail_after is not None:
            yield sse_frame("error", error_body("overloaded_error", "Overloaded"))
            return
        yield sse_frame("content_block_stop", {"type": "content_block_stop", "index": index})
    if fail_after is not None:
        yield sse_frame("error", error_body("overloaded_error", "Overloaded"))
        return
    async for ping in _pace(start + timing.total(reply.output_tokens), ping_interval_s):
        yield ping
    sent.output_tokens = reply.output_tokens
    yield sse_frame("message_delta", reply.message_delta(reply.output_tokens))
    yield sse_frame("message_stop", {"type": "message_stop"})
    sent.done = True
