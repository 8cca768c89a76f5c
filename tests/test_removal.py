"""Removing rows from an index (`embedder index INDEX_DIR --remove/--remove-from/--prune-missing`),
`embedder info INDEX_DIR`, and `search --where` on the command line."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from embedder.cli.main import main
from embedder.errors import ConfigError, RemovedRowError
from embedder.extract.local import embed
from embedder.search.build import build_index
from embedder.search.query import SearchIndex
from embedder.search.removal import describe_index, remove_rows
from tests.conftest import fast_config, make_tree
from tests.test_index import clustered, synthetic_cache

N, D = 3000, 32
KINDS = ["flat", "ivf", "hnsw", "ivfsq", "ivfpq"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("removal")
    X = clustered(N, D, centers=30, seed=7)
    labels = np.random.default_rng(8).integers(0, 3, N)
    cache = synthetic_cache(tmp / "c.h5", X, labels)
    for kind in KINDS:
        build_index(cache, tmp / kind, kind=kind, progress=False, n_eval=200)
    return tmp, X, labels


@pytest.fixture
def fresh(built, tmp_path):
    """A copy of a built index of each kind, to edit."""
    def copy(kind: str):
        shutil.copytree(built[0] / kind, tmp_path / kind)
        return tmp_path / kind
    return copy


def path_of(i: int) -> str:
    return f"v{i:06d}.png"  # synthetic_cache's names


@pytest.mark.parametrize("kind", KINDS)
def test_removed_rows_never_come_back(built, fresh, kind):
    _, X, _ = built
    out = fresh(kind)
    gone = np.sort(np.random.default_rng(9).choice(N, 60, replace=False))
    report = remove_rows(out, [path_of(i) for i in gone])
    assert report["newly_removed"] == 60 and report["removed_in_place"] == (kind.startswith("ivf"))
    index = SearchIndex.open(out)
    np.testing.assert_array_equal(index.removed, gone)
    assert index.ntotal == N  # row ids stay cache rows
    if kind.startswith("ivf"):
        assert index.index.ntotal == N - 60  # taken out of the inverted lists
    # The removed rows' own vectors are the queries most likely to find them.
    for where in (None, "label == 'c1'", f"id in ({', '.join(map(str, gone[:5]))}, 0, 1, 2)"):
        found = [h.id for q in index.search(X[gone], 20, where=where) for h in q]
        assert found and not set(found) & set(gone.tolist())
    hits = index.search(X[gone[:5]], 5, where=f"id in ({', '.join(map(str, gone[:5]))}, 0, 1, 2)")
    assert [len(q) for q in hits] == [len({0, 1, 2} - set(gone.tolist()))] * 5
    live = np.setdiff1d(np.arange(N), gone)
    assert [len(q) for q in index.search(X[:4], 15)] == [15] * 4
    assert index.search_ids([int(live[0])], 3)[0]
    with pytest.raises(RemovedRowError, match=rf"row {gone[0]} \({path_of(gone[0])}\) was removed"):
        index.search_ids([int(gone[0])], 3)
    with pytest.raises(RemovedRowError, match=path_of(gone[1])):
        index.row_of_path(path_of(gone[1]))
    if kind == "flat":  # still exact among the rows left
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        s = Xn[gone] @ Xn.T
        s[:, gone] = -np.inf
        assert [[h.id for h in q] for q in index.search(X[gone], 10)] == np.argsort(-s, 1, kind="stable")[:, :10].tolist()


def test_removal_is_idempotent_and_unknown_paths_change_nothing(fresh):
    out = fresh("hnsw")
    with pytest.raises(ConfigError, match=r"2 path\(s\) are not in the index, nothing was removed: nope.png, x/y"):
        remove_rows(out, [path_of(1), "nope.png", "x/y"])
    with h5py.File(out / "rows.h5") as f:
        assert "removed" not in f
    assert remove_rows(out, [path_of(1), path_of(2)])["newly_removed"] == 2
    again = remove_rows(out, [path_of(2), path_of(3)])
    assert (again["newly_removed"], again["already_removed"], again["removed_rows"]) == (1, 1, 3)
    assert SearchIndex.open(out).removed.tolist() == [1, 2, 3]
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]  # staged and swapped in whole


def test_info_reports_hidden_rows_and_when_a_rebuild_pays(fresh):
    out = fresh("hnsw")
    remove_rows(out, [path_of(i) for i in range(500)])
    doc = describe_index(out)
    assert (doc["kind"], doc["ntotal"], doc["removed"], doc["hidden"], doc["searchable"]) == ("hnsw", N, 500, 500,
                                                                                            N - 500)
    assert doc["rebuild"] is None  # 17% hidden
    remove_rows(out, [path_of(i) for i in range(500, 700)])
    assert "23% of the rows are hidden" in describe_index(out)["rebuild"]
    ivf = fresh("ivf")
    remove_rows(ivf, [path_of(i) for i in range(700)])
    doc = describe_index(ivf)
    assert (doc["removed"], doc["hidden"], doc["rebuild"]) == (700, 0, None)


def test_cli_remove_prune_info_and_where(tmp_path, capsys):
    tree = make_tree(tmp_path / "img", per_class=4)
    cache, idx = tmp_path / "c.h5", tmp_path / "idx"
    embed(fast_config(tree, cache))
    assert main(["index", str(cache), "--out", str(idx), "--quiet"]) == 0
    paths = SearchIndex.open(idx).paths
    cats = [p for p in paths if p.startswith("cat/")]
    other = str(next(i for i, p in enumerate(paths) if not p.startswith("cat/")))
    capsys.readouterr()
    # --where on the command line: only the rows it keeps, bad filters refused with a caret
    assert main(["search", str(idx), "--id", "0", "-k", "50", "--where", "label == 'cat'", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert sorted(h["path"] for h in hits) == sorted(cats)
    assert main(["search", str(idx), "--id", "0", "--where", "label == cat"]) == 2
    err = capsys.readouterr().err
    assert "expected a value" in err and "(at column 10)" in err and "           ^" in err
    # removal by a file's own path, by a list file, and of files that vanished
    (tmp_path / "list.txt").write_text(f"{cats[1]}\n\n{cats[2]}\n")
    assert main(["index", str(idx), "--remove", str(tree / cats[0]), "--quiet"]) == 0
    assert main(["index", str(idx), "--remove-from", str(tmp_path / "list.txt"), "--quiet"]) == 0
    (tree / cats[3]).unlink()
    assert main(["index", str(idx), "--prune-missing", "--quiet", "--json"]) == 0
    capsys.readouterr()
    assert main(["search", str(idx), "--id", other, "-k", "50", "--where", "label == 'cat'", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"] == []
    assert main(["search", str(idx), "--path", cats[3]]) == 2
    assert f"({cats[3]}) was removed" in capsys.readouterr().err
    assert main(["info", str(idx), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["removed"], doc["hidden"], doc["rows"]) == (4, 4, len(paths))
    assert main(["info", str(idx)]) == 0
    assert "4 hidden from every search" in capsys.readouterr().out
    # the positional is an index folder only with the removal options, which build options do not mix with
    assert main(["index", str(idx), "--remove", cats[0], "--kind", "hnsw"]) == 2
    assert "--kind build an index" in capsys.readouterr().err
    assert main(["index", str(cache)]) == 2
    assert "index needs --out INDEX_DIR" in capsys.readouterr().err


def test_pipeline_search_step_takes_a_filter_and_info_an_index(tmp_path, capsys):
    X = clustered(300, 8, centers=5, seed=1)
    labels = np.arange(300) % 3
    synthetic_cache(tmp_path / "c.h5", X, labels)
    np.save(tmp_path / "q.npy", X[0])
    (tmp_path / "p.toml").write_text("""
[pipeline]
name = "filtered"

[[steps]]
run = "index"
cache = "c.h5"
out = "idx"

[[steps]]
run = "search"
index = "idx"
vector = "q.npy"
k = 7
where = "label == 'c2' and id >= 100"

[[steps]]
run = "info"
cache = "idx"
""")
    assert main(["run", str(tmp_path / "p.toml"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "where label == 'c2' and id >= 100" in printed and "flat index of 300 x 8" in printed
    rows = [line.split() for line in printed.splitlines() if line.strip().split(" ")[0].isdigit()]
    shown = [r for r in rows if r[-1].startswith("v")]
    assert len(shown) == 7 and {r[2] for r in shown} == {"c2"}
    assert all(int(r[-1][1:7]) >= 100 and int(r[-1][1:7]) % 3 == 2 for r in shown)
