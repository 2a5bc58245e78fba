"""Validation of Messages API requests, as strict as the API (stricter where unsure).

The request bodies are pydantic models with ``extra="forbid"``: their fields are exactly the SDK's
``MessageCreateParams`` / ``MessageCountTokensParams`` (``tests/test_simulator_strict.py`` checks
that), so an unknown field is answered ``400 "<field>: Extra inputs are not permitted"``, the
API's own wording (https://platform.claude.com/docs/en/api/messages).

``anthropic-version`` picks the schema (https://platform.claude.com/docs/en/api/versioning):
``2026-10-21`` has no ``temperature``/``top_p``/``top_k`` (sending one, even at its default, is the
extra-field 400) and refuses document blocks in assistant messages and non-empty ``citations`` on
user text blocks; ``2023-06-01`` accepts the sampling parameters within their ranges.

What the simulator itself cannot play (images, tools results, PDFs) is refused with a 400 that
says so, never silently accepted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tierq.sim.catalogue import ModelEntry
from tierq.sim.text import count_tokens

__all__ = [
    "API_VERSIONS",
    "VERSION_2023",
    "VERSION_2026",
    "CountTokensRequest",
    "InvalidRequest",
    "MessagesRequest",
    "MessagesRequest2023",
    "Prompt",
    "Segment",
    "check_against_model",
    "parse_count_tokens_request",
    "parse_messages_request",
    "peek_model",
]

VERSION_2023: Final = "2023-06-01"
VERSION_2026: Final = "2026-10-21"
#: ``anthropic-version`` values served (https://platform.claude.com/docs/en/api/versioning).
API_VERSIONS: Final = (VERSION_2023, VERSION_2026)

#: At most this many blocks may carry ``cache_control`` (the top-level one takes a slot too)
#: (https://platform.claude.com/docs/en/build-with-claude/prompt-caching, "up to 4 cache breakpoints").
MAX_CACHE_BREAKPOINTS: Final = 4
#: Smallest ``thinking.budget_tokens`` (https://platform.claude.com/docs/en/build-with-claude/extended-thinking).
MIN_THINKING_BUDGET: Final = 1024
#: Most messages in one request (MessageCreateParams.messages docstring in the SDK).
MAX_MESSAGES: Final = 100_000

TTL_SECONDS: Final = {"5m": 300.0, "1h": 3600.0}


class InvalidRequest(ValueError):
    """Raised when a request is not a valid Messages API request (answered 400)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CacheControl(_Strict):
    """``{"type": "ephemeral", "ttl": "5m" | "1h"}``; ``ttl`` defaults to 5 minutes."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] = "5m"


class TextBlock(_Strict):
    """An input text block."""

    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = None


class PlainTextSource(_Strict):
    """A document's plain-text source (the only document source the simulator reads)."""

    type: Literal["text"]
    media_type: Literal["text/plain"]
    data: str


class CitationsConfig(_Strict):
    enabled: bool


class DocumentBlock(_Strict):
    """An input document block with a plain-text source."""

    type: Literal["document"]
    source: PlainTextSource
    title: str | None = None
    context: str | None = None
    citations: CitationsConfig | None = None
    cache_control: CacheControl | None = None


InputBlock = Annotated[TextBlock | DocumentBlock, Field(discriminator="type")]


class InputMessage(_Strict):
    """One turn of ``messages``."""

    role: Literal["user", "assistant"]
    content: str | list[InputBlock]


class Metadata(_Strict):
    user_id: str | None = Field(default=None, max_length=256)


class ThinkingEnabled(_Strict):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=MIN_THINKING_BUDGET)
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(_Strict):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(_Strict):
    type: Literal["disabled"]


class ThinkingBetweenTools(_Strict):
    type: Literal["between_tools"]


Thinking = Annotated[
    ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled | ThinkingBetweenTools, Field(discriminator="type")
]


class JsonOutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JsonOutputFormat | None = None


class Diagnostics(_Strict):
    previous_message_id: str | None = None


class _Prompted(_Strict):
    """Fields shared by ``/v1/messages`` and ``/v1/messages/count_tokens``."""

    model: str = Field(min_length=1, max_length=256)
    messages: list[InputMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[TextBlock] | None = None
    cache_control: CacheControl | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    speed: Literal["standard", "fast"] | None = None
    # Tools are not played by the simulator; their shape is the SDK's (many tool types).
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


class MessagesRequest(_Prompted):
    """A ``POST /v1/messages`` body under ``anthropic-version: 2026-10-21``."""

    max_tokens: int = Field(ge=0)
    stream: bool | None = None
    metadata: Metadata | None = None
    stop_sequences: list[str] | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    container: str | dict[str, Any] | None = None
    diagnostics: Diagnostics | None = None
    inference_geo: str | None = None


class MessagesRequest2023(MessagesRequest):
    """A ``POST /v1/messages`` body under ``anthropic-version: 2023-06-01``: sampling parameters too."""

    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)


class CountTokensRequest(_Prompted):
    """A ``POST /v1/messages/count_tokens`` body (no ``max_tokens``, ``stream``, ``metadata``...)."""


# --- the prompt as the simulator sees it ------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One block of the prompt, in the order the API reads it (system, then messages)."""

    role: str
    text: str
    tokens: int
    #: The block's ``cache_control`` TTL (``"5m"``/``"1h"``), or ``None`` for no breakpoint.
    cache_ttl: str | None
    #: Canonical JSON of the block, for cache keys.
    canonical: str


@dataclass(frozen=True)
class Prompt:
    """A validated request reduced to what the simulator uses."""

    model: str
    max_tokens: int
    stream: bool
    segments: tuple[Segment, ...]
    #: Hash of the tool definitions: the cache key's first part.
    tools_key: str
    #: TTL of the top-level ``cache_control`` (automatic caching), or ``None``.
    auto_cache_ttl: str | None
    #: Whether the answer starts with a thinking block; its budget (``None``: up to max_tokens).
    thinks: bool
    thinking_budget: int | None
    thinking_display: str
    effort: str | None

    @property
    def input_tokens(self) -> int:
        """Every input token: system and all messages."""
        return sum(s.tokens for s in self.segments)

    @property
    def user_text(self) -> str:
        """The user turns' text, joined by blank lines: what gets summarized."""
        return "\n\n".join(s.text for s in self.segments if s.role == "user")

    def breakpoints(self) -> list[tuple[int, str]]:
        """``(segment index, ttl)`` of every cache breakpoint, the automatic one included."""
        points = [(i, s.cache_ttl) for i, s in enumerate(self.segments) if s.cache_ttl is not None]
        if self.auto_cache_ttl is not None and self.segments:
            last = len(self.segments) - 1
            if not points or points[-1][0] != last:
                points.append((last, self.auto_cache_ttl))
        return points


def _error_text(exc: ValidationError) -> str:
    """The first validation error as ``"<dotted.path>: <message>"``, the API's wording."""
    errors = exc.errors()
    # An unknown field is the most useful thing to report, as the API does.
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"{loc}: {first['msg']}" if loc else str(first["msg"])


def _segments(body: _Prompted, version: str) -> tuple[Segment, ...]:
    segments: list[Segment] = []

    def add(role: str, block: TextBlock | DocumentBlock, where: str) -> None:
        text: str
        if isinstance(block, TextBlock):
            if not block.text:
                raise InvalidRequest(f"{where}: text content blocks must be non-empty")
            text = block.text
        else:
            text = block.source.data
            if not text:
                raise InvalidRequest(f"{where}.source.data: document content must be non-empty")
        ttl = block.cache_control.ttl if block.cache_control is not None else None
        canonical = json.dumps([role, block.model_dump(mode="json", by_alias=True)], sort_keys=True)
        segments.append(Segment(role, text, count_tokens(text), ttl, canonical))

    if isinstance(body.system, str):
        if body.system:
            segments.append(Segment("system", body.system, count_tokens(body.system), None, body.system))
    elif body.system is not None:
        for j, system_block in enumerate(body.system):
            add("system", system_block, f"system.{j}")

    last = len(body.messages) - 1
    for i, message in enumerate(body.messages):
        where = f"messages.{i}"
        if isinstance(message.content, str):
            if not message.content and not (message.role == "assistant" and i == last):
                raise InvalidRequest(
                    f"{where}: all messages must have non-empty content "
                    "except for the optional final assistant message"
                )
            canonical = json.dumps([message.role, message.content])
            tokens = count_tokens(message.content)
            segments.append(Segment(message.role, message.content, tokens, None, canonical))
            continue
        if not message.content and not (message.role == "assistant" and i == last):
            raise InvalidRequest(
                f"{where}: all messages must have non-empty content "
                "except for the optional final assistant message"
            )
        for j, block in enumerate(message.content):
            block_where = f"{where}.content.{j}"
            if version == VERSION_2026:
                # https://platform.claude.com/docs/en/api/versioning ("2026-10-21", Messages API)
                if message.role == "assistant" and isinstance(block, DocumentBlock):
                    raise InvalidRequest(
                        f"{block_where}: document blocks are not allowed in assistant messages "
                        f"(anthropic-version {VERSION_2026})"
                    )
                if message.role == "user" and isinstance(block, TextBlock) and block.citations:
                    raise InvalidRequest(
                        f"{block_where}.citations: citations are not allowed on text blocks in user "
                        f"messages (anthropic-version {VERSION_2026})"
                    )
            add(message.role, block, block_where)
    return tuple(segments)


def _check_cache_controls(segments: tuple[Segment, ...], auto_ttl: str | None) -> None:
    # https://platform.claude.com/docs/en/build-with-claude/prompt-caching
    # (at most 4 breakpoints; a longer TTL must come before a shorter one when they are mixed).
    ttls = [s.cache_ttl for s in segments if s.cache_ttl is not None]
    slots = len(ttls) + (1 if auto_ttl is not None else 0)
    if slots > MAX_CACHE_BREAKPOINTS:
        raise InvalidRequest(
            f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. Found {slots}."
        )
    if auto_ttl is not None:
        ttls.append(auto_ttl)
    for earlier, later in itertools.pairwise(ttls):
        if TTL_SECONDS[earlier] < TTL_SECONDS[later]:
            raise InvalidRequest(
                "cache_control: a ttl='1h' cache breakpoint must come before any ttl='5m' one"
            )


def _validate(cls: type[_Prompted], body: Any) -> Any:
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(_error_text(exc)) from None


def _check_sampling(body: MessagesRequest2023, thinks: bool) -> None:
    """Sampling parameter rules under 2023-06-01 (stricter: applied to every model)."""
    # https://platform.claude.com/docs/en/about-claude/models/migration-guide
    # (newer models take temperature or top_p, not both)
    if body.temperature is not None and body.top_p is not None:
        raise InvalidRequest(
            "`temperature` and `top_p` cannot both be specified for this model. Please use only one."
        )
    if not thinks:
        return
    # https://platform.claude.com/docs/en/build-with-claude/extended-thinking
    # (feature compatibility: thinking is not compatible with temperature/top_k modifications)
    if body.temperature is not None and body.temperature != 1:
        raise InvalidRequest("`temperature` may only be set to 1 when thinking is enabled.")
    if body.top_k is not None:
        raise InvalidRequest("`top_k` is not supported when thinking is enabled.")
    if body.top_p is not None and not 0.95 <= body.top_p <= 1:
        raise InvalidRequest("`top_p` must be between 0.95 and 1 when thinking is enabled.")


def _prompt(body: _Prompted, version: str, max_tokens: int, stream: bool, entry: ModelEntry | None) -> Prompt:
    segments = _segments(body, version)
    auto_ttl = body.cache_control.ttl if body.cache_control is not None else None
    _check_cache_controls(segments, auto_ttl)
    thinking = body.thinking
    if thinking is None:
        thinks = entry.thinks_by_default if entry is not None else False
    else:
        thinks = isinstance(thinking, ThinkingEnabled | ThinkingAdaptive)
    budget = thinking.budget_tokens if isinstance(thinking, ThinkingEnabled) else None
    display = "summarized"
    if isinstance(thinking, ThinkingEnabled | ThinkingAdaptive) and thinking.display is not None:
        display = thinking.display
    tools_key = hashlib.sha256(json.dumps(body.tools or [], sort_keys=True).encode()).hexdigest()
    effort = body.output_config.effort if body.output_config is not None else None
    return Prompt(
        model=body.model,
        max_tokens=max_tokens,
        stream=stream,
        segments=segments,
        tools_key=tools_key,
        auto_cache_ttl=auto_ttl,
        thinks=thinks,
        thinking_budget=budget,
        thinking_display=display,
        effort=effort,
    )


def parse_messages_request(body: Any, version: str, entry: ModelEntry | None = None) -> Prompt:
    """Validate a ``/v1/messages`` body under API ``version``; ``entry`` is the model, when known.

    Raises :class:`InvalidRequest` with the API's wording.
    """
    cls = MessagesRequest2023 if version == VERSION_2023 else MessagesRequest
    request: MessagesRequest = _validate(cls, body)
    prompt = _prompt(request, version, request.max_tokens, request.stream is True, entry)
    if isinstance(request.thinking, ThinkingEnabled) and request.thinking.budget_tokens >= request.max_tokens:
        # https://platform.claude.com/docs/en/build-with-claude/extended-thinking (budget < max_tokens)
        raise InvalidRequest("`max_tokens` must be greater than `thinking.budget_tokens`.")
    if isinstance(request, MessagesRequest2023):
        _check_sampling(request, prompt.thinks)
    return prompt


def parse_count_tokens_request(body: Any, version: str, entry: ModelEntry | None = None) -> Prompt:
    """Validate a ``/v1/messages/count_tokens`` body; raise :class:`InvalidRequest`."""
    request: CountTokensRequest = _validate(CountTokensRequest, body)
    return _prompt(request, version, 0, False, entry)


def peek_model(body: Any) -> str | None:
    """The ``model`` of a body not yet validated, when it has a string one (for response headers)."""
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        model: str = body["model"]
        return model
    return None


def check_against_model(prompt: Prompt, entry: ModelEntry, model_id: str) -> None:
    """The per-model rules: ``max_tokens``, effort, the context window. Raise :class:`InvalidRequest`."""
    # https://platform.claude.com/docs/en/api/messages (max_tokens: "Different models have different
    # maximum values for this parameter"); wording as the API sends it.
    if prompt.max_tokens > entry.max_tokens:
        raise InvalidRequest(
            f"max_tokens: {prompt.max_tokens} > {entry.max_tokens}, which is the maximum allowed "
            f"number of output tokens for {model_id}"
        )
    # https://platform.claude.com/docs/en/build-with-claude/effort (only models that support effort)
    if prompt.effort is not None and not entry.effort:
        raise InvalidRequest(f"output_config.effort: effort is not supported by {model_id}")
    # https://platform.claude.com/docs/en/build-with-claude/context-windows
    total = prompt.input_tokens
    if total > entry.max_input_tokens:
        raise InvalidRequest(f"prompt is too long: {total} tokens > {entry.max_input_tokens} maximum")
    if total + prompt.max_tokens > entry.max_input_tokens:
        raise InvalidRequest(
            f"input length and `max_tokens` exceed context limit: {total} + {prompt.max_tokens} > "
            f"{entry.max_input_tokens}, decrease input length or `max_tokens` and try again"
        )
