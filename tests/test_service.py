"""The search service over real HTTP: a real index, a real uvicorn server, a real browser.

One index (3 classes x 6 random images plus one EXIF-rotated photo, random-init resnet18
at 32 px, exact search) and one server for the whole module; every request goes through
a socket, so the upload limit, the threadpool and the error handlers are the ones that
run in production.
"""

from __future__ import annotations

import http.client as httpclient
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedder.cache import FeatureCache
from embedder.extract import embed
from tests.conftest import fast_config, make_tree

import uvicorn  # noqa: E402 - dependencies of the package: a missing one must fail, not skip

from embedder.index import build_index
from embedder.service import create_app

K = 5
MAX_UPLOAD = 200_000
EXIF_IMAGE = "cat/cat_exif.jpg"  # stored 320x160, displayed 160x320 (EXIF orientation 6)
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


@contextmanager
def running(app):
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread; yield (host, port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # a free port, held from now on: no race with other processes
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    tree = make_tree(root / "images")
    rgb = Image.fromarray(np.random.default_rng(7).integers(0, 256, (160, 320, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    rgb.save(tree / EXIF_IMAGE, exif=exif.tobytes(), quality=90)
    cache, index_dir = root / "feats.h5", root / "index"
    embed(fast_config(tree, cache))
    build_index(cache, index_dir, kind="flat", progress=False)
    return tree, cache, index_dir


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


# ---------------------------------------------------------------- API


def test_health_describes_the_index(service):
    r = http("GET", service.url + "/health")
    assert r.status == 200
    h = r.json()
    assert h["status"] == "ok"
    assert h["ntotal"] == 3 * 6 + 1
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
    assert "file not found" in r.json()["detail"] and rel in r.json()["detail"]
    assert http("GET", f"{service.url}/thumbnail/{row}").status == 200  # back once restored


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
    assert "declares" in detail and str(MAX_UPLOAD) in detail and "--max-upload-bytes" in detail


def test_upload_limit_is_exact_for_the_file_itself(service):
    # The body may exceed the limit by the multipart framing; the file may not exceed it at all.
    at_limit = upload(service, "junk.bin", b"\x01" * MAX_UPLOAD)
    assert at_limit.status == 400 and "not an image" in at_limit.json()["detail"]  # accepted, then decoded
    over = upload(service, "junk.bin", b"\x01" * (MAX_UPLOAD + 1))
    assert over.status == 413 and "the file is larger than" in over.json()["detail"]


def test_declared_oversize_is_refused_before_the_body_is_read(service):
    # Content-Length says 1 GB and no body follows: only an up-front check can answer.
    head = (
        b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    answer = raw_exchange(service, head, [])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_undeclared_oversize_is_cut_off_while_reading(service):
    # Chunked, no Content-Length, and the body never ends: only counting can stop it.
    head = (
        b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
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


def test_openapi_lists_every_endpoint(service):
    r = http("GET", service.url + "/openapi.json")
    assert r.status == 200
    spec = r.json()
    assert {"/health", "/search/image", "/search/id/{row_id}", "/search/vector", "/thumbnail/{row_id}"} <= set(
        spec["paths"]
    )
    assert "multipart/form-data" in spec["paths"]["/search/image"]["post"]["requestBody"]["content"]
    assert http("GET", service.url + "/docs").status == 200


# ---------------------------------------------------------------- the web page


def test_page_is_self_contained(service):
    r = http("GET", service.url + "/")
    assert r.status == 200 and r.headers["content-type"].startswith("text/html")
    html = r.body.decode()
    for marker in ('id="results"', 'id="error"', 'type="file"', "/search/image"):
        assert marker in html
    assert "http://" not in html and "https://" not in html  # no CDN, nothing fetched from elsewhere


def test_browser_drop_page_shows_neighbours_and_errors(service, tmp_path):
    from playwright import sync_api

    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not installed: run `make browser` (apt-get install chromium)"
    rel = "fox/fox_004.jpg"
    text_file = tmp_path / "readme.txt"
    text_file.write_text("not an image\n")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(service.url + "/")
            page.set_input_files("input[type=file]", str(service.tree / rel))
            page.wait_for_function(f"document.querySelectorAll('#results .hit').length === {K}", timeout=15_000)
            page.wait_for_function(
                "[...document.querySelectorAll('#results .hit img')].every(i => i.complete && i.naturalWidth > 0)",
                timeout=15_000,
            )
            first = page.locator("#results .hit").first
            assert first.get_attribute("data-path") == rel
            assert first.locator(".rank").inner_text() == "#1"
            assert first.locator(".label").inner_text() == "fox"
            assert "1.000" in first.locator(".score").inner_text()
            assert page.locator("#error").inner_text() == ""

            page.set_input_files("input[type=file]", str(text_file))
            page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=15_000)
            assert "not an image" in page.locator("#error").inner_text()
            assert page.locator("#results .hit").count() == 0
        finally:
            browser.close()
