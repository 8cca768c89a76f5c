"""The service while slow clients hold sockets: does /health (and a query) still answer, and how fast?

    python -m benchmarks slowclients [--quick]

`embedder serve` runs in its own process under a file limit of 1,024 (soft and hard: a common
default, and the one at which the issue saw /health go unanswered). N clients each connect, send
the start of a request head and then nothing (slowloris). Two servers side by side:

    no deadline   --header-timeout 1e9: what uvicorn alone does (no deadline for a request head)
    defaults      --header-timeout 10 --body-timeout 60 --max-connections 1024 (capped under the
                  file limit: 960 here)
    defaults, 20,000 files   the same under this machine's own limit (20,000): the cap, not the
                  file limit, is reached first

For each N: how long until /health first answers after the N clients are in (polled every
0.2 s, 2 s per try, for at most 30 s), the statuses seen meanwhile, then 10 /health and 5
/search/vector answers (median and slowest, ms), and how long until the server has closed every
slow client (the defaults only). The machine is shared: timings move; the statuses do not.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.service import exchange, free_port

FILE_LIMIT = 1024
HEAD = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
# name: (flags, the server's file limit, soft and hard)
SERVERS = {"no deadline": (["--header-timeout", "1e9"], FILE_LIMIT), "defaults": ([], FILE_LIMIT),
           "defaults, 20,000 files": ([], 20000)}


@contextmanager
def server(index_dir: Path, flags: list[str], files: int = FILE_LIMIT):
    """`embedder serve` under a file limit of `files`, on a free port; yields the port."""
    def limit_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "embedder", "serve", str(index_dir), "--port", str(port), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=limit_files)  # noqa: PLW1509 - this benchmark starts no threads
    try:
        deadline = time.monotonic() + 120
        while _health(port, 1.0)[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)
        yield port
    finally:
        proc.kill()
        proc.wait(30)


def _health(port: int, timeout: float) -> tuple[int | None, float]:
    t = time.perf_counter()
    try:
        status = exchange(port, "GET", "/health", timeout=timeout)[0]
    except OSError:
        status = None  # refused, reset or timed out: no answer
    return status, time.perf_counter() - t


def slow_clients(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(HEAD)
        except OSError:
            s.close()
            continue  # the backlog is full: that client did not get in
        socks.append(s)
    return socks


def first_answer(port: int, limit_s: float = 30.0) -> tuple[float | None, Counter]:
    """Seconds until /health answers 200, and the statuses seen before (None: no answer in 2 s)."""
    seen, t0 = Counter(), time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        status, _ = _health(port, 2.0)
        if status == 200:
            return time.perf_counter() - t0, seen
        seen[status] += 1
        time.sleep(0.2)
    return None, seen


def latencies(port: int, vector: list[float]) -> dict:
    health = [_health(port, 5.0) for _ in range(10)]
    body = json.dumps({"vector": vector, "k": 10}).encode()
    queries = []
    for _ in range(5):
        try:
            status, _, s = exchange(port, "POST", "/search/vector", body, {"Content-Type": "application/json"},
                                    timeout=5)
        except OSError:
            status, s = None, 5.0
        queries.append((status, s))
    return {"health_status": dict(Counter(s for s, _ in health)),
            "health_ms_median": round(1000 * float(np.median([t for _, t in health])), 1),
            "health_ms_max": round(1000 * max(t for _, t in health), 1),
            "query_status": dict(Counter(s for s, _ in queries)),
            "query_ms_median": round(1000 * float(np.median([t for _, t in queries])), 1)}


def dropped_after(socks: list[socket.socket], limit_s: float = 40.0) -> float | None:
    """Seconds until the server has closed every socket (None: not within limit_s)."""
    t0, left = time.perf_counter(), len(socks)
    with selectors.DefaultSelector() as sel:  # epoll: select() takes no descriptor over 1,023
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        while left and time.perf_counter() - t0 < limit_s:
            for key, _ in sel.select(0.5):
                try:
                    closed = key.fileobj.recv(1024) == b""
                except OSError:
                    closed = True
                if closed:
                    sel.unregister(key.fileobj)
                    left -= 1
    return None if left else round(time.perf_counter() - t0, 1)


def run(quick: bool = False) -> dict:
    from benchmarks.search import clustered, write_cache
    from embedder.search.build import build_index

    resource.setrlimit(resource.RLIMIT_NOFILE, (max(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 20000),) * 2)
    counts = (0, 200, 1100) if quick else (0, 200, 900, 1100, 2000)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        X = clustered(2000 if quick else 20000, 64 if quick else 256, centers=20, seed=0)
        write_cache(Path(tmp) / "c.h5", X)
        build_index(Path(tmp) / "c.h5", Path(tmp) / "idx", kind="flat", progress=False)
        for name, (flags, files) in SERVERS.items():
            for n in counts if files == FILE_LIMIT else [c for c in counts if c >= 900]:
                with server(Path(tmp) / "idx", flags, files) as port:
                    socks = slow_clients(port, n)
                    t_first, seen = first_answer(port)
                    row = {"clients_in": len(socks), "first_health_s": None if t_first is None else round(t_first, 2),
                           "before": {str(k): v for k, v in seen.items()}}
                    if t_first is not None:
                        row |= latencies(port, X[7].tolist())
                    if name.startswith("defaults") and socks:
                        row["slow_clients_closed_after_s"] = dropped_after(socks)
                    for s in socks:
                        s.close()
                results[f"{name}, N={n}"] = row
                print(f"{name:12s} N={n:5d} {row}", flush=True)
    return results
