"""Caches and indexes that follow their source: a rerun of `embed` syncs (new, changed, gone, unchanged),
readers see live rows, `compact` equals a fresh embed, and `index --update` drops superseded rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.search.query import SearchIndex
from tests.conftest import cli_args, fast_config, make_tree, write_image


def _embed(capsys, tree: Path, out: Path, *extra: str) -> dict:
    assert main(["embed", *cli_args(fast_config(tree, out)), *extra, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _change(tree: Path) -> dict[str, str]:
    """One file rewritten (new pixels, size and mtime), one deleted, one added. Returns {kind: path}."""
    rng = np.random.default_rng(7)
    changed = tree / "cat" / "cat_001.png"
    write_image(changed, rng, size=(50, 50))
    os.utime(changed, (1.6e9, 1.6e9))
    (tree / "dog" / "dog_002.jpg").unlink()
    write_image(tree / "fox" / "fox_100.png", rng)
    return {"changed": "cat/cat_001.png", "gone": "dog/dog_002.jpg", "new": "fox/fox_100.png"}


def _datasets(path: Path) -> dict[str, np.ndarray]:
    """Every row dataset of a cache, read with plain h5py (what bit-equality compares)."""
    with h5py.File(path, "r") as f:
        out = {name: f[name][()] for name in ("features", "labels", "paths", "classes", "errors/path", "errors/reason")}
        out.update({f"columns/{n}": ds[()] for n, ds in f["columns"].items()})
        out["row_state" in f and "row_state" or "no_row_state"] = f["row_state"][()] if "row_state" in f else None
    return out


def test_changed_gone_and_new_files_in_one_rerun_then_compact_equals_a_fresh_embed(tmp_path, capsys):
    tree, out = make_tree(tmp_path / "images"), tmp_path / "c.h5"
    first = _embed(capsys, tree, out)
    assert first["sync"] == {"new": 18, "changed": 0, "gone": 0, "unchanged": 0}
    with FeatureCache(out) as cache:
        old_changed = cache.features()[cache.paths.index("cat/cat_001.png")]
    kinds = _change(tree)

    report = _embed(capsys, tree, out)
    assert report["sync"] == {"new": 1, "changed": 1, "gone": 1, "unchanged": 16}
    assert report["embedded"] == 2 and report["total_rows"] == 18
    with FeatureCache(out) as live, FeatureCache(out, live=False) as stored:
        assert len(live) == 18 and len(stored) == 20
        assert sorted(live.paths) == sorted(set(live.paths))  # one live row per path
        assert kinds["gone"] not in live.paths and kinds["new"] in live.paths
        new_changed = live.features()[live.paths.index(kinds["changed"])]
        assert not np.array_equal(new_changed, old_changed)
        state = stored.row_state
        assert state.tolist().count(1) == 1 and state.tolist().count(2) == 1
        assert stored.paths[int(np.flatnonzero(state == 1)[0])] == kinds["changed"]
        assert stored.paths[int(np.flatnonzero(state == 2)[0])] == kinds["gone"]
        # iter_blocks and block reads see the same live rows as features()
        blocks = np.concatenate([b.features for b in live.iter_blocks(5)])
        assert np.array_equal(blocks, live.features()) and len(live.labels) == 18
    # a rerun with nothing changed is up to date and writes nothing
    before = out.stat().st_mtime_ns
    again = _embed(capsys, tree, out)
    assert again["sync"] == {"new": 0, "changed": 0, "gone": 0, "unchanged": 18} and again["embedded"] == 0
    assert out.stat().st_mtime_ns == before

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["rows"], info["stored_rows"], info["superseded"], info["removed"]) == (18, 20, 1, 1)

    assert main(["compact", str(out)]) == 0
    capsys.readouterr()
    fresh = tmp_path / "fresh.h5"
    _embed(capsys, tree, fresh)
    got, want = _datasets(out), _datasets(fresh)
    assert set(got) == set(want)
    for name in want:
        assert np.array_equal(got[name], want[name]) if want[name] is not None else got[name] is None, name


def test_hash_compares_the_bytes_not_the_mtime(tmp_path, capsys):
    tree, out = make_tree(tmp_path / "images", per_class=2), tmp_path / "c.h5"
    assert _embed(capsys, tree, out, "--hash")["sync"]["new"] == 6
    with FeatureCache(out) as cache:
        assert all(len(h) == 64 for h in cache.columns(["sha256"])["sha256"])
    touched = tree / "cat" / "cat_000.jpg"
    os.utime(touched, (1.7e9, 1.7e9))  # same bytes, new mtime: unchanged by hash
    edited = tree / "dog" / "dog_001.png"
    st = edited.stat()
    data = bytearray(edited.read_bytes())
    write_image(edited, np.random.default_rng(3), size=(40, 30))
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))  # new bytes, same mtime
    assert bytes(data) != edited.read_bytes()
    report = _embed(capsys, tree, out)  # the cache stores hashes: it keeps comparing them without --hash
    assert report["sync"] == {"new": 0, "changed": 1, "gone": 0, "unchanged": 5}
    with FeatureCache(out, live=False) as stored:
        assert stored.paths[int(np.flatnonzero(stored.row_state == 1)[0])] == "dog/dog_001.png"


def test_a_rerun_whose_only_change_is_a_gone_file_marks_it_removed(tmp_path, capsys):
    tree, out = make_tree(tmp_path / "images", per_class=2), tmp_path / "c.h5"
    _embed(capsys, tree, out)
    (tree / "fox" / "fox_000.jpg").unlink()
    report = _embed(capsys, tree, out)
    assert report["sync"]["gone"] == 1 and report["embedded"] == 0 and report["total_rows"] == 5
    with FeatureCache(out) as cache:
        assert "fox/fox_000.jpg" not in cache.paths and len(cache) == 5


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_update_follows_a_synced_cache_and_never_returns_a_superseded_vector(tmp_path, capsys, kind):
    tree, out, idx = make_tree(tmp_path / "images"), tmp_path / "c.h5", tmp_path / "idx"
    _embed(capsys, tree, out)
    assert main(["index", str(out), "--out", str(idx), "--kind", kind, "--quiet"]) == 0
    capsys.readouterr()
    kinds = _change(tree)
    _embed(capsys, tree, out)
    assert main(["info", str(idx), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out_of_step"]  # the cache moved on

    assert main(["index", str(out), "--out", str(idx), "--update", "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows_added"] == 2 and report["rows_removed"] == 2
    assert main(["info", str(idx), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["out_of_step"] is None and doc["searchable"] == 18
    with FeatureCache(out, live=False) as stored:
        dead = set(np.flatnonzero(stored.row_state).tolist())
        queries = stored.features()
    index = SearchIndex(idx)
    hits = index.search(queries, k=20)
    returned = {h.id for row in hits for h in row}
    assert returned and not returned & dead
    assert {index.paths[i] for i in returned} == set(index.paths) - {kinds["gone"]}
    # a fresh build on the synced cache hides the same rows
    fresh_idx = tmp_path / "fresh_idx"
    assert main(["index", str(out), "--out", str(fresh_idx), "--kind", kind, "--quiet"]) == 0
    capsys.readouterr()
    assert not {h.id for row in SearchIndex(fresh_idx).search(queries, k=20) for h in row} & dead
    # a gone-only sync: the update removes without adding
    (tree / "cat" / "cat_000.jpg").unlink()
    _embed(capsys, tree, out)
    assert main(["index", str(out), "--out", str(idx), "--update", "--quiet", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["rows_added"] == 0 and again["rows_removed"] == 1
    assert "cat/cat_000.jpg" not in {SearchIndex(idx).paths[h.id] for row in SearchIndex(idx).search(queries, k=20)
                                     for h in row}


def test_readers_see_live_rows_only(tmp_path, capsys):
    tree, out = make_tree(tmp_path / "images"), tmp_path / "c.h5"
    _embed(capsys, tree, out)
    kinds = _change(tree)
    _embed(capsys, tree, out)
    parquet = tmp_path / "vectors"
    assert main(["export-vectors", str(out), "--out", str(parquet), "--quiet"]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(parquet / "embeddings.parquet")
    paths = table.column("path").to_pylist() if "path" in table.column_names else []
    assert table.num_rows == 18 and kinds["gone"] not in paths
    assert main(["dedup", str(out), "--json"]) == 0
    assert kinds["gone"] not in capsys.readouterr().out


def _watcher(tmp_path: Path, tree: Path, *extra: str):
    import subprocess

    from tests.conftest import embedder_cmd, env_with_repo

    flags = cli_args(fast_config(tree, tmp_path / "c.h5"))
    argv = embedder_cmd("watch", *flags, "--index", str(tmp_path / "idx"), "--settle", "0.3", "--json", *extra)
    # Ctrl-C must reach it as at a terminal: a suite started in the background (`cmd &` without job
    # control, nohup) ignores SIGINT, an ignored signal stays ignored across exec, and Python then never
    # raises KeyboardInterrupt. A handled one is reset to the default: so handle it while starting the child.
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_repo())
    finally:
        signal.signal(signal.SIGINT, previous)


def _next_sync(proc) -> dict:
    line = proc.stdout.readline()
    assert line, proc.stderr.read()[-3000:]
    return json.loads(line)


def _add(tree: Path, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        # written under a hidden name and renamed in, as a copy tool does, then touched again
        tmp = tree / "fox" / f".{name}.part"
        write_image(tmp, rng, fmt="PNG")
        os.replace(tmp, tree / "fox" / name)


@pytest.mark.slow
@pytest.mark.parametrize("poll", [False, True])
def test_watch_keeps_cache_and_index_in_step_and_a_kill_9_loses_nothing(tmp_path, poll):
    import signal
    import time

    tree = make_tree(tmp_path / "images", per_class=2)
    proc = _watcher(tmp_path, tree, *(["--poll", "--interval", "0.2"] if poll else []))
    try:
        first = _next_sync(proc)
        assert first["sync"]["new"] == 6 and first["events"] == ("polling" if poll else "events")
        _add(tree, ["w1.png", "w2.png"], seed=1)
        (tree / "cat" / "cat_000.jpg").unlink()
        seen = {"new": 0, "gone": 0}
        while seen["new"] < 2 or seen["gone"] < 1:  # the events may arrive in one sync or two
            report = _next_sync(proc)
            seen = {k: seen[k] + report["sync"][k] for k in seen}
        index = SearchIndex(tmp_path / "idx")
        live = [p for i, p in enumerate(index.paths) if not index.is_removed(i)]
        assert {"fox/w1.png", "fox/w2.png"} <= set(live) and "cat/cat_000.jpg" not in live
        # more arrive, and the watcher is killed while it settles or syncs them (whichever: nothing may be lost)
        _add(tree, ["w3.png", "w4.png"], seed=3)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    # while nobody watches: one more arrives; the next watch catches up, no path twice
    _add(tree, ["w5.png"], seed=2)
    again = _watcher(tmp_path, tree)
    try:
        catch_up = _next_sync(again)
        assert catch_up["sync"]["gone"] == 0 and 1 <= catch_up["sync"]["new"] <= 3
    finally:
        again.send_signal(signal.SIGINT)  # Ctrl-C
        again.wait(timeout=60)
    on_disk = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.*") if not p.name.startswith("."))
    with FeatureCache(tmp_path / "c.h5") as cache:
        assert sorted(cache.paths) == on_disk and len(on_disk) == 10
    index = SearchIndex(tmp_path / "idx")
    assert sorted(p for i, p in enumerate(index.paths) if not index.is_removed(i)) == on_disk


def test_python_api_sync_reports_the_four_kinds_and_updates_the_index(tmp_path):
    import embedder

    tree, out, idx = make_tree(tmp_path / "images", per_class=2), tmp_path / "c.h5", tmp_path / "idx"
    first = embedder.sync(fast_config(tree, out), idx)
    assert first.counts == {"new": 6, "changed": 0, "gone": 0, "unchanged": 0} and first.index["ntotal"] == 6
    (tree / "dog" / "dog_001.png").unlink()
    write_image(tree / "dog" / "dog_009.png", np.random.default_rng(4))
    second = embedder.sync(fast_config(tree, out), idx)
    assert second.counts == {"new": 1, "changed": 0, "gone": 1, "unchanged": 5}
    assert second.index["rows_added"] == 1 and second.index["rows_removed"] == 1
    assert "1 new" in second.summary() and second.as_dict()["sync"] == second.counts


def test_ray_backend_refuses_sync_options_in_one_line(tmp_path, capsys):
    tree = make_tree(tmp_path / "images", per_class=1)
    code = main(["embed", *cli_args(fast_config(tree, tmp_path / "c.h5")), "--backend", "ray", "--hash"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "without --backend ray" in err[0]


def test_a_rerun_with_limit_syncs_changes_but_removes_nothing_it_did_not_list(tmp_path, capsys):
    tree, out = make_tree(tmp_path / "images", per_class=2), tmp_path / "c.h5"
    _embed(capsys, tree, out)
    write_image(tree / "cat" / "cat_000.jpg", np.random.default_rng(9), size=(33, 33))
    os.utime(tree / "cat" / "cat_000.jpg", (1.4e9, 1.4e9))
    report = _embed(capsys, tree, out, "--limit", "2")
    assert report["sync"] == {"new": 0, "changed": 1, "gone": 0, "unchanged": 1} and report["total_rows"] == 6


def test_curate_with_the_index_of_a_synced_cache_scores_its_live_rows(tmp_path, capsys):
    tree, out, idx = make_tree(tmp_path / "images"), tmp_path / "c.h5", tmp_path / "idx"
    _embed(capsys, tree, out)
    _change(tree)
    _embed(capsys, tree, out)
    assert main(["index", str(out), "--out", str(idx), "--kind", "flat", "--quiet"]) == 0
    assert main(["curate", str(out), "--out", str(tmp_path / "with"), "--index", str(idx), "--json"]) == 0
    assert main(["curate", str(out), "--out", str(tmp_path / "without"), "--json"]) == 0
    capsys.readouterr()
    import pyarrow.parquet as pq

    with_index = pq.read_table(tmp_path / "with" / "scores.parquet").to_pydict()
    without = pq.read_table(tmp_path / "without" / "scores.parquet").to_pydict()
    assert len(with_index["path"]) == 18 and with_index["path"] == without["path"]
    assert np.allclose(with_index["uniqueness"], without["uniqueness"], atol=1e-5)


@pytest.mark.slow
def test_the_service_answers_across_generations_while_watch_adds_images(tmp_path):
    """`embedder serve` on the index a watch keeps in step: every request answered 200 while the
    generations change, and each new image found by the service once its sync is published."""
    import threading
    import urllib.request

    from embedder.search.watch import watch
    from embedder.serve.app import create_app
    from tests.loopback import running

    tree, out, idx = make_tree(tmp_path / "images", per_class=2), tmp_path / "c.h5", tmp_path / "idx"
    config = fast_config(tree, out)
    stop, synced = threading.Event(), []
    watcher = threading.Thread(target=watch, args=(config, idx),
                               kwargs={"quiet": 0.2, "stop": stop, "on_sync": lambda r, m: synced.append(r)})
    watcher.start()
    statuses: list[int] = []

    def ask(vector) -> dict:
        body = json.dumps({"vector": [float(v) for v in vector], "k": 3}).encode()
        request = urllib.request.Request(f"{base}/search/vector", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                statuses.append(r.status)
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            statuses.append(e.code)
            return {}

    try:
        while not synced:
            assert watcher.is_alive(), "watch ended before its first sync"
            threading.Event().wait(0.1)
        with FeatureCache(out) as cache:
            probe = cache.features(slice(0, 1))[0]
        with running(create_app(idx)) as (host, port):
            base = f"http://{host}:{port}"
            loading = threading.Event()

            def load():
                while not loading.is_set():
                    ask(probe)

            client = threading.Thread(target=load)
            client.start()
            try:
                for n in range(3):
                    _add(tree, [f"s{n}.png"], seed=10 + n)
                    name = f"fox/s{n}.png"
                    for _ in range(600):  # until the new generation is served (bounded: 60 s)
                        with FeatureCache(out) as cache:
                            vector = cache.features()[cache.paths.index(name)] if name in cache.paths else None
                        hits = ask(vector).get("hits", []) if vector is not None else []
                        if hits and hits[0]["path"] == name:
                            break
                        threading.Event().wait(0.1)
                    else:
                        pytest.fail(f"the service never returned {name}")
            finally:
                loading.set()
                client.join()
    finally:
        stop.set()
        watcher.join()
    assert statuses and set(statuses) == {200}, sorted(set(statuses))


def test_a_failed_file_modified_since_is_read_again(tmp_path, capsys):
    tree, out = make_tree(tmp_path / "images", per_class=2), tmp_path / "c.h5"
    broken = tree / "cat" / "late.png"
    broken.write_bytes(b"half a png")  # e.g. a copy still in progress when it was read
    first = _embed(capsys, tree, out)
    assert [e["path"] for e in first["errors"]] == ["cat/late.png"]
    assert _embed(capsys, tree, out)["embedded"] == 0  # unchanged since: not read again
    write_image(broken, np.random.default_rng(2), fmt="PNG")
    os.utime(broken, (out.stat().st_mtime + 5, out.stat().st_mtime + 5))
    report = _embed(capsys, tree, out)
    assert report["sync"]["changed"] == 1 and report["embedded"] == 1 and not report["errors"]
    with FeatureCache(out) as cache:
        assert "cat/late.png" in cache.paths and cache.errors == []


def test_the_live_view_reads_many_rows_the_same_as_the_stored_ones(tmp_path):
    """Past 1,024 rows the live view reads a span and picks rows in memory: the same values."""
    from embedder.cache.reader import CacheSpec
    from embedder.cache.sync import SyncOptions
    from embedder.cache.writer import CacheWriter
    from embedder.data.sources import Listing

    n, out = 6000, tmp_path / "c.h5"
    names = [f"v{i:05d}.png" for i in range(n)]
    X = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
    spec = CacheSpec({"model": "synthetic"}, str(tmp_path), 4, layout="flat", columns={"size": "int64"})
    listing = Listing(tmp_path, names, np.full(n, -1, np.int64), [], "flat")
    with CacheWriter(out, spec, listing, commit_every=10**9) as w:
        w.add(np.arange(n), X, [], columns={"size": np.arange(n)})
        w.finish()
    kept = Listing(tmp_path, names[::3], np.full(len(names[::3]), -1, np.int64), [], "flat")
    with CacheWriter(out, spec, kept, sync=SyncOptions()) as w:  # the others are gone
        w.finish()
    with FeatureCache(out) as live:
        assert len(live) == 2000 and live.paths == names[::3]
        assert np.array_equal(live.features(), X[::3])
        assert np.array_equal(live.features(np.arange(5, 1900)), X[::3][5:1900])  # a span
        assert np.array_equal(live.features(np.arange(5, 900, 7)), X[::3][5:900:7])  # points
        assert np.array_equal(live.columns(["size"])["size"], np.arange(n)[::3])
        assert np.array_equal(np.concatenate([b.features for b in live.iter_blocks(128)]), X[::3])


def test_after_compaction_the_index_says_rebuild_and_update_refuses(tmp_path, capsys):
    tree, out, idx = make_tree(tmp_path / "images", per_class=2), tmp_path / "c.h5", tmp_path / "idx"
    _embed(capsys, tree, out)
    (tree / "dog" / "dog_000.jpg").unlink()
    _embed(capsys, tree, out)
    assert main(["index", str(out), "--out", str(idx), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["compact", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"] == 1
    assert main(["info", str(idx), "--json"]) == 0
    assert "rebuild" in json.loads(capsys.readouterr().out)["out_of_step"]
    assert main(["index", str(out), "--out", str(idx), "--update", "--quiet"]) == 2
    assert "Rebuild without --update" in capsys.readouterr().err


def test_a_ray_rerun_on_a_changed_source_is_refused_in_one_line(tmp_path, capsys):
    tree, out = make_tree(tmp_path / "images", per_class=1), tmp_path / "c.h5"
    _embed(capsys, tree, out)
    (tree / "cat" / "cat_000.jpg").unlink()
    code = main(["embed", *cli_args(fast_config(tree, out)), "--backend", "ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "0 files of SOURCE changed and 1 are gone" in err[0]


class _GuardedSet(set):
    """A set that fails when iterated without its owner's lock held: the observer's thread adds
    paths while `settle` waits, so reading the live set unlocked is the race CI once hit."""

    def __init__(self, lock):
        super().__init__()
        self.guard = lock

    def __iter__(self):
        assert self.guard.locked(), "the arrivals set was iterated without its lock"
        return super().__iter__()


def test_settle_reads_the_arrivals_under_their_lock_and_returns_what_was_touched(tmp_path):
    import threading

    from embedder.search.watch import _Arrivals, settle

    arrivals = _Arrivals()
    arrivals.paths = _GuardedSet(arrivals.lock)
    image = tmp_path / "a.png"
    write_image(image, np.random.default_rng(1))
    arrivals.touch(str(image), str(tmp_path / "gone.png"))
    taken = settle(arrivals, 0.05, threading.Event())
    assert taken == {str(image), str(tmp_path / "gone.png")}
    assert arrivals.snapshot()[0] == frozenset()
