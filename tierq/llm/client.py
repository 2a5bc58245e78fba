"""The one place that talks to the Anthropic SDK: a client per process, one streamed call, error mapping.

The SDK's own retries are off (``max_retries=0``): Celery's ``Task.retry`` is the one retry loop,
because only it sees the job's deadline and frees the worker slot while backing off. Each call's
HTTP timeout is what is left of the job's deadline. Replies are read as the SDK's raw server-sent events
(``messages.with_raw_response.create(stream=True)`` and ``Stream.raw_events``), decoding only the
events a summary needs: ~35% less CPU per call than iterating the typed event stream, and ~2.4x
less than the ``messages.stream()`` helper (``python -m bench.sdk_clients``, ../shared/FINDINGS.md).
HTTP errors still arrive as the SDK's typed errors.

Two ways to make the call, chosen per tier (``Tier.io``): ``"asyncio"`` (the default) hands it to
the process's event loop (:mod:`tierq.llm.aioloop`) and ``AsyncAnthropic`` on the SDK's aiohttp
transport; ``"threads"`` reads the stream in the pool thread with the sync client. At 512 calls in
flight the first costs ~1.6 CPU-ms per call against ~5.0 (``python -m bench.sdk_clients``).
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import anthropic
import httpx2

from tierq.contract.errors import (
    CancelRequestedError,
    ConfigError,
    DeadlineExceededError,
    LLMError,
    OverloadedError,
    RateLimitedError,
    RequestRejectedError,
    SpendLimitError,
    StreamInterruptedError,
    UpstreamServerError,
    UpstreamUnavailableError,
)
from tierq.contract.result import Usage
from tierq.contract.tiers import Effort
from tierq.core.batching import TextBatcher
from tierq.core.cancel import CancelToken
from tierq.core.settings import Settings
from tierq.llm.aioloop import EventLoopThread
from tierq.observe.logging import get_logger

if TYPE_CHECKING:
    from anthropic._streaming import ServerSentEvent

__all__ = [
    "EPHEMERAL",
    "JOB_ID_HEADER",
    "LLM",
    "LLMReply",
    "LLMRequest",
    "astream_reply",
    "make_async_client",
    "make_client",
    "map_sdk_error",
    "message_params",
    "stream_reply",
    "stream_reply_on_loop",
]

#: request header carrying the job id (the simulator counts calls per job with it)
JOB_ID_HEADER = "x-tierq-job-id"

#: connections kept per process (the SDK's default keeps 100 idle: more calls in flight reconnect)
_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=1000)
#: seconds a pool thread waits for the loop past the call's own timeouts
_LOOP_GRACE_S = 5.0
#: characters of the API's error message (or a refusal's explanation) kept in errors and results
MAX_API_MESSAGE_CHARS = 300
#: response header by which the API says whether a retry can succeed
SHOULD_RETRY_HEADER = "x-should-retry"
#: the API's rate-limit headers (https://platform.claude.com/docs/en/api/rate-limits)
RATE_LIMIT_HEADER_PREFIX = "anthropic-ratelimit-"
_log = get_logger("tierq.llm")

#: ``error.details.error_code`` of a 429 that no retry can fix: the organisation's spend limit
SPEND_LIMIT_CODE = "enforced_spend_limit_reached"


@dataclass(frozen=True, slots=True)
class LLMRequest:
    """One call to make: what to send and for which job."""

    job_id: str
    model: str
    system: str
    #: the user turn after its instructions (the document); all of it when ``instructions`` is ""
    prompt: str
    max_tokens: int
    #: ``output_config.effort``; None leaves the model's default (no sampling parameters: API
    #: 2026-10-21 rejects them)
    effort: Effort | None = None
    #: the prompt's input tokens as the API counted them (``TIERQ_COUNT_TOKENS``); None: not counted
    input_tokens: int | None = None
    #: the user turn's opening instructions: with the system prompt, a prefix jobs share
    instructions: str = ""
    #: prompt-cache breakpoints (``cache_control``) at the end of the system prompt and at the end
    #: of the instructions (see :mod:`tierq.llm.caching`)
    cache_system: bool = False
    cache_instructions: bool = False

    @property
    def user_text(self) -> str:
        """The whole user turn."""
        return f"{self.instructions}\n\n{self.prompt}" if self.instructions else self.prompt

    @property
    def user_chars(self) -> int:
        """Characters of the whole user turn (without joining a large document into a new string)."""
        return len(self.instructions) + 2 + len(self.prompt) if self.instructions else len(self.prompt)


#: a 5-minute prompt-cache breakpoint (https://platform.claude.com/docs/en/build-with-claude/prompt-caching)
EPHEMERAL: dict[str, str] = {"type": "ephemeral"}


def message_params(request: LLMRequest) -> dict[str, Any]:
    """The request's ``system`` and ``messages``, with its cache breakpoints: the same for a streamed
    call, a token count and a batch request."""
    system: str | list[dict[str, Any]] = request.system
    if request.cache_system and request.system:
        system = [{"type": "text", "text": request.system, "cache_control": EPHEMERAL}]
    content: str | list[dict[str, Any]] = request.user_text
    if request.cache_instructions and request.instructions:
        content = [
            {"type": "text", "text": request.instructions, "cache_control": EPHEMERAL},
            {"type": "text", "text": request.prompt},
        ]
    return {"system": system, "messages": [{"role": "user", "content": content}]}


@dataclass(frozen=True, slots=True)
class LLMReply:
    """What came back, with ``time.perf_counter()`` marks of when."""

    text: str
    model: str
    stop_reason: str | None
    usage: Usage
    request_id: str | None
    sent_at: float
    first_token_at: float | None
    done_at: float
    #: ``time.time()`` as the request was sent, to set against the job's other wall-clock marks
    sent_wall: float
    #: ``stop_details`` of a refusal: its ``category`` and ``explanation`` (each may be None)
    refusal: tuple[str | None, str | None] | None = None
    #: the response's ``anthropic-ratelimit-*`` headers (what the API says is left of each limit)
    rate_limits: Mapping[str, str] = field(default_factory=dict)


def _api_key(settings: Settings) -> str:
    secret = settings.api_key()
    if secret is None and not settings.anthropic_base_url:
        raise ConfigError("set ANTHROPIC_API_KEY, or ANTHROPIC_BASE_URL to a simulator (`tierq sim`)")
    return secret.get_secret_value() if secret is not None else "simulator"


def _options(settings: Settings) -> dict[str, Any]:
    """What both clients share: the key, the base URL, no SDK retries (Celery's are the one loop)."""
    return {
        "api_key": _api_key(settings),
        "base_url": settings.anthropic_base_url,
        "max_retries": 0,
        "timeout": anthropic.Timeout(60.0, connect=settings.connect_timeout_s),
    }


def make_client(settings: Settings) -> anthropic.Anthropic:
    """A sync SDK client for ``settings``, with tierq's connection pool size."""
    # the SDK keeps 100 idle connections by default: a pool of more threads would reconnect
    return anthropic.Anthropic(**_options(settings), http_client=anthropic.DefaultHttpxClient(limits=_LIMITS))


def make_async_client(settings: Settings) -> anthropic.AsyncAnthropic:
    """The same as :func:`make_client`, async, on the SDK's aiohttp transport."""
    return anthropic.AsyncAnthropic(
        **_options(settings), http_client=anthropic.DefaultAioHttpClient(limits=_LIMITS)
    )


class _ReplyReader:
    """Folds a reply's server-sent events into an :class:`LLMReply` (for the sync and async paths)."""

    def __init__(
        self,
        request: LLMRequest,
        deadline: float,
        on_text: Callable[[str], None] | None,
        cancel: CancelToken | None = None,
    ) -> None:
        self.deadline = deadline
        self.on_text = on_text
        self.cancel = cancel
        self.parts: list[str] = []
        self.first_token_at: float | None = None
        self.request_id: str | None = None
        self.response: httpx2.Response | None = None
        self.model, self.stop_reason = request.model, None
        self.refusal: tuple[str | None, str | None] | None = None
        #: the reply's usage so far: from ``message_start``, then each (cumulative) ``message_delta``
        self.usage: dict[str, Any] = {}
        self.sent_wall, self.sent_at = time.time(), time.perf_counter()

    def start(self, response: httpx2.Response) -> None:
        self.response = response
        self.request_id = response.headers.get("request-id")

    def feed(self, sse: ServerSentEvent) -> None:
        """Fold one event in; event and block types this reader does not know are skipped, as the
        API reference asks (https://platform.claude.com/docs/en/build-with-claude/streaming)."""
        if self.cancel is not None and self.cancel.cancelled:
            raise CancelRequestedError("cancelled by its producer while the model was replying")
        kind = sse.event
        if kind == "content_block_delta":
            delta = json.loads(sse.data)["delta"]
            # text only: thinking, signature and unknown block types' deltas are not the summary
            if delta.get("type") == "text_delta":
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.parts.append(delta["text"])
                if self.on_text is not None:
                    self.on_text(delta["text"])
        elif kind == "message_start":
            message = json.loads(sse.data)["message"]
            self.model = message.get("model", self.model)
            self._usage(message.get("usage"))
        elif kind == "message_delta":
            data = json.loads(sse.data)
            self.stop_reason = data["delta"].get("stop_reason")
            details = data["delta"].get("stop_details")
            if self.stop_reason == "refusal":
                details = details if isinstance(details, dict) else {}
                self.refusal = (
                    _str_or_none(details.get("category")),
                    _str_or_none(details.get("explanation")),
                )
            self._usage(data.get("usage"))
        elif kind == "error":
            # an error event after HTTP 200: the SDK's own error type, mapped like any other
            assert self.response is not None
            raise anthropic.APIStatusError(
                f"error event in the stream: {sse.data}", response=self.response, body=_json_or_text(sse.data)
            )
        if time.time() > self.deadline:
            raise DeadlineExceededError("deadline passed while the reply was streaming")

    def _usage(self, usage: object) -> None:
        """Take the fields a usage object reports (``message_delta``'s are cumulative; nulls are unset)."""
        if isinstance(usage, dict):
            self.usage.update({k: v for k, v in usage.items() if v is not None})

    @contextmanager
    def mapping_errors(self) -> Iterator[None]:
        """Raise an :class:`~tierq.contract.errors.LLMError` for whatever the SDK or the stream raises."""
        try:
            yield
        except anthropic.APIError as exc:
            produced = self.first_token_at is not None
            raise map_sdk_error(exc, produced_text=produced, deadline=self.deadline) from exc
        except (ValueError, KeyError, TypeError) as exc:
            # an event that is not the JSON the API documents
            label = f"malformed event from the API ({type(exc).__name__})"
            if self.first_token_at is not None:
                raise StreamInterruptedError(f"stream broke after text was produced: {label}") from exc
            raise UpstreamServerError(label) from exc
        except (httpx2.TransportError, aiohttp.ClientError) as exc:
            # the SDK wraps transport errors of the request, not of a stream being read
            request = _transport_request(exc)
            raise map_sdk_error(
                anthropic.APIConnectionError(message=f"{type(exc).__name__}: {exc}", request=request),  # type: ignore[arg-type]
                produced_text=self.first_token_at is not None,
                deadline=self.deadline,
            ) from exc

    def reply(self) -> LLMReply:
        return LLMReply(
            text="".join(self.parts),
            model=self.model,
            stop_reason=self.stop_reason,
            usage=Usage.from_api(self.usage),
            request_id=self.request_id,
            sent_at=self.sent_at,
            first_token_at=self.first_token_at,
            done_at=time.perf_counter(),
            sent_wall=self.sent_wall,
            refusal=self.refusal,
            rate_limits=rate_limit_headers(self.response.headers if self.response is not None else None),
        )


def _create_args(request: LLMRequest, deadline: float, connect_timeout_s: float) -> dict[str, Any]:
    remaining = deadline - time.time()
    if remaining <= 0:
        raise DeadlineExceededError("deadline passed before the call to the model")
    return {
        "model": request.model,
        "max_tokens": request.max_tokens,
        **message_params(request),
        "stream": True,
        "timeout": anthropic.Timeout(remaining, connect=min(connect_timeout_s, remaining)),
        "extra_headers": {JOB_ID_HEADER: request.job_id},
        **({} if request.effort is None else {"output_config": {"effort": request.effort}}),
    }


def stream_reply(
    client: anthropic.Anthropic,
    request: LLMRequest,
    deadline: float,
    on_text: Callable[[str], None] | None = None,
    connect_timeout_s: float = 5.0,
    cancel: CancelToken | None = None,
) -> LLMReply:
    """Stream one reply in this thread, giving up at ``deadline`` (a ``time.time()`` instant).

    Raises an :class:`~tierq.contract.errors.LLMError`; SDK errors never escape.
    """
    args = _create_args(request, deadline, connect_timeout_s)
    reader = _ReplyReader(request, deadline, on_text, cancel)
    with reader.mapping_errors():
        response = client.messages.with_raw_response.create(**args).http_response
        try:
            reader.start(response)
            for sse in anthropic.Stream.raw_events(response):
                reader.feed(sse)
        finally:
            response.close()
    return reader.reply()


async def astream_reply(
    client: anthropic.AsyncAnthropic,
    request: LLMRequest,
    deadline: float,
    on_text: Callable[[str], None] | None = None,
    connect_timeout_s: float = 5.0,
) -> LLMReply:
    """:func:`stream_reply` on an event loop, with ``AsyncAnthropic``."""
    args = _create_args(request, deadline, connect_timeout_s)
    reader = _ReplyReader(request, deadline, on_text)
    with reader.mapping_errors():
        response = (await client.messages.with_raw_response.create(**args)).http_response
        try:
            reader.start(response)
            async for sse in anthropic.AsyncStream.raw_events(response):
                reader.feed(sse)
        finally:
            await response.aclose()
    return reader.reply()


#: what :meth:`_TextHandoff.cancel` hands over: a string no reply's text can be (it is compared by identity)
_CANCELLED = str(object())


class _TextHandoff:
    """Texts from the event loop to the thread waiting on the call, joined by a :class:`TextBatcher`
    (each hand-off wakes that thread: one per delta cost ~3 CPU-ms a job), then ``None`` at the end."""

    def __init__(self, gather_s: float) -> None:
        self.texts: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._batcher = TextBatcher(gather_s)

    def put(self, text: str) -> None:
        """On the loop: one delta."""
        self._hand_over(self._batcher.add(text))

    def cancel(self) -> None:
        """From any thread: wake the waiting thread with the cancel mark."""
        self.texts.put_nowait(_CANCELLED)

    def close(self, _: object = None) -> None:
        """On the loop, after the call's last delta: what is held, then the end."""
        self._hand_over(self._batcher.drain())
        self.texts.put_nowait(None)

    def _hand_over(self, text: str | None) -> None:
        if text:
            self.texts.put_nowait(text)


def stream_reply_on_loop(
    client: anthropic.AsyncAnthropic,
    loop: EventLoopThread,
    request: LLMRequest,
    deadline: float,
    on_text: Callable[[str], None] | None = None,
    connect_timeout_s: float = 5.0,
    gather_s: float = 0.0,
    cancel: CancelToken | None = None,
) -> LLMReply:
    """:func:`astream_reply` on ``loop`` (an :class:`~tierq.llm.aioloop.EventLoopThread`), waited for here.

    ``on_text`` runs in this (the calling) thread, never on the loop: what it does (a Redis write
    for a streamed job) must not hold up every other call the loop is reading. It gets the first
    text as soon as it arrives, then the texts gathered every ``gather_s`` seconds, joined.
    ``cancel`` wakes the waiting thread at once, and the call on the loop is cancelled.
    """
    handoff = _TextHandoff(gather_s)
    put = None if on_text is None else handoff.put
    call = astream_reply(client, request, deadline, put, connect_timeout_s)
    future = loop.submit(call)
    future.add_done_callback(handoff.close)  # runs on the loop, after the call's last text
    if cancel is not None:
        cancel.on_cancel(handoff.cancel)
    # the reply's own timeouts end it first; this only keeps a thread from waiting on a lost loop
    end = time.monotonic() + max(0.0, deadline - time.time()) + connect_timeout_s + _LOOP_GRACE_S
    while True:
        try:
            text = handoff.texts.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            future.cancel()
            raise DeadlineExceededError("deadline passed waiting for the event loop") from None
        if text is None:
            return future.result()
        if text is _CANCELLED:
            future.cancel()
            raise CancelRequestedError("cancelled by its producer while the model was replying")
        if on_text is not None:
            on_text(text)


class LLM:
    """A worker process's way to the model: both SDK clients and the event loop, built once.

    ``call`` makes one streamed call the way the tier says (``io``): on the event loop with
    ``AsyncAnthropic`` over aiohttp, or in the calling thread with the sync client.
    """

    def __init__(self, settings: Settings) -> None:
        self.connect_timeout_s = settings.connect_timeout_s
        self.client = make_client(settings)
        self.async_client = make_async_client(settings)
        self.loop = EventLoopThread()
        self.loop.on_shutdown(self.async_client.close)

    def call(
        self,
        request: LLMRequest,
        deadline: float,
        io: str,
        on_text: Callable[[str], None] | None = None,
        gather_s: float = 0.0,
        cancel: CancelToken | None = None,
    ) -> LLMReply:
        """Stream one reply, giving up at ``deadline`` (or when ``cancel`` is set: CancelRequestedError);
        raises an :class:`~tierq.contract.errors.LLMError`."""
        if io == "asyncio":
            return stream_reply_on_loop(
                self.async_client,
                self.loop,
                request,
                deadline,
                on_text,
                self.connect_timeout_s,
                gather_s,
                cancel,
            )
        return stream_reply(self.client, request, deadline, on_text, self.connect_timeout_s, cancel)

    def count_input_tokens(self, request: LLMRequest, timeout_s: float) -> int | None:
        """The request's input tokens as the API counts them (``POST /v1/messages/count_tokens``,
        https://platform.claude.com/docs/en/api/messages-count-tokens); None when it did not answer
        in ``timeout_s`` or refused (the caller estimates instead)."""
        try:
            counted = self.client.messages.count_tokens(
                model=request.model,
                **message_params(request),
                timeout=anthropic.Timeout(timeout_s, connect=min(self.connect_timeout_s, timeout_s)),
                extra_headers={JOB_ID_HEADER: request.job_id},
            )
        except anthropic.APIError as exc:
            _log.warning("llm.count_tokens_failed", model=request.model, error=str(exc)[:200])
            return None
        return counted.input_tokens

    def close(self) -> None:
        """Close the async client on the loop, stop the loop, close the sync client."""
        self.loop.shutdown()
        self.client.close()


def _transport_request(exc: BaseException) -> httpx2.Request | None:
    """The request a transport error carries (httpx raises RuntimeError when it was raised without one)."""
    if not isinstance(exc, httpx2.TransportError):
        return None
    try:
        return exc.request
    except RuntimeError:
        return None


def _json_or_text(data: str) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return data


def rate_limit_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The ``anthropic-ratelimit-*`` headers of a response, names in lower case."""
    if headers is None:
        return {}
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(RATE_LIMIT_HEADER_PREFIX)}


def _retry_after(response: object) -> float | None:
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue  # an HTTP date: fall back to our own backoff
    return None


def _api_label(exc: anthropic.APIStatusError) -> str:
    """``HTTP <status> <error.type>: <error.message>``, the message bounded (never document text:
    the API's messages name fields and limits, not content)."""
    kind = exc.type or ""
    label = f"HTTP {exc.status_code} {kind}".strip()
    message = exc.api_message
    if isinstance(message, str) and message:
        cut = message if len(message) <= MAX_API_MESSAGE_CHARS else message[:MAX_API_MESSAGE_CHARS] + "…"
        label = f"{label}: {cut}"
    return label


def map_sdk_error(exc: anthropic.APIError, produced_text: bool, deadline: float | None = None) -> LLMError:
    """Map an SDK error into tierq's tree: retryable or permanent, with status, request id and the
    API's own error type and message."""
    if isinstance(exc, anthropic.APIConnectionError):  # includes APITimeoutError
        if deadline is not None and time.time() >= deadline:
            return DeadlineExceededError(f"deadline passed waiting for the model ({type(exc).__name__})")
        if produced_text:
            return StreamInterruptedError(f"stream broke after text was produced: {type(exc).__name__}")
        return UpstreamUnavailableError(f"{type(exc).__name__}: {exc.message}")
    if not isinstance(exc, anthropic.APIStatusError):
        return RequestRejectedError(f"{type(exc).__name__}: {exc.message}")
    status, request_id = exc.status_code, exc.request_id
    # an `error` event inside a 200 stream carries its kind only in the body
    kind = exc.type or ""
    label = _api_label(exc)
    if exc.error_code == SPEND_LIMIT_CODE:
        return SpendLimitError(label, status, request_id)
    if produced_text:
        return StreamInterruptedError(f"stream broke after text was produced: {label}", status, request_id)
    # the API's own word on whether a retry can help (https://platform.claude.com/docs/en/api/errors)
    if exc.response.headers.get(SHOULD_RETRY_HEADER) == "false":
        return RequestRejectedError(f"{label} ({SHOULD_RETRY_HEADER}: false)", status, request_id)
    if status == 429 or kind == "rate_limit_error":
        return RateLimitedError(label, status, request_id, _retry_after(exc.response))
    if status == 529 or kind == "overloaded_error":
        return OverloadedError(label, status, request_id, _retry_after(exc.response))
    if status >= 500 or kind == "api_error":
        return UpstreamServerError(label, status, request_id, _retry_after(exc.response))
    if status in (408, 409):
        return UpstreamUnavailableError(label, status, request_id, _retry_after(exc.response))
    return RequestRejectedError(label, status, request_id)


def _str_or_none(value: object, limit: int = MAX_API_MESSAGE_CHARS) -> str | None:
    return value[:limit] if isinstance(value, str) else None
