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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedder.cache.reader import FeatureCache
from embedder.data.metadata import INT_NULL, MATCHED
from embedder.data.rows import row_location
from embedder.errors import ConfigError
from embedder.names import ERRORS as NAME_ERRORS
from embedder.outputs import CACHE, VECTORS, claim, expect, write_dir

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
    `out` is staged and swapped in whole, under the output policy (embedder.outputs). `metric`: what
    the npy export's readers should rank by; cosine writes unit vectors, since they rank by inner product."""
    from embedder.progress import bar as progress_bar

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}.")
    t0 = time.perf_counter()
    expect(cache_path, CACHE)
    claim(out, VECTORS, [cache_path], overwrite)  # before the cache is read
    with FeatureCache(cache_path, layer=layer) as cache, \
            write_dir(out, VECTORS, [cache_path], overwrite) as (tmp, _):
        bar = progress_bar(total=len(cache), unit="row", desc="export", enabled=progress)
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


FLOAT32_MAX = float(np.finfo(np.float32).max)


def vector_blocks(pieces: list[_Piece], block_rows: int, dim: int | None = None) -> Iterator[np.ndarray]:
    """Every piece's vectors as float32 blocks of at most `block_rows` rows, in order. Each is
    checked on the way (ConfigError naming the file and its first bad row, counted from 0): a
    real numeric type, one `dim`-long (default: the first row's width) vector per row, finite in float32."""
    for piece in pieces:
        blocks = _npy_blocks(piece.vectors, block_rows) if piece.metadata is not None else \
            _parquet_blocks(piece.vectors, block_rows)
        start = 0
        for block in blocks:
            dim = block.shape[1] if dim is None else dim
            if block.shape[1] != dim:
                raise ConfigError(f"{piece.vectors}: row {start} has {block.shape[1]} values, the rows before it "
                                  f"{dim}: every vector must have the same width.")
            yield _finite(block, piece.vectors, start)
            start += len(block)


def _npy_header(path: Path) -> tuple[tuple, np.dtype]:
    """The shape and dtype of a .npy, read from its header (nothing else is loaded), checked:
    two dimensions, real numbers (object arrays would run pickled code, and strings are no vectors)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable .npy file ({exc}).") from None
    if dtype.kind not in "fiu" or dtype.fields is not None:
        raise ConfigError(f"{path} holds {_dtype_name(dtype)} values, not real numbers: vectors are arrays of "
                          "floats or integers [rows, dim].")
    if len(shape) != 2 or shape[1] < 1:
        raise ConfigError(f"{path} holds an array of shape {shape}, not [rows, dim] with dim >= 1.")
    return shape, dtype


def _dtype_name(dtype: np.dtype) -> str:
    names = {"c": "complex", "O": "Python object", "U": "string", "S": "bytes", "b": "bool", "V": "structured",
             "M": "datetime", "m": "timedelta"}
    return f"{names.get(dtype.kind, dtype.kind)} ({dtype})"


def _npy_blocks(path: Path, block_rows: int) -> Iterator[np.ndarray]:
    _npy_header(path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:  # e.g. a file shorter than its header says
        raise ConfigError(f"{path} is not a readable .npy file ({exc}).") from None
    for start in range(0, len(array), block_rows):
        yield np.asarray(array[start : start + block_rows])


def _parquet_blocks(path: Path, block_rows: int) -> Iterator[np.ndarray]:
    """A Parquet file's `embedding` column as [rows, dim] blocks: a list of real numbers per row,
    none of them null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    start = 0
    for batch in _parquet_file(path).iter_batches(batch_size=block_rows, columns=["embedding"]):
        column = batch.column(0)
        kind = column.type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) or \
                not (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)):
            raise ConfigError(f"{path}: the `embedding` column holds {kind}, not a list of real numbers per row.")
        if not len(batch):
            continue
        _check_rows(column, path, start)
        values = pc.list_flatten(column)
        if values.null_count:
            parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
            raise ConfigError(f"{path}: row {start + parents[_first(values.is_null())]} has a null value "
                              "in its embedding.")
        yield values.to_numpy(zero_copy_only=False).reshape(len(batch), -1)
        start += len(batch)


def _check_rows(column, path: Path, start: int) -> None:
    """A ConfigError at the first row that is null, empty, or of another width than the block's first."""
    import pyarrow.compute as pc

    lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False)
    width = lengths[0]
    bad = np.flatnonzero((lengths != width) | (lengths <= 0))
    if not len(bad):
        return
    row = int(bad[0])
    if lengths[row] < 0:
        raise ConfigError(f"{path}: row {start + row} has a null embedding.")
    raise ConfigError(f"{path}: row {start + row} has {lengths[row]} values"
                      + (f", the rows before it {width}" if row else "")
                      + ": every row needs one vector of the same width, at least 1.")


def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"{path} is not a readable Parquet file ({exc}).") from None


def _first(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask, dtype=bool))[0])


def _finite(block: np.ndarray, path: Path, start: int) -> np.ndarray:
    """`block` as float32, or a ConfigError at its first row with NaN, infinity or a value float32 cannot hold."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(block, dtype=np.float32)
    ok = np.isfinite(out).all(axis=1)
    if ok.all():
        return out
    row = _first(~ok)
    given = np.asarray(block[row], dtype=np.float64)
    if np.isfinite(given).all():
        col = _first(~np.isfinite(out[row]))
        what = f"{given[col]:.4g} in column {col}, beyond float32's range (+-{FLOAT32_MAX:.4g})"
    else:
        col = _first(~np.isfinite(given))
        what = f"{given[col]} in column {col}"
    raise ConfigError(f"{path}: row {start + row} holds {what}; vectors must be finite float32 numbers.")


def import_vectors(inputs: list[str], out, *, source: str | None = None, overwrite: bool = False,
                   block_rows: int = DEFAULT_BLOCK_ROWS, progress: bool = True, command: str = "") -> VectorsReport:
    """Build the cache `out` from vectors embedded elsewhere (module docstring). Crash-safe and
    resumable like any cache (the CacheWriter's parts); an existing `out` needs `overwrite`."""
    from embedder.cache.writer import CacheWriter
    from embedder.data.sources import Listing
    from embedder.errors import CacheError
    from embedder.progress import bar as progress_bar

    t0 = time.perf_counter()
    claim(out, CACHE)  # before the inputs are read (embedder.outputs)
    pieces = find_pieces(inputs)
    rows = _rows_of(_metadata_table(pieces), ", ".join(inputs))
    sidecar = _sidecar_of(inputs)
    source = str(Path(source or sidecar.get("source") or Path(inputs[0]).absolute()))
    # Every vector is checked before anything is written, so that a refusal leaves nothing behind
    # (not even an old cache replaced under --overwrite); a second read costs less than the writing.
    dim = _checked_dim(pieces, len(rows["paths"]), block_rows)
    spec = _imported_spec(pieces, inputs, sidecar, source, dim, rows, command)
    listing = Listing(Path(source), rows["paths"], rows["labels"], rows["classes"], IMPORTED)
    bar = progress_bar(total=len(listing), unit="row", desc="import", enabled=progress)
    with CacheWriter(out, spec, listing, overwrite=overwrite, commit_every=block_rows,
                     columns=rows["columns"]) as w, bar:
        if w.base is not None and len(w.pending):
            raise CacheError(f"{out} already exists. Use --overwrite to replace it.")
        start, todo = 0, w.pending
        for block in vector_blocks(pieces, block_rows, dim):
            stop = start + len(block)
            sel = todo[(todo >= start) & (todo < stop)]
            if len(sel):
                w.add(sel, block[sel - start], [])
            bar.update(stop - start)
            start = stop
        total = w.finish()
    return VectorsReport(str(out), IMPORTED, total, spec.feature_dim,
                         [str(p) for piece in pieces for p in piece.files()], time.perf_counter() - t0, rows["notes"])


def _metadata_table(pieces: list[_Piece]):
    """The rows' metadata, every piece's table one after the other (without the vectors)."""
    import pyarrow as pa

    tables = []
    for piece in pieces:
        if piece.metadata is not None:
            table = _parquet_file(piece.metadata).read()
            n = _npy_header(piece.vectors)[0][0]
        else:
            file = _parquet_file(piece.vectors)
            names = [n for n in file.schema_arrow.names if n != "embedding"]
            if len(names) == len(file.schema_arrow.names):
                raise ConfigError(f"{piece.vectors} has no `embedding` column (a list of floats per row).")
            table = file.read(columns=names)
            n = table.num_rows
        if table.num_rows != n:
            raise ConfigError(f"{piece.metadata} has {table.num_rows} rows for the {n} vectors of {piece.vectors}.")
        tables.append(table)
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as exc:  # a column of one type in one part, of another in the next
        raise ConfigError(f"The metadata parts do not fit together: {exc}.") from None


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


def _checked_dim(pieces: list[_Piece], rows: int, block_rows: int) -> int:
    """The vectors' width, after reading them all through vector_blocks' checks; one per metadata row."""
    dim, count = None, 0
    for block in vector_blocks(pieces, block_rows):
        dim, count = block.shape[1], count + len(block)
    if dim is None:
        raise ConfigError(f"{pieces[0].vectors} holds no vectors.")
    if count != rows:
        raise ConfigError(f"The input holds {count} vectors for {rows} metadata rows.")
    return int(dim)


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
