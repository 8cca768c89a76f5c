"""http(s) URLs as rows: fetched by the reader workers, never written to disk unless asked.

A row whose path is an `http://` or `https://` URL (in a file list or a table source) is
fetched with urllib3 by the process that decodes it, with

  * a timeout for connecting and for each read (`--fetch-timeout`), and a total deadline per
    attempt of DEADLINE_FACTOR times it, connect to last byte: a watch shuts the attempt's socket
    when it passes, so a server that drips its headers or body, or sends 1xx answers forever,
    ends too (an interim answer other than 100 Continue where the final one should be is an error);
  * bounded retries (`--fetch-retries`), each attempt with its own deadline: for connection
    errors, timeouts, bodies cut short and the statuses worth a second try (429 and 5xx); a 404 is
    final at once. Between attempts, exponential backoff from `backoff`, or the server's
    Retry-After shortened to RETRY_AFTER_MAX; a row's attempts and waits all end within
    `row_deadline` ((retries + 1) attempts' deadlines): a wait that would pass it is not waited
    for, and the reason says so. urllib3 follows up to MAX_REDIRECTS redirects and retries nothing;
  * a size cap (`--max-download-mb`): a Content-Length above it is refused before the body
    is read, and a body that grows past it is cut off there.

A failure is a BadImageError whose reason names the HTTP status (`HTTP 404 Not Found`) or
what went wrong, so it lands in the cache's errors table and the run goes on: whatever one URL
raises (a redirect to an invalid Location, a malformed answer) is that row's error, never the run's.
A reader process waiting out a Retry-After dies with its run (embedder.data.workers).

Fetches overlap: each batch's URLs, and those of the reader's next batches, are in flight
together on `--fetch-threads` threads per reader process, so the network's latency is
hidden behind decoding and the model.

`--keep-downloads DIR` keeps each fetched body as DIR/<h[:2]>/<h><ext> (h: the SHA-256 of the
URL, ext: the URL's image extension, else the Content-Type's) and appends `<h[:2]>/<h><ext><TAB>url`
to DIR/urls.tsv; a URL whose file is there already is read from it instead of fetched again
(re-embedding a URL list with another model costs no second download).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import mimetypes
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from embedder._version import __version__
from embedder.data.formats import IMAGE_EXTENSIONS
from embedder.errors import BadImageError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
DEADLINE_FACTOR = 6  # a whole attempt, connect to last byte, may take this many --fetch-timeouts
RETRY_AFTER_MAX = 60.0  # seconds: a longer Retry-After is shortened to this (and must fit the row's deadline)
BACKOFF_MAX = 30.0  # seconds between two attempts without a Retry-After
MAX_REDIRECTS = 10
MANIFEST = "urls.tsv"
_CHUNK = 1 << 16


@dataclass(frozen=True)
class FetchSettings:
    """How URLs are fetched (EmbedConfig's fetch_* options, embedder.extract.config)."""

    timeout: float = 10.0  # seconds to connect, and between two reads
    retries: int = 3  # further attempts after the first
    backoff: float = 0.5  # seconds before the first retry, doubled at each
    max_bytes: int = 50 << 20
    threads: int = 16  # fetches in flight per reader process
    keep: str | None = None  # --keep-downloads DIR
    # Hosts that refuse unnamed clients accept one that says what it is and where it comes from.
    user_agent: str = f"embedder/{__version__} (image embedding; python-urllib3)"


@dataclass(frozen=True)
class Fetched:
    data: bytes
    mtime: float  # the Last-Modified header as POSIX time, NaN without one


class Fetcher:
    """Fetches URLs on a thread pool of its own; made lazily in each reader process."""

    def __init__(self, settings: FetchSettings):
        self.settings = settings
        self._pid: int | None = None
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"settings": self.settings}  # a spawned reader builds its own pool and threads

    def __setstate__(self, state):
        self.__init__(state["settings"])

    def _pool(self):
        # A DataLoader worker is a fork of the parent: the parent's threads do not come with it,
        # so each process starts its own the first time it fetches.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._threads = ThreadPoolExecutor(max_workers=self.settings.threads, thread_name_prefix="fetch")
            self._pending = {}
        return self._threads

    def prefetch(self, urls) -> None:
        """Start fetching `urls` (those not started yet) in the background."""
        pool = self._pool()
        with self._lock:
            for url in urls:
                if url not in self._pending:
                    self._pending[url] = pool.submit(fetch, url, self.settings)

    def get(self, url: str) -> Fetched:
        """The URL's body (started by `prefetch` or now); BadImageError with the reason."""
        self.prefetch([url])
        with self._lock:
            future = self._pending.pop(url)
        return future.result()

    def close(self) -> None:
        """Drop the downloads not started yet (a run that stops early, Ctrl-C): the interpreter waits
        for its threads at exit, so queued fetches would otherwise all run first."""
        with self._lock:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
        if self._pid == os.getpid():
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._pid = None


def fetch(url: str, s: FetchSettings) -> Fetched:
    """One URL on the calling thread: from --keep-downloads if kept there, else downloaded (and
    kept, with --keep-downloads); BadImageError with the reason."""
    kept = _kept(url, s)
    if kept is not None:
        return kept
    fetched, content_type = fetch_url(_client(os.getpid(), s.user_agent, s.threads), url, s)
    if s.keep:
        keep_download(Path(s.keep), url, fetched.data, content_type)
    return fetched


@functools.lru_cache(maxsize=8)
def _client(pid: int, user_agent: str, connections: int):
    """The process's pooled connections (keyed by pid: a forked reader must not share its parent's
    sockets), whose sockets the current attempt's watch can shut (_Watched)."""
    import urllib3
    from urllib3.connection import HTTPConnection, HTTPSConnection

    class Conn(_Watched, HTTPConnection):
        pass

    class SecureConn(_Watched, HTTPSConnection):
        pass

    class Pool(urllib3.HTTPConnectionPool):
        ConnectionCls = Conn

    class SecurePool(urllib3.HTTPSConnectionPool):
        ConnectionCls = SecureConn

    http = urllib3.PoolManager(num_pools=64, maxsize=connections, block=False, headers={"User-Agent": user_agent})
    http.pool_classes_by_scheme = {"http": Pool, "https": SecurePool}
    return http


# ----------------------------------------------------------------------------------------
# The total deadline of an attempt
# ----------------------------------------------------------------------------------------

_current = threading.local()  # .watch: the _Watch of the attempt running on this thread


class _Watch:
    """Shuts the sockets of one attempt when its deadline passes: a read blocked on a server that
    sends a byte per timeout (headers, 1xx answers, body) then ends at once, whatever urllib3 and
    http.client are doing. One timer thread per attempt, cancelled when the attempt ends."""

    def __init__(self, end: float):
        self.expired = False
        self._socks: list = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, end - time.monotonic()), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def add(self, sock) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                _shut(sock)

    def stop(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._socks.clear()  # the connection may go back to the pool: no later shutdown of it


@contextlib.contextmanager
def _watch(end: float):
    watch = _Watch(end)
    _current.watch = watch
    try:
        yield watch
    finally:
        _current.watch = None
        watch.stop()


def _shut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


class _Watched:
    """An urllib3 connection whose socket joins the current attempt's watch: when it is made
    (before TLS) and when a kept-alive one sends the next request."""

    def _new_conn(self):
        sock = super()._new_conn()
        _join(sock)
        return sock

    def request(self, *args, **kwargs):
        if self.sock is not None:
            _join(self.sock)
        return super().request(*args, **kwargs)


def _join(sock) -> None:
    watch = getattr(_current, "watch", None)
    if watch is not None:
        watch.add(sock)


def _kept(url: str, s: FetchSettings) -> Fetched | None:
    if not s.keep:
        return None
    path = kept_path(Path(s.keep), url)
    if path is None:
        return None
    try:
        return Fetched(path.read_bytes(), path.stat().st_mtime)
    except OSError:
        return None


def fetch_url(http, url: str, s: FetchSettings) -> tuple[Fetched, str]:
    """(body, Content-Type) of one GET, retried per `s` within the row's deadline; BadImageError
    names the last failure. Whatever one URL raises is its row's error, never the run's."""
    row_end = time.monotonic() + row_deadline(s)
    attempts = 0
    while True:
        attempts += 1
        try:
            return _attempt(http, url, s, min(time.monotonic() + s.timeout * DEADLINE_FACTOR, row_end))
        except _Retryable as exc:
            wait = _wait(exc, s, attempts, row_end)
            if isinstance(wait, str):
                raise BadImageError(exc.final(attempts) + wait) from None
            time.sleep(wait)
        except BadImageError:
            raise
        except Exception as exc:  # noqa: BLE001 - one URL's failure must not end the run (a bad Location, ...)
            raise BadImageError(f"download failed: {_one_line(exc)}") from None


def row_deadline(s: FetchSettings) -> float:
    """Seconds a row's attempts and the waits between them may take, all told."""
    return (s.retries + 1) * s.timeout * DEADLINE_FACTOR


def _wait(exc: _Retryable, s: FetchSettings, attempts: int, row_end: float) -> float | str:
    """Seconds to wait before the next attempt, or why there is none (appended to the reason)."""
    if attempts > s.retries:
        return ""
    if exc.retry_after is not None:
        wait = min(exc.retry_after, RETRY_AFTER_MAX)
    else:
        wait = min(s.backoff * 2 ** (attempts - 1), BACKOFF_MAX)
    if time.monotonic() + wait >= row_end:
        return f" (not retried: a {wait:g} s wait would pass the row's {row_deadline(s):g} s deadline)"
    return wait


class _Retryable(Exception):
    """A failure worth another attempt: a connection error, a timeout, a body cut short, 429 or 5xx."""

    def __init__(self, message: str, status: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.status = status  # the message is an HTTP status line
        self.retry_after = retry_after  # the server's Retry-After, in seconds

    def final(self, attempts: int) -> str:
        if attempts == 1:
            return str(self)
        return f"{self} after {attempts} attempts" if self.status else f"{self} ({attempts} attempts)"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _retry_policy():
    """urllib3's part: follow up to MAX_REDIRECTS redirects, and no retry of its own (the loop above
    retries, so each attempt has its own deadline), nor any Retry-After sleep on a redirect."""
    import urllib3

    return urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=MAX_REDIRECTS,
                         status_forcelist=(), raise_on_status=False, respect_retry_after_header=False,
                         retry_after_max=0)


def _attempt(http, url: str, s: FetchSettings, end: float) -> tuple[Fetched, str]:
    """One exchange, connect to last byte, ended by `end` (monotonic): the watch shuts the socket
    then, so a server that drips its headers or answers 1xx forever ends too."""
    import urllib3
    from urllib3.exceptions import HTTPError, MaxRetryError

    with _watch(end) as watch:
        try:
            r = http.request("GET", url, preload_content=False, retries=_retry_policy(),
                             timeout=urllib3.Timeout(connect=s.timeout, read=s.timeout))
        except MaxRetryError as exc:
            raise _expired(watch, s) or _connection_failure(exc.reason, s) from None
        except HTTPError as exc:
            raise _expired(watch, s) or BadImageError(_describe(exc, s)) from None
        try:
            return _response(r, s, end), r.headers.get("Content-Type", "")
        except BaseException as exc:
            # A body not read to its end must not go back to the pool: the next request on that
            # connection would read the rest of this one.
            r.close()
            if isinstance(exc, HTTPError):  # a body urllib3 cannot decode, a bad length ...
                raise _expired(watch, s) or _Retryable(f"download failed: {_one_line(exc)}") from None
            raise
        finally:
            r.release_conn()


def _response(r, s: FetchSettings, end: float) -> Fetched:
    if r.status in RETRY_STATUSES:
        raise _Retryable(_status(r.status), status=True, retry_after=retry_after(r.headers.get("Retry-After")))
    if r.status >= 400:
        raise BadImageError(_status(r.status))
    if r.status < 200:  # http.client skips 100 Continue only: a 102 or 103 here stands for a final answer
        raise _Retryable(f"{_status(r.status)}: an interim answer where the final one should be")
    if r.status >= 300:  # a redirect without a Location, or past MAX_REDIRECTS (urllib3 handled the others)
        raise BadImageError(f"{_status(r.status)} without a usable Location")
    length = r.headers.get("Content-Length")
    length = int(length) if length is not None and length.isdigit() else None
    if length is not None and length > s.max_bytes:
        raise BadImageError(f"download of {length:,} bytes is over the --max-download-mb cap "
                            f"({s.max_bytes / 2**20:g} MB)")
    return Fetched(_body(r, s, end, length), _last_modified(r.headers.get("Last-Modified")))


def retry_after(header: str | None) -> float | None:
    """A Retry-After header in seconds from now (delay-seconds or an HTTP date); None where absent or not valid."""
    if header is None:
        return None
    header = header.strip()
    if header.isdigit():
        return float(min(int(header), 10**9))  # a 400-digit value is still a number, not an overflow
    try:
        return max(0.0, parsedate_to_datetime(header).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _connection_failure(reason: Exception, s: FetchSettings) -> Exception:
    """The error of a failed exchange: worth a retry (connection, timeout) or final (a bad redirect...)."""
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProtocolError, ReadTimeoutError

    if isinstance(reason, (NewConnectionError, ConnectTimeoutError, ReadTimeoutError, ProtocolError)):
        return _Retryable(_describe(reason, s))
    return BadImageError(_describe(reason, s))


def _expired(watch: _Watch, s: FetchSettings) -> Exception | None:
    """The error of an exchange that the watch ended, or None where it did not."""
    if not watch.expired:
        return None
    return _Retryable(f"no complete answer within {s.timeout * DEADLINE_FACTOR:g} s (connect to last byte)")


def _body(r, s: FetchSettings, end: float, length: int | None) -> bytes:
    """The response's body within the cap and the deadline; _Retryable where it is cut short or too slow."""
    from urllib3.exceptions import ProtocolError, ReadTimeoutError

    body = bytearray()
    try:
        # read1: whatever has arrived, at once, so the deadline is checked while a body drips in.
        while chunk := r.read1(_CHUNK):
            body += chunk
            if len(body) > s.max_bytes:
                raise BadImageError(f"download is over the --max-download-mb cap ({s.max_bytes / 2**20:g} MB)")
            if time.monotonic() > end:
                raise _too_slow(s, body)
    except ProtocolError:
        if time.monotonic() >= end:  # the watch shut the socket
            raise _too_slow(s, body) from None
        got = f"{len(body):,} of {length:,}" if length is not None else f"{len(body):,}"
        raise _Retryable(f"truncated download: {got} bytes") from None
    except ReadTimeoutError:
        raise _Retryable(f"timed out reading the body after {s.timeout:g} s without data") from None
    if time.monotonic() >= end:  # the watch shut the socket of a body without a length: not its end
        raise _too_slow(s, body)
    return bytes(body)


def _too_slow(s: FetchSettings, body: bytearray) -> _Retryable:
    return _Retryable(f"download took over {s.timeout * DEADLINE_FACTOR:g} s ({len(body):,} bytes by then)")


def _status(code: int) -> str:
    try:
        return f"HTTP {code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"HTTP {code}"


def _describe(exc: Exception, s: FetchSettings) -> str:
    """One line for a connection-level failure (the attempts are counted by _Retryable.final)."""
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError, ReadTimeoutError

    # Subclasses first: urllib3's NewConnectionError is a ConnectTimeoutError, NameResolutionError a NewConnectionError.
    if isinstance(exc, NameResolutionError):
        return "host not found"
    if isinstance(exc, NewConnectionError):
        return f"cannot connect: {str(exc).rsplit(': ', 1)[-1]}"
    if isinstance(exc, ReadTimeoutError):
        return f"timed out after {s.timeout:g} s waiting for the server"
    if isinstance(exc, ConnectTimeoutError):
        return f"timed out after {s.timeout:g} s connecting"
    return f"download failed: {_one_line(exc)}"


def _last_modified(header: str | None) -> float:
    if header:
        try:
            return parsedate_to_datetime(header).timestamp()
        except (TypeError, ValueError):
            pass
    return float("nan")


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def _url_suffix(url: str) -> str:
    suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
    return suffix if suffix in IMAGE_EXTENSIONS else ""


def kept_path(folder: Path, url: str) -> Path | None:
    """Where --keep-downloads put this URL's body, or None if it has not."""
    h = url_hash(url)
    sub = folder / h[:2]
    suffix = _url_suffix(url)
    if suffix:
        return sub / f"{h}{suffix}" if (sub / f"{h}{suffix}").is_file() else None
    try:
        return next((sub / e.name for e in os.scandir(sub) if e.name.split(".", 1)[0] == h), None)
    except OSError:
        return None


def keep_download(folder: Path, url: str, data: bytes, content_type: str) -> Path:
    """Write a fetched body under `folder` and list it. Written under a temporary name and
    renamed, so a kill leaves no half file under the final name (no fsync: a kept download is a
    convenience, and one lost to a power cut is fetched again)."""
    h = url_hash(url)
    suffix = _url_suffix(url) or mimetypes.guess_extension(content_type.split(";")[0].strip()) or ""
    path = folder / h[:2] / f"{h}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    # One write of one short line with O_APPEND: reader processes appending at once do not interleave.
    fd = os.open(folder / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{path.relative_to(folder).as_posix()}\t{url}\n".encode())
    finally:
        os.close(fd)
    return path
