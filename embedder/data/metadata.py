"""Per-row metadata columns: their kinds, their null values, and a user's table joined to a listing.

A cache's rows carry typed columns beside their features (stored as `/columns/<name>`, see
`embedder.cache.columns`). Every new cache has the built-in columns

    size    int64    the file's bytes            (stat at read time)
    mtime   float64  its POSIX modification time (stat at read time)
    width   int64    the image's own width, as shown (EXIF orientation applied), before resizing
    height  int64    its height
    split   str      train / val / test ... for a split tree (its first folder), "" otherwise

and `embed --metadata FILE.csv|FILE.parquet` adds the columns of a table with a `path` column
(relative to SOURCE, as the cache's paths are), joined to the rows by path, plus the bool
column `has_metadata` (the row's path is in the table).

Kinds are int64, float64, bool and str. A table column of another type (dates, decimals,
unsigned or small integers...) is cast: integers to int64, floats to float64, anything else to
str, each cast named in a note. Nulls (a row missing from the table, an empty cell) are:

    float64  NaN
    int64    INT_NULL (-2**63); -1 for the built-in ints (a size nobody has)
    str      "" (an empty string and a missing one are the same)
    bool     False: `has_metadata` tells a missing row from a False one; a bool column with
             empty cells is stored as str ("true" / "false" / "") with a note
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from embedder.errors import ConfigError

KINDS = ("int64", "float64", "bool", "str")
BUILTIN: dict[str, str] = {"size": "int64", "mtime": "float64", "width": "int64", "height": "int64", "split": "str"}
READ_COLUMNS = ("size", "mtime", "width", "height")  # measured by the reader, per decoded file
MATCHED = "has_metadata"  # bool: the row's path is in the --metadata table
RESERVED = ("id", "path", "label")  # already row data of every cache (row id, /paths, /labels)
INT_NULL = int(np.iinfo(np.int64).min)
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def null_of(name: str, kind: str):
    """The value a row without one holds (see the module docstring)."""
    if kind == "int64":
        return -1 if name in BUILTIN else INT_NULL
    return {"float64": np.nan, "bool": False, "str": ""}[kind]


def as_kind(values, kind: str) -> np.ndarray:
    """`values` as the numpy array a column of `kind` holds (strings: an object array of str)."""
    if kind == "str":
        out = np.empty(len(values), dtype=object)
        out[:] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
        return out
    return np.asarray(values, dtype=kind)


def nulls(name: str, kind: str, n: int) -> np.ndarray:
    return as_kind([null_of(name, kind)] * n, kind) if kind == "str" else np.full(n, null_of(name, kind), kind)


def kind_of(array: np.ndarray) -> str:
    """The kind of a column's values (as read back from a cache)."""
    if array.dtype == bool:
        return "bool"
    if np.issubdtype(array.dtype, np.integer):
        return "int64"
    if np.issubdtype(array.dtype, np.floating):
        return "float64"
    return "str"


def split_column(paths: list[str], layout: str) -> np.ndarray:
    """The built-in `split`: the first folder of each path in a split tree, "" in any other layout."""
    if layout != "split-imagefolder":
        return as_kind([""] * len(paths), "str")
    return as_kind([p.split("/", 1)[0] for p in paths], "str")


def check_column_names(names, what: str) -> None:
    """Refuse names a column cannot have: reserved, built-in, or not storable as an HDF5 name."""
    for name in names:
        if name in RESERVED or name in BUILTIN or name == MATCHED:
            kind = "reserved (row data every cache has)" if name in RESERVED else "a built-in column"
            raise ConfigError(f"{what}: column {name!r} is {kind}. Rename it in the table "
                              f"(built-in: {', '.join(BUILTIN)}, {MATCHED}; reserved: {', '.join(RESERVED)}).")
        if not name or "/" in name or name in (".", "..") or name.strip() != name:
            raise ConfigError(f"{what}: column name {name!r} cannot be stored (no '/', no surrounding spaces). "
                              "Rename it in the table.")


@dataclass
class MetadataTable:
    """A --metadata table: paths (relative to SOURCE) and typed columns aligned with them."""

    file: Path
    paths: list[str]
    columns: dict[str, np.ndarray]
    kinds: dict[str, str]
    notes: list[str] = field(default_factory=list)  # casts made, as one line each

    @property
    def schema(self) -> dict[str, str]:
        """{name: kind} of the columns the cache gets from this table, `has_metadata` included."""
        return {**self.kinds, MATCHED: "bool"}

    def join(self, paths: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
        """Columns aligned with `paths` (nulls where a path is not in the table), and the table's
        paths that are not in `paths`, in table order."""
        where = {p: i for i, p in enumerate(self.paths)}
        rows = np.array([where.get(p, -1) for p in paths], dtype=np.int64)
        hit = rows >= 0
        out = {}
        for name, kind in self.kinds.items():
            column = nulls(name, kind, len(paths))
            column[hit] = self.columns[name][rows[hit]]
            out[name] = column
        out[MATCHED] = hit
        listed = set(paths)
        return out, [p for p in self.paths if p not in listed]

    def subset(self, paths) -> MetadataTable:
        """The rows of `paths` that the table holds, in `paths` order (a Ray shard's own rows)."""
        where = {p: i for i, p in enumerate(self.paths)}
        return self.take([where[p] for p in paths if p in where])

    def take(self, rows) -> MetadataTable:
        """The table's rows at positions `rows`, in that order (for callers that index it once)."""
        rows = np.asarray(rows, dtype=np.int64)
        return MetadataTable(self.file, [self.paths[i] for i in rows],
                             {n: c[rows] for n, c in self.columns.items()}, dict(self.kinds), list(self.notes))


def merge_tables(source: MetadataTable | None, given: MetadataTable | None) -> MetadataTable | None:
    """One table of the columns SOURCE itself gives (a table's other columns, a tar sample's .json
    keys) and those of a --metadata table; a name in both is refused, since either value would be lost."""
    if source is None or given is None:
        return source or given
    both = sorted(set(source.kinds) & set(given.kinds))
    if both:
        raise ConfigError(f"--metadata {given.file}: column {both[0]!r} is also a column of SOURCE {source.file}. "
                          "Rename it in one of them.")
    paths = list(dict.fromkeys(source.paths + given.paths))
    a, _ = source.join(paths)
    b, _ = given.join(paths)
    a.pop(MATCHED)
    b.pop(MATCHED)
    return MetadataTable(given.file, paths, {**a, **b}, {**source.kinds, **given.kinds}, source.notes + given.notes)


def records_table(file: Path, paths: list[str], records: list[dict], what: str) -> MetadataTable | None:
    """A MetadataTable of per-path dicts (a tar sample's .json, a table source's other columns):
    kinds and nulls as for a --metadata table; nested values (lists, objects) stored as JSON text.
    None where no record has a key."""
    import json

    import pyarrow as pa

    names = list(dict.fromkeys(k for r in records for k in r))
    if not names:
        return None
    check_column_names(names, what)
    arrays, mixed = {}, []
    for name in names:  # column by column: a key may be missing from the first records, or hold several types
        values = [r.get(name) for r in records]
        values = [json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for v in values]
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            # Values of several types under one key (1 in a sample, "a" in another), or ints beyond int64: text.
            arrays[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
            mixed.append(f"{what}: column {name!r} holds values of several types (or integers beyond int64): "
                         "stored as str")
    columns, kinds, notes = table_columns(pa.table(arrays), names, what)
    return MetadataTable(file, paths, columns, kinds, mixed + notes)


def read_table(path: str | os.PathLike) -> MetadataTable:
    """Read a CSV or Parquet --metadata table (pyarrow), with the kinds and nulls of the module docstring."""
    file = Path(path)
    if file.suffix.lower() not in TABLE_SUFFIXES:
        raise ConfigError(f"--metadata {file}: expected a .csv or .parquet table, got {file.suffix or 'no suffix'!r}.")
    if not file.is_file():
        raise ConfigError(f"--metadata {file} does not exist.")
    import pyarrow as pa

    try:
        if file.suffix.lower() == ".csv":
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(file)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"--metadata {file} cannot be read as a table: {exc}") from None
    return _typed(file, table)


def _typed(file: Path, table) -> MetadataTable:
    if "path" not in table.column_names:
        raise ConfigError(f"--metadata {file} has no `path` column (columns: {', '.join(table.column_names)}). "
                          "Name the column of file paths, relative to SOURCE, `path`.")
    others = [n for n in table.column_names if n != "path"]
    if len(set(table.column_names)) != len(table.column_names):
        raise ConfigError(f"--metadata {file} has a column name twice.")
    check_column_names(others, f"--metadata {file}")
    paths = table_paths(table.column("path"), f"--metadata {file}")
    columns, kinds, notes = table_columns(table, others, f"--metadata {file.name}")
    return MetadataTable(file, paths, columns, kinds, notes)


def table_columns(table, names, what: str, builtin: bool = False) -> tuple[dict, dict, list[str]]:
    """({name: values}, {name: kind}, notes) of the pyarrow `table`'s columns `names`, nulls filled.
    `builtin`: the table may hold built-in columns (vectors exported by embedder), which must keep
    their kinds."""
    columns, kinds, notes = {}, {}, []
    for name in names:
        columns[name], kinds[name], note = _column(table.column(name), name)
        expected = {**BUILTIN, MATCHED: "bool"}.get(name) if builtin else None
        if expected is not None and kinds[name] != expected:
            raise ConfigError(f"{what}: column {name!r} holds {kinds[name]} values, but the built-in column "
                              f"{name!r} is {expected}. Rename it.")
        if note:
            notes.append(f"{what}: column {name!r} {note}")
    return columns, kinds, notes


def table_paths(column, what: str) -> list[str]:
    """A table's `path` column as POSIX paths, each once."""
    if column.null_count:
        raise ConfigError(f"{what}: {column.null_count} rows have no path. Every row needs one.")
    paths = [PurePosixPath(str(p)).as_posix() for p in column.to_pylist()]
    seen: set[str] = set()
    for p in paths:
        if p in seen:
            raise ConfigError(f"{what}: path {p!r} is listed twice. Keep one row per file.")
        seen.add(p)
    return paths


def _column(column, name: str) -> tuple[np.ndarray, str, str]:
    """(values, kind, note about a cast or "") of one table column; nulls filled per kind."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    if pa.types.is_boolean(t) and not column.null_count:
        return column.to_numpy(zero_copy_only=False).astype(bool), "bool", ""
    if pa.types.is_integer(t):
        try:
            cast = pc.cast(column, pa.int64())
        except pa.ArrowInvalid:
            return _as_str(column), "str", f"has {t} values beyond int64: stored as str"
        values = cast.fill_null(null_of(name, "int64")).to_numpy(zero_copy_only=False)
        return values, "int64", "" if t == pa.int64() else f"is {t}: stored as int64"
    if pa.types.is_floating(t):
        values = pc.cast(column, pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
        return values, "float64", "" if t == pa.float64() else f"is {t}: stored as float64"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return _as_str(column), "str", ""
    if pa.types.is_boolean(t):
        return _as_str(column), "str", "is bool with empty cells: stored as str (true / false / \"\")"
    if pa.types.is_null(t):
        return _as_str(column), "str", "is empty in every row: stored as str"
    return _as_str(column), "str", f"is {t}: stored as str"


def _as_str(column) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        text = pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise ConfigError(f"A table column of type {column.type} cannot be stored (no text form). "
                          "Drop it or convert it to numbers or text.") from None
    values = text.to_pylist()
    if pa.types.is_boolean(column.type):
        values = [None if v is None else v.lower() for v in values]
    return as_kind(["" if v is None else v for v in values], "str")
