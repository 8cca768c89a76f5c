"""`embedder index --update`: new cache rows added to a saved index, checked against fresh builds and numpy."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from embedder.cache.reader import CacheSpec
from embedder.cache.writer import CacheWriter
from embedder.cli.main import main
from embedder.data.sources import Listing
from embedder.errors import CacheMismatchError, ConfigError
from embedder.search.build import build_index
from embedder.search.kinds import load_faiss, prepare, set_knob
from embedder.search.query import SearchIndex
from embedder.search.update import update_index
from tests.conftest import env_with_repo
from tests.crashpoints import Forker
from tests.test_index import clustered


def cache_of(path: Path, X: np.ndarray, names: list[str] | None = None, model: str = "synthetic") -> Path:
    """A real cache file holding `X`, its rows named v000000.png ... (a grown cache keeps the names of the first)."""
    n, d = X.shape
    names = names or [f"v{i:06d}.png" for i in range(n)]
    listing = Listing(path.parent, names, np.full(n, -1, dtype=np.int64), [], "flat")
    spec = CacheSpec({"model": model, "dim": str(d)}, str(path.parent), d, layout="flat")
    with CacheWriter(path, spec, listing, commit_every=10**9) as w:
        w.add(np.arange(n), X, [])
        w.finish()
    return path


def grown(tmp_path: Path, X: np.ndarray, n_old: int) -> tuple[Path, Path]:
    """The cache of the first `n_old` rows and the cache of all of them (the same cache after it grew)."""
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    return cache_of(tmp_path / "old" / "c.h5", X[:n_old]), cache_of(tmp_path / "new" / "c.h5", X)


def results(index, Q: np.ndarray, k: int = 10):
    scores, ids = index.search(prepare(Q, "l2"), k)
    return scores, ids


def test_flat_update_equals_a_fresh_build_exactly(tmp_path):
    X = np.random.default_rng(0).normal(size=(900, 16)).astype(np.float32)
    old, new = grown(tmp_path, X, 600)
    build_index(old, tmp_path / "idx", kind="flat", metric="cosine", progress=False)
    report = update_index(new, tmp_path / "idx", progress=False)
    assert report["status"] == "updated" and report["rows_added"] == 300 and report["ntotal"] == 900
    build_index(new, tmp_path / "fresh", kind="flat", metric="cosine", progress=False)
    Q = np.random.default_rng(1).normal(size=(30, 16)).astype(np.float32)
    got = SearchIndex.open(tmp_path / "idx").search(Q, 10)
    want = SearchIndex.open(tmp_path / "fresh").search(Q, 10)
    assert [[(h.id, h.score, h.path) for h in q] for q in got] == [[(h.id, h.score, h.path) for h in q] for q in want]
    # ... and both agree with numpy.
    Xn, Qn = X / np.linalg.norm(X, axis=1, keepdims=True), Q / np.linalg.norm(Q, axis=1, keepdims=True)
    assert [[h.id for h in q] for q in got] == np.argsort(-(Qn @ Xn.T), axis=1, kind="stable")[:, :10].tolist()
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["ntotal"] == 900 and meta["updates"][0]["rows_added"] == 300 and meta["sized_for"] == 600


def reference_with_the_same_quantizer(built_dir: Path, X: np.ndarray, on_disk: bool):
    """The index as built (trained once on the old rows), emptied and filled with all rows in order."""
    faiss = load_faiss()
    index = faiss.read_index(str(built_dir / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR if on_disk else 0)
    ivf = faiss.extract_index_ivf(index)
    if on_disk:
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # owned by the index now
        index.ntotal = ivf.ntotal = 0
    else:
        index.reset()  # the lists go, the quantizer and codebooks stay
    assert index.ntotal == 0 and index.is_trained
    index.add_with_ids(prepare(X, "l2"), np.arange(len(X), dtype=np.int64))
    return index


@pytest.mark.parametrize("kind,on_disk", [("ivf", False), ("ivfsq", False), ("ivfpq", False), ("ivf", True)])
def test_ivf_update_equals_the_same_quantizer_filled_with_all_rows(tmp_path, kind, on_disk):
    X = clustered(n=4000, d=16, seed=2)
    old, new = grown(tmp_path, X, 2500)
    built = build_index(old, tmp_path / "idx", kind=kind, metric="l2", progress=False, n_eval=200, on_disk=on_disk)
    (tmp_path / "built").mkdir()
    for name in ("index.faiss", "lists.ivfdata"):  # the index as built, before the update replaces it
        if (tmp_path / "idx" / name).exists():
            (tmp_path / "built" / name).write_bytes((tmp_path / "idx" / name).read_bytes())
    report = update_index(new, tmp_path / "idx", progress=False, n_eval=200)
    assert report["rows_added"] == 1500 and report["meta"]["on_disk"] == on_disk
    updated = SearchIndex.open(tmp_path / "idx")
    assert updated.ntotal == 4000
    reference = reference_with_the_same_quantizer(tmp_path / "built", X, on_disk)
    set_knob(reference, "nprobe", report["knob_after"])
    Q = clustered(n=4100, d=16, seed=2)[4000:]  # fresh queries of the same distribution
    want_scores, want_ids = results(reference, Q)
    got_scores, got_ids = results(updated.index, Q)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_scores, want_scores)
    if on_disk:
        assert (tmp_path / "idx" / "lists.ivfdata").is_file()
        assert report["meta"]["params"]["on_disk_shards"] == built["params"]["on_disk_shards"] + 1


def exact_recall(index, X: np.ndarray, Q: np.ndarray) -> float:
    d2 = (Q * Q).sum(1)[:, None] - 2 * Q @ X.T + (X * X).sum(1)[None, :]
    truth = np.argsort(d2, axis=1)[:, :10]
    _, found = results(index, Q)
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))


def test_hnsw_update_recall_is_within_a_hundredth_of_a_fresh_build(tmp_path):
    data = clustered(n=6300, d=16, seed=3)
    X, Q = data[:6000], data[6000:]
    old, new = grown(tmp_path, X, 3000)
    build_index(old, tmp_path / "idx", kind="hnsw", metric="l2", progress=False, n_eval=200)
    report = update_index(new, tmp_path / "idx", progress=False, n_eval=200)
    assert report["meta"]["eval_queries_held_out"]  # fresh queries: new rows kept out of the graph while tuning
    build_index(new, tmp_path / "fresh", kind="hnsw", metric="l2", progress=False, n_eval=200)
    updated, fresh = SearchIndex.open(tmp_path / "idx"), SearchIndex.open(tmp_path / "fresh")
    np.testing.assert_array_equal(np.stack([updated.index.reconstruct(i) for i in range(6000)]), X)
    ef = report["knob_after"]
    set_knob(fresh.index, "efSearch", ef)
    r_updated, r_fresh = exact_recall(updated.index, X, Q), exact_recall(fresh.index, X, Q)
    assert abs(r_updated - r_fresh) <= 0.01, (r_updated, r_fresh, ef)


def test_knob_is_raised_when_the_new_rows_lower_recall(tmp_path):
    """Trained on tight clusters, the lists are a poor partition of the diffuse rows added later:
    the nprobe that sufficed finds too few of their neighbours, so the update raises it."""
    rng = np.random.default_rng(4)
    tight = clustered(n=3000, d=16, seed=4)
    diffuse = (rng.normal(size=(3000, 16)) * 4).astype(np.float32)
    X = np.concatenate([tight, diffuse])
    old, new = grown(tmp_path, X, 3000)
    meta = build_index(old, tmp_path / "idx", kind="ivf", metric="l2", progress=False, n_eval=200)
    report = update_index(new, tmp_path / "idx", progress=False, n_eval=200)
    before, after = report["knob_before"], report["knob_after"]
    assert before == meta["params"]["nprobe"] and report["retuned"] and after > before
    tuning = report["meta"]["tuning"]
    assert tuning[0] == {"nprobe": before, "recall_at_10": tuning[0]["recall_at_10"]}
    assert tuning[0]["recall_at_10"] < meta["target_recall"] <= report["recall_at_10"]
    # Checked independently, on fresh diffuse queries: the old nprobe misses, the new one finds.
    index = SearchIndex.open(tmp_path / "idx").index
    Q = (rng.normal(size=(200, 16)) * 4).astype(np.float32)
    set_knob(index, "nprobe", before)
    low = exact_recall(index, X, Q)
    set_knob(index, "nprobe", after)
    assert exact_recall(index, X, Q) > low + 0.05 and low < meta["target_recall"]
    assert json.loads((tmp_path / "idx" / "meta.json").read_text())["params"]["nprobe"] == after


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_refusals_leave_the_index_untouched(tmp_path):
    X = np.random.default_rng(5).normal(size=(400, 8)).astype(np.float32)
    old, new = grown(tmp_path, X, 300)
    build_index(old, tmp_path / "idx", kind="flat", metric="cosine", progress=False)
    before = folder_bytes(tmp_path / "idx")
    (tmp_path / "other").mkdir()
    other_model = cache_of(tmp_path / "other" / "m.h5", X, model="another")
    with pytest.raises(CacheMismatchError, match="(?s)model.*without --update"):
        update_index(other_model, tmp_path / "idx", progress=False)
    remade = cache_of(tmp_path / "other" / "r.h5", X, names=[f"w{i:06d}.png" for i in range(400)])
    with pytest.raises(ConfigError, match="from row 0 on.*Rebuild without --update"):
        update_index(remade, tmp_path / "idx", progress=False)
    with pytest.raises(ConfigError, match="keeps its kind"):
        update_index(new, tmp_path / "idx", kind="hnsw", progress=False)
    report = update_index(old, tmp_path / "idx", progress=False)
    assert report["status"] == "up_to_date" and report["rows_added"] == 0
    assert folder_bytes(tmp_path / "idx") == before
    with pytest.raises(ConfigError, match="Build one first"):
        update_index(new, tmp_path / "nothing", progress=False)


def test_rebuild_advice_past_four_times_the_trained_size_and_a_new_auto_kind(tmp_path):
    X = clustered(n=5000, d=16, seed=6)
    old, new = grown(tmp_path, X, 1000)
    build_index(old, tmp_path / "ivf", kind="ivf", metric="l2", progress=False, n_eval=100)
    report = update_index(new, tmp_path / "ivf", progress=False, n_eval=100)
    assert report["status"] == "updated" and any("over 4x" in a for a in report["advice"])
    assert report["meta"]["updates"][0]["rebuild_advice"] == report["advice"]
    # A small flat index under a tight budget: at 5000 rows the ladder moves on to a compressed kind.
    build_index(old, tmp_path / "flat", metric="l2", memory_budget=100_000, progress=False)
    assert json.loads((tmp_path / "flat" / "meta.json").read_text())["kind"] == "flat"
    advice = update_index(new, tmp_path / "flat", progress=False)["advice"]
    assert len(advice) == 1 and "--kind auto would now pick ivfpq" in advice[0]
    # No advice for a modest growth of an index of the kind auto picks.
    (tmp_path / "mid").mkdir()
    build_index(old, tmp_path / "ivf2", kind="ivf", metric="l2", progress=False, n_eval=100)
    mid = cache_of(tmp_path / "mid" / "c.h5", X[:2000])
    assert not [a for a in update_index(mid, tmp_path / "ivf2", progress=False, n_eval=100)["advice"] if "4x" in a]


def test_removed_rows_are_carried_forward_and_never_added(tmp_path):
    X = np.random.default_rng(7).normal(size=(500, 8)).astype(np.float32)
    old, new = grown(tmp_path, X, 300)
    build_index(old, tmp_path / "idx", kind="hnsw", metric="cosine", progress=False, n_eval=50)
    removed = np.array([3, 17, 250], dtype=np.int64)
    with h5py.File(tmp_path / "idx" / "rows.h5", "a") as f:  # as the removal code writes it
        f.create_dataset("removed", data=removed)
    report = update_index(new, tmp_path / "idx", progress=False, n_eval=100)
    with h5py.File(tmp_path / "idx" / "rows.h5", "r") as f:
        np.testing.assert_array_equal(f["removed"][:], removed)
        assert len(f["paths"]) == 500
    assert report["meta"]["updates"][0]["faiss_ntotal"] == 500  # the 300 old (removed ones still in the graph) + 200


def test_cli_update_prints_a_summary_and_json(tmp_path, capsys):
    X = clustered(n=5000, d=16, seed=8)
    old, new = grown(tmp_path, X, 1000)
    idx = str(tmp_path / "idx")
    assert main(["index", str(old), "--out", idx, "--kind", "ivf", "--metric", "l2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", str(new), "--out", idx, "--update", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "added 4000 rows to the ivf index, now 5000 x 16 (l2)" in printed and "recall@10" in printed
    assert "a rebuild would be better" in printed and "over 4x" in printed
    assert main(["index", str(new), "--out", idx, "--update", "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "up_to_date" and report["ntotal"] == 5000 and report["advice"]
    assert main(["index", str(old), "--out", idx, "--update", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "Rebuild without --update" in err and "Traceback" not in err


def test_pipeline_index_step_with_update_builds_then_adds(tmp_path, capsys):
    X = np.random.default_rng(9).normal(size=(700, 8)).astype(np.float32)
    grown(tmp_path, X, 400)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text("""
[pipeline]
name = "grow"

[[steps]]
run = "index"
cache = "old/c.h5"
out = "idx"
update = true

[[steps]]
run = "index"
cache = "new/c.h5"
out = "idx"
update = true
""")
    assert main(["run", str(pipeline), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "no index at" in printed and "added 300 rows to the flat index" in printed
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["ntotal"] == 700 and [u["rows_added"] for u in meta["updates"]] == [300]
    # The step's result is the update's report, on the printed path as on the JSON one.
    import argparse

    from embedder.cli import commands
    from embedder.search.config import IndexConfig

    config = IndexConfig(str(tmp_path / "new" / "c.h5"), out=str(tmp_path / "idx"), update=True, progress=False)
    report = commands.index(config, argparse.Namespace(json=False))
    assert report.as_dict()["status"] == "up_to_date" and report.as_dict()["ntotal"] == 700


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_failure_mid_update_leaves_the_old_index_byte_identical(tmp_path, monkeypatch, on_disk):
    from embedder.search import update

    X = clustered(n=3000, d=16, seed=10)
    old, new = grown(tmp_path, X, 2000)
    build_index(old, tmp_path / "idx", kind="ivf", metric="l2", progress=False, n_eval=100, on_disk=on_disk)
    before = folder_bytes(tmp_path / "idx")

    def full_disk(tmp, *args):  # the index and rows are written, meta.json is not
        update.load_faiss().write_index(args[0], str(tmp / "index.faiss"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(update, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        update_index(new, tmp_path / "idx", progress=False, n_eval=100)
    assert folder_bytes(tmp_path / "idx") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "new", "old"]  # no staged folder, no lock left


@pytest.mark.slow
def test_kills_at_every_step_of_an_update_leave_the_old_index_or_the_new(tmp_path):
    """SIGKILL right before each file-system step of an update (tests.crashpoints): the index folder
    is always the old one, byte for byte, or the complete new one; a rerun then finishes the update."""
    X = clustered(n=1500, d=16, seed=11)
    old, new = grown(tmp_path, X, 1000)
    idx = tmp_path / "idx"
    build_index(old, idx, kind="ivf", metric="l2", progress=False, n_eval=100)
    before = folder_bytes(idx)
    argv = ["index", str(new), "--out", str(idx), "--update", "--quiet"]
    env = env_with_repo()
    env["OMP_NUM_THREADS"] = "1"
    with Forker(env, logs=tmp_path) as forker:
        counted = forker.run(argv, tmp_path, phase="update", at=0, log=tmp_path / "calls.txt")
        assert counted.rc == 0, counted.output
        steps = len((tmp_path / "calls.txt").read_text().splitlines())
        assert steps >= 5
        build_index(old, idx, kind="ivf", metric="l2", progress=False, n_eval=100)  # back to the old index
        before = folder_bytes(idx)
        outcomes = {"old": 0, "new": 0}
        for at in range(1, steps + 1):
            outcome = forker.run(argv, tmp_path, phase="update", at=at)
            assert outcome.killed, (at, outcome.output)
            index = SearchIndex.open(idx)  # whole, whichever it is
            if index.ntotal == 1000:
                assert folder_bytes(idx) == before, at
                outcomes["old"] += 1
            else:
                assert index.ntotal == 1500 and len(index.paths) == 1500, at
                outcomes["new"] += 1
                build_index(old, idx, kind="ivf", metric="l2", progress=False, n_eval=100)
                before = folder_bytes(idx)
        assert outcomes["old"] >= steps - 3, outcomes
        rerun = forker.run(argv, tmp_path, phase=None)
        assert rerun.rc == 0, rerun.output
    assert SearchIndex.open(idx).ntotal == 1500
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx")]  # no staged folder, no lock


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_rows_removed_then_an_update_never_bring_them_back(tmp_path, kind):
    from embedder.search.removal import remove_rows

    X = clustered(n=1200, d=16, seed=11)
    old, new = grown(tmp_path, X, 800)
    build_index(old, tmp_path / "idx", kind=kind, metric="cosine", progress=False, n_eval=100)
    gone = [f"v{i:06d}.png" for i in (5, 6, 400)]
    remove_rows(tmp_path / "idx", gone, progress=False)
    report = update_index(new, tmp_path / "idx", progress=False, n_eval=100)
    assert report["rows_added"] == 400
    index = SearchIndex.open(tmp_path / "idx")
    assert index.ntotal == 1200 and sorted(index.removed.tolist()) == [5, 6, 400]
    hits = index.search(X[[5, 6, 400, 1000]], 10)
    assert all(h.id not in (5, 6, 400) for q in hits for h in q)
    assert hits[3][0].id == 1000 and all(len(q) == 10 for q in hits)  # a new row finds itself
    # Its own vector, first among every row but the removed ones: the filter and the update agree.
    where = index.search(X[[1000]], 5, where="id >= 800")
    assert [h.id >= 800 for h in where[0]] == [True] * 5 and where[0][0].id == 1000
