"""A small HTTP server replaying recorded-style API transcripts byte for byte: a second, independent judge.

It knows nothing of ``simulator/`` or ``worker/``: each ``POST /v1/messages`` is answered with the
next transcript scripted for the request's ``x-tierq-job-id`` (``"ok"`` when none is), and every
request is recorded (arrival time, headers, parsed body) for the test to read back.

A transcript is a file ``transcripts/<name>.http``::

    # source: <URL of the API reference page the transcript is written from>
    # line-endings: crlf            (optional: the body's lines end in CRLF; default LF)
    HTTP/1.1 200 OK
    content-type: text/event-stream; charset=utf-8
    request-id: req_...

    event: message_start
    data: {"type": "message_start", ...}

    #! connection dropped

Comment lines (``#``) come before the status line. The body is written as it is, except that its
line endings follow the ``line-endings`` directive. An event stream (``text/event-stream``) is sent
with chunked transfer encoding, one chunk per event; a line ``#! connection dropped`` in it closes
the connection there, before the terminating chunk, as a network failure would. Any other body is
sent whole with its ``content-length``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["CUT_MARKER", "JOB_HEADER", "TRANSCRIPTS_DIR", "RecordedRequest", "ReplayServer", "Transcript"]

#: the transcripts shipped with the contract tests
TRANSCRIPTS_DIR = Path(__file__).with_name("transcripts")
#: request header naming the job a request belongs to (what tierq's worker sends)
JOB_HEADER = "x-tierq-job-id"
#: a body line that closes the connection there, mid-stream
CUT_MARKER = "#! connection dropped"
#: seconds the server thread is given to start or stop
_THREAD_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Transcript:
    """One recorded-style response: status, headers, body, and where it was written from."""

    name: str
    status: int
    headers: list[tuple[str, str]]
    #: the body as sent; for an event stream, one item per event (the last may be :data:`CUT_MARKER`)
    chunks: list[bytes]
    sources: list[str]
    crlf: bool

    @classmethod
    def load(cls, path: Path) -> Transcript:
        """Parse a ``.http`` transcript file."""
        lines = path.read_text(encoding="utf-8").split("\n")
        sources: list[str] = []
        crlf = False
        while lines and lines[0].startswith("#"):
            key, _, value = lines.pop(0).lstrip("# ").partition(":")
            if key.strip() == "source":
                sources.append(value.strip())
            elif key.strip() == "line-endings":
                crlf = value.strip().lower() == "crlf"
        status_line = lines.pop(0)
        version, status, _ = status_line.split(" ", 2)
        if version != "HTTP/1.1":
            raise ValueError(f"{path}: status line {status_line!r}")
        headers: list[tuple[str, str]] = []
        while lines and lines[0]:
            name, _, value = lines.pop(0).partition(":")
            headers.append((name.strip().lower(), value.strip()))
        lines.pop(0)  # the blank line before the body
        newline = "\r\n" if crlf else "\n"
        content_type = next((v for k, v in headers if k == "content-type"), "")
        if content_type.startswith("text/event-stream"):
            chunks = _split_events(lines, newline)
        else:
            chunks = [newline.join(lines).encode()]
        return cls(path.stem, int(status), headers, chunks, sources, crlf)

    def header(self, name: str) -> str | None:
        """The value of a response header, or None."""
        return next((v for k, v in self.headers if k == name.lower()), None)

    @property
    def is_event_stream(self) -> bool:
        """Whether the body is a server-sent event stream."""
        return (self.header("content-type") or "").startswith("text/event-stream")

    @property
    def body(self) -> bytes:
        """The whole body as the server sends it, without a cut marker."""
        return b"".join(c for c in self.chunks if c != CUT_MARKER.encode())

    @property
    def dropped(self) -> bool:
        """Whether the server closes the connection mid-stream."""
        return bool(self.chunks) and self.chunks[-1] == CUT_MARKER.encode()


def _split_events(lines: list[str], newline: str) -> list[bytes]:
    """Group body lines into events (each ending with its blank line); the cut marker on its own."""
    chunks: list[bytes] = []
    current: list[str] = []
    for line in lines:
        if line == CUT_MARKER:
            if current:
                chunks.append(newline.join(current).encode())
                current = []
            chunks.append(CUT_MARKER.encode())
            break
        current.append(line)
        if line == "" and len(current) > 1:
            chunks.append((newline.join(current[:-1]) + newline + newline).encode())
            current = []
    if any(line for line in current):
        raise ValueError("an event stream must end with a blank line (or the cut marker)")
    return chunks


def load_transcripts(directory: Path = TRANSCRIPTS_DIR) -> dict[str, Transcript]:
    """Every transcript in ``directory``, by name."""
    return {path.stem: Transcript.load(path) for path in sorted(directory.glob("*.http"))}


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server answered."""

    #: ``time.time()`` when its headers had arrived
    at: float
    method: str
    path: str
    headers: dict[str, str]
    #: the parsed JSON body (None when it was not JSON)
    body: Any
    #: the transcript that answered it
    transcript: str


@dataclass
class _Scripts:
    lock: threading.Lock = field(default_factory=threading.Lock)
    by_job: dict[str, deque[str]] = field(default_factory=dict)
    requests: dict[str, list[RecordedRequest]] = field(default_factory=dict)


class ReplayServer:
    """The replay server on a free loopback port, run by an asyncio loop in a daemon thread."""

    def __init__(self, transcripts: dict[str, Transcript] | None = None, host: str = "127.0.0.1") -> None:
        self.transcripts = transcripts if transcripts is not None else load_transcripts()
        self.host = host
        self.port = 0
        self._state = _Scripts()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._shutdown: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """The base URL to give the SDK."""
        return f"http://{self.host}:{self.port}"

    def script(self, job_id: str, names: list[str]) -> None:
        """Append transcripts to the FIFO script of ``job_id``; a request past the script gets ``ok``."""
        unknown = [n for n in names if n not in self.transcripts]
        if unknown:
            raise KeyError(f"no transcript named {unknown}")
        with self._state.lock:
            self._state.by_job.setdefault(job_id, deque()).extend(names)

    def requests(self, job_id: str) -> list[RecordedRequest]:
        """Every ``/v1/messages`` request of ``job_id`` so far, oldest first."""
        with self._state.lock:
            return list(self._state.requests.get(job_id, []))

    def all_requests(self) -> dict[str, list[RecordedRequest]]:
        """Every request so far, by job id (``""`` for requests without one)."""
        with self._state.lock:
            return {job: list(reqs) for job, reqs in self._state.requests.items()}

    def _next(self, job_id: str) -> str:
        with self._state.lock:
            script = self._state.by_job.get(job_id)
            return script.popleft() if script else "ok"

    def _record(self, job_id: str, request: RecordedRequest) -> None:
        with self._state.lock:
            self._state.requests.setdefault(job_id, []).append(request)

    # -- serving -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving; returns once the port is bound."""
        self._thread = threading.Thread(target=self._run, name="tierq-replay", daemon=True)
        self._thread.start()
        if not self._ready.wait(_THREAD_TIMEOUT_S) or self._server is None:
            raise RuntimeError("replay server did not start")

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is None or self._thread is None or self._shutdown is None:
            return
        self._loop.call_soon_threadsafe(self._shutdown.set)
        self._thread.join(_THREAD_TIMEOUT_S)
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._shutdown = shutdown = asyncio.Event()
        self._server = await asyncio.start_server(self._connection, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        async with self._server:
            await shutdown.wait()
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request and answer it; False when the connection is to be closed."""
        request_line = await reader.readline()
        if not request_line.strip():
            return False
        at = time.time()
        method, target, _ = request_line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        raw = await reader.readexactly(length) if length else b""
        path = target.split("?", 1)[0]
        if method != "POST" or path != "/v1/messages":
            await self._send_plain(
                writer,
                404,
                {"type": "error", "error": {"type": "not_found_error", "message": f"{method} {path}"}},
            )
            return True
        job_id = headers.get(JOB_HEADER, "")
        name = self._next(job_id)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self._record(job_id, RecordedRequest(at, method, path, headers, body, name))
        return await self._send(writer, self.transcripts[name])

    async def _send(self, writer: asyncio.StreamWriter, transcript: Transcript) -> bool:
        head = [f"HTTP/1.1 {transcript.status} {_reason(transcript.status)}"]
        head += [f"{name}: {value}" for name, value in transcript.headers]
        if not transcript.is_event_stream:
            head.append(f"content-length: {len(transcript.body)}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + transcript.body)
            await writer.drain()
            return True
        head.append("transfer-encoding: chunked")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        for chunk in transcript.chunks:
            if chunk == CUT_MARKER.encode():
                await writer.drain()
                writer.transport.abort()
                return False
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _send_plain(self, writer: asyncio.StreamWriter, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        head = f"HTTP/1.1 {status} {_reason(status)}\r\ncontent-type: application/json\r\n"
        writer.write(f"{head}content-length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()


def _reason(status: int) -> str:
    if status == 529:
        return "Overloaded"  # not an IANA status: the API's own
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
