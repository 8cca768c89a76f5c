"""2-D maps: `plot --method umap`, `embedder map INDEX_DIR` (INDEX_DIR/map.h5) and the service's /map page.

The service is exercised as tests/test_service.py does it: a real index, a real uvicorn server on a
socket, a real headless Chromium. Every expectation is recomputed here from what is stored (the
map file, the index's rows) or from scikit-learn, never written down by hand.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from embedder.atomic import WriteLock
from embedder.cli.main import main
from embedder.errors import CacheError, ConfigError
from embedder.extract.local import embed
from embedder.search.build import build_index
from embedder.search.maps import MAP_FILE, compute_map, project
from embedder.search.plots import plot_space
from embedder.search.removal import remove_rows
from embedder.search.update import update_index
from embedder.serve.app import create_app
from tests.conftest import fast_config, make_tree
from tests.loopback import running
from tests.test_index import synthetic_cache
from tests.test_index_update import grown
from tests.test_service import CHROMIUM, CHROMIUM_ARGS, http

K = 4


def two_clusters(n=120, d=24, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.zeros((2, d), np.float32)
    centres[0, 0], centres[1, 1] = 1, 1  # orthogonal: far apart by cosine and by L2
    labels = np.repeat([0, 1], n // 2)
    return (centres[labels] * 10 + rng.normal(size=(n, d)).astype(np.float32) * 0.3).astype(np.float32), labels


def pairwise(xy: np.ndarray) -> np.ndarray:
    return np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))


def assert_similar_shape(a: np.ndarray, b: np.ndarray) -> None:
    """a is b up to a rotation, reflection, shift and uniform scale: equal distances up to one factor."""
    da, db = pairwise(a), pairwise(b)
    scale = da.sum() / db.sum()
    np.testing.assert_allclose(da, db * scale, atol=2e-4 * da.max())


# ---------------------------------------------------------------- plot --method umap


def test_umap_separates_two_clusters_and_the_plot_is_seeded(tmp_path):
    X, labels = two_clusters()
    _, xy = project(X, "umap", seed=0, metric="cosine")
    assert xy.shape == (len(X), 2) and np.isfinite(xy).all()
    # Every point's nearest neighbour on the map is of its own cluster, and the clusters' bounding
    # boxes are apart: UMAP kept the two groups apart.
    d = pairwise(xy)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).all()
    between = d[labels == 0][:, labels == 1].min()
    within = max(d[labels == c][:, labels == c][np.isfinite(d[labels == c][:, labels == c])].min() for c in (0, 1))
    assert between > within
    np.testing.assert_array_equal(project(X, "umap", seed=0, metric="cosine")[1], xy)  # seeded: the same map
    cache = synthetic_cache(tmp_path / "c.h5", X, labels)
    first = plot_space(cache, tmp_path / "a.png", method="umap")
    second = plot_space(cache, tmp_path / "b.png", method="umap")
    assert first.stat().st_size > 5000 and first.read_bytes() == second.read_bytes()


def test_plot_cli_takes_umap_and_refuses_what_it_cannot_map(tmp_path, capsys):
    X, labels = two_clusters(n=40)
    cache = synthetic_cache(tmp_path / "c.h5", X, labels)
    assert main(["plot", str(cache), "--method", "umap"]) == 0
    assert (tmp_path / "c.umap.png").stat().st_size > 5000
    with pytest.raises(ConfigError, match="at least 3 rows"):
        project(X[:2], "umap")


# ---------------------------------------------------------------- embedder map INDEX_DIR


def test_map_is_written_under_the_lock_and_refused_while_another_writer_holds_it(tmp_path, capsys):
    X, labels = two_clusters(n=60)
    cache = synthetic_cache(tmp_path / "c.h5", X, labels)
    build_index(cache, tmp_path / "idx", kind="flat", progress=False)
    assert main(["map", str(tmp_path / "idx"), "--method", "pca", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["method"], report["rows"], report["mapped"]) == ("pca", 60, 60)
    with h5py.File(tmp_path / "idx" / MAP_FILE) as f:
        xy, attrs = f["xy"][:], dict(f.attrs)
    assert attrs["method"] == "pca" and attrs["rows"] == 60
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)  # as the cosine index compares them
    from sklearn.decomposition import PCA

    assert_similar_shape(xy, PCA(n_components=2, random_state=0).fit_transform(Xn))
    assert sorted(p.name for p in (tmp_path / "idx").iterdir() if "tmp" in p.name) == []  # no temporary left
    with WriteLock(tmp_path / "idx"), pytest.raises(CacheError, match="Another embedder process"):
        compute_map(tmp_path / "idx", method="pca")
    with pytest.raises(ConfigError, match="--method must be one of umap, pca"):
        compute_map(tmp_path / "idx", method="tsne")


def test_a_map_fitted_on_a_sample_places_the_other_rows_with_the_fitted_model(tmp_path):
    X, labels = two_clusters(n=200)
    build_index(synthetic_cache(tmp_path / "c.h5", X, labels), tmp_path / "idx", kind="flat", progress=False)
    report = compute_map(tmp_path / "idx", method="pca", fit_rows=50, progress=False)
    assert (report["fitted_on"], report["mapped"]) == (50, 200)
    with h5py.File(tmp_path / "idx" / MAP_FILE) as f:
        xy = f["xy"][:]
    from sklearn.decomposition import PCA

    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sample = np.sort(np.random.default_rng(0).choice(200, size=50, replace=False))  # the documented seeded sample
    np.testing.assert_allclose(xy, PCA(n_components=2, random_state=0).fit(Xn[sample]).transform(Xn), atol=1e-4)


# ---------------------------------------------------------------- /map/points and /map/column


def points_of(app) -> dict:
    with running(app) as (host, port):
        r = http("GET", f"http://{host}:{port}/map/points")
    assert r.status == 200 and r.headers["content-type"] == "application/json", r.body
    return r.json()


def unit_square(xy: np.ndarray) -> np.ndarray:
    lo, hi = xy.min(0), xy.max(0)
    span = (hi - lo).max()
    return (xy - lo) / span + (1 - (hi - lo) / span) / 2


def test_points_are_the_stored_map_without_removed_rows(tmp_path):
    X, labels = two_clusters(n=60)
    cache = synthetic_cache(tmp_path / "c.h5", X, labels)
    build_index(cache, tmp_path / "idx", kind="flat", progress=False)
    compute_map(tmp_path / "idx", method="umap", progress=False)
    with h5py.File(tmp_path / "idx" / MAP_FILE) as f:
        stored = f["xy"][:]
    doc = points_of(create_app(tmp_path / "idx"))
    assert (doc["method"], doc["stored"], doc["note"], doc["count"], doc["rows"]) == ("umap", True, None, 60, 60)
    assert doc["id"] == list(range(60)) and doc["label"] == labels.tolist()
    assert doc["path"] == [f"v{i:06d}.png" for i in range(60)] and doc["classes"] == ["c0", "c1"]
    np.testing.assert_allclose(np.c_[doc["x"], doc["y"]], unit_square(stored.astype(np.float64)), atol=1e-5)
    # Removing rows carries the map over; the removed rows are left off it.
    remove_rows(tmp_path / "idx", ["v000003.png", "v000040.png"], progress=False)
    doc = points_of(create_app(tmp_path / "idx"))
    keep = [i for i in range(60) if i not in (3, 40)]
    assert doc["stored"] and doc["id"] == keep and doc["count"] == 58
    np.testing.assert_allclose(np.c_[doc["x"], doc["y"]], unit_square(stored[keep].astype(np.float64)), atol=1e-5)


def test_without_a_current_map_the_service_falls_back_to_pca_and_says_why(tmp_path):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 16)).astype(np.float32)
    old, new = grown(tmp_path, X, 50)
    build_index(old, tmp_path / "idx", kind="flat", metric="l2", progress=False)
    doc = points_of(create_app(tmp_path / "idx"))
    assert (doc["method"], doc["stored"], doc["count"]) == ("pca", False, 50)
    assert "embedder map" in doc["note"]
    assert_similar_shape(np.c_[doc["x"], doc["y"]], PCA(n_components=2, random_state=0).fit_transform(X[:50]))
    # A map of the index before it grew is stale: not used, and the note says to compute it again.
    compute_map(tmp_path / "idx", method="pca", progress=False)
    update_index(new, tmp_path / "idx", progress=False)
    assert (tmp_path / "idx" / MAP_FILE).is_file()  # carried over by the update
    doc = points_of(create_app(tmp_path / "idx"))
    assert (doc["stored"], doc["count"]) == (False, 80) and "covers 50 rows" in doc["note"]
    assert_similar_shape(np.c_[doc["x"], doc["y"]], PCA(n_components=2, random_state=0).fit_transform(X))


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """A real embedded index (3 classes x 6 images; its rows have the built-in numeric columns) with a stored map."""
    root = tmp_path_factory.mktemp("map")
    tree = make_tree(root / "images")
    embed(fast_config(tree, root / "feats.h5"))
    build_index(root / "feats.h5", root / "index", kind="flat", progress=False)
    compute_map(root / "index", method="pca", progress=False)
    app = create_app(root / "index", default_k=K)
    with running(app) as (host, port):
        yield f"http://{host}:{port}", app.state.index


def test_a_numeric_column_is_given_by_row_id_and_others_are_refused(mapped):
    url, index = mapped
    doc = http("GET", url + "/map/points").json()
    assert set(doc["columns"]) >= {"size", "width", "height"} and "split" not in doc["columns"]
    r = http("GET", url + "/map/column?name=size")
    assert r.status == 200 and r.json()["values"] == index.columns["size"].astype(float).tolist()
    assert http("GET", url + "/map/column?name=path").status == 422
    assert http("HEAD", url + "/map/points").status == 200


def test_page_is_self_contained(mapped):
    url, _ = mapped
    html = http("GET", url + "/map").body.decode()
    for marker in ('id="canvas"', 'src="/static/map.js"', 'href="/static/map.css"', 'id="selection"'):
        assert marker in html
    texts = [html] + [http("GET", f"{url}/static/map.{ext}").body.decode() for ext in ("js", "css")]
    assert all("http://" not in t and "https://" not in t for t in texts)
    assert "<style" not in html and "<script>" not in html


def isolated_point(screen: dict[int, tuple[float, float]], far: float = 16) -> int:
    """A row whose point has no other within `far` pixels, so a hover on it can only find it."""
    ids = list(screen)
    xy = np.array([screen[i] for i in ids])
    d = pairwise(xy)
    np.fill_diagonal(d, np.inf)
    return ids[int(np.flatnonzero(d.min(1) > far)[0])]


def test_browser_map_draws_hovers_searches_and_selects(mapped):
    from playwright import sync_api
    from playwright.sync_api import expect

    url, index = mapped
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not installed: run `make browser` (apt-get install chromium)"
    doc = http("GET", url + "/map/points").json()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            console = []
            page.on("console", lambda m: console.append(m.text))
            page.goto(url + "/map")
            expect(page.locator("#about")).to_contain_text(f"{index.ntotal} images · pca map", timeout=15_000)
            canvas = page.locator("#canvas")
            assert canvas.get_attribute("data-drawn") == str(index.ntotal)
            box = canvas.bounding_box()
            screen = {i: tuple(page.evaluate("id => embedderMap.screenOf(id)", i)) for i in doc["id"]}
            # Pixels: the canvas is painted at every point's place, and nowhere far from all of them.
            painted = canvas.evaluate("""c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
                const r = c.width / c.clientWidth, out = [];
                for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++)
                  if (d.data[4 * (y * c.width + x) + 3] > 0) out.push([x / r, y / r]);
                return out; }""")
            painted = np.array(painted)
            for x, y in screen.values():
                assert (np.abs(painted - [x, y]).max(1) <= 2).any()
            assert (pairwise_min(painted, np.array(list(screen.values()))) <= 12).all()

            # Hover: the thumbnail, path and label of the row under the cursor.
            row = isolated_point(screen)
            page.mouse.move(box["x"] + screen[row][0], box["y"] + screen[row][1])
            expect(page.locator("#hover-path")).to_have_text(index.paths[row], timeout=5_000)
            assert page.locator("#hover-label").inner_text() == index.classes[index.labels[row]]
            expect(page.locator("#hover-img")).to_have_js_property("complete", True, timeout=15_000)
            assert page.locator("#hover-img").evaluate("i => i.naturalWidth") > 0
            assert page.locator("#hover-img").get_attribute("src") == f"/thumbnail/{row}"

            # Click: the neighbours, as /search/id gives them.
            page.mouse.click(box["x"] + screen[row][0], box["y"] + screen[row][1])
            expected = [h["path"] for h in http("GET", f"{url}/search/id/{row}").json()["hits"]]
            hits = page.locator("#results .hit")
            expect(hits).to_have_count(len(expected), timeout=15_000)
            assert [hits.nth(i).get_attribute("data-path") for i in range(hits.count())] == expected

            # Box selection: exactly the points drawn inside the box, their paths listed.
            xs = np.sort([x for x, _ in screen.values()])
            gap = max(range(1, len(xs) - 2), key=lambda i: (xs[i + 1] - xs[i] > 4, -abs(i - len(xs) // 2)))
            cut = round(float(xs[gap] + xs[gap + 1]) / 2)  # in a gap: a pixel's rounding moves no point across
            ys = [y for _, y in screen.values()]
            top, bottom = min(ys) - 5, max(ys) + 5
            page.mouse.move(box["x"] + 2, box["y"] + top)
            page.mouse.down()
            page.mouse.move(box["x"] + cut, box["y"] + bottom, steps=5)
            page.mouse.up()
            inside = [i for i in doc["id"] if 2 <= screen[i][0] <= cut and top <= screen[i][1] <= bottom]
            assert 0 < len(inside) < len(doc["id"])
            expect(page.locator("#selection-count")).to_have_text(f"{len(inside)} images", timeout=5_000)
            assert page.locator("#selection").input_value().split("\n") == [index.paths[i] for i in inside]

            # Colour by a numeric column: every point is drawn again.
            page.select_option("#color", "size")
            expect(page.locator("#legend")).to_contain_text("size", timeout=5_000)
            assert canvas.get_attribute("data-drawn") == str(index.ntotal)
            assert not [m for m in console if "Content Security Policy" in m], console
        finally:
            browser.close()


def pairwise_min(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each row of a, the largest coordinate difference to its nearest row of b."""
    return np.abs(a[:, None, :] - b[None, :, :]).max(-1).min(1)


def test_pipeline_map_step_validates(tmp_path):
    from embedder.cli.pipeline import load_pipeline

    toml = tmp_path / "p.toml"
    toml.write_text('[[steps]]\nrun = "map"\nindex = "idx"\nmethod = "pca"\n')
    _, steps = load_pipeline(toml)
    assert steps[0].config.method == "pca" and steps[0].kind == "map"


def test_column_values_turn_missing_numbers_into_nulls():
    from embedder.data.metadata import INT_NULL
    from embedder.serve.maps import column_values

    assert column_values(np.array([1.5, np.nan, np.inf])) == [1.5, None, None]
    assert column_values(np.array([3, INT_NULL], dtype=np.int64)) == [3.0, None]
    assert column_values(np.array([True, False])) == [1, 0]


def test_map_of_a_missing_index_is_refused_before_any_lock(tmp_path):
    with pytest.raises(ConfigError, match="No index at"):
        compute_map(tmp_path / "a" / "b", method="pca")
    assert not (tmp_path / "a").exists()


def test_curate_scores_stored_beside_the_map_colour_it(tmp_path):
    import pyarrow.parquet as pq

    from embedder.curate.config import CurateConfig
    from embedder.curate.run import run_curate

    tree = make_tree(tmp_path / "images", per_class=8)
    embed(fast_config(tree, tmp_path / "feats.h5"))
    build_index(tmp_path / "feats.h5", tmp_path / "index", kind="flat", progress=False)
    run_curate(CurateConfig(str(tmp_path / "feats.h5"), out=str(tmp_path / "report"), folds=2, k=3, gallery=0,
                            progress=False))
    report = compute_map(tmp_path / "index", method="pca", progress=False, scores=tmp_path / "report")
    assert {"label_quality", "outlier_score", "uniqueness"} <= set(report["scores"])
    scores = pq.read_table(tmp_path / "report" / "scores.parquet").to_pandas()
    app = create_app(tmp_path / "index", default_k=K)
    index = app.state.index
    with running(app) as (host, port):
        url = f"http://{host}:{port}"
        assert "outlier_score" in http("GET", url + "/map/points").json()["columns"]
        got = http("GET", url + "/map/column?name=outlier_score").json()["values"]
    want = dict(zip(scores["path"], scores["outlier_score"]))
    assert got == pytest.approx([want[p] for p in index.paths])  # by row id, joined by path
    with pytest.raises(ConfigError, match="No curate scores"):
        compute_map(tmp_path / "index", method="pca", progress=False, scores=tmp_path / "nowhere")
