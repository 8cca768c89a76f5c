"""The row table of an index (its rows.h5): what each row id is (path, label, metadata columns),
which rows were removed, and the masks filters give over the rows. No faiss in it.

    RowTable.read(path, name)    the table of an index folder's rows.h5
    ArrayRows(n, names, columns) the table of an array's rows in memory (embedder.Index.from_array)
    Hit                          one result: a row with its score, rank and metadata
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from embedder.cache.columns import read_columns
from embedder.cache.reader import read_paths
from embedder.data.metadata import INT_NULL
from embedder.errors import RemovedRowError
from embedder.search.filters import Filter, as_column

MASKS_KEPT = 32  # filters whose masks are remembered (a service sees the same few again and again)


@dataclass
class Hit:
    rank: int  # 1-based
    id: int  # row in the cache and the index
    path: str
    label: str | None
    score: float  # cosine similarity (metric cosine) or squared L2 distance (metric l2)
    metadata: dict | None = None  # the row's metadata columns, when the index has them (JSON values)

    def as_dict(self) -> dict:
        doc = {"rank": self.rank, "id": self.id, "path": self.path, "label": self.label, "score": self.score}
        if self.metadata is not None:
            doc["metadata"] = self.metadata
        return doc


class RowTable:
    """Rows 0 .. n-1 of an index: paths as the cache stored them, labels, metadata columns, removed ids."""

    named = True  # whether `paths` are the rows' own names (an array's unnamed rows go by their ids)

    def __init__(self, paths: list[str], labels: np.ndarray, classes: list[str], removed: np.ndarray,
                 columns: dict[str, np.ndarray], name: str = "INDEX_DIR"):
        self.paths, self.labels, self.classes, self.columns = paths, labels, classes, columns
        # Sorted unique row ids hidden from every search (`embedder index INDEX_DIR --remove`).
        self.removed = removed
        self.name = name  # the index folder, as messages name it
        self._row = {p: i for i, p in enumerate(paths)}
        self._removed_set = set(removed.tolist())
        self._masks: dict[str | None, np.ndarray | None] = {}
        self._masks_lock = threading.Lock()
        self._table: dict[str, np.ndarray] | None = None

    @classmethod
    def read(cls, path, name: str | None = None) -> RowTable:
        """The table of a rows.h5 (`name`: the index folder, for messages)."""
        with h5py.File(path, "r") as f:
            paths = read_paths(f["paths"]) if len(f["paths"]) else []
            removed = f["removed"][:].astype(np.int64) if "removed" in f else np.zeros(0, np.int64)
            # The cache's metadata columns (rows.h5 /columns, embedder.cache.columns); {} for older indexes.
            columns = read_columns(f) if "columns" in f else {}
            return cls(paths, f["labels"][:], read_paths(f["classes"]), removed, columns,
                       name or str(Path(path).parent))

    def __len__(self) -> int:
        return len(self.paths)

    # -- lookups -----------------------------------------------------------------------------
    def has_path(self, path: str) -> bool:
        return path in self._row

    def row_of_path(self, path: str, removed: bool = False) -> int:
        """The row id of a path as the cache stored it; RemovedRowError for a removed row unless `removed`."""
        if path not in self._row:
            raise KeyError(f"{path!r} is not in the index.")
        if not removed:
            self.check_not_removed([self._row[path]])
        return self._row[path]

    def rows_of(self, paths) -> np.ndarray:
        """The row id of each path (-1 where the index has none), removed rows included."""
        return np.array([self._row.get(p, -1) for p in paths], dtype=np.int64)

    def is_removed(self, row_id: int) -> bool:
        return row_id in self._removed_set

    def check_not_removed(self, ids) -> None:
        """RemovedRowError naming the first removed row among `ids`."""
        gone = [int(i) for i in ids if int(i) in self._removed_set]
        if gone:
            raise RemovedRowError(f"row {gone[0]} ({self.paths[gone[0]]}) was removed from the index "
                                  f"(`embedder index {self.name} --remove`); it is never searched nor returned.")

    # -- filters -------------------------------------------------------------------------------
    def filter_columns(self) -> dict[str, np.ndarray]:
        """What a filter can name: id, path, label ("" when unlabelled), then rows.h5's /columns."""
        if self._table is None:
            names = np.array([*self.classes, ""], dtype=str)  # label -1 takes the last: ""
            table = {"id": np.arange(len(self), dtype=np.int64), "path": as_column(self.paths),
                     "label": names[self.labels] if len(self) else names[:0]}
            table.update({k: as_column(v) for k, v in self.columns.items() if k not in table})
            self._table = table
        return self._table

    def parse_filter(self, where: str | Filter | None) -> Filter | None:
        """`where` parsed against these columns (FilterError for a bad one); None for no filter."""
        if where is None or isinstance(where, Filter):
            return where
        return Filter.parse(where, self.filter_columns())

    def allowed(self, where: str | Filter | None, hide_removed: bool) -> np.ndarray | None:
        """Mask of the rows `where` keeps, removed rows excluded when a mask is needed anyway or when
        `hide_removed`; None for every row. Masks are remembered by the filter's text."""
        key = where.text if isinstance(where, Filter) else where
        with self._masks_lock:  # a service's threads share the remembered masks
            if key in self._masks:
                return self._masks[key]
            mask = None if where is None else self.parse_filter(where).mask(self.filter_columns())
            if len(self.removed) and (where is not None or hide_removed):
                mask = np.ones(len(self), bool) if mask is None else mask.copy()
                mask[self.removed] = False
            if len(self._masks) >= MASKS_KEPT:
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = mask
            return mask

    # -- results -------------------------------------------------------------------------------
    def metadata(self, row_id: int) -> dict:
        """{column: value} of one row, as JSON values: a null (NaN, INT_NULL; embedder.data.metadata) is None."""
        out = {}
        for name, values in self.columns.items():
            value = values[row_id].item() if isinstance(values[row_id], np.generic) else values[row_id]
            missing = (isinstance(value, float) and math.isnan(value)) or (type(value) is int and value == INT_NULL)
            out[name] = None if missing else value
        return out

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """Hits of faiss-shaped results (n queries x k; id -1 for none), ranked from 1 in the given order."""
        out = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for rank, (s, i) in enumerate(((s, i) for s, i in zip(row_scores, row_ids) if i >= 0), start=1):
                label = self.labels[i]
                hits.append(Hit(rank, int(i), self.paths[i], self.classes[label] if label >= 0 else None, float(s),
                                self.metadata(int(i)) if self.columns else None))
            out.append(hits)
        return out


class ArrayRows(RowTable):
    """The rows of an array held in memory (`embedder.Index.from_array`): no labels, none removed.

    A filter names ``id``, ``path`` (when the rows were named) and the given columns, as they were
    given: a column named like those takes their place. Hits carry no metadata: `embedder.Index`
    turns them into arrays (`Neighbours`), which have no place for it, and a dict per hit would
    slow every search of an index with columns (by about a fifth: 2000 queries x k=10, 20k rows, 2 columns).

    Parameters
    ----------
    n : int
        Rows of the array.
    names : list of str or None
        A name per row (its ``path``); None: rows go by their id (``"0"``, ``"1"``, ...) in hits.
    columns : dict of str to numpy.ndarray
        Per-row columns, each as `embedder.search.filters.as_column` gives it.
    """

    def __init__(self, n: int, names: list[str] | None, columns: dict[str, np.ndarray]):
        super().__init__(names if names is not None else [str(i) for i in range(n)], np.full(n, -1, np.int64), [],
                         np.zeros(0, np.int64), {}, name="the array")
        self.named = names is not None
        self.given = columns  # for filters only (the class's docstring)

    def filter_columns(self) -> dict[str, np.ndarray]:
        """What a filter can name: id, path (named rows only), then the given columns."""
        if self._table is None:
            self._table = {"id": np.arange(len(self), dtype=np.int64),
                           **({"path": as_column(self.paths)} if self.named else {}), **self.given}
        return self._table
