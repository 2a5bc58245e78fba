"""CPU per streamed call: the sync SDK on threads, ``AsyncAnthropic`` on one loop, raw SSE events.

``python -m bench.sdk_clients [--calls 256] [--inflight 64]`` starts the simulator as a separate
process (each call ~0.5 s, a few tokens per delta, like a short fast-tier reply), then runs the
same calls each way in this process and prints CPU-ms per call (``time.process_time``) and
wall time. It isolates the SDK's streaming cost from Celery's, to choose how a worker process
should hold many calls at once. The last way, the raw events of ``AsyncAnthropic`` on the SDK's
aiohttp transport (``anthropic[aiohttp]``), is what ``io = "asyncio"`` tiers do (tierq/llm/client.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import anthropic

from tierq.ops.embedded import free_port

__all__ = ["main"]

PROMPT = " ".join(f"Sentence {i} is about queues and the latency that users feel." for i in range(60))


def _sync_call(client: anthropic.Anthropic) -> int:
    chunks = 0
    with client.messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": PROMPT}], stream=True
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                chunks += 1
    return chunks


def _raw_call(client: anthropic.Anthropic) -> int:
    """The same call through the SDK's raw response: SSE events decoded, no model objects built."""
    chunks = 0
    raw = client.messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    response = raw.http_response
    try:
        for sse in anthropic.Stream.raw_events(response):
            if sse.event == "content_block_delta":
                json.loads(sse.data)
                chunks += 1
    finally:
        response.close()
    return chunks


async def _async_call(client: anthropic.AsyncAnthropic) -> int:
    chunks = 0
    stream = await client.messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    async with stream:
        async for event in stream:
            if event.type == "content_block_delta":
                chunks += 1
    return chunks


async def _async_raw_call(client: anthropic.AsyncAnthropic) -> int:
    """The raw-events call on ``AsyncAnthropic``: what ``tierq.llm.client`` does on its event loop."""
    chunks = 0
    raw = await client.messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    response = raw.http_response
    try:
        async for sse in anthropic.AsyncStream.raw_events(response):
            if sse.event == "content_block_delta":
                json.loads(sse.data)
                chunks += 1
    finally:
        await response.aclose()
    return chunks


def _on_threads(
    call: Callable[[anthropic.Anthropic], int], url: str, calls: int, inflight: int
) -> tuple[float, float, int]:
    client = anthropic.Anthropic(api_key="bench", base_url=url, max_retries=0)
    call(client)  # warm the connection pool
    cpu, wall = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(inflight) as pool:
        deltas = sum(pool.map(lambda _: call(client), range(calls)))
    result = (time.process_time() - cpu, time.perf_counter() - wall, deltas)
    client.close()
    return result


def _asyncio(
    call: Callable[[anthropic.AsyncAnthropic], Awaitable[int]],
    url: str,
    calls: int,
    inflight: int,
    aiohttp: bool = False,
) -> tuple[float, float, int]:
    async def run() -> tuple[float, float, int]:
        http = anthropic.DefaultAioHttpClient() if aiohttp else None
        client = anthropic.AsyncAnthropic(api_key="bench", base_url=url, max_retries=0, http_client=http)
        await call(client)
        gate = asyncio.Semaphore(inflight)

        async def one() -> int:
            async with gate:
                return await call(client)

        cpu, wall = time.process_time(), time.perf_counter()
        deltas = sum(await asyncio.gather(*(one() for _ in range(calls))))
        result = (time.process_time() - cpu, time.perf_counter() - wall, deltas)
        await client.close()
        return result

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    """Run both ways and print a small table."""
    parser = argparse.ArgumentParser(prog="python -m bench.sdk_clients", description=__doc__)
    parser.add_argument("--calls", type=int, default=256)
    parser.add_argument("--inflight", type=int, default=64)
    args = parser.parse_args(argv)
    port = free_port()
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tierq.sim",
            "--port",
            str(port),
            "--fixed-ttft-s",
            "0.1",
            "--fixed-total-s",
            "0.5",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                anthropic.Anthropic(api_key="bench", base_url=url, max_retries=0).messages.count_tokens(
                    model="claude-haiku-4-5", messages=[{"role": "user", "content": "hi"}]
                )
                break
            except anthropic.APIConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        print(f"{args.calls} calls, {args.inflight} in flight, each ~0.5 s (simulator in its own process)")
        print(f"{'client':<28}{'CPU ms/call':>12}{'CPU ms/delta':>14}{'wall s':>9}{'calls/s':>9}")
        variants = (
            ("sync SDK on threads", partial(_on_threads, _sync_call)),
            ("AsyncAnthropic, one loop", partial(_asyncio, _async_call)),
            ("raw SSE events on threads", partial(_on_threads, _raw_call)),
            ("raw SSE events, one loop", partial(_asyncio, _async_raw_call)),
            ("raw SSE, one loop, aiohttp", partial(_asyncio, _async_raw_call, aiohttp=True)),
        )
        for name, run in variants:
            cpu, wall, deltas = run(url, args.calls, args.inflight)
            print(
                f"{name:<28}{cpu * 1000 / args.calls:>12.2f}{cpu * 1000 / max(deltas, 1):>14.3f}"
                f"{wall:>9.2f}{args.calls / wall:>9.1f}"
            )
    finally:
        sim.terminate()
        sim.wait(timeout=10)


if __name__ == "__main__":
    main()
