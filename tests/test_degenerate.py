"""Degenerate caches: one row, all rows identical, one class. Every command gives a result or a
one-line refusal (exit 0 or 2), never a traceback, an internal error (exit 70) or a crash."""

from __future__ import annotations

import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedder.cache.vectors import import_vectors
from embedder.cli.main import main
from embedder.search.removal import read_removal_list
from tests.conftest import embedder_cmd, env_with_repo

D = 8
IDENTICAL_ROWS = 200  # t-SNE crashed (SIGSEGV) on 500 identical rows, and on fewer with other seeds


def vectors(kind: str) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    if kind == "one row":
        return rng.normal(size=(1, D)), ["c0"]
    if kind == "identical rows":
        return np.tile(rng.normal(size=(1, D)), (IDENTICAL_ROWS, 1)), [f"c{i % 2}" for i in range(IDENTICAL_ROWS)]
    return rng.normal(size=(30, D)), ["c0"] * 30  # one class


@pytest.fixture(scope="module", params=["one row", "identical rows", "one class"])
def degenerate(request, tmp_path_factory):
    """A cache (imported: real components, no backbone needed) and its index, built by the CLI."""
    tmp = tmp_path_factory.mktemp(request.param.replace(" ", "_"))
    X, labels = vectors(request.param)
    pq.write_table(pa.table({"path": [f"img/{i:04d}.png" for i in range(len(X))], "label": labels,
                             "embedding": pa.array(X.astype(np.float32).tolist(), pa.list_(pa.float32(), D))}),
                   tmp / "v.parquet")
    import_vectors([str(tmp / "v.parquet")], tmp / "c.h5", progress=False)
    assert main(["index", str(tmp / "c.h5"), "--out", str(tmp / "idx"), "--quiet"]) == 0
    return tmp


COMMANDS = {
    "search": ["search", "{idx}", "--id", "0", "-k", "5"],
    "search by vector": ["search", "{idx}", "--vector", "{q}", "--min-score", "0.5"],
    "probe": ["probe", "{cache}", "--out", "{out}"],
    "knn-vote": ["probe", "{cache}", "--classifier", "knn-vote", "--out", "{out}"],
    "curate": ["curate", "{cache}", "--out", "{out}", "--quiet"],
    "plot pca": ["plot", "{cache}", "--method", "pca", "--out", "{out}.png"],
    "plot umap": ["plot", "{cache}", "--method", "umap", "--out", "{out}.png"],
    "map": ["map", "{idx}", "--method", "pca", "--quiet"],
    "dedup": ["dedup", "{cache}", "--quiet"],
    "export-vectors": ["export-vectors", "{cache}", "--out", "{out}"],
    "info cache": ["info", "{cache}"],
    "info index": ["info", "{idx}"],
    "index again": ["index", "{cache}", "--out", "{out}", "--kind", "hnsw", "--quiet"],
    "index --remove": ["index", "{idx}", "--remove", "img/0000.png"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_gives_a_result_or_a_one_line_refusal(degenerate, command, capsys):
    np.save(degenerate / "q.npy", np.ones(D, np.float32))
    places = {"idx": degenerate / "idx", "cache": degenerate / "c.h5", "q": degenerate / "q.npy",
              "out": degenerate / f"out_{command.replace(' ', '_')}"}
    args = [a.format(**places) for a in COMMANDS[command]]
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        refusal = [line for line in err.splitlines() if line.startswith("embedder: error:")]
        assert len(refusal) == 1, err


def test_tsne_refuses_identical_rows_and_plots_the_others(degenerate):
    # In a child process: the failure this guards against was a segmentation fault.
    done = subprocess.run(embedder_cmd("plot", str(degenerate / "c.h5"), "--method", "tsne", "--out",
                                       str(degenerate / "tsne.png")), env=env_with_repo(), capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode in (0, 2) and "Traceback" not in done.stderr, done.stderr
    if degenerate.name.startswith("identical_rows"):
        assert done.returncode == 2 and "identical rows" in done.stderr and "--method pca" in done.stderr
    elif degenerate.name.startswith("one_class"):
        assert done.returncode == 0 and (degenerate / "tsne.png").is_file()


@pytest.mark.parametrize("content, words", [
    (b"\x89PNG\r\n\x1a\n" + bytes(100), "a NUL byte at offset 8: a binary file"),
    (b"a" * 5000 + b"\nimg/0000.png\n", "line 1 has 5000 characters"),
])
def test_remove_from_a_file_that_is_no_list_is_refused_in_one_short_line(tmp_path, capsys, content, words):
    (tmp_path / "list").write_bytes(content)
    with pytest.raises(Exception, match=words) as info:
        read_removal_list(tmp_path / "list")
    assert len(str(info.value)) < 300 and "\n" not in str(info.value)


def test_remove_from_dev_zero_reads_one_block(tmp_path):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(Exception, match="a NUL byte at offset 0"):
        read_removal_list("/dev/zero")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KiB: far from GBs


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_dedup_refuses_a_threshold_that_is_not_finite(value, capsys):
    assert main(["dedup", "any.h5", f"--threshold={value}"]) == 2
    assert "--threshold must be a finite number" in capsys.readouterr().err
