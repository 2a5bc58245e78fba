"""What every command shares: one-line errors on stderr, JSON on stdout, the console, number formats."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    pass


__all__ = ["console", "err", "extra", "fail", "ms", "per_1000", "print_json", "share", "warn"]


err = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error to stderr and return the exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def extra(name: str) -> Iterator[None]:
    """A command whose optional dependencies are missing says which extra installs them."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise fail(f"this command needs {exc.name}: pip install 'tierq[{name}]'") from None


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def warn(message: str) -> None:
    err.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def per_1000(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def console(record: bool = False) -> Console:
    """stdout, 120 columns wide off a terminal (rich would assume 80)."""
    return Console(width=None if sys.stdout.isatty() else 120, record=record)
