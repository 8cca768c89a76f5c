"""The service's /map page at 100,000 points: how long `embedder map` takes, how big /map/points
is, and how long headless Chromium takes to fetch, index and draw it (and to redraw after a zoom).

Synthetic clustered vectors (10 labelled clusters) in a real cache, a flat index, a stored PCA map
(and the UMAP time on a smaller index: UMAP of 100k rows takes minutes), a real uvicorn server,
the real page. The page reports its own timings (window.embedderMap.timings).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np

from benchmarks.search import clustered, write_cache
from embedder.search.build import build_index
from embedder.search.maps import compute_map
from embedder.serve.app import create_app
from embedder.serve.server import serve_in_thread

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def index_of(tmp: Path, name: str, n: int, d: int = 32) -> Path:
    rng = np.random.default_rng(0)
    X = clustered(n, d, centers=10, seed=0)
    labels = rng.integers(0, 10, n).astype(np.int64)
    centres = rng.normal(size=(10, d)).astype(np.float32) * 6
    X = (X + centres[labels]).astype(np.float32)  # the label's cluster shows on the map
    write_cache(tmp / f"{name}.h5", X, labels)
    build_index(tmp / f"{name}.h5", tmp / name, kind="flat", progress=False)
    with h5py.File(tmp / name / "rows.h5", "a") as f:  # a numeric column to colour by (a "score")
        f.require_group("columns").create_dataset("score", data=rng.random(n))
    return tmp / name


def page_timings(index_dir: Path) -> dict:
    from playwright import sync_api

    app = create_app(index_dir)
    with serve_in_thread(app) as (host, port), sync_api.sync_playwright() as p:
        url = f"http://{host}:{port}"
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"{url}/map/points") as r:  # builds the body (the page then gets it ready)
            body = r.read()
        first_s = time.perf_counter() - t0
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            t0 = time.perf_counter()
            page.goto(f"{url}/map")
            page.locator("body[data-ready='1']").wait_for(timeout=120_000)
            wall = time.perf_counter() - t0
            timings = page.evaluate("() => ({...embedderMap.timings})")
            rasterised = float(np.median([page.evaluate("() => embedderMap.drawNow()") for _ in range(5)]))
            drawn = int(page.locator("#canvas").get_attribute("data-drawn"))
            page.select_option("#color", "score")  # recolour the whole map, every point on screen
            page.locator("#legend", has_text="score").wait_for(timeout=30_000)
            page.wait_for_timeout(200)
            recolour = page.evaluate("() => embedderMap.timings.draw_ms")
            box = page.locator("#canvas").bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            redraws = []
            for _ in range(5):  # zoom in step by step: fewer points are on screen each time
                page.mouse.wheel(0, -120)
                page.wait_for_timeout(100)
                redraws.append(page.evaluate("() => embedderMap.timings.draw_ms"))
            zoomed = int(page.locator("#canvas").get_attribute("data-drawn"))
        finally:
            browser.close()
    return {"bytes": len(body), "first_points_s": first_s, "wall_s": wall, "drawn": drawn, **timings,
            "rasterised_ms": rasterised, "redraw_ms": float(np.median(redraws)), "recolour_draw_ms": recolour, "zoomed_drawn": zoomed}


def fallback_s(index_dir: Path) -> float:
    """The first /map/points of an index without a stored map: the service's own PCA, then the body."""
    (index_dir / "map.h5").unlink()

    with serve_in_thread(create_app(index_dir)) as (host, port):
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://{host}:{port}/map/points") as r:
            r.read()
        return time.perf_counter() - t0


def run(quick: bool = False) -> None:
    n = 20_000 if quick else 100_000
    tmp = Path(tempfile.mkdtemp(prefix="bench-map-"))
    try:
        index = index_of(tmp, "big", n)
        report = compute_map(index, method="pca", progress=False)
        print(f"   embedder map --method pca, {n} x 32: {report['seconds']:.1f} s")
        small = 5_000 if quick else 20_000
        report = compute_map(index_of(tmp, "small", small), method="umap", progress=False)
        print(f"   embedder map --method umap, {small} x 32: {report['seconds']:.1f} s (numba compiling included)")
        t = page_timings(index)
        print(f"   /map/points: {t['bytes'] / 2**20:.1f} MiB JSON, first answer (build + send) {t['first_points_s']:.2f} s")
        print(f"   headless Chromium, {t['drawn']} points drawn: page load to drawn {t['wall_s']:.2f} s wall; in the "
              f"page: fetch + parse {t['fetch_ms']:.0f} ms, grid + colours {t['index_ms']:.0f} ms, first draw "
              f"{t['draw_ms']:.0f} ms, total {t['total_ms']:.0f} ms; a full redraw with its pixels read back "
              f"{t['rasterised_ms']:.0f} ms (median of 5)")
        print(f"   recolour by a column: draw {t['recolour_draw_ms']:.0f} ms (all points); redraw after a zoom step: "
              f"{t['redraw_ms']:.0f} ms (median of 5 steps in; {t['zoomed_drawn']} points on screen after the last)")
        print(f"   no stored map: the service's PCA fallback, first /map/points {fallback_s(index):.2f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
