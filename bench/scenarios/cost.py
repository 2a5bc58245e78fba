"""cost: worker CPU per fast job vs (raw Celery no-op CPU per task + the SDK's raw stream parse CPU).

Both pools (``bench.rawapp``'s no-op on threads -c32, tierq fast on threads -c32) get the same
low, paced load; each worker's CPU comes from ``/proc/<pid>/stat`` before and after, minus its
idle CPU over as long. The SDK's share is measured in this process: ``messages.create(stream=True)``
iterated over a pre-recorded SSE body of the very reply the worker got (captured from the
simulator), served by ``httpx2.MockTransport``: a benchmark-only transport, the SDK is not patched.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from typing import Any

import anthropic
import httpx2

from bench.docs import make_doc
from bench.harness import Harness, Sim
from bench.procs import Child
from bench.result import Options, ScenarioResult, Target
from bench.stats import median, ratio

#: the API version the SDK sends by default (``anthropic._constants.ANTHROPIC_API_VERSION`` in 2.x)
API_VERSION = "2026-10-21"

__all__ = ["TITLE", "run"]

TITLE = "cost: worker CPU per fast job vs raw Celery no-op + SDK stream parse"
TIME_SCALE = 0.05
RATE_PER_S = 25.0
JOB_HEADER = "x-tierq-job-id"


def run(harness: Harness, options: Options) -> ScenarioResult:
    runs = options.runs_or(3, quick=1)
    jobs = 12 if options.quick else 150
    sdk_calls = 30 if options.quick else 300
    doc = make_doc(48, seed=6)
    result = ScenarioResult(
        "cost",
        TITLE,
        config={
            "runs": runs,
            "jobs_per_run": jobs,
            "rate_per_s": RATE_PER_S,
            "sdk_calls": sdk_calls,
            "sim_time_scale": TIME_SCALE,
            "doc_chars": len(doc),
        },
        pools=["raw Celery: threads -c32, prefetch 1, acks_late", "tierq fast: threads -c32 (tier default)"],
    )
    with harness.stage("cost") as stage:
        sim = stage.start_sim(time_scale=TIME_SCALE, jitter=0.0)
        raw = stage.start_raw_worker(concurrency=32)
        fast = stage.start_worker("fast", sim)
        from bench.producer import submit, supports_stream_flag
        from bench.rawapp import send_noop

        variants: dict[str, tuple[Child, Callable[[], Any]]] = {
            "raw": (raw, send_noop),
            "tierq": (fast, lambda: submit(doc, "high")),
        }
        if supports_stream_flag():
            variants["tierq_stream"] = (fast, lambda: submit(doc, "high", stream=True))
        for child, send in variants.values():  # warm up: connections, SDK client, imports
            _paced(child, send, 10, idle_s=0.0)
        for i in range(runs):
            figures: dict[str, Any] = {"run": i}
            for name, (child, send) in variants.items():
                figures[name] = _paced(child, send, jobs, idle_s=0.5 if options.quick else 1.0)
            result.runs.append(figures)
        body, request = _record_sse(sim, doc)
        live = _sdk_cpu(_live_client(sim), request, 3 if options.quick else 24)
    sdk = _sdk_cpu(_mock_client(body), request, sdk_calls)
    sdk["sse_bytes"] = len(body)
    _summarize(result, sdk, live)
    return result


def _paced(child: Child, send: Callable[[], Any], count: int, idle_s: float) -> dict[str, Any]:
    """Send ``count`` tasks at ``RATE_PER_S``, wait for all; the worker's CPU per task, idle excluded."""
    idle_rate = 0.0
    if idle_s > 0:
        before, t0 = child.cpu_s(), time.monotonic()
        time.sleep(idle_s)
        idle_rate = (child.cpu_s() - before) / (time.monotonic() - t0)
    cpu0, t0 = child.cpu_s(), time.monotonic()
    handles = []
    for i in range(count):
        handles.append(send())
        pause = t0 + (i + 1) / RATE_PER_S - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    values = [_get(h) for h in handles]
    time.sleep(0.05)  # the worker acks and stores after the body returns
    wall = time.monotonic() - t0
    used = child.cpu_s() - cpu0 - idle_rate * wall
    out: dict[str, Any] = {
        "tasks": count,
        "cpu_ms_per_task": round(used * 1000 / count, 3),
        "idle_cpu_share": round(idle_rate, 4),
    }
    if isinstance(values[-1], dict) and "usage" in values[-1]:
        out["output_tokens"] = values[-1]["usage"]["output_tokens"]
    return out


def _get(handle: Any) -> Any:
    """The value of a tierq ``Job`` or of a Celery ``AsyncResult``."""
    from tierq.producer import Job

    return handle.result(timeout=30).to_json() if isinstance(handle, Job) else handle.get(timeout=30)


def _request_body(doc: str) -> dict[str, Any]:
    """The Messages request a fast-tier worker sends for ``doc`` (same model, limits, prompt)."""
    from tierq.contract.job import build_job, build_prompt
    from tierq.core.settings import get_tier_table

    spec, tier = build_job(get_tier_table(), doc, "high", None, None, "bench-sse", None)
    body: dict[str, Any] = {
        "model": tier.model,
        "max_tokens": spec.max_tokens or tier.max_tokens,
        "system": tier.system_prompt,
        "messages": [{"role": "user", "content": build_prompt(spec)}],
        "stream": True,
    }
    if tier.effort is not None:
        body["output_config"] = {"effort": tier.effort}
    return body


def _record_sse(sim: Sim, doc: str) -> tuple[bytes, dict[str, Any]]:
    """The simulator's SSE body for the fast tier's request of ``doc``, as the worker received it."""
    import json

    body = _request_body(doc)
    request = urllib.request.Request(
        sim.url + "/v1/messages",
        data=json.dumps(body).encode(),
        headers={
            "content-type": "application/json",
            "x-api-key": "bench",
            "anthropic-version": API_VERSION,
            JOB_HEADER: "bench-sse",
        },
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read(), body


def _mock_client(sse: bytes) -> anthropic.Anthropic:
    """An SDK client whose every call gets the recorded ``sse`` body (``httpx2.MockTransport``)."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        headers = {"content-type": "text/event-stream", "request-id": "req_bench"}
        return httpx2.Response(200, headers=headers, content=sse)

    return anthropic.Anthropic(
        api_key="bench",
        base_url="http://sim.invalid",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )


def _live_client(sim: Sim) -> anthropic.Anthropic:
    """An SDK client of the simulator over loopback, as the worker's (deltas arrive one by one)."""
    return anthropic.Anthropic(api_key="bench", base_url=sim.url, max_retries=0)


def _sdk_cpu(client: anthropic.Anthropic, body: dict[str, Any], calls: int) -> dict[str, Any]:
    """CPU ms (this process) of one ``messages.create(stream=True)`` call read to the end, as in a worker."""
    kwargs: dict[str, Any] = {
        "model": body["model"],
        "max_tokens": body["max_tokens"],
        "system": body["system"],
        "messages": body["messages"],
        "extra_headers": {JOB_HEADER: "bench-sse"},
        "timeout": anthropic.Timeout(15.0, connect=5.0),
    }
    if "output_config" in body:
        kwargs["output_config"] = body["output_config"]
    deltas = 0

    def one_call() -> int:
        n = 0
        stream = client.messages.create(stream=True, **kwargs)
        with stream:
            for event in stream:
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    n += 1
        return n

    with client:
        for _ in range(min(10, calls)):
            deltas = one_call()
        per_batch: list[float] = []
        batch = max(1, calls // 3)
        for _ in range(3):
            t0 = time.process_time()
            for _ in range(batch):
                one_call()
            per_batch.append((time.process_time() - t0) * 1000 / batch)
    return {"cpu_ms_per_call": median(per_batch), "batches_ms": per_batch, "text_deltas": deltas}


def _summarize(result: ScenarioResult, sdk: dict[str, Any], live: dict[str, Any]) -> None:
    runs = result.runs
    names = [k for k in runs[0] if k != "run"]
    per = {name: median(r[name]["cpu_ms_per_task"] for r in runs) for name in names}
    baseline = per["raw"] + sdk["cpu_ms_per_call"]
    summary: dict[str, Any] = {
        "raw_cpu_ms_per_task": per["raw"],
        "sdk_parse_cpu_ms_per_call": sdk["cpu_ms_per_call"],
        "baseline_cpu_ms": round(baseline, 3),
        "tierq_cpu_ms_per_job": per["tierq"],
        "ratio": ratio(per["tierq"], baseline),
        "sdk": sdk,
        "sdk_live_cpu_ms_per_call": live["cpu_ms_per_call"],
        "output_tokens": runs[-1]["tierq"].get("output_tokens"),
    }
    if "tierq_stream" in per:
        summary["tierq_stream_cpu_ms_per_job"] = per["tierq_stream"]
        summary["ratio_stream"] = ratio(per["tierq_stream"], baseline)
    result.summary = summary
    result.columns = ["CPU per task, median of runs", "ms", "x (raw + SDK)"]
    result.rows = [
        ["raw Celery no-op (worker)", per["raw"], ratio(per["raw"], baseline)],
        [
            f"SDK create(stream=True) parse, {sdk['text_deltas']} deltas (this process)",
            sdk["cpu_ms_per_call"],
            ratio(sdk["cpu_ms_per_call"], baseline),
        ],
        ["baseline: raw + SDK", baseline, 1.0],
        [
            "(info) SDK call against the simulator over loopback (this process)",
            live["cpu_ms_per_call"],
            ratio(live["cpu_ms_per_call"], baseline),
        ],
        [
            f"tierq fast job, {summary['output_tokens']} output tokens (worker)",
            per["tierq"],
            summary["ratio"],
        ],
    ]
    result.samples = {
        "raw_ms": [per["raw"]],
        "sdk_ms": [sdk["cpu_ms_per_call"]],
        "baseline_ms": [baseline],
        "tierq_ms": [per["tierq"]],
    }
    result.targets = [Target("tierq CPU per fast job / (raw + SDK)", summary["ratio"], "<=", 1.5, "x")]
    if "tierq_stream" in per:
        result.rows.append(
            [
                "tierq fast job with stream=True (publishes deltas)",
                per["tierq_stream"],
                summary["ratio_stream"],
            ]
        )
        result.samples["tierq_stream_ms"] = [per["tierq_stream"]]
        result.targets.append(
            Target("same, stream=True to the producer", summary["ratio_stream"], "<=", 1.5, "x")
        )
    result.notes.append(f"paced at {RATE_PER_S:g} tasks/s on threads -c32; each worker's idle CPU subtracted")
