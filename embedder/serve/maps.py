"""The data behind the service's /map page: every live row of the index as a point of a 2-D map.

    GET /map/points          x, y (in [0, 1], aspect kept), id, label index, path of every live row,
                             the classes, and the numeric columns that /map/column can give
    GET /map/column?name=N   one numeric column of rows.h5 /columns (e.g. a curation score), by row id

The map is INDEX_DIR/map.h5 from `embedder map` when it is current (embedder.search.maps), else a
PCA of the index's rows computed at the first request and kept in memory; the answer says which,
and why. The body is built once per state of map.h5 (checked by a stat on each request, so a map
computed while the service runs is picked up) and sent as ready bytes: at 100k points, validating
and encoding it per request would cost seconds.
"""

import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from embedder.names import display_path
from embedder.search.maps import MAP_FILE, index_map
from embedder.search.query import SearchIndex
from embedder.serve.live import LiveIndex

DECIMALS = 5  # of coordinates in [0, 1]: a 100k-pixel-wide canvas could not tell them apart


class MapPointsOut(BaseModel):
    method: str = Field(description="the projection: umap or pca")
    stored: bool = Field(description="true: INDEX_DIR/map.h5 from `embedder map`; false: a PCA computed by the "
                                     "service because no current map is stored")
    note: str | None = Field(description="why the stored map was not used (and the command that fixes it)")
    rows: int = Field(description="rows of the index, removed ones included (row ids run from 0 to rows - 1)")
    count: int = Field(description="points on the map: the live rows")
    classes: list[str] = Field(description="class names; `label` indexes them (-1: unlabelled)")
    columns: list[str] = Field(description="numeric columns /map/column can give, to colour the points by")
    x: list[float] = Field(description="horizontal position in [0, 1]")
    y: list[float] = Field(description="vertical position in [0, 1] (up)")
    id: list[int] = Field(description="row id of each point, for /thumbnail/{id} and /search/id/{id}")
    label: list[int] = Field(description="index into `classes`, -1 when unlabelled")
    path: list[str] = Field(description="image path as the cache stored it (undecodable bytes as \\xNN)")


class MapColumnOut(BaseModel):
    name: str
    values: list[float | None] = Field(description="the column's value for each row id 0 .. rows - 1 (null: missing)")


def numeric_columns(index: SearchIndex) -> dict[str, np.ndarray]:
    """What a map can be coloured by: rows.h5's numeric and bool (0/1) columns, then the curate
    scores stored beside the map (`embedder map --scores REPORT_DIR`)."""
    from embedder.search.maps import map_scores

    columns = {name: values for name, values in index.columns.items() if np.asarray(values).dtype.kind in "biuf"}
    return columns | {name: values for name, values in map_scores(index).items() if name not in columns}


class MapPoints:
    """The /map/points body of the served index, rebuilt when INDEX_DIR/map.h5 or the index changes."""

    def __init__(self, live: LiveIndex):
        self.live, self.lock = live, threading.Lock()
        self.built_for: SearchIndex | None = None  # the generation the body was built from
        self.key: object = ()  # never a stat result: the first request builds
        self.body = b""

    def current(self) -> bytes:
        index = self.live.current()
        key = _stat(Path(index.dir) / MAP_FILE)
        with self.lock:  # one build at a time; the others wait for it rather than compute it again
            if key != self.key or index is not self.built_for:
                self.body, self.key, self.built_for = self.build(index), key, index
            return self.body

    def build(self, index: SearchIndex) -> bytes:
        mapped = index_map(index)
        keep = np.isfinite(mapped.xy).all(axis=1)
        keep[index.removed] = False
        ids = np.flatnonzero(keep)
        xy = _unit_square(mapped.xy[ids].astype(np.float64))
        doc = {"method": mapped.method, "stored": mapped.stored, "note": mapped.note, "rows": index.ntotal,
               "count": len(ids), "classes": [display_path(c) for c in index.classes],
               "columns": list(numeric_columns(index)), "x": np.round(xy[:, 0], DECIMALS).tolist(),
               "y": np.round(xy[:, 1], DECIMALS).tolist(), "id": ids.tolist(),
               "label": index.labels[ids].astype(np.int64).tolist(),
               "path": [display_path(index.paths[i]) for i in ids]}
        return json.dumps(doc, separators=(",", ":")).encode()


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _unit_square(xy: np.ndarray) -> np.ndarray:
    """Scale into [0, 1] keeping the aspect ratio, the shorter side centred."""
    if not len(xy):
        return xy
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = float((hi - lo).max()) or 1.0
    return (xy - lo) / span + (1 - (hi - lo) / span) / 2


def column_values(values: np.ndarray) -> list[float | None]:
    """A numeric column as JSON numbers, its missing values (NaN, INT_NULL) as null."""
    from embedder.data.metadata import INT_NULL

    values = np.asarray(values)
    if values.dtype.kind == "b":
        return values.astype(np.int64).tolist()
    missing = np.isnan(values) if values.dtype.kind == "f" else values == INT_NULL
    out = values.astype(np.float64).tolist()
    return [None if m or not math.isfinite(v) else v for v, m in zip(out, missing.tolist())]


def add_map_routes(app: FastAPI, live: LiveIndex, get_and_head: Callable, invalid: dict,
                   unavailable: dict) -> None:
    """/map/points, and /map/column when the index has numeric columns (the page itself is app.py's).
    `get_and_head` registers a route and its HEAD twin; `invalid` and `unavailable` document the
    service's 422 and 503 bodies. The columns offered are the first generation's."""
    points = MapPoints(live)

    @get_and_head(app, "/map/points", response_model=MapPointsOut, responses=unavailable,
                  summary="Every live row as a point of the 2-D map (the /map page's data)")
    def map_points() -> Response:
        return Response(points.current(), media_type="application/json")

    columns = numeric_columns(live.index)
    if not columns:
        return  # no parameter value could be valid: no route
    name_param = Annotated[Literal[tuple(columns)], Query(description="a numeric column of the index's rows")]
    cached: dict[str, bytes] = {}
    built_for: list[SearchIndex] = [live.index]
    lock = threading.Lock()

    @get_and_head(app, "/map/column", response_model=MapColumnOut, responses=invalid,
                  summary="A numeric column by row id, to colour the map by")
    def map_column(name: name_param) -> Response:
        index = live.current()
        with lock:  # the threadpool's threads share the cache
            if index is not built_for[0]:  # a new generation: its rows, its values
                cached.clear()
                columns.clear()
                columns.update(numeric_columns(index))
                built_for[0] = index
            if name not in columns:
                raise HTTPException(404, detail=f"the index no longer has the column {name!r}; it has: "
                                                f"{', '.join(columns) or 'none'}")
            if name not in cached:  # a handful of columns at most: each encoded once
                cached[name] = json.dumps({"name": name, "values": column_values(columns[name])},
                                          separators=(",", ":")).encode()
            return Response(cached[name], media_type="application/json")
