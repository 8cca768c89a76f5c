"""Exception types. Every message names the fix, not just the failure."""

from __future__ import annotations


class EmbedderError(Exception):
    """Base class: the CLI prints these as one clean line and exits non-zero."""

    exit_code = 2


class ConfigError(EmbedderError):
    """A setting that cannot be used as given (unknown model, bad option value, ...)."""


class SourceError(EmbedderError):
    """The image source is missing, empty or unreadable."""


class WeightsUnavailableError(EmbedderError):
    """Pretrained weights could not be obtained; the message says where to put them."""


class CacheError(EmbedderError):
    """The feature cache is unreadable, incomplete or locked."""


def did_you_mean(name: str, known, prefix: str = "") -> str:
    """" Did you mean 'x'?" for the known names closest to a mistyped one (difflib), else "": the one
    spelling of a suggestion for models, flags, pipeline keys, layers and columns alike."""
    import difflib

    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
    if not close and len(str(name)) >= 3:  # a name cut short: `gpus` for gpus_per_actor
        close = [k for k in known if k.startswith(str(name))][:3]
    return f" Did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else ""


def _shown(value: object) -> str:
    """A fingerprint component as a mismatch message shows it; one only one side records
    (e.g. compile) is "not set"."""
    return "not set" if value is None else repr(value)


class CacheMismatchError(CacheError):
    """A cache was written with a different configuration than the one asked for."""

    def __init__(self, path, differences: dict[str, tuple[object, object]], hint: str):
        self.path = path
        self.differences = differences
        lines = [f"{path} was written with a different configuration:"]
        for key, (cached, requested) in differences.items():
            lines.append(f"  {key}: cache has {_shown(cached)}, this run asks for {_shown(requested)}")
        lines.append(hint)
        super().__init__("\n".join(lines))


class AllImagesFailedError(EmbedderError):
    """Every image of a run failed to decode: almost certainly the wrong SOURCE."""


class PartialFailureError(EmbedderError):
    """Some parts of a command failed (a query image that does not read, among others that do): what
    succeeded is printed or written, and the command still exits non-zero, so scripts and pipelines stop."""


class EmbedderNotice(UserWarning):
    """Something a user should know before a long run (not an error): the CLI shows it as one line."""


class BadImageError(Exception):
    """One image cannot be used. Not an EmbedderError: it is recorded and skipped, never fatal."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DiskFullError(CacheError):
    """The output's file system is full; what was committed is safe and a rerun resumes."""

    exit_code = 1  # the system's state, not the user's input: like the other OS errors
    unclean = False  # True when an HDF5 write failed midway: the library's state is not to be trusted after


class FilterError(ConfigError):
    """A row filter (`--where`) that cannot be parsed or does not fit the columns; the message
    shows the filter with a caret under the bad token."""

    def __init__(self, text: str, pos: int, message: str):
        self.text, self.pos, self.reason = text, pos, message
        line = text.replace("\n", " ")
        super().__init__(f"bad filter: {message} (at column {pos + 1})\n  {line}\n  {' ' * pos}^")


class RemovedRowError(ConfigError):
    """A query names a row that was removed from the index (`embedder index INDEX_DIR --remove`)."""
