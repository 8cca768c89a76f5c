"""A misbehaving web server (tests/loopback.py's hostile routes): every URL ends as bytes or as its
row's error with a reason, within the row's deadline; never an exception out of the fetcher, a
hang, or the bytes of another answer. The corpus: bad redirects, Retry-After values, servers
slow before the body, malformed answers."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from embedder.data.fetch import DEADLINE_FACTOR, RETRY_AFTER_MAX, Fetcher, FetchSettings, retry_after, row_deadline
from embedder.errors import BadImageError
from tests.conftest import alive, make_tree
from tests.loopback import LoopbackServer

S = FetchSettings(timeout=0.3, retries=1, backoff=0.01, max_bytes=1 << 20)
ATTEMPT = f"{0.3 * DEADLINE_FACTOR:g} s"

# (route, the value it sends, what the row's error says: a regular expression, or None: the image)
CORPUS = [
    # Redirects whose Location is not a URL we can follow: the row's error, never the run's.
    ("location", "http://[::1", r"^download failed: ValueError: Invalid IPv6 URL$"),
    ("location", "http://[zz]/x.png", r"^download failed: "),
    ("location", "", r"^HTTP 302 Found without a usable Location$"),
    ("location", "ftp://host/x.png", r"^download failed: URLSchemeUnknown"),
    ("location", "file:///etc/passwd", r"^download failed: LocationValueError"),
    ("location", "http://exa mple.com:99999/", r"^download failed: LocationParseError"),
    ("location", "http://%zz/", r"^download failed: LocationParseError"),
    ("location", "http://127.0.0.1:0/", r"^cannot connect: .*\(2 attempts\)$"),
    ("location", "\x00\x01", r"^download failed: |\(2 attempts\)$"),  # a loop or a closed connection, by order
    ("location", "http://127.0.0.1:1:2/", r"^download failed: "),
    ("location", "/img/a.png", None),  # a relative Location that works
    # Retry-After: honoured up to RETRY_AFTER_MAX and within the row's deadline, else not waited for.
    ("retry-after", "100000", r"^HTTP 503 Service Unavailable \(not retried: a 60 s wait would pass"),
    ("retry-after", "9" * 400, r"^HTTP 503 Service Unavailable \(not retried: a 60 s wait would pass"),
    ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT", r"\(not retried: a 60 s wait would pass"),
    ("retry-after", "garbage", r"^HTTP 503 Service Unavailable after 2 attempts$"),
    ("retry-after", "-5", r"^HTTP 503 Service Unavailable after 2 attempts$"),
    ("retry-after", "1.5", r"^HTTP 503 Service Unavailable after 2 attempts$"),
    ("retry-after", "", r"^HTTP 503 Service Unavailable after 2 attempts$"),
    ("retry-after", "Thu, 01 Jan 1970 00:00:00 GMT", r"^HTTP 503 Service Unavailable after 2 attempts$"),
    # Slow before (or instead of) the body: the attempt's watch ends each within its deadline.
    ("drip-head", None, rf"^download took over {ATTEMPT} .*\(2 attempts\)$|^no complete answer within {ATTEMPT}"),
    ("interim", None, rf"^no complete answer within {ATTEMPT} \(connect to last byte\) \(2 attempts\)$"),
    ("interim", "HTTP/1.1 102 Processing", r"^HTTP 102 Processing: an interim answer"),
    ("interim", "HTTP/1.1 103 Early Hints", r"^HTTP 103 Early Hints: an interim answer"),
    ("endless", None, rf"^download took over {ATTEMPT} \(\d+ bytes by then\) \(2 attempts\)$"),
    # Malformed answers.
    ("raw", b"hello\r\n", r"BadStatusLine.*\(2 attempts\)$"),
    ("raw", b"", r"RemoteDisconnected.*\(2 attempts\)$"),
    ("raw", b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nxx", r"over the --max-download-mb cap"),
    ("raw", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx", r"^truncated download: 0 bytes"),
    ("raw", b"HTTP/1.1 999 Weird\r\nContent-Length: 0\r\n\r\n", r"^HTTP 999$"),
    ("raw", b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n", r"got more than 100 headers"),
    ("raw", b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", r"LineTooLong"),
    ("raw", b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nxxxx", r"^download failed: DecodeError"),
    ("raw", b"HTTP/1.1 301 Moved\r\nContent-Length: 0\r\n\r\n", r"^HTTP 301 Moved Permanently without a usable Location$"),
    ("raw", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", r"^HTTP 101 Switching Protocols: an interim"),
    ("raw", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nxxx", r"InvalidHeader"),
    ("raw", b"HTTP/1.1 429 Slow down\r\nRetry-After: 86400\r\nContent-Length: 0\r\n\r\n", r"^HTTP 429 Too Many Requests \(not"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_tree(tmp_path_factory.mktemp("imgs"), classes=("a",), per_class=2)
    (folder / "a.png").write_bytes(next(folder.rglob("*.jpg")).read_bytes())
    with LoopbackServer(folder, slow_s=0.5) as srv:
        yield srv


def _outcome(srv, route, value, name, settings=S):
    """(bytes or None, the error's reason or None, the exception that escaped or None), within a bound
    far above the row's deadline: a hang fails the test instead of stalling the suite."""
    srv.hostile[name] = value
    out = {}

    def run():
        try:
            out["data"] = Fetcher(settings).get(srv.url(route, name)).data
        except BadImageError as exc:
            out["reason"] = exc.reason
        except BaseException as exc:  # noqa: BLE001 - what must not happen
            out["escaped"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=20 * row_deadline(settings))
    assert not thread.is_alive(), f"{route} {value!r}: still fetching long past the row's deadline"
    return out.get("data"), out.get("reason"), out.get("escaped")


@pytest.mark.parametrize("i", range(len(CORPUS)), ids=[f"{r}-{i}" for i, (r, *_) in enumerate(CORPUS)])
def test_a_hostile_answer_ends_as_its_rows_error_within_the_deadline(server, i):
    import re

    route, value, expected = CORPUS[i]
    # A case that must give the image gets a read timeout no busy machine runs into (0.3 s is there to keep
    # the hostile cases short; on a loaded CI runner it once timed out the working redirect).
    settings = S if expected is not None else dataclasses.replace(S, timeout=10.0)
    data, reason, escaped = _outcome(server, route, value, f"case{i}", settings)
    assert escaped is None, f"{type(escaped).__name__}: {escaped}"
    if expected is None:
        assert data == (server.folder / "a.png").read_bytes()
    else:
        assert reason is not None and re.search(expected, reason), reason


def test_a_connection_left_mid_answer_is_not_reused_for_the_next_url(server):
    """An interim answer sent forever must not leak into the next request on a kept-alive connection."""
    fetcher = Fetcher(S)
    server.hostile["leak"] = "HTTP/1.1 102 Processing"
    for _ in range(3):
        with pytest.raises(BadImageError):
            fetcher.get(server.url("interim", "leak"))
        assert fetcher.get(server.url("img", "a.png")).data == (server.folder / "a.png").read_bytes()


def test_retry_after_is_parsed_and_bounded():
    assert retry_after("7") == 7.0 and retry_after(" 7 ") == 7.0
    assert retry_after("9" * 400) == 1e9  # a number, not an OverflowError
    assert retry_after("garbage") is None and retry_after(None) is None and retry_after("-1") is None
    assert retry_after("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0
    assert retry_after("Fri, 31 Dec 9999 23:59:59 GMT") > RETRY_AFTER_MAX


def test_a_short_retry_after_is_waited_for_and_then_retried(server):
    server.hostile["short"] = "1"
    assert _outcome(server, "retry-after", "1", "short")[1] == "HTTP 503 Service Unavailable after 2 attempts"
    assert server.hits["/retry-after/short"] == 2


_KILLED_RUN = """
import sys
from embedder.extract.local import embed
from tests.conftest import fast_config
embed(fast_config(sys.argv[1], sys.argv[2], workers=1, fetch_timeout=20, fetch_retries=1))
"""


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_reader_waiting_out_a_retry_after_dies_with_its_killed_run(server, tmp_path):
    server.hostile["wait"] = "50"  # the reader sleeps 50 s before its second attempt
    (tmp_path / "urls.txt").write_text(server.url("retry-after", "wait") + "\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(tmp_path / "urls.txt"), str(tmp_path / "c.h5")],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while server.hits["/retry-after/wait"] < 1:  # the reader worker is in its Retry-After wait
            assert run.poll() is None and time.monotonic() < deadline, "the run never fetched"
            time.sleep(0.1)
        readers = _children(run.pid)
        assert readers, "no reader process"
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    deadline = time.monotonic() + 30  # far below the 50 s the reader would sleep without the parent-death signal
    while any(alive(p) for p in readers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in readers), "a reader outlived its killed run"
    assert server.hits["/retry-after/wait"] == 1
