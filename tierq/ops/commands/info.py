"""``tierq tiers`` and ``tierq schemas``: the tier table, and the contract's JSON Schemas."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from tierq.contract.errors import TierqError

if TYPE_CHECKING:
    from tierq.contract.tiers import Tier
from tierq.ops.commands._common import console, fail

__all__ = ["schemas", "tiers"]


def tiers() -> None:
    """Show the tier table and which urgencies each tier serves."""
    from tierq.core.settings import get_tier_table

    try:
        table_data = get_tier_table()
    except TierqError as exc:
        raise fail(str(exc)) from None
    table = Table(title="tierq tiers")
    for column in (
        "tier",
        "urgencies",
        "queue",
        "model",
        "max_tokens",
        "effort",
        "deadline",
        "threads",
        "io",
        "path",
    ):
        table.add_column(column)
    for tier in table_data.tiers.values():
        urgencies = ", ".join(u for u, t in table_data.urgencies.items() if t == tier.name) or "-"
        table.add_row(
            tier.name, urgencies, tier.queue, tier.model, str(tier.max_tokens), tier.effort or "-",
            f"{tier.deadline_s:g} s", str(tier.concurrency), tier.io, _path(tier),
        )  # fmt: skip
    console().print(table)


def _path(tier: Tier) -> str:
    """How the tier's jobs reach the model: one streamed Messages call each, or Message Batches."""
    if tier.batch is None:
        return "messages"
    if tier.batch_when_slack_s is None:
        return "batch"
    return f"batch if slack > {tier.batch_when_slack_s:g} s"


def schemas(
    out: Annotated[Path, typer.Option(help="Where to write them.")] = Path("docs/schemas/v1"),
    check: Annotated[bool, typer.Option("--check", help="Only compare; exit 1 when a file differs.")] = False,
) -> None:
    """Write the contract's JSON Schemas (job, headers, body, result, status), generated from the models."""
    from tierq.contract.schemas import rendered

    stale = []
    for name, text in rendered().items():
        path = out / name
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        sys.stdout.write(f"{path}\n")
    if stale:
        raise fail(f"out of date (run tierq schemas): {', '.join(stale)}", code=1)
