"""The search service under attack and load: `embedder serve` in its own process, on loopback.

    python -m benchmarks service [--quick]

The index: photo-like JPEGs (benchmarks.extraction.make_jpegs) embedded with resnet18
(random init: weights do not change the cost) at 224 px (quick: 64 px), exact search.
Each part gets a fresh server, so each peak RSS (the kernel's VmHWM of the server
process) belongs to that part alone.

1. fuzz: schemathesis over every route with every check it has, run in-process by its
   engine; uploads are real images (benchmarks/schemathesis_hooks.py). Reported: requests
   sent, their status codes, failed checks, and how many schema-valid (positive) cases
   reached 200 on each route.
2. abuse: each abusive request alone, while /health is asked every 20 ms on a keep-alive
   connection. Reported: the answer (status, bytes, seconds), the slowest /health during
   it and the server's peak RSS after it. Goals: a 4xx with a JSON reason under 4 KB (the
   two decoded images, legitimate but as large as the defaults allow, get a 200); /health
   within 100 ms.
3. load: N clients on keep-alive connections for T seconds, half sending feature vectors
   (rows of the cache), half uploading indexed images. Reported: p50/p99 per kind,
   requests/s, non-200 and 5xx counts, whether each query found its own row first, and
   the server's peak RSS.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

HEALTH_EVERY_S = 0.02
MAX_ERROR_BYTES = 4096


# ---------------------------------------------------------------- the server


@contextmanager
def serving(index_dir: Path, *flags: str):
    """`embedder serve INDEX_DIR` in its own process on a free loopback port; yields (port, pid)."""
    port = free_port()
    cmd = [sys.executable, "-m", "embedder", "serve", str(index_dir), "--port", str(port), *flags]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if exchange(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"`{' '.join(cmd)}` did not start") from None
                time.sleep(0.1)
        yield port, server.pid
    finally:
        server.terminate()
        server.wait(30)


def peak_rss_mib(pid: int) -> float:
    """The high-water mark of a process's resident memory (Linux /proc), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exchange(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
             conn: http.client.HTTPConnection | None = None, timeout: float = 120) -> tuple[int, bytes, float]:
    """One request to 127.0.0.1:port (on `conn` if given, kept open): (status, body, seconds)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        t = time.perf_counter()
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, data, time.perf_counter() - t
    finally:
        if own:
            conn.close()


def multipart(filename: str, data: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n\r\n'.encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"}


# ---------------------------------------------------------------- 1. fuzz


def fuzz(url: str, max_examples: int, seed: int = 0) -> dict:
    """Schemathesis (all phases, all checks) against a live server: counts of what it sent and found."""
    import schemathesis
    from schemathesis import engine
    from schemathesis.engine import Status, events

    import benchmarks.schemathesis_hooks  # noqa: F401 - registers images for `format: binary`

    # Every check (the CLI's --checks all); no crash cache, so a run replays nothing of an earlier one.
    config = schemathesis.Config.from_dict({"seed": seed, "generation": {"max-examples": max_examples},
                                            "checks": {"enabled": True}, "cache": {"enabled": False}})
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
    statuses, positive_ok, checks, failures, errors = Counter(), Counter(), set(), [], []
    for event in engine.from_schema(schema).execute():
        if isinstance(event, (events.NonFatalError, events.FatalError)):
            errors.append(str(getattr(event, "info", event))[:500])
        if not isinstance(event, events.ScenarioFinished):
            continue
        recorder = event.recorder
        for case_id, interaction in recorder.interactions.items():
            status = interaction.response.status_code if interaction.response else None
            statuses[status] += 1
            case = recorder.cases[case_id].value
            if status == 200 and case.meta is not None and case.meta.generation.mode.is_positive:
                positive_ok[case.operation.label] += 1
        for check in (c for cs in recorder.checks.values() for c in cs):
            checks.add(check.name)
            if check.status == Status.FAILURE:
                failures.append(f"{event.label}: {check.name}: {check.failure_info}"[:500])
    return {"requests": sum(statuses.values()), "statuses": dict(statuses), "positive_200": dict(positive_ok),
            "checks": sorted(checks), "failures": failures, "errors": errors}


# ---------------------------------------------------------------- 2. abuse


def during(port: int, attack) -> tuple[object, float, int]:
    """Run `attack()` in a thread while /health is asked every 20 ms: (its result, slowest /health ms, asks)."""
    result: list = []

    def target() -> None:
        try:
            result.append(attack())
        except BaseException as exc:  # noqa: BLE001 - raised again below, in the caller's thread
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    exchange(port, "GET", "/health", conn=conn)  # connected before the attack starts
    thread.start()
    slowest, asks = 0.0, 0
    while thread.is_alive() or asks == 0:
        status, _, seconds = exchange(port, "GET", "/health", conn=conn)
        assert status == 200, status
        slowest, asks = max(slowest, seconds), asks + 1
        time.sleep(HEALTH_EVERY_S)
    thread.join()
    conn.close()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0], 1000 * slowest, asks


def raw(port: int, head: bytes, parts=(), pause: float = 0.0) -> tuple[int, bytes, float]:
    """Send bytes on a bare socket (chunked, slow, malformed requests) and read the answer."""
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(head)
        try:
            for part in parts:
                s.sendall(part)
                time.sleep(pause)
        except OSError:
            pass  # the server answered and closed while we were still sending: read what it said
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                break
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return status, answer.split(b"\r\n\r\n", 1)[-1], time.perf_counter() - t


def _png(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=options.pop("format", "PNG"), **options)
    return buf.getvalue()


def abuses(dim: int) -> list[tuple[str, object]]:
    """(what, request) for each abusive request; a request is a function of the port."""
    strings = json.dumps({"vector": ["a"] * 1_000_000}).encode()
    deep = b'{"vector": ' + b"[" * 40_000 + b"]" * 40_000 + b"}"
    json_head = {"Content-Type": "application/json"}
    at_limit = _png(Image.new("RGBA", (7071, 7071), (200, 120, 40, 128)))  # 49,999,041 pixels: decoded
    progressive = _png(Image.new("RGB", (7000, 7000), (30, 90, 160)), format="JPEG", progressive=True)
    big = _png(Image.new("L", (9000, 9000), 7))
    fields = b"".join(b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(3000))

    def post(path, body, headers):
        return lambda port: exchange(port, "POST", path, body, headers)

    def upload(name, data):
        return post("/search/image", *multipart(name, data))

    def chunked(path, content_type, body, pause=0.0, chunk=65536):
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n").encode()
        parts = [b"%x\r\n%s\r\n" % (len(p), p) for p in (body[i:i + chunk] for i in range(0, len(body), chunk))]
        return lambda port: raw(port, head, [*parts, b"0\r\n\r\n"], pause)

    def file_part(size):  # a well-formed upload of `size` bytes that are not an image
        head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n'
        return head + b"\x01" * size + b"\r\n--b--\r\n"

    form = "multipart/form-data; boundary=b"
    return [
        (f"1,000,000 strings as the vector ({len(strings) / 1e6:.0f} MB JSON)",
         post("/search/vector", strings, json_head)),
        ("the same, chunked (no Content-Length)", chunked("/search/vector", "application/json", strings)),
        (f"{dim} strings as the vector (one error each)",
         post("/search/vector", json.dumps({"vector": ["a"] * dim}).encode(), json_head)),
        ("JSON nested 40,000 deep", post("/search/vector", deep, json_head)),
        (f"PNG declaring 9000x9000 ({len(big) // 1000} KB)", upload("big.png", big)),
        (f"PNG at the pixel limit, 7071x7071 RGBA ({len(at_limit) // 1000} KB), decoded",
         upload("limit.png", at_limit)),
        (f"progressive JPEG 7000x7000 ({len(progressive) // 1000} KB), decoded", upload("prog.jpg", progressive)),
        ("upload declaring 1 GB", lambda port: raw(port, b"POST /search/image HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                  b"Content-Type: multipart/form-data; boundary=b\r\n"
                                                  b"Content-Length: 1000000000\r\n\r\n")),
        ("chunked upload of 20 MB (no Content-Length)", chunked("/search/image", form, file_part(20 * 2**20))),
        ("slow upload: 1 KB every 50 ms for 3 s", chunked("/search/image", form, file_part(59 * 1024), 0.05, 1024)),
        ("3,000 multipart fields", post("/search/image", fields + b"--b--\r\n",
                                        {"Content-Type": "multipart/form-data; boundary=b"})),
        ("Host: evil.example (DNS rebinding)", lambda port: exchange(port, "GET", "/health", headers={
            "Host": "evil.example"})),
        ("row id of 4,000 digits", lambda port: exchange(port, "GET", "/search/id/" + "9" * 4000)),
    ]


def attack(port: int, pid: int, dim: int) -> list[dict]:
    """Each abusive request in turn, with /health timed alongside and the server's peak RSS after it."""
    rows = []
    for what, request in abuses(dim):
        (status, body, seconds), slowest, asks = during(port, lambda request=request: request(port))
        rows.append({"what": what, "status": status, "bytes": len(body), "seconds": seconds,
                     "json_detail": _is_json_detail(body), "health_ms": slowest, "health_asks": asks,
                     "peak_mib": peak_rss_mib(pid)})
    return rows


def _is_json_detail(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body).get("detail"), str)
    except (ValueError, AttributeError):
        return False


# ---------------------------------------------------------------- 3. load


def load(port: int, clients: int, seconds: float, vectors: list[tuple[int, list[float]]],
         images: list[tuple[str, bytes]]) -> dict:
    """`clients` threads for `seconds`: even ones send vectors, odd ones upload images, each on its connection.

    `vectors` are (row, vector); `images` are (stored path, file bytes); every answer is
    checked for the query's own row first.
    """
    deadline = time.monotonic() + seconds
    records: list[tuple[str, int, float, bool]] = []  # (kind, status, seconds, found itself first)
    lock = threading.Lock()

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        n = 0
        while n == 0 or time.monotonic() < deadline:  # one query at least, however late the thread starts
            if i % 2 == 0:
                row, vector = vectors[(i + n) % len(vectors)]
                body, headers, kind = json.dumps({"vector": vector, "k": 10}).encode(), {
                    "Content-Type": "application/json"}, "vector"
                status, data, t = exchange(port, "POST", "/search/vector", body, headers, conn=conn)
                itself = status == 200 and json.loads(data)["hits"][0]["id"] == row
            else:
                path, file = images[(i + n) % len(images)]
                body, headers = multipart(Path(path).name, file)
                status, data, t = exchange(port, "POST", "/search/image", body, headers, conn=conn)
                kind, itself = "image", status == 200 and json.loads(data)["hits"][0]["path"] == path
            with lock:
                records.append((kind, status, t, itself))
            n += 1
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(records, time.perf_counter() - t0)


def _summary(records: list[tuple[str, int, float, bool]], wall: float) -> dict:
    out = {"requests": len(records), "wall_s": wall, "per_s": len(records) / wall,
           "non_200": sum(s != 200 for _, s, _, _ in records), "5xx": sum(s >= 500 for _, s, _, _ in records)}
    for kind in ("vector", "image"):
        lat = [1000 * t for k, _, t, _ in records if k == kind]
        hits = [ok for k, _, _, ok in records if k == kind]
        out[kind] = {"n": len(lat), "p50_ms": float(np.percentile(lat, 50)) if lat else None,
                     "p99_ms": float(np.percentile(lat, 99)) if lat else None, "itself_first": sum(hits)}
    return out


# ---------------------------------------------------------------- the run


def build(work: Path, quick: bool) -> tuple[Path, list, list]:
    """An index of photo-like JPEGs; (index dir, vector queries, image queries)."""
    from benchmarks.extraction import make_jpegs
    from embedder.cache.reader import FeatureCache
    from embedder.extract.config import EmbedConfig
    from embedder.extract.local import embed
    from embedder.search.build import build_index

    n, size = (24, 64) if quick else (96, None)
    make_jpegs(work / "images" / "photos", n, scale=1.0)
    embed(EmbedConfig.of(source=str(work / "images"), model="resnet18", weights="none", out=str(work / "c.h5"),
                      image_size=size, progress=False))
    build_index(work / "c.h5", work / "index", kind="flat", progress=False)
    with FeatureCache(work / "c.h5") as cache:
        vectors = [(i, cache.features(slice(i, i + 1))[0].tolist()) for i in range(len(cache))]
        images = [(p, (work / "images" / p).read_bytes()) for p in cache.paths]
    return work / "index", vectors, images


def run(quick: bool = False) -> None:
    clients, seconds, examples = (4, 5, 5) if quick else (16, 30, 50)
    with tempfile.TemporaryDirectory(prefix="embedder-bench-") as tmp:
        index_dir, vectors, images = build(Path(tmp), quick)
        dim = len(vectors[0][1])
        print(f"# index: {len(vectors)} JPEGs, resnet18 {'64' if quick else '224'} px, {dim}-d, flat; "
              "server: `embedder serve` defaults (10 MB uploads, 50 MP, 2 decode slots)")
        with serving(index_dir) as (port, pid):
            idle = peak_rss_mib(pid)
            exchange(port, "POST", "/search/image", *multipart("warm.jpg", images[0][1]))  # builds the backbone
            print(f"server RSS: {idle:.0f} MiB idle; {peak_rss_mib(pid):.0f} MiB once the backbone is built")
            f = fuzz(f"http://127.0.0.1:{port}", examples)
            fives = sum(n for status, n in f["statuses"].items() if status and status >= 500)
            print(f"\nfuzz (schemathesis {_version('schemathesis')}, max-examples {examples}, seed 0, "
                  f"{len(f['checks'])} checks): {f['requests']} requests, {fives} 5xx, {len(f['failures'])} failed "
                  f"checks, {len(f['errors'])} errors; server peak RSS {peak_rss_mib(pid):.0f} MiB")
            print(f"   statuses {dict(sorted(f['statuses'].items(), key=str))}")
            print(f"   positive cases answered 200, per route: {f['positive_200']}")
            for failure in f["failures"][:5] + f["errors"][:5]:
                print(f"   ! {failure}")
        with serving(index_dir) as (port, pid):
            exchange(port, "POST", "/search/image", *multipart("warm.jpg", images[0][1]))  # backbone built first
            print(f"\nserver peak RSS before the abuse: {peak_rss_mib(pid):.0f} MiB (backbone built)")
            print(f"{'abusive request (alone)':<58}{'status':>7}{'bytes':>7}{'s':>7}{'JSON':>6}"
                  f"{'/health max ms':>16}{'asks':>6}{'peak MiB':>10}")
            for r in attack(port, pid, dim):
                shown = "-" if r["status"] == 200 else "yes" if r["json_detail"] else "no"
                print(f"{r['what']:<58}{r['status']:>7}{r['bytes']:>7}{r['seconds']:>7.2f}"
                      f"{shown:>6}{r['health_ms']:>16.1f}{r['health_asks']:>6}{r['peak_mib']:>10.0f}")
        with serving(index_dir) as (port, pid):
            exchange(port, "POST", "/search/image", *multipart("warm.jpg", images[0][1]))
            s = load(port, clients, seconds, vectors, images)
            print(f"\nload: {clients} clients x {seconds} s on loopback: {s['requests']} requests, {s['per_s']:.1f}/s, "
                  f"{s['non_200']} not 200, {s['5xx']} 5xx; server peak RSS {peak_rss_mib(pid):.0f} MiB")
            for kind in ("vector", "image"):
                k = s[kind]
                print(f"   {kind:<7} n={k['n']:<6} p50 {k['p50_ms']:.1f} ms  p99 {k['p99_ms']:.1f} ms  "
                      f"found itself first {k['itself_first']}/{k['n']}")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
