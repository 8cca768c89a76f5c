"""The bad-input corpus end to end (tests/corpus.py): every entry under SOURCE ends as exactly one
of a feature row, an errors-table entry or an ignored entry, each with the right reason.

One embed run of the whole tree serves most tests (module fixture). Its listing stage is the real
`list_source`, wrapped only to capture the listing and to delete/rewrite two files before the
reader stage opens them, as another process could.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import tempfile
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from embedder.cache.reader import FeatureCache
from embedder.data.decode import DEFAULT_MAX_PIXELS, load_rgb
from embedder.data.sources import Listing, list_source
from embedder.errors import BadImageError, SourceError
from embedder.extract import local as extract
from embedder.extract.core import backbone_for, embed_images
from embedder.extract.local import EmbedReport, embed
from embedder.names import display_path
from tests.conftest import REPO, fast_config
from tests.corpus import (
    AWKWARD_NAMES,
    ERROR,
    FILE_LIST_CASES,
    IGNORED,
    RACE_DELETED,
    RACE_REWRITTEN,
    ROW,
    UNREADABLE_CASES,
    Case,
    big_header_png,
    docs_rows,
    make_bad_input_tree,
    make_unreadable_tree,
    png_bytes,
    race_after_listing,
    race_contents,
)

DOCS = REPO / "docs" / "RELIABILITY.md"
TIMEOUT_S = 120  # a run that blocks (opening a FIFO, say) fails the test instead of hanging the suite


@dataclass
class Run:
    base: Path
    root: Path
    out: Path
    cases: list[Case]
    walked: set[str]  # what os.walk finds before the run (see entries_to_account)
    listing: Listing  # the listing embed worked from
    report: EmbedReport
    backbone: object
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    features: np.ndarray
    errors: list[tuple[str, str]]
    ignored_counts: dict[str, int]

    def row(self, path: str) -> np.ndarray:
        return self.features[self.paths.index(path)]

    def case(self, path: str) -> Case:
        return next(c for c in self.cases if c.path == path)


class Deadline(BaseException):
    """Not an Exception: the decoder records any Exception as one bad file, and this must stop the run."""


@contextmanager
def deadline(seconds: int):
    def expire(*_):
        raise Deadline(f"the run took over {seconds} s: something blocked (a FIFO opened for reading?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def entries_to_account(root: Path) -> set[str]:
    """Every entry a listing of `root` must account for, found by os.walk without following links:
    each file (regular, special or symlink), and as `path/` each folder the walk must not enter
    (hidden, or a symlink: its target is a folder walked already or a loop)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        for name in list(dirnames):
            if name.startswith(".") or os.path.islink(os.path.join(dirpath, name)):
                found.add(prefix + name + "/")
                dirnames.remove(name)
        found.update(prefix + name for name in filenames)
    return found


def key(path: str) -> str:
    # Folder entries end with "/" in the corpus; the listing names a hidden folder without it.
    return path.rstrip("/")


def read_cache(out: Path) -> dict:
    with FeatureCache(out) as cache:
        return {"paths": cache.paths, "labels": cache.labels, "classes": cache.classes,
                "features": cache.features(), "errors": cache.errors, "ignored_counts": cache.ignored_counts}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    base = tmp_path_factory.mktemp("bad_input")
    root, out = base / "tree", base / "tree.h5"
    cases = make_bad_input_tree(root, base / "outside")
    walked = entries_to_account(root)
    config = fast_config(root, out, layout="imagefolder")
    backbone = backbone_for(config)
    listed = []

    def list_then_race(*args, **kwargs):
        listing = list_source(*args, **kwargs)  # the real listing stage ...
        listed.append(listing)
        race_after_listing(root)  # ... then the change another process makes before the reader runs
        return listing

    with pytest.MonkeyPatch.context() as mp, deadline(TIMEOUT_S):
        mp.setattr(extract, "list_source", list_then_race)
        report = embed(config, backbone=backbone)
    return Run(base, root, out, cases, walked, listed[0], report, backbone, **read_cache(out))


def fate(rows, errors: dict, ignored: dict, path: str) -> tuple[str, str]:
    """Where `path` ended, and the recorded reason."""
    if path in rows:
        return ROW, ""
    if path in errors:
        return ERROR, errors[path]
    if key(path) in ignored:
        return IGNORED, ignored[key(path)]
    return "nowhere", ""


def wrong_outcomes(cases: list[Case], rows, errors: dict, ignored: dict) -> list[str]:
    wrong = []
    for case in cases:
        got, reason = fate(set(rows), errors, ignored, case.path)
        ok = got == case.outcome and (case.reason in reason if got == ERROR else reason == case.reason)
        if not ok:
            wrong.append(f"{case.kind}: {display_path(case.path)} -> {got} {reason!r}, expected {case.outcome} "
                         f"{case.reason!r}")
    return wrong


def features_of(backbone, folder: Path, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Features of pixel arrays, each saved as a lossless PNG outside SOURCE and read by the same reader."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, pixels in enumerate(images.values()):
        files.append(folder / f"{i}.png")
        Image.fromarray(pixels).save(files[-1])
    feats, errors = embed_images(backbone, files, batch_size=4)
    assert not errors, errors
    return dict(zip(images, feats))


def same_features(a: np.ndarray, b: np.ndarray) -> bool:
    # Rows are computed in batches of different make-up than the references: allow float noise only.
    return np.allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


# ------------------------------------------------------------------------------------------
# Accounting and outcomes
# ------------------------------------------------------------------------------------------


def test_every_entry_ends_in_exactly_one_place(run):
    places = Counter(key(p) for p in run.paths + [p for p, _ in run.errors] + [p for p, _ in run.listing.ignored])
    walked = {key(p) for p in run.walked}
    assert {p: n for p, n in places.items() if n > 1} == {}, "entries in more than one place"
    assert sorted(walked - set(places)) == [], "entries the run lost"
    assert sorted(set(places) - walked) == [], "entries the run invented"
    assert len(run.paths) + len(run.errors) + len(run.listing.ignored) == len(walked)
    assert sorted(key(c.path) for c in run.cases) == sorted(walked), "the corpus must say what every entry becomes"


def test_every_kind_has_its_outcome_and_reason(run):
    ignored = {key(p): r for p, r in run.listing.ignored}
    wrong = wrong_outcomes(run.cases, run.paths, dict(run.errors), ignored)
    assert not wrong, "\n".join(wrong)


def test_counts_in_report_and_cache_match_the_corpus(run):
    expected = Counter(c.outcome for c in run.cases)
    by_reason = dict(Counter(c.reason for c in run.cases if c.outcome == IGNORED))
    assert (run.report.embedded, len(run.report.errors), run.report.ignored) == (
        expected[ROW], expected[ERROR], expected[IGNORED])
    assert run.report.ignored_by_reason == by_reason
    assert run.ignored_counts == by_reason
    assert run.features.shape == (expected[ROW], run.backbone.feature_dim) and np.isfinite(run.features).all()


def test_labels_follow_the_class_folders(run):
    classes = sorted(e.name for e in os.scandir(run.root) if e.is_dir(follow_symlinks=False) and e.name[0] != ".")
    assert run.classes == classes
    assert [run.classes[label] for label in run.labels] == [p.split("/")[0] for p in run.paths]


# ------------------------------------------------------------------------------------------
# Rows: the right pixels, the right features
# ------------------------------------------------------------------------------------------


def test_rows_decode_to_their_known_pixels(run):
    wrong = []
    for case in (c for c in run.cases if c.pixels is not None):
        got = load_rgb(run.root / case.path).permute(1, 2, 0).numpy()
        if got.shape != case.pixels.shape:
            wrong.append(f"{case.kind}: shape {got.shape}, expected {case.pixels.shape}")
        elif case.exact and not np.array_equal(got, case.pixels):
            wrong.append(f"{case.kind}: {np.count_nonzero(got != case.pixels)} values differ")
        elif not case.exact and np.abs(got.astype(int) - case.pixels).mean() > 8:  # lossy: close, not inverted
            wrong.append(f"{case.kind}: mean error {np.abs(got.astype(int) - case.pixels).mean():.1f}")
    assert not wrong, "\n".join(wrong)


def test_each_row_holds_the_features_of_its_own_pixels(run):
    exact = {c.path: c.pixels for c in run.cases if c.outcome == ROW and c.pixels is not None and c.exact}
    reference = features_of(run.backbone, run.base / "ref", exact)
    wrong = [display_path(p) for p, f in reference.items() if not same_features(run.row(p), f)]
    assert not wrong, "\n".join(wrong)


def test_exif_rotated_row_equals_the_upright_pixels(run):
    rotated, upright = run.row("formats/exif_rotated.jpg"), run.row("formats/exif_upright.png")
    assert same_features(rotated, upright)
    with Image.open(run.root / "formats/exif_rotated.jpg") as img:  # as stored, orientation not applied
        stored = np.asarray(img.convert("RGB"))
    sideways = features_of(run.backbone, run.base / "sideways", {"stored": stored})["stored"]
    assert not same_features(rotated, sideways), "the orientation tag made no difference"


def test_one_pixel_image_is_a_solid_colour(run):
    colour = run.case("formats/one_pixel.png").pixels[0, 0]
    solid = features_of(run.backbone, run.base / "solid", {"solid": np.tile(colour, (40, 40, 1))})["solid"]
    assert same_features(run.row("formats/one_pixel.png"), solid)


def test_a_file_rewritten_after_listing_gives_the_new_content(run):
    old, new = features_of(run.backbone, run.base / "race", dict(zip(("old", "new"), race_contents()))).values()
    assert RACE_REWRITTEN in run.listing.paths
    assert same_features(run.row(RACE_REWRITTEN), new)
    assert not same_features(run.row(RACE_REWRITTEN), old)


def test_a_file_deleted_after_listing_is_an_error(run):
    assert RACE_DELETED in run.listing.paths  # listed while it existed ...
    assert "file not found" in dict(run.errors)[RACE_DELETED]  # ... and gone when the reader came


def test_awkward_names_round_trip_to_their_files(run):
    with h5py.File(run.out, "r") as f:
        stored = [bytes(b) for b in f["paths"][:]]
    for name in AWKWARD_NAMES.values():
        path = f"names/{name}"
        assert path in run.paths, display_path(path)
        assert os.fsencode(path) in stored  # the file system's own bytes, not a re-encoding
        assert name.encode("utf-8", "surrogateescape") in os.listdir(os.fsencode(run.root / "names"))
        with Image.open(run.root / path) as img:  # the path opens the very file written
            assert np.array_equal(np.asarray(img), run.case(path).pixels)
        assert (run.root / path).read_bytes() == png_bytes(run.case(path).pixels)
        shown = display_path(path)
        assert shown.isprintable() and "\n" not in shown, shown
    assert display_path(f"names/{AWKWARD_NAMES['non-UTF-8 name (Latin-1 byte)']}") == "names/caf\\xe9.png"
    assert display_path("names/new\nline.png") == "names/new\\nline.png"


def test_bomb_reason_names_the_limit_and_how_to_raise_it(run):
    reason = dict(run.errors)["broken/bomb.png"]
    assert f"limit of {DEFAULT_MAX_PIXELS}" in reason, reason  # the limit in force, not another one
    assert "--max-pixels" in reason, reason  # and how to admit a genuine large image


def test_max_pixels_above_pils_own_limit_is_honoured(tmp_path):
    # 9500 x 9500 = 90.25 M pixels: over PIL's built-in 89.5 M, within a --max-pixels of 10^8.
    path = tmp_path / "big.png"
    path.write_bytes(big_header_png(9500, 9500))
    with pytest.raises(BadImageError) as err:
        load_rgb(path, max_pixels=10**8)
    assert "corrupt image data" in err.value.reason, err.value.reason  # decoded (and its junk data found)
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_rgb(path, max_pixels=9000 * 9000)  # a lower limit still refuses it


# ------------------------------------------------------------------------------------------
# Links, layouts, file lists, permissions
# ------------------------------------------------------------------------------------------


def test_symlinked_folders_are_not_walked_again(run):
    through_links = ("links/sub/up/", "links/formats_again/")
    assert [p for p in run.paths + [p for p, _ in run.errors] if p.startswith(through_links)] == []
    assert Counter(run.paths).most_common(1)[0][1] == 1


def test_auto_layout_refuses_the_tree_naming_layout(run, tmp_path):
    with pytest.raises(SourceError) as err:
        embed(fast_config(run.root, tmp_path / "auto.h5"), backbone=run.backbone)
    assert "--layout" in str(err.value) and "stray.png" in str(err.value)


def test_file_list_naming_a_folder_records_it_as_an_error(run, tmp_path):
    source, out = run.root / "list.txt", tmp_path / "list.h5"
    embed(fast_config(source, out), backbone=run.backbone)
    cache = read_cache(out)
    rows = [c.path for c in FILE_LIST_CASES if c.outcome == ROW]
    assert cache["paths"] == rows  # in the order of the list
    # A path listed twice is a row *and* an ignored line, so each line is checked by its own list.
    once = [c for c in FILE_LIST_CASES if c.outcome != IGNORED]
    wrong = wrong_outcomes(once, cache["paths"], dict(cache["errors"]), {})
    assert not wrong, "\n".join(wrong)
    assert list_source(source).ignored == [(c.path, c.reason) for c in FILE_LIST_CASES if c.outcome == IGNORED]
    assert len(cache["errors"]) == sum(c.outcome == ERROR for c in FILE_LIST_CASES)
    assert same_features(cache["features"][rows.index("formats/bitmap.bmp")], run.row("formats/bitmap.bmp"))


def as_user(uid: int, gid: int, work) -> dict:
    """`work()` in a forked child that has become `uid` for good (-1: stay); its result or traceback."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        result, status = {"error": "no result"}, 1
        try:
            torch.set_num_threads(1)  # the parent's worker threads do not exist in a forked child
            if uid >= 0:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)  # from here on the kernel checks every open as this user
            result, status = {"uid": os.getuid(), **work()}, 0
        except BaseException:  # noqa: BLE001 - the parent reports it
            result = {"error": traceback.format_exc()}
        finally:
            with os.fdopen(write_fd, "w") as f:
                json.dump(result, f)
            os._exit(status)
    os.close(write_fd)
    try:
        with deadline(TIMEOUT_S), os.fdopen(read_fd) as f:
            text = f.read()
    except Deadline:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.waitpid(pid, 0)
    return json.loads(text)


def test_unreadable_file_and_folder_for_a_user_without_permission(run):
    # Root reads every file whatever its mode, so as root the run is made by `nobody` instead.
    uid, gid = (pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid) if os.geteuid() == 0 else (-1, -1)
    base = Path(tempfile.mkdtemp(prefix="embedder-corpus-"))  # not under pytest's tmp: that is private to root
    source, out = base / "source", base / "out" / "c.h5"
    try:
        cases = make_unreadable_tree(source)
        out.parent.mkdir(mode=0o777)
        os.chmod(out.parent, 0o777)

        def work() -> dict:
            embed(fast_config(source, out, layout="flat"), backbone=run.backbone)
            cache = read_cache(out)
            return {"rows": cache["paths"], "errors": cache["errors"], "ignored": list_source(source, "flat").ignored}

        result = as_user(uid, gid, work)
        assert "error" not in result, result["error"]
        assert result["uid"] == (uid if uid >= 0 else os.getuid())
        ignored = {key(p): r for p, r in result["ignored"]}
        wrong = wrong_outcomes(cases, result["rows"], dict(result["errors"]), ignored)
        assert not wrong, "\n".join(wrong)
        assert len(result["rows"]) + len(result["errors"]) + len(ignored) == len(cases)
    finally:
        for path in (source / "locked.png", source / "closed"):
            if path.exists():
                os.chmod(path, 0o755)
        shutil.rmtree(base)


def test_docs_table_lists_every_kind(run):
    text = DOCS.read_text(encoding="utf-8")
    cases = run.cases + FILE_LIST_CASES + UNREADABLE_CASES
    missing = [row for row in docs_rows(cases) if row not in text]
    assert not missing, "rows missing from the docs table:\n" + "\n".join(missing)
