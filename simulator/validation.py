"""Validation of Messages API request bodies, with the API's ``invalid_request_error`` wording.

Checked: ``model``, ``max_tokens`` (int >= 1, not for count_tokens), ``messages`` (non-empty list
of ``{role, content}``, content a string or a list of text blocks), and when present ``system``,
``temperature``, ``metadata`` and ``stream``. Other fields are accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simulator.text import count_tokens

__all__ = ["InvalidRequest", "MessagesRequest", "parse_messages_request"]

_ROLES = ("user", "assistant")


class InvalidRequest(ValueError):
    """Raised when a request body is not a valid Messages API request."""


@dataclass(frozen=True)
class MessagesRequest:
    """The parts of a valid request the simulator uses."""

    model: str
    max_tokens: int
    stream: bool
    #: The system prompt's text ("" when absent); counted as input, not summarized.
    system: str
    #: The user messages' text, joined by blank lines: what gets summarized.
    user_text: str
    #: Tokens in the system prompt and every message.
    input_tokens: int


def _text_of(content: Any, where: str) -> str:
    """Return the text of a string or a list of text blocks; raise ``InvalidRequest`` otherwise."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}: Input should be a valid string or a list of content blocks")
    parts: list[str] = []
    for i, block in enumerate(content):
        if not isinstance(block, dict):
            raise InvalidRequest(f"{where}.{i}: Input should be a valid dictionary")
        if block.get("type") != "text":
            raise InvalidRequest(f"{where}.{i}.type: the simulator supports only 'text' blocks")
        text = block.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}.{i}.text: Field required")
        if not text:
            raise InvalidRequest(f"{where}.{i}: text content blocks must be non-empty")
        parts.append(text)
    return "\n\n".join(parts)


def _check_optional(body: dict[str, Any]) -> None:
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 1
    ):
        raise InvalidRequest("temperature: Input should be a number between 0 and 1")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise InvalidRequest("metadata: Input should be a valid dictionary")
        user_id = metadata.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            raise InvalidRequest("metadata.user_id: Input should be a valid string")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream: Input should be a valid boolean")


def parse_messages_request(body: Any, *, count_only: bool = False) -> MessagesRequest:
    """Validate a ``/v1/messages`` body (``count_only`` for ``/v1/messages/count_tokens``)."""
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise InvalidRequest("model: Field required")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model: Input should be a non-empty string")

    max_tokens = body.get("max_tokens")
    if count_only:
        max_tokens = max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else 1
    elif max_tokens is None:
        raise InvalidRequest("max_tokens: Field required")
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidRequest("max_tokens: Input should be a valid integer")
    elif max_tokens < 1:
        raise InvalidRequest("max_tokens: Input should be greater than or equal to 1")

    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("messages: Field required")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: Input should be a valid list")
    if not messages:
        raise InvalidRequest("messages: at least one message is required")

    user_parts: list[str] = []
    input_tokens = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages.{i}: Input should be a valid dictionary")
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise InvalidRequest(f"messages.{i}.content: Field required")
        text = _text_of(message["content"], f"messages.{i}.content")
        if not text and not (role == "assistant" and i == len(messages) - 1):
            raise InvalidRequest(
                f"messages.{i}: all messages must have non-empty content "
                "except for the optional final assistant message"
            )
        input_tokens += count_tokens(text)
        if role == "user":
            user_parts.append(text)

    system_raw = body.get("system")
    system = "" if system_raw is None else _text_of(system_raw, "system")
    input_tokens += count_tokens(system)

    _check_optional(body)
    return MessagesRequest(
        model=model,
        max_tokens=max_tokens,
        stream=body.get("stream") is True,
        system=system,
        user_text="\n\n".join(user_parts),
        input_tokens=input_tokens,
    )
