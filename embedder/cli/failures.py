"""What a failure looks like on the terminal: one line that says what happened and what to do."""

from __future__ import annotations

import errno
import sys
import warnings

from embedder.errors import EmbedderError, EmbedderNotice

_default_showwarning = warnings.showwarning


def show_notice(message, category, filename, lineno, file=None, line=None):
    """Library notices (EmbedderNotice) as one `embedder: ...` line; other warnings as Python shows them."""
    if issubclass(category, EmbedderNotice):
        print(f"embedder: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def explain(exc: Exception) -> tuple[str, int]:
    """One line (or a short block, for listed differences) that says what happened and what to do."""
    if isinstance(exc, EmbedderError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):
        return _explain_os_error(exc), 1
    if isinstance(exc, MemoryError):
        return ("out of memory. Lower --batch-size (embed) or --memory-budget (index, probe), or close other "
                "programs; rerunning resumes what was committed."), 1
    return (f"internal error: {type(exc).__name__}: {exc}. This is a bug in embedder: rerun with --debug to see "
            "where it happened, and report it."), 70


def _explain_os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device{where}. Free some space and rerun the same command: finished and "
                "committed work is kept.")
    if exc.errno == errno.EROFS:
        return f"read-only file system{where}. Write the output (--out) to writable storage."
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}. Check the permissions, or write the output (--out) elsewhere."
    if exc.errno == errno.ENOENT:
        return f"no such file or folder{where}."
    reason = exc.strerror or str(exc)
    return f"{reason}{where}."
