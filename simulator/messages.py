"""The simulator's answers: the Message JSON and the SSE event stream of ``/v1/messages``.

The stream is the documented sequence ``message_start``, ``content_block_start``, ``ping``,
``content_block_delta`` (a few tokens each), ``content_block_stop``, ``message_delta``,
``message_stop``, each frame written ``event: <type>\\ndata: <json>\\n\\n``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from simulator.errors import error_body
from simulator.latency import Timing
from simulator.text import split_deltas

__all__ = ["Reply", "new_message_id", "sse_frame", "stream_reply"]


def new_message_id() -> str:
    """Return a fresh message id, ``msg_sim_<hex>``."""
    return f"msg_sim_{uuid.uuid4().hex[:24]}"


def sse_frame(event: str, data: dict[str, Any]) -> bytes:
    """Encode one server-sent event as the API writes it."""
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {payload}\n\n".encode()


@dataclass(frozen=True)
class Reply:
    """One assistant answer, before it is sent whole or streamed."""

    message_id: str
    model: str
    text: str
    input_tokens: int
    output_tokens: int
    stop_reason: str

    def usage(self, output_tokens: int | None = None) -> dict[str, int]:
        """Return the ``usage`` object, optionally with another ``output_tokens``."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens if output_tokens is None else output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }

    def message(self) -> dict[str, Any]:
        """Return the complete Message object of a non-streaming response."""
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": self.text}],
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "usage": self.usage(),
        }

    def message_start(self) -> dict[str, Any]:
        """Return the ``message_start`` event: the message with no content yet."""
        message = {
            **self.message(),
            "content": [],
            "stop_reason": None,
            "usage": self.usage(output_tokens=1),
        }
        return {"type": "message_start", "message": message}


async def _sleep_until(deadline: float) -> None:
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


async def stream_reply(
    reply: Reply,
    timing: Timing,
    *,
    stall_s: float = 0.0,
    fail_after: int | None = None,
    on_first_delta: Callable[[], None] | None = None,
) -> AsyncIterator[bytes]:
    """Yield the SSE frames of ``reply``, paced by ``timing``.

    Args:
        reply: the answer to stream.
        timing: the first delta comes after ``timing.ttft_s``, the rest at its token rate.
        stall_s: after ``ping``, send nothing for this long (not scaled), then go on.
        fail_after: end with an ``overloaded_error`` event after this many text deltas.
        on_first_delta: called just before the first text delta is handed to the server.
    """
    start = asyncio.get_running_loop().time()
    yield sse_frame("message_start", reply.message_start())
    yield sse_frame(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    yield sse_frame("ping", {"type": "ping"})
    if stall_s > 0:
        await asyncio.sleep(stall_s)
        start += stall_s

    tokens_before = 0
    for sent, (text, n_tokens) in enumerate(split_deltas(reply.text)):
        await _sleep_until(start + timing.offset(tokens_before))
        if fail_after is not None and sent >= fail_after:
            break
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
        frame = sse_frame("content_block_delta", delta)
        if sent == 0 and on_first_delta is not None:
            on_first_delta()
        yield frame
        tokens_before += n_tokens
    if fail_after is not None:
        yield sse_frame("error", error_body("overloaded_error", "Overloaded"))
        return

    await _sleep_until(start + timing.total(reply.output_tokens))
    yield sse_frame("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield sse_frame(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": reply.output_tokens},
        },
    )
    yield sse_frame("message_stop", {"type": "message_stop"})
