"""One query path: the same queries asked through `embedder search --json` and through the service
give the same hits (ids, paths, labels, scores, ranks) and the same metadata, as both only turn
their input into a Query (embedder.search.ask) and its answer into their output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.errors import ConfigError
from embedder.extract.local import embed
from embedder.search.ask import Example, Query, answer
from embedder.search.build import build_index
from embedder.search.query import SearchIndex
from embedder.serve.app import create_app
from tests.conftest import fast_config, make_tree
from tests.loopback import running
from tests.test_service import http, multipart_files, quoted


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("query_path")
    tree = make_tree(root / "img", per_class=5)
    cache, index_dir = root / "c.h5", root / "idx"
    embed(fast_config(tree, cache))
    build_index(cache, index_dir, kind="flat", progress=False)
    with FeatureCache(cache) as c:
        paths, features = c.paths, c.features()
    with running(create_app(index_dir)) as (host, port):
        yield root, tree, index_dir, paths, features, f"http://{host}:{port}"


def cli_hits(capsys, *args) -> list[dict]:
    capsys.readouterr()
    code = main(["search", *map(str, args), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    (line,) = [json.loads(text) for text in out.out.splitlines()]
    return line["hits"]


def service_hits(reply) -> list[dict]:
    assert reply.status == 200, reply.body
    hits = json.loads(reply.body)["hits"]
    for hit in hits:
        assert hit.pop("thumbnail") == f"/thumbnail/{hit['id']}"  # the service's own addition
    return hits


def assert_same(cli: list[dict], service: list[dict]) -> None:
    assert cli, "a query that finds nothing compares nothing"
    assert all(h["metadata"] for h in cli)  # the index has metadata columns: they are compared too
    assert cli == service


def test_by_id_with_k_the_same_through_both(served, capsys):
    _, _, index_dir, _, _, url = served
    assert_same(cli_hits(capsys, index_dir, "--id", 3, "-k", 4), service_hits(http("GET", f"{url}/search/id/3?k=4")))


def test_several_positives_and_negatives_the_same_through_both(served, capsys):
    _, tree, index_dir, paths, _, url = served
    a, b, c = paths.index("cat/cat_000.jpg"), paths.index("dog/dog_001.png"), paths.index("fox/fox_002.jpg")
    body, headers = multipart_files([("file", "a.jpg", (tree / paths[a]).read_bytes()),
                                     ("file", "b.png", (tree / paths[b]).read_bytes())])
    service = service_hits(http("POST", f"{url}/search/image?k=6&negative_id={c}", body, headers))
    cli = cli_hits(capsys, index_dir, "--image", tree / paths[a], tree / paths[b], "--negative-id", c, "-k", 6)
    assert_same(cli, service)
    # ids only: one positive row, two negative rows
    assert_same(cli_hits(capsys, index_dir, "--id", a, "--negative-id", b, "--negative-id", c, "-k", 5),
                service_hits(http("GET", f"{url}/search/id/{a}?k=5&negative_id={b}&negative_id={c}")))


def test_threshold_and_filter_the_same_through_both(served, capsys, tmp_path):
    _, _, index_dir, paths, features, url = served
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    scores = unit @ unit[3]
    T = float(np.sort(scores)[-8]) - 1e-4  # eight rows in range, with room for float32
    assert_same(cli_hits(capsys, index_dir, "--id", 3, "--min-score", T, "--max-results", 5),
                service_hits(http("GET", f"{url}/search/id/3?k=5&min_score={T}")))
    where = "label == 'dog'"
    assert_same(cli_hits(capsys, index_dir, "--id", 3, "--negative-id", 4, "-k", 3, "--where", where),
                service_hits(http("GET", f"{url}/search/id/3?k=3&negative_id=4&where={quoted(where)}")))
    np.save(tmp_path / "q.npy", features[7])
    cli = cli_hits(capsys, index_dir, "--vector", tmp_path / "q.npy", "--min-score", -1, "--max-results", 20,
                   "--where", where)
    body = json.dumps({"vector": features[7].tolist(), "k": 20, "min_score": -1, "where": where}).encode()
    service = service_hits(http("POST", f"{url}/search/vector", body, {"Content-Type": "application/json"}))
    assert_same(cli, service)
    assert {h["label"] for h in cli} == {"dog"} and len(cli) == sum(p.startswith("dog/") for p in paths)


def test_answer_is_the_library_call_both_front_ends_make(served):
    """answer(index, Query) gives what the front ends show; each example its own query unless combined,
    and exclude_examples leaves the examples' rows out."""
    _, _, index_dir, _, features, _ = served
    index = SearchIndex.open(index_dir)
    per_example = answer(index, Query((Example.of_id(3), Example.of_vector(features[5])), k=4))
    assert [hits[0].id for hits in per_example] == [3, 5] and all(len(hits) == 4 for hits in per_example)
    assert per_example[0] == index.search_ids([3], 4)[0]
    (combined,) = answer(index, Query((Example.of_id(3), Example.of_id(5)), k=4, exclude_examples=True, combine=True))
    assert len(combined) == 4 and not {3, 5} & {h.id for h in combined}
    assert [h.rank for h in combined] == [1, 2, 3, 4]
    (ranged,) = answer(index, Query((Example.of_id(3),), k=None, threshold=-1.0, where="id < 10", exclude=(4, 5)))
    assert sorted(h.id for h in ranged) == [0, 1, 2, 3, 6, 7, 8, 9]
    with pytest.raises(ConfigError, match="only for a range search"):
        Query((Example.of_id(3),), k=None)
