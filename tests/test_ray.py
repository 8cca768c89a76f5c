"""`embed --backend ray` on a local Ray cluster: same bits as a local run, and resume after a kill.

Ray starts once per module (`ray.init(num_cpus=2)`); actors ask for half a CPU so the read
task is never starved on a 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
import ray  # in the `test` extra: missing, these tests must fail, not skip

from embedder.cache.reader import FeatureCache
from embedder.cache.shards import merge_cache, shards_dir
from embedder.cache.writer import CacheWriter
from embedder.cli.main import main
from embedder.data.sources import Listing, list_source
from embedder.errors import ConfigError
from embedder.extract.config import RayOptions
from embedder.extract.local import embed
from embedder.extract.ray import embed_ray
from tests.conftest import cli_args, embedder_cmd, env_with_repo, fast_config, make_tree
from tests.test_cache import assert_same_cache, assert_same_layers
from tests.test_shards import pack_uneven
from tests.torture import kill_session

OPTIONS = {"actors": 2, "cpus_per_actor": 0.5}


def test_no_cluster_at_the_address_is_one_clear_error(tree, tmp_path, monkeypatch):
    # First in the module: it needs Ray not yet started in this process (the fixture below starts it).
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    from ray._private.services import find_gcs_addresses  # what `address="auto"` looks for

    if find_gcs_addresses():
        pytest.skip("another job's Ray cluster runs on this machine: address 'auto' would join it")
    with pytest.raises(ConfigError, match="Cannot join the Ray cluster at auto.*ray start --head"):
        embed_ray(fast_config(tree, tmp_path / "c.h5"), RayOptions(address="auto", **OPTIONS))
    assert not (tmp_path / "c.h5.lock").exists()


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_backend_equals_local_backend_bit_for_bit(local_ray, tmp_path, capsys):
    src = make_tree(tmp_path / "src", per_class=7)
    (src / "fox" / "empty.jpg").write_bytes(b"")
    (src / "cat" / "garbage.png").write_bytes(b"this is not a png")
    # A --metadata table too: each actor joins its shard's rows (and the report names the unlisted path).
    table = tmp_path / "meta.csv"
    table.write_text("path,score,tag\ncat/cat_001.png,0.5,a\ndog/dog_002.jpg,1.5,b\nnowhere.jpg,1,c\n")
    local = fast_config(src, tmp_path / "local.h5", metadata=str(table))
    embed(local)

    on_ray = fast_config(src, tmp_path / "ray.h5", metadata=str(table))
    report = embed_ray(on_ray, RayOptions(shard_size=5, **OPTIONS))  # 5 rounds up to 8 = two batches of 4
    assert report.embedded == 21 and report.total_rows == 21 and len(report.errors) == 2
    assert sorted(p for p, _ in report.errors) == ["cat/garbage.png", "fox/empty.jpg"]
    assert report.metadata_unlisted_examples == ["nowhere.jpg"]
    assert_same_cache(local.out, on_ray.out)  # features in fp32, paths, labels, classes, errors, /columns
    with FeatureCache(on_ray.out) as b:
        assert "score" in b.column_names and int(b.columns(["has_metadata"])["has_metadata"].sum()) == 2
    with FeatureCache(local.out) as a, FeatureCache(on_ray.out) as b:
        assert a.fingerprint == b.fingerprint and b.attrs["shards"] == 3
    assert len(list(shards_dir(on_ray.out).glob("shard-*.done"))) == 3

    # The rerun, as a pipeline step (the same settings reach embed_ray: a different shard size would be refused).
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f"""
[[steps]]
run = "embed"
source = "{src}"
model = "resnet18"
weights = "none"
image_size = 32
precision = "fp32"
memory_layout = "contiguous"
workers = 0
batch_size = 4
out = "{on_ray.out}"
metadata = "{table}"
backend = "ray"
ray = {{ shard_size = 5, actors = 2, cpus_per_actor = 0.5 }}

[[steps]]
run = "info"
cache = "{on_ray.out}"
""")
    capsys.readouterr()
    assert main(["run", str(pipeline), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "is up to date: all 23 files of SOURCE are cached (21 rows)" in printed
    assert "view over 3 finished shards" in printed


def test_ray_backend_stores_several_layers_and_style_like_the_local_backend(local_ray, tmp_path, capsys):
    src = make_tree(tmp_path / "src", per_class=5)
    (src / "dog" / "empty.jpg").write_bytes(b"")
    multi = {"layer": "avgpool", "extra_layers": ("layer1",), "style": True, "style_dim": 32}
    local = fast_config(src, tmp_path / "local.h5", **multi)
    embed(local)

    # Through the CLI, as a user types it (Ray is running here already: the run joins it).
    on_ray = fast_config(src, tmp_path / "ray.h5", **multi)
    argv = ["embed", *cli_args(on_ray), "--layer", "layer1", "--style", "--style-dim", "32", "--backend", "ray",
            "--shard-size", "5", "--actors", "2", "--cpus-per-actor", "0.5", "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["embedded"], report["total_rows"]) == (15, 15)
    assert [e["path"] for e in report["errors"]] == ["dog/empty.jpg"]
    assert_same_layers(local.out, on_ray.out)  # every layer in fp32, paths, labels, classes, errors
    with FeatureCache(on_ray.out) as c:
        assert c.attrs["shards"] == 2 and c.layers == {"avgpool": 512, "layer1": 64, "style": 32}

    merge_cache(on_ray.out, tmp_path / "merged.h5")  # `embedder merge`: the local run's file
    assert_same_layers(local.out, tmp_path / "merged.h5")


def test_ray_backend_reads_tar_shards_one_ray_shard_per_tar_shard(local_ray, tmp_path):
    tree = make_tree(tmp_path / "imgs", per_class=5)  # 15 images
    tar_starts = pack_uneven(tree, tmp_path / "shards", sizes=[6, 5, 4])  # and a broken member: 16 rows
    local = fast_config(tmp_path / "shards", tmp_path / "local.h5")
    embed(local)
    on_ray = fast_config(tmp_path / "shards", tmp_path / "ray.h5")
    report = embed_ray(on_ray, RayOptions(shard_size=64, **OPTIONS))
    assert (report.embedded, report.total_rows) == (15, 15)
    assert [p for p, _ in report.errors] == ["00001.tar/zz_broken.jpg"]
    assert_same_cache(local.out, on_ray.out)  # features in fp32, paths, labels, errors, the .json columns
    manifest = json.loads((shards_dir(on_ray.out) / "manifest.json").read_text())
    assert manifest["bounds"] == [*tar_starts, 16]  # bounds 6 and 12 lie inside batches of 4


def _wait_for_markers(folder, n, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(folder.glob("shard-*.done"))) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {n} shards were done: {proc.stdout.read()}")
        time.sleep(0.02)
    raise AssertionError("no shard finished in time")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_killed_ray_run_resumes_to_the_same_cache(local_ray, tmp_path, kind):
    src = make_tree(tmp_path / "src", classes=("a", "b"), per_class=48, seed=5)
    if kind == "tar":  # tar shards of uneven lengths: shards cut at tar starts and inside them
        pack_uneven(src, tmp_path / "shards", sizes=[13, 30, 21, 32], broken_in=None)
        src = tmp_path / "shards"
    reference = fast_config(src, tmp_path / "reference.h5", image_size=64)
    embed(reference)

    killed = fast_config(src, tmp_path / "killed.h5", image_size=64)
    args = [*cli_args(killed), "--backend", "ray", "--shard-size", "4", "--actors", "1", "--cpus-per-actor", "0.5"]
    proc = subprocess.Popen(
        embedder_cmd("embed", *args), env=env_with_repo(), start_new_session=True,  # its own Ray, killed with it
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_for_markers(shards_dir(killed.out), 2, proc)
    finally:
        kill_session(proc.pid)
        proc.wait()
    markers = list(shards_dir(killed.out).glob("shard-*.done"))
    planned = json.loads((shards_dir(killed.out) / "manifest.json").read_text())["shards"]
    assert 2 <= len(markers) < planned, "the kill must land mid-run"

    report = embed_ray(killed, RayOptions(shard_size=4, actors=1, cpus_per_actor=0.5))
    # Finished shards were skipped; a shard whose file was complete but whose marker the kill
    # beat is not redone either (its rows count as cached).
    finished = sum(json.loads(m.read_text())["rows"] for m in markers)
    assert report.already_cached >= finished and report.already_cached + report.embedded == 96
    assert report.total_rows == 96
    assert_same_cache(reference.out, killed.out)


def test_a_shard_resumed_from_its_parts_reports_them_as_already_cached(local_ray, tmp_path):
    src = make_tree(tmp_path / "src", per_class=4)  # 12 images: shards [0, 8) and [8, 12)
    config = fast_config(src, tmp_path / "ray.h5", commit_every=4)
    options = RayOptions(shard_size=8, actors=1, cpus_per_actor=0.5)
    embed_ray(config, options)
    reference = tmp_path / "reference.h5"
    merge_cache(config.out, reference)
    # Rewind shard 0 to what a kill after its first commit leaves: one part of 4 rows, no marker.
    shard = shards_dir(config.out) / "shard-00000.h5"
    with FeatureCache(shard) as c:
        spec = c.spec  # what the shard was written with, its metadata columns included
        first, first_columns = c.features()[:4], c.columns(rows=slice(0, 4))
    listing = list_source(src)
    rows = Listing(listing.root, listing.paths[:8], listing.labels[:8], listing.classes, listing.layout)
    (shards_dir(config.out) / "shard-00000.done").unlink()
    shard.unlink()
    with CacheWriter(shard, spec, rows, commit_every=4, fixed_width_paths=True) as w:
        w.add(np.arange(4), first, [], first_columns)  # commits a part; then "the process dies"
    report = embed_ray(config, options)
    assert (report.already_cached, report.embedded) == (8, 4)  # shard 1 whole, shard 0's part; 4 new rows
    assert_same_cache(reference, config.out)
