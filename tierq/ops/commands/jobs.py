"""``tierq submit`` and ``tierq result``: a job from the command line, its stream and its result."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from tierq.contract.errors import TierqError

if TYPE_CHECKING:
    from tierq.producer import Job
from tierq.ops.commands._common import err, fail, print_json

__all__ = ["result", "submit"]


def _read_text(text: str | None, file: Path | None) -> str:
    if file is not None and text is not None:
        raise fail("give the text as an argument or with --file, not both")
    if file is None:
        if text is None:
            raise fail("give the text to summarize as an argument, or --file PATH (- for stdin)")
        return text
    if str(file) == "-":
        return sys.stdin.read()
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read --file {file}: {exc}") from None


def submit(
    text: Annotated[str | None, typer.Argument(help="Text to summarize (or use --file).")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read the text from a file; - is stdin.")
    ] = None,
    urgency: Annotated[
        str,
        typer.Option(
            "--urgency",
            "-u",
            help="critical, high, normal, low or bulk (Message Batches: half price, within 24 h).",
        ),
    ] = "normal",
    instructions: Annotated[str | None, typer.Option(help="What kind of summary to write.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Output cap, at most the tier's.")] = None,
    job_id: Annotated[str | None, typer.Option(help="Your own job id (idempotency key).")] = None,
    metadata: Annotated[str | None, typer.Option(help="A JSON object stored with the result.")] = None,
    deadline: Annotated[
        float | None, typer.Option(help="Seconds the job may take, at most the tier's deadline.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    stream: Annotated[
        bool, typer.Option("--stream", help="Print the summary as it is generated, then its figures.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait; default: the tier's deadline.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Submit one job; print its id, with --wait its result, with --stream its text as it comes."""
    from tierq.core.settings import get_tier_table
    from tierq.producer import submit as submit_job

    if stream and (wait or as_json):
        raise fail("--stream prints text as it comes; use --wait --json for the result as JSON")
    body = _read_text(text, file)
    meta: Any = None
    if metadata is not None:
        try:
            meta = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise fail(f"metadata: not valid JSON: {exc}") from None
    try:
        job = submit_job(
            body, urgency, instructions, max_tokens, job_id, meta, stream=stream, deadline_s=deadline
        )
    except TierqError as exc:
        raise fail(str(exc)) from None
    if job.duplicate:
        err.print(f"job {job.id} was already submitted: nothing enqueued", highlight=False)
    if stream:
        tier = get_tier_table().for_urgency(urgency)
        _stream_and_print(job, timeout if timeout is not None else tier.deadline_s + 5)
        return
    if not wait:
        if as_json:
            print_json({"job_id": job.id})
        else:
            sys.stdout.write(job.id + "\n")
        return
    tier = get_tier_table().for_urgency(urgency)
    _wait_and_print(job.id, timeout if timeout is not None else tier.deadline_s + 5, as_json)


def result(
    job_id: Annotated[str, typer.Argument(help="The job id printed by submit.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job ends.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print a job's result, or its status if it has not ended (``unknown``: no such job; exit 1)."""
    from tierq.producer import get_job

    job = get_job(job_id)
    if not wait and not job.ready():
        status = job.status()
        if as_json:
            print_json({"job_id": job_id, "status": status})
        else:
            sys.stdout.write(f"{job_id} {status}\n")
        if status == "unknown":
            raise typer.Exit(1)
        return
    _wait_and_print(job_id, timeout, as_json)


def _stream_and_print(job: Job, timeout: float) -> None:
    """Text to stdout as it arrives, then one line of figures to stderr."""
    from tierq.producer import Restarted

    try:
        for item in job.stream(timeout=timeout):
            if isinstance(item, str):
                sys.stdout.write(item)
                sys.stdout.flush()
                continue
            if isinstance(item, Restarted):
                sys.stdout.write("\n")
                err.print("[yellow]the worker was lost mid-reply; the job started over:[/]", highlight=False)
                continue
            timings = item.timings
            sys.stdout.write("\n")
            err.print(
                f"{item.job_id} {item.tier} · {item.model} · stop {item.stop_reason} · "
                f"{item.usage.output_tokens} tokens · first text after {timings.producer_ttft_ms} ms "
                f"(queue {timings.queue_wait_ms} ms, model TTFT {timings.ttft_ms} ms) · "
                f"total {timings.total_ms} ms",
                highlight=False,
            )
    except TierqError as exc:
        sys.stdout.write("\n")
        raise fail(str(exc), code=1) from None


def _wait_and_print(job_id: str, timeout: float, as_json: bool) -> None:
    from tierq.producer import get_job

    try:
        value = get_job(job_id).result(timeout=timeout)
    except TierqError as exc:
        raise fail(str(exc), code=1) from None
    if as_json:
        print_json(value.to_json())
        return
    out = Console()
    timings, usage = value.timings, value.usage
    out.print(
        f"[bold]{value.job_id}[/] {value.tier} · {value.model} · stop {value.stop_reason} · "
        f"{usage.input_tokens}→{usage.output_tokens} tokens · queue {timings.queue_wait_ms} ms · "
        f"TTFT {timings.ttft_ms} ms · total {timings.total_ms} ms · ${value.cost_usd}",
        highlight=False,
    )
    out.print(value.summary, highlight=False, markup=False)
