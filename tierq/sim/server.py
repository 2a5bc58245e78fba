"""Running the simulator: in a background thread (:class:`SimServer`) or in the foreground (:func:`serve`)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import uvicorn
from starlette.types import ASGIApp

from tierq.sim.app import create_app
from tierq.sim.config import SimConfig
from tierq.sim.state import SimState

__all__ = ["SimServer", "serve"]

#: Seconds :meth:`SimServer.start` waits for uvicorn to accept connections.
STARTUP_TIMEOUT_S = 10.0
#: Seconds uvicorn lets open requests finish on shutdown before cancelling them.
GRACEFUL_SHUTDOWN_S = 1


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class SimServer:
    """The simulator served by uvicorn in a daemon thread; a context manager.

    ``port=0`` picks a free port; ``.url`` and ``.port`` tell which once started. ``.state`` is
    the app's :class:`SimState`, to script faults and read request counts in-process.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        wrap: Callable[[ASGIApp], ASGIApp] | None = None,
    ) -> None:
        self.config = config or SimConfig()
        self.host = host
        self.app = create_app(self.config)
        #: what uvicorn serves: the app, or ``wrap(app)`` (a middleware that tests put around it)
        self.asgi: ASGIApp = wrap(self.app) if wrap is not None else self.app
        self.state: SimState = self.app.state.sim
        self._requested_port = port
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port the server listens on; only known once started."""
        if self._port is None:
            raise RuntimeError("SimServer is not started")
        return self._port

    @property
    def url(self) -> str:
        """The base URL to give the SDK, e.g. ``http://127.0.0.1:54321``."""
        return _url(self.host, self.port)

    def start(self) -> None:
        """Bind the socket, start uvicorn in a daemon thread and wait until it accepts connections."""
        if self._thread is not None:
            raise RuntimeError("SimServer is already started")
        sock = _bind(self.host, self._requested_port)
        port: int = sock.getsockname()[1]
        config = uvicorn.Config(
            self.asgi,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"tierq-sim-{port}", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                thread.join(STARTUP_TIMEOUT_S)
                sock.close()
                raise RuntimeError(f"simulator failed to start on {self.host}:{port}")
            time.sleep(0.01)
        self._server, self._thread, self._port = server, thread, port

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(STARTUP_TIMEOUT_S + GRACEFUL_SHUTDOWN_S)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(host: str, port: int, config: SimConfig) -> None:
    """Serve the simulator in the foreground until interrupted (for ``tierq sim``)."""
    sys.stderr.write(f"tierq simulator on {_url(host, port)} (time_scale={config.time_scale:g})\n")
    uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
        )
    ).run()
