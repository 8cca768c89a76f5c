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
