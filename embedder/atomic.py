"""Crash-safe file-system steps: atomic replacement of files and folders, write locks, and
removal of what a killed process left behind.

Every output embedder writes (a cache, an index folder, a probe folder, a checkpoint) is
built under a temporary name next to its final path and then *replaced* in one rename, so
a `kill -9` at any moment leaves either the old output or the new one, never a mix.

Temporary names are `NAME.tmp-<pid>` (files) and `.NAME.tmp-<pid>` / `.NAME.old-<pid>`
(folders). They are only ever made by the holder of the output's write lock, so whoever
holds the lock next knows that any of them still there belongs to a dead process, and
removes it (`remove_leftovers`).

Write locks (`WriteLock`) are POSIX record locks (`fcntl.lockf`), not `flock`: a record
lock belongs to the process, so the reader processes an extraction forks do not inherit
it, and it vanishes the instant its holder dies, even by `kill -9`. A second writer is
refused at once with the holder's pid; a stale lock file needs no cleanup and no wait.
Record locks are per process, so a registry refuses a second lock within one process too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are not evaluated at run time
    from typing import Self

import ctypes
import errno
import fcntl
import os
import shutil
import struct
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from embedder.errors import CacheError

TMP = ".tmp-"
OLD = ".old-"


# ---------------------------------------------------------------------------------- files


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(tmp: Path, final: Path) -> None:
    """Make the finished file `tmp` the file `final`: its bytes reach the disk before the rename does."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks (weights files are hundreds of MB)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_torch(payload, path: Path) -> None:
    """`torch.save` through memory: its zip writer turns a full disk into an opaque RuntimeError
    ("unexpected pos"), while a plain write raises the OSError (ENOSPC) that says what happened."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    Path(path).write_bytes(buf.getbuffer())


def is_disk_full(exc: BaseException) -> bool:
    """A failed write because the device is full, however the library reports it: OSError
    ENOSPC/EDQUOT, or HDF5's and faiss's RuntimeErrors that carry the errno in their text."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc) if isinstance(exc, (OSError, RuntimeError)) else ""
    return "errno = 28" in text or "No space left on device" in text or "Disk quota exceeded" in text


def temp_file(path: Path) -> Path:
    """The temporary sibling this process writes `path` under."""
    return path.with_name(f"{path.name}{TMP}{os.getpid()}")


def discard(path: Path) -> None:
    """Remove a temporary file or folder if it is there (after a failed write)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -------------------------------------------------------------------------------- folders


def temp_dir(path: Path, kind: str = TMP) -> Path:
    return path.with_name(f".{path.name}{kind}{os.getpid()}")


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # e.g. a file system without exchange support: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(tmp: Path, out: Path) -> None:
    """Make the finished folder `tmp` the folder `out`, replacing any old one atomically."""
    for entry in tmp.rglob("*"):
        if entry.is_file():
            fsync_path(entry)
    fsync_path(tmp)
    if not out.exists():
        os.replace(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp)  # `tmp` now holds the old folder; a kill here leaves a leftover, not a gap
    else:
        # Two renames: between them `out` is missing, and `remove_leftovers` puts the old one back.
        old = temp_dir(out, OLD)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    fsync_path(out.parent)


def remove_leftovers(out: Path) -> list[Path]:
    """Remove what dead writers of `out` left (call with `out`'s write lock held). Returns what went.

    A folder swapped out by a two-rename publish that was killed halfway is put back as `out`
    first, so the last complete output is never lost."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    olds = sorted(out.parent.glob(f".{_glob_escape(out.name)}{OLD}*"))
    if olds and not out.exists():
        os.replace(olds.pop(), out)
    patterns = (f"{_glob_escape(out.name)}{TMP}*", f".{_glob_escape(out.name)}{TMP}*")
    for leftover in olds + [p for pattern in patterns for p in out.parent.glob(pattern)]:
        discard(leftover)
        removed.append(leftover)
    return removed


@contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Write a folder output: yields an empty temporary folder that replaces `out` in one step
    when the block ends without error. `out`'s write lock is held throughout, so a second
    writer is refused at once, and what a killed writer left is removed first."""
    out = Path(out).absolute()
    with WriteLock(out), staging(out) as tmp:
        yield tmp


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """`staged_dir` for a caller that holds `out`'s write lock already (e.g. one that waited for it)."""
    remove_leftovers(out)
    tmp = temp_dir(out)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        publish_dir(tmp, out)
    except BaseException:
        discard(tmp)
        raise


@contextmanager
def staged_file(out: str | os.PathLike) -> Iterator[Path]:
    """`staged_dir` for a single file: yields the temporary path to write."""
    out = Path(out).absolute()
    with WriteLock(out), file_staging(out) as tmp:
        yield tmp


@contextmanager
def file_staging(out: Path) -> Iterator[Path]:
    """`staged_file` for a caller that holds `out`'s write lock already (embedder.outputs.write_file)."""
    remove_leftovers(out)
    tmp = temp_file(out)
    try:
        yield tmp
        atomic_replace(tmp, out)
    except BaseException:
        discard(tmp)
        raise


def _glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


# ---------------------------------------------------------------------------------- locks


_HELD: dict[tuple[int, int], int] = {}  # (device, inode) of lock files this process holds -> fd
_HELD_GUARD = threading.Lock()


def lock_path_for(out: Path) -> Path:
    """`CACHE.h5` -> `CACHE.h5.lock`; a folder `INDEX` -> `.INDEX.lock` (beside it, not inside)."""
    out = Path(out).absolute()
    return out.with_name(out.name + ".lock") if out.suffix in (".h5", ".hdf5") else out.with_name(f".{out.name}.lock")


class WriteLock:
    """Exclusive write lock on the output `what`, held by this process while the context runs."""

    def __init__(self, what: str | os.PathLike, lock_path: Path | None = None, wait_s: float = 0.0):
        """`wait_s`: how long to wait for another holder to finish before refusing (0: refuse at once;
        outputs a user names are refused at once, shared ones such as a cached graph are waited for)."""
        self.what = Path(what).absolute()
        self.path = Path(lock_path) if lock_path else lock_path_for(self.what)
        self.wait_s = wait_s
        self.fd: int | None = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                return self._acquire_now()
            except CacheError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    def _acquire_now(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Under the guard throughout: a record lock dies with *any* close of its file in this
        # process, so no descriptor of a lock file we hold may be opened (and closed) meanwhile.
        with _HELD_GUARD:
            while self.fd is None:
                if _held_here(self.path):
                    raise self._refusal(os.getpid())
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    busy = exc.errno in (errno.EAGAIN, errno.EACCES)
                    holder = _holder_of(fd) if busy else None
                    os.close(fd)
                    if busy:
                        raise self._refusal(holder) from None
                    raise
                key = _key(os.fstat(fd))
                # The previous holder may have unlinked the file between our open and our lock.
                try:
                    same = _key(os.stat(self.path)) == key
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                _HELD[key] = fd
                self.fd, self.key = fd, key
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())  # for people; the lock itself is the truth

    def release(self) -> None:
        if self.fd is None:
            return
        with _HELD_GUARD:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            _HELD.pop(self.key, None)
            os.close(self.fd)
            self.fd = None

    def _refusal(self, pid: int | None) -> CacheError:
        who = f"pid {pid}" + (", this very process" if pid == os.getpid() else "") if pid else "pid unknown"
        return CacheError(
            f"Another embedder process ({who}) is writing {self.what} (lock {self.path}). Wait for it to "
            "finish, or write to another --out."
        )


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


# struct flock on Linux (x86-64, aarch64): short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK = "hhqqi4x"


def _holder_of(fd: int) -> int | None:
    """Pid of the process holding a write lock on the file open as `fd`, or None (F_GETLK asks, locks nothing)."""
    if not sys.platform.startswith("linux"):
        return None
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        l_type, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    return pid if l_type != fcntl.F_UNLCK else None


def _held_here(path: Path) -> bool:
    try:
        return _key(os.stat(path)) in _HELD
    except FileNotFoundError:
        return False


def lock_holder(what: str | os.PathLike, lock_path: Path | None = None) -> int | None:
    """Pid of the live process writing `what`, or None when nobody is (e.g. its writer was killed)."""
    path = Path(lock_path) if lock_path else lock_path_for(Path(what))
    with _HELD_GUARD:
        if _held_here(path):
            return os.getpid()  # opening (and closing) the file here would release our own lock
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return _holder_of(fd)
        finally:
            os.close(fd)  # this process holds no lock on it (checked above): the close releases nothing
