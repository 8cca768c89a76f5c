"""http(s) URLs as rows: fetched by the reader workers, never written to disk unless asked.

A row whose path is an `http://` or `https://` URL (in a file list or a table source) is
fetched with urllib3 by the process that decodes it, with

  * a timeout for connecting and for each read (`--fetch-timeout`), and a whole-attempt
    deadline of DEADLINE_FACTOR times it, so a server that drips its body byte by byte ends too;
  * a bounded retry with exponential backoff (`--fetch-retries`, urllib3's `Retry`): for
    connection errors, timeouts, bodies cut short and the statuses worth a second try
    (429 and 5xx, honouring Retry-After); a 404 is final at once;
  * a size cap (`--max-download-mb`): a Content-Length above it is refused before the body
    is read, and a body that grows past it is cut off there.

A failure is a BadImageError whose reason names the HTTP status (`HTTP 404 Not Found`) or
what went wrong, so it lands in the cache's errors table and the run goes on.

Fetches overlap: each batch's URLs, and those of the reader's next batches, are in flight
together on `--fetch-threads` threads per reader process, so the network's latency is
hidden behind decoding and the model.

`--keep-downloads DIR` keeps each fetched body as DIR/<h[:2]>/<h><ext> (h: the SHA-256 of the
URL, ext: the URL's image extension, else the Content-Type's) and appends `<h[:2]>/<h><ext><TAB>url`
to DIR/urls.tsv; a URL whose file is there already is read from it instead of fetched again
(re-embedding a URL list with another model costs no second download).
"""

from __future__ import annotations

import functools
import hashlib
import mimetypes
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from embedder._version import __version__
from embedder.errors import BadImageError

URL_SCHEMES = ("http://", "https://")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
DEADLINE_FACTOR = 6  # a whole attempt may take this many --fetch-timeouts
MANIFEST = "urls.tsv"
_CHUNK = 1 << 16


def is_url(path: str) -> bool:
    return path[:8].lower().startswith(URL_SCHEMES)


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
    """The process's pooled connections (keyed by pid: a forked reader must not share its parent's sockets)."""
    import urllib3

    return urllib3.PoolManager(num_pools=64, maxsize=connections, block=False, headers={"User-Agent": user_agent})


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
    """(body, Content-Type) of one GET, retried per `s`; BadImageError names the last failure."""
    import urllib3
    from urllib3.exceptions import HTTPError, MaxRetryError

    retry = urllib3.Retry(total=s.retries, backoff_factor=s.backoff, status_forcelist=RETRY_STATUSES,
                          allowed_methods={"GET"}, raise_on_status=False, respect_retry_after_header=True,
                          backoff_max=max(s.backoff * 2**s.retries, s.backoff))
    attempts = 0
    while True:
        attempts += 1
        try:
            return _attempt(http, url, s, retry)
        except _Transient as exc:
            try:
                # From the state the request left (its own retries count against the same total).
                retry = (exc.retries or retry).increment("GET", url, error=exc.cause)
            except MaxRetryError:
                raise BadImageError(f"{exc} ({attempts} attempts)" if attempts > 1 else str(exc)) from None
            retry.sleep()
        except MaxRetryError as exc:
            raise BadImageError(_describe(exc.reason, s)) from None
        except HTTPError as exc:
            raise BadImageError(_describe(exc, s)) from None


class _Transient(Exception):
    """A body cut short or too slow: worth another attempt, as a connection error is."""

    def __init__(self, message: str, cause: Exception):
        super().__init__(message)
        self.cause = cause
        self.retries = None  # the Retry state of the response whose body failed


def _attempt(http, url: str, s: FetchSettings, retry) -> tuple[Fetched, str]:
    import urllib3

    started = time.monotonic()
    r = http.request("GET", url, preload_content=False, retries=retry,
                     timeout=urllib3.Timeout(connect=s.timeout, read=s.timeout))
    try:
        if r.status >= 400:
            tries = len(r.retries.history) + 1 if r.retries is not None else 1
            raise BadImageError(_status(r.status) + (f" after {tries} attempts" if tries > 1 else ""))
        length = r.headers.get("Content-Length")
        length = int(length) if length is not None and length.isdigit() else None
        if length is not None and length > s.max_bytes:
            raise BadImageError(f"download of {length:,} bytes is over the --max-download-mb cap "
                                f"({s.max_bytes / 2**20:g} MB)")
        try:
            body = _body(r, url, s, started, length)
        except _Transient as exc:
            exc.retries = r.retries
            raise
    except BaseException:
        # A body not read to its end must not go back to the pool: the next request on that
        # connection would read the rest of this one.
        r.close()
        raise
    finally:
        r.release_conn()
    return Fetched(body, _last_modified(r.headers.get("Last-Modified"))), r.headers.get("Content-Type", "")


def _body(r, url: str, s: FetchSettings, started: float, length: int | None) -> bytes:
    """The response's body within the cap and the deadline; _Transient where it is cut short or too slow."""
    from urllib3.exceptions import ProtocolError, ReadTimeoutError

    body = bytearray()
    try:
        # read1: whatever has arrived, at once, so the deadline is checked while a body drips in.
        while chunk := r.read1(_CHUNK):
            body += chunk
            if len(body) > s.max_bytes:
                raise BadImageError(f"download is over the --max-download-mb cap ({s.max_bytes / 2**20:g} MB)")
            if time.monotonic() - started > s.timeout * DEADLINE_FACTOR:
                raise _Transient(f"download took over {s.timeout * DEADLINE_FACTOR:g} s "
                                 f"({len(body):,} bytes by then)", ReadTimeoutError(None, url, "deadline"))
    except ProtocolError as exc:
        got = f"{len(body):,} of {length:,}" if length is not None else f"{len(body):,}"
        raise _Transient(f"truncated download: {got} bytes", exc) from None
    except ReadTimeoutError as exc:
        raise _Transient(f"timed out reading the body after {s.timeout:g} s without data", exc) from None
    return bytes(body)


def _status(code: int) -> str:
    try:
        return f"HTTP {code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"HTTP {code}"


def _describe(exc: Exception, s: FetchSettings) -> str:
    """One line for a connection-level failure (after the retries)."""
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError, ReadTimeoutError

    tries = f" ({s.retries + 1} attempts)" if s.retries else ""
    # Subclasses first: urllib3's NewConnectionError is a ConnectTimeoutError, NameResolutionError a NewConnectionError.
    if isinstance(exc, NameResolutionError):
        return f"host not found{tries}"
    if isinstance(exc, NewConnectionError):
        return f"cannot connect: {str(exc).rsplit(': ', 1)[-1]}{tries}"
    if isinstance(exc, ReadTimeoutError):
        return f"timed out after {s.timeout:g} s waiting for the server{tries}"
    if isinstance(exc, ConnectTimeoutError):
        return f"timed out after {s.timeout:g} s connecting{tries}"
    return f"download failed: {exc}{tries}"


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
    from embedder.data.sources import IMAGE_EXTENSIONS

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
