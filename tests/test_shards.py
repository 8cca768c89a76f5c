"""Sharded caches without Ray: plan, per-shard embedding, the virtual view, merge, and indexes built from shards."""

from __future__ import annotations

import itertools
import json
import subprocess
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from embedder.cache.reader import CacheSpec, FeatureCache
from embedder.cache.shards import ShardSet, merge_cache, plan_shards, write_view
from embedder.cache.writer import CacheWriter
from embedder.cli.main import main
from embedder.data.sources import Listing, list_source
from embedder.errors import CacheError, CacheMismatchError
from embedder.extract.core import BatchReader, backbone_for, cache_spec, load_metadata
from embedder.extract.local import embed
from embedder.extract.ray import embed_shard
from embedder.search.build import build_index
from embedder.search.query import SearchIndex
from tests.conftest import cli_args, embedder_cmd, env_with_repo, fast_config, make_tree
from tests.test_cache import assert_same_cache, assert_same_layers
from tests.test_index import clustered
from tests.test_tar import _add


def test_plan_rounds_shards_to_whole_batches_and_covers_every_row():
    shards = plan_shards(103, shard_size=10, batch_size=4)
    assert [(s.start, s.stop) for s in shards][:3] == [(0, 12), (12, 24), (24, 36)]
    assert shards[-1].stop == 103 and all(s.start % 4 == 0 for s in shards)
    assert sum(len(s) for s in shards) == 103


def test_plan_with_breaks_never_spans_one_and_cuts_the_rest_at_batch_boundaries():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, batch, size = int(rng.integers(1, 300)), int(rng.integers(1, 9)), int(rng.integers(1, 40))
        breaks = sorted(set(rng.integers(1, n + 1, size=int(rng.integers(0, 8))).tolist()) - {n})
        shards = plan_shards(n, size, batch, breaks)
        full = -(-size // batch) * batch
        assert shards[0].start == 0 and shards[-1].stop == n
        assert [s.number for s in shards] == list(range(len(shards)))
        assert all(a.stop == b.start for a, b in itertools.pairwise(shards))
        assert set(breaks) <= {s.start for s in shards}
        for s in shards:
            assert 0 < len(s) <= full and not any(s.start < b < s.stop for b in breaks)
            assert s.start in breaks or s.start % batch == 0
        # Between two breaks, the cuts are the fewest that keep every shard within the size.
        for lo, hi in itertools.pairwise([0, *breaks, n]):
            inside = [s for s in shards if lo <= s.start < hi]
            assert len(inside) == len(range(lo - lo % batch + full, hi, full)) + 1
    assert plan_shards(103, 10, 4) == plan_shards(103, 10, 4, [])  # no breaks: the plan as it always was


def embed_sharded(config, shard_size, backbone=None):
    """What each Ray actor does, done here in turn: every shard through `embed_shard`, then the view."""
    listing = list_source(config.source)
    backbone = backbone or backbone_for(config)
    spec = cache_spec(config, listing, backbone, "test", load_metadata(config, listing))
    shard_set = ShardSet(config.out, spec, listing, shard_size, config.batch_size)
    shard_set.prepare(overwrite=config.overwrite)
    for shard in shard_set.pending():
        embed_shard(config, backbone, shard_set.job, shard_set.task(shard))
    return shard_set, shard_set.write_view()


def test_sharded_cache_equals_local_cache_and_merges_to_it(tmp_path, capsys):
    src = make_tree(tmp_path / "src", per_class=7)
    (src / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    local = fast_config(src, tmp_path / "local.h5")
    embed(local)
    sharded = fast_config(src, tmp_path / "sharded.h5")
    shard_set, (rows, complete) = embed_sharded(sharded, shard_size=6)
    assert rows == 21 and complete and len(shard_set.shards) == 3
    assert_same_cache(local.out, sharded.out)  # bit for bit, errors table included
    with FeatureCache(local.out) as a, FeatureCache(sharded.out) as b:
        assert a.fingerprint == b.fingerprint and b.h5file["features"].is_virtual
        assert b.errors == [("dog/broken.jpg", a.errors[0][1])]
    for shard in shard_set.shards:  # every shard is a normal finished cache with a marker
        marker = json.loads((shard_set.dir / f"{shard.name}.done").read_text())
        assert (marker["start"], marker["stop"]) == (shard.start, shard.stop)
        with FeatureCache(shard_set.dir / f"{shard.name}.h5") as c:
            assert c.fingerprint == marker["fingerprint"] and len(c) == marker["rows"]

    # merge, from the view and from the folder: the file a local run writes
    assert main(["merge", str(sharded.out), "--out", str(tmp_path / "merged.h5")]) == 0
    assert_same_cache(local.out, tmp_path / "merged.h5")
    merge_cache(shard_set.dir, tmp_path / "merged2.h5")
    assert_same_cache(local.out, tmp_path / "merged2.h5")
    with h5py.File(tmp_path / "merged2.h5", "r") as f:
        assert not f["features"].is_virtual and bool(f.attrs["complete"])
    # Merging again into the finished file is a rerun with nothing to do (a kill after the file
    # was in place must not need --overwrite); into a cache of another configuration, refused.
    assert merge_cache(sharded.out, tmp_path / "merged.h5") == 21
    assert_same_cache(local.out, tmp_path / "merged.h5")
    embed(fast_config(src, tmp_path / "other.h5", image_size=48))
    with pytest.raises(CacheError, match="--overwrite"):
        merge_cache(sharded.out, tmp_path / "other.h5")

    # every downstream command reads the view unchanged
    assert main(["probe", str(sharded.out), "--out", str(tmp_path / "probe"), "--json"]) == 0
    assert main(["index", str(sharded.out), "--out", str(tmp_path / "idx"), "--kind", "flat", "--quiet"]) == 0
    assert main(["search", str(tmp_path / "idx"), "--id", "0", "-k", "3"]) == 0
    assert main(["info", str(sharded.out)]) == 0
    assert "view over 3 finished shards" in capsys.readouterr().out


MULTI = {"layer": "avgpool", "extra_layers": ("layer1",), "style": True, "style_dim": 32}


def test_a_multi_layer_sharded_cache_equals_the_local_one_and_merges_to_it(tmp_path):
    src = make_tree(tmp_path / "src", per_class=5)
    (src / "cat" / "broken.png").write_bytes(b"not a png")
    local = fast_config(src, tmp_path / "local.h5", **MULTI)
    embed(local)
    sharded = fast_config(src, tmp_path / "sharded.h5", **MULTI)
    shard_set, (rows, complete) = embed_sharded(sharded, shard_size=4)
    assert rows == 15 and complete and len(shard_set.shards) == 4
    assert json.loads((shard_set.dir / "manifest.json").read_text())["layers"] == {
        "avgpool": 512, "layer1": 64, "style": 32}
    assert_same_layers(local.out, sharded.out)  # every layer bit for bit, errors table included
    with h5py.File(sharded.out, "r") as f:
        assert all(f[name].is_virtual for name in ("features", "layers/layer1", "layers/style"))
        assert f.attrs["shards"] == 4
    with FeatureCache(sharded.out, layer="style") as a, FeatureCache(local.out, layer="style") as b:
        assert a.fingerprint == b.fingerprint and a.components == b.components

    # merge, from the view and from the folder: the multi-layer file a local run writes
    merge_cache(sharded.out, tmp_path / "merged.h5")
    merge_cache(shard_set.dir, tmp_path / "merged2.h5")
    for merged in ("merged.h5", "merged2.h5"):
        assert_same_layers(local.out, tmp_path / merged)
        with h5py.File(tmp_path / merged, "r") as f:
            assert not f["layers/style"].is_virtual and "shards" not in f.attrs
    # A rerun is up to date; a layer list other than the plan's is refused, not mixed in.
    assert embed_sharded(sharded, shard_size=4)[1] == (15, True)
    with pytest.raises(CacheMismatchError, match="layers"):
        embed_sharded(fast_config(src, sharded.out, **{**MULTI, "extra_layers": ()}), shard_size=4)


def test_the_live_view_of_a_fresh_multi_layer_run_maps_every_layer(tree, tmp_path):
    config = fast_config(tree, tmp_path / "c.h5", commit_every=4, **MULTI)
    listing = list_source(tree)
    backbone = backbone_for(config)
    spec = cache_spec(config, listing, backbone, "test")
    with CacheWriter(config.out, spec, listing, commit_every=4) as w:
        rows = w.pending[:8]
        images = BatchReader(listing.root, listing.paths, rows, 8, backbone.preprocessing)[0]["images"]
        expected = {k: v.numpy() for k, v in backbone.forward_all(images).items()}
        w.add(rows, expected, [])  # 8 files: a committed part, and the view over it
        with FeatureCache(config.out, require_complete=False) as live:
            assert not live.complete and len(live) == 8 and live.layers == spec.layers
            for name, values in expected.items():
                np.testing.assert_array_equal(live.layer_rows(name), values, err_msg=name)
        with h5py.File(config.out, "r") as f:
            assert f["layers/avgpool"].id == f["features"].id and f["layers/style"].is_virtual


def test_rerun_skips_finished_shards_and_resumes_the_rest(tmp_path):
    src = make_tree(tmp_path / "src", per_class=6)
    config = fast_config(src, tmp_path / "s.h5", commit_every=4)
    shard_set, _ = embed_sharded(config, shard_size=8)
    merge_cache(config.out, tmp_path / "reference.h5")
    # Lose shard 1 entirely and shard 2's marker (as a kill mid-shard would).
    (shard_set.dir / "shard-00001.done").unlink()
    (shard_set.dir / "shard-00001.h5").unlink()
    (shard_set.dir / "shard-00002.done").unlink()
    before = (shard_set.dir / "shard-00000.h5").stat().st_mtime_ns
    shard_set, (rows, complete) = embed_sharded(config, shard_size=8)
    assert complete and rows == 18
    assert (shard_set.dir / "shard-00000.h5").stat().st_mtime_ns == before  # skipped, not rewritten
    assert_same_cache(tmp_path / "reference.h5", config.out)
    # A different plan is refused rather than mixed in.
    with pytest.raises(CacheError, match="shard-size"):
        embed_sharded(config, shard_size=12)
    # One writer per cache: a sharded run holds the lock a local run takes, and the other way round.
    with shard_set.lock(), pytest.raises(CacheError, match="Another embedder process"):
        embed(config)


def sharded_synthetic(folder: Path, X: np.ndarray, bounds: list[int]) -> tuple[Path, Path]:
    """The same vectors as one cache and as a view over shards (each written by the real writer)."""
    n, d = X.shape
    paths = [f"v{i:06d}.png" for i in range(n)]
    listing = Listing(folder, paths, np.full(n, -1, np.int64), [], "flat")
    spec = CacheSpec({"model": "synthetic", "dim": str(d)}, str(folder), d, layout="flat")
    single = folder / "single.h5"
    with CacheWriter(single, spec, listing) as w:
        w.add(np.arange(n), X, [])
        w.finish()
    files = []
    for k, (a, b) in enumerate(itertools.pairwise(bounds)):
        sub = Listing(folder, paths[a:b], listing.labels[a:b], [], "flat")
        files.append(folder / f"shard-{k}.h5")
        with CacheWriter(files[-1], spec, sub, fixed_width_paths=True) as w:
            w.add(np.arange(b - a), X[a:b], [])
            w.finish()
    view = folder / "view.h5"
    write_view(view, spec, [], files, complete=True)
    return single, view


@pytest.mark.parametrize("kind", ["ivf", "ivfsq", "ivfpq"])
def test_index_from_shards_on_disk_gives_the_same_neighbours(tmp_path, kind):
    X = clustered(n=6000, d=32, seed=1)
    single, view = sharded_synthetic(tmp_path, X, [0, 1500, 2600, 4100, 6000])
    a = build_index(single, tmp_path / "a", kind=kind, metric="l2", progress=False)
    b = build_index(view, tmp_path / "b", kind=kind, metric="l2", progress=False, on_disk=True)
    assert b["on_disk"] and b["params"]["on_disk_shards"] == 4 and not a["on_disk"]
    assert a["params"] == {k: v for k, v in b["params"].items() if k != "on_disk_shards"}
    assert (tmp_path / "b" / "lists.ivfdata").exists() and not list((tmp_path / "b").glob("shard-*"))
    moved = tmp_path / "moved"
    (tmp_path / "b").rename(moved)  # the lists are found next to the index, wherever it goes
    ia, ib = SearchIndex.open(tmp_path / "a"), SearchIndex.open(moved)
    Q = clustered(n=50, d=32, seed=2)
    for ha, hb in zip(ia.search(Q, 10), ib.search(Q, 10)):
        assert [h.id for h in ha] == [h.id for h in hb]
        assert [h.score for h in ha] == [h.score for h in hb]
    assert [h.id for h in ib.search_ids([123], 5)[0]] == [h.id for h in ia.search_ids([123], 5)[0]]


def test_on_disk_is_chosen_when_the_index_exceeds_the_budget(tmp_path):
    X = clustered(n=3000, d=16)
    _, view = sharded_synthetic(tmp_path, X, [0, 1000, 3000])
    meta = build_index(view, tmp_path / "i", kind="ivf", metric="l2", memory_budget=100_000, progress=False)
    assert meta["on_disk"] and "on disk" in meta["why"] and meta["params"]["on_disk_shards"] == 2
    with pytest.raises(Exception, match="ivf, ivfsq or ivfpq"):
        build_index(view, tmp_path / "h", kind="hnsw", on_disk=True, progress=False)


def test_ray_backend_without_ray_says_how_to_install_it(tree, tmp_path):
    config = fast_config(tree, tmp_path / "c.h5")
    args = ["embed", *cli_args(config), "--backend", "ray"]
    code = f"import sys; sys.modules['ray'] = None; from embedder.cli.main import main; sys.exit(main({args!r}))"
    proc = subprocess.run([embedder_cmd()[0], "-c", code], env=env_with_repo(), capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "pip install 'embedder[ray]'" in proc.stderr, proc.stderr
    assert not (tmp_path / "c.h5").exists()


def test_pipeline_ray_settings_are_validated_before_anything_runs(tmp_path):
    from embedder.cli.pipeline import load_pipeline
    from embedder.errors import ConfigError

    step = '[[steps]]\nrun = "embed"\nsource = "s"\nmodel = "resnet18"\nout = "o.h5"\nbackend = "ray"\n'
    (tmp_path / "bad.toml").write_text(step + 'ray = { shard_size = 8, gpus = 1 }\n')
    with pytest.raises(ConfigError, match=r"Unknown ray setting 'gpus'\. Did you mean 'gpus_per_actor'\?"):
        load_pipeline(tmp_path / "bad.toml")
    (tmp_path / "good.toml").write_text(step + 'ray = { shard_size = 8, gpus_per_actor = 1 }\n')
    assert [s.kind for s in load_pipeline(tmp_path / "good.toml")[1]] == ["embed"]


def pack_uneven(tree, folder, sizes, broken_in: int | None = 1) -> list[int]:
    """The tree's images as tar shards of `sizes` samples, in order, each sample with a .json (its
    label and a caption), plus a member that does not decode in shard `broken_in`. Returns each
    shard's first listing row."""
    files = sorted(p for p in tree.rglob("*.*") if p.is_file())
    assert sum(sizes) == len(files)
    folder.mkdir(parents=True)
    starts, row, taken = [], 0, 0
    for k, size in enumerate(sizes):
        starts.append(row)
        with tarfile.open(folder / f"{k:05d}.tar", "w") as tar:
            for f in files[taken : taken + size]:
                _add(tar, f.name, f.read_bytes())
                _add(tar, f"{f.stem}.json", json.dumps({"label": f.parent.name, "caption": f"a {f.stem}"}).encode())
            if k == broken_in:
                _add(tar, "zz_broken.jpg", b"these bytes are no image")
        taken += size
        row += size + (k == broken_in)
    return starts


class Recording:
    """The backbone, keeping each batch it is fed; `dies_at`: raises at that batch instead, as a
    killed worker stops (its shard's committed parts stay, and it has no marker)."""

    class Killed(Exception):
        pass

    def __init__(self, backbone, dies_at=None):
        self._backbone, self.dies_at, self.batches = backbone, dies_at, []

    def __getattr__(self, name):
        return getattr(self._backbone, name)

    def forward_all(self, images):
        if self.dies_at is not None and len(self.batches) == self.dies_at:
            raise self.Killed
        self.batches.append(images.numpy().tobytes())
        return self._backbone.forward_all(images)


def local_batches(listing, backbone, batch_size) -> set[bytes]:
    """The batches a local run feeds the network: the listing's rows in slices of the batch size."""
    reader = BatchReader(listing.root, listing.paths, np.arange(len(listing)), batch_size, backbone.preprocessing,
                         members=listing.members)
    return {reader[b]["images"].numpy().tobytes() for b in range(len(reader))}


def test_tar_shards_are_the_shards_and_embed_bit_for_bit_as_locally(tmp_path):
    tree = make_tree(tmp_path / "imgs", per_class=7)  # 21 images
    tar_starts = pack_uneven(tree, tmp_path / "shards", sizes=[5, 3, 10, 3])  # + a broken member: 22 rows
    local = fast_config(tmp_path / "shards", tmp_path / "local.h5")
    embed(local)
    sharded = fast_config(tmp_path / "shards", tmp_path / "sharded.h5")
    backbone = Recording(backbone_for(sharded))
    shard_set, (rows, complete) = embed_sharded(sharded, shard_size=6, backbone=backbone)  # 6 -> 8 rows, 2 batches
    assert complete and rows == 21
    assert_same_cache(local.out, sharded.out)  # features, paths, labels, classes, errors, the .json columns
    with FeatureCache(sharded.out) as c:
        assert c.errors[0][0] == "00001.tar/zz_broken.jpg" and "caption" in c.column_names
        assert c.columns(["has_metadata"])["has_metadata"].all()

    # Every tar shard begins a shard; no shard spans two; the 10-row one is cut where batches begin.
    bounds = [(s.start, s.stop) for s in shard_set.shards]
    assert {a for a, _ in bounds} >= set(tar_starts) and bounds[-1][1] == 22
    for a, b in bounds:
        assert 0 < b - a <= 8 and not any(a < t < b for t in tar_starts)
        assert a in tar_starts or a % 4 == 0
    assert len(bounds) == len(tar_starts) + 1 and any(a % 4 for a, _ in bounds)  # some bounds lie inside batches
    for k, (a, b) in enumerate(bounds):
        with FeatureCache(shard_set.dir / f"shard-{k:05d}.h5") as c:
            names = c.paths + [p for p, _ in c.errors]
            assert len(names) == b - a and len({p.split("/")[0] for p in names}) == 1  # one tar shard's rows
    # The network saw the local run's very batches: each of them, and no other.
    assert set(backbone.batches) == local_batches(list_source(local.source), backbone, 4)
    assert len(backbone.batches) > len(local_batches(list_source(local.source), backbone, 4))  # some twice


def test_a_killed_tar_shard_resumes_on_the_batch_grid_and_a_changed_plan_is_refused(tmp_path):
    tree = make_tree(tmp_path / "imgs", per_class=7)
    pack_uneven(tree, tmp_path / "shards", sizes=[5, 3, 10, 3])  # shards [0,5) [5,9) [9,16) [16,19) [19,22)
    reference = fast_config(tmp_path / "shards", tmp_path / "reference.h5")
    embed(reference)
    config = fast_config(tmp_path / "shards", tmp_path / "s.h5", commit_every=1)  # a commit after every batch
    listing = list_source(config.source)
    backbone = backbone_for(config)
    spec = cache_spec(config, listing, backbone, "test", load_metadata(config, listing))
    shard_set = ShardSet(config.out, spec, listing, 6, config.batch_size)
    shard_set.prepare()
    dying = Recording(backbone, dies_at=1)  # shard 2 reads batches [8,12) [12,16): it dies at the second
    with pytest.raises(Recording.Killed):
        embed_shard(config, dying, shard_set.job, shard_set.task(shard_set.shards[2]))
    assert not (shard_set.dir / "shard-00002.done").exists()

    again = Recording(backbone)
    shard_set, (rows, complete) = embed_sharded(config, 6, backbone=again)
    assert complete and rows == 21
    assert_same_cache(reference.out, config.out)
    marker = json.loads((shard_set.dir / "shard-00002.done").read_text())
    assert (marker["resumed"], marker["embedded"]) == (3, 4)  # rows 9-11 were committed; 12-15 are new
    assert set(again.batches) <= local_batches(listing, backbone, 4)  # the resumed shard too: [12,16)

    # The same plan or none: another shard size, or a folder planned otherwise, is refused saying what differs.
    with pytest.raises(CacheError, match="shard_size was 8, this run has 12"):
        embed_sharded(fast_config(tmp_path / "shards", config.out), 12)
    manifest = json.loads((shard_set.dir / "manifest.json").read_text())
    assert manifest["bounds"] == [0, 5, 9, 16, 19, 22]
    manifest["bounds"] = [0, 4, 9, 16, 19, 22]  # as a plan made otherwise (another version) would be
    (shard_set.dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"shard 0 was rows \[0, 4\), this run plans \[0, 5\)"):
        embed_sharded(config, 6)
