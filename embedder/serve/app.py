"""HTTP similarity search over a built index: a JSON API, thumbnails, a drop-an-image web page, and
a 2-D map of the index at /map (its data routes: embedder.serve.maps).

    create_app(index_dir)      the FastAPI application (the index is opened here, and again when INDEX_DIR
                               changes: embedder.serve.live)
    run(app, host, port)       run an app from create_app (`embedder serve` does, after its banner),
                               within the server's timeouts and connection cap (embedder.serve.server)
    allowed_hosts_for(host)    the Host names a server bound to `host` answers to by default

Design choices, and why:
  * Work (FAISS search, decoding, the forward pass) runs in FastAPI's threadpool, so it never
    stalls the event loop that accepts the next request. /health runs on the loop itself and
    needs no free thread, so it answers while every thread is busy.
  * Decoding is bounded twice, since it runs before the one-at-a-time forward pass: at most
    `decode_slots` images are decoded at once (requests waiting for a slot wait on the event
    loop, holding no thread and only their spooled upload), and uploads declaring more than
    `max_pixels` pixels (far fewer than the offline limit) are refused before decoding.
    Images are decoded small (`min_side` of embedder.data.decode), as the model needs only its
    resize size: a decode then costs at most about 4 bytes per declared pixel.
  * One forward pass at a time: the backbone already uses every core.
  * Bodies are limited per route before any parser sees them (service_guards.BodyLimit):
    uploads to --max-upload-mb, JSON to what one `dim`-long vector can need. Validation
    checks lengths before elements, and an answer lists the first errors and counts the rest.
  * Thumbnails are addressed by row id only, so no user-supplied path reaches the file
    system. No answer shows a server path: file names appear as the cache stored them
    (relative to SOURCE), through `display_path`, as JSON cannot carry non-UTF-8 bytes.
  * Uploads are decoded by embedder.data.decode with the rules used when indexing (EXIF
    orientation, alpha over white, bomb refusal), so an indexed image uploaded again finds itself.
"""

# No `from __future__ import annotations`: the endpoints' parameter types are built per index
# inside create_app, and FastAPI could not resolve them from strings there.
import io
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path as FsPath
from typing import Annotated

import anyio
import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Path, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from embedder.data.decode import DEFAULT_MAX_PIXELS, load_rgb_bytes, shown_size
from embedder.data.rows import load_location_rgb
from embedder.errors import BadImageError, ConfigError, EmbedderError, FilterError
from embedder.names import display_path
from embedder.search.ask import ALPHA as ROCCHIO_ALPHA
from embedder.search.ask import BETA as ROCCHIO_BETA
from embedder.search.ask import Example, answer
from embedder.search.ask import Query as Ask
from embedder.search.filters import MAX_LENGTH as MAX_FILTER_LENGTH
from embedder.search.filters import Filter
from embedder.search.queries import NoDirectionError, query_vectors
from embedder.search.query import Hit, SearchIndex
from embedder.serve.config import (
    DEFAULT_DECODE_SLOTS,
    DEFAULT_MAX_UPLOAD_PIXELS,
    LOOPBACK_HOSTS,
    MAX_EXAMPLES,
    MAX_K,
    ServerLimits,
)
from embedder.serve.guards import (
    SHOWN_ERRORS,
    BodyLimit,
    BodyTooLarge,
    HostAllowList,
    Limit,
    SecurityHeaders,
    clip,
    validation_error,
)
from embedder.serve.live import LiveIndex
from embedder.serve.maps import add_map_routes
from embedder.serve.server import uvicorn_options

DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20
WILDCARD_BINDS = ("", "0.0.0.0", "::")  # a server bound here has no one name of its own
THUMBNAIL_PX = 160  # longest side; small enough that a page of results loads instantly
# Multipart framing (boundaries, part headers, the file name) rides on top of the file's own
# bytes. The whole body may exceed max_upload_bytes by this much, so a file of exactly
# max_upload_bytes is accepted; the file itself is then held to max_upload_bytes exactly.
MULTIPART_SLACK = 64 * 1024
# A float written out takes at most 24 characters; 64 per value leaves room for indentation.
JSON_BYTES_PER_VALUE = 64
JSON_SLACK = 64 * 1024
FLOAT32_MAX = float(np.finfo(np.float32).max)
UPLOAD_SCHEMA = {"type": "string", "format": "binary", "minLength": 1}  # one image part, not empty
STATIC = {"search.js": "text/javascript; charset=utf-8", "search.css": "text/css; charset=utf-8",
          "map.js": "text/javascript; charset=utf-8", "map.css": "text/css; charset=utf-8"}

# ---------------------------------------------------------------- response models (OpenAPI)


class ErrorOut(BaseModel):
    detail: str = Field(description="what was wrong, and what to do about it (one line)")


class ErrorItem(BaseModel):
    loc: list[str] = Field(description="where: body, query or path, then the field")
    msg: str


class ValidationErrorOut(ErrorOut):
    errors: list[ErrorItem] = Field(default=[], max_length=SHOWN_ERRORS, description="the first few errors")
    error_count: int = Field(default=1, description="how many errors the request had in all")


class HitOut(BaseModel):
    model_config = ConfigDict(extra="allow")  # whatever else Hit.as_dict() carries passes through

    rank: int = Field(description="1-based rank")
    id: int = Field(description="row id in the cache and index")
    path: str = Field(
        description="image path as the cache stored it, relative to its SOURCE (absolute only for files "
        "outside it); undecodable bytes of a non-UTF-8 name are shown as \\xNN"
    )
    label: str | None = Field(description="class name; null when the cache is unlabelled")
    score: float | None = Field(
        description="cosine similarity (metric 'cosine', higher is closer) or squared L2 distance; null if not finite"
    )
    thumbnail: str = Field(description="URL of the neighbour's thumbnail")


class SearchOut(BaseModel):
    query: dict
    k: int
    metric: str
    hits: list[HitOut]


class HealthOut(BaseModel):
    status: str
    ntotal: int
    dim: int
    kind: str | None
    metric: str | None
    fingerprint: str | None
    out_of_step: str | None = Field(None, description="why the index no longer reflects its cache (the cache was "
                                    "synced, appended to or compacted since) and the command that brings it in "
                                    "step; null when it is in step or the cache is not at hand")


def _error(description: str, model: type[BaseModel] = ErrorOut) -> dict:
    return {"description": description, "model": model}


# Answers any route can give: the guards run before routing.
COMMON_RESPONSES = {
    400: _error("the Host header names no name this server answers to (see --allowed-host)"),
    413: _error("request body larger than the server accepts"),
}
INVALID = {422: _error("the request does not match this schema (the first errors are listed)", ValidationErrorOut)}

# ---------------------------------------------------------------- the application


def create_app(
    index_dir: str | os.PathLike,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    default_k: int = 10,
    max_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
    weights_path: str | None = None,
    allowed_hosts: Iterable[str] = LOOPBACK_HOSTS,
    decode_slots: int = DEFAULT_DECODE_SLOTS,
    runtime: str = "auto",
) -> FastAPI:
    """The search service for the index in `index_dir`, opened here (and re-opened when the folder changes).

    `max_pixels` bounds uploads (refused as decompression bombs above it); thumbnails of the
    indexed files keep the offline limit. `allowed_hosts` are the Host names answered ("*":
    any). `weights_path` is needed only for searches by image over a cache embedded with
    weights from a local file (the index records their identity, not their location). `runtime`
    runs the queries' backbone (auto: the cache's own).
    """
    if max_upload_bytes < 1:
        raise ConfigError(f"--max-upload-mb must be positive, got {max_upload_bytes} bytes.")
    if not 1 <= default_k <= MAX_K:
        raise ConfigError(f"-k must be between 1 and {MAX_K}, got {default_k}.")
    if max_pixels < 1 or decode_slots < 1:
        raise ConfigError(f"--max-upload-pixels and --decode-slots must be positive, got {max_pixels} and "
                          f"{decode_slots}.")
    live = LiveIndex(index_dir, lambda folder: SearchIndex.open(folder, weights_path=weights_path, runtime=runtime))
    index = live.index  # the first generation: the request schemas (widths, bounds, names) come from it
    app = FastAPI(
        title="embedder similarity search",
        version=_version(),
        description=(
            f"Nearest neighbours among {index.ntotal} images ({index.dim}-d features, "
            f"{index.meta.get('kind')} index, {index.metric} metric). Upload an image, name an indexed row id, "
            "or send a feature vector."
        ),
        docs_url=None,  # Swagger UI and ReDoc load their scripts from a CDN: offline they are blank pages
        redoc_url=None,
        responses=COMMON_RESPONSES,
    )
    app.state.index, app.state.live = index, live  # live.current(): the generation being served
    # Starlette runs the last middleware added first: headers on everything, then Host, then size.
    app.add_middleware(BodyLimit, **_body_limits(max_upload_bytes, index.dim))
    app.add_middleware(HostAllowList, allowed=allowed_hosts)
    app.add_middleware(SecurityHeaders)
    limits = _Limits(default_k, max_upload_bytes, max_pixels, anyio.Semaphore(decode_slots),
                     _scrubber(index, weights_path))
    _add_error_handlers(app, limits.scrub)
    current = Annotated[SearchIndex, Depends(_current_index(live))]  # one generation per request
    _add_page_routes(app, current)
    _add_image_routes(app, index, current, limits)
    _add_lookup_routes(app, index, current, limits)
    add_map_routes(app, live, _get_and_head, INVALID, {503: _error(
        "no current stored map, and the PCA computed instead cannot read the index's vectors (the fix is given)")})
    return app


def _body_limits(max_upload_bytes: int, dim: int) -> dict:
    upload = Limit(max_upload_bytes + MULTIPART_SLACK, lambda what: UploadTooLarge(max_upload_bytes, what))
    json_bytes = JSON_SLACK + JSON_BYTES_PER_VALUE * dim

    def json_refusal(what: str) -> BodyTooLarge:
        return BodyTooLarge(
            f"request body too large: {what}; this server accepts JSON bodies of at most {json_bytes} bytes, "
            f"room for one {dim}-d vector (send one vector per request)"
        )

    return {"default": Limit(json_bytes, json_refusal), "by_path": {"/search/image": upload}}


class UploadTooLarge(BodyTooLarge):
    def __init__(self, max_upload_bytes: int, what: str):
        super().__init__(
            f"upload too large: {what}; this server accepts images of at most {max_upload_bytes} bytes "
            f"({max_upload_bytes / 2**20:.3g} MB) (send a smaller image, or restart the service with a larger "
            "--max-upload-mb)"
        )


def _add_error_handlers(app: FastAPI, scrub: Callable[[str], str]) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error(exc.errors()), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the first route's methods only; GET and HEAD are two routes
            allowed = set().union(*(r.methods for r in app.routes if _matches(r, request.scope) and r.methods))
            headers["Allow"] = ", ".join(sorted(allowed))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(EmbedderError)
    async def unavailable(request: Request, exc: EmbedderError) -> JSONResponse:
        # The server's setup, not the request, is at fault (e.g. the backbone for searches by
        # image cannot be rebuilt here): 503 with the fix, and the other endpoints keep working.
        return JSONResponse({"detail": scrub(str(exc))}, status_code=503)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        # Starlette still logs the traceback; the client learns nothing about the server's insides.
        return JSONResponse({"detail": "internal error; the server's log has the details"}, status_code=500)


def _current_index(live: LiveIndex) -> Callable:
    async def current_index() -> SearchIndex:  # on the event loop; a reload runs in a thread (embedder.serve.live)
        return await live.current_async()

    return current_index


def _add_page_routes(app: FastAPI, current) -> None:
    page, map_page = _static("index.html"), _static("map.html")
    assets = {name: _static(name) for name in STATIC}
    step = _StepCheck()

    @_get_and_head(app, "/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> HTMLResponse:
        return HTMLResponse(page)

    @_get_and_head(app, "/map", response_class=HTMLResponse, include_in_schema=False)
    def map_home() -> HTMLResponse:  # its data: /map/points (embedder.serve.maps)
        return HTMLResponse(map_page)

    for name, media_type in STATIC.items():
        _get_and_head(app, f"/static/{name}", include_in_schema=False)(
            lambda body=assets[name], media_type=media_type: Response(body, media_type=media_type)
        )

    @_get_and_head(app, "/health", response_model=HealthOut, summary="Liveness and what is being served")
    async def health(index: current) -> dict:  # on the event loop: answers even while every worker thread is busy
        return {
            "status": "ok",
            "ntotal": index.ntotal,
            "dim": index.dim,
            "kind": index.meta.get("kind"),
            "metric": index.metric,
            "fingerprint": index.meta.get("fingerprint"),
            "out_of_step": step.of(index),
        }


class _StepCheck:
    """`out_of_step` of the index being served, read from its cache's attributes at most once per
    CHECK_S seconds (a small HDF5 read, kept off the hot path of a busy /health)."""

    CHECK_S = 2.0

    def __init__(self):
        self._last: tuple[int, float, str | None] | None = None

    def of(self, index: SearchIndex) -> str | None:
        import time

        from embedder.search.removal import out_of_step

        now = time.monotonic()
        if self._last is None or self._last[0] != id(index) or now - self._last[1] > self.CHECK_S:
            self._last = (id(index), now, out_of_step(index.meta, index.ntotal))
        return self._last[2]


@dataclass(frozen=True)
class _Limits:
    """What bounds the work of one request (create_app's arguments, resolved once)."""

    default_k: int
    max_upload_bytes: int
    max_pixels: int
    decode_slots: anyio.Semaphore  # images decoded at once, uploads and thumbnails together
    scrub: Callable[[str], str]


# The filter fields' OpenAPI format: a grammar no JSON schema states, named so that a client (and
# the schemathesis hooks in benchmarks/) can tell a filter from any other string.
FILTER_FORMAT = "embedder-row-filter"
FILTER_HELP = ("only rows this filter keeps, e.g. `label == 'cat' and width >= 256` (docs/reference/filters.md; "
               "columns: {columns}); empty: every row")


def _params(index: SearchIndex) -> tuple:
    """The k, row id and filter parameters, with this index's bounds in their schema."""
    k = Annotated[int, Query(ge=1, le=MAX_K, description="neighbours to return")]
    row = Annotated[int, Path(
        description=f"row id of an indexed image (0 to {index.ntotal - 1}; see `id` in any hit)",
        json_schema_extra={"minimum": 0, "maximum": index.ntotal - 1},  # enforced by _check_row, with a 404
    )]
    where = Annotated[str, Query(max_length=MAX_FILTER_LENGTH, description=_filter_help(index),
                                 json_schema_extra={"format": FILTER_FORMAT})]
    return k, row, where


def _filter_help(index: SearchIndex) -> str:
    return FILTER_HELP.format(columns=", ".join(index.filter_columns()))


def _filter(index: SearchIndex, where: str | None) -> Filter | None:
    """The request's filter, parsed (and its mask computed) before any other work: 422 with the
    parser's message, which points at the bad token."""
    try:
        return index.parse_filter(where or None)
    except FilterError as exc:
        raise HTTPException(422, detail=str(exc)) from None


def _add_image_routes(app: FastAPI, first: SearchIndex, current, limits: _Limits) -> None:
    k_param, row_param, where_param = _params(first)
    model_lock = anyio.Lock()  # one forward pass at a time: parallel ones only fight over the cores

    @app.post("/search/image", response_model=SearchOut, summary="Neighbours of an uploaded image", responses={
        400: _error("not a usable image (the reason is given), or a bad Host header"),
        413: _error("upload larger than the server's limit (--max-upload-mb)"),
        503: _error("the cache's backbone cannot be rebuilt on this server (the fix is given)"),
        **INVALID,
    })
    async def search_image(
        file: Annotated[list[UploadFile], File(
            description="the query image (any format PIL reads), not empty; several `file` parts are positive "
            f"examples combined into one query (Rocchio: their mean; at most {MAX_EXAMPLES})",
            json_schema_extra={"items": UPLOAD_SCHEMA, "minItems": 1, "maxItems": MAX_EXAMPLES},
        )],
        examples: Annotated[_Examples, Depends(_Examples.of_index(first, current))],
        index: current,
        k: k_param = limits.default_k,
        where: where_param = "",
        negative: Annotated[list[UploadFile], File(
            description="negative example images: the query moves away from them (Rocchio, beta "
            f"{ROCCHIO_BETA})", json_schema_extra={"items": UPLOAD_SCHEMA, "maxItems": MAX_EXAMPLES},
        )] = [],  # noqa: B006 - FastAPI's way of declaring an optional list of files; never mutated
    ) -> dict:
        where = await run_in_threadpool(_filter, index, where)  # a bad filter costs no decode
        uploads = _Uploads(index, limits)
        if len(file) == 1 and not negative and examples.plain:
            # Waiting for a slot or the model happens here, on the event loop: no thread is held.
            async with limits.decode_slots:
                image, query = await run_in_threadpool(uploads.decode, file[0])
            k = min(k, index.ntotal)
            async with model_lock:
                feats = await run_in_threadpool(uploads.embed, [image], query["filename"])
            return await run_in_threadpool(examples.answer, query, [Example.of_vector(feats[0])], [], k, where)
        examples.check_count(len(file), "images")
        examples.check_count(len(negative), "negative images")
        decoded = []
        for part in [*file, *negative]:
            async with limits.decode_slots:
                decoded.append(await run_in_threadpool(uploads.decode, part))
        k = min(k, index.ntotal)
        async with model_lock:
            feats = await run_in_threadpool(uploads.embed, [image for image, _ in decoded])
        query = {"positives": [q for _, q in decoded[:len(file)]], "negatives": [q for _, q in decoded[len(file):]]}
        positives, negatives = [Example.of_vector(f) for f in feats[:len(file)]], feats[len(file):]
        return await run_in_threadpool(examples.answer, query, positives, [Example.of_vector(f) for f in negatives],
                                       k, where)

    @_get_and_head(
        app, "/thumbnail/{row_id}", summary="JPEG thumbnail of an indexed image", response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, 404: _error("no such row id, or its file is gone"), **INVALID},
    )
    async def thumbnail(row_id: row_param, index: current) -> Response:
        _check_row(index, row_id)
        async with limits.decode_slots:
            jpeg = await run_in_threadpool(_thumbnail, index, row_id, limits.scrub)
        # Row ids are fixed for the life of an index, so browsers may keep thumbnails a while.
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


class _Uploads:
    """Uploaded images: read (within the size limit), decoded small, searched."""

    RAISE_LIMIT = "send a smaller image, or restart the service with a larger --max-upload-pixels"

    def __init__(self, index: SearchIndex, limits: _Limits):
        self.index, self.limits = index, limits
        self.min_side = _model_side(index.meta)

    def decode(self, file: UploadFile) -> tuple:
        cap = self.limits.max_upload_bytes
        data = file.file.read(cap + 1)
        if len(data) > cap:
            raise UploadTooLarge(cap, f"the file is larger than {cap} bytes")
        name = clip(display_path(file.filename or "upload"), 100)
        try:
            image = load_rgb_bytes(data, self.limits.max_pixels, min_side=self.min_side, raise_limit=self.RAISE_LIMIT)
        except BadImageError as exc:
            raise HTTPException(400, detail=f"{name}: {exc.reason}") from None
        width, height = shown_size(data)  # of the upload, not of its smaller decoded copy
        return image, {"filename": name, "bytes": len(data), "width": width, "height": height}

    def embed(self, images, name: str = "an upload") -> np.ndarray:
        try:
            return self.index.embed_pixels(images, max_pixels=self.limits.max_pixels)
        except BadImageError as exc:  # e.g. an extreme aspect ratio, found when resizing
            raise HTTPException(400, detail=f"{name}: {exc.reason}") from None


def _add_lookup_routes(app: FastAPI, first: SearchIndex, current, limits: _Limits) -> None:
    k_param, row_param, where_param = _params(first)
    query_model = _vector_query(first.dim, limits.default_k, first.metric, _filter_help(first))

    @_get_and_head(app, "/search/id/{row_id}", response_model=SearchOut,
                   summary="Neighbours of an indexed image, by row id",
                   responses={404: _error("no indexed image has this id"),
                              410: _error("this row, or a negative_id, was removed from the index"),
                              **INVALID})
    def search_id(row_id: row_param, examples: Annotated[_Examples, Depends(_Examples.of_index(first, current))],
                  index: current, k: k_param = limits.default_k, where: where_param = "") -> dict:
        _check_row(index, row_id)
        _refuse_removed(index, [row_id])
        where = _filter(index, where)
        k = min(k, index.ntotal)
        return examples.answer({"id": row_id}, [Example.of_id(row_id)], [], k, where)

    @app.post("/search/vector", response_model=SearchOut, summary="Neighbours of a feature vector", responses={
        422: _error(f"not one {first.dim}-d vector of finite numbers (or all zero under cosine), or a bad "
                    "filter", ValidationErrorOut),
    })
    def search_vector(body: query_model, index: current) -> dict:
        vector = _query_vector(body.vector, index.metric)
        where = _filter(index, body.where)
        k = min(body.k, index.ntotal)
        return _Examples(index, body.threshold, []).answer({"vector_dim": index.dim}, [Example.of_vector(vector)], [],
                                                           k, where)


def range_field(metric: str) -> tuple[str, dict]:
    """The range parameter of an index's metric, (name, Field/Query keywords): one name per metric,
    so that every schema-valid request is one the server accepts."""
    if metric == "cosine":
        return "min_score", {"allow_inf_nan": False, "description": (
            "range search: every row with cosine similarity >= min_score, best first, at most k")}
    return "max_distance", {"ge": 0, "allow_inf_nan": False, "description": (
        "range search: every row with squared L2 distance <= max_distance, nearest first, at most k")}


class _Examples:
    """What /search/image and /search/id take besides the query: negative rows and a range."""

    def __init__(self, index: SearchIndex, threshold: float | None, negative_id: list[int]):
        self.index, self.threshold, self.negative_id = index, threshold, negative_id
        self.plain = threshold is None and not negative_id  # a plain k-nearest query, as before

    @classmethod
    def of_index(cls, first: SearchIndex, current) -> Callable:
        """The FastAPI dependency that reads them, with the first generation's bounds in its schema
        (a later one may have more rows: the upper bound is checked against the request's)."""
        name, keywords = range_field(first.metric)
        row = Annotated[int, Field(ge=0, json_schema_extra={"maximum": first.ntotal - 1})]

        other = range_field("l2" if first.metric == "cosine" else "cosine")[0]

        def examples(
            request: Request,
            index: current,
            threshold: Annotated[float | None, Query(alias=name, **keywords)] = None,
            negative_id: Annotated[list[row], Query(
                description="indexed rows as negative examples: the query moves away from them (Rocchio, beta "
                f"{ROCCHIO_BETA})", max_length=MAX_EXAMPLES)] = [],  # noqa: B006 - FastAPI's optional list; never mutated
        ) -> _Examples:
            if other in request.query_params:  # not in the schema, but a likely mistake: say so
                raise HTTPException(422, detail=f"this index ranks by {index.metric}: give the range as {name}, "
                                                f"not {other}")
            beyond = [i for i in negative_id if i >= index.ntotal]
            if beyond:
                raise HTTPException(422, detail=f"negative_id {beyond[0]} is no row id: ids run from 0 to "
                                                f"{index.ntotal - 1}")
            _refuse_removed(index, negative_id)  # before any upload is decoded
            return cls(index, threshold, negative_id)

        return examples

    @staticmethod
    def check_count(n: int, what: str) -> None:
        if n > MAX_EXAMPLES:
            raise HTTPException(422, detail=f"{n} {what} in one query; this server takes at most {MAX_EXAMPLES}")

    def answer(self, query: dict, positives: list[Example], negatives: list[Example], k: int,
               where: Filter | None = None) -> dict:
        """The request as a Query (several uploads combine into one, as do any negatives), answered
        by embedder.search.ask: the k nearest among the rows `where` keeps, or the range, at most k."""
        query = _with_filter(query, where)
        if self.negative_id:
            negatives = [*negatives, *map(Example.of_id, self.negative_id)]
            query = {**query, "negative_ids": self.negative_id}
        if self.threshold is not None:
            query = {**query, range_field(self.index.metric)[0]: self.threshold}
        ask = Ask(tuple(positives), tuple(negatives), k=k, threshold=self.threshold, where=where,
                  combine=len(positives) > 1, alpha=ROCCHIO_ALPHA, beta=ROCCHIO_BETA)
        try:
            (hits,) = answer(self.index, ask)
        except NoDirectionError as exc:  # the negatives cancel the positives: the request's fault
            raise HTTPException(422, detail=str(exc)) from None
        return _results(query, k, hits, self.index.metric)


def _with_filter(query: dict, where: Filter | None) -> dict:
    return query if where is None else {**query, "where": where.text}


def _vector_query(dim: int, default_k: int, metric: str, filter_help: str = "") -> type[BaseModel]:
    """The body of /search/vector, with the index's width in its schema (checked before the elements)."""
    element = Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]  # finite in float32
    nonzero = {"contains": {"not": {"const": 0}}} if metric == "cosine" else None
    range_name, range_keywords = range_field(metric)

    class VectorQuery(BaseModel):
        model_config = ConfigDict(extra="forbid")  # a misspelt "K" is an error, not silently the default

        vector: list[element] = Field(
            min_length=dim, max_length=dim, json_schema_extra=nonzero,
            description=f"one {dim}-d feature vector from the cache's backbone and layer"
            + (" (not all zero: cosine needs a direction)" if nonzero else ""),
        )
        k: int = Field(default=default_k, ge=1, le=MAX_K, description="neighbours to return")
        where: str = Field(default="", max_length=MAX_FILTER_LENGTH, description=filter_help,
                           json_schema_extra={"format": FILTER_FORMAT})
        # strict: `false` is not a score (lax mode would read it as 0.0); integers still pass
        threshold: float | None = Field(default=None, alias=range_name, strict=True, **range_keywords)

        @field_validator("vector", mode="before")
        @classmethod
        def one_vector(cls, value):
            # Before the elements: a million-item list costs one error, not a million.
            if isinstance(value, list) and len(value) != dim:
                raise PydanticCustomError(
                    "wrong_length",
                    f"vector has {len(value)} values but this index holds {dim}-d features "
                    "(send one feature vector from the same backbone and layer as the cache)",
                )
            return value

    return VectorQuery


def _query_vector(values: list[float], metric: str) -> np.ndarray:
    try:  # the schema has checked the length and the bounds; the CLI's --vector takes the same check
        return query_vectors(values, len(values), metric)[0]
    except ConfigError as exc:
        raise HTTPException(422, detail=str(exc)) from None


def _results(query: dict, k: int, hits: list[Hit], metric: str) -> dict:
    out = []
    for hit in hits:
        d = hit.as_dict()
        d["path"] = display_path(hit.path)  # JSON cannot carry a non-UTF-8 name's raw bytes
        d["label"] = None if hit.label is None else display_path(hit.label)
        if not math.isfinite(d["score"]):
            d["score"] = None  # JSON has no NaN or infinity (an L2 distance can overflow)
        d["thumbnail"] = f"/thumbnail/{hit.id}"
        out.append(d)
    return {"query": query, "k": k, "metric": metric, "hits": out}


def _thumbnail(index: SearchIndex, row_id: int, scrub: Callable[[str], str]) -> bytes:
    path, shown = index.image_path(row_id), display_path(index.paths[row_id])
    try:
        # EXIF orientation and alpha as when indexed; decoded small, as only THUMBNAIL_PX are shown.
        pixels = load_location_rgb(path, DEFAULT_MAX_PIXELS, min_side=THUMBNAIL_PX)
    except BadImageError as exc:
        reason = scrub(exc.reason.replace(str(path), shown))  # an OS error names the file it could not open
        raise HTTPException(
            404,
            detail=f"row {row_id} ({shown}) cannot be shown: {reason} "
            "(the file changed since it was indexed; restore it, or re-embed and rebuild the index)",
        ) from None
    img = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
        limits: ServerLimits | None = None) -> None:
    """Serve an app from create_app with uvicorn until interrupted, within `limits` (embedder.serve.server)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False,  # no version advertised
                **uvicorn_options(limits or ServerLimits()))


def allowed_hosts_for(host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """Loopback names, the bound address when it is one address (not 0.0.0.0 or ::), and `extra`."""
    names = [*LOOPBACK_HOSTS, *([] if host in WILDCARD_BINDS else [host]), *extra]
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------- helpers


def _get_and_head(app: FastAPI, path: str, **options) -> Callable:
    """Register a GET endpoint and its HEAD twin (RFC 9110: HEAD wherever GET), each its own operation."""

    def register(endpoint: Callable) -> Callable:
        app.get(path, **options)(endpoint)
        app.head(path, **options)(endpoint)
        return endpoint

    return register


def _matches(route, scope) -> bool:
    return getattr(route, "methods", None) is not None and route.matches(scope)[0] != Match.NONE


def _refuse_removed(index: SearchIndex, row_ids) -> None:
    """410 for the first removed row among `row_ids` (the query's row, or a negative example)."""
    gone = [int(i) for i in row_ids if index.is_removed(int(i))]
    if gone:
        raise HTTPException(410, detail=f"row {gone[0]} ({display_path(index.paths[gone[0]])}) was removed from "
                                        "the index; it is never searched nor returned")


def _check_row(index: SearchIndex, row_id: int) -> None:
    if not 0 <= row_id < index.ntotal:
        shown = row_id if abs(row_id) < 10**18 else f"of {len(str(abs(row_id)))} digits"
        raise HTTPException(404, detail=f"no indexed image has id {shown}: ids run from 0 to {index.ntotal - 1}")


def _model_side(meta: dict) -> int | None:
    """Twice the shorter side the model resizes to: decoding smaller than that would change the query."""
    try:
        pre = json.loads(meta["components"]["preprocessing"])
        return 2 * int(pre.get("resize_size") or pre["crop_size"])
    except (KeyError, TypeError, ValueError):
        return None  # an index without preprocessing recorded: decode at full size


def _scrubber(index: SearchIndex, weights_path: str | None) -> Callable[[str], str]:
    """Replace the server's own paths in a message by what they are (SOURCE, INDEX_DIR, ...)."""
    places = {"SOURCE": index.source, "INDEX_DIR": index.dir, "CACHE": index.meta.get("cache"),
              "WEIGHTS": weights_path}
    forms = {}
    for name, place in places.items():
        if place:  # absolute forms only: a relative "images" or "." would also match ordinary words
            forms.update({str(FsPath(place).absolute()): name, str(FsPath(place).resolve()): name})
    forms.pop(os.sep, None)
    ordered = sorted(forms.items(), key=lambda item: -len(item[0]))  # longest first: a folder after its files

    def scrub(text: str) -> str:
        for path, name in ordered:
            text = text.replace(path, name)
        return text

    return scrub


def _static(name: str) -> bytes:
    return resources.files("embedder.serve").joinpath(f"static/{name}").read_bytes()


def _version() -> str:
    from embedder._version import __version__

    return __version__
