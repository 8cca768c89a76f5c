"""The search service over real HTTP: a real index, a real uvicorn server, a real browser.

One index (3 classes x 6 random images plus one EXIF-rotated photo and two large images,
random-init resnet18 at 32 px, exact search) and one server for the whole module; every
request goes through a socket, so the upload limit, the guards in front of the app, the
threadpool and the error handlers are the ones that run in production. Besides the API and
the page: the hardening (bounded errors, big images, Host, headers, HEAD, non-UTF-8 names),
schemathesis over every route, and a short load (benchmarks/service.py has the long one).
"""

from __future__ import annotations

import http.client as httpclient
import io
import json
import os
import re
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import uvicorn  # noqa: F401  (a dependency of the package: a missing one must fail, not skip)
from PIL import Image

from embedder.cache.reader import FeatureCache
from embedder.cli.main import build_parser
from embedder.extract.local import embed
from embedder.search.build import build_index
from embedder.serve.app import create_app
from embedder.serve.config import MAX_EXAMPLES
from tests.conftest import fast_config, make_tree
from tests.loopback import running

K = 5
MAX_UPLOAD = 200_000
EXIF_IMAGE = "cat/cat_exif.jpg"  # stored 320x160, displayed 160x320 (EXIF orientation 6)
# Large enough that uploads of them are decoded small (JPEG draft, PNG box reduction): the
# model needs 37 px at 32 px crops, so they decode at ~1/8 and ~1/12 of their size.
LARGE = {"dog/dog_photo.jpg": (1600, 1200), "fox/fox_screen.png": (1200, 900)}
CHROMIUM = "/usr/bin/chromium"
# The closed network refuses the browser's own background connections; without these it stalls.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Service:
    url: str
    host: str
    port: int
    tree: Path
    cache: Path
    index: object  # the app's SearchIndex


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    tree = make_tree(root / "images")
    rgb = Image.fromarray(np.random.default_rng(7).integers(0, 256, (160, 320, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    rgb.save(tree / EXIF_IMAGE, exif=exif.tobytes(), quality=90)
    write_large_images(tree)
    cache, index_dir = root / "feats.h5", root / "index"
    embed(fast_config(tree, cache))
    build_index(cache, index_dir, kind="flat", progress=False)
    return tree, cache, index_dir


def write_large_images(tree: Path) -> None:
    import skimage.data

    photo = Image.fromarray(skimage.data.chelsea()).resize(LARGE["dog/dog_photo.jpg"], Image.Resampling.BICUBIC)
    photo.save(tree / "dog/dog_photo.jpg", quality=75)
    w, h = LARGE["fox/fox_screen.png"]
    y, x = np.mgrid[0:h, 0:w]
    screen = np.stack([x * 255 // w, y * 255 // h, (x // 150 % 2) * 200, np.where(x < 200, 0, 255)], -1)
    # Flat bands and gradients compress like a screenshot; the transparent band is white once decoded.
    Image.fromarray(screen.astype(np.uint8), "RGBA").save(tree / "fox/fox_screen.png")


@pytest.fixture(scope="module")
def service(built):
    tree, cache, index_dir = built
    app = create_app(index_dir, max_upload_bytes=MAX_UPLOAD, default_k=K)
    with running(app) as (host, port):
        yield Service(f"http://{host}:{port}", host, port, tree, cache, app.state.index)


# ---------------------------------------------------------------- HTTP helpers


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return Reply(r.status, dict(r.headers), r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, dict(e.headers), e.read())


def multipart(filename: str, data: bytes, content_type: str = "application/octet-stream") -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload(service: Service, filename: str, data: bytes, k: int | None = None) -> Reply:
    body, headers = multipart(filename, data)
    query = f"?k={k}" if k is not None else ""
    return http("POST", f"{service.url}/search/image{query}", body, headers)


def post_json(service: Service, path: str, obj) -> Reply:
    return http("POST", service.url + path, json.dumps(obj).encode(), {"Content-Type": "application/json"})


def raw_exchange(service: Service, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send bytes on a bare socket, never finishing the body, and read whatever answer comes.

    A server that waited for the rest of the body would never answer: the read times out.
    """
    with socket.create_connection((service.host, service.port), timeout=15) as s:
        s.sendall(head)
        for part in body_parts:
            s.sendall(part)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            pytest.fail(f"no answer: the server waited for the rest of the body (got {answer!r})")
        return answer


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def indexed_file(service: Service, rel: str) -> tuple[int, bytes]:
    return service.index.row_of_path(rel), (service.tree / rel).read_bytes()


def serve_parser():
    subcommands = next(a for a in build_parser()._actions if a.dest == "command")
    return subcommands.choices["serve"]


# ---------------------------------------------------------------- API


def test_health_describes_the_index(service):
    r = http("GET", service.url + "/health")
    assert r.status == 200
    h = r.json()
    assert h["status"] == "ok"
    assert h["ntotal"] == 3 * 6 + 1 + len(LARGE)
    assert h["dim"] == 512  # resnet18's pooled features
    assert (h["kind"], h["metric"]) == ("flat", "cosine")
    with FeatureCache(service.cache) as cache:
        assert h["fingerprint"] == cache.fingerprint


def test_an_indexed_image_uploaded_again_finds_itself_first(service):
    for rel in ("dog/dog_002.jpg", "fox/fox_003.png"):
        row, data = indexed_file(service, rel)
        r = upload(service, Path(rel).name, data)
        assert r.status == 200, r.body
        result = r.json()
        hits = result["hits"]
        assert len(hits) == K == result["k"]
        assert [h["rank"] for h in hits] == list(range(1, K + 1))
        assert (hits[0]["id"], hits[0]["path"], hits[0]["label"]) == (row, rel, rel.split("/")[0])
        assert hits[0]["score"] == max(h["score"] for h in hits)
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)  # cosine of a feature with itself
        assert hits[0]["thumbnail"] == f"/thumbnail/{row}"
        assert result["query"]["filename"] == Path(rel).name


def test_k_is_honoured_and_bounded(service):
    _, data = indexed_file(service, "cat/cat_000.jpg")
    assert len(upload(service, "q.jpg", data, k=2).json()["hits"]) == 2
    assert len(upload(service, "q.jpg", data, k=1000).json()["hits"]) == service.index.ntotal
    assert upload(service, "q.jpg", data, k=0).status == 422


def test_search_by_id_ranks_the_row_itself_first(service):
    row = service.index.row_of_path("cat/cat_004.jpg")
    r = http("GET", f"{service.url}/search/id/{row}?k=3")
    assert r.status == 200, r.body
    hits = r.json()["hits"]
    assert len(hits) == 3
    assert (hits[0]["rank"], hits[0]["id"], hits[0]["path"]) == (1, row, "cat/cat_004.jpg")
    assert len({h["id"] for h in hits}) == 3


def test_search_by_vector_finds_the_row_it_came_from(service):
    row = service.index.row_of_path("fox/fox_001.png")
    with FeatureCache(service.cache) as cache:
        vector = cache.features(slice(row, row + 1))[0]
    r = post_json(service, "/search/vector", {"vector": vector.tolist(), "k": 4})
    assert r.status == 200, r.body
    hits = r.json()["hits"]
    assert len(hits) == 4 and hits[0]["id"] == row and hits[0]["path"] == "fox/fox_001.png"


def test_vector_of_the_wrong_length_is_refused_with_the_expected_length(service):
    r = post_json(service, "/search/vector", {"vector": [0.5] * 7})
    assert r.status == 422
    assert "7 values" in r.json()["detail"] and "512" in r.json()["detail"]
    r = post_json(service, "/search/vector", {"vector": [0.0] * 512})
    assert r.status == 422 and "zero" in r.json()["detail"]


def test_thumbnail_is_a_small_upright_jpeg(service):
    row = service.index.row_of_path(EXIF_IMAGE)
    r = http("GET", f"{service.url}/thumbnail/{row}")
    assert r.status == 200
    assert r.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(r.body)) as thumb:
        assert thumb.format == "JPEG"
        assert thumb.size == (80, 160)  # stored 320x160: shown upright (portrait) and shrunk to 160 px


def test_unknown_ids_are_404(service):
    n = service.index.ntotal
    for path in (f"/thumbnail/{n}", f"/search/id/{n}", "/search/id/-1", "/thumbnail/-1"):
        r = http("GET", service.url + path)
        assert r.status == 404, path
        assert f"0 to {n - 1}" in r.json()["detail"]


def test_thumbnail_of_a_vanished_file_is_404_with_the_reason(service):
    rel = "dog/dog_005.png"
    row = service.index.row_of_path(rel)
    src = service.tree / rel
    hidden = src.with_name("hidden.bak")
    os.replace(src, hidden)
    try:
        r = http("GET", f"{service.url}/thumbnail/{row}")
    finally:
        os.replace(hidden, src)
    assert r.status == 404
    detail = r.json()["detail"]
    assert "file not found" in detail and f"({rel})" in detail  # the path as stored: relative to SOURCE
    assert str(service.tree) not in detail and str(service.tree.resolve()) not in detail
    assert http("GET", f"{service.url}/thumbnail/{row}").status == 200  # back once restored


def test_a_file_the_server_cannot_open_is_404_without_server_paths(service):
    # getsize succeeds, open fails: the OS error names the file, and the answer must not repeat it.
    rel = "fox/fox_002.jpg"
    row = service.index.row_of_path(rel)
    src = service.tree / rel
    saved = src.read_bytes()
    src.unlink()
    src.mkdir()  # a folder where the image was: its size reads, opening it as a file fails
    try:
        r = http("GET", f"{service.url}/thumbnail/{row}")
    finally:
        src.rmdir()
        src.write_bytes(saved)
    assert r.status == 404
    detail = r.json()["detail"]
    assert f"({rel})" in detail and "cannot be shown" in detail
    assert str(service.tree) not in detail and str(service.tree.resolve()) not in detail


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("notes.txt", lambda jpeg: b"these are not the pixels you are looking for\n" * 10, "not an image"),
        ("cut.jpg", lambda jpeg: jpeg[: len(jpeg) // 2], "truncated"),
        ("empty.png", lambda jpeg: b"", "empty file"),
        ("banner.png", lambda jpeg: _png(Image.new("RGB", (65_400, 1), (200, 30, 30))), "extreme aspect ratio"),
    ],
)
def test_unusable_uploads_are_400_with_the_reason(service, name, make, reason):
    _, jpeg = indexed_file(service, EXIF_IMAGE)
    r = upload(service, name, make(jpeg))
    assert r.status == 400
    detail = r.json()["detail"]
    assert reason in detail and name in detail


def test_oversize_upload_is_413(service):
    data = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    body, headers = multipart("big.jpg", data)
    # http.client keeps the connection alive (urllib asks for close): the server discards the
    # unread rest of the body and the answer arrives intact, as it does for a browser.
    conn = httpclient.HTTPConnection(service.host, service.port, timeout=30)
    try:
        conn.request("POST", "/search/image", body=body, headers=headers)
        r = conn.getresponse()
        status, detail = r.status, json.loads(r.read())["detail"]
    finally:
        conn.close()
    assert status == 413
    assert "declares" in detail and str(MAX_UPLOAD) in detail
    assert "--max-upload-mb" in detail  # the flag `embedder serve` has (it once named one it lacks)
    assert "--max-upload-mb" in {a for action in serve_parser()._actions for a in action.option_strings}


def test_upload_limit_is_exact_for_the_file_itself(service):
    # The body may exceed the limit by the multipart framing; the file may not exceed it at all.
    at_limit = upload(service, "junk.bin", b"\x01" * MAX_UPLOAD)
    assert at_limit.status == 400 and "not an image" in at_limit.json()["detail"]  # accepted, then decoded
    over = upload(service, "junk.bin", b"\x01" * (MAX_UPLOAD + 1))
    assert over.status == 413 and "the file is larger than" in over.json()["detail"]


def test_declared_oversize_is_refused_before_the_body_is_read(service):
    # Content-Length says 1 GB and no body follows: only an up-front check can answer.
    head = (
        b"POST /search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    answer = raw_exchange(service, head, [])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_undeclared_oversize_is_cut_off_while_reading(service):
    # Chunked, no Content-Length, and the body never ends: only counting can stop it.
    head = (
        b"POST /search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    preamble = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n'
    chunk = b"\xab" * 32_768
    parts = [b"%x\r\n%s\r\n" % (len(preamble), preamble)] + [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 10
    answer = raw_exchange(service, head, parts)  # 320 kB sent, limit 200 kB + framing slack
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"upload too large" in answer


def test_the_service_keeps_answering_after_bad_requests_and_in_parallel(service):
    _, good = indexed_file(service, "cat/cat_001.png")
    jobs = [lambda: upload(service, "bad.txt", b"nope"), lambda: upload(service, "q.png", good)] * 4
    jobs += [lambda: http("GET", service.url + "/health")] * 4
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = [f.result().status for f in [pool.submit(job) for job in jobs]]
    assert statuses == [400, 200] * 4 + [200] * 4
    assert http("GET", service.url + "/health").json()["status"] == "ok"


def test_a_backbone_that_cannot_be_rebuilt_is_503_and_the_rest_still_works(built, tmp_path):
    # The cache was embedded with weights from a local file this server was not given.
    tree, _, index_dir = built
    moved = tmp_path / "index"
    shutil.copytree(index_dir, moved)
    meta = json.loads((moved / "meta.json").read_text())
    meta["components"]["weights"] = "file:sha256=0123456789abcdef"
    (moved / "meta.json").write_text(json.dumps(meta))
    with running(create_app(moved)) as (host, port):
        url = f"http://{host}:{port}"
        body, headers = multipart("q.jpg", (tree / "cat/cat_000.jpg").read_bytes())
        r = http("POST", f"{url}/search/image", body, headers)
        assert r.status == 503
        assert "--weights PATH" in r.json()["detail"]
        assert http("GET", f"{url}/search/id/0").status == 200
    # Given a weights file that is not there, the reason names it: as WEIGHTS, not by its server path.
    secret = tmp_path / "private" / "weights.pt"
    with running(create_app(moved, weights_path=str(secret))) as (host, port):
        r = http("POST", f"http://{host}:{port}/search/image", body, headers)
    assert r.status == 503
    assert "'WEIGHTS' is neither DEFAULT" in r.json()["detail"] and str(tmp_path) not in r.json()["detail"]


# ---------------------------------------------------------------- filters and removed rows


def quoted(where: str) -> str:
    return urllib.parse.quote(where)


def test_every_search_endpoint_takes_a_filter(service):
    labels = np.array([p.split("/")[0] for p in service.index.paths])
    fox = np.flatnonzero(labels == "fox")
    where = "label == 'fox' and not path glob '*screen*'"
    keep = [i for i in fox if "screen" not in service.index.paths[i]]
    r = http("GET", f"{service.url}/search/id/0?k=100&where={quoted(where)}")
    assert r.status == 200 and r.json()["query"]["where"] == where
    assert sorted(h["id"] for h in r.json()["hits"]) == sorted(int(i) for i in keep)  # all of them, none else
    with FeatureCache(service.cache) as c:
        vector = c.features(slice(0, 1))[0].tolist()
    r = post_json(service, "/search/vector", {"vector": vector, "k": 3, "where": "label == 'dog'"})
    assert r.status == 200 and [h["label"] for h in r.json()["hits"]] == ["dog"] * 3
    body, headers = multipart("q.jpg", (service.tree / "cat/cat_000.jpg").read_bytes())
    dogs = quoted("label in ('dog')")
    r = http("POST", f"{service.url}/search/image?k=2&where={dogs}", body, headers)
    assert r.status == 200 and [h["label"] for h in r.json()["hits"]] == ["dog", "dog"]
    r = http("GET", f"{service.url}/search/id/0?where=")  # an empty filter keeps every row
    assert r.status == 200 and r.json()["hits"][0]["id"] == 0 and "where" not in r.json()["query"]


@pytest.mark.parametrize("where, words", [
    ("label == fox", "expected a value"), ("colour == 'red'", "known columns: id, path, label"),
    ("id >= 'x'", "type mismatch"), ("(label == 'fox'", "expected `)`"),
])
def test_a_bad_filter_is_422_with_the_message_on_every_endpoint(service, where, words):
    body, headers = multipart("q.jpg", (service.tree / "cat/cat_000.jpg").read_bytes())
    with FeatureCache(service.cache) as c:
        vector = c.features(slice(0, 1))[0].tolist()
    replies = [http("GET", f"{service.url}/search/id/0?where={quoted(where)}"),
               http("POST", f"{service.url}/search/image?where={quoted(where)}", body, headers),
               post_json(service, "/search/vector", {"vector": vector, "where": where})]
    for r in replies:
        assert r.status == 422, r.body
        detail = r.json()["detail"]
        assert words in detail and "bad filter" in detail and detail.splitlines()[-1].strip() == "^"
    assert http("GET", f"{service.url}/search/id/0?where={'x' * 5000}").status == 422  # too long to parse


def test_removed_rows_are_gone_from_the_service(built, tmp_path):
    from embedder.search.removal import remove_rows

    tree, _, index_dir = built
    moved = tmp_path / "index"
    shutil.copytree(index_dir, moved)
    app = create_app(moved)
    paths = app.state.index.paths
    gone = [i for i, p in enumerate(paths) if p.startswith("cat/")]
    remove_rows(moved, [paths[i] for i in gone], progress=False)
    with running(create_app(moved)) as (host, port):
        url = f"http://{host}:{port}"
        r = http("GET", f"{url}/search/id/{gone[0]}")
        assert r.status == 410 and f"row {gone[0]} ({paths[gone[0]]}) was removed" in r.json()["detail"]
        live = next(i for i in range(len(paths)) if i not in gone)
        hits = http("GET", f"{url}/search/id/{live}?k=100").json()["hits"]
        assert len(hits) == len(paths) - len(gone) and not {h["id"] for h in hits} & set(gone)
        cats = quoted("label == 'cat'")
        assert http("GET", f"{url}/search/id/{live}?where={cats}").json()["hits"] == []
        # nor from a range or combined search, with or without a filter; as a negative example, 410
        other = next(i for i in range(live + 1, len(paths)) if i not in gone)
        for query in ("min_score=-1&k=1000", f"negative_id={other}&k=1000", f"min_score=-1&k=1000&where={cats}"):
            r = http("GET", f"{url}/search/id/{live}?{query}")
            assert r.status == 200, r.body
            ids = {h["id"] for h in r.json()["hits"]}
            assert len(ids) == (0 if "where" in query else len(paths) - len(gone)) and not ids & set(gone)
        cat = tree / paths[gone[1]]
        body, headers = multipart_files([("file", "a.jpg", cat.read_bytes()), ("file", "b.jpg", cat.read_bytes())])
        r = http("POST", f"{url}/search/image?k=1000&min_score=-1", body, headers)
        assert r.status == 200 and not {h["id"] for h in r.json()["hits"]} & set(gone), r.body
        for where in (f"{url}/search/id/{live}?negative_id={gone[2]}", f"{url}/search/image?negative_id={gone[2]}"):
            r = http("POST", where, body, headers) if "image" in where else http("GET", where)
            assert r.status == 410 and f"row {gone[2]} ({paths[gone[2]]}) was removed" in r.json()["detail"]


def test_openapi_lists_every_endpoint(service):
    r = http("GET", service.url + "/openapi.json")
    assert r.status == 200
    spec = r.json()
    assert {"/health", "/search/image", "/search/id/{row_id}", "/search/vector", "/thumbnail/{row_id}"} <= set(
        spec["paths"]
    )
    assert "multipart/form-data" in spec["paths"]["/search/image"]["post"]["requestBody"]["content"]
    # Swagger UI and ReDoc load their scripts from a CDN: offline they were blank pages, so they are gone.
    assert http("GET", service.url + "/docs").status == 404 and http("GET", service.url + "/redoc").status == 404


def test_openapi_states_the_constraints_the_server_enforces(service):
    spec = http("GET", service.url + "/openapi.json").json()
    schemas, paths = spec["components"]["schemas"], spec["paths"]
    vector = schemas["VectorQuery"]["properties"]["vector"]
    assert vector["minItems"] == vector["maxItems"] == service.index.dim
    assert vector["contains"] == {"not": {"const": 0}}  # cosine: not all zero
    assert schemas["VectorQuery"]["properties"]["k"]["minimum"] == 1
    assert schemas["VectorQuery"]["properties"]["k"]["maximum"] == 1000
    upload = schemas["Body_search_image_search_image_post"]["properties"]["file"]
    assert upload["items"]["minLength"] == 1 and upload["items"]["format"] == "binary"
    assert upload["minItems"] == 1 and upload["maxItems"] == MAX_EXAMPLES
    row = next(p for p in paths["/thumbnail/{row_id}"]["get"]["parameters"] if p["name"] == "row_id")["schema"]
    assert (row["minimum"], row["maximum"]) == (0, service.index.ntotal - 1)
    error = {"$ref": "#/components/schemas/ErrorOut"}
    image = paths["/search/image"]["post"]["responses"]
    assert all(image[code]["content"]["application/json"]["schema"] == error for code in ("400", "413", "503"))
    assert paths["/thumbnail/{row_id}"]["get"]["responses"]["404"]["content"]["application/json"]["schema"] == error
    invalid = paths["/search/vector"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert schemas[invalid["$ref"].split("/")[-1]]["properties"]["detail"]["type"] == "string"
    assert schemas["ErrorOut"]["required"] == ["detail"]
    assert {"get", "head"} <= set(paths["/health"])


# ---------------------------------------------------------------- the web page


def test_page_is_self_contained(service):
    r = http("GET", service.url + "/")
    assert r.status == 200 and r.headers["content-type"].startswith("text/html")
    html = r.body.decode()
    for marker in ('id="results"', 'id="error"', 'type="file"', 'src="/static/search.js"', 'href="/static/search.css"'):
        assert marker in html
    script = http("GET", service.url + "/static/search.js")
    style = http("GET", service.url + "/static/search.css")
    assert script.status == style.status == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")
    assert b"/search/image" in script.body and b"#results" in style.body
    for text in (html, script.body.decode(), style.body.decode()):
        assert "http://" not in text and "https://" not in text  # no CDN, nothing fetched from elsewhere
    # No inline code: the Content-Security-Policy forbids it (the browser test proves the page still works).
    assert "<style" not in html and "<script>" not in html and not re.search(r"\son\w+=", html)


def test_browser_drop_page_shows_neighbours_and_errors(service, tmp_path):
    from playwright import sync_api
    from playwright.sync_api import expect

    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not installed: run `make browser` (apt-get install chromium)"
    rel = "fox/fox_004.jpg"
    text_file = tmp_path / "readme.txt"
    text_file.write_text("not an image\n")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            console = []  # a refused script, style or image shows up here as a CSP violation
            page.on("console", lambda m: console.append(m.text))
            page.goto(service.url + "/")
            # The page's own script ran (under the Content-Security-Policy) once it shows /health.
            expect(page.locator("#about")).to_contain_text(f"{service.index.ntotal} images", timeout=15_000)
            page.set_input_files("input[type=file]", str(service.tree / rel))
            # Locator waits, not wait_for_function: that one evaluates a string, which the CSP forbids.
            hits = page.locator("#results .hit")
            expect(hits).to_have_count(K, timeout=15_000)
            for i in range(K):
                expect(hits.nth(i).locator("img")).to_have_js_property("complete", True, timeout=15_000)
                assert hits.nth(i).locator("img").evaluate("i => i.naturalWidth") > 0  # a thumbnail was drawn
            first = hits.first
            assert first.get_attribute("data-path") == rel
            assert first.locator(".rank").inner_text() == "#1"
            assert first.locator(".label").inner_text() == "fox"
            assert "1.000" in first.locator(".score").inner_text()
            assert page.locator("#error").inner_text() == ""
            # The style sheet applied: the drop zone has its dashed border.
            assert page.locator("#drop").evaluate("e => getComputedStyle(e).borderStyle") == "dashed"

            # The filter box: Enter searches the same image again among the rows it keeps...
            page.fill("#where", "label == 'cat'")
            page.press("#where", "Enter")
            expect(hits.first.locator(".label")).to_have_text("cat", timeout=15_000)
            assert {hits.nth(i).locator(".label").inner_text() for i in range(hits.count())} == {"cat"}
            # ...and a bad filter shows the server's message, caret under the bad token, no results.
            page.fill("#where", "label == cat")
            page.press("#where", "Enter")
            expect(page.locator("#error")).to_contain_text("expected a value", timeout=15_000)
            assert page.locator("#error").inner_text().splitlines()[-1] == " " * 11 + "^"
            assert page.locator("#error").evaluate("e => getComputedStyle(e).whiteSpace") == "pre-wrap"
            assert page.locator("#results .hit").count() == 0
            page.fill("#where", "")
            # A min score turns it into a range search: the image itself (cosine 1) and whatever is as close.
            scores = rocchio_scores(service, [service.index.row_of_path(rel)], [])
            expected = int((scores >= 0.99).sum())
            assert 1 <= expected < K
            page.fill("#range", "0.99")
            page.set_input_files("input[type=file]", str(service.tree / rel))
            expect(hits).to_have_count(expected, timeout=15_000)
            assert first.get_attribute("data-path") == rel
            assert all(float(t.split()[-1]) >= 0.99 for t in page.locator("#results .hit .score").all_inner_texts())
            page.fill("#range", "")
            # Both boxes at once: a range search among the rows the filter keeps. The query's own
            # class is filtered out, so the image itself (cosine 1) and its near copies are not shown.
            labels = np.array([service.index.classes[i] for i in service.index.labels])
            others = np.sort(scores[labels != "fox"])[::-1]
            assert others[1] - others[2] > 1e-3  # the range's bound falls in a clear gap
            bound = float(others[1] + others[2]) / 2
            assert (scores[labels == "fox"] >= bound).any()  # rows in range that only the filter removes
            page.fill("#range", f"{bound:.6f}")
            page.fill("#where", "label != 'fox'")
            page.press("#range", "Enter")
            expect(hits).to_have_count(2, timeout=15_000)
            shown = [hits.nth(i).get_attribute("data-path") for i in range(2)]
            best = np.flatnonzero(labels != "fox")[np.argsort(-scores[labels != "fox"], kind="stable")[:2]]
            assert shown == [service.index.paths[i] for i in best]
            page.fill("#range", "")
            page.fill("#where", "")

            page.set_input_files("input[type=file]", str(text_file))
            expect(page.locator("#error")).to_contain_text("not an image", timeout=15_000)
            assert page.locator("#results .hit").count() == 0
            assert not [m for m in console if "Content Security Policy" in m], console
        finally:
            browser.close()


# ---------------------------------------------------------------- hardening: big images, bounded errors


def test_large_images_are_decoded_small_and_still_find_themselves(service):
    for rel, (w, h) in LARGE.items():
        row, data = indexed_file(service, rel)
        r = upload(service, Path(rel).name, data)
        assert r.status == 200, r.body
        result = r.json()
        assert (result["query"]["width"], result["query"]["height"]) == (w, h)  # the upload's own size
        assert (result["hits"][0]["id"], result["hits"][0]["path"]) == (row, rel)
        assert result["hits"][0]["score"] > 0.99  # decoded at 1/8 (JPEG) and 1/12 (PNG), indexed at full size
        with Image.open(io.BytesIO(http("GET", f"{service.url}/thumbnail/{row}").body)) as thumb:
            assert thumb.size == (160, 120)


@pytest.mark.parametrize("side", [9000, 20_000])  # under PIL's own limit; far over it
def test_an_upload_declaring_too_many_pixels_is_refused_before_decoding(service, side):
    from embedder.serve.app import DEFAULT_MAX_UPLOAD_PIXELS
    from tests.corpus import bomb_png

    data = bomb_png(side, side)  # a header that declares the size, a few hundred bytes
    r = health_while(service, lambda: upload(service, "huge.png", data))
    assert r.status == 400
    detail = r.json()["detail"]
    assert f"{side * side} pixels" in detail
    assert f"exceeds the limit of {DEFAULT_MAX_UPLOAD_PIXELS}" in detail and "--max-upload-pixels" in detail
    assert str(Image.MAX_IMAGE_PIXELS) not in detail  # the configured limit, not PIL's


def test_a_real_9000_square_png_is_refused_and_health_keeps_answering(service):
    data = _png(Image.new("L", (9000, 9000), 7))  # ~100 kB that decode to 81 million pixels
    assert len(data) < MAX_UPLOAD
    r = health_while(service, lambda: upload(service, "big.png", data))
    assert r.status == 400 and "decompression bomb: 9000x9000" in r.json()["detail"]


def test_validation_errors_are_bounded_and_lengths_come_first(service):
    dim = service.index.dim
    r = post_json(service, "/search/vector", {"vector": ["a"] * dim})
    assert r.status == 422 and len(r.body) < 4096
    body = r.json()
    assert body["error_count"] == dim and len(body["errors"]) == 5
    assert f"and {dim - 5} more errors" in body["detail"]
    # A wrong length is one error, whatever the elements are: they are never looked at.
    r = post_json(service, "/search/vector", {"vector": ["a"] * 5000})
    assert r.status == 422 and r.json()["error_count"] == 1 and "vector has 5000 values" in r.json()["detail"]


def test_the_amplification_payload_is_refused_at_once_and_health_keeps_answering(service):
    payload = json.dumps({"vector": ["a"] * 1_000_000}).encode()  # 5 MB that once came back as a 143 MB 422
    r = health_while(service, lambda: post_json_bytes(service, payload))
    assert r.status == 413 and len(r.body) < 4096
    assert "request body too large" in r.json()["detail"] and "one 512-d vector" in r.json()["detail"]
    chunk = payload[:65536]
    head = (b"POST /search/vector HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    answer = raw_exchange(service, head, [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 40)  # no length: counted
    assert answer.startswith(b"HTTP/1.1 413") and b"request body too large" in answer


def test_every_bad_request_gets_a_short_json_reason(service):
    dim = service.index.dim
    long_name = "n" * 5000 + ".txt"
    deep = b'{"vector": ' + b"[" * 40000 + b"]" * 40000 + b"}"  # Python's JSON parser recurses once a level
    cases = {
        "k out of range": lambda: http("GET", f"{service.url}/search/id/0?k=0"),
        "k not a number": lambda: http("GET", f"{service.url}/search/id/0?k=" + "x" * 3000),
        "id of 4000 digits": lambda: http("GET", f"{service.url}/search/id/" + "9" * 4000),
        "id not a number": lambda: http("GET", f"{service.url}/thumbnail/abc"),
        "broken JSON": lambda: post_json_bytes(service, b'{"vector": [1, 2'),
        "JSON nested 40,000 deep": lambda: post_json_bytes(service, deep),
        "NaN in the vector": lambda: post_json_bytes(service, b'{"vector": [NaN' + b", 1" * (dim - 1) + b"]}"),
        "1e39 overflows float32": lambda: post_json(service, "/search/vector", {"vector": [1e39] * dim}),
        "unknown field": lambda: post_json(service, "/search/vector", {"vector": [1.0] * dim, "K": 3}),
        "all-zero vector": lambda: post_json(service, "/search/vector", {"vector": [0] * dim}),
        "not an object": lambda: post_json(service, "/search/vector", [1, 2]),
        "no file part": lambda: http("POST", f"{service.url}/search/image", *multipart_field("other", b"x")),
        "a long file name": lambda: upload(service, long_name, b"not an image"),
        "empty upload": lambda: upload(service, "empty.png", b""),
        "wrong method": lambda: http("DELETE", f"{service.url}/health"),
        "unknown route": lambda: http("GET", f"{service.url}/etc/passwd"),
    }
    for what, send in cases.items():
        r = send()
        assert 400 <= r.status < 500, (what, r.status, r.body[:300])
        assert len(r.body) < 4096, (what, len(r.body))
        assert r.headers["content-type"] == "application/json", what
        assert isinstance(r.json()["detail"], str) and "\n" not in r.json()["detail"], what
    assert long_name not in upload(service, long_name, b"not an image").json()["detail"]  # echoed clipped


# ---------------------------------------------------------------- several examples, range search


def multipart_files(parts: list[tuple[str, str, bytes]]) -> tuple[bytes, dict]:
    """A multipart body of (field, filename, data) parts: `file` for positives, `negative` for negatives."""
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for field, name, data in parts)
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def rocchio_scores(service: Service, pos: list[int], neg: list[int]) -> np.ndarray:
    """Cosine of every cached row with alpha mean(unit positives) - beta mean(unit negatives), by numpy."""
    with FeatureCache(service.cache) as cache:
        F = cache.features().astype(np.float64)
    F /= np.linalg.norm(F, axis=1, keepdims=True)
    q = F[pos].mean(0) - (0.75 * F[neg].mean(0) if neg else 0)  # SearchConfig's alpha 1, beta 0.75
    return F @ (q / np.linalg.norm(q))


def assert_best(hits: list[dict], scores: np.ndarray, k: int) -> None:
    best = np.sort(scores)[::-1][:k]  # scores, not ids: random-init features leave near ties
    np.testing.assert_allclose([h["score"] for h in hits], best, atol=1e-4)
    np.testing.assert_allclose([h["score"] for h in hits], scores[[h["id"] for h in hits]], atol=1e-4)


def test_several_uploads_and_negatives_make_one_rocchio_query(service):
    rels = ["cat/cat_000.jpg", "dog/dog_001.png", "fox/fox_002.jpg"]
    (a, da), (b, db), (c, dc) = (indexed_file(service, rel) for rel in rels)
    body, headers = multipart_files([("file", "a.jpg", da), ("file", "b.png", db), ("negative", "c.jpg", dc)])
    r = http("POST", f"{service.url}/search/image?k=6", body, headers)
    assert r.status == 200, r.body
    result = r.json()
    assert [q["filename"] for q in result["query"]["positives"]] == ["a.jpg", "b.png"]
    assert [q["filename"] for q in result["query"]["negatives"]] == ["c.jpg"]
    assert_best(result["hits"], rocchio_scores(service, [a, b], [c]), 6)
    # the negative as an indexed row instead of an upload: the same query
    body, headers = multipart_files([("file", "a.jpg", da), ("file", "b.png", db)])
    r = http("POST", f"{service.url}/search/image?k=6&negative_id={c}", body, headers)
    assert r.status == 200, r.body
    assert_best(r.json()["hits"], rocchio_scores(service, [a, b], [c]), 6)
    assert r.json()["query"]["negative_ids"] == [c]


def test_min_score_returns_every_row_in_range_at_most_k(service):
    row, data = indexed_file(service, "dog/dog_002.jpg")
    scores = rocchio_scores(service, [row], [])
    T = float(np.sort(scores)[-7]) - 1e-4  # seven rows, with room for float32
    body, headers = multipart("q.jpg", data)
    r = http("POST", f"{service.url}/search/image?k=1000&min_score={T}", body, headers)
    assert r.status == 200, r.body
    assert r.json()["query"]["min_score"] == T
    assert_best(r.json()["hits"], scores, 7)
    r = http("POST", f"{service.url}/search/image?k=3&min_score={T}", body, headers)
    assert_best(r.json()["hits"], scores, 3)  # k caps a range
    r = http("GET", f"{service.url}/search/id/{row}?k=1000&min_score={T}")
    assert r.status == 200, r.body
    assert_best(r.json()["hits"], scores, 7)
    with FeatureCache(service.cache) as cache:
        vector = cache.features(slice(row, row + 1))[0]
    r = post_json(service, "/search/vector", {"vector": vector.tolist(), "k": 1000, "min_score": T})
    assert r.status == 200, r.body
    assert_best(r.json()["hits"], scores, 7)
    r = http("GET", f"{service.url}/search/id/{row}?k=5&negative_id=0&negative_id=1")
    assert r.status == 200, r.body
    assert_best(r.json()["hits"], rocchio_scores(service, [row], [0, 1]), 5)


def test_combined_and_range_searches_take_the_filter(service):
    """Every endpoint's combined (Rocchio) and range search answers among the rows `where` keeps:
    numpy's answer over those rows, flat exact."""
    labels = np.array([p.split("/")[0] for p in service.index.paths])
    where, dogs = quoted("label == 'dog'"), labels == "dog"
    (a, da), (b, db), (c, dc) = (indexed_file(service, rel) for rel in ["cat/cat_000.jpg", "fox/fox_001.png",
                                                                         "dog/dog_002.jpg"])
    body, headers = multipart_files([("file", "a.jpg", da), ("file", "b.png", db), ("negative", "c.jpg", dc)])
    r = http("POST", f"{service.url}/search/image?k=4&where={where}", body, headers)
    assert r.status == 200, r.body
    assert r.json()["query"]["where"] == "label == 'dog'"
    assert_best(r.json()["hits"], np.where(dogs, rocchio_scores(service, [a, b], [c]), -np.inf), 4)
    r = http("GET", f"{service.url}/search/id/{a}?k=4&negative_id={c}&where={where}")
    assert r.status == 200, r.body
    assert_best(r.json()["hits"], np.where(dogs, rocchio_scores(service, [a], [c]), -np.inf), 4)
    scores = rocchio_scores(service, [a], [])
    T = float(np.sort(scores[dogs])[-3]) - 1e-4  # three dogs in range, and cats above them
    assert (scores[~dogs] >= T).sum() >= 1
    in_range = np.where(dogs, scores, -np.inf)
    r = http("GET", f"{service.url}/search/id/{a}?k=1000&min_score={T}&where={where}")
    assert r.status == 200 and r.json()["query"]["min_score"] == T, r.body
    assert_best(r.json()["hits"], in_range, 3)
    body, headers = multipart("q.jpg", da)
    r = http("POST", f"{service.url}/search/image?k=1000&min_score={T}&where={where}", body, headers)
    assert r.status == 200, r.body
    assert_best(r.json()["hits"], in_range, 3)
    with FeatureCache(service.cache) as cache:
        vector = cache.features(slice(a, a + 1))[0].tolist()
    r = post_json(service, "/search/vector", {"vector": vector, "k": 1000, "min_score": T, "where": "label == 'dog'"})
    assert r.status == 200, r.body
    assert_best(r.json()["hits"], in_range, 3)
    assert r.json()["query"] == {"vector_dim": service.index.dim, "where": "label == 'dog'", "min_score": T}
    bad = http("GET", f"{service.url}/search/id/{a}?negative_id={c}&where={quoted('label = dog')}")
    assert bad.status == 422 and "bad filter" in bad.json()["detail"]


def test_bad_example_and_range_values_are_422_with_a_reason(service):
    _, data = indexed_file(service, "cat/cat_000.jpg")
    body, headers = multipart("q.jpg", data)
    many, many_headers = multipart_files([("file", f"{i}.jpg", data) for i in range(MAX_EXAMPLES + 1)])
    cases = {
        "max_distance on a cosine index": lambda: http("GET", f"{service.url}/search/id/0?max_distance=1"),
        "max_distance in a vector body": lambda: post_json(service, "/search/vector",
                                                           {"vector": [1.0] * service.index.dim, "max_distance": 1}),
        "min_score nan": lambda: http("GET", f"{service.url}/search/id/0?min_score=nan"),
        "min_score inf": lambda: http("POST", f"{service.url}/search/image?min_score=inf", body, headers),
        "min_score not a number": lambda: http("GET", f"{service.url}/search/id/0?min_score=high"),
        "negative_id out of range": lambda: http("GET", f"{service.url}/search/id/0?negative_id=99999"),
        "negative_id negative": lambda: http("POST", f"{service.url}/search/image?negative_id=-1", body, headers),
        "too many images": lambda: http("POST", f"{service.url}/search/image", many, many_headers),
        "min_score in a vector body": lambda: post_json(service, "/search/vector",
                                                        {"vector": [1.0] * service.index.dim, "min_score": "x"}),
    }
    for what, send in cases.items():
        r = send()
        assert r.status == 422, (what, r.status, r.body[:300])
        assert isinstance(r.json()["detail"], str) and "\n" not in r.json()["detail"], what
    detail = http("GET", f"{service.url}/search/id/0?max_distance=1").json()["detail"]
    assert "min_score" in detail
    # an unreadable negative is the same 400 as an unreadable query
    bad, bad_headers = multipart_files([("file", "a.jpg", data), ("negative", "n.jpg", b"not an image")])
    r = http("POST", f"{service.url}/search/image", bad, bad_headers)
    assert r.status == 400 and "n.jpg" in r.json()["detail"]


# ---------------------------------------------------------------- headers, Host, methods


def test_head_is_answered_wherever_get_is(service):
    for path in ("/health", "/thumbnail/0", "/search/id/0", "/"):
        r = http("HEAD", service.url + path)
        assert r.status == 200 and r.body == b"", path
    r = http("DELETE", service.url + "/health")
    assert r.status == 405 and r.headers["allow"] == "GET, HEAD"


def test_security_headers_are_on_every_answer(service):
    answers = [http("GET", service.url + p) for p in ("/", "/health", "/static/search.js", "/thumbnail/0", "/nope")]
    answers += [http("GET", service.url + "/health", headers={"Host": "evil.example"}),
                post_json(service, "/search/vector", {"vector": [1]}), upload(service, "x.txt", b"x")]
    for r in answers:
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST.", "[::1]"])
def test_loopback_names_are_answered_with_or_without_a_port(service, host):
    for value in (host, f"{host}:{service.port}"):
        assert http("GET", service.url + "/health", headers={"Host": value}).status == 200, value


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil", ""])
def test_a_foreign_host_header_is_400_with_the_flag_to_allow_it(service, host):
    r = http("GET", service.url + "/health", headers={"Host": host})
    assert r.status == 400 and len(r.body) < 4096
    detail = r.json()["detail"]
    assert "is not served here" in detail and "--allowed-host" in detail and "localhost" in detail


def test_a_request_without_host_is_400(service):
    answer = raw_exchange(service, b"GET /health HTTP/1.0\r\n\r\n", [])
    assert answer.startswith(b"HTTP/1.1 400") and b"no Host header" in answer


def test_allowed_hosts_replace_the_defaults_and_star_allows_any(built):
    _, _, index_dir = built
    with running(create_app(index_dir, allowed_hosts=("search.example",))) as (host, port):
        url = f"http://{host}:{port}/health"
        assert http("GET", url, headers={"Host": "search.example:8000"}).status == 200
        assert http("GET", url, headers={"Host": "localhost"}).status == 400
    with running(create_app(index_dir, allowed_hosts=("*",))) as (host, port):
        assert http("GET", f"http://{host}:{port}/health", headers={"Host": "any.example"}).status == 200


def test_serve_flags_give_the_allowed_hosts():
    from embedder.serve.app import allowed_hosts_for

    args = serve_parser().parse_args(["idx", "--allowed-host", "a.example", "--allowed-host", "b.example"])
    assert args.allowed_host == ["a.example", "b.example"]
    assert allowed_hosts_for("127.0.0.1", args.allowed_host) == ("localhost", "127.0.0.1", "::1", "a.example",
                                                                  "b.example")
    assert allowed_hosts_for("0.0.0.0") == allowed_hosts_for("::") == ("localhost", "127.0.0.1", "::1")
    assert allowed_hosts_for("192.168.1.5") == ("localhost", "127.0.0.1", "::1", "192.168.1.5")
    assert serve_parser().parse_args(["idx"]).max_upload_pixels is None  # the service's default applies


def test_the_service_runs_one_way():
    """`embedder serve` builds the app with create_app and runs it with run(); a second entry point
    (serve.app.serve) was never called and had drifted from create_app's options (no runtime)."""
    import inspect

    from embedder.cli import commands
    from embedder.serve import app

    assert not hasattr(app, "serve")
    source = inspect.getsource(commands.serve)
    assert "create_app(" in source and "run(app" in source


# ---------------------------------------------------------------- non-UTF-8 file names


LATIN1 = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name as a listing gives it: 'caf\udce9.png'


@pytest.fixture(scope="module")
def latin1_service(built, tmp_path_factory):
    """The index with one file renamed to a Latin-1 name, and its rows.h5 holding that name's bytes.

    Built around rows.h5 because embedding such a file needs the cache writer to store raw
    names (embedder.names), which another change brings; the index side is what is tested here.
    """
    import h5py

    from embedder.names import encode_path

    tree, cache, index_dir = built
    root = tmp_path_factory.mktemp("latin1")
    shutil.copytree(tree, root / "images")
    shutil.copytree(index_dir, root / "index")
    rel = "cat/cat_003.png"
    os.replace(root / "images" / rel, root / "images" / "cat" / LATIN1)
    meta = json.loads((root / "index" / "meta.json").read_text())
    meta["source"] = str(root / "images")
    (root / "index" / "meta.json").write_text(json.dumps(meta))
    with h5py.File(root / "index" / "rows.h5", "r+") as f:
        row = [p.decode() for p in f["paths"][:]].index(rel)
        f["paths"][row] = encode_path(f"cat/{LATIN1}")
        f["classes"][0] = encode_path(os.fsdecode(b"ch\xe4t"))  # a class folder with a Latin-1 name, too
    app = create_app(root / "index", max_upload_bytes=MAX_UPLOAD, default_k=K)
    with running(app) as (host, port):
        yield Service(f"http://{host}:{port}", host, port, root / "images", cache, app.state.index), row


def test_non_utf8_names_are_shown_escaped_in_json(latin1_service):
    service, row = latin1_service
    shown = "cat/caf\\xe9.png"  # embedder.names.display_path
    r = http("GET", f"{service.url}/search/id/{row}?k=3")
    assert r.status == 200, r.body
    first = r.json()["hits"][0]
    assert (first["id"], first["path"], first["label"]) == (row, shown, "ch\\xe4t")
    assert http("GET", f"{service.url}/thumbnail/{row}").status == 200  # the str still opens the file
    r = upload(service, "q.png", (service.tree / "cat" / LATIN1).read_bytes())
    assert r.status == 200 and r.json()["hits"][0]["path"] == shown
    os.replace(service.tree / "cat" / LATIN1, service.tree / "cat" / "gone.bak")
    try:
        r = http("GET", f"{service.url}/thumbnail/{row}")
    finally:
        os.replace(service.tree / "cat" / "gone.bak", service.tree / "cat" / LATIN1)
    assert r.status == 404 and shown in r.json()["detail"]


# ---------------------------------------------------------------- fuzzing and load


def test_schemathesis_passes_every_check_on_every_route(service):
    from benchmarks.service import fuzz

    result = fuzz(service.url, max_examples=5)
    assert result["failures"] == [] and result["errors"] == []
    assert result["requests"] > 100 and not [s for s in result["statuses"] if s is None or s >= 500]
    assert {"not_a_server_error", "positive_data_acceptance", "negative_data_rejection",
            "response_schema_conformance", "status_code_conformance", "unsupported_method"} <= set(result["checks"])
    operations = {f"{m.upper()} {p}" for p, ops in http("GET", service.url + "/openapi.json").json()["paths"].items()
                  for m in ops}
    assert set(result["positive_200"]) == operations  # schema-valid cases reached 200 on every route


def test_a_short_load_gets_no_5xx_and_every_query_finds_itself(service):
    from benchmarks.service import load

    with FeatureCache(service.cache) as cache:
        vectors = [(i, cache.features(slice(i, i + 1))[0].tolist()) for i in range(4)]
        images = [(p, (service.tree / p).read_bytes()) for p in cache.paths[:4]]
    stats = load(service.port, clients=4, seconds=2, vectors=vectors, images=images)
    assert stats["5xx"] == 0 and stats["non_200"] == 0
    for kind in ("vector", "image"):
        assert stats[kind]["n"] > 0 and stats[kind]["itself_first"] == stats[kind]["n"], kind


# ---------------------------------------------------------------- helpers for the above


def health_while(service: Service, request) -> Reply:
    """Run `request()` in a thread while /health is asked every 20 ms; every /health must answer 200
    (benchmarks.service.during checks each). How fast it answers is the benchmark's to measure: a
    busy machine may stall any answer, so a test asserts none."""
    from benchmarks.service import during

    return during(service.port, request)[0]


def post_json_bytes(service: Service, body: bytes) -> Reply:
    # http.client keeps the connection open (urllib asks for close): a refusal sent while the
    # body is still on its way then arrives intact instead of as a connection reset.
    conn = httpclient.HTTPConnection(service.host, service.port, timeout=30)
    try:
        conn.request("POST", "/search/vector", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return Reply(r.status, dict(r.headers), r.read())
    finally:
        conn.close()


def multipart_field(name: str, data: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + data
    return body + f"\r\n--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}
