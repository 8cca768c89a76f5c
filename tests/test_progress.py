"""Progress on every step a person waits for, and plain lines when stderr is not a terminal.

On a terminal tqdm redraws its bar in place; into a file or a pipe that would leave carriage-
return fragments (`dedup: 0row [00:00, ?row/s]dedup: 1797row...`). Here stderr is a file or a
captured stream (never a terminal): every command must write whole lines there, none with a
carriage return, and nothing with --quiet.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from embedder import progress
from embedder.cli.main import main
from tests.conftest import embedder_cmd, env_with_repo
from tests.test_curate import clustered


def test_a_bar_into_a_file_writes_whole_lines_and_nothing_when_disabled(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with progress.bar(desc="work", unit="row", total=1000) as shown:
        for _ in range(1000):
            shown.update(1)
        shown.write("a note", file=sys.stderr)
    for _ in progress.bar(range(5), desc="loop"):
        pass
    with progress.stage("fit"):
        pass
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("work:   0%") and "work: 100%" in text and "1000/1000" in text
    assert any(line.startswith("loop: 100%") for line in lines) and any(line.startswith("fit: ") for line in lines)
    assert "a note" in lines
    stream.truncate(0)
    with progress.bar(desc="work", total=10, enabled=False) as shown:
        shown.update(10)
    with progress.stage("fit", enabled=False):
        pass
    assert stream.getvalue() == ""


@pytest.fixture
def cache(tmp_path):
    from embedder.cache.reader import CacheSpec
    from embedder.cache.writer import CacheWriter
    from embedder.data.sources import Listing

    X, y, _ = clustered(n_per=30, classes=3, d=8, spread=2.0, seed=3)
    X[1] = X[0]  # a duplicate, so that dedup has a group to report
    path = tmp_path / "c.h5"
    listing = Listing(tmp_path, [f"v{i:03d}.png" for i in range(len(X))], y, ["a", "b", "c"], "imagefolder")
    spec = CacheSpec({"model": "synthetic", "layer": "features", "dim": "8"}, str(tmp_path), 8, layout="imagefolder")
    with CacheWriter(path, spec, listing, commit_every=10**9) as w:
        w.add(np.arange(len(X)), X, [])
        w.finish()
    return path


def test_dedup_into_a_log_file_writes_lines_not_carriage_returns(tmp_path, cache):
    log = tmp_path / "stderr.log"
    for quiet in ((), ("--quiet",)):
        with log.open("w") as err:
            subprocess.run(embedder_cmd("dedup", str(cache), *quiet), stdout=subprocess.DEVNULL, stderr=err,
                           env=env_with_repo(), check=True, timeout=300)
        text = log.read_text()
        assert "\r" not in text
        if quiet:
            assert "dedup:" not in text
        else:
            assert "dedup: 100%" in text and text.endswith("\n")


@pytest.mark.parametrize(("args", "shown"), [
    (["probe", "{cache}", "--out", "{tmp}/p", "--shots", "1,2", "--draws", "2", "--device", "cpu"],
     ["probe: C sweep:", "probe: few-shot draws:"]),
    (["probe", "{cache}", "--out", "{tmp}/k", "--classifier", "ridge"], ["probe: cross-validated ridge: "]),
    (["plot", "{cache}", "--out", "{tmp}/x.png", "--method", "tsne"], ["plot: tsne of 90 rows: "]),
    (["curate", "{cache}", "--out", "{tmp}/r", "--device", "cpu", "--folds", "2", "--gallery", "0"],
     ["curate: label mistakes (2-fold probe): ", "curate: neighbours", "curate: leaks: ", "dedup: 100%"]),
])
def test_the_steps_people_wait_for_show_progress_and_quiet_hides_it(tmp_path, capsys, cache, args, shown):
    loud, quiet = ([a.format(cache=cache, tmp=tmp_path / run) for a in args] for run in ("loud", "quiet"))
    assert main(loud) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    for start in shown:
        assert any(line.startswith(start) for line in err.splitlines()), (start, err)
    assert main([*quiet, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert not any(line.startswith(start) for line in err.splitlines() for start in shown), err


def test_probe_on_every_layer_and_map_show_progress(tmp_path, capsys, cache):
    assert main(["index", str(cache), "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    assert main(["map", str(tmp_path / "idx"), "--method", "pca"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "map: fitting pca on 90 rows: " in err
    assert main(["probe", str(cache), "--out", str(tmp_path / "s"), "--layer", "all", "--classifier", "knn-vote"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "probe: layers: 100%" in err
    assert main(["map", str(tmp_path / "idx"), "--method", "pca", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
