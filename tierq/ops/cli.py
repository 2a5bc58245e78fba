"""The ``tierq`` command: run a tier's worker pool, submit jobs, fetch results, run the simulator.

The top layer: it may import anything below. This module assembles the commands of
:mod:`tierq.ops.commands`, one module per group; each command imports what it runs when it runs,
so ``tierq --help`` and a mistyped argument answer without loading Celery or the SDK, and
``tierq sim`` and ``tierq demo`` can say which extra is missing.
"""

from __future__ import annotations

import os
import sys

import typer

from tierq.contract.errors import TierqError
from tierq.ops.commands import dlq as dlq_commands
from tierq.ops.commands import doctor, info, jobs, serve, stats, worker
from tierq.ops.commands._common import err

__all__ = ["cli", "main"]

cli = typer.Typer(
    name="tierq",
    help="Latency-tiered Celery workers for LLM summarization.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cli.command()(worker.worker)
cli.command()(jobs.submit)
cli.command()(jobs.result)
cli.command()(info.tiers)
cli.command()(info.schemas)
cli.command()(serve.flower)
cli.command()(serve.api)
cli.command()(stats.stats)
cli.command()(serve.sim)
cli.command()(serve.demo)

dlq = typer.Typer(help="Dead letters: jobs that failed for good, with why.", no_args_is_help=True)
dlq.command("list")(dlq_commands.dlq_list)
dlq.command("show")(dlq_commands.dlq_show)
dlq.command("replay")(dlq_commands.dlq_replay)
cli.add_typer(dlq, name="dlq")

cli.command()(doctor.doctor)


def main() -> None:
    """Console-script entry point: tierq's own errors end as one line on stderr, exit status 1."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        cli()
    except TierqError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
