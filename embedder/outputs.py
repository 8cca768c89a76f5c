"""The one output policy: what a command may put at the path its `--out` names.

Every command that writes goes through `claim` (early, before any slow setup) and `write_dir` /
`write_file` (under the output's write lock, staged, swapped in whole). The rules are git's and
rsync's:

1. A path that does not exist, or an empty folder, is free.
2. What embedder wrote is recognised by a marker it wrote there, never by the path alone: a
   `.embedder-output.json` file in a folder, an `embedder_output` attribute in an HDF5 file, an
   `embedder-output` text chunk in a PNG. Outputs written before markers existed are recognised
   by the files only embedder writes together (an index's meta.json + index.faiss + rows.h5, a
   probe folder's probe.pt, a cache's schema attributes, ...).
3. A command replaces only an output of its own kind. Anything else at `--out` (a feature cache
   given as an index's `--out`, a folder of the user's files, a PNG embedder did not draw) is
   refused in one line that names what is there, with or without `--overwrite`.
4. An output of its own kind made from the same inputs is rebuilt, as `make` would (rerunning a
   command redoes its work). One made from other inputs is replaced only with `--overwrite`, so a
   mistyped `--out` cannot silently swap one index for another. (`embed` appends to a cache of
   the same configuration and replaces one of another configuration only with `--overwrite`:
   the same rule, where "inputs" are the feature space.)
5. Nothing is deleted before the new output is complete (embedder.atomic stages and swaps), and
   files that lived beside the old output and are not in the new one are named, with the command
   that rebuilds them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from embedder.atomic import WriteLock, file_staging, staging
from embedder.errors import ConfigError

MARKER = ".embedder-output.json"  # in a folder output
H5_ATTR = "embedder_output"  # on an HDF5 file output
PNG_KEY = "embedder-output"  # a PNG text chunk


@dataclass(frozen=True)
class OutputKind:
    """One kind of output: how it is named in messages and how one written before markers is recognised."""

    name: str  # "index", "probe folder", ...
    folder: bool
    signature: tuple[str, ...] = ()  # files that together mark a legacy folder of this kind
    suffixes: tuple[str, ...] = ()  # a file kind's suffixes
    rebuild: dict[str, str] = field(default_factory=dict)  # file beside the output -> how to rebuild it

    def __str__(self) -> str:
        return self.name


CACHE = OutputKind("feature cache", folder=False, suffixes=(".h5", ".hdf5"))
INDEX = OutputKind("index", folder=True, signature=("meta.json", "index.faiss", "rows.h5"),
                   rebuild={"map.h5": "embedder map {out}"})
PROBE = OutputKind("probe folder", folder=True, signature=("probe.pt",))
SWEEP = OutputKind("layer-sweep folder", folder=True, signature=("sweep.json",))
CURATE = OutputKind("curate report", folder=True, signature=("summary.json", "scores.parquet"))
FINETUNE = OutputKind("fine-tuning folder", folder=True, signature=("best.pt", "history.json"))
VECTORS = OutputKind("vector export", folder=True, signature=("embedder.json",))
SAMPLES = OutputKind("sample dataset", folder=True, signature=(".complete",))
PICTURE = OutputKind("picture", folder=False, suffixes=(".png",))
CLASSIFIER = OutputKind("exported classifier", folder=False, suffixes=(".pt",))
KINDS = (CACHE, INDEX, PROBE, SWEEP, CURATE, FINETUNE, VECTORS, SAMPLES, PICTURE, CLASSIFIER)


@dataclass(frozen=True)
class Found:
    """What is at a path: an embedder output of `kind` (made from `inputs`, None when unrecorded),
    or something else (`kind` None, `what` says what)."""

    kind: OutputKind | None
    what: str
    inputs: tuple[str, ...] | None = None


def _key(paths: Sequence[str | os.PathLike]) -> tuple[str, ...]:
    return tuple(os.path.realpath(os.fspath(p)) for p in paths)


def what_is_at(path: str | os.PathLike) -> Found | None:
    """What embedder sees at `path`: None for nothing (or an empty folder)."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if path.is_symlink() and not path.exists():
        return Found(None, "a broken symbolic link")
    if path.is_dir():
        return _folder(path)
    if not path.is_file():
        return Found(None, "a special file (not a regular file or folder)")
    return _file(path)


def _folder(path: Path) -> Found | None:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return None
    marker = path / MARKER
    if marker.is_file():
        try:
            doc = json.loads(marker.read_text())
            kind = next(k for k in KINDS if k.name == doc["kind"])
            return Found(kind, f"an {kind}" if kind.name[0] in "aeiou" else f"a {kind}", tuple(doc.get("inputs", ())))
        except (ValueError, KeyError, StopIteration, OSError):
            pass  # a damaged marker proves nothing: judged by the files
    for kind in KINDS:
        if kind.folder and kind.signature and all(n in names for n in kind.signature):
            return Found(kind, _a(kind.name), None)
    if (path / "manifest.json").is_file() and path.name.endswith((".partial", ".shards")):
        return Found(None, "the work folder of a feature cache's run")
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return Found(None, f"a folder embedder did not write (it holds {shown})")


def _file(path: Path) -> Found:
    head = path.read_bytes()[:8] if path.stat().st_size else b""
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return _h5(path)
    if head.startswith(b"\x89PNG"):
        from PIL import Image

        try:
            with Image.open(path) as im:
                doc = json.loads(im.text.get(PNG_KEY, "null") or "null")
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict):
            return Found(PICTURE, "a picture embedder drew", tuple(doc.get("inputs", ())))
        return Found(None, "a PNG picture embedder did not draw")
    if head.startswith(b"PK") and path.suffix == ".pt" and _is_exported_classifier(path):
        return Found(CLASSIFIER, "an exported classifier", None)
    return Found(None, "a file embedder did not write")


def _h5(path: Path) -> Found:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = f.attrs
            if H5_ATTR in attrs:
                doc = json.loads(attrs[H5_ATTR])
                return Found(CACHE, "a feature cache", tuple(doc.get("inputs", ())))
            if "fingerprint" in attrs and "schema_version" in attrs:
                return Found(CACHE, "a feature cache", None)
    except (OSError, ValueError):
        pass
    return Found(None, "an HDF5 file that is not a feature cache")


def _is_exported_classifier(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        return False
    return str(_torch_format(path) or "").startswith("embedder-classifier")


def _torch_format(path: Path) -> str | None:
    import torch

    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
        return None
    return doc.get("format") if isinstance(doc, dict) else None


def _a(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def claim(path: str | os.PathLike, kind: OutputKind, inputs: Sequence[str | os.PathLike] = (),
          overwrite: bool = False, flag: str = "--out") -> Path:
    """Check that this command may write `kind` at `path` (rules 1-4 above); returns it absolute.

    Call it before any slow setup; `write_dir`/`write_file` call it again under the write lock."""
    path = Path(path).absolute()
    if not kind.folder and path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder, and {_a(kind.name)} is a file: "
                          f"name a file, e.g. {_suggest(path, kind)}.")
    found = what_is_at(path)
    if found is None:
        return path
    if found.kind is None:
        shape = ", and this command writes a directory" if kind.folder and not path.is_dir() else ""
        raise ConfigError(f"{flag} {path} is {found.what}{shape}; embedder replaces only its own outputs. "
                          f"Choose another {flag}, e.g. {_suggest(path, kind)}.")
    if found.kind is not kind:
        raise ConfigError(f"{flag} {path} is {found.what}, not {_a(kind.name)}: refusing to replace it. "
                          f"Choose another {flag}, e.g. {_suggest(path, kind)}.")
    if overwrite or found.inputs is None or not inputs or _key(found.inputs) == _key(inputs):
        return path
    made_from = ", ".join(found.inputs)
    raise ConfigError(f"{flag} {path} is {found.what} made from {made_from}, not from {', '.join(map(str, inputs))}. "
                      f"Pass --overwrite to replace it, or choose another {flag}.")


def _suggest(path: Path, kind: OutputKind) -> str:
    stem = path.name.split(".")[0] or "out"
    suffix = {"index": ".index", "probe folder": ".probe", "curate report": ".curate", "picture": ".png",
              "feature cache": ".h5", "exported classifier": ".pt", "vector export": ".vectors"}.get(kind.name, "_out")
    candidate = path.with_name(stem + suffix)
    return str(candidate if candidate != path else path.with_name(stem + "_new" + suffix))


def marker_doc(kind: OutputKind, inputs: Sequence[str | os.PathLike]) -> str:
    from embedder._version import __version__

    return json.dumps({"kind": kind.name, "inputs": list(_key(inputs)), "embedder": __version__})


@dataclass
class Written:
    """What publishing an output replaced: files of the old one that the new one lacks, with how to rebuild each."""

    path: Path
    dropped: dict[str, str] = field(default_factory=dict)

    def notes(self) -> list[str]:
        return [f"the old {name} beside it was dropped (its rows may have changed); rebuild it with `{how}`"
                for name, how in self.dropped.items()]


@contextmanager
def write_dir(out: str | os.PathLike, kind: OutputKind, inputs: Sequence[str | os.PathLike] = (),
              overwrite: bool = False, flag: str = "--out") -> Iterator[tuple[Path, Written]]:
    """Write a folder output: yields (an empty staging folder, the Written record). The folder replaces
    `out` in one step when the block ends without error; the marker goes in with it."""
    out = Path(out).absolute()
    with WriteLock(out):
        claim(out, kind, inputs, overwrite, flag)
        old = {p.name for p in out.iterdir()} if out.is_dir() else set()
        written = Written(out)
        with staging(out) as tmp:
            (tmp / MARKER).write_text(marker_doc(kind, inputs))
            yield tmp, written
            new = {p.name for p in tmp.iterdir()}
            written.dropped = {n: kind.rebuild[n].format(out=out) for n in sorted(old - new) if n in kind.rebuild}


@contextmanager
def write_file(out: str | os.PathLike, kind: OutputKind, inputs: Sequence[str | os.PathLike] = (),
               overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Write a file output: yields the temporary path to write (the caller marks it, e.g. with
    `png_metadata`), which replaces `out` in one step when the block ends without error."""
    out = Path(out).absolute()
    with WriteLock(out):  # its lock file is beside `out`: the folder exists from here on
        claim(out, kind, inputs, overwrite, flag)
        with file_staging(out) as tmp:
            yield tmp


def png_metadata(inputs: Sequence[str | os.PathLike]) -> dict[str, str]:
    """The text chunk that marks a PNG as embedder's (matplotlib's savefig `metadata=`)."""
    return {PNG_KEY: marker_doc(PICTURE, inputs)}


def require_suffix(path: str | None, kind: OutputKind, flag: str = "--out") -> None:
    """Refuse a file output whose name says another format (plot --out x.h5), before any work."""
    if path is not None and not str(path).lower().endswith(kind.suffixes):
        raise ConfigError(f"{flag} should name a {' or '.join(kind.suffixes)} file ({kind}), got {path!r}.")


_MAKE = {"feature cache": "embedder embed SOURCE --out {path}", "index": "embedder index CACHE.h5 --out {path}",
         "probe folder": "embedder probe CACHE.h5 --out {path}"}


def expect(path: str | os.PathLike, kind: OutputKind, flag: str = "") -> None:
    """Refuse an input that is not `kind`, naming what it is instead (an index given where a cache is
    expected is called an index, with the cache it was built from). Returns when it may be `kind`."""
    path = Path(path)
    found = what_is_at(path)
    named = f"{flag} {path}" if flag else str(path)
    if found is not None and found.kind is kind:
        return
    if found is None:
        make = _MAKE.get(kind.name, "").format(path=path)
        raise ConfigError(f"No {kind} at {path}." + (f" Create it with `{make}`." if make else ""))
    if found.kind is INDEX and kind is CACHE:
        built_from = _index_cache(path)
        raise ConfigError(f"{named} is an index folder, not a feature cache"
                          + (f"; it was built from the cache {built_from}: pass that." if built_from else "."))
    if found.kind is CACHE and kind is INDEX:
        raise ConfigError(f"{named} is a feature cache, not an index folder. Build an index of it with "
                          f"`embedder index {path} --out {_suggest(path, INDEX)}` and pass that folder.")
    raise ConfigError(f"{named} is {found.what}, not {_a(kind.name)}.")


def _index_cache(path: Path) -> str | None:
    try:
        return str(json.loads((path / "meta.json").read_text()).get("cache") or "") or None
    except (OSError, ValueError):
        return None
