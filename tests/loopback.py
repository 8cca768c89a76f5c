"""A real HTTP server on 127.0.0.1 for URL sources: good images, 404s, slow and truncated answers.

Used by tests/test_urls.py and benchmarks/urls.py; `running(app)` serves an ASGI app (the
search service) for tests/test_service.py, with embedder.serve.server.serve_in_thread (which
benchmarks/map.py calls itself). Nothing leaves the machine: the server binds the loopback
address on a free port and runs in a daemon thread of the test process.

Routes (the part of the URL path before the first "/" picks the behaviour):

    /img/NAME            NAME's bytes from the folder served (200, Content-Length, Last-Modified)
    /missing/NAME        404
    /slow/NAME           waits `slow_s` before the status line, then the image
    /drip/NAME           the headers at once, then the body a few bytes per `slow_s / 10`
    /truncated/NAME      Content-Length of the whole image, half of it sent, then the connection closed
    /flaky/NAME          503 (Retry-After 0) for the first `flaky` requests of each NAME, then the image
    /big/NAME            claims a Content-Length of 1 GiB (and sends nothing)

Misbehaving servers (issue 25), each answering whatever the request; `hostile[NAME]` for NAME picks
the value where one is needed:

    /location/NAME       302 whose Location is `hostile[NAME]` (an invalid URL, another scheme ...)
    /retry-after/NAME    503 with `Retry-After: hostile[NAME]` (huge, a far date, garbage), then the image
    /drip-head/NAME      the status line and headers one byte per `slow_s / 10`, forever
    /interim/NAME        `HTTP/1.1 100 Continue` (or hostile[NAME]'s 1xx line) per `slow_s / 10`, forever
    /endless/NAME        200 without a length, then a byte per `slow_s / 10`, forever
    /raw/NAME            the bytes `hostile[NAME]` as the whole answer, then the connection closed

`latency_s` delays every answer, to stand in for a network's round trip in the benchmark.
`hits` counts the requests per path.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def running(app, **options):
    """The service in a thread of the test process (embedder.serve.server.serve_in_thread): yields (host, port)."""
    from embedder.serve.server import serve_in_thread

    return serve_in_thread(app, **options)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real image hosts answer

    def log_message(self, *args):  # quiet: the tests' output is for assertions
        pass

    def do_GET(self):
        srv: LoopbackServer = self.server.owner
        srv.hits[self.path] += 1
        srv.agents.add(self.headers.get("User-Agent", ""))
        time.sleep(srv.latency_s)
        kind, _, name = self.path.lstrip("/").partition("/")
        if kind in HOSTILE:
            return HOSTILE[kind](self, srv, srv.hostile.get(name))
        file = srv.folder / name
        if kind == "missing" or not file.is_file():
            return self._send(404, b"not found", "text/plain")
        data = file.read_bytes()
        if kind == "slow":
            time.sleep(srv.slow_s)
        if kind == "flaky" and srv.hits[self.path] <= srv.flaky:
            return self._send(503, b"busy", "text/plain", {"Retry-After": "0"})
        if kind == "big":
            self._head(200, 1 << 30, "image/jpeg")
            self.close_connection = True
            return
        if kind == "truncated":
            self._head(200, len(data), "image/jpeg")
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        if kind == "drip":
            self._head(200, len(data), "image/jpeg")
            for i in range(0, len(data), 16):
                self.wfile.write(data[i : i + 16])
                self.wfile.flush()
                time.sleep(srv.slow_s / 10)
            return
        self._send(200, data, "image/png" if name.endswith(".png") else "image/jpeg",
                   {"Last-Modified": formatdate(file.stat().st_mtime, usegmt=True)})

    def _head(self, status: int, length: int, ctype: str, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None):
        self._head(status, len(body), ctype, extra)
        self.wfile.write(body)


def _drip(handler, srv, data: bytes, forever: bytes | None = None):
    try:
        for i in range(len(data)):
            handler.wfile.write(data[i : i + 1])
            handler.wfile.flush()
            time.sleep(srv.slow_s / 10)
        while forever is not None and not srv.stopping.is_set():
            handler.wfile.write(forever)
            handler.wfile.flush()
            time.sleep(srv.slow_s / 10)
    except OSError:
        pass  # the client gave up: what these routes test
    handler.close_connection = True


def _raw(handler, srv, data: bytes):
    try:
        handler.wfile.write(data)
        handler.wfile.flush()
    except OSError:
        pass
    handler.close_connection = True


HOSTILE = {
    "location": lambda h, srv, v: _raw(h, srv, b"HTTP/1.1 302 Found\r\nLocation: " + v.encode("latin-1")
                                       + b"\r\nContent-Length: 0\r\n\r\n"),
    "retry-after": lambda h, srv, v: _raw(h, srv, f"HTTP/1.1 503 Busy\r\nRetry-After: {v}\r\n"
                                          "Content-Length: 0\r\n\r\n".encode("latin-1")),
    "drip-head": lambda h, srv, v: _drip(h, srv, b"HTTP/1.1 200 OK\r\n", forever=b"X"),
    "interim": lambda h, srv, v: _drip(h, srv, b"", forever=(v or "HTTP/1.1 100 Continue").encode() + b"\r\n\r\n"),
    "endless": lambda h, srv, v: _drip(h, srv, b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n", forever=b"x"),
    "raw": lambda h, srv, v: _raw(h, srv, v if isinstance(v, bytes) else v.encode("latin-1")),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that gave up (a timeout, the size cap) closes its end mid-answer: expected here.
        pass


class LoopbackServer:
    """`with LoopbackServer(folder) as srv: srv.url("img", "a.jpg")`."""

    def __init__(self, folder: Path, *, slow_s: float = 2.0, flaky: int = 1, latency_s: float = 0.0):
        self.folder = Path(folder)
        self.slow_s, self.flaky, self.latency_s = slow_s, flaky, latency_s
        self.hits: Counter = Counter()
        self.agents: set[str] = set()  # the User-Agent headers seen
        self.hostile: dict[str, str | bytes] = {}  # NAME -> the value a misbehaving route sends
        self.stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, kind: str, name: str) -> str:
        return f"{self.base}/{kind}/{name}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


def main(argv=None) -> None:
    """`python -m tests.loopback FOLDER [--latency S]`: serve in a process of its own (the benchmark's
    server, so that it does not share the client's interpreter lock); prints the base URL, then serves."""
    import argparse
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--latency", type=float, default=0.0)
    args = ap.parse_args(argv)
    with LoopbackServer(Path(args.folder), latency_s=args.latency) as srv:
        print(srv.base, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


if __name__ == "__main__":
    main()
