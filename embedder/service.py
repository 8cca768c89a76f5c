"""HTTP similarity search over a built index: a JSON API, thumbnails and a drop-an-image web page.

    create_app(index_dir)   the FastAPI application (the index is opened once, here)
    serve(index_dir, ...)   run it with uvicorn (`embedder serve`)

Design choices, and why:
  * Endpoints are plain `def`: FastAPI runs them in its threadpool, so a forward pass or
    a FAISS search never stalls the event loop that accepts the next request.
  * Upload size is enforced by an ASGI middleware *before* the multipart parser spools
    the body: a declared Content-Length over the limit is refused without reading a byte,
    and a body that lies (chunked, or no length) is cut off as soon as it passes the limit.
  * Thumbnails are addressed by row id only. The server maps an id to the path the cache
    recorded; no user-supplied path ever reaches the file system, so traversal is impossible.
  * Uploads are decoded by `embedder.decode.load_rgb_bytes`: the same rules (EXIF
    orientation, alpha over white, bomb limit) as the images that were indexed, so an
    indexed image uploaded again finds itself.
"""

from __future__ import annotations

import io
import math
import os
import threading
from importlib import resources
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, HTTPException, Path, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedder.decode import DEFAULT_MAX_PIXELS, load_rgb, load_rgb_bytes
from embedder.errors import BadImageError, EmbedderError
from embedder.index import Hit, SearchIndex

DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20
THUMBNAIL_PX = 160  # longest side; small enough that a page of results loads instantly
MAX_K = 1000  # more neighbours than anyone can look at; bounds the work one request can ask for
# Multipart framing (boundaries, part headers, the file name) rides on top of the file's own
# bytes. The whole body may exceed max_upload_bytes by this much, so a file of exactly
# max_upload_bytes is accepted; the file itself is then held to max_upload_bytes exactly.
MULTIPART_SLACK = 64 * 1024


KParam = Annotated[int | None, Query(ge=1, le=MAX_K, description="neighbours to return (default: the server's)")]

# ---------------------------------------------------------------- response models (OpenAPI)


class HitOut(BaseModel):
    model_config = ConfigDict(extra="allow")  # whatever else Hit.as_dict() carries passes through

    rank: int = Field(description="1-based rank")
    id: int = Field(description="row id in the cache and index")
    path: str = Field(description="image path relative to the cache's SOURCE (or absolute)")
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


class VectorQuery(BaseModel):
    vector: list[float] = Field(description="one feature vector, as long as the index's `dim`")
    k: int | None = Field(default=None, ge=1, le=MAX_K, description="neighbours to return (default: the server's)")


# ---------------------------------------------------------------- upload limit


class UploadTooLarge(HTTPException):
    def __init__(self, max_upload_bytes: int, what: str):
        super().__init__(
            status_code=413,
            detail=f"upload too large: {what}; this server accepts images of at most {max_upload_bytes} bytes "
            "(send a smaller image, or restart the service with a larger --max-upload-bytes)",
        )


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes, before anything buffers them.

    The body may carry `max_upload_bytes` of file plus MULTIPART_SLACK of framing. A
    Content-Length over that is answered 413 at once. Otherwise the bytes are counted as
    they arrive and reading stops with a 413 the moment the count passes the limit, so a
    client that sends no length (chunked) or a wrong one cannot make the multipart parser
    spool an arbitrarily large file to disk.
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int):
        self.app, self.max_upload_bytes = app, max_upload_bytes
        self.limit = max_upload_bytes + MULTIPART_SLACK

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            refusal = UploadTooLarge(self.max_upload_bytes, f"the request declares {declared} bytes")
            await _error_response(refusal, scope, receive, send)
            return

        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # FastAPI re-raises HTTPExceptions from body reading as they are: a JSON 413.
                    raise UploadTooLarge(self.max_upload_bytes, f"the request body passed {seen} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except UploadTooLarge as exc:
            # Normally the app's own exception handler has already answered 413; this is the
            # fallback for a refusal raised where no handler catches it.
            if started:
                raise
            await _error_response(exc, scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _error_response(exc: HTTPException, scope: Scope, receive: Receive, send: Send) -> None:
    # No "Connection: close" on purpose: on a keep-alive connection uvicorn then discards
    # (never buffers) the rest of the body, and the client reads this answer. Closing with
    # unread bytes in flight makes the kernel send a reset, and a client still uploading sees
    # "connection reset" instead of the message (as urllib, which itself asks for close, does
    # with a 2 MB upload).
    response = JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
    await response(scope, receive, send)


# ---------------------------------------------------------------- the application


def create_app(
    index_dir: str | os.PathLike,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    default_k: int = 10,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    weights_path: str | None = None,
) -> FastAPI:
    """The search service for the index in `index_dir`, opened once, here.

    `weights_path` is needed only for searches by image over a cache embedded with weights
    from a local file (the index records their identity, not their location).
    """
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
    if not 1 <= default_k <= MAX_K:
        raise ValueError(f"default_k must be between 1 and {MAX_K}, got {default_k}")
    index = SearchIndex.open(index_dir, weights_path=weights_path)
    meta = index.meta
    metric = str(meta.get("metric", "cosine"))
    # The backbone runs on all cores already (torch intra-op threads); two forward passes at
    # once only thrash, and the backbone is built lazily on first use. One at a time.
    pixels_lock = threading.Lock()

    app = FastAPI(
        title="embedder similarity search",
        version=_version(),
        description=(
            f"Nearest neighbours among {index.ntotal} images ({index.dim}-d features, "
            f"{meta.get('kind')} index, {metric} metric). Upload an image, name an indexed row id, "
            "or send a feature vector."
        ),
    )
    app.state.index = index
    app.add_middleware(BodyLimit, max_upload_bytes=max_upload_bytes)

    @app.exception_handler(EmbedderError)
    async def unavailable(request: Request, exc: EmbedderError) -> JSONResponse:
        # The server's setup, not the request, is at fault (e.g. the backbone for searches by
        # image cannot be rebuilt here): 503 with the fix, and the other endpoints keep working.
        return JSONResponse({"detail": str(exc)}, status_code=503)

    def k_or_default(k: int | None) -> int:
        return min(k if k is not None else default_k, index.ntotal)

    def results(query: dict, k: int, hits: list[Hit]) -> dict:
        out = []
        for hit in hits:
            d = hit.as_dict()
            if not math.isfinite(d["score"]):
                d["score"] = None  # JSON has no NaN; a zero-length query under cosine could produce one
            d["thumbnail"] = f"/thumbnail/{hit.id}"
            out.append(d)
        return {"query": query, "k": k, "metric": metric, "hits": out}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_page_html())

    @app.get("/health", response_model=HealthOut, summary="Liveness and what is being served")
    def health() -> dict:
        return {
            "status": "ok",
            "ntotal": index.ntotal,
            "dim": index.dim,
            "kind": meta.get("kind"),
            "metric": metric,
            "fingerprint": meta.get("fingerprint"),
        }

    @app.post(
        "/search/image",
        response_model=SearchOut,
        summary="Neighbours of an uploaded image",
        responses={
            400: {"description": "not a usable image (the reason is given)"},
            413: {"description": "upload larger than the server's limit"},
            503: {"description": "the cache's backbone cannot be rebuilt on this server (the fix is given)"},
        },
    )
    def search_image(
        file: Annotated[UploadFile, File(description="the query image (any format PIL reads)")],
        k: KParam = None,
    ) -> dict:
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise UploadTooLarge(max_upload_bytes, f"the file is larger than {max_upload_bytes} bytes")
        k = k_or_default(k)
        try:
            image = load_rgb_bytes(data, max_pixels)
            with pixels_lock:  # one forward pass at a time: parallel ones only fight over the cores
                hits = index.search_pixels([image], k=k, max_pixels=max_pixels)[0]
        except BadImageError as exc:
            raise HTTPException(400, detail=f"{file.filename or 'upload'}: {exc.reason}") from None
        query = {"filename": file.filename, "bytes": len(data), "width": image.shape[2], "height": image.shape[1]}
        return results(query, k, hits)

    @app.get(
        "/search/id/{row_id}",
        response_model=SearchOut,
        summary="Neighbours of an indexed image, by row id",
        responses={404: {"description": "no such row id"}},
    )
    def search_id(
        row_id: Annotated[int, Path(description="row id of an indexed image (see `id` in any hit)")],
        k: KParam = None,
    ) -> dict:
        _check_row(index, row_id)
        k = k_or_default(k)
        try:
            hits = index.search_ids([row_id], k=k)[0]
        except (IndexError, KeyError):
            raise HTTPException(404, detail=_unknown_row(index, row_id)) from None
        return results({"id": row_id}, k, hits)

    @app.post(
        "/search/vector",
        response_model=SearchOut,
        summary="Neighbours of a feature vector",
        responses={422: {"description": "wrong length, or values that cannot be searched"}},
    )
    def search_vector(body: VectorQuery) -> dict:
        vector = np.asarray(body.vector, dtype=np.float32)
        if vector.shape != (index.dim,):
            raise HTTPException(
                422,
                detail=f"vector has {vector.size} values but this index holds {index.dim}-d features "
                "(send one feature vector from the same backbone and layer as the cache)",
            )
        if not np.isfinite(vector).all():
            raise HTTPException(422, detail="vector contains NaN or infinite values; send finite numbers")
        if metric == "cosine" and not np.any(vector):
            raise HTTPException(422, detail="an all-zero vector has no direction to compare by cosine")
        k = k_or_default(body.k)
        hits = index.search(vector[None, :], k=k)[0]
        return results({"vector_dim": index.dim}, k, hits)

    @app.get(
        "/thumbnail/{row_id}",
        summary="JPEG thumbnail of an indexed image",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no such row id, or its file is gone"}},
    )
    def thumbnail(row_id: Annotated[int, Path(description="row id of an indexed image")]) -> Response:
        _check_row(index, row_id)
        try:
            path = index.image_path(row_id)
        except (IndexError, KeyError):
            raise HTTPException(404, detail=_unknown_row(index, row_id)) from None
        try:
            pixels = load_rgb(path, max_pixels)  # EXIF orientation and alpha handled as when indexed
        except BadImageError as exc:
            raise HTTPException(
                404,
                detail=f"row {row_id} ({path}) cannot be shown: {exc.reason} "
                "(the file changed since it was indexed; restore it, or re-embed and rebuild the index)",
            ) from None
        img = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        # Row ids are fixed for the life of an index, so browsers may keep thumbnails a while.
        return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


def serve(
    index_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    default_k: int = 10,
    log_level: str = "warning",
    weights_path: str | None = None,
) -> None:
    """Open the index and serve it with uvicorn until interrupted (Ctrl-C)."""
    import uvicorn

    app = create_app(index_dir, max_upload_bytes=max_upload_bytes, default_k=default_k, weights_path=weights_path)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


# ---------------------------------------------------------------- helpers


def _check_row(index: SearchIndex, row_id: int) -> None:
    if not 0 <= row_id < index.ntotal:
        raise HTTPException(404, detail=_unknown_row(index, row_id))


def _unknown_row(index: SearchIndex, row_id: int) -> str:
    return f"no indexed image has id {row_id}: ids run from 0 to {index.ntotal - 1}"
def _page_html() -> str:
    return resources.files("embedder").joinpath("static/index.html").read_text(encoding="utf-8")


def _version() -> str:
    from embedder import __version__

    return __version__
