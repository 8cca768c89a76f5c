"""Vectors in files other tools read: `export-vectors` and its reverse, `import-vectors`.

Two layouts of DIR, both with `DIR/embedder.json` (what was exported: rows, width, layer,
source, the cache's fingerprint and components, classes, columns):

    parquet   DIR/embeddings.parquet: one table, one row group per block read, with `id` (the
              cache row), `path`, `label` (class name, null when unlabelled), every metadata
              column, and `embedding` (fixed-size list<float32>[D], the cached vectors). pandas,
              pyarrow and LanceDB read it as is; DuckDB reads `embedding` as FLOAT[] (Parquet has no
              fixed-size lists), so its array functions take `embedding::FLOAT[D]` (embedder.json's
              `duckdb_cast`).
    npy       clip-retrieval's layout: DIR/img_emb/img_emb_{i}.npy (float32 or float16 [n_i, D],
              the cache's dtype) and DIR/metadata/metadata_{i}.parquet with the same rows in the
              same order: `image_path` (the file, SOURCE joined to the path; a tar row's is
              `SHARD.tar/MEMBER`, see embedder.data.rows), `path`, `label` and the metadata columns.
              autofaiss (`--embeddings DIR/img_emb`) and clip-retrieval's back end rank by inner
              product, so for `metric` cosine (the default, as the index's) the vectors are written
              L2-normalised; embedder.json records `metric` and `normalized`. `i` is zero-padded to the
              digits of the part count.

File names that are not UTF-8 (raw bytes, embedder.names) are written with `\\xNN` escapes,
since Parquet strings are UTF-8. Both stream: a block of `block_rows` rows is read from the cache and written, so memory stays
flat whatever the cache's size (benchmarks/export.py). Nulls become Parquet nulls: NaN floats
and user int columns' INT_NULL (embedder.data.metadata); the built-in ints keep their -1.

`import-vectors` builds a cache from either layout (or clip-retrieval's own output). Its
fingerprint records where the vectors came from -- `model = imported`, `weights` = SHA-256 of
the input files, `imported_from` = their paths -- so index, search by id / path / vector and
probe work on it, and anything that needs the backbone (search by image) is refused, saying why.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedder.atomic import staged_dir
from embedder.cache.reader import FeatureCache
from embedder.data.metadata import INT_NULL, MATCHED
from embedder.data.rows import row_location
from embedder.errors import ConfigError
from embedder.names import ERRORS as NAME_ERRORS

FORMATS = ("parquet", "npy")
METRICS = ("cosine", "l2")  # what the npy export's readers rank by (the index's --metric)
PARQUET_FILE = "embeddings.parquet"
SIDECAR = "embedder.json"
IMPORTED = "imported"  # the `model` component of an imported cache
DEFAULT_BLOCK_ROWS = 8192  # 16 MiB of 512-d float32 vectors per block
DEFAULT_ROWS_PER_FILE = 1_000_000


QUERY_INSTEAD = "Search by --id, --path or --vector (a .npy made by the tool that made the vectors) instead."


def imported_refusal(components: dict, needs: str = "embed query images with", instead: str = QUERY_INSTEAD) -> str:
    """Why a cache's backbone cannot be rebuilt ('' when it can): its vectors were imported."""
    if components.get("model") != IMPORTED:
        return ""
    return (f"This cache's vectors were imported by `embedder import-vectors` (from "
            f"{components.get('imported_from', '?')}): there is no backbone to {needs}. {instead}")


@dataclass
class VectorsReport:
    """What an export or an import wrote."""

    out: str
    format: str
    rows: int
    dim: int
    files: list[str] = field(default_factory=list)  # relative to `out` (export), or the inputs read (import)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)  # import: casts made to the metadata's columns

    def summary(self) -> str:
        shown = ", ".join(self.files[:4]) + (f" ... ({len(self.files)} files)" if len(self.files) > 4 else "")
        return f"wrote {self.out}: {self.rows} rows x {self.dim} ({self.format}; {shown}) in {self.wall_s:.1f} s"

    def as_dict(self) -> dict:
        return {"out": self.out, "format": self.format, "rows": self.rows, "dim": self.dim, "files": self.files,
                "wall_s": self.wall_s, "notes": self.notes}


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------


def export_vectors(cache_path, out, fmt: str = "parquet", *, layer: str | None = None,
                   rows_per_file: int = DEFAULT_ROWS_PER_FILE, block_rows: int = DEFAULT_BLOCK_ROWS,
                   overwrite: bool = False, progress: bool = True, metric: str = "cosine") -> VectorsReport:
    """Write the rows of a cache (one layer) into the folder `out`, block by block (module docstring).
    `out` is staged and swapped in whole; an existing `out` is refused unless `overwrite`. `metric`: what
    the npy export's readers should rank by; cosine writes unit vectors, since they rank by inner product."""
    from tqdm.auto import tqdm

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}.")
    t0 = time.perf_counter()
    with FeatureCache(cache_path, layer=layer) as cache, staged_dir(out) as tmp:
        if Path(out).exists() and not overwrite:
            raise ConfigError(f"{out} exists. Use --overwrite to replace it, or choose another --out.")
        bar = tqdm(total=len(cache), unit="row", desc="export", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True)
        with bar:
            if fmt == "parquet":
                files = _write_parquet(cache, tmp, max(1, block_rows), bar)
            else:
                files = _write_npy(cache, tmp, max(1, rows_per_file), max(1, block_rows), bar, metric == "cosine")
        (tmp / SIDECAR).write_text(json.dumps(_sidecar(cache, fmt, metric), indent=1))
        rows, dim = len(cache), cache.dim
    return VectorsReport(str(out), fmt, rows, dim, files, time.perf_counter() - t0)


def _sidecar(cache: FeatureCache, fmt: str, metric: str) -> dict:
    layout = {"format": f"embedder-vectors/{fmt}", "rows": len(cache), "dim": cache.dim, "layer": cache.layer,
              "source": cache.source, "fingerprint": cache.fingerprint, "components": cache.components,
              "classes": cache.classes, "columns": cache.column_kinds}
    if fmt == "npy":
        # What the vectors are, for tools that rank by inner product (autofaiss, clip-retrieval).
        layout.update(metric=metric, normalized="l2" if metric == "cosine" else "as cached")
    else:
        # Parquet has no fixed-size list type: DuckDB reads `embedding` as FLOAT[], and its array functions
        # (array_cosine_similarity, array_inner_product) take FLOAT[D]: this cast.
        layout["duckdb_cast"] = f"embedding::FLOAT[{cache.dim}]"
    return layout


def _schema(cache: FeatureCache, embedding: bool, image_path: bool):
    import pyarrow as pa

    kinds = {"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(), "str": pa.string()}
    fields = [("image_path", pa.string())] if image_path else [("id", pa.int64())]
    fields += [("path", pa.string()), ("label", pa.string())]
    fields += [(name, kinds[kind]) for name, kind in cache.column_kinds.items()]
    if embedding:
        fields.append(("embedding", pa.list_(pa.float32(), cache.dim)))
    return pa.schema(fields)


def _table(cache: FeatureCache, schema, start: int, stop: int, features: np.ndarray | None):
    """The rows [start, stop) as an Arrow table of `schema`."""
    import pyarrow as pa

    rows = slice(start, stop)
    # Parquet strings are UTF-8: a name that is not (raw bytes, embedder.names) is written with \xNN escapes.
    paths = [p.encode("utf-8", NAME_ERRORS).decode("utf-8", "backslashreplace") for p in cache.path_rows(rows)]
    labels, classes = cache.label_rows(rows), cache.classes
    data = {"path": paths, "label": [classes[i] if i >= 0 else None for i in labels.tolist()]}
    if "id" in schema.names:
        data["id"] = np.arange(start, stop, dtype=np.int64)
    if "image_path" in schema.names:
        data["image_path"] = [row_location(cache.source, p) for p in paths]
    kinds = cache.column_kinds
    for name, values in cache.columns(list(kinds), rows).items():
        data[name] = pa.array(values.tolist() if kinds[name] == "str" else values, mask=_null_mask(name, values))
    if features is not None:
        flat = pa.array(np.ascontiguousarray(features, dtype=np.float32).reshape(-1))
        data["embedding"] = pa.FixedSizeListArray.from_arrays(flat, cache.dim)
    return pa.table({name: data[name] for name in schema.names}, schema=schema)


def _null_mask(name: str, values: np.ndarray) -> np.ndarray | None:
    if values.dtype.kind == "f":
        return np.isnan(values)
    if values.dtype.kind == "i" and name != MATCHED:
        return values == INT_NULL
    return None


def _write_parquet(cache: FeatureCache, tmp: Path, block_rows: int, bar) -> list[str]:
    import pyarrow.parquet as pq

    schema = _schema(cache, embedding=True, image_path=False)
    with pq.ParquetWriter(tmp / PARQUET_FILE, schema) as writer:
        for start in range(0, len(cache), block_rows):
            stop = min(start + block_rows, len(cache))
            writer.write_table(_table(cache, schema, start, stop, cache.features(slice(start, stop))),
                               row_group_size=block_rows)
            bar.update(stop - start)
    return [PARQUET_FILE]


def _write_npy(cache: FeatureCache, tmp: Path, rows_per_file: int, block_rows: int, bar, unit: bool) -> list[str]:
    """clip-retrieval's parts: each .npy written as a header then its rows, one block at a time; `unit`:
    each row divided by its L2 norm (in float32; a zero row stays zero)."""
    import pyarrow.parquet as pq

    n, dim = len(cache), cache.dim
    parts = max(1, math.ceil(n / rows_per_file))
    digits = int(math.log10(parts)) + 1  # clip-retrieval's padding: the names sort in row order
    (tmp / "img_emb").mkdir()
    (tmp / "metadata").mkdir()
    schema, dtype, files = _schema(cache, embedding=False, image_path=True), np.dtype(cache.features(slice(0, 0)).dtype), []
    for k in range(parts):
        lo, hi = k * rows_per_file, min((k + 1) * rows_per_file, n)
        emb, meta = f"img_emb/img_emb_{k:0{digits}d}.npy", f"metadata/metadata_{k:0{digits}d}.parquet"
        with open(tmp / emb, "wb") as f, pq.ParquetWriter(tmp / meta, schema) as writer:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (hi - lo, dim)}
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(lo, hi, block_rows):
                stop = min(start + block_rows, hi)
                block = cache.features(slice(start, stop))
                if unit:
                    block = np.asarray(block, dtype=np.float32)
                    block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), np.finfo(np.float32).tiny)
                f.write(memoryview(np.ascontiguousarray(block, dtype=dtype)))  # no copy where it is already so
                writer.write_table(_table(cache, schema, start, stop, None), row_group_size=block_rows)
                bar.update(stop - start)
        files += [emb, meta]
    return files


# ----------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------


@dataclass
class _Piece:
    """One part of the input: its vectors (a .npy, or a Parquet file's `embedding`) and its metadata."""

    vectors: Path
    metadata: Path | None  # the .npy's metadata part; None: the Parquet file itself

    def files(self) -> list[Path]:
        return [self.vectors] + ([self.metadata] if self.metadata else [])


def find_pieces(inputs: list[str]) -> list[_Piece]:
    """The parts of DIR (either layout, or clip-retrieval's output) or of the files given, in order."""
    pieces: list[_Piece] = []
    for item in map(Path, inputs):
        if item.is_dir():
            if (item / "img_emb").is_dir():
                pieces += [_npy_piece(p) for p in sorted((item / "img_emb").glob("*.npy"))]
            else:
                pieces += [_Piece(p, None) for p in sorted(item.glob("*.parquet"))]
        elif item.suffix == ".npy":
            pieces.append(_npy_piece(item))
        elif item.suffix == ".parquet":
            pieces.append(_Piece(item, None))
        else:
            raise ConfigError(f"{item} is neither a folder, a .npy nor a .parquet file.")
    if not pieces:
        raise ConfigError(f"No vectors in {', '.join(inputs)}: expected img_emb/*.npy with metadata/*.parquet, "
                          "or .parquet files with an `embedding` column.")
    return pieces


def _npy_piece(npy: Path) -> _Piece:
    """A .npy part and its metadata part: metadata/metadata_K.parquet beside img_emb/img_emb_K.npy."""
    number = npy.stem.rsplit("_", 1)[-1]
    meta = npy.parent.parent / "metadata" / f"metadata_{number}.parquet"
    if not meta.is_file():
        raise ConfigError(f"{npy} has no metadata part ({meta}): its rows need paths. clip-retrieval's layout "
                          "pairs img_emb/img_emb_K.npy with metadata/metadata_K.parquet.")
    return _Piece(npy, meta)


def inputs_sha256(pieces: list[_Piece]) -> str:
    h = hashlib.sha256()
    for piece in pieces:
        for path in piece.files():
            h.update(path.name.encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def vector_blocks(pieces: list[_Piece], block_rows: int) -> Iterator[np.ndarray]:
    """Every piece's vectors as float32 blocks of at most `block_rows` rows, in order."""
    import pyarrow.parquet as pq

    for piece in pieces:
        if piece.metadata is not None:
            array = np.load(piece.vectors, mmap_mode="r")
            if array.ndim != 2:
                raise ConfigError(f"{piece.vectors} holds an array of shape {array.shape}, not [rows, dim].")
            for start in range(0, len(array), block_rows):
                yield np.asarray(array[start : start + block_rows], dtype=np.float32)
        else:
            for batch in pq.ParquetFile(piece.vectors).iter_batches(batch_size=block_rows, columns=["embedding"]):
                if not len(batch):
                    continue
                column = batch.column(0)
                dim = column.type.list_size if hasattr(column.type, "list_size") else None
                values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                yield values.reshape(len(batch), dim if dim and dim > 0 else -1)


def import_vectors(inputs: list[str], out, *, source: str | None = None, overwrite: bool = False,
                   block_rows: int = DEFAULT_BLOCK_ROWS, progress: bool = True, command: str = "") -> VectorsReport:
    """Build the cache `out` from vectors embedded elsewhere (module docstring). Crash-safe and
    resumable like any cache (the CacheWriter's parts); an existing `out` needs `overwrite`."""
    from tqdm.auto import tqdm

    from embedder.cache.writer import CacheWriter
    from embedder.data.sources import Listing
    from embedder.errors import CacheError

    t0 = time.perf_counter()
    pieces = find_pieces(inputs)
    rows = _rows_of(_metadata_table(pieces), ", ".join(inputs))
    sidecar = _sidecar_of(inputs)
    source = str(Path(source or sidecar.get("source") or Path(inputs[0]).absolute()))
    spec = _imported_spec(pieces, inputs, sidecar, source, _dim_of(pieces[0]), rows, command)
    listing = Listing(Path(source), rows["paths"], rows["labels"], rows["classes"], IMPORTED)
    bar = tqdm(total=len(listing), unit="row", desc="import", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    with CacheWriter(out, spec, listing, overwrite=overwrite, commit_every=block_rows,
                     columns=rows["columns"]) as w, bar:
        if w.base is not None and len(w.pending):
            raise CacheError(f"{out} already exists. Use --overwrite to replace it.")
        start, todo = 0, w.pending
        for block in vector_blocks(pieces, block_rows):
            if block.shape[1] != spec.feature_dim:
                raise ConfigError(f"The input's vectors change width ({spec.feature_dim}, then {block.shape[1]}).")
            stop = start + len(block)
            sel = todo[(todo >= start) & (todo < stop)]
            if len(sel):
                w.add(sel, block[sel - start], [])
            bar.update(stop - start)
            start = stop
        if start != len(listing):
            raise ConfigError(f"The input holds {start} vectors for {len(listing)} metadata rows.")
        total = w.finish()
    return VectorsReport(str(out), IMPORTED, total, spec.feature_dim,
                         [str(p) for piece in pieces for p in piece.files()], time.perf_counter() - t0, rows["notes"])


def _metadata_table(pieces: list[_Piece]):
    """The rows' metadata, every piece's table one after the other (without the vectors)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for piece in pieces:
        if piece.metadata is not None:
            table = pq.read_table(piece.metadata)
            n = np.load(piece.vectors, mmap_mode="r").shape[0]
        else:
            names = [n for n in pq.ParquetFile(piece.vectors).schema_arrow.names if n != "embedding"]
            if len(names) == len(pq.ParquetFile(piece.vectors).schema_arrow.names):
                raise ConfigError(f"{piece.vectors} has no `embedding` column (a list of floats per row).")
            table = pq.read_table(piece.vectors, columns=names)
            n = table.num_rows
        if table.num_rows != n:
            raise ConfigError(f"{piece.metadata} has {table.num_rows} rows for the {n} vectors of {piece.vectors}.")
        tables.append(table)
    return pa.concat_tables(tables, promote_options="default")


def _rows_of(table, what: str) -> dict:
    """paths, labels, classes and typed columns (built-in ones kept) of the imported rows."""
    from embedder.data.metadata import BUILTIN, check_column_names, table_columns, table_paths

    key = "path" if "path" in table.column_names else "image_path"
    if key not in table.column_names:
        raise ConfigError(f"{what}: the metadata has no `path` (or clip-retrieval's `image_path`) column.")
    paths = table_paths(table.column(key), what)
    labels, classes = np.full(len(paths), -1, np.int64), []
    if "label" in table.column_names:
        names = ["" if v is None else str(v) for v in table.column("label").to_pylist()]
        classes = sorted(set(names) - {""})
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index.get(v, -1) for v in names], dtype=np.int64)
    others = [n for n in table.column_names if n not in ("id", "path", "label", "image_path")]
    check_column_names([n for n in others if n not in BUILTIN and n != MATCHED], what)
    columns, kinds, notes = table_columns(table, others, what, builtin=True)
    return {"paths": paths, "labels": labels, "classes": classes, "columns": columns,
            "kinds": {**BUILTIN, **kinds}, "notes": notes}


def _dim_of(piece: _Piece) -> int:
    first = next(vector_blocks([piece], 1), None)
    if first is None:
        raise ConfigError(f"{piece.vectors} holds no vectors.")
    return int(first.shape[1])


def _sidecar_of(inputs: list[str]) -> dict:
    """DIR/embedder.json of an export, when the input is one."""
    for item in map(Path, inputs):
        for candidate in (item / SIDECAR, item.parent / SIDECAR, item.parent.parent / SIDECAR):
            if candidate.is_file():
                try:
                    return json.loads(candidate.read_text())
                except (OSError, ValueError):
                    return {}
    return {}


def _imported_spec(pieces, inputs, sidecar: dict, source: str, dim: int, rows: dict, command: str):
    """The spec of an imported cache: its fingerprint says where the vectors came from."""
    from embedder._version import __version__
    from embedder.cache.reader import CacheSpec

    components = {
        "model": IMPORTED,
        "weights": f"sha256:{inputs_sha256(pieces)}",
        "imported_from": json.dumps([str(Path(p).absolute()) for p in inputs]),
        "layer": "features",
        "feature_dtype": "float32",
        "embedder_version": __version__,
    }
    if sidecar.get("fingerprint"):  # exported by embedder: the original feature space
        components["exported_fingerprint"] = str(sidecar["fingerprint"])
    return CacheSpec(components, source, dim, layout=IMPORTED, command=command, columns=rows["kinds"])
