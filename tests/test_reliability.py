"""Failures a user can meet, and what they cost: nothing lost, one clear line, nothing left behind.

Locks (live vs dead holders), leftovers of killed runs, a full disk (a real tmpfs), read-only
output, concurrent readers during a run, ambiguous layouts, file names that are not UTF-8.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from embedder.atomic import WriteLock, lock_holder, publish_dir, remove_leftovers, temp_dir
from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.data.sources import HIDDEN, NOT_IMAGE, OUTSIDE_CLASSES, SAME_FILE, list_source
from embedder.errors import CacheError, SourceError
from embedder.extract.local import embed
from embedder.names import display_path, encode_path
from embedder.search.build import build_index
from tests.conftest import cli_args, embedder_cmd, env_with_repo, fast_config, make_tree, write_image
from tests.test_corpus import as_user


def _cache(path):
    with FeatureCache(path) as c:
        return c.features(), c.paths, c.labels.tolist(), c.errors


def assert_same(a, b):
    fa, pa, la, ea = _cache(a)
    fb, pb, lb, eb = _cache(b)
    assert (pa, la, ea) == (pb, lb, eb)
    assert np.array_equal(fa, fb)


# ---------------------------------------------------------------------------------- locks


def _hold_lock_in_child(out: Path, fork_reader: bool = False):
    """A separate process that takes `out`'s write lock (and optionally forks a long-lived child,
    as DataLoader workers are), then waits to be killed."""
    code = (
        "import os, sys, time\n"
        "from embedder.atomic import WriteLock\n"
        f"lock = WriteLock({str(out)!r}); lock.acquire()\n"
        f"if {fork_reader} and os.fork() == 0:\n"
        "    time.sleep(30); os._exit(0)\n"
        "print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=env_with_repo(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_lock_is_refused_at_once_with_the_holders_pid(tmp_path):
    out = tmp_path / "c.h5"
    proc = _hold_lock_in_child(out)
    try:
        assert lock_holder(out) == proc.pid
        # Refused, not waited for: a waiting acquire would block until the holder ends (60 s), then succeed.
        with pytest.raises(CacheError, match=f"pid {proc.pid}"):
            WriteLock(out).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holders_lock_is_free_at_once_even_with_forked_children_alive(tmp_path):
    out = tmp_path / "c.h5"
    proc = _hold_lock_in_child(out, fork_reader=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock_holder(out) is None  # its forked child lives on, but holds no record lock
    with WriteLock(out):
        assert lock_holder(out) == os.getpid()
    assert not (tmp_path / "c.h5.lock").exists()


def test_one_process_cannot_lock_twice_and_checking_does_not_release(tmp_path):
    out = tmp_path / "c.h5"
    with WriteLock(out):
        with pytest.raises(CacheError, match="this very process"):
            WriteLock(out).acquire()
        lock_holder(out)  # must not open (and close) the file: that would drop a POSIX lock
        proc = subprocess.run([sys.executable, "-c", (f"from embedder.atomic import lock_holder; "
                               f"print(lock_holder({str(out)!r}))")], env=env_with_repo(), capture_output=True,
                              text=True, check=False)
        assert proc.stdout.strip() == str(os.getpid())


def test_a_cache_being_written_is_reported_live_not_interrupted(tree, tmp_path):
    from embedder.cache.reader import CacheSpec
    from embedder.cache.writer import CacheWriter

    config = fast_config(tree, tmp_path / "c.h5", commit_every=4)
    listing = list_source(tree)
    spec = CacheSpec({"model": "x"}, str(listing.root), 4)
    with CacheWriter(config.out, spec, listing, commit_every=4):  # a fresh run: the view is there, incomplete
        with pytest.raises(CacheError, match="still being written by a running embedder process"):
            FeatureCache(config.out)
        info = subprocess.run(embedder_cmd("info", config.out), env=env_with_repo(), capture_output=True, text=True,
                              check=False)
        assert f"being written right now by embedder pid {os.getpid()}" in info.stdout
    with pytest.raises(CacheError, match="its run was interrupted"):  # its writer is gone now
        FeatureCache(config.out)


# ------------------------------------------------------------------------------ leftovers


def test_leftovers_of_dead_writers_are_removed_and_a_half_swapped_folder_restored(tmp_path):
    out = tmp_path / "INDEX"
    out.mkdir()
    (out / "meta.json").write_text("old")
    stale_tmp = tmp_path / ".INDEX.tmp-99999"
    stale_tmp.mkdir()
    (stale_tmp / "index.faiss").write_text("half")
    with WriteLock(out):
        assert remove_leftovers(out) == [stale_tmp]
    # A two-rename swap killed between its renames: the old folder is back under its name.
    os.replace(out, tmp_path / ".INDEX.old-4242")
    with WriteLock(out):
        remove_leftovers(out)
    assert (out / "meta.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["INDEX"]


def test_publish_replaces_a_folder_in_one_step(tmp_path):
    out = tmp_path / "PROBE"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new = temp_dir(out)
    new.mkdir()
    (new / "new.txt").write_text("new")
    publish_dir(new, out)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PROBE"]


def test_a_rerun_removes_a_killed_runs_temporary_files(tree, tmp_path):
    config = fast_config(tree, tmp_path / "c.h5")
    (tmp_path / "c.h5.tmp-12345").write_bytes(b"half a view")
    (tmp_path / ".c.h5.partial.tmp-12345").mkdir()
    embed(config)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "images") == ["c.h5"]


# ----------------------------------------------------------------------------- disk full


def _tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    _tmpfs(disk, "420k")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_full_disk_is_one_line_keeps_the_committed_rows_and_the_rerun_resumes(tmp_path, small_disk, capsys):
    src = make_tree(tmp_path / "src", classes=("a", "b"), per_class=60, seed=7)
    reference = fast_config(src, tmp_path / "reference.h5", commit_every=16)
    embed(reference)
    config = fast_config(src, small_disk / "c.h5", commit_every=16)
    assert main(["embed", *cli_args(config)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    committed = int(lines[0].split(" rows are committed")[0].rsplit(" ", 1)[1])
    assert 0 < committed < 120 and "rerun the same command" in lines[0]
    with h5py.File(config.out, "r") as f:  # what is there opens, with plain h5py
        assert int(f.attrs["committed_rows"]) == f["features"].shape[0] <= committed
    assert not [p for p in small_disk.rglob("*") if ".tmp" in p.name]  # no temporary file outlives the run
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # "free some space"
    report = embed(config)
    assert report.already_cached == committed and report.embedded == 120 - committed
    assert_same(config.out, reference.out)
    assert sorted(p.name for p in small_disk.iterdir()) == ["c.h5"]


@pytest.mark.slow
def test_a_write_that_fails_midway_is_reported_without_a_crash(tmp_path, small_disk):
    """If the disk fills *during* an HDF5 write (another process took the space after the
    check), HDF5's state is broken: still one line, exit 1, no segfault at exit, no leftovers."""
    src = make_tree(tmp_path / "src", classes=("a", "b"), per_class=150, seed=7)
    # One part of all 300 rows (600 KB) fits; the consolidated copy of it does not.
    subprocess.run(["mount", "-o", "remount,size=1000k", str(small_disk)], check=True)
    config = fast_config(src, small_disk / "c.h5", commit_every=512)  # parts buffered: the consolidation fills it
    code = ("import sys; import embedder.cache.writer as w; w._free_bytes = lambda folder: 1 << 40\n"
            "from embedder.cli.main import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "embed", *cli_args(config)], env=env_with_repo(),
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # not 139: no crash at exit
    assert "Not enough space" in proc.stderr and "300 rows are committed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [p for p in small_disk.rglob("*") if ".tmp" in p.name]


def test_read_only_output_and_missing_source_are_one_line(tmp_path, small_disk, tree, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for args, expected in (
        (cli_args(fast_config(tree, small_disk / "c.h5")), "read-only file system"),
        (cli_args(fast_config(tmp_path / "nowhere", tmp_path / "c.h5")), "does not exist"),
    ):
        assert main(["embed", *args]) != 0
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    args = ["embed", str(tmp_path / "nowhere"), "--model", "resnet18", "--out", str(tmp_path / "c.h5")]
    assert main(args) == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SourceError):  # the exception itself, with its traceback
        main(["--debug", *args])
    monkeypatch.setenv("EMBEDDER_DEBUG", "1")
    with pytest.raises(SourceError):
        main(args)


# ----------------------------------------------------------------- concurrent readers


def _read_consistently(path: Path, ref_features, ref_paths) -> bool:
    """Open `path` as a reader would during a run. True if it read rows (all equal to the
    uninterrupted run's), False if it was refused cleanly; anything else fails the test."""
    try:
        with FeatureCache(path, require_complete=False) as c:
            n, features, paths = len(c), c.features(), c.paths
    except (CacheError, OSError):  # not there yet, being replaced, or the run ended while reading
        return False
    assert paths == ref_paths[:n]
    assert np.array_equal(features, ref_features[:n]), "a reader saw a row that is not the final one"
    return True


@pytest.mark.slow
def test_readers_during_a_fresh_run_and_an_append_see_only_whole_rows(tmp_path):
    src = make_tree(tmp_path / "src", classes=("a", "b"), per_class=40, seed=11)
    reference = fast_config(src, tmp_path / "reference.h5", commit_every=8, image_size=64)
    embed(reference)
    ref_features, ref_paths, *_ = _cache(reference.out)
    for limit in (None, 30):  # a fresh run, then an append run over a complete 30-row cache
        out = tmp_path / f"c{limit}.h5"
        if limit:
            embed(fast_config(src, out, limit=limit, image_size=64))
        config = fast_config(src, out, commit_every=8, image_size=64)
        # The writer in a thread of this process: h5py serialises the two, which is all a
        # reader in another process would get from the file system's atomic renames anyway.
        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(embed, config)
            reads = 0
            while not run.done():
                reads += _read_consistently(out, ref_features, ref_paths)
            run.result()
        assert reads >= 3
        assert_same(out, reference.out)


# ---------------------------------------------------------------- layouts and file names


def test_images_beside_class_folders_are_refused_in_auto_and_accounted_when_forced(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png", "c.png", "thumbs/t.png"):
        write_image(tmp_path / "photos" / name, rng)
    with pytest.raises(SourceError, match="--layout flat.*--layout imagefolder"):
        list_source(tmp_path / "photos")
    flat = embed(fast_config(tmp_path / "photos", tmp_path / "flat.h5", layout="flat"))
    assert flat.total_rows == 4 and flat.ignored == 0
    folders = embed(fast_config(tmp_path / "photos", tmp_path / "folders.h5", layout="imagefolder"))
    assert folders.total_rows == 1 and folders.ignored_by_reason == {OUTSIDE_CLASSES: 3}
    with FeatureCache(tmp_path / "folders.h5") as c:
        assert c.ignored_counts == {OUTSIDE_CLASSES: 3}


def test_every_file_is_a_row_an_error_or_ignored_once(tmp_path):
    root = tmp_path / "src"
    rng = np.random.default_rng(1)
    for name in ("cat/a.png", "cat/b.png", "dog/c.png", "dog/deep/d.png"):
        write_image(root / name, rng)
    os.symlink("loop.jpg", root / "cat/loop.jpg")  # points to itself
    os.symlink("..", root / "dog/up")  # a cycle
    os.symlink("a.png", root / "cat/again.png")  # the same file twice
    os.link(root / "cat/b.png", root / "dog/b_hard.png")
    (root / "cat/notes.txt").write_text("x")
    (root / "cat/.hidden.png").write_text("x")
    report = embed(fast_config(root, tmp_path / "c.h5"))
    with FeatureCache(tmp_path / "c.h5") as c:
        rows, errors = c.paths, dict(c.errors)
    assert rows == ["cat/a.png", "cat/b.png", "dog/c.png", "dog/deep/d.png"]
    assert errors == {"cat/loop.jpg": "symbolic link loop (the link leads back to itself)"}
    assert report.ignored_by_reason == {SAME_FILE: 2, "folder already listed through another path (symlink)": 1,
                                        HIDDEN: 1, NOT_IMAGE: 1}
    files = sum(len(f) for _, _, f in os.walk(root))  # every name in every real folder, links included
    assert len(rows) + len(errors) + report.ignored == files + 1  # + the `up` link, which os.walk lists as a folder


def test_any_file_name_is_a_row_that_opens_its_file_and_prints_on_one_line(tmp_path, capsys):
    names = [os.fsdecode(b"caf\xe9.png"), "new\nline.png", "a,b.png", "-dash.png", "café ☕.png"]
    rng = np.random.default_rng(2)
    for name in names:
        write_image(tmp_path / "src" / name, rng, fmt="PNG")
    out = tmp_path / "c.h5"
    embed(fast_config(tmp_path / "src", out))
    with FeatureCache(out) as c:
        assert sorted(c.paths) == sorted(names)
        for p in c.paths:
            assert (tmp_path / "src" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with h5py.File(out, "r") as f:  # the stored bytes are the file system's own
        assert sorted(f["paths"][:].tolist()) == sorted(encode_path(n) for n in names)
    assert display_path(names[0]) == "caf\\xe9.png" and display_path(names[1]) == "new\\nline.png"
    assert main(["info", str(out), "--errors"]) == 0
    idx = tmp_path / "idx"
    assert main(["index", str(out), "--out", str(idx), "--quiet", "--json"]) == 0
    capsys.readouterr()
    assert main(["search", str(idx), "--id", "0", "-k", "5"]) == 0
    found = capsys.readouterr().out
    assert "caf\\xe9.png" in found and "new\\nline.png" in found
    assert len(found.strip().splitlines()) == 6  # the query line and five hits: no name broke a line
    assert main(["search", str(idx), "--id", "0", "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert sorted(h["path"] for h in hits) == sorted(names)  # JSON keeps the exact (surrogate-escaped) names


def test_search_json_on_an_on_disk_index_is_only_json(tmp_path):
    src = make_tree(tmp_path / "src", classes=("a", "b"), per_class=40, seed=3)
    cache = tmp_path / "c.h5"
    embed(fast_config(src, cache))
    idx = tmp_path / "idx"
    build_index(cache, idx, kind="ivf", on_disk=True, progress=False)
    proc = subprocess.run(embedder_cmd("search", str(idx), "--id", "3", "-k", "3", "--json"), env=env_with_repo(),
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["hits"][0]["id"] for line in proc.stdout.splitlines()] == [3]


def test_an_output_folder_without_write_permission_is_one_line():
    """Root may write anywhere, so as root the run is made by `nobody`, in a folder it cannot write."""
    if os.geteuid() == 0:
        uid, gid = pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid
    else:
        uid, gid = -1, -1
    base = Path(tempfile.mkdtemp(prefix="embedder-perm-"))  # not under pytest's tmp: private to root
    try:
        os.chmod(base, 0o755)  # readable by everyone, writable by its owner only
        source = base / "src"
        make_tree(source, classes=("a", "b"), per_class=2)
        for p in [source, *source.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        locked = base / "out"
        locked.mkdir(mode=0o555)
        os.chmod(locked, 0o555)

        def work():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(["embed", *cli_args(fast_config(source, locked / "c.h5"))])
            return {"code": code, "err": err.getvalue()}

        result = as_user(uid, gid, work)
    finally:
        os.chmod(base / "out", 0o755)
        shutil.rmtree(base)
    assert "error" not in result, result.get("error")
    assert result["code"] == 1 and result["err"].count("\n") == 1
    assert "permission denied" in result["err"] and "Traceback" not in result["err"]
