"""File names as the cache stores them, and as people read them.

POSIX file names are bytes; most are UTF-8, but old archives hold Latin-1 (`caf\\xe9.png`)
and any byte but `/` and NUL is allowed. Python lists such a name as a `str` with the
undecodable bytes "surrogate-escaped" (U+DC80..U+DCFF), and that `str` opens the same file.

The cache keeps every name exactly:
  * `/paths` (and `/errors/path`, and an index's `rows.h5`) hold each name's bytes as the
    file system gives them. A valid UTF-8 name -- nearly all of them -- is plain UTF-8, as
    before; a name that is not valid UTF-8 is stored as its raw bytes.
  * embedder reads them back with `errors="surrogateescape"`, so the `str` round-trips to
    the same file (`encode_path(decode_path(b)) == b`). Outside h5py users read the same
    way: `ds.asstr(errors="surrogateescape")[:]`.
  * People see `display_path(p)`: undecodable bytes as `\\xNN` and control characters
    (a newline in a name) as escapes, so one row stays one line of output. JSON answers of
    the HTTP service carry this form too, since JSON text cannot hold raw bytes.
"""

from __future__ import annotations

ERRORS = "surrogateescape"


def encode_path(path: str) -> bytes:
    """The bytes of a listed name, as stored in the cache (the file system's own bytes)."""
    return path.encode("utf-8", ERRORS)


def decode_path(data: bytes | str) -> str:
    """A stored name back to the `str` that opens the file."""
    return data if isinstance(data, str) else data.decode("utf-8", ERRORS)


def display_path(path: str) -> str:
    """A readable, single-line form: undecodable bytes as \\xNN, control characters escaped."""
    if path.isprintable():
        return path
    shown = path.encode("utf-8", ERRORS).decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in shown)
