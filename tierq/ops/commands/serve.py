"""``tierq flower``, ``tierq api``, ``tierq sim`` and ``tierq demo``: the long-running services."""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tierq.contract.errors import TierqError

if TYPE_CHECKING:
    pass
from tierq.ops.commands._common import console, err, extra, fail, warn

__all__ = ["FLOWER_TASK_COLUMNS", "api", "demo", "flower", "sim"]


#: the columns of Flower's task list: each job's queue (its tier) and timings, never its arguments or result
FLOWER_TASK_COLUMNS = "name,uuid,state,routing_key,received,started,runtime,retries,worker"


def flower(
    port: Annotated[int, typer.Option(help="Port for Flower's UI and API.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    unauthenticated: Annotated[
        bool, typer.Option("--unauthenticated", help="Run without basic auth (local use only).")
    ] = False,
) -> None:
    """Run Flower for tierq, behind basic auth from TIERQ_FLOWER_BASIC_AUTH (user:password)."""
    from tierq.core.settings import get_settings

    auth = get_settings().flower_basic_auth
    if auth is None and not unauthenticated:
        raise fail("set TIERQ_FLOWER_BASIC_AUTH=user:password, or pass --unauthenticated for local use")
    if auth is not None:
        value = auth.get_secret_value()
        if ":" not in value:
            raise fail("TIERQ_FLOWER_BASIC_AUTH must be user:password")
        # through the environment, not argv, so the password stays out of `ps`
        os.environ["FLOWER_BASIC_AUTH"] = value
    else:
        os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"
    from tierq.celery.app import get_app

    app = get_app()
    # workers send task events only when asked: ask the running ones now, not at Flower's first
    # periodic request 5 s from now (it goes on asking, for workers that start later)
    with suppress(Exception):
        app.control.enable_events()
    app.start(["flower", f"--port={port}", f"--address={address}", f"--tasks_columns={FLOWER_TASK_COLUMNS}"])


def api(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    tokens_file: Annotated[
        Path | None,
        typer.Option(
            envvar="TIERQ_API_TOKENS_FILE", help="TOML or JSON: producer name = sha256 hex of its token."
        ),
    ] = None,
    tokens: Annotated[
        str | None,
        typer.Option(envvar="TIERQ_API_TOKENS", help="Token hashes as name:sha256hex,name2:sha256hex."),
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option("--insecure-no-auth", help="No tokens: every caller is 'anonymous' (local use)."),
    ] = False,
) -> None:
    """Serve the HTTP API: submit, read, stream and cancel jobs (docs/http.md)."""
    with extra("api"):
        import uvicorn

        from tierq.api import load_tokens, make_api
    from tierq import Producer
    from tierq.core.settings import get_settings
    from tierq.observe.logging import configure_logging

    try:
        table = load_tokens(tokens_file, tokens)
        settings = get_settings()
        producer = Producer(settings)
    except TierqError as exc:
        raise fail(str(exc)) from None
    if not len(table) and not insecure_no_auth:
        raise fail(
            "no API tokens: set TIERQ_API_TOKENS_FILE (or --tokens-file) or TIERQ_API_TOKENS, "
            "or pass --insecure-no-auth for local use (see docs/http.md)"
        )
    if not len(table):
        warn("serving without tokens (--insecure-no-auth): every caller is the producer 'anonymous'")
    configure_logging(settings)
    app = make_api(producer, table if len(table) else None)
    who = f"producers: {', '.join(table.names)}" if len(table) else "no auth"
    err.print(f"tierq API on http://{host}:{port} ({who})", highlight=False)
    # SIGTERM: stop taking connections, give open event streams 10 s (clients resume with Last-Event-ID)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=10,
    )


def sim(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    time_scale: Annotated[
        float, typer.Option(min=0.0, help="Multiplies every delay: 1 real speed, 0.1 ten times faster.")
    ] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for the latency jitter.")] = None,
    limits: Annotated[
        str | None,
        typer.Option(help="Per-model rate limits per minute, rpm=N,itpm=N,otpm=N (default: generous)."),
    ] = None,
) -> None:
    """Run the Anthropic-compatible simulator (point ANTHROPIC_BASE_URL at it)."""
    with extra("sim"):
        from tierq.sim import SimConfig, serve
        from tierq.sim.ratelimit import DEFAULT_LIMITS, Limits

    try:
        parsed = Limits.parse(limits) if limits is not None else DEFAULT_LIMITS
    except ValueError as exc:
        raise fail(f"--limits: {exc}") from None
    err.print(
        f"simulator on http://{host}:{port} (time scale {time_scale}, limits {parsed}); "
        f"ANTHROPIC_BASE_URL=http://{host}:{port}"
    )
    serve(host, port, SimConfig(time_scale=time_scale, seed=seed, limits=parsed))


def demo(
    jobs: Annotated[int, typer.Option(min=1, max=5000, help="How many jobs to submit.")] = 60,
    mix: Annotated[
        str | None, typer.Option(help="Urgency weights, e.g. critical=0.2,high=0.2,normal=0.4,low=0.2.")
    ] = None,
    docs: Annotated[
        Path | None, typer.Option(help="Summarize the .txt/.md files under this directory instead.")
    ] = None,
    time_scale: Annotated[
        float,
        typer.Option(
            min=0.0, help="Simulator speed: 1 is the published model speeds, 0.25 four times faster."
        ),
    ] = 0.25,
    flower: Annotated[bool, typer.Option(help="Also start Flower (basic auth, credentials printed).")] = True,
    svg: Annotated[Path | None, typer.Option(help="Also save what the demo printed as SVG.")] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep Flower and the pools up after the run, until Ctrl-C.")
    ] = False,
) -> None:
    """Start Redis, the simulator, one pool per tier and Flower; run a mixed workload; watch it live."""
    with extra("demo"):
        from tierq.ops.demo import run_demo

    shown = console(record=svg is not None)
    try:
        code = run_demo(
            jobs=jobs, time_scale=time_scale, mix=mix, docs=docs, flower=flower, console=shown, keep=keep
        )
    except TierqError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        err.print("interrupted: every process the demo started has been stopped")
        raise typer.Exit(130) from None
    if svg is not None:
        shown.save_svg(str(svg), title="tierq demo")
    raise typer.Exit(code)
