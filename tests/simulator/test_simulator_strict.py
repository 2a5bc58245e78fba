"""The simulator is as strict as the real API: versions, request fields, models, limits, headers, sizes.

Everything goes through the real SDK over HTTP (or plain httpx2 where the SDK cannot send the
request in question, e.g. without an ``anthropic-version`` header); nothing is patched.
"""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types import message_count_tokens_params, message_create_params

from tests.helpers import SIM_TODAY
from tierq.sim import SimConfig, SimServer
from tierq.sim.catalogue import Catalogue, CatalogueError, load_catalogue
from tierq.sim.validation import CountTokensRequest, MessagesRequest, MessagesRequest2023

MODEL = "claude-haiku-4-5"
DOC = (
    "Tierq runs Celery workers that summarize documents with Claude. "
    "Each tier has its own worker pool, so slow jobs never block fast ones. "
    "The fast tier uses Haiku because its time to first token is short. "
    "Redis is the broker and keeps the queues for every tier."
)
MESSAGES: list[Any] = [{"role": "user", "content": DOC}]
OLD = {"anthropic-version": "2023-06-01"}
RATE_HEADERS = [
    f"anthropic-ratelimit-{kind}-{part}"
    for kind in ("requests", "input-tokens", "output-tokens", "tokens")
    for part in ("limit", "remaining", "reset")
]


@pytest.fixture(scope="module")
def sim_config() -> SimConfig:
    return SimConfig(time_scale=0, seed=7, today=SIM_TODAY)


@pytest.fixture(scope="module")
def old_client(sim: SimServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key="sim-key", base_url=sim.url, max_retries=0, default_headers=OLD) as c:
        yield c


def create(client: anthropic.Anthropic, **kwargs: Any) -> anthropic.types.Message:
    params: dict[str, Any] = {"model": MODEL, "max_tokens": 200, "messages": MESSAGES, **kwargs}
    message: anthropic.types.Message = client.messages.create(**params)
    return message


def bad_request(client: anthropic.Anthropic, **kwargs: Any) -> str:
    """Send a request that must be refused with 400; return the API's message."""
    with pytest.raises(anthropic.BadRequestError) as info:
        create(client, **kwargs)
    body: Any = info.value.body
    assert body["error"]["type"] == "invalid_request_error"
    message: str = body["error"]["message"]
    return message


def raw_post(sim: SimServer, path: str, body: bytes, headers: dict[str, str]) -> httpx2.Response:
    return httpx2.post(sim.url + path, content=body, headers={"content-type": "application/json", **headers})


# --- the request schema is the SDK's --------------------------------------------------------------


def _keys(typed_dict: Any) -> set[str]:
    return set(typed_dict.__required_keys__) | set(typed_dict.__optional_keys__)


def test_request_fields_are_exactly_the_sdks() -> None:
    sdk_create = _keys(message_create_params.MessageCreateParamsNonStreaming)
    assert set(MessagesRequest.model_fields) == sdk_create
    assert set(MessagesRequest2023.model_fields) - sdk_create == {"temperature", "top_p", "top_k"}
    sdk_count = _keys(message_count_tokens_params.MessageCountTokensParams)
    assert set(CountTokensRequest.model_fields) == sdk_count


# --- anthropic-version ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", 1.0), ("temperature", 0.2), ("top_p", 1.0), ("top_k", 5)]
)
def test_sampling_parameters_are_refused_under_2026_10_21(
    client: anthropic.Anthropic, field: str, value: float
) -> None:
    assert bad_request(client, extra_body={field: value}) == f"{field}: Extra inputs are not permitted"


def test_sampling_parameters_are_accepted_under_2023_06_01(old_client: anthropic.Anthropic) -> None:
    assert create(old_client, extra_body={"temperature": 0.2}).stop_reason == "end_turn"
    assert create(old_client, extra_body={"top_p": 0.9, "top_k": 40}).stop_reason == "end_turn"
    assert "temperature" in bad_request(old_client, extra_body={"temperature": 1.5})
    assert "top_p" in bad_request(old_client, extra_body={"temperature": 0.5, "top_p": 0.5})
    # a model that thinks by default takes only temperature 1
    message = bad_request(old_client, model="claude-opus-5", extra_body={"temperature": 0.5})
    assert "thinking" in message


@pytest.mark.parametrize("headers", [{}, OLD])
def test_unknown_fields_are_refused_under_both_versions(sim: SimServer, headers: dict[str, str]) -> None:
    with anthropic.Anthropic(api_key="k", base_url=sim.url, max_retries=0, default_headers=headers) as c:
        assert bad_request(c, extra_body={"priority": "high"}) == "priority: Extra inputs are not permitted"
        message = bad_request(c, metadata={"user_id": "u", "team": "x"})
        assert message == "metadata.team: Extra inputs are not permitted"


def test_missing_or_unknown_version_is_refused(sim: SimServer) -> None:
    body = json.dumps({"model": MODEL, "max_tokens": 10, "messages": MESSAGES}).encode()
    missing = raw_post(sim, "/v1/messages", body, {})
    assert missing.status_code == 400
    assert missing.json()["error"] == {
        "type": "invalid_request_error",
        "message": "anthropic-version: header is required",
    }
    with anthropic.Anthropic(
        api_key="k", base_url=sim.url, max_retries=0, default_headers={"anthropic-version": "2024-01-01"}
    ) as c:
        assert "anthropic-version" in bad_request(c)
        with pytest.raises(anthropic.BadRequestError):
            c.models.list()
    assert raw_post(sim, "/v1/messages", body, OLD).status_code == 200


def test_documents_in_assistant_turns_and_user_citations_only_under_2023(
    client: anthropic.Anthropic, old_client: anthropic.Anthropic
) -> None:
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": DOC}}
    with_document: list[Any] = [
        {"role": "user", "content": "Summarize what you said."},
        {"role": "assistant", "content": [document]},
        {"role": "user", "content": "Now, please."},
    ]
    assert "assistant" in bad_request(client, messages=with_document)
    assert create(old_client, messages=with_document).stop_reason == "end_turn"
    citation = {
        "type": "char_location",
        "cited_text": "Tierq",
        "document_index": 0,
        "document_title": None,
        "start_char_index": 0,
        "end_char_index": 5,
    }
    cited: list[Any] = [{"role": "user", "content": [{"type": "text", "text": DOC, "citations": [citation]}]}]
    assert "citations" in bad_request(client, messages=cited)
    assert create(old_client, messages=cited).stop_reason == "end_turn"
    # an empty citations list is not "citations"
    empty: list[Any] = [{"role": "user", "content": [{"type": "text", "text": DOC, "citations": []}]}]
    assert create(client, messages=empty).stop_reason == "end_turn"


# --- models -------------------------------------------------------------------------------------------


def test_unknown_and_retired_models_are_404(client: anthropic.Anthropic) -> None:
    for model in ("claude-nonexistent-9", "claude-opus-4-20250514"):
        with pytest.raises(anthropic.NotFoundError) as info:
            create(client, model=model)
        body: Any = info.value.body
        assert body["error"] == {"type": "not_found_error", "message": f"model: {model}"}
        with pytest.raises(anthropic.NotFoundError):
            client.messages.count_tokens(model=model, messages=MESSAGES)
    # past its retirement date (2026-11-30) a model 404s, as of the simulator's day, whatever the
    # installed SDK's own table says (it may or may not warn: an SDK detail, not judged here)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(anthropic.NotFoundError):
            create(client, model="claude-sonnet-4-5")
        # deprecated, not yet retired: still runs
        assert create(client, model="claude-opus-4-5").stop_reason == "end_turn"
    # an alias runs its model
    assert create(client, model="claude-haiku-4-5-20251001").stop_reason == "end_turn"


def test_max_tokens_is_bounded_by_the_model(client: anthropic.Anthropic) -> None:
    # an explicit timeout: the SDK refuses non-streaming requests this large before sending them
    assert bad_request(client, max_tokens=64_001, timeout=30) == (
        "max_tokens: 64001 > 64000, which is the maximum allowed number of output tokens for claude-haiku-4-5"
    )
    with client.messages.stream(model=MODEL, max_tokens=64_000, messages=MESSAGES) as at_limit:
        assert at_limit.get_final_message().stop_reason == "end_turn"
    empty = create(client, max_tokens=0)
    assert (empty.content, empty.stop_reason, empty.usage.output_tokens) == ([], "max_tokens", 0)
    assert empty.usage.input_tokens > 0


def test_context_window(client: anthropic.Anthropic) -> None:
    too_long: list[Any] = [{"role": "user", "content": "word " * 200_001}]
    assert bad_request(client, messages=too_long, max_tokens=1) == (
        "prompt is too long: 200001 tokens > 200000 maximum"
    )
    near: list[Any] = [{"role": "user", "content": "word " * 199_000}]
    assert bad_request(client, messages=near, max_tokens=2000) == (
        "input length and `max_tokens` exceed context limit: 199000 + 2000 > 200000, "
        "decrease input length or `max_tokens` and try again"
    )


def test_effort_only_where_the_model_takes_it(client: anthropic.Anthropic) -> None:
    assert "effort" in bad_request(client, output_config={"effort": "low"})
    assert (
        create(client, model="claude-sonnet-4-6", output_config={"effort": "low"}).stop_reason == "end_turn"
    )
    assert "effort" in bad_request(client, model="claude-sonnet-4-6", output_config={"effort": "extreme"})


def test_thinking_budget_rules(client: anthropic.Anthropic) -> None:
    assert "budget_tokens" in bad_request(client, thinking={"type": "enabled", "budget_tokens": 1000})
    assert "max_tokens" in bad_request(
        client, max_tokens=1500, thinking={"type": "enabled", "budget_tokens": 2000}
    )


def test_cache_control_limits(client: anthropic.Anthropic) -> None:
    five = [{"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral"}} for i in range(5)]
    assert "maximum of 4" in bad_request(client, messages=[{"role": "user", "content": five}])
    mixed: list[Any] = [
        {"type": "text", "text": "first", "cache_control": {"type": "ephemeral", "ttl": "5m"}},
        {"type": "text", "text": "second", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
    ]
    assert "1h" in bad_request(client, messages=[{"role": "user", "content": mixed}])


def test_models_api_lists_and_retrieves_the_catalogue(client: anthropic.Anthropic) -> None:
    catalogue = load_catalogue()
    expected = [m.id for m in catalogue.models()]
    listed = [m.id for m in client.models.list(limit=5)]  # auto-pagination over after_id
    assert listed == expected
    assert all(m.alias_of is None for m in catalogue.models())
    page = client.models.list(limit=3)
    assert (page.first_id, page.last_id, page.has_more) == (expected[0], expected[2], True)
    before = client.models.list(before_id=expected[4], limit=2)
    assert [m.id for m in before.data] == expected[2:4]
    assert before.has_more is True
    info = client.models.retrieve("claude-haiku-4-5-20251001")
    assert (info.id, info.lifecycle, info.max_tokens, info.max_input_tokens) == (
        MODEL,
        "active",
        64_000,
        200_000,
    )
    retired = client.models.retrieve("claude-opus-4-20250514")
    assert retired.lifecycle == "retired"
    deprecated = client.models.retrieve("claude-opus-4-5")
    assert deprecated.lifecycle == "deprecated"
    assert deprecated.retires_at is not None
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("claude-nonexistent-9")
    with pytest.raises(anthropic.BadRequestError):
        client.models.list(limit=0)


# --- headers, request ids, retry hints ------------------------------------------------------------------


def _check_headers(response: httpx2.Response, *, should_retry: str | None) -> None:
    for name in RATE_HEADERS:
        assert name in response.headers, name
    request_id = response.headers["request-id"]
    assert request_id.startswith("req_sim_")
    if should_retry is None:
        assert "x-should-retry" not in response.headers
    else:
        assert response.headers["x-should-retry"] == should_retry
        assert response.json()["request_id"] == request_id


def test_headers_on_every_response(sim: SimServer, client: anthropic.Anthropic) -> None:
    ok = client.messages.with_raw_response.create(model=MODEL, max_tokens=20, messages=MESSAGES)
    _check_headers(ok.http_response, should_retry=None)
    with client.messages.with_streaming_response.create(
        model=MODEL, max_tokens=20, messages=MESSAGES, stream=True
    ) as streamed:
        _check_headers(streamed.http_response, should_retry=None)
        streamed.read()
    counted = client.messages.with_raw_response.count_tokens(model=MODEL, messages=MESSAGES)
    _check_headers(counted.http_response, should_retry=None)
    errors: list[tuple[dict[str, Any], dict[str, str], int, str]] = [
        ({"extra_body": {"temperature": 1}}, {}, 400, "false"),
        ({"model": "claude-nonexistent-9"}, {}, 404, "false"),
        ({}, {"x-sim-fault": "529"}, 529, "true"),
        ({}, {"x-sim-fault": "500"}, 500, "true"),
        ({}, {"x-sim-fault": "429:2"}, 429, "true"),
        ({}, {"x-sim-fault": "401"}, 401, "false"),
    ]
    for params, headers, status, retry in errors:
        with pytest.raises(anthropic.APIStatusError) as info:
            create(client, extra_headers=headers, **params)
        assert info.value.status_code == status
        _check_headers(info.value.response, should_retry=retry)
        assert info.value.request_id == info.value.response.headers["request-id"]
    limited = httpx2.post(sim.url + "/v1/messages", json={}, headers={"x-sim-fault": "429:2", **OLD})
    assert limited.headers["retry-after"] == "2"
    assert limited.headers["anthropic-ratelimit-requests-remaining"] == "0"
    unknown = httpx2.get(sim.url + "/v1/nothing-here", headers=OLD)
    assert unknown.status_code == 404
    _check_headers(unknown, should_retry="false")
    models = client.models.with_raw_response.list()
    _check_headers(models.http_response, should_retry=None)


def test_api_key_as_bearer_or_x_api_key() -> None:
    body = json.dumps({"model": MODEL, "max_tokens": 10, "messages": MESSAGES}).encode()
    with SimServer(SimConfig(time_scale=0, require_api_key=True)) as locked:
        assert raw_post(locked, "/v1/messages", body, OLD).status_code == 401
        assert (
            raw_post(locked, "/v1/messages", body, {**OLD, "authorization": "Basic a2V5"}).status_code == 401
        )
        assert raw_post(locked, "/v1/messages", body, {**OLD, "x-api-key": "k"}).status_code == 200
        assert raw_post(locked, "/v1/messages", body, {**OLD, "authorization": "Bearer k"}).status_code == 200
        with anthropic.Anthropic(api_key="sim-key", base_url=locked.url, max_retries=0) as c:
            assert create(c).stop_reason == "end_turn"  # the SDK sends Authorization: Bearer


# --- 413 -------------------------------------------------------------------------------------------------


def test_bodies_over_32_mb_are_413(sim: SimServer, client: anthropic.Anthropic) -> None:
    huge = "x" * 32_000_001
    with pytest.raises(anthropic.APIStatusError) as info:
        create(client, messages=[{"role": "user", "content": huge}])
    assert info.value.status_code == 413
    body: Any = info.value.body
    assert body["error"]["type"] == "request_too_large"
    assert info.value.response.headers["x-should-retry"] == "false"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        yield b'{"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "'
        for _ in range(33):
            yield b"y" * 1_000_000
        yield b'"}]}'

    response = httpx2.post(sim.url + "/v1/messages", content=chunks(), headers=OLD)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"
    # just under the limit is not refused for its size
    fits = "z" * 1000
    assert create(client, messages=[{"role": "user", "content": fits}]).stop_reason in (
        "end_turn",
        "max_tokens",
    )


# --- the catalogue file ----------------------------------------------------------------------------------

ENTRY = """
[[model]]
id = "claude-test-1"
display_name = "Claude Test 1"
line = "haiku"
created_at = 2026-01-02
lifecycle = "active"
max_input_tokens = 1000
max_tokens = 100
min_cacheable_tokens = 10
thinks_by_default = false
effort = false
input = 1
output = 5.0
cache_write_5m = 1.25
cache_write_1h = 2.0
cache_read = 0.1
sources = ["https://platform.claude.com/docs/en/about-claude/models/overview"]
"""
ALIAS = """
[[model]]
id = "claude-test-1-20260102"
alias_of = "claude-test-1"
display_name = "Claude Test 1"
created_at = 2026-01-02
lifecycle = "active"
max_input_tokens = 1000
max_tokens = 100
min_cacheable_tokens = 10
thinks_by_default = false
effort = false
input = 1.0
output = 5.0
cache_write_5m = 1.25
cache_write_1h = 2.0
cache_read = 0.1
sources = ["https://platform.claude.com/docs/en/about-claude/models/overview"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"catalogue-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    return path


def test_catalogue_loader_reads_a_good_file(tmp_path: Path) -> None:
    catalogue = load_catalogue(_write(tmp_path, ENTRY + ALIAS))
    assert len(catalogue) == 2
    entry = catalogue.resolve("claude-test-1-20260102")
    assert entry is not None and entry.id == "claude-test-1" and entry.input == 1.0
    assert [m.id for m in catalogue.models()] == ["claude-test-1"]
    assert entry.model_info()["created_at"] == "2026-01-02T00:00:00Z"
    packaged = load_catalogue()
    assert packaged.resolve(MODEL) is not None
    assert all(e.sources for e in packaged)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (ENTRY.replace('lifecycle = "active"', 'lifecycle = "sunset"'), "lifecycle"),
        (ENTRY.replace("max_tokens = 100\n", ""), "max_tokens"),
        (ENTRY + 'colour = "blue"\n', "colour"),
        (ENTRY.replace("max_tokens = 100", 'max_tokens = "100"'), "max_tokens"),
        (ENTRY + ENTRY, "twice"),
        (ALIAS, "alias"),
        (ENTRY.replace("https://platform", "http://platform"), "https"),
        ("[[model]\nid =", "TOML"),
        ("", "model"),
    ],
)
def test_catalogue_loader_fails_loudly(tmp_path: Path, text: str, complaint: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(CatalogueError, match=complaint) as info:
        load_catalogue(path)
    assert str(path) in str(info.value)


def test_catalogue_missing_file_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="cannot read"):
        load_catalogue(tmp_path / "absent.toml")


def test_app_serves_an_injected_catalogue(tmp_path: Path) -> None:
    catalogue: Catalogue = load_catalogue(_write(tmp_path, ENTRY))
    with (
        SimServer(SimConfig(time_scale=0, catalogue=catalogue)) as own,
        anthropic.Anthropic(api_key="k", base_url=own.url, max_retries=0) as c,
    ):
        assert [m.id for m in c.models.list()] == ["claude-test-1"]
        assert create(c, model="claude-test-1", max_tokens=100).model == "claude-test-1"
        assert "max_tokens: 101 > 100" in bad_request(c, model="claude-test-1", max_tokens=101)
        with pytest.raises(anthropic.NotFoundError):
            create(c)  # haiku is not in this catalogue
