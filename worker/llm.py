"""The one place that talks to the Anthropic SDK: a client per process, one streamed call, error mapping.

The SDK's own retries are off (``max_retries=0``): Celery's ``Task.retry`` is the one retry loop,
because only it sees the job's deadline and frees the worker slot while backing off. Each call's
HTTP timeout is what is left of the job's deadline. Replies are read as the SDK's raw server-sent events
(``messages.with_raw_response.create(stream=True)`` and ``Stream.raw_events``), decoding only the
events a summary needs: ~35% less CPU per call than iterating the typed event stream, and ~2.4x
less than the ``messages.stream()`` helper (``python -m bench.sdk_clients``, ../shared/FINDINGS.md).
HTTP errors still arrive as the SDK's typed errors.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import anthropic
import httpx2

from worker.errors import (
    ConfigError,
    DeadlineExceededError,
    LLMError,
    OverloadedError,
    RateLimitedError,
    RequestRejectedError,
    StreamInterruptedError,
    UpstreamServerError,
    UpstreamUnavailableError,
)
from worker.settings import Settings, get_settings

__all__ = ["JOB_ID_HEADER", "LLMReply", "LLMRequest", "get_client", "map_sdk_error", "stream_reply"]

#: request header carrying the job id (the simulator counts calls per job with it)
JOB_ID_HEADER = "x-tierq-job-id"

_client: anthropic.Anthropic | None = None
_client_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class LLMRequest:
    """One call to make: what to send and for which job."""

    job_id: str
    model: str
    system: str
    prompt: str
    max_tokens: int
    #: None leaves the model's default; the SDK has no typed parameter, so it goes in ``extra_body``
    temperature: float | None


@dataclass(frozen=True, slots=True)
class LLMReply:
    """What came back, with ``time.perf_counter()`` marks of when."""

    text: str
    model: str
    stop_reason: str | None
    input_tokens: int
    output_tokens: int
    request_id: str | None
    sent_at: float
    first_token_at: float | None
    done_at: float
    #: ``time.time()`` as the request was sent, to set against the job's other wall-clock marks
    sent_wall: float


def get_client(settings: Settings | None = None) -> anthropic.Anthropic:
    """The process's SDK client, made on first use and shared by every thread of the pool."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                _client = _make_client(settings or get_settings())
    return _client


def _make_client(settings: Settings) -> anthropic.Anthropic:
    secret = settings.api_key()
    if secret is None and not settings.anthropic_base_url:
        raise ConfigError("set ANTHROPIC_API_KEY, or ANTHROPIC_BASE_URL to a simulator (`tierq sim`)")
    key = secret.get_secret_value() if secret is not None else "simulator"
    return anthropic.Anthropic(
        api_key=key,
        base_url=settings.anthropic_base_url,
        max_retries=0,
        timeout=anthropic.Timeout(60.0, connect=settings.connect_timeout_s),
    )


def stream_reply(
    client: anthropic.Anthropic,
    request: LLMRequest,
    deadline: float,
    on_text: Callable[[str], None] | None = None,
    connect_timeout_s: float = 5.0,
) -> LLMReply:
    """Stream one reply, giving up at ``deadline`` (a ``time.time()`` instant).

    Raises an :class:`~worker.errors.LLMError`; SDK errors never escape.
    """
    remaining = deadline - time.time()
    if remaining <= 0:
        raise DeadlineExceededError("deadline passed before the call to the model")
    timeout = anthropic.Timeout(remaining, connect=min(connect_timeout_s, remaining))
    parts: list[str] = []
    first_token_at: float | None = None
    request_id: str | None = None
    model, stop_reason, input_tokens, output_tokens = request.model, None, 0, 0
    sent_wall, sent_at = time.time(), time.perf_counter()
    try:
        raw = client.messages.with_raw_response.create(
            model=request.model,
            max_tokens=request.max_tokens,
            system=request.system,
            messages=[{"role": "user", "content": request.prompt}],
            stream=True,
            timeout=timeout,
            extra_headers={JOB_ID_HEADER: request.job_id},
            extra_body=None if request.temperature is None else {"temperature": request.temperature},
        )
        response = raw.http_response
        try:
            request_id = response.headers.get("request-id")
            for sse in anthropic.Stream.raw_events(response):
                kind = sse.event
                if kind == "content_block_delta":
                    delta = json.loads(sse.data)["delta"]
                    if delta.get("type") == "text_delta":
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        parts.append(delta["text"])
                        if on_text is not None:
                            on_text(delta["text"])
                elif kind == "message_start":
                    message = json.loads(sse.data)["message"]
                    model = message.get("model", model)
                    input_tokens = message["usage"]["input_tokens"]
                    output_tokens = message["usage"]["output_tokens"]
                elif kind == "message_delta":
                    data = json.loads(sse.data)
                    stop_reason = data["delta"].get("stop_reason")
                    output_tokens = data["usage"]["output_tokens"]
                elif kind == "error":
                    # an error event after HTTP 200: the SDK's own error type, mapped like any other
                    raise anthropic.APIStatusError(
                        f"error event in the stream: {sse.data}",
                        response=response,
                        body=_json_or_text(sse.data),
                    )
                if time.time() > deadline:
                    raise DeadlineExceededError("deadline passed while the reply was streaming")
        finally:
            response.close()
    except anthropic.APIError as exc:
        raise map_sdk_error(exc, produced_text=first_token_at is not None, deadline=deadline) from exc
    except (ValueError, KeyError, TypeError) as exc:
        # an event that is not the JSON the API documents
        label = f"malformed event from the API ({type(exc).__name__})"
        if first_token_at is not None:
            raise StreamInterruptedError(f"stream broke after text was produced: {label}") from exc
        raise UpstreamServerError(label) from exc
    except httpx2.TransportError as exc:
        # the SDK wraps transport errors of the request, not of a stream being read
        raise map_sdk_error(
            anthropic.APIConnectionError(message=f"{type(exc).__name__}: {exc}", request=exc.request),
            produced_text=first_token_at is not None,
            deadline=deadline,
        ) from exc
    return LLMReply(
        text="".join(parts),
        model=model,
        stop_reason=stop_reason,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        request_id=request_id,
        sent_at=sent_at,
        first_token_at=first_token_at,
        done_at=time.perf_counter(),
        sent_wall=sent_wall,
    )


def _json_or_text(data: str) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return data


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


def map_sdk_error(exc: anthropic.APIError, produced_text: bool, deadline: float | None = None) -> LLMError:
    """Map an SDK error into tierq's tree: retryable or permanent, with status and request id."""
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
    label = f"HTTP {status} {kind}".strip()
    if produced_text:
        return StreamInterruptedError(f"stream broke after text was produced: {label}", status, request_id)
    if status == 429 or kind == "rate_limit_error":
        return RateLimitedError(label, status, request_id, _retry_after(exc.response))
    if status == 529 or kind == "overloaded_error":
        return OverloadedError(label, status, request_id, _retry_after(exc.response))
    if status >= 500 or kind == "api_error":
        return UpstreamServerError(label, status, request_id, _retry_after(exc.response))
    if status in (408, 409):
        return UpstreamUnavailableError(label, status, request_id, _retry_after(exc.response))
    return RequestRejectedError(label, status, request_id)
