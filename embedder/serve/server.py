"""The HTTP server's own limits: how long a client may take to send a request, and how many
connections are served at once. uvicorn runs the service; these are its options, plus one
deadline it lacks.

    ServerLimits              the limits (`embedder serve` flags; embedder.serve.config), with their defaults
    uvicorn_options(limits)   keyword arguments of uvicorn.Config / uvicorn.run that apply them
    serve_in_thread(app)      the service on a free loopback port in a thread, for benchmarks and tests

uvicorn bounds a request head's size (h11's max incomplete event size) and the idle time between
requests on a kept-alive connection (timeout_keep_alive), and answers 503 once `limit_concurrency`
connections are open. It has no deadline for *receiving* a request: `timeout_keep_alive` starts
only after a first answer and is cancelled by any byte, so a client that connects and sends
nothing, or its headers a byte at a time, holds a socket for ever (uvicorn issues #1192 and
#1332; slowloris). Such clients pile up to the process's file limit, and then nothing, not
even /health, is accepted. `DeadlineH11Protocol` adds the deadline to uvicorn's own h11
protocol class (the extension point uvicorn offers, `http=`): a request's line and headers must
arrive within `header_timeout` of the connection (or of the previous answer), and its body
within `body_timeout` of its headers; past either, the connection is closed. Once a request is
received, the time the answer takes is not limited. The connection cap then bounds what slow
clients can hold to `max_connections` for at most `header_timeout` seconds (docs/RELIABILITY.md
has the measurements).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from embedder.errors import EmbedderError
from embedder.serve.config import DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, ServerLimits

KEEP_ALIVE_S = 5  # idle seconds between requests on one connection (uvicorn's default)
MAX_HEAD_BYTES = 16 * 1024  # request line and headers (h11's default, stated)
FD_HEADROOM = 64  # files the process keeps for itself besides the connections (index, images, logs)
FILES_WANTED = 65536  # open files asked for: room for many slow clients while their deadlines run

log = logging.getLogger("uvicorn.error")


START_WAIT_S = 30.0  # serve_in_thread: how long uvicorn may take to start listening


@contextmanager
def serve_in_thread(app, **options) -> Iterator[tuple[str, int]]:
    """Serve the ASGI `app` with uvicorn on a free 127.0.0.1 port, in a daemon thread of this process, while
    the `with` block runs; yields (host, port). `options`: more uvicorn.Config keywords (`uvicorn_options`).
    For benchmarks, tests and notebooks; `embedder serve` runs uvicorn in the foreground instead."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # a free port, held from now on: no race with other processes
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_WAIT_S
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise EmbedderError(f"The service did not start within {START_WAIT_S:.0f} s; uvicorn's log says why.")
            time.sleep(0.02)
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def uvicorn_options(limits: ServerLimits) -> dict:
    """uvicorn.Config keywords that apply `limits` (and raise the file limit the connections need).
    The cap stays FD_HEADROOM under the file limit, so that a request past it gets its 503 rather
    than a failed accept()."""
    files = allow_connections(limits.max_connections)
    cap = max(1, min(limits.max_connections, files - FD_HEADROOM))

    class Protocol(DeadlineH11Protocol):
        header_timeout, body_timeout = limits.header_timeout, limits.body_timeout

    return {"http": Protocol, "limit_concurrency": cap, "timeout_keep_alive": KEEP_ALIVE_S,
            "h11_max_incomplete_event_size": MAX_HEAD_BYTES}


def allow_connections(n: int) -> int:
    """Raise the soft limit on open files to FILES_WANTED (or `n` connections' worth, if more), at
    most the hard limit: at a soft limit of 1,024, a common default, slow clients held until their
    deadline would make accept() fail for everyone, /health included. Returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(n + FD_HEADROOM, FILES_WANTED)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return wanted if soft == resource.RLIM_INFINITY else soft


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request (module docstring)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for = ""
        super().connection_made(transport)
        self._arm("headers", self.header_timeout)

    def handle_events(self) -> None:
        super().handle_events()
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._waiting_for == "headers":
            self._arm("body", self.body_timeout)  # the headers are in: the body's own deadline starts
        elif state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR, h11.SWITCHED_PROTOCOL):
            self._disarm()  # the request is in: answering it takes what it takes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm("headers", self.header_timeout)  # the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, what: str, seconds: float) -> None:
        self._disarm()
        self._waiting_for = what
        self._deadline = self.loop.call_later(seconds, self._expired, what, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._waiting_for = None, ""

    def _expired(self, what: str, seconds: float) -> None:
        self._deadline, self._waiting_for = None, ""
        if not self.transport.is_closing():
            log.warning("Closed a connection from %s: its request %s took over %g s.", self.client, what, seconds)
            self.transport.close()
