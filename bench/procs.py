"""Child processes of a benchmark: started in their own session, dying with the bench, always reaped.

Every child gets ``PR_SET_PDEATHSIG`` (SIGKILL when the bench process dies, even by SIGKILL) and
its own session (a Ctrl-C in the terminal reaches only the bench, which then stops its children in
order). CPU time and RSS are read from ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from tierq.ops.embedded import die_with_parent

__all__ = ["Child", "cpu_s", "handle_sigterm", "interrupted", "rss_mb", "wait_until"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class Child:
    """One subprocess, its output in ``log_path``."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        #: the Celery node name, for workers
        self.node: str | None = None
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,  # only calls prctl, loaded before the fork
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        """Raise with the end of its log when the process has exited."""
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        """The end of the process's output."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process so far."""
        return cpu_s(self.pid)

    def rss_mb(self) -> float:
        """Resident memory, in MB."""
        return rss_mb(self.pid)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; always reaps and closes the log."""
        try:
            if self.alive():
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()
                    self.proc.wait()
        finally:
            self._log.close()


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # the command name (field 2) may hold spaces: split after its closing parenthesis
    return raw[raw.rindex(")") + 2 :].split()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads)."""
    fields = _stat_fields(pid)
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB."""
    return int(_stat_fields(pid)[21]) * _PAGE / 1e6


#: set by the first SIGINT, SIGTERM or SIGHUP: a KeyboardInterrupt raised where Python swallows it
#: (in a ``__del__`` or a weakref callback, "Exception ignored in ...") still ends the run as interrupted
_interrupted = threading.Event()


def interrupted() -> bool:
    """Whether the bench was told to stop (see :func:`handle_sigterm`)."""
    return _interrupted.is_set()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    _interrupted.set()
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def handle_sigterm() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt, so cleanup runs as it does on Ctrl-C,
    and remember it (:func:`interrupted`)."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_until(what: str, ready: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
    """Poll ``ready()`` until true; raise ``TimeoutError`` naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not ready within {timeout} s")
        time.sleep(interval)
