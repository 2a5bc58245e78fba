"""``tierq dlq``: dead letters, the jobs that failed for good, with why; replay."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from tierq.contract.errors import TierqError

if TYPE_CHECKING:
    pass
from tierq.ops.commands._common import console, err, fail, print_json

__all__ = ["dlq_list", "dlq_replay", "dlq_show"]


def _store() -> Any:
    from tierq.core.settings import get_settings
    from tierq.store.deadletter import DeadLetterStore

    store = DeadLetterStore.from_settings(get_settings())
    if store is None:
        raise fail("dead letters need a Redis result backend (TIERQ_RESULT_BACKEND or TIERQ_BROKER_URL)")
    return store


def dlq_list(
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List dead letters (payloads redacted)."""
    letters = [letter.summary() for letter in _store().list(limit)]
    if as_json:
        print_json(letters)
        return
    table = Table(title=f"dead letters ({len(letters)})")
    # whole job ids, never cut: they are what `dlq show` and `dlq replay` take
    longest = max((len(row["job_id"]) for row in letters), default=6)
    table.add_column("job id", no_wrap=True, min_width=longest)
    for column in ("tier", "reason", "error", "attempts", "failed at", "payload"):
        table.add_column(column)
    for row in letters:
        failed_at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["failed_at"]))
        error = f"{row['error_type']}: {row['error']}"[:60]
        table.add_row(
            row["job_id"],
            row["tier"] or "-",
            row["reason"],
            error,
            str(row["attempts"]),
            failed_at,
            row["payload"],
        )
    console().print(table)


def dlq_show(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    payload: Annotated[bool, typer.Option("--payload", help="Include the job's text.")] = False,
) -> None:
    """Show one dead letter as JSON (its text only with --payload)."""
    letter = _store().get(job_id)
    if letter is None:
        raise fail(f"no dead letter for {job_id!r}", code=1)
    shown = letter.summary()
    if payload:
        shown["payload"] = letter.payload
    print_json(shown)


def dlq_replay(
    job_id: Annotated[str | None, typer.Argument(help="The job id to replay.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
) -> None:
    """Submit dead-lettered jobs again under their ids; print each id."""
    from tierq.producer import replay

    if (job_id is not None) == replay_all:
        raise fail("give a job id, or --all (not both)")
    ids = [letter.job_id for letter in _store().list(10_000)] if replay_all else [job_id or ""]
    failed = 0
    for one in ids:
        try:
            sys.stdout.write(replay(one).id + "\n")
        except TierqError as exc:
            failed += 1
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)
