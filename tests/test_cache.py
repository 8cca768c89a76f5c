"""The HDF5 cache: layout, resume after SIGKILL, append, refusal of mismatches, streaming reads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from embedder.cache.reader import CacheSpec, FeatureCache
from embedder.cache.writer import CacheWriter
from embedder.data.sources import list_source
from embedder.errors import AllImagesFailedError, CacheError, CacheMismatchError, ConfigError, SourceError
from embedder.extract.core import BatchReader, backbone_for, cache_spec, embed_images, known_columns
from embedder.extract.local import embed
from tests.conftest import cli_args, embedder_cmd, env_with_repo, fast_config, make_tree, write_image


def read_all(path):
    with FeatureCache(path) as c:
        return c.features(), c.paths, c.labels, c.classes, c.errors


def assert_same_cache(a, b):
    fa, pa, la, ca, ea = read_all(a)
    fb, pb, lb, cb, eb = read_all(b)
    assert pa == pb and ca == cb and ea == eb
    assert np.array_equal(la, lb)
    assert fa.dtype == fb.dtype and np.array_equal(fa, fb), "features differ"
    assert_same_columns(a, b)


def assert_same_columns(a, b):
    """The /columns of two caches: same names, kinds and values (NaN equal to NaN)."""
    with FeatureCache(a) as x, FeatureCache(b) as y:
        assert x.column_kinds == y.column_kinds
        ca, cb = x.columns(), y.columns()
    for name, kind in x.column_kinds.items():
        if kind == "str":
            assert ca[name].tolist() == cb[name].tolist(), name
        else:
            assert ca[name].dtype == cb[name].dtype, name
            assert np.array_equal(ca[name], cb[name], equal_nan=kind == "float64"), name


def assert_same_layers(a, b):
    """`assert_same_cache`, and every layer of a multi-layer cache equal bit for bit, under the same
    file fingerprint and layer list; the primary stored once (/layers/<primary> is /features)."""
    assert_same_cache(a, b)
    with FeatureCache(a) as x, FeatureCache(b) as y:
        assert x.layers == y.layers and len(x.layers) > 1 and x.file_fingerprint == y.file_fingerprint
        for name in x.layers:
            assert np.array_equal(x.layer_rows(name), y.layer_rows(name)), name
    with h5py.File(b, "r") as f:
        assert f[f"layers/{next(iter(json.loads(f.attrs['layers'])))}"].id == f["features"].id


def test_layout_attributes_and_labels(tree, tmp_path):
    out = tmp_path / "c.h5"
    report = embed(fast_config(tree, out))
    with h5py.File(out, "r") as f:
        assert f["features"].shape == (18, 512) and f["features"].dtype == np.float32
        assert f["features"].chunks is not None and f["features"].maxshape == (None, 512)
        assert f["labels"].dtype == np.int64
        assert list(f["classes"].asstr()[:]) == ["cat", "dog", "fox"]
        assert f["errors/path"].shape == (0,)
        attrs = dict(f.attrs)
    for key in ("fingerprint", "schema_version", "committed_rows", "model", "weights", "preprocessing", "layer",
                "pooling", "normalization", "precision", "memory_layout", "embedder_version", "torch_version",
                "torchvision_version"):
        assert key in attrs, key
    assert attrs["committed_rows"] == 18 and bool(attrs["complete"])
    assert attrs["fingerprint"] == report.fingerprint
    assert json.loads(attrs["preprocessing"])["crop_size"] == 32
    with FeatureCache(out) as c:
        paths, labels = c.paths, c.labels
    assert paths == sorted(paths)
    assert all(p.split("/")[0] == ["cat", "dog", "fox"][lab] for p, lab in zip(paths, labels))
    assert not (tmp_path / "c.h5.partial").exists()


def test_cli_cache_equals_python_api(tree, tmp_path):
    config = fast_config(tree, tmp_path / "cli.h5", batch_size=4)
    subprocess.run(embedder_cmd("embed", *cli_args(config)), check=True, env=env_with_repo(), capture_output=True)
    features, paths, *_ = read_all(config.out)
    backbone = backbone_for(config)
    api, errors = embed_images(backbone, [tree / p for p in paths], batch_size=4)
    assert not errors
    assert np.array_equal(features, api)


def test_rerun_does_nothing_and_says_so(tree, tmp_path):
    config = fast_config(tree, tmp_path / "c.h5")
    embed(config)
    stat = os.stat(config.out)
    report = embed(config)
    assert report.up_to_date and "Nothing to do" in report.summary()
    assert os.stat(config.out).st_mtime_ns == stat.st_mtime_ns


def test_new_files_are_appended(tree, tmp_path):
    config = fast_config(tree, tmp_path / "c.h5")
    embed(config)
    before, before_paths, *_ = read_all(config.out)
    rng = np.random.default_rng(7)
    write_image(tree / "dog" / "zzz_new.png", rng)
    write_image(tree / "eel" / "a_new.png", rng)  # a new class too
    report = embed(config)
    assert report.embedded == 2 and report.already_cached == 18
    after, after_paths, labels, classes, _ = read_all(config.out)
    assert after_paths[:18] == before_paths and after_paths[18:] == ["dog/zzz_new.png", "eel/a_new.png"]
    assert np.array_equal(after[:18], before)
    assert classes == ["cat", "dog", "eel", "fox"]
    assert [classes[i] for i in labels] == [p.split("/")[0] for p in after_paths]


def test_configuration_mismatch_is_refused_with_the_differences(tree, tmp_path):
    embed(fast_config(tree, tmp_path / "c.h5"))
    with pytest.raises(CacheMismatchError) as err:
        embed(fast_config(tree, tmp_path / "c.h5", image_size=48, normalize="l2"))
    msg = str(err.value)
    assert "preprocessing" in msg and "normalization" in msg and "--overwrite" in msg
    assert "model" not in err.value.differences
    report = embed(fast_config(tree, tmp_path / "c.h5", image_size=48, overwrite=True))
    assert report.embedded == 18


def test_foreign_file_is_not_overwritten_without_asking(tree, tmp_path):
    out = tmp_path / "c.h5"
    out.write_text("precious")
    # One output policy (embedder.outputs): a file embedder did not write is never replaced, not even
    # with --overwrite, which replaces only a cache of another configuration.
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="embedder did not write"):
            embed(fast_config(tree, out, overwrite=overwrite))
        assert out.read_text() == "precious"


def _wait_for_parts(partial, n, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(partial.glob("part-*.h5"))) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {n} parts: {proc.stdout.read()}")
        time.sleep(0.02)
    raise AssertionError("no progress")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    src = make_tree(tmp_path / "src", classes=("a", "b"), per_class=40, seed=3)
    # With --metadata, so that the user's columns go through parts, live view and resume too.
    table = tmp_path / "meta.csv"
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.*"))
    table.write_text("path,score,tag\n" + "".join(f"{p},{i * 0.5},t{i % 7}\n" for i, p in enumerate(names[::2])))
    reference = fast_config(src, tmp_path / "reference.h5", commit_every=8, image_size=64, metadata=str(table))
    embed(reference)

    killed = fast_config(src, tmp_path / "killed.h5", commit_every=8, image_size=64, metadata=str(table))
    proc = subprocess.Popen(
        embedder_cmd("embed", *cli_args(killed)), env=env_with_repo(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    _wait_for_parts(tmp_path / "killed.h5.partial", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # The file opens, says it is incomplete, and serves the committed rows.
    with h5py.File(killed.out, "r") as f:
        assert not bool(f.attrs["complete"])
    with pytest.raises(CacheError, match="incomplete"):
        FeatureCache(killed.out)
    with FeatureCache(killed.out, require_complete=False) as partial:
        n = len(partial)
        assert 0 < n < 80 and partial.committed_rows == n
        ref_features, ref_paths, *_ = read_all(reference.out)
        assert partial.paths == ref_paths[:n]
        assert np.array_equal(partial.features(), ref_features[:n])
        with FeatureCache(reference.out) as ref:  # the live view maps the parts' columns too
            assert partial.column_kinds == ref.column_kinds and "score" in partial.column_names
            for name, values in partial.columns().items():
                assert list(values) == list(ref.columns([name], slice(0, n))[name]) or name == "score", name
            assert np.array_equal(partial.columns(["score"])["score"], ref.columns(["score"], slice(0, n))["score"],
                                  equal_nan=True)

    # The parts on disk are the commit record; the view may lag them by the one commit whose
    # rename happened just before the kill.
    committed = 0
    for part in (tmp_path / "killed.h5.partial").glob("part-*.h5"):
        with h5py.File(part, "r") as f:
            committed += len(f["paths"])
    assert n <= committed < 80

    report = embed(killed)
    assert report.already_cached == committed and report.embedded == 80 - committed
    assert_same_cache(killed.out, reference.out)
    assert not (tmp_path / "killed.h5.partial").exists()


def test_interrupted_append_resumes(tree, tmp_path):
    """An append run killed after a commit leaves the old cache complete, and resumes."""
    config = fast_config(tree, tmp_path / "c.h5", commit_every=4)
    embed(fast_config(tree, tmp_path / "c.h5", limit=6))
    full = fast_config(tree, tmp_path / "full.h5")
    embed(full)
    listing = list_source(tree)
    backbone = backbone_for(config)
    spec = cache_spec(config, listing, backbone, "test")
    with CacheWriter(config.out, spec, listing, commit_every=4, columns=known_columns(listing, None)[0]) as w:
        batch = BatchReader(listing.root, listing.paths, w.pending[:4], 4, backbone.preprocessing)[0]
        feats = backbone(batch["images"]).numpy()
        # commits a part; then the "process dies" without finish()
        w.add(batch["indices"], feats, batch["errors"], batch["columns"])
    with FeatureCache(config.out) as c:
        assert len(c) == 6 and c.complete  # the old cache is untouched and usable
    report = embed(config)
    assert report.already_cached == 10 and report.embedded == 8
    assert_same_cache(config.out, full.out)


def test_second_writer_is_locked_out(tree, tmp_path):
    config = fast_config(tree, tmp_path / "c.h5")
    listing = list_source(tree)
    spec = CacheSpec({"model": "x"}, str(listing.root), 4)
    with (CacheWriter(config.out, spec, listing), pytest.raises(CacheError, match="Another embedder process"),
          CacheWriter(config.out, spec, listing)):
        pass


def test_blocks_stream_the_whole_cache(tree, tmp_path):
    out = tmp_path / "c.h5"
    embed(fast_config(tree, out))
    with FeatureCache(out) as c:
        blocks = list(c.iter_blocks(block_rows=5))
        assert [b.start for b in blocks] == [0, 5, 10, 15]
        assert np.array_equal(np.concatenate([b.features for b in blocks]), c.features())
        assert np.array_equal(np.concatenate([b.labels for b in blocks]), c.labels)


def test_float16_storage(tree, tmp_path):
    out = tmp_path / "c.h5"
    embed(fast_config(tree, out, feature_dtype="float16"))
    with FeatureCache(out) as c:
        assert c.features().dtype == np.float16 and c.components["feature_dtype"] == "float16"


def test_file_list_source_keeps_its_order_and_records_missing_files(tree, tmp_path):
    lst = tmp_path / "list.csv"
    lst.write_text(f"path,label\n{tree}/fox/fox_000.jpg,wild\nimages/cat/cat_001.png,pet\nimages/gone.jpg,pet\n")
    out = tmp_path / "c.h5"
    embed(fast_config(lst, out))
    with FeatureCache(out) as c:
        assert c.paths == ["images/fox/fox_000.jpg", "images/cat/cat_001.png"]
        assert c.classes == ["pet", "wild"] and c.labels.tolist() == [1, 0]
        assert c.errors == [("images/gone.jpg", "file not found")]


def test_split_layout_labels_by_class_folder(tmp_path):
    root = tmp_path / "hymenoptera"
    make_tree(root / "train", classes=("ants", "bees"), per_class=3)
    make_tree(root / "val", classes=("ants", "bees"), per_class=2, seed=1)
    listing = list_source(root)
    assert listing.layout == "split-imagefolder" and listing.classes == ["ants", "bees"]
    out = tmp_path / "c.h5"
    embed(fast_config(root, out))
    with FeatureCache(out) as c:
        assert len(c) == 10
        assert {p.split("/")[0] for p in c.paths} == {"train", "val"}
        assert [c.classes[i] for i in c.labels] == [p.split("/")[1] for p in c.paths]


def test_flat_folder_is_unlabelled(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(tmp_path / "flat" / f"{i}.png", rng)
    (tmp_path / "flat" / "README.txt").write_text("not an image")
    out = tmp_path / "c.h5"
    report = embed(fast_config(tmp_path / "flat", out))
    assert report.ignored == 1
    with FeatureCache(out) as c:
        assert c.labels.tolist() == [-1, -1, -1] and c.classes == []


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        embed(fast_config(tmp_path / "nowhere", tmp_path / "c.h5"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        embed(fast_config(tmp_path / "empty", tmp_path / "c.h5"))
    proc = subprocess.run(
        embedder_cmd("embed", str(tmp_path / "nowhere"), "--model", "resnet18", "--weights", "none",
                     "--out", str(tmp_path / "c.h5")),
        env=env_with_repo(), capture_output=True, text=True, check=False,
    )
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_all_files_failing_is_an_error(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"nope")
    with pytest.raises(AllImagesFailedError, match="No image"):
        embed(fast_config(bad, tmp_path / "c.h5"))
    with FeatureCache(tmp_path / "c.h5") as c:  # the reasons were kept
        assert len(c.errors) == 3


def test_workers_give_the_same_features(tree, tmp_path):
    embed(fast_config(tree, tmp_path / "w0.h5", workers=0))
    embed(fast_config(tree, tmp_path / "w2.h5", workers=2))
    assert_same_cache(tmp_path / "w0.h5", tmp_path / "w2.h5")


def test_cache_survives_being_moved(tree, tmp_path):
    embed(fast_config(tree, tmp_path / "c.h5"))
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "c.h5", tmp_path / "moved" / "c.h5")
    with FeatureCache(tmp_path / "moved" / "c.h5") as c:
        assert len(c) == 18


@pytest.mark.slow
def test_repeated_kills_at_arbitrary_moments_never_corrupt(tmp_path):
    """Kill the same run over and over at spread-out moments (during start-up, mid-batch,
    mid-commit, during consolidation): after every kill the cache file, if present, opens;
    the chain of resumes ends in the same cache as an uninterrupted run."""
    src = make_tree(tmp_path / "src", classes=("a", "b"), per_class=30, seed=5)
    reference = fast_config(src, tmp_path / "reference.h5", commit_every=4)
    embed(reference)
    config = fast_config(src, tmp_path / "killed.h5", commit_every=4)
    rng = np.random.default_rng(0)
    for delay in sorted(rng.uniform(0.3, 6.0, size=6)):
        proc = subprocess.Popen(embedder_cmd("embed", *cli_args(config)), env=env_with_repo(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if os.path.exists(config.out):
            with h5py.File(config.out, "r") as f:  # plain h5py, no embedder code involved
                rows = int(f.attrs["committed_rows"])
                assert f["features"].shape[0] == rows
                assert np.isfinite(f["features"][:]).all()
    embed(config)
    assert_same_cache(config.out, reference.out)
