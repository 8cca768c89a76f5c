"""Parquet and CSV tables as SOURCE: a column of paths or URLs, one of labels, the rest metadata.

    embedder embed images.parquet --url-column url --label-column species ...
    embedder embed list.csv --path-column file ...

SOURCE is read as a table when it is a .parquet/.pq file, or a .csv/.tsv file given one of
--path-column, --url-column or --label-column, or whose header has a `url` column or more than
two columns (a plain `path[,label]` CSV stays a file list). The row column is --path-column, or
--url-column (every value must then be an http(s) URL), or else the first of `path`, `url`,
`file`, `filename`, `image` the table has. Paths are relative to the table's folder unless
absolute; http(s) URLs are fetched by the reader (embedder.data.fetch).

Rows keep the table's order. A row with an empty path is ignored (named in the listing's
ignored entries, with its row number); paths are normalised lexically (`sub/../x.png`,
`./x.png` and `x.png` are one row) and a path listed again is ignored after its first row.
--label-column (default: a column named `label`) gives labels: class indices where every label
is an integer >= 0 (below sources.DENSE_CLASS_LIMIT; larger ones are labels like names), else
class names sorted. A NaN or infinite label refuses the table, naming its row (an empty cell is
an unlabelled row; in a CSV's numeric column pyarrow reads NaN, NA, null as empty). Every other
column becomes a metadata column of the cache, with the kinds and nulls of a --metadata table
(embedder.data.metadata); a column whose name is reserved or built-in (`id`, `width`, `size`...)
is stored as `source_<name>`, with a note, prefixed again while that name is taken too (`id`
beside `source_id` is `source_source_id`).

Text tables are UTF-8: a BOM (Excel's "CSV UTF-8") is dropped, UTF-16 is refused in one line,
and a row with a cell that is not UTF-8 is ignored with the column named, the rest of its column
read as text (`decode_cells`). A path with a NUL byte is ignored by its row number.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from embedder.data.formats import is_url
from embedder.data.metadata import BUILTIN, MATCHED, RESERVED, MetadataTable, check_column_names, table_columns
from embedder.errors import SourceError

LAYOUT = "table"
TABLE_SOURCE_SUFFIXES = (".parquet", ".pq")
TEXT_TABLE_SUFFIXES = (".csv", ".tsv")
ROW_COLUMNS = ("path", "url", "file", "filename", "image")
EMPTY_PATH = "table row without a path"
LISTED_TWICE = "listed more than once in the table"
NOT_URL = "not an http(s) URL (--url-column)"
NOT_UTF8 = "a cell that is not UTF-8 text"
NUL_PATH = "a path with a NUL byte (no file has one)"


@dataclass(frozen=True)
class TableColumns:
    """Which columns of a table SOURCE hold the rows and the labels (EmbedConfig's *_column options)."""

    path: str | None = None
    url: str | None = None
    label: str | None = None

    def given(self) -> bool:
        return any((self.path, self.url, self.label))


@dataclass
class TableRows:
    """What a table source lists: row paths, raw labels (None: unlabelled), its other columns, ignored rows."""

    paths: list[str]
    labels: list
    metadata: MetadataTable | None
    ignored: list[tuple[str, str]]


def is_table_source(path: Path, columns: TableColumns) -> bool:
    suffix = path.suffix.lower()
    if suffix in TABLE_SOURCE_SUFFIXES:
        return True
    if suffix not in TEXT_TABLE_SUFFIXES or not path.is_file():
        return False
    if columns.given() or suffix == ".tsv":
        return True
    header = _first_line(path)
    names = [n.strip().strip('"').lower() for n in header.split(",")]
    return "url" in names or (len(names) > 2 and "path" in names)


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: Excel's "CSV UTF-8" BOM
            return f.readline()
    except OSError:
        return ""


def read_source_table(path: Path):
    """The pyarrow table of a .parquet / .csv / .tsv SOURCE; SourceError says why it cannot be read.
    Text tables are UTF-8 (a BOM is dropped); see `decode_cells` for a cell that is not."""
    import pyarrow as pa

    try:
        if path.suffix.lower() in TABLE_SOURCE_SUFFIXES:
            import pyarrow.parquet as pq

            return pq.read_table(path)
        import pyarrow.csv as pacsv

        with open(path, "rb") as f:
            head = f.read(4)
            if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise SourceError(f"SOURCE {path} is UTF-16 text: save it as UTF-8 (Excel: CSV UTF-8).")
            f.seek(3 if head[:3] == b"\xef\xbb\xbf" else 0)
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            return pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    except (pa.ArrowInvalid, OSError) as exc:
        raise SourceError(f"SOURCE {path} cannot be read as a table: {exc}") from None


def decode_cells(table) -> tuple[object, dict[int, str]]:
    """(the table with its binary columns as UTF-8 text, {row index: why it is refused}). A CSV
    column with one cell that is not UTF-8 comes back from pyarrow as bytes: each cell that
    decodes is text again, and a row with one that does not is refused by itself, not its column."""
    import pyarrow as pa

    bad: dict[int, str] = {}
    for name in table.column_names:
        if not (pa.types.is_binary(table.schema.field(name).type) or pa.types.is_large_binary(
                table.schema.field(name).type)):
            continue
        texts = []
        for i, cell in enumerate(table.column(name).to_pylist()):
            try:
                texts.append(None if cell is None else cell.decode("utf-8"))
            except UnicodeDecodeError as exc:
                texts.append(None)
                bad.setdefault(i, f"{NOT_UTF8} in column {name!r} (byte {exc.start})")
        table = table.set_column(table.column_names.index(name), name, pa.array(texts, type=pa.string()))
    return table, bad


def row_column(table, columns: TableColumns, path: Path) -> str:
    """The name of the column whose values are the rows."""
    names = table.column_names
    if columns.path and columns.url:
        raise SourceError("Give --path-column or --url-column, not both: one column holds the rows.")
    chosen = columns.path or columns.url
    if chosen is not None:
        if chosen not in names:
            flag = "--path-column" if columns.path else "--url-column"
            raise SourceError(f"{flag} {chosen!r}: SOURCE {path} has no such column (columns: {', '.join(names)}).")
        return chosen
    for name in ROW_COLUMNS:
        if name in names:
            return name
    raise SourceError(f"SOURCE {path} has none of the columns {', '.join(ROW_COLUMNS)} (columns: "
                      f"{', '.join(names)}). Name the column of paths with --path-column, or of URLs with --url-column.")


def list_table(path: Path, columns: TableColumns) -> TableRows:
    """The rows of a table SOURCE (see the module docstring)."""
    table = read_source_table(path)
    if len(set(table.column_names)) != len(table.column_names):
        raise SourceError(f"SOURCE {path} has a column name twice. Rename one of them.")
    table, bad_rows = decode_cells(table) if path.suffix.lower() in TEXT_TABLE_SUFFIXES else (table, {})
    key = row_column(table, columns, path)
    if columns.label is None and "label" in table.column_names and key != "label":
        columns = TableColumns(columns.path, columns.url, "label")  # as a `path,label` file list reads it
    if columns.label is not None and columns.label not in table.column_names:
        raise SourceError(f"--label-column {columns.label!r}: SOURCE {path} has no such column "
                          f"(columns: {', '.join(table.column_names)}).")
    if columns.label == key:
        raise SourceError(f"--label-column {key!r} is also the column of rows. Name another column.")
    root = path.resolve().parent
    raw_labels = table.column(columns.label).to_pylist() if columns.label else None
    keep, paths, labels, ignored, seen = [], [], [], [], set()
    for i, value in enumerate(table.column(key).to_pylist()):
        text = "" if value is None else str(value).strip()
        if i in bad_rows:
            ignored.append((f"{path.name}:row {i + 1}", bad_rows[i]))
            continue
        if not text:
            ignored.append((f"{path.name}:row {i + 1}", EMPTY_PATH))
            continue
        if "\0" in text:
            ignored.append((f"{path.name}:row {i + 1}", NUL_PATH))
            continue
        if columns.url and not is_url(text):
            ignored.append((text, NOT_URL))
            continue
        row = text if is_url(text) else _relative(PurePosixPath(text), root)
        if row in seen:
            ignored.append((row, LISTED_TWICE))
            continue
        seen.add(row)
        keep.append(i)
        paths.append(row)
        labels.append(None if raw_labels is None else _label(raw_labels[i], path, i))
    others = [n for n in table.column_names if n not in (key, columns.label)]
    metadata = _metadata(path, table.take(keep).select(others), paths) if others else None
    return TableRows(paths, labels, metadata, ignored)


def _relative(p: PurePosixPath, root: Path) -> str:
    """The row's path, normalised (`sub/../x.png` is `x.png`: one file, one row), relative to
    the table's folder where it lies inside it. Lexical, as `..` after a symlinked folder is not
    looked at on disk."""
    p = PurePosixPath(posixpath.normpath(p.as_posix()))
    if not p.is_absolute():
        return p.as_posix()
    try:
        return Path(p).relative_to(root).as_posix()
    except ValueError:
        return p.as_posix()


def _label(value, path: Path, i: int):
    """A label cell: an int stays one (a class index), anything else is a class name; empty is
    None. NaN and infinities are refused: neither a class name nor an index."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        raise SourceError(f"SOURCE {path.name}: the label of row {i + 1} is {value}, neither a class name nor "
                          "a class index. Fix the cell, or empty it to leave the row unlabelled.")
    if isinstance(value, float) and value.is_integer():
        return int(value)  # integers with empty cells come back as floats from CSV
    return value if isinstance(value, int) else str(value).strip()


def _metadata(path: Path, table, paths: list[str]) -> MetadataTable:
    """The table's other columns as metadata; reserved or built-in names get a `source_` prefix."""
    names, notes = [], []
    for name in table.column_names:
        stored = name
        while stored in RESERVED or stored in BUILTIN or stored == MATCHED or (
                stored != name and (stored in table.column_names or stored in names)):
            stored = f"source_{stored}"  # `id` beside a `source_id` column: source_source_id
        if stored != name:
            notes.append(f"SOURCE {path.name}: column {name!r} is stored as {stored!r} "
                         f"({name!r} is a built-in or reserved column of every cache)")
        names.append(stored)
    check_column_names(names, f"SOURCE {path}")
    table = table.rename_columns(names)
    values, kinds, cast_notes = table_columns(table, names, f"SOURCE {path.name}")
    return MetadataTable(path, paths, values, kinds, notes + cast_notes)
