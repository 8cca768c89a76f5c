"""Every option declared once: the CLI flags and the pipeline keys come from the config fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from embedder.cli.main import COMMANDS, build_parser
from embedder.cli.pipeline import STEP_KINDS
from embedder.errors import ConfigError
from embedder.extract.config import EmbedConfig
from embedder.learn.config import ProbeConfig
from embedder.options import from_arguments, from_table, specs, to_arguments
from embedder.search.config import IndexConfig, SearchConfig

CONFIGS = {name: command.config() for name, command in COMMANDS.items() if command.config is not None}


def parse(command: str, argv: list[str]):
    return from_arguments(CONFIGS[command], build_parser().parse_args([command, *argv]))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_field_is_declared_and_becomes_a_flag(name):
    cls = CONFIGS[name]
    parser = build_parser(only=name)
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    dests = {a.dest for a in sub._actions}
    for spec in specs(cls):  # raises for a field declared without option(...)
        assert (spec.name in dests) == spec.option.cli, spec.name


@pytest.mark.parametrize("config", [
    EmbedConfig.of(source="src", model="resnet18", out="o.h5", weights="none", layer="avgpool", extra_layers=("layer3", "style"),
                style_layers=("layer1", "layer2"), batch_size=4, workers=0, image_size=32, feature_dtype="float16",
                progress=False),
    ProbeConfig("c.h5", out="p", classifier="knn", memory_budget=3 << 20, seed=2),
    IndexConfig("c.h5", out="idx", kind="ivfsq", memory_budget=1 << 30, on_disk=True, progress=False),
    SearchConfig("idx", image=("a.jpg", "b.jpg"), k=3, grid="g.png"),
    SearchConfig("idx", row_id=7),
], ids=lambda c: type(c).__name__)
def test_the_command_line_of_a_config_gives_the_config_back(config):
    name = {EmbedConfig: "embed", ProbeConfig: "probe", IndexConfig: "index", SearchConfig: "search"}[type(config)]
    assert parse(name, to_arguments(config)) == config


# What `EmbedConfig.command_line()` recorded in caches before the backbone settings were nested (issue 27).
RECORDED_BEFORE = ("embedder embed src --model resnet18 --out o.h5 --weights none --layer avgpool --layer layer3 "
                   "--pool gem --style --style-layer layer1 --style-layer layer2 --batch-size 4 --workers 0 "
                   "--precision fast --runtime torch --image-size 32 --dtype float16 --quiet")


def test_a_recorded_command_line_still_parses_and_is_recorded_with_the_same_tokens():
    import shlex

    old = shlex.split(RECORDED_BEFORE)
    config = parse("embed", old[2:])
    assert config == EmbedConfig.of(source="src", model="resnet18", out="o.h5", weights="none", layer="avgpool",
                                    extra_layers=("layer3",), style=True, style_layers=("layer1", "layer2"),
                                    pool="gem", precision="fast", runtime="torch", batch_size=4, workers=0,
                                    image_size=32, feature_dtype="float16", progress=False)
    assert config.space.extra_layers == ("layer3", "style") and config.space.pool == "gem"
    # The same tokens (the backbone's flags now come together, after SOURCE), and they give the config back.
    new = shlex.split(config.command_line())
    assert new[:3] == old[:3] and sorted(new) == sorted(old) and parse("embed", new[2:]) == config


def test_left_out_flags_and_left_out_keys_get_the_same_defaults(tmp_path):
    from_cli = parse("embed", ["src", "--model", "resnet18", "--out", "o.h5"])
    from_toml = from_table(EmbedConfig, {"source": "src", "model": "resnet18", "out": "o.h5"}, None, "embed")
    assert from_cli == from_toml == EmbedConfig.of(source="src", model="resnet18", out="o.h5")
    index_cli = parse("index", ["c.h5", "--out", "i"])
    assert index_cli == from_table(IndexConfig, {"cache": "c.h5", "out": "i"}, None, "index")


def test_pipeline_tables_parse_like_flags_and_resolve_paths(tmp_path):
    table = {"cache": "c.h5", "out": "idx", "memory_budget": "512M", "kind": "ivf"}
    config = from_table(IndexConfig, table, tmp_path, "index")
    assert config.memory_budget == 512 << 20 and config == parse("index", [
        str(tmp_path / "c.h5"), "--out", str(tmp_path / "idx"), "--memory-budget", "512M", "--kind", "ivf"])
    search = from_table(SearchConfig, {"index": "idx", "image": "q.jpg", "k": 5}, tmp_path, "search")
    assert search.image == (str(tmp_path / "q.jpg"),) and Path(search.index).is_absolute()
    weights = from_table(EmbedConfig, {"source": "s", "model": "m", "out": "o.h5", "weights": "none"}, tmp_path, "e")
    assert weights.space.weights == "none"  # a keyword, not a path


def test_unknown_and_missing_keys_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"Unknown index setting 'budget'\. Did you mean 'memory_budget'\?"):
        from_table(IndexConfig, {"cache": "c.h5", "out": "i", "budget": "1G"}, None, "index")
    with pytest.raises(ConfigError, match="The merge step needs out"):
        from_table(CONFIGS["merge"], {"cache": "c.h5"}, None, "merge")
    # index's --out is optional on the command line (INDEX_DIR --remove ... needs none), required to build
    with pytest.raises(ConfigError, match="index needs --out INDEX_DIR"):
        from_table(IndexConfig, {"cache": "c.h5"}, None, "index")
    with pytest.raises(ConfigError, match="exactly one query"):
        from_table(SearchConfig, {"index": "i", "image": "a.jpg", "row_id": 3}, None, "search")


def test_every_pipeline_step_is_a_command_config():
    for kind, step in STEP_KINDS.items():
        cls = step.config()
        assert cls in CONFIGS.values(), kind
        assert all(dataclasses.is_dataclass(cls) for cls in CONFIGS.values())



def test_pipeline_search_step_keeps_its_own_default_k(tmp_path):
    # The command shows 10 hits; pipelines written before options were declared once showed 5.
    from embedder.cli.pipeline import load_pipeline

    (tmp_path / "p.toml").write_text('[[steps]]\nrun = "search"\nindex = "idx"\nimage = "q.jpg"\n'
                                     '[[steps]]\nrun = "search"\nindex = "idx"\nimage = "q.jpg"\nk = 7\n')
    assert parse("search", ["idx", "--image", "q.jpg"]).k == 10
    assert [step.config.k for step in load_pipeline(tmp_path / "p.toml")[1]] == [5, 7]


VALID = {  # one valid config per command whose settings have choices; each choice is then broken
    "embed": lambda: EmbedConfig.of(source="src", model="resnet18", out="o.h5", batch_size=4),
    "probe": lambda: ProbeConfig("c.h5"),
    "finetune": lambda: CONFIGS["finetune"].of(source="src", model="resnet18", out="out"),
    "stylize": lambda: CONFIGS["stylize"](content="c.jpg", style="s.jpg", out="o.png"),
    "index": lambda: IndexConfig("c.h5", out="i"),
    "dedup": lambda: CONFIGS["dedup"]("c.h5"),
    "curate": lambda: CONFIGS["curate"]("c.h5", out="r"),
    "plot": lambda: CONFIGS["plot"]("c.h5"),
    "map": lambda: CONFIGS["map"]("idx"),
    "search": lambda: SearchConfig("idx", row_id=1),
    "serve": lambda: CONFIGS["serve"]("idx"),
    "predict": lambda: CONFIGS["predict"]("m.pt", ("a.jpg",)),
    "export-vectors": lambda: CONFIGS["export-vectors"]("c.h5", out="d"),
    "watch": lambda: CONFIGS["watch"].of(source="src", model="resnet18", out="o.h5", batch_size=4),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_value_outside_the_declared_choices_is_refused_naming_the_flag(name):
    # The Python API, the CLI and the TOML go through one check (options.check_choices).
    chosen = [s for s in specs(CONFIGS[name]) if s.option.choices]
    assert bool(chosen) == (name in VALID), "add a valid config for this command to VALID"
    for spec in chosen:
        bad = ("bogus",) if spec.many else "bogus"
        with pytest.raises(ConfigError, match=rf"{spec.flag} must be one of .*got 'bogus'"):
            _replaced(VALID[name](), spec, bad)
        with pytest.raises(ConfigError, match=rf"{spec.flag} must be one of"):
            from_table(CONFIGS[name], {**_table(VALID[name]()), spec.name: bad}, None, name)


def _replaced(config, spec, value):
    """`config` with the option `spec` (a nested one too: `space.pool`) set to `value`."""
    if spec.owner is None:
        return dataclasses.replace(config, **{spec.name: value})
    inner = dataclasses.replace(getattr(config, spec.owner), **{spec.name: value})
    return dataclasses.replace(config, **{spec.owner: inner})


def _value(config, spec):
    return getattr(getattr(config, spec.owner) if spec.owner else config, spec.name)


def _table(config) -> dict:
    return {s.name: _value(config, s) for s in specs(type(config)) if s.option.toml}


def test_a_nested_config_is_taken_flat_with_the_nesting_fields_amendments():
    from embedder.models.space import FeatureSpace

    space = {s.name: s for s in specs(FeatureSpace)}
    embed = {s.name: s for s in specs(EmbedConfig)}
    finetune = {s.name: s for s in specs(CONFIGS["finetune"])}
    # embed amends one choice (its own "fast"); the rest is FeatureSpace's declaration as it is.
    assert "fast" in embed["precision"].option.choices and "fast" not in space["precision"].option.choices
    assert embed["pool"].option == space["pool"].option and embed["pool"].owner == "space"
    assert parse("embed", ["src", "--model", "m", "--out", "o.h5", "--precision", "fast"]).space.precision == "fast"
    # finetune takes some of them, ungrouped, with its one --layer; the others are no flags of it.
    assert finetune["layer"].option.group == "" and not finetune["layer"].option.repeat
    assert "precision" not in finetune and "pool" not in finetune
    with pytest.raises(SystemExit):
        parse("finetune", ["src", "--model", "m", "--out", "o", "--pool", "max"])
    with pytest.raises(ConfigError, match="unexpected keyword argument 'pool'"):
        CONFIGS["finetune"].of(source="src", model="m", out="o", pool="max")
