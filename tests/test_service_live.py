"""The running service: it serves the index folder's current generation (rows removed or added
while it runs), refuses a filter nested too deeply, and keeps answering /health while slow clients
hold sockets (header and body deadlines, a connection cap: embedder.serve.server)."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.parse

import numpy as np
import pytest

from embedder.search.build import build_index
from embedder.search.removal import remove_rows
from embedder.search.update import update_index
from embedder.serve.app import create_app
from embedder.serve.config import ServerLimits
from embedder.serve.server import uvicorn_options
from tests.loopback import running
from tests.test_index import clustered, synthetic_cache
from tests.test_service import http

N, GROWN, D = 150, 200, 16


@pytest.fixture
def folder(tmp_path):
    X = clustered(GROWN, D, centers=10)
    build_index(synthetic_cache(tmp_path / "c.h5", X[:N]), tmp_path / "idx", kind="flat", progress=False)
    return tmp_path, X


def grow(tmp, X) -> None:
    """The cache gains rows (same feature space, same first rows) and the index is updated in place."""
    (tmp / "c.h5").unlink()
    synthetic_cache(tmp / "c.h5", X)
    update_index(tmp / "c.h5", tmp / "idx", progress=False)


def get(url: str):
    r = http("GET", url)
    return r.status, r.json()


def test_a_running_service_serves_removals_and_updates_made_while_it_runs(folder):
    tmp, X = folder
    app = create_app(tmp / "idx")
    with running(app) as (host, port):
        url = f"http://{host}:{port}"
        assert get(f"{url}/health")[1]["ntotal"] == N
        assert get(f"{url}/search/id/{N + 10}")[0] == 404
        assert get(f"{url}/search/id/3")[0] == 200

        remove_rows(tmp / "idx", ["v000003.png"], progress=False)
        status, body = get(f"{url}/search/id/3")
        assert status == 410 and "was removed" in body["detail"]
        assert 3 not in [h["id"] for h in get(f"{url}/search/id/0?k={N}")[1]["hits"]]

        grow(tmp, X)
        assert get(f"{url}/health")[1]["ntotal"] == GROWN
        status, body = get(f"{url}/search/id/{N + 10}")
        assert status == 200 and body["hits"][0]["id"] == N + 10
        r = http("POST", f"{url}/search/vector", json.dumps({"vector": X[N + 20].tolist(), "k": 1}).encode(),
                 {"Content-Type": "application/json"})
        assert r.status == 200 and r.json()["hits"][0]["id"] == N + 20
        assert get(f"{url}/search/id/0?negative_id={N + 30}")[0] == 200  # a new row as a negative example
        assert get(f"{url}/search/id/0?negative_id={GROWN}")[0] == 422  # past the new last row
        assert get(f"{url}/search/id/3")[0] == 410  # the update kept the removal
        assert app.state.live.reloads == 2


def test_a_query_holding_the_old_generation_finishes_on_it(folder):
    tmp, X = folder
    live = create_app(tmp / "idx").state.live
    old = live.current()
    grow(tmp, X)
    new = live.current()
    assert new is not old and (old.ntotal, new.ntotal) == (N, GROWN)
    # The old generation's files are gone from the folder; what it holds still answers.
    assert old.search_ids([5], k=3)[0][0].id == 5
    assert old.search(X[N + 1][None], k=1)[0][0].id < N


def test_an_index_of_another_width_is_a_503_that_says_to_restart(folder):
    tmp, _ = folder
    app = create_app(tmp / "idx")
    other = tmp / "other"
    build_index(synthetic_cache(tmp / "o.h5", clustered(60, D * 2, centers=3)), other, kind="flat", progress=False)
    shutil.rmtree(tmp / "idx")
    other.rename(tmp / "idx")
    with running(app) as (host, port):
        for path in ("/health", "/search/id/0"):
            status, body = get(f"http://{host}:{port}{path}")
            assert status == 503 and "restart `embedder serve`" in body["detail"] and "32-d" in body["detail"]


def test_a_filter_nested_too_deeply_is_a_422_not_a_500_and_exit_2_not_70(folder, capsys):
    from embedder.cli.main import main

    tmp, _ = folder
    deep = "(" * 300 + "id == 1" + ")" * 300
    with running(create_app(tmp / "idx")) as (host, port):
        status, body = get(f"http://{host}:{port}/search/id/0?where={urllib.parse.quote(deep)}")
        assert status == 422 and "nested too deeply" in body["detail"]
    capsys.readouterr()
    assert main(["search", str(tmp / "idx"), "--id", "0", "--where", deep]) == 2
    assert "nested too deeply" in capsys.readouterr().err


# ---------------------------------------------------------------- slow clients


def slow_clients(port: int, n: int, head: bytes = b"GET /health HTTP/1.1\r\nHost: loc") -> list[socket.socket]:
    """n connections that send the start of a request head and then nothing."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(head)
        socks.append(s)
    return socks


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1024) == b""  # blocks until the server closes it (the socket's timeout guards a hang)
    except ConnectionResetError:
        return True


def test_health_answers_while_slow_clients_hold_sockets_and_they_are_dropped(folder):
    tmp, _ = folder
    limits = ServerLimits(header_timeout=2.0, body_timeout=2.0, max_connections=100)
    with running(create_app(tmp / "idx"), **uvicorn_options(limits)) as (host, port):
        head_only = slow_clients(port, 40)
        body = b"POST /search/vector HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        body_short = slow_clients(port, 10, body + b"Content-Length: 1000\r\n\r\n{\"vector\": [")
        r = http("GET", f"http://{host}:{port}/health")
        assert r.status == 200 and r.json()["ntotal"] == N
        assert all(closed_by_server(s) for s in head_only + body_short)  # each past its deadline
        for s in head_only + body_short:
            s.close()
        assert http("GET", f"http://{host}:{port}/health").status == 200


def test_past_the_connection_cap_a_request_gets_a_503_at_once(folder):
    tmp, _ = folder
    limits = ServerLimits(header_timeout=600.0, max_connections=20)
    with running(create_app(tmp / "idx"), **uvicorn_options(limits)) as (host, port):
        held = slow_clients(port, 20)
        r = http("GET", f"http://{host}:{port}/health")
        assert r.status == 503
        for s in held:
            s.close()
        for _ in range(200):  # the server learns of the closes as its loop gets to them
            r = http("GET", f"http://{host}:{port}/health")
            if r.status == 200:
                break
            time.sleep(0.05)
        assert r.status == 200


def test_serve_limits_are_checked_and_reach_uvicorn(capsys):
    from embedder.cli.main import main
    from embedder.serve.config import ServeConfig

    limits = ServeConfig(index="idx", header_timeout=3, max_connections=7).server_limits
    assert limits == ServerLimits(3, ServerLimits.body_timeout, 7)
    options = uvicorn_options(limits)
    assert options["limit_concurrency"] == 7 and options["http"].header_timeout == 3
    assert np.isfinite(options["http"].body_timeout)
    for flags in (["--header-timeout", "0"], ["--body-timeout", "inf"], ["--max-connections", "0"]):
        assert main(["serve", "idx", *flags]) == 2
        assert "must be" in capsys.readouterr().err


def test_health_says_when_the_index_is_out_of_step_with_its_cache(folder, monkeypatch):
    """The cache gains rows (an embed rerun, a sync) while the index is served: /health names the
    command that brings the index in step, and stops saying it once the index is updated."""
    from embedder.serve import app as served

    monkeypatch.setattr(served._StepCheck, "CHECK_S", 0.0)  # re-read at every request, for the test
    tmp, X = folder
    with running(create_app(tmp / "idx")) as (host, port):
        health = f"http://{host}:{port}/health"
        assert get(health)[1]["out_of_step"] is None
        (tmp / "c.h5").unlink()
        synthetic_cache(tmp / "c.h5", X)  # the cache grew; the index was not updated
        status, body = get(health)
        assert status == 200 and "--update" in body["out_of_step"] and f"{N}" in body["out_of_step"]
        update_index(tmp / "c.h5", tmp / "idx", progress=False)
        status, body = get(health)
        assert body["ntotal"] == GROWN and body["out_of_step"] is None
