"""The HDF5 feature cache: schema, fingerprint and block reads.

Layout of a finished cache (`schema_version` 1)::

    /features        float32|float16 [N, D]  chunked (~1 MiB), resizable along N
    /paths           UTF-8 [N]                relative to SOURCE (absolute if outside it)
    /labels          int64 [N]                index into /classes, -1 when unlabelled
    /classes         UTF-8 [C]
    /errors/path     UTF-8 [E]                files that could not be used ...
    /errors/reason   UTF-8 [E]                ... and why
    /columns/<name>  int64|float64|bool|UTF-8 [N]  metadata columns, rows aligned with /paths
                                              (embedder.cache.columns; absent in older caches)
    attrs: schema_version, fingerprint, one attribute per fingerprint component,
           fingerprint_components (JSON), source, layout, feature_dim, feature_dtype,
           committed_rows, complete, command, ignored (JSON {reason: files} of the
           files under SOURCE that are not rows, e.g. not image names)

Paths are the file names' own bytes (UTF-8 for nearly all; see embedder.names), read back
with `errors="surrogateescape"` so that each one opens its file again.

Multi-layer caches (`embed --layer A --layer B`, `--style`) add, in the same file::

    /layers/<name>   float32|float16 [N, D_name]  one dataset per layer, rows aligned with /paths
    attrs: layers (JSON {name: width}, the primary first)

where <name> is the graph node (`layer3`, `features.29`) or `style` (the Gram style
descriptor, embedder.models.style). `/features` stays the primary (first) layer, so every reader
of single-layer caches works unchanged, and `/layers/<primary>` is an HDF5 hard link to it
(stored once). The fingerprint components gain `layers` (the list) and, with a style
descriptor, `style` (its layers, length and projection); single-layer caches have neither.

`FeatureCache(path, layer=NAME)` reads one layer as if it were the whole cache: `features`,
`dim`, `iter_blocks`, and `components`/`fingerprint` become those a single-layer cache of
that layer has, so probes, indexes and query backbones built on it check out against a
cache embedded with `--layer NAME` alone.

Writing (and why a kill cannot corrupt a cache) lives in `embedder.cache.writer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are not evaluated at run time
    from typing import Self

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from embedder.atomic import lock_holder
from embedder.cache.columns import kinds_in, read_columns
from embedder.cache.fingerprint import component_differences, fingerprint_of, layer_view_components
from embedder.cache.rowstate import compaction_pays, dead_counts
from embedder.cache.schema import (  # noqa: F401 - re-exported
    FEATURE_DTYPES,
    PARTIAL_SUFFIX,
    SCHEMA_VERSION,
    SHARDS_SUFFIX,
)
from embedder.errors import CacheError, ConfigError, EmbedderError
from embedder.models.outputspec import OutputSpec
from embedder.names import ERRORS as NAME_ERRORS
from embedder.outputs import CACHE, expect

STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class CacheSpec:
    """What a run asks the cache to hold. `components` define the feature space."""

    components: dict[str, str]
    source: str
    feature_dim: int
    layout: str = "imagefolder"
    command: str = ""
    layers: dict[str, int] = field(default_factory=dict)  # multi-layer caches: {name: width}, primary first
    columns: dict[str, str] = field(default_factory=dict)  # metadata columns: {name: kind} (embedder.data.metadata)
    # {graph node: the name a person uses for it} (Lite0's global_pool.flatten is `avgpool`): shown
    # beside node names; not part of the fingerprint, so caches written before it compare equal.
    aliases: dict[str, str] = field(default_factory=dict)
    # The fidelity card of a fast path (--precision int8, bf16, fast; embedder.extract.fidelity), JSON; "" = none.
    # Not a component: it measures the features, it does not decide them.
    fidelity: str = ""
    # {name a person may give -> the layer it names} (FrozenBackbone.layer_names): the run's own resolution of
    # its --layer names and the model's aliases, so a reader resolves `--layer` without the registry. Not a
    # component either; {} (caches written before it) leaves readers on the registry (`resolve_layer`).
    names: dict[str, str] = field(default_factory=dict)

    @property
    def extra_layers(self) -> dict[str, int]:
        """The layers stored in /layers besides the primary one (which is /features)."""
        return dict(list(self.layers.items())[1:])

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.components)

    @property
    def feature_dtype(self) -> str:
        return self.components.get("feature_dtype", "float32")

    def differences(self, components: dict[str, str], source: str) -> dict[str, tuple[object, object]]:
        """Fields that differ, as {field: (cached value, requested value)}."""
        diff = component_differences(components, self.components)
        if source != self.source:
            diff["source"] = (source, self.source)
        return diff


def chunk_rows(dim: int, itemsize: int) -> int:
    return max(1, (1 << 20) // max(1, dim * itemsize))


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------


@dataclass
class Block:
    start: int
    features: np.ndarray
    labels: np.ndarray

    @property
    def stop(self) -> int:
        return self.start + len(self.features)


def resolve_layer(name: str | None, layers: list[str], names: dict[str, str] | None, model: str) -> str | None:
    """The stored layer (of `layers`, the first the default) that `name` asks for, else None: the one
    resolution of a `--layer` given to read a cache or an index made from one. `names` is the map the
    writing run recorded (`CacheSpec.names`); None, for caches written before it, is the legacy route:
    the aliases the registry gives the cache's `model` today (none for a model this version does not know)."""
    if name in layers:
        return name
    wanted = OutputSpec.parse(name)
    if names is None:
        names = _registry_aliases(model)
    node = wanted.node(names, layers[0])
    return node if node in layers else None


def _registry_aliases(model: str) -> dict[str, str]:
    from embedder.models.registry import get_backbone_spec

    try:
        return dict(get_backbone_spec(model).layer_aliases)
    except EmbedderError:  # a model this version does not know: plain names only
        return {}


class FeatureCache:
    """Read-only view of a cache. Nothing is loaded whole unless asked for.

    Parameters
    ----------
    path : str or PathLike
        The cache (``feats.h5``).
    require_complete : bool
        Refuse a cache whose run has not finished (False: read what is committed, through the live view).
    layer : str, optional
        The layer of a multi-layer cache, as the run named it (an alias, a graph node, ``A+B``, ``style``)
        or as stored; None: the primary layer (/features).
    live : bool
        Hide the rows that a sync superseded or removed and number the live rows 0..n-1; False reads every
        stored row (what the writer and an index, whose ids are stored rows, need).

    Examples
    --------
    >>> with FeatureCache("feats.h5") as cache:
    ...     for block in cache.iter_blocks(65536):
    ...         use(block.features, block.labels)
    """

    def __init__(self, path: str | os.PathLike, require_complete: bool = True, layer: str | None = None,
                 live: bool = True):
        """`layer` picks the layer of a multi-layer cache (None = the primary, /features). `live`: rows
        superseded or removed by a sync (embedder.cache.sync) are hidden, and the live rows numbered
        0..n-1; False reads every stored row (what the writer and an index, whose ids are stored rows, need)."""
        self.path = Path(path)
        if not self.path.is_file():
            try:
                expect(self.path, CACHE)  # says what is there instead: an index folder, a user's folder
            except ConfigError as exc:
                raise CacheError(str(exc)) from None
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise CacheError(f"{self.path} is not a readable HDF5 file: {exc}") from exc
        attrs = self._f.attrs
        if "schema_version" not in attrs or "fingerprint" not in attrs:
            self._f.close()
            raise CacheError(f"{self.path} is an HDF5 file but not an embedder feature cache.")
        if int(attrs["schema_version"]) > SCHEMA_VERSION:
            self._f.close()
            raise CacheError(
                f"{self.path} has schema version {int(attrs['schema_version'])}, newer than this embedder "
                f"understands ({SCHEMA_VERSION}). Upgrade embedder."
            )
        if require_complete and not self.complete:
            message = self.incomplete_reason()
            self._f.close()
            raise CacheError(message)
        if not self.complete:
            missing = [s.file_name for s in self._virtual_sources() if not (self.path.parent / s.file_name).exists()]
            if missing:
                self._f.close()
                raise CacheError(f"{self.path} is incomplete and its part files are gone ({missing[0]} ...).")
        try:
            self.layer = self._resolve_layer(layer)
        except EmbedderError:  # not this cache's layer, or not a layer name at all
            self._f.close()
            raise
        self._ds_name = "features" if self.layer == self.primary_layer else f"layers/{self.layer}"
        # Stored rows of the live rows, when some are dead and hidden (None: every row is read as stored).
        state = self.row_state
        self._live = np.flatnonzero(state == 0) if live and state is not None and state.any() else None

    def incomplete_reason(self) -> str:
        """Why an incomplete cache cannot be used yet: a run still writing it, or one that was interrupted."""
        pid = self.writer_pid
        if pid is not None:
            return (
                f"{self.path} is still being written by a running embedder process (pid {pid}; "
                f"{self.committed_rows} rows committed so far). Wait for it to finish."
            )
        return (
            f"{self.path} is incomplete ({self.committed_rows} rows committed): its run was interrupted. "
            f"Rerun `{self._f.attrs.get('command', '') or 'the embed command'}` to finish it."
        )

    @property
    def writer_pid(self) -> int | None:
        """Pid of the live process writing this cache (its write lock is held), else None."""
        return lock_holder(self.path)

    # layers --------------------------------------------------------------------------------
    @property
    def layers(self) -> dict[str, int]:
        """{name: width} of every stored layer, the primary first."""
        if "layers" in self._f.attrs:
            return json.loads(self._f.attrs["layers"])
        return {self.file_components.get("layer", "features"): int(self._f["features"].shape[1])}

    @property
    def primary_layer(self) -> str:
        return next(iter(self.layers))

    def _resolve_layer(self, layer: str | None) -> str:
        node = resolve_layer(layer, list(self.layers), self.layer_names, self.file_components.get("model", ""))
        if node is not None:
            return node
        raise CacheError(
            f"{self.path} has no layer {layer!r}; it holds {', '.join(self.layers)}. Embed it with `--layer {layer}` "
            "(several --layer options store several layers in one pass)."
        )

    def layer_rows(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Rows of any stored layer, whichever layer this view reads.

        Parameters
        ----------
        name : str
            A stored layer's name (`layers`).
        rows : slice or ndarray of int, optional
            The rows (default: all).

        Returns
        -------
        ndarray of shape (rows, the layer's width)
        """
        ds = self._f["features" if name == self.primary_layer else f"layers/{name}"]
        return self._read(ds, rows)

    def _virtual_sources(self):
        ds = self._f["features"]
        return ds.virtual_sources() if ds.is_virtual else []

    # metadata ------------------------------------------------------------------------------
    @property
    def h5file(self) -> h5py.File:
        """The open file, read-only: for code that copies its on-disk layout (dataset dtypes, the shards
        behind a view), as the cache's writer, views and compaction do."""
        return self._f

    @property
    def attrs(self) -> h5py.AttributeManager:
        return self._f.attrs

    @property
    def file_fingerprint(self) -> str:
        """Fingerprint of the whole file (all its layers): what a rerun must match to resume or append."""
        return str(self._f.attrs["fingerprint"])

    @property
    def file_components(self) -> dict[str, str]:
        return json.loads(self._f.attrs["fingerprint_components"])

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the feature space read (the chosen layer); the file's for single-layer caches."""
        if "layers" not in self._f.attrs:
            return self.file_fingerprint
        return fingerprint_of(self.components)

    @property
    def components(self) -> dict[str, str]:
        """Components of the feature space read: those of a cache holding only the chosen layer."""
        components = self.file_components
        if "layers" not in self._f.attrs:
            return components
        return layer_view_components(components, self.layer)

    @property
    def source(self) -> str:
        return str(self._f.attrs["source"])

    @property
    def spec(self) -> CacheSpec:
        """What the file was written with, every layer included: the spec a copy of it is written with."""
        attrs = self._f.attrs
        layers = json.loads(attrs["layers"]) if "layers" in attrs else {}
        return CacheSpec(self.file_components, self.source, int(attrs["feature_dim"]), str(attrs["layout"]),
                         str(attrs["command"]), layers, self.column_kinds, self.aliases,
                         str(attrs.get("fidelity", "")), self.layer_names or {})

    @property
    def layer_names(self) -> dict[str, str] | None:
        """{name -> layer} the run that wrote this cache resolved (`CacheSpec.names`); None for a cache
        written before it was recorded, which `resolve_layer` resolves through the registry instead."""
        return json.loads(self._f.attrs["layer_names"]) if "layer_names" in self._f.attrs else None

    @property
    def aliases(self) -> dict[str, str]:
        """{node: alias} of the layers this cache holds ({} for caches written before aliases were kept)."""
        return json.loads(self._f.attrs.get("layer_aliases", "{}"))

    def layer_label(self, node: str | None = None) -> str:
        """A layer as a person names it, with the graph node beside it: `avgpool (global_pool.flatten)`.

        Parameters
        ----------
        node : str, optional
            A stored layer (default: the one this view reads).

        Returns
        -------
        str
        """
        node = node or self.layer
        alias = self.aliases.get(node)
        return f"{alias} ({node})" if alias and alias != node else node

    @property
    def complete(self) -> bool:
        return bool(self._f.attrs["complete"])

    @property
    def committed_rows(self) -> int:
        return int(self._f.attrs["committed_rows"])

    @property
    def dim(self) -> int:
        return int(self._f[self._ds_name].shape[1])

    def __len__(self) -> int:
        return self.stored_rows if self._live is None else len(self._live)

    @property
    def stored_rows(self) -> int:
        """Rows in the file, dead ones included."""
        return int(self._f["features"].shape[0])

    @property
    def row_state(self) -> np.ndarray | None:
        """Per stored row: 0 live, 1 superseded, 2 removed (embedder.cache.sync); None when all are live."""
        return self._f["row_state"][:] if "row_state" in self._f else None

    @property
    def generation(self) -> int:
        """Consolidations that changed this file's rows (an index records the one it reflects)."""
        return int(self._f.attrs.get("generation", 0))

    @property
    def live_rows(self) -> np.ndarray | None:
        """The stored row of each row read (None: they are the same)."""
        return self._live

    def _read(self, ds: h5py.Dataset, rows):
        """`ds` at `rows` of this view: many scattered live rows are read as one contiguous span and
        picked in memory (HDF5's point selection is slow)."""
        stored = self._stored(rows)
        if stored is None:
            return ds[:]
        span = _span(stored)
        return ds[stored] if span is None else ds[span][stored - span.start]

    def _stored(self, rows):
        """Rows of the live view -> stored rows (increasing, as h5py wants); None stays None (all)."""
        if self._live is None:
            return rows
        if rows is None:
            return self._live
        return self._live[rows]

    @property
    def classes(self) -> list[str]:
        return list(self._f["classes"].asstr()[:])

    # metadata columns (embedder.cache.columns) --------------------------------------------
    @property
    def column_names(self) -> list[str]:
        """Names of the stored metadata columns; empty for a cache written before columns existed."""
        return list(self.column_kinds)

    @property
    def column_kinds(self) -> dict[str, str]:
        """{name: kind} of the stored columns (int64, float64, bool or str)."""
        return kinds_in(self._f) or {}

    def columns(self, names: Sequence[str] | None = None,
                rows: slice | np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Metadata columns.

        Parameters
        ----------
        names : sequence of str, optional
            The columns (default: all); an unknown name is a CacheError listing the columns.
        rows : slice or ndarray of int, optional
            The rows (default: all).

        Returns
        -------
        dict of str to ndarray
            {name: values}; str columns as object arrays of str.
        """
        if not self.column_kinds and names is None:
            return {}
        stored = self._stored(rows)
        span = _span(stored)
        if span is None:
            return self._checked(read_columns(self._f, names, stored, what=str(self.path)))
        values = read_columns(self._f, names, span, what=str(self.path))
        return self._checked({n: v[stored - span.start] for n, v in values.items()})

    # rows ----------------------------------------------------------------------------------
    @property
    def labels(self) -> np.ndarray:
        labels = self._f["labels"][:]
        return labels if self._live is None else labels[self._live]

    @property
    def paths(self) -> list[str]:
        if not len(self):
            return []
        paths = self._checked(read_paths(self._f["paths"]))
        return paths if self._live is None else [paths[i] for i in self._live]

    def path_rows(self, rows: slice) -> list[str]:
        """The paths of a range of rows (streaming readers: `paths` reads them all).

        Parameters
        ----------
        rows : slice

        Returns
        -------
        list of str
            Paths relative to the cache's source (or URLs).
        """
        view = self._f["paths"].asstr(errors=NAME_ERRORS)
        return self._checked(list(view[rows] if self._live is None else view[self._live[rows]]))

    def label_rows(self, rows: slice) -> np.ndarray:
        """The labels of a range of rows (-1: none).

        Parameters
        ----------
        rows : slice

        Returns
        -------
        ndarray of int64
        """
        return self._checked(self._read(self._f["labels"], rows))

    @property
    def errors(self) -> list[tuple[str, str]]:
        g = self._f["errors"]
        if not len(g["path"]):
            return []
        return list(zip(read_paths(g["path"]), g["reason"].asstr()[:]))

    @property
    def ignored_counts(self) -> dict[str, int]:
        """{reason: files} for the files under SOURCE that are not rows (not image names, hidden, ...)."""
        return json.loads(self._f.attrs.get("ignored", "{}"))

    def features(self, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """The features of this layer.

        Parameters
        ----------
        rows : slice or ndarray of int, optional
            The rows (default: all of them, loaded whole: `iter_blocks` streams instead).

        Returns
        -------
        ndarray of shape (rows, dim)
            In the cache's stored dtype (float32 unless embedded with --dtype float16).
        """
        return self._checked(self._read(self._f[self._ds_name], rows))

    def iter_blocks(self, block_rows: int = 65536) -> Iterator[Block]:
        """Stream the features and labels in row order.

        Parameters
        ----------
        block_rows : int
            Rows per block.

        Yields
        ------
        Block
            ``start`` (counting live rows), ``features`` and ``labels``.
        """
        ds, labels = self._f[self._ds_name], self._f["labels"]
        for start in range(0, len(self), block_rows):
            stop = min(start + block_rows, len(self))
            if self._live is None:
                yield Block(start, *self._checked((ds[start:stop], labels[start:stop])))
                continue
            # One contiguous read over the stored rows of this block, the dead ones dropped after.
            stored = self._live[start:stop]
            span = slice(int(stored[0]), int(stored[-1]) + 1)
            keep = stored - stored[0]
            yield Block(start, *self._checked((ds[span][keep], labels[span][keep])))

    def _checked(self, data):
        """Rows read from an incomplete cache -- a live view over a run's part files -- are only
        good if the parts were still there: the writer moves their folder away before deleting
        anything, so a read that raced the end of the run is refused instead of returning the
        view's fill values (NaN rows, empty paths)."""
        if not self.complete and not self.path.with_name(self.path.name + PARTIAL_SUFFIX).is_dir():
            raise CacheError(
                f"The run writing {self.path} finished (or moved its parts) while this reader had it open. "
                "Open it again to read the finished cache."
            )
        return data

    def close(self) -> None:
        """Close the file (a ``with`` block does it)."""
        self._f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe(path: str | os.PathLike, list_errors: bool = False) -> dict:
    """What `embedder info` shows: rows, width, fingerprint and components, classes with counts, errors,
    ignored files, and whether the run is finished, still going (its writer's pid) or was interrupted."""
    with FeatureCache(path, require_complete=False) as cache:
        errors = cache.errors
        labels = cache.labels
        dead = dead_counts(cache.row_state)
        doc = {
            "path": str(path),
            "rows": len(cache),
            "stored_rows": cache.stored_rows,
            "superseded": dead["superseded"],
            "removed": dead["removed"],
            "generation": cache.generation,
            "compact": compaction_pays(cache.stored_rows, dead["superseded"] + dead["removed"]),
            "dim": cache.dim,
            "dtype": str(cache.attrs["feature_dtype"]),
            "complete": cache.complete,
            "fingerprint": cache.file_fingerprint,
            "components": cache.file_components,
            "layers": cache.layers,
            "layer_labels": {n: cache.layer_label(n) for n in (cache.layers or {cache.layer: cache.dim})},
            "columns": cache.column_kinds,
            "source": cache.source,
            "layout": str(cache.attrs["layout"]),
            "classes": cache.classes,
            "rows_per_class": {c: int((labels == i).sum()) for i, c in enumerate(cache.classes)},
            "unlabelled_rows": int((labels < 0).sum()),
            "errors": len(errors),
            "ignored": cache.ignored_counts,
            "command": str(cache.attrs["command"]),
            "writer_pid": None if cache.complete else cache.writer_pid,
        }
        doc["fidelity"] = json.loads(cache.attrs["fidelity"]) if "fidelity" in cache.attrs else None
        if "shards" in cache.attrs:  # a view over the shards of a --backend ray run
            doc["shards"] = int(cache.attrs["shards"])
        if list_errors:
            doc["error_list"] = [{"path": p, "reason": r} for p, r in errors]
    return doc


def _span(stored) -> slice | None:
    """The contiguous stored rows covering a long list of live rows (None: read `stored` as given)."""
    if not isinstance(stored, np.ndarray) or len(stored) < 1024:
        return None
    return slice(int(stored.min()), int(stored.max()) + 1)


def read_paths(ds: h5py.Dataset) -> list[str]:
    """A dataset of stored file names, as the `str`s that open the files (see embedder.names)."""
    return list(ds.asstr(errors=NAME_ERRORS)[:])


def open_cache(path: str | os.PathLike, require_complete: bool = True, layer: str | None = None) -> FeatureCache:
    return FeatureCache(path, require_complete=require_complete, layer=layer)


def recorded_components(out: str | os.PathLike) -> dict[str, str] | None:
    """The fingerprint components of what already stands at `out` (an interrupted run's parts, the
    cache itself, or a sharded run's plan), or None when there is nothing readable: what a resume or
    an append must match, so `auto` settings can follow it."""
    out = Path(out)
    for manifest in (out.with_name(out.name + PARTIAL_SUFFIX) / "manifest.json",
                     out.with_name(out.name + SHARDS_SUFFIX) / "manifest.json"):
        try:
            return dict(json.loads(manifest.read_text())["components"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if out.exists():
        try:
            with FeatureCache(out, require_complete=False) as cache:
                return dict(cache.file_components)
        except Exception:  # noqa: BLE001 - unreadable here; the writer says why when it opens it
            return None
    return None


def recorded_fidelity(out: str | os.PathLike) -> dict | None:
    """The fidelity card of what already stands at `out` (an interrupted run's parts or the cache), or None."""
    out = Path(out)
    try:
        text = json.loads((out.with_name(out.name + PARTIAL_SUFFIX) / "manifest.json").read_text()).get("fidelity")
        if text:
            return json.loads(text)
    except (OSError, ValueError, AttributeError):
        pass
    if out.exists():
        try:
            with FeatureCache(out, require_complete=False) as cache:
                return json.loads(cache.attrs["fidelity"]) if "fidelity" in cache.attrs else None
        except Exception:  # noqa: BLE001 - unreadable here; the writer says why when it opens it
            return None
    return None
