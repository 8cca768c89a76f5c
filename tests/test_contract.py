"""One contract for every command (README: Outputs, Exit codes): what --out may replace, what an exit
code means, and what is checked before any slow setup. Run as a user would, through `main([...])`."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from embedder.cli.main import COMMANDS, main
from embedder.extract.local import embed
from tests.conftest import REPO, env_with_repo, fast_config, make_tree

MODEL = ["--model", "resnet18", "--weights", "none", "--image-size", "32"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One small cache, an index and a probe of it, and a second cache of other images."""
    root = tmp_path_factory.mktemp("contract")
    tree = make_tree(root / "images")
    embed(fast_config(tree, root / "c.h5"))
    embed(fast_config(make_tree(root / "other", seed=1), root / "d.h5"))
    assert main(["index", str(root / "c.h5"), "--out", str(root / "c.index"), "--quiet"]) == 0
    assert main(["probe", str(root / "c.h5"), "--out", str(root / "c.probe")]) == 0
    np.save(root / "v.npy", np.ones((3, 4), np.float32))
    return root


def _writers(m, out: str) -> dict[str, list[str]]:
    """Every command that writes, with `out` as what it writes to."""
    image = str(m / "images" / "cat" / "cat_000.jpg")
    return {
        "embed": ["embed", str(m / "images"), *MODEL, "--out", out],
        "merge": ["merge", str(m / "c.h5"), "--out", out],
        "import-vectors": ["import-vectors", str(m / "v.npy"), "--out", out],
        "export-vectors": ["export-vectors", str(m / "c.h5"), "--out", out],
        "index": ["index", str(m / "c.h5"), "--out", out],
        "probe": ["probe", str(m / "c.h5"), "--out", out],
        "probe --plot": ["probe", str(m / "c.h5"), "--layer", "all", "--out", str(m / "sweep"), "--plot", out],
        "curate": ["curate", str(m / "c.h5"), "--out", out],
        "plot": ["plot", str(m / "c.h5"), "--out", out],
        "search --grid": ["search", str(m / "c.index"), "--id", "0", "--grid", out],
        "export": ["export", str(m / "c.probe"), "--out", out],
        "finetune": ["finetune", str(m / "images"), *MODEL, "--epochs", "1", "--out", out],
        "stylize": ["stylize", "--content", image, "--style", image, *MODEL, "--steps", "1", "--out", out],
        "make-samples": ["make-samples", out.rsplit("/", 1)[0], "--only", out.rsplit("/", 1)[1]],
        "watch": ["watch", str(m / "images"), *MODEL, "--out", out],
    }


SUFFIX = {"embed": ".h5", "watch": ".h5", "merge": ".h5", "import-vectors": ".h5", "plot": ".png", "search --grid": ".png",
          "probe --plot": ".png", "stylize": ".png", "export": ".pt"}
WRITERS = sorted(_writers(REPO, "x/digits"))


def test_every_command_that_writes_is_under_the_policy():
    """A command with an output path (--out, --grid, --plot) is in this file's list, so a new one cannot
    skip the policy unnoticed."""
    writing = {name for name, command in COMMANDS.items() if command.config is not None
               and {"out", "grid", "plot"} & {f.name for f in dataclasses.fields(command.config())}}
    listed = {name.split(" ")[0] for name in WRITERS}
    assert writing == listed


@pytest.mark.parametrize("name", WRITERS)
def test_a_folder_of_the_users_is_never_replaced(made, tmp_path, name, capsys):
    target = tmp_path / ("digits" if name == "make-samples" else "mine" + SUFFIX.get(name, ""))
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    code = main(_writers(made, str(target))[name])
    err = capsys.readouterr().err
    assert code == 2, err
    assert (target / "notes.txt").read_text() == "mine" and sorted(os.listdir(target)) == ["notes.txt"]
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("name", [n for n in WRITERS if n != "make-samples"])
def test_an_output_of_another_kind_is_never_replaced(made, tmp_path, name, capsys):
    """A feature cache given as --out of anything but a cache command, or a file embedder did not write."""
    if SUFFIX.get(name) == ".h5":
        target = tmp_path / "index.h5"  # an index folder named like a cache
        target.mkdir()
        for part in ("meta.json", "index.faiss", "rows.h5"):
            (target / part).write_bytes((made / "c.index" / part).read_bytes())
        keep = sorted(os.listdir(target))
    elif name in SUFFIX:
        target = tmp_path / f"theirs{SUFFIX[name]}"
        target.write_bytes(b"\x89PNG\r\n\x1a\n not ours" if SUFFIX[name] == ".png" else b"PK not ours")
        keep = target.read_bytes()
    else:
        target = tmp_path / "c.h5"
        target.write_bytes((made / "c.h5").read_bytes())
        keep = target.read_bytes()
    code = main(_writers(made, str(target))[name])
    err = capsys.readouterr().err
    assert code == 2, err
    assert (sorted(os.listdir(target)) if target.is_dir() else target.read_bytes()) == keep
    assert any(s in err for s in ("refusing to replace", "did not", "is a folder")), err


def test_overwrite_does_not_reach_what_embedder_did_not_write(made, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["index", str(made / "c.h5"), "--out", str(mine), "--overwrite"]) == 2
    assert (mine / "notes.txt").read_text() == "mine"
    assert "did not write" in capsys.readouterr().err


def test_the_issue_cases_cache_as_index_out(made, tmp_path, capsys):
    """`index out/lfw2.h5 --out out/lfw2.h5` turned the cache into an index folder."""
    cache = tmp_path / "lfw2.h5"
    cache.write_bytes((made / "c.h5").read_bytes())
    before = cache.read_bytes()
    assert main(["index", str(cache), "--out", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "is a feature cache, not an index" in err and "lfw2.index" in err
    assert cache.is_file() and cache.read_bytes() == before
    # and the hint that led there now names an index folder
    assert main(["search", str(cache), "--id", "3"]) == 2
    err = capsys.readouterr().err
    assert "is a feature cache, not an index folder" in err and f"--out {tmp_path / 'lfw2.index'}" in err


def test_same_inputs_rebuild_other_inputs_need_overwrite(made, tmp_path, capsys):
    out = str(tmp_path / "i")
    assert main(["index", str(made / "c.h5"), "--out", out, "--quiet"]) == 0
    assert main(["index", str(made / "c.h5"), "--out", out, "--quiet"]) == 0  # a rerun rebuilds
    capsys.readouterr()
    assert main(["index", str(made / "d.h5"), "--out", out, "--quiet"]) == 2
    assert "made from" in capsys.readouterr().err and "--overwrite" in capsys.readouterr().err + "--overwrite"
    assert json.loads((tmp_path / "i" / "meta.json").read_text())["cache"].endswith("c.h5")
    assert main(["index", str(made / "d.h5"), "--out", out, "--quiet", "--overwrite"]) == 0
    assert json.loads((tmp_path / "i" / "meta.json").read_text())["cache"].endswith("d.h5")


def test_a_rebuilt_index_says_which_files_beside_it_it_dropped(made, tmp_path, capsys):
    out = tmp_path / "i"
    assert main(["index", str(made / "c.h5"), "--out", str(out), "--quiet"]) == 0
    assert main(["map", str(out), "--method", "pca", "--quiet"]) == 0
    assert (out / "map.h5").is_file()
    capsys.readouterr()
    assert main(["index", str(made / "c.h5"), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert not (out / "map.h5").exists()
    assert "map.h5" in err and f"embedder map {out}" in err


def test_a_marked_output_is_recognised_as_its_kind(made, tmp_path):
    from embedder.outputs import INDEX, PICTURE, PROBE, what_is_at

    assert what_is_at(made / "c.index").kind is INDEX and what_is_at(made / "c.probe").kind is PROBE
    assert what_is_at(made / "c.index").inputs == (os.path.realpath(made / "c.h5"),)
    assert main(["plot", str(made / "c.h5"), "--out", str(tmp_path / "p.png")]) == 0
    assert what_is_at(tmp_path / "p.png").kind is PICTURE
    assert what_is_at(tmp_path / "nothing") is None


# ------------------------------------------------------------------------------ exit codes


def test_exit_2_for_a_bad_value_in_every_command(capsys):
    """The table's 2: a usage mistake is one line, whatever the command."""
    for name in COMMANDS:
        if name in ("run",):
            continue
        code = _exit_of([name, "--no-such-flag"])
        assert code == 2, name
    assert "Did you mean" in _stderr_of(["index", "c.h5", "--memory-budjet", "3G"])


def _exit_of(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return int(exc.code)


def _stderr_of(argv: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "embedder", *argv], env=env_with_repo(), capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL)
    return proc.stderr


def test_exit_2_for_a_missing_input_and_1_for_the_system(made, tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing.h5")]) == 2
    assert main(["probe", str(made / "c.index")]) == 2  # an index is not a cache: named as one
    err = capsys.readouterr().err
    assert "is an index folder, not a feature cache" in err and str(made / "c.h5") in err
    # The system's refusal: /sys is a read-only (or root-only) file system on Linux, for root too.
    assert main(["index", str(made / "c.h5"), "--out", "/sys/embedder-test.index"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("embedder: error: ") and err.count("\n") == 1 and "/sys" in err


def test_a_bug_is_70_and_nothing_else_is(monkeypatch, made, capsys):
    from embedder.cli import commands

    def broken(config, args):
        raise RuntimeError("boom")

    monkeypatch.setitem(COMMANDS, "info", dataclasses.replace(COMMANDS["info"], handler=broken))
    assert main(["info", str(made / "c.h5")]) == 70
    assert "This is a bug in embedder" in capsys.readouterr().err
    assert commands.info is not broken


def test_a_query_image_that_fails_fails_the_command(made, capsys):
    good = str(made / "images" / "cat" / "cat_000.jpg")
    assert main(["search", str(made / "c.index"), "--image", good, "/nonexistent.png", "-k", "2"]) == 2
    captured = capsys.readouterr()
    assert "cat_000.jpg" in captured.out and "ERROR" in captured.out
    assert "1 of 2 query images could not be read" in captured.err


def test_a_missing_query_image_is_refused_before_the_index_is_opened(tmp_path, capsys):
    """The order proves it, not a stopwatch: the index does not exist either, and the image is named."""
    assert main(["search", str(tmp_path / "no-index"), "--image", "/nonexistent.png"]) == 2
    err = capsys.readouterr().err
    assert "No such file: /nonexistent.png" in err and "index" not in err


def test_embed_checks_source_and_out_before_the_model_is_built(tmp_path, capsys):
    """The model name is unknown too, and the refusal names SOURCE: nothing was resolved or built first."""
    code = main(["embed", "/nonexistent", "--model", "no_such_model", "--out", str(tmp_path / "c.h5")])
    err = capsys.readouterr().err
    assert code == 2 and "SOURCE /nonexistent does not exist" in err and "no_such_model" not in err
    folder = tmp_path / "x.h5"
    folder.mkdir()
    assert main(["embed", str(tmp_path), "--model", "no_such_model", "--out", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_pipeline_stops_at_a_failed_step(made, tmp_path, capsys):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f"""
[[steps]]
run = "search"
index = "{made / 'c.index'}"
image = ["/nonexistent.png", "{made / 'images' / 'cat' / 'cat_000.jpg'}"]

[[steps]]
run = "index"
cache = "{made / 'c.h5'}"
out = "{tmp_path / 'never'}"
""")
    assert main(["run", str(pipeline), "--quiet"]) == 2
    out = capsys.readouterr().out
    assert "done" not in out and not (tmp_path / "never").exists()


def test_a_wrong_toml_type_is_a_usage_error_not_a_bug(tmp_path, capsys):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[[steps]]\nrun = "embed"\nsource = "s"\nmodel = "resnet18"\nout = "c.h5"\nbatch_size = "lots"\n')
    assert main(["run", str(pipeline)]) == 2
    assert "batch_size" in capsys.readouterr().err
    pipeline.write_text('[[steps]]\nrun = "embed"\nsource = "s"\nmodel = "resnet18"\nout = "c.h5"\nbatchsize = 4\n')
    assert main(["run", str(pipeline)]) == 2
    assert "Did you mean 'batch_size'" in capsys.readouterr().err
    pipeline.write_text('[[steps]]\nrun = "embed"\nsource = "s"\nmodel = "resnet18"\nout = "c.h5"\ndtype = 3\n')
    assert main(["run", str(pipeline)]) == 2
    assert "dtype must be a string" in capsys.readouterr().err


def test_toml_keys_are_the_flag_names(tmp_path):
    from embedder.extract.config import EmbedConfig
    from embedder.options import from_table

    c = from_table(EmbedConfig, {"source": "s", "model": "m", "out": "c.h5", "dtype": "float16",
                                 "layer": ["avgpool", "layer4"]}, None, "embed")
    assert c.feature_dtype == "float16" and c.space.layer == "avgpool" and c.space.extra_layers == ("layer4",)
    legacy = from_table(EmbedConfig, {"source": "s", "model": "m", "out": "c.h5", "feature_dtype": "float16"},
                        None, "embed")
    assert legacy.feature_dtype == "float16"  # pipelines written before keep working


def test_a_closed_pipe_ends_quietly(made):
    proc = subprocess.Popen([sys.executable, "-m", "embedder", "dedup", str(made / "c.h5"), "--threshold", "-1",
                             "--quiet"], env=env_with_repo(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    # Quietly: nothing but dedup's own notices (threshold -1 makes one group of every row, which it says).
    assert proc.wait() == 141 and all("near dup" in line or "near-dup" in line for line in err.splitlines()), err


def test_a_busy_port_is_one_line_before_serving(made, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(made / "c.index"), "--port", str(port)]) == 1
    captured = capsys.readouterr()
    assert "serving" not in captured.out and f"port {port} is in use" in captured.err


@pytest.mark.parametrize("argv", [["plot", "C", "--out", "x.h5"], ["plot", "C", "--out", "myplot"],
                                  ["search", "I", "--id", "1", "--grid", "x.h5"]])
def test_a_picture_named_as_another_format_is_refused_at_once(made, argv, capsys):
    argv = [str(made / "c.h5") if a == "C" else str(made / "c.index") if a == "I" else a for a in argv]
    assert _exit_of(argv) == 2
    assert ".png" in capsys.readouterr().err


def test_evaluate_names_each_side_of_a_mismatch(made, tmp_path, capsys):
    other = tmp_path / "o.h5"
    embed(fast_config(made / "images", other, image_size=48))
    assert main(["evaluate", str(made / "c.probe"), str(other)]) == 2
    err = capsys.readouterr().err
    assert "cache has" in err
    line = next(x for x in err.splitlines() if "preprocessing" in x or "image_size" in x)
    cached, asked = line.split("cache has", 1)[1].split("this run asks for")
    assert '"crop_size": 48' in cached and '"crop_size": 48' not in asked


# ------------------------------------------------------------------------------ vocabulary


def test_did_you_mean_for_models_flags_layers_and_columns(made, capsys):
    assert main(["embed", str(made / "images"), "--model", "efficientnet_lte0", "--out", str(made / "z.h5")]) == 2
    assert "Did you mean 'efficientnet_lite0'" in capsys.readouterr().err
    assert main(["search", str(made / "c.index"), "--id", "0", "--where", "lable == 'cat'"]) == 2
    assert "did you mean 'label'" in capsys.readouterr().err


def test_one_spelling_of_top_k_and_one_auto_batch_size():
    from embedder.cli.main import build_parser
    from embedder.extract.config import EmbedConfig
    from embedder.learn.config import PredictConfig
    from embedder.models.batchsize import batch_size_for

    for command, rest in (("search", ["I", "--id", "1"]), ("predict", ["M.pt", "a.jpg"])):
        for spelling in ("-k", "--top-k"):
            args = build_parser(only=command).parse_args([command, *rest, spelling, "3"])
            assert (args.k if command == "search" else args.top_k) == 3
    assert EmbedConfig.of(source="s", model="m", out="c.h5", device="cpu").batch_size == batch_size_for("cpu")
    assert PredictConfig(model="m.pt", images=("a",)).batch_size is None  # auto, resolved as embed's


def test_a_layer_has_one_name_everywhere(tmp_path, capsys):
    """Lite0's pooled feature is `avgpool` in the README, `--layer` and every report, with its node beside it."""
    cache = tmp_path / "l.h5"
    embed(fast_config(make_tree(tmp_path / "im", per_class=2), cache, model="efficientnet_lite0"))
    assert main(["info", str(cache), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layer_labels"] == {"global_pool.flatten": "avgpool (global_pool.flatten)"}
    assert doc["components"]["layer"] == "global_pool.flatten"  # the fingerprint is unchanged
    assert main(["index", str(cache), "--out", str(tmp_path / "i"), "--quiet"]) == 0
    assert "layer avgpool (global_pool.flatten)" in capsys.readouterr().out


def test_export_never_writes_its_onnx_sidecar_over_a_file_of_the_users(made, tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(b"my own model")
    assert main(["export", str(made / "c.probe"), "--out", str(tmp_path / "m.pt")]) == 2
    assert (tmp_path / "m.onnx").read_bytes() == b"my own model" and not (tmp_path / "m.pt").exists()
    assert "m.onnx" in capsys.readouterr().err
