"""The errors table of a run of mostly missing files (issue 25): the in-progress view maps the parts'
errors instead of copying them at each commit, and shows exactly the errors committed so far."""

from __future__ import annotations

import h5py
import numpy as np

from embedder.cache.reader import CacheSpec, FeatureCache
from embedder.cache.writer import CacheWriter
from embedder.data.sources import Listing


def test_the_live_view_maps_every_committed_error_and_the_finished_cache_holds_them(tmp_path):
    n = 300
    paths = [f"dir/é_{i:04d}.jpg" if i % 7 else f"dir/caf\udce9_{i}.jpg" for i in range(n)]  # a non-UTF-8 name too
    listing = Listing(tmp_path, paths, np.full(n, -1, dtype=np.int64), [], "filelist")
    spec = CacheSpec({"model": "synthetic", "dim": "4"}, str(tmp_path), 4, layout="filelist")
    out = tmp_path / "c.h5"
    expected = []
    with CacheWriter(out, spec, listing, commit_every=25) as w:
        for start in range(0, n, 10):
            idx = np.arange(start, start + 10)
            ok = idx[idx % 10 == 0]
            errors = [(int(i), f"reason {i} " + "x" * (i % 13) + " ü") for i in idx if i % 10]
            expected += [(paths[i], r) for i, r in errors]
            w.add(ok, np.ones((len(ok), 4), np.float32), errors)
            if start and start % 100 == 0:  # at a commit boundary: the view shows what is committed
                with FeatureCache(out, require_complete=False) as live:
                    assert live.errors == w.committed.errors == expected[: len(w.committed.errors)]
                with h5py.File(out) as f:
                    assert f["errors/path"].is_virtual and f["errors/reason"].is_virtual
        w.finish()
    with FeatureCache(out) as done:
        assert done.errors == expected and len(done) == n // 10


def test_the_live_view_maps_blocks_of_parts_and_reads_the_same_rows_before_and_after_a_resume(tmp_path, monkeypatch):
    """Each commit maps a few block views and the last parts (not every part: that was quadratic over
    a run); the rows, paths and errors read through the blocks are exactly the committed ones."""
    from embedder.cache import writer

    monkeypatch.setattr(writer, "VIEW_BLOCK", 4)
    n = 300
    paths = [f"dir/img_{i:04d}.jpg" for i in range(n)]
    listing = Listing(tmp_path, paths, np.arange(n, dtype=np.int64) % 3, ["a", "b", "c"], "filelist")
    spec = CacheSpec({"model": "synthetic", "dim": "4"}, str(tmp_path), 4, layout="filelist")
    out = tmp_path / "c.h5"
    features = np.arange(n * 4, dtype=np.float32).reshape(n, 4)

    def feed(w, first, stop):
        for start in range(first, stop, 10):
            idx = np.arange(start, start + 10)
            ok = idx[idx % 4 != 0]
            w.add(ok, features[ok], [(int(i), f"reason {i}" + "!" * (i % 5)) for i in idx if i % 4 == 0])

    def check_live(w):
        with FeatureCache(out, require_complete=False) as live:
            ok = [i for i in range(n) if i % 4 and paths[i] in w.committed.paths]
            assert live.paths == [paths[i] for i in ok]
            np.testing.assert_array_equal(live.features(), features[ok])
            assert live.errors == w.committed.errors
        with h5py.File(out) as f:
            sources = f["features"].virtual_sources()
            parts = len(w.committed.files)
            assert len(sources) <= parts // 4 + 4 and parts > 8
            assert any("view-" in s.file_name for s in sources)

    with CacheWriter(out, spec, listing, commit_every=10) as w:
        feed(w, 0, 200)  # then the run is killed: no finish
        check_live(w)
    with CacheWriter(out, spec, listing, commit_every=10) as w:  # the rerun resumes and writes its blocks anew
        check_live(w)
        assert w.pending[0] == 200
        feed(w, 200, n)
        check_live(w)
        w.finish()
    with FeatureCache(out) as done:
        keep = [i for i in range(n) if i % 4]
        assert done.paths == [paths[i] for i in keep] and len(done.errors) == n // 4
        np.testing.assert_array_equal(done.features(), features[keep])
