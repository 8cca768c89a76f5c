"""http(s) URL rows, fetched from a real HTTP server on 127.0.0.1 (tests/loopback.py): good images,
404s, slow and dripping answers, bodies cut short, oversized ones, a server that is busy once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from embedder._version import __version__
from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.data.fetch import DEADLINE_FACTOR, Fetcher, FetchSettings, kept_path, url_hash
from embedder.data.sources import list_source
from embedder.errors import BadImageError
from embedder.extract.local import embed
from tests.conftest import cli_args, fast_config, make_tree
from tests.loopback import LoopbackServer

FAST = FetchSettings(timeout=0.3, retries=2, backoff=0.01, max_bytes=1 << 20)
# Where an answer is expected, the timeout is not under test: a busy machine may be slow to answer.
PATIENT = FetchSettings(timeout=30.0, retries=2, backoff=0.01, max_bytes=1 << 20)


@pytest.fixture
def images(tmp_path):
    tree = make_tree(tmp_path / "imgs", classes=("a", "b"), per_class=4)
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(tree.rglob("*.*")):
        (flat / f.name).write_bytes(f.read_bytes())
        os.utime(flat / f.name, (1_700_000_000, 1_700_000_000))
    return flat


@pytest.fixture
def server(images):
    with LoopbackServer(images, slow_s=1.0, flaky=1) as srv:
        yield srv


def _fetch(server, kind, name, settings=PATIENT):
    return Fetcher(settings).get(server.url(kind, name))


def _reason(server, kind, name, settings=FAST) -> str:
    with pytest.raises(BadImageError) as err:
        _fetch(server, kind, name, settings)
    return err.value.reason


def test_a_good_url_gives_the_files_bytes_and_its_last_modified_time(server, images):
    name = min(os.listdir(images))
    got = _fetch(server, "img", name)
    assert got.data == (images / name).read_bytes() and got.mtime == 1_700_000_000
    assert server.agents == {f"embedder/{__version__} (image embedding; python-urllib3)"}  # says who asks


def test_a_404_is_final_at_once_and_names_the_status(server, images):
    name = min(os.listdir(images))
    assert _reason(server, "missing", name) == "HTTP 404 Not Found"
    assert server.hits[f"/missing/{name}"] == 1  # not retried


def test_a_busy_server_is_retried_with_backoff_and_then_succeeds(server, images):
    name = min(os.listdir(images))
    assert _fetch(server, "flaky", name).data == (images / name).read_bytes()
    assert server.hits[f"/flaky/{name}"] == 2
    server.flaky = 10  # busy for longer than the retries last: the last status is the reason
    other = sorted(os.listdir(images))[1]
    assert _reason(server, "flaky", other) == "HTTP 503 Service Unavailable after 3 attempts"
    assert server.hits[f"/flaky/{other}"] == 3


def test_slow_dripping_and_truncated_answers_are_bounded_retried_errors(server, images):
    name = min(os.listdir(images))
    size = (images / name).stat().st_size
    # Each attempt ended at the timeout: had one waited for the server (1 s), it would have had the image.
    assert _reason(server, "slow", name) == "timed out after 0.3 s waiting for the server (3 attempts)"
    reason = _reason(server, "drip", name, FetchSettings(timeout=0.3, retries=0, max_bytes=1 << 20))
    assert reason.startswith(f"download took over {0.3 * DEADLINE_FACTOR:g} s")
    assert _reason(server, "truncated", name) == f"truncated download: {size // 2:,} of {size:,} bytes (3 attempts)"
    assert server.hits[f"/truncated/{name}"] == 3


def test_size_cap_refuses_before_reading_and_connection_refused_is_named(server, images):
    name = min(os.listdir(images))
    assert "over the --max-download-mb cap (1 MB)" in _reason(server, "big", name)
    small = FetchSettings(timeout=0.3, retries=0, max_bytes=100)
    assert "over the --max-download-mb cap" in _reason(server, "img", name, small)
    with pytest.raises(BadImageError, match=r"cannot connect: .*Connection refused \(3 attempts\)"):
        Fetcher(FAST).get("http://127.0.0.1:9/x.jpg")  # the discard port: nothing listens


def _url_list(tmp_path, server, images, kinds=None, name="urls.txt"):
    names = sorted(os.listdir(images))
    kinds = kinds or {}
    urls = [server.url(kinds.get(n, "img"), n) for n in names]
    (tmp_path / name).write_text("url\n" + "".join(u + "\n" for u in urls))
    return urls


@pytest.mark.parametrize("workers", [0, 1])
def test_url_list_features_equal_the_folders_bit_for_bit_and_failures_are_recorded(tmp_path, server, images, workers):
    names = sorted(os.listdir(images))
    urls = _url_list(tmp_path, server, images, {names[1]: "missing", names[2]: "truncated"})
    embed(fast_config(images, tmp_path / "folder.h5"))
    report = embed(fast_config(tmp_path / "urls.txt", tmp_path / "urls.h5", workers=workers,
                               fetch_timeout=30.0, fetch_retries=1))
    assert report.embedded == len(names) - 2
    with FeatureCache(tmp_path / "folder.h5") as f, FeatureCache(tmp_path / "urls.h5") as u:
        assert dict(u.errors) == {urls[1]: "HTTP 404 Not Found",
                                  urls[2]: f"truncated download: {(images / names[2]).stat().st_size // 2:,} of "
                                           f"{(images / names[2]).stat().st_size:,} bytes (2 attempts)"}
        by_name = {p: i for i, p in enumerate(f.paths)}
        ff, uf, fc, uc = f.features(), u.features(), f.columns(), u.columns()
        for i, url in enumerate(u.paths):
            j = by_name[url.rsplit("/", 1)[1]]
            assert np.array_equal(uf[i], ff[j]), url
            assert uc["size"][i] == fc["size"][j] and uc["mtime"][i] == 1_700_000_000
            assert (uc["width"][i], uc["height"][i]) == (fc["width"][j], fc["height"][j])
    assert sorted(os.listdir(tmp_path)) == ["flat", "folder.h5", "imgs", "urls.h5", "urls.txt"]  # nothing kept


def test_appending_urls_fetches_only_the_new_ones(tmp_path, server, images):
    names = sorted(os.listdir(images))
    urls = [server.url("img", n) for n in names]
    (tmp_path / "urls.txt").write_text("\n".join(urls[:5]) + "\n")
    config = fast_config(tmp_path / "urls.txt", tmp_path / "c.h5")
    embed(config)
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    report = embed(config)
    assert (report.already_cached, report.embedded) == (5, len(urls) - 5)
    assert all(server.hits[f"/img/{n}"] == 1 for n in names)


def test_keep_downloads_writes_each_body_once_and_reads_it_back_without_the_server(tmp_path, images, capsys):
    names = sorted(os.listdir(images))
    keep = tmp_path / "kept"
    with LoopbackServer(images) as srv:
        urls = _url_list(tmp_path, srv, images)
        embed(fast_config(tmp_path / "urls.txt", tmp_path / "first.h5", keep_downloads=str(keep)))
    for url, name in zip(urls, names):
        path = kept_path(keep, url)
        assert path is not None and path.read_bytes() == (images / name).read_bytes()
        assert path.name.startswith(url_hash(url)) and path.suffix == os.path.splitext(name)[1]
        h = url_hash(url)  # the layout --keep-downloads' help and the README describe
        assert path == keep / h[:2] / f"{h}{os.path.splitext(name)[1]}"
    manifest = (keep / "urls.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[1] for line in manifest) == sorted(urls)
    assert {line.split("\t")[0] for line in manifest} == {kept_path(keep, u).relative_to(keep).as_posix() for u in urls}
    from embedder.cli.main import main

    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    assert "DIR/<h[:2]>/<h><.ext>" in " ".join(capsys.readouterr().out.split())
    # ... and the docs (the CLI reference is generated from that help, so the two cannot drift apart)
    assert "DIR/<h[:2]>/<h><.ext>" in (Path(__file__).parents[1] / "docs" / "reference" / "cli.md").read_text()
    # The server is gone: a second model's run reads every row from the kept files.
    report = embed(fast_config(tmp_path / "urls.txt", tmp_path / "second.h5", keep_downloads=str(keep),
                               fetch_retries=0, fetch_timeout=0.2))
    assert report.errors == [] and report.embedded == len(names)
    with FeatureCache(tmp_path / "first.h5") as a, FeatureCache(tmp_path / "second.h5") as b:
        assert a.paths == b.paths and np.array_equal(a.features(), b.features())


def test_urls_through_the_cli_report_failures_in_one_line_each(tmp_path, server, images, capsys):
    names = sorted(os.listdir(images))
    _url_list(tmp_path, server, images, {names[0]: "missing"})
    config = fast_config(tmp_path / "urls.txt", tmp_path / "c.h5", fetch_timeout=30.5, fetch_retries=0)
    assert main(["embed", *cli_args(config)]) == 0
    captured = capsys.readouterr()
    assert "HTTP 404 Not Found" in captured.out + captured.err and "Traceback" not in captured.err
    with FeatureCache(tmp_path / "c.h5") as c:
        assert len(c) == len(names) - 1
        assert "--fetch-timeout 30.5" in c.spec.command and "--fetch-retries 0" in c.spec.command


def test_a_url_listing_is_deterministic_and_keeps_urls_verbatim(tmp_path, server, images):
    urls = _url_list(tmp_path, server, images)
    (tmp_path / "urls.txt").write_text("\n".join(urls + urls[:2]) + "\n")
    a, b = list_source(tmp_path / "urls.txt"), list_source(tmp_path / "urls.txt")
    assert a.paths == b.paths == urls and [r for _, r in a.ignored] == ["listed more than once in the file list"] * 2


def test_url_rows_embed_on_the_sharded_path_as_locally(tmp_path, server, images):
    from tests.test_cache import assert_same_cache
    from tests.test_shards import embed_sharded

    names = sorted(os.listdir(images))
    _url_list(tmp_path, server, images, {names[3]: "missing"})
    embed(fast_config(tmp_path / "urls.txt", tmp_path / "local.h5"))
    _, (rows, complete) = embed_sharded(fast_config(tmp_path / "urls.txt", tmp_path / "sharded.h5"), shard_size=4)
    assert rows == len(names) - 1 and complete
    assert_same_cache(tmp_path / "local.h5", tmp_path / "sharded.h5")  # the 404 in the errors table of both


def test_close_drops_the_queued_downloads(server, images):
    names = sorted(os.listdir(images))
    fetcher = Fetcher(FetchSettings(threads=1, timeout=2.0, retries=0))
    fetcher.prefetch([server.url("slow", n) for n in names])  # one thread: at most one runs, the rest wait
    fetcher.close()
    fetcher._threads.shutdown(wait=True)  # until the one that was running (if any) has finished
    # Proved by what reached the server, not by a pause: the queued downloads never started.
    assert sum(server.hits[f"/slow/{n}"] for n in names) <= 1 < len(names)


def test_retry_errors_reads_failed_rows_again_and_keeps_the_newest_outcome(tmp_path, server, images):
    names = sorted(os.listdir(images))
    server.flaky = 1  # each flaky URL answers 503 once, then the image
    urls = _url_list(tmp_path, server, images, {names[0]: "flaky", names[1]: "missing"})
    config = fast_config(tmp_path / "urls.txt", tmp_path / "c.h5", fetch_retries=0)
    first = embed(config)
    assert sorted(r for _, r in first.errors) == ["HTTP 404 Not Found", "HTTP 503 Service Unavailable"]
    assert embed(config).embedded == 0  # a plain rerun leaves the errors table alone
    retried = embed(fast_config(tmp_path / "urls.txt", tmp_path / "c.h5", fetch_retries=0, retry_errors=True))
    assert (retried.already_cached, retried.embedded) == (len(names) - 2, 1)
    embed(fast_config(tmp_path / "urls.txt", tmp_path / "ref.h5", fetch_retries=3))  # the 503 is gone by now
    with FeatureCache(tmp_path / "c.h5") as c, FeatureCache(tmp_path / "ref.h5") as ref:
        assert c.errors == [(urls[1], "HTTP 404 Not Found")]  # the 404 again, once; the 503 is a row now
        assert sorted(c.paths) == sorted(ref.paths) and len(c) == len(names) - 1
        row = {p: i for i, p in enumerate(ref.paths)}
        # The retried row was embedded in a batch of its own: equal within fp32's batch-size effect (~1e-6).
        assert np.allclose(c.features(), ref.features()[[row[p] for p in c.paths]], rtol=0, atol=1e-5)
    from embedder.errors import ConfigError
    from embedder.extract.ray import embed_ray

    with pytest.raises(ConfigError, match="--retry-errors works with --backend local"):
        embed_ray(fast_config(tmp_path / "urls.txt", tmp_path / "r.h5", retry_errors=True))
