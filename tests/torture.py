"""Kill -9 torture: SIGKILL embedder commands at random moments and at every file-system step,
rerun them at once, and check that nothing is ever corrupt, refused, mixed or left behind.

    python -m tests.torture [--quick] [--kills N] [--seed S] [--workdir DIR] [--keep] [SCENARIO ...]

Random kills (`KILL_SCENARIOS`): each trial brings the scenario's folder to its starting
state, starts the command as a real `python -m embedder` process, SIGKILLs it at a seeded
moment, checks what the kill left, reruns the command immediately and checks the result.
Moments are drawn over [0, 1.1 x the duration of an uninterrupted run] (start-up included)
for even trials and over [first output, 1.1 x duration] for odd ones, so that many land
while files are being written and some after the end. Ray runs lose their whole process
session (driver and Ray's processes, like a node dying); other runs lose their main process
only, as with `kill -9 PID`, so forked reader workers outlive it for a while.

Crash injection (`INJECT_SCENARIOS`, tests.crashpoints): the run kills itself right before,
then right after, its N-th file-system mutation inside a phase, for N = 1, 2, ... until a
run completes; each is rerun and checked the same way.

Checks after every kill, before the rerun:
  * a cache file at an output path opens with plain h5py, `committed_rows` equals the rows
    of /features, and those (and any /layers) are finite; a cache that existed before the
    run (append) is still that cache, bit for bit, or is the finished one;
  * a probe or index folder (or sample tree) is absent, the complete old one, or the
    complete new one: never a mix.
Checks after every rerun: exit 0, no lock error and no `--overwrite` advice; every artefact
equals an uninterrupted run's (caches bit for bit; indexes give the same neighbours and
scores for every row; probes the same files, weights and report, wall times aside); and
the output folder holds exactly what an uninterrupted run leaves (no leftovers).

Artefacts are read with h5py, json, torch.load and faiss directly: never with embedder code.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from tests.conftest import REPO, env_with_repo, make_tree, write_image
from tests.crashpoints import WHEN, Forker, Outcome

LOCK_ERROR = "Another embedder process"
OVERWRITE_ADVICE = "--overwrite"

# ------------------------------------------------------------------------------------------
# Artefacts, read without embedder code
# ------------------------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _array(ds) -> tuple:
    """A dataset's exact bits, as (dtype, shape, hash)."""
    data = np.ascontiguousarray(ds[()])
    return str(data.dtype), data.shape, _digest(data.tobytes())


def _strings(ds) -> tuple:
    """A string dataset (variable or fixed width) as (count, hash of the raw bytes)."""
    items = [x if isinstance(x, bytes) else str(x).encode("utf-8", "surrogateescape") for x in ds[()]]
    return len(items), _digest(b"\0".join(items))


def _unreadable(exc: BaseException) -> str:
    return f"unreadable ({type(exc).__name__}: {str(exc)[:120]})"


def read_cache(path: Path, queries=None) -> dict | None:
    """Everything that must be bit-identical: features, layers, paths, labels, classes, errors."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            snap = {name: _array(f[name]) for name in ("features", "labels")}
            for name in f.get("layers", {}):
                snap[f"layers/{name}"] = _array(f["layers"][name])
            for name in ("paths", "classes", "errors/path", "errors/reason"):
                snap[name] = _strings(f[name])
            if "row_state" in f:  # a synced cache: which rows are live (embedder.cache.sync)
                snap["row_state"] = _array(f["row_state"])
                snap["live_paths_unique"] = _live_paths_unique(f)
            return snap
    except Exception as exc:  # noqa: BLE001 - whatever a torn file raises, it is a finding, not a crash
        return {"error": _unreadable(exc)}


def _live_paths_unique(f) -> bool:
    """Whether no path has two live rows (a sync's guarantee)."""
    state = f["row_state"][()]
    paths = [p for p, s in zip(f["paths"][()], state) if s == 0]
    return len(paths) == len(set(paths))


def cache_problem(path: Path) -> str | None:
    """Why the cache file at `path` is not a readable cache (plain h5py), or None."""
    try:
        with h5py.File(path, "r") as f:
            rows = int(f.attrs["committed_rows"])
            datasets = [("features", f["features"])] + [(f"layers/{k}", v) for k, v in f.get("layers", {}).items()]
            for name, ds in datasets:
                if ds.shape[0] != rows:
                    return f"{path.name}: committed_rows is {rows} but /{name} has {ds.shape[0]} rows"
                bad = int((~np.isfinite(ds[()])).any(axis=1).sum()) if rows else 0
                if bad:
                    return f"{path.name}: /{name} has {bad} committed rows with non-finite values"
    except Exception as exc:  # noqa: BLE001 - as above
        return f"{path.name} does not open as a cache with h5py ({type(exc).__name__}: {str(exc)[:160]})"
    return None


def _without_times(doc):
    """JSON with the wall-time fields (`fit_s`, `wall_s`, `build_s`, ...) left out."""
    if isinstance(doc, dict):
        return {k: _without_times(v) for k, v in doc.items() if not k.endswith("_s")}
    if isinstance(doc, list):
        return [_without_times(v) for v in doc]
    return doc


def _torch_payload(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous()
        return str(data.dtype), tuple(data.shape), _digest(data.view(torch.uint8).numpy().tobytes())
    if isinstance(obj, dict):
        return {k: _torch_payload(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_torch_payload(v) for v in obj]
    return obj


def _entries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) + ("/" if p.is_dir() else "") for p in folder.rglob("*"))


def _h5_datasets(path: Path) -> dict:
    out = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            out[name] = _strings(obj) if h5py.check_string_dtype(obj.dtype) else _array(obj)

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return out


def _read_member(path: Path):
    """One file of a result folder, by what it holds (report and meta without their wall times)."""
    try:
        if path.name.endswith(".json"):
            return _without_times(json.loads(path.read_text()))
        if path.suffix == ".pt":
            import torch

            return _torch_payload(torch.load(path, map_location="cpu", weights_only=True))
        if path.suffix == ".h5":
            return _h5_datasets(path)
        return _digest(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - as above
        return _unreadable(exc)


def read_folder(folder: Path, queries=None) -> dict | None:
    """A probe folder (or any folder of results): its entries and each file's content."""
    if not folder.is_dir():
        return None if not folder.exists() else {"error": "not a folder"}
    return {"entries": _entries(folder),
            **{rel: _read_member(folder / rel) for rel in _entries(folder) if not rel.endswith("/")}}


def _search(folder: Path, meta: dict, queries: np.ndarray) -> dict:
    import faiss

    faiss.omp_set_num_threads(1)  # one summation order: scores comparable bit for bit
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if meta.get("on_disk") else 0
    index = faiss.read_index(str(folder / "index.faiss"), flags)
    for knob in ("nprobe", "efSearch"):
        if knob in meta.get("params", {}):
            faiss.ParameterSpace().set_index_parameter(index, knob, meta["params"][knob])
    scores, ids = index.search(queries, min(10, index.ntotal))
    return {"ntotal": int(index.ntotal), "ids": _digest(ids.tobytes()), "scores": _digest(scores.tobytes())}


def read_index(folder: Path, queries: np.ndarray | None = None) -> dict | None:
    """An index folder: its files, and the neighbours and scores it gives every query row."""
    snap = read_folder(folder)
    if snap is None or "error" in snap:
        return snap
    snap.pop("index.faiss", None)  # compared by what it answers, below
    try:
        meta = json.loads((folder / "meta.json").read_text())
        snap["search"] = _search(folder, meta, queries)
    except Exception as exc:  # noqa: BLE001 - as above
        snap["search"] = _unreadable(exc)
    return snap


def read_file(path: Path, queries=None) -> str | None:
    return _digest(path.read_bytes()) if path.is_file() else None


READERS: dict[str, Callable] = {"cache": read_cache, "probe": read_folder, "index": read_index,
                                "tree": read_folder, "file": read_file}


def query_rows(cache: Path) -> np.ndarray:
    """Every row of a cache, unit length: the queries an index is checked with."""
    with h5py.File(cache, "r") as f:
        x = np.asarray(f["features"][()], dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def differences(a: dict | None, b: dict | None) -> str:
    """Which parts of two snapshots differ, shortly."""
    if a is None or b is None:
        return "absent" if a is None else "present (should be absent)"
    if not isinstance(a, dict) or not isinstance(b, dict):
        return "content differs"
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if "entries" in keys:
        extra, missing = sorted(set(a["entries"]) - set(b["entries"])), sorted(set(b["entries"]) - set(a["entries"]))
        return f"files {'+' + str(extra) if extra else ''}{' -' + str(missing) if missing else ''}"
    return "differs in " + ", ".join(keys[:6])


# ------------------------------------------------------------------------------------------
# Scenarios
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artefact:
    kind: str  # cache | probe | index | tree | file
    path: str  # relative to the scenario's folder


@dataclass
class Scenario:
    """One command, the artefacts it makes, and how to bring its folder to the starting state."""

    name: str
    root: Path
    argv: list[str]  # the embedder command line, run in `root`
    artefacts: list[Artefact]
    setup: Callable[[Scenario, Forker], None]  # sources and inputs, once
    out: str = "out"  # what the command writes into; leftovers are looked for here
    restore: list[tuple[str, str]] = field(default_factory=list)  # (input, output) copied in before each run
    phase: str | None = None  # crash-injection phase (tests.crashpoints.PHASES)
    weight: int = 1  # share of the random kills
    session_kill: bool = False  # kill every process of the run (Ray), not only the main one
    timeout: float = 600
    query_cache: str | None = None  # the cache whose rows query the indexes
    same_as: dict[str, str] = field(default_factory=dict)  # artefact -> input cache it must equal (a local run)
    old: dict = field(default_factory=dict)  # artefact -> snapshot of what was there before the run
    ref: dict | None = None  # artefact -> snapshot after an uninterrupted run
    ref_entries: set[str] = field(default_factory=set)
    queries: np.ndarray | None = None
    duration: float = 0.0  # of an uninterrupted run, start-up included
    first_output: float = 0.0  # when its output folder first changed
    calls: int = 0  # file-system mutations of the phase, counted by the reference run

    def reset(self) -> None:
        shutil.rmtree(self.root / self.out, ignore_errors=True)
        (self.root / self.out).mkdir(parents=True)
        for src, dst in self.restore:
            (shutil.copytree if (self.root / src).is_dir() else shutil.copy2)(self.root / src, self.root / dst)

    def snapshot(self) -> dict:
        return {a.path: READERS[a.kind](self.root / a.path, self.queries) for a in self.artefacts}

    def entries(self) -> set[str]:
        return set(_entries(self.root / self.out))


def fast_flags(image_size: int = 32, workers: int = 0, commit_every: int = 8) -> list[str]:
    """The fast, pinned configuration of the test suite (tests.conftest.fast_config) as flags."""
    return ["--model", "resnet18", "--weights", "none", "--image-size", str(image_size), "--batch-size", "4",
            "--workers", str(workers), "--device", "cpu", "--precision", "fp32", "--memory-layout", "contiguous",
            "--commit-every", str(commit_every), "--quiet"]


def make_source(src: Path, per_class: int, seed: int = 0) -> None:
    """An ImageFolder tree with two files that fail, so the errors table is not empty."""
    make_tree(src, classes=("a", "b", "c"), per_class=per_class, seed=seed)
    (src / "a" / "empty.jpg").write_bytes(b"")
    (src / "b" / "garbage.png").write_bytes(b"this is not a png")


def grow_source(src: Path, per_class: int, seed: int = 1) -> None:
    """New files in old classes (sorted after the old ones) and a new class."""
    rng = np.random.default_rng(seed)
    for c in ("a", "b", "d"):
        for i in range(per_class):
            write_image(src / c / f"z_{i:03d}.png", rng, size=(int(rng.integers(24, 64)), int(rng.integers(24, 64))))


def _must(outcome: Outcome, what: str) -> None:
    if outcome.rc != 0:
        raise RuntimeError(f"setup step {what!r} failed (exit {outcome.rc}):\n{outcome.output[-2000:]}")


def _embed_input(sc: Scenario, forker: Forker, out: str, flags: list[str]) -> None:
    _must(forker.run(["embed", "src", "--out", out, *flags], sc.root), f"embed {out}")


def _keep_old(sc: Scenario, forker: Forker, argv: list[str], made: str, kept: str, artefact: Artefact) -> None:
    """Make the artefact a different earlier run left (`argv` writes `made`), keep it as `kept`."""
    _must(forker.run(argv, sc.root), " ".join(argv))
    shutil.move(sc.root / made, sc.root / kept)
    sc.old[artefact.path] = READERS[artefact.kind](sc.root / kept, sc.queries)
    sc.restore.append((kept, made))


def fresh_scenario(name: str, base: Path, per_class: int, image_size: int = 32, workers: int = 0,
                   commit_every: int = 8, weight: int = 3) -> Scenario:
    def setup(sc: Scenario, forker: Forker) -> None:
        make_source(sc.root / "src", per_class)

    argv = ["embed", "src", "--out", "out/c.h5", *fast_flags(image_size, workers, commit_every)]
    return Scenario(name, base / name, argv, [Artefact("cache", "out/c.h5")], setup, phase="finish", weight=weight)


def append_scenario(name: str, base: Path, per_class: int, grow: int, image_size: int = 32,
                    commit_every: int = 8, weight: int = 3) -> Scenario:
    """A cache of the first files (two layers), then the source grows, then the append runs."""
    flags = [*fast_flags(image_size, 0, commit_every), "--layer", "avgpool", "--layer", "layer3"]
    cache = Artefact("cache", "out/c.h5")

    def setup(sc: Scenario, forker: Forker) -> None:
        make_source(sc.root / "src", per_class)
        (sc.root / "inputs").mkdir()
        _embed_input(sc, forker, "inputs/base.h5", flags)
        grow_source(sc.root / "src", grow)
        sc.old[cache.path] = read_cache(sc.root / "inputs/base.h5")

    argv = ["embed", "src", "--out", cache.path, *flags]
    return Scenario(name, base / name, argv, [cache], setup, restore=[("inputs/base.h5", cache.path)],
                    phase="finish", weight=weight)


def change_source(src: Path, seed: int = 2) -> None:
    """Two files of each class rewritten (new pixels, another size and mtime), one deleted, one garbage file fixed."""
    rng = np.random.default_rng(seed)
    for c in ("a", "b", "c"):
        for path in sorted((src / c).glob("*_00[01].*")):
            write_image(path, rng, size=(int(rng.integers(24, 64)), int(rng.integers(24, 64))))
            os.utime(path, (1.5e9, 1.5e9))
    for path in sorted((src / "c").glob("*_002.*")):
        path.unlink()


def sync_scenario(name: str, base: Path, per_class: int, grow: int, image_size: int = 32,
                  commit_every: int = 8, weight: int = 3) -> Scenario:
    """A cache of the source, then files change, go and arrive, then the rerun syncs the cache."""
    flags = fast_flags(image_size, 0, commit_every)
    cache = Artefact("cache", "out/c.h5")

    def setup(sc: Scenario, forker: Forker) -> None:
        make_source(sc.root / "src", per_class)
        (sc.root / "inputs").mkdir()
        _embed_input(sc, forker, "inputs/base.h5", flags)
        change_source(sc.root / "src")
        grow_source(sc.root / "src", grow)
        sc.old[cache.path] = read_cache(sc.root / "inputs/base.h5")

    argv = ["embed", "src", "--out", cache.path, *flags]
    return Scenario(name, base / name, argv, [cache], setup, restore=[("inputs/base.h5", cache.path)],
                    phase="finish", weight=weight)


def make_sharded(root: Path, src: str, out: str, image_size: int, shard_size: int) -> None:
    """A sharded cache as `--backend ray` writes it, each shard embedded here in turn (no Ray)."""
    from embedder.cache.shards import ShardSet
    from embedder.data.sources import list_source
    from embedder.extract.config import EmbedConfig
    from embedder.extract.core import backbone_for, cache_spec
    from embedder.extract.ray import embed_shard

    config = EmbedConfig.of(source=str(root / src), model="resnet18", out=str(root / out), weights="none",
                         image_size=image_size, batch_size=4, workers=0, device="cpu", precision="fp32",
                         memory_layout="contiguous", progress=False, commit_every=8)
    listing = list_source(config.source)
    backbone = backbone_for(config)
    spec = cache_spec(config, listing, backbone, "tests.torture setup")  # what the Ray driver plans
    shard_set = ShardSet(config.out, spec, listing, shard_size, config.batch_size)
    shard_set.prepare()
    for shard in shard_set.pending():
        embed_shard(config, backbone, shard_set.job, shard_set.task(shard))
    shard_set.write_view()


def merge_scenario(name: str, base: Path, per_class: int, image_size: int = 32, shard_size: int = 8,
                   weight: int = 2) -> Scenario:
    def setup(sc: Scenario, forker: Forker) -> None:
        make_source(sc.root / "src", per_class)
        (sc.root / "inputs").mkdir()
        make_sharded(sc.root, "src", "inputs/sharded.h5", image_size, shard_size)
        _embed_input(sc, forker, "inputs/local.h5", fast_flags(image_size))

    return Scenario(name, base / name, ["merge", "inputs/sharded.h5", "--out", "out/m.h5"],
                    [Artefact("cache", "out/m.h5")], setup, phase="finish", weight=weight,
                    same_as={"out/m.h5": "inputs/local.h5"})


def _source_and_cache(sc: Scenario, forker: Forker, per_class: int) -> None:
    """The usual setup: SOURCE of `per_class` images per class, embedded (uninterrupted) into inputs/c.h5."""
    make_source(sc.root / "src", per_class)
    (sc.root / "inputs").mkdir()
    _embed_input(sc, forker, "inputs/c.h5", fast_flags())


def index_scenario(name: str, base: Path, per_class: int, kind: str, over: str | None = None,
                   weight: int = 1) -> Scenario:
    """`embedder index` of a cache; with `over`, rebuilt over an index of that kind."""
    index = Artefact("index", "out/index")

    def setup(sc: Scenario, forker: Forker) -> None:
        _source_and_cache(sc, forker, per_class)
        sc.queries = query_rows(sc.root / "inputs/c.h5")
        if over:
            _keep_old(sc, forker, ["index", "inputs/c.h5", "--out", index.path, "--kind", over, "--quiet"],
                      index.path, "inputs/old_index", index)

    argv = ["index", "inputs/c.h5", "--out", index.path, "--kind", kind, "--quiet"]
    return Scenario(name, base / name, argv, [index], setup, phase="index", weight=weight)


def remove_scenario(name: str, base: Path, per_class: int, kind: str, weight: int = 1) -> Scenario:
    """`embedder index INDEX_DIR --prune-missing` over an index of `kind` after a source file vanished."""
    index = Artefact("index", "out/index")

    def setup(sc: Scenario, forker: Forker) -> None:
        _source_and_cache(sc, forker, per_class)
        sc.queries = query_rows(sc.root / "inputs/c.h5")
        _keep_old(sc, forker, ["index", "inputs/c.h5", "--out", index.path, "--kind", kind, "--quiet"],
                  index.path, "inputs/old_index", index)
        (sc.root / "src" / "a" / "a_000.jpg").unlink()

    return Scenario(name, base / name, ["index", index.path, "--prune-missing", "--quiet"], [index], setup,
                    phase="remove", weight=weight)


def probe_scenario(name: str, base: Path, per_class: int, over_seed: int | None = None, weight: int = 1) -> Scenario:
    """`embedder probe`; with `over_seed`, saved over the PROBE_DIR of a run with that --seed."""
    probe = Artefact("probe", "out/probe")

    def setup(sc: Scenario, forker: Forker) -> None:
        _source_and_cache(sc, forker, per_class)
        if over_seed is not None:
            _keep_old(sc, forker, ["probe", "inputs/c.h5", "--out", probe.path, "--seed", str(over_seed)],
                      probe.path, "inputs/old_probe", probe)

    return Scenario(name, base / name, ["probe", "inputs/c.h5", "--out", probe.path], [probe], setup,
                    phase="probe", weight=weight)


PIPELINE = """\
[pipeline]
name = "torture"

[[steps]]
run = "embed"
source = "src"
out = "out/c.h5"
model = "resnet18"
weights = "none"
image_size = 32
batch_size = 4
workers = 0
device = "cpu"
precision = "fp32"
memory_layout = "contiguous"
commit_every = 8

[[steps]]
run = "probe"
cache = "out/c.h5"
out = "out/probe"

[[steps]]
run = "index"
cache = "out/c.h5"
out = "out/index"
kind = "ivf"
"""


def pipeline_scenario(name: str, base: Path, per_class: int, weight: int = 3) -> Scenario:
    """`embedder run` of a small generated pipeline: embed, probe, index."""
    def setup(sc: Scenario, forker: Forker) -> None:
        make_source(sc.root / "src", per_class)
        (sc.root / "pipeline.toml").write_text(PIPELINE)

    artefacts = [Artefact("cache", "out/c.h5"), Artefact("probe", "out/probe"), Artefact("index", "out/index")]
    return Scenario(name, base / name, ["run", "pipeline.toml", "--quiet"], artefacts, setup, weight=weight,
                    query_cache="out/c.h5")


def quickstart_scenario(name: str, base: Path, weight: int = 2) -> Scenario:
    """`embedder run pipelines/quickstart.toml` in a copy (base_dir "..": the copy's root), shipped
    EfficientNet-Lite0 weights and sample data."""
    def setup(sc: Scenario, forker: Forker) -> None:
        (sc.root / "pipelines").mkdir(parents=True)
        shutil.copy2(REPO / "pipelines" / "quickstart.toml", sc.root / "pipelines" / "quickstart.toml")

    o = "data/out/"
    artefacts = [Artefact("tree", f"data/{s}") for s in ("digits", "lfw_subset", "photos")]
    artefacts += [Artefact("cache", f"{o}{s}_lite0.h5") for s in ("photos", "lfw", "digits")]
    artefacts += [Artefact("probe", f"{o}digits_lite0.probe"), Artefact("index", f"{o}digits_lite0.index"),
                  Artefact("file", f"{o}digits_query.png")]
    return Scenario(name, base / name, ["run", "pipelines/quickstart.toml", "--quiet"], artefacts, setup,
                    out="data", weight=weight, timeout=900, query_cache=f"{o}digits_lite0.h5")


def ray_scenario(name: str, base: Path, per_class: int, image_size: int = 32, shard_size: int = 8,
                 weight: int = 3) -> Scenario:
    """`--backend ray` with one half-CPU actor; the result must equal a local run bit for bit."""
    def setup(sc: Scenario, forker: Forker) -> None:
        make_source(sc.root / "src", per_class)
        (sc.root / "inputs").mkdir()
        _embed_input(sc, forker, "inputs/local.h5", fast_flags(image_size))

    argv = ["embed", "src", "--out", "out/ray.h5", *fast_flags(image_size), "--backend", "ray", "--actors", "1",
            "--cpus-per-actor", "0.5", "--shard-size", str(shard_size)]
    return Scenario(name, base / name, argv, [Artefact("cache", "out/ray.h5")], setup, weight=weight,
                    session_kill=True, same_as={"out/ray.h5": "inputs/local.h5"})


def kill_scenarios(base: Path, quick: bool) -> list[Scenario]:
    """The random-kill scenarios. Full mode: larger inputs, plus Ray and the quickstart pipeline."""
    n, size = (20, 32) if quick else (30, 64)
    found = [
        fresh_scenario("fresh", base, n, size),
        fresh_scenario("fresh-workers", base, n, size, workers=1),
        append_scenario("append", base, n, n // 2, size),
        sync_scenario("sync", base, n, n // 4, size),
        merge_scenario("merge", base, n, size),
        index_scenario("index-flat", base, 40, "flat"),
        index_scenario("index-ivf", base, 40, "ivf", over="flat"),
        probe_scenario("probe", base, n),
        probe_scenario("probe-over", base, n, over_seed=1, weight=2),
        pipeline_scenario("pipeline", base, n),
    ]
    if not quick:
        found += [ray_scenario("ray", base, 16), quickstart_scenario("quickstart", base)]
    return found


def inject_scenarios(base: Path, quick: bool) -> list[Scenario]:
    """Crash injection at every step of a phase: small inputs, each run is short."""
    found = [
        fresh_scenario("inject-finish-fresh", base, 4),
        append_scenario("inject-finish-append", base, 2, 2, commit_every=4),
        sync_scenario("inject-finish-sync", base, 3, 2, commit_every=4),
        probe_scenario("inject-probe", base, 6, over_seed=1),
        index_scenario("inject-index", base, 6, "ivf", over="flat"),
    ]
    if not quick:
        found += [index_scenario("inject-index-fresh", base, 6, "flat"), merge_scenario("inject-merge", base, 4)]
    return found


# ------------------------------------------------------------------------------------------
# Running: real processes, or children forked from the zygote
# ------------------------------------------------------------------------------------------


def session_pids(sid: int) -> list[int]:
    """The live processes of the session `sid` (fields of /proc/PID/stat: state, ppid, pgrp, session)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def kill_session(sid: int, timeout: float = 30) -> None:
    """SIGKILL every process of the session `sid` (one this harness started: a run and what it
    forked or spawned). Ray's processes have process groups of their own, so killpg is not enough."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = session_pids(sid)
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"processes of session {sid} survived SIGKILL")


def session_alive(sid: int) -> int:
    """How many live processes the session `sid` still has."""
    return len(session_pids(sid))


class ProcessRunner:
    """Each run is a fresh `python -m embedder` process in a session of its own."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs, self.n = env, logs, 0

    def start(self, sc: Scenario):
        self.n += 1
        log = open(self.logs / f"{sc.name}-{self.n}.out", "w+b")  # noqa: SIM115 - closed by `poll`
        proc = subprocess.Popen([sys.executable, "-m", "embedder", *sc.argv], cwd=sc.root, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return proc, log, time.monotonic()

    def poll(self, handle, timeout: float) -> Outcome | None:
        proc, log, t0 = handle
        try:
            rc = proc.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None
        log.seek(0)
        output = log.read().decode(errors="replace")
        log.close()
        os.unlink(log.name)
        return Outcome(rc, output, time.monotonic() - t0, proc.pid)

    def pid(self, handle) -> int:
        return handle[0].pid


class ForkRunner:
    """Each run is a child forked from the zygote (no start-up cost; used by the fast tests)."""

    def __init__(self, forker: Forker):
        self.forker = forker

    def start(self, sc: Scenario):
        return self.forker.start(sc.argv, sc.root)

    def poll(self, handle, timeout: float) -> Outcome | None:
        return self.forker.poll(max(0.0, timeout))

    def pid(self, handle) -> int:
        return handle


def run_to_end(runner, sc: Scenario) -> Outcome:
    handle = runner.start(sc)
    outcome = runner.poll(handle, sc.timeout)
    if outcome is None:
        kill_session(runner.pid(handle))
        outcome = runner.poll(handle, 60)
        outcome.rc, outcome.output = 124, outcome.output + f"\n[torture: no end after {sc.timeout:.0f} s]"
    kill_session(runner.pid(handle))  # whatever it started and left running (Ray)
    return outcome


def kill_at(runner, sc: Scenario, moment: float) -> tuple[Outcome, int]:
    """Start the command and SIGKILL it `moment` s later (unless it ended). Returns the outcome and
    the session, whose orphans (forked reader workers) are left running for the rerun to meet."""
    handle = runner.start(sc)
    outcome = runner.poll(handle, moment)
    pid = runner.pid(handle)
    if outcome is None:
        if sc.session_kill:
            kill_session(pid)
        else:
            os.kill(pid, signal.SIGKILL)
        outcome = runner.poll(handle, 60)
    return outcome, pid


# ------------------------------------------------------------------------------------------
# Checks and their tally
# ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one scenario's trials did, and every failed check (grouped, with one example each)."""

    kills: int = 0
    torn: int = 0  # kills after which a check of what the kill left failed
    reruns: int = 0
    reruns_ok: int = 0
    finals: int = 0  # completed runs whose artefacts were compared with the reference
    finals_equal: int = 0
    leftovers: int = 0  # most leftover entries after a completed run
    seconds: float = 0.0
    failures: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def fail(self, message: str, where: str) -> None:
        key = re.sub(r"\d+", "N", message)  # pids, sizes, row counts: one group
        self.failures[key] += 1
        self.examples.setdefault(key, f"{message}  [{where}]")

    def add(self, other: Tally) -> None:
        for name in ("kills", "torn", "reruns", "reruns_ok", "finals", "finals_equal", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.leftovers = max(self.leftovers, other.leftovers)
        for key, count in other.failures.items():
            self.failures[key] += count
            self.examples.setdefault(key, other.examples[key])

    def report(self) -> str:
        return "\n".join(f"{count}x {self.examples[key]}" for key, count in self.failures.most_common())


def after_kill_problems(sc: Scenario) -> list[str]:
    """What a kill may never leave: an unreadable cache, a changed old cache, a mixed folder."""
    problems = []
    for art in sc.artefacts:
        path = sc.root / art.path
        old, new = sc.old.get(art.path), sc.ref.get(art.path)
        if art.kind == "cache":
            problem = cache_problem(path) if path.exists() else None
            if problem:
                problems.append(problem)
            elif old is not None and read_cache(path) not in (old, new):
                problems.append(f"{art.path} is neither the cache it was before the run nor the finished one")
            continue
        state = READERS[art.kind](path, sc.queries)
        if state not in (None, new, *([old] if old is not None else [])):
            versus = f"vs the new one: {differences(state, new)}"
            if old is not None:
                versus = f"vs the old one: {differences(state, old)}; {versus}"
            problems.append(f"{art.path} after the kill is not absent, the old or the new one ({versus})")
    return problems


def _last_line(output: str, root: Path) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1].replace(f"{root}/", "")[:300] if lines else "(no output)"


def _tops(entries: set[str]) -> list[str]:
    """The outermost of `entries`: a left-over folder counts once, not once per file in it."""
    return sorted(e for e in entries if not any(e != d and e.startswith(d) for d in entries if d.endswith("/")))


def judge_run(sc: Scenario, outcome: Outcome, tally: Tally, where: str, rerun: bool = True) -> None:
    """A run that should have completed: exit 0, no refusal or advice, reference artefacts, no leftovers."""
    if rerun:
        tally.reruns += 1
    if outcome.rc != 0:
        tally.fail(f"{'rerun' if rerun else 'run'} exit {outcome.rc}: {_last_line(outcome.output, sc.root)}", where)
        return
    tally.reruns_ok += rerun
    for phrase in (LOCK_ERROR, OVERWRITE_ADVICE):
        if phrase in outcome.output:
            tally.fail(f"the run printed {phrase!r}: {_last_line(outcome.output, sc.root)}", where)
    tally.finals += 1
    snap = sc.snapshot()
    wrong = [f"{path}: {differences(snap[path], sc.ref[path])}" for path in snap if snap[path] != sc.ref[path]]
    tally.finals_equal += not wrong
    for text in wrong:
        tally.fail(f"final {text} (vs the uninterrupted run)", where)
    entries = sc.entries()
    extra, missing = _tops(entries - sc.ref_entries), _tops(sc.ref_entries - entries)
    tally.leftovers = max(tally.leftovers, len(extra))
    if extra:
        tally.fail(f"leftovers in {sc.out}/: {', '.join(extra[:6])}", where)
    if missing:
        tally.fail(f"missing from {sc.out}/: {', '.join(missing[:6])}", where)


def after_kill(sc: Scenario, runner, killed_session: int, tally: Tally, where: str) -> None:
    """The checks of a kill, the immediate rerun, and the checks of its result."""
    tally.kills += 1
    problems = after_kill_problems(sc)
    tally.torn += bool(problems)
    for problem in problems:
        tally.fail(problem, where)
    rerun = run_to_end(runner, sc)  # at once: orphans of the killed run may still be alive
    kill_session(killed_session)
    judge_run(sc, rerun, tally, where)


# ------------------------------------------------------------------------------------------
# Trials
# ------------------------------------------------------------------------------------------


def _signature(folder: Path) -> frozenset:
    found = set()
    for p in folder.rglob("*"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        found.add((str(p), st.st_size, st.st_mtime_ns))
    return frozenset(found)


def prepare(sc: Scenario, runner, forker: Forker) -> Tally:
    """Set up, then an uninterrupted run: the reference, its duration and when it first wrote."""
    tally = Tally()
    sc.root.mkdir(parents=True, exist_ok=True)
    sc.setup(sc, forker)
    sc.reset()
    before = _signature(sc.root / sc.out)
    handle = runner.start(sc)
    t_start, first, outcome = time.monotonic(), None, None  # from the start, as the kill moments are
    while outcome is None:
        outcome = runner.poll(handle, 0.02)
        if first is None and _signature(sc.root / sc.out) != before:
            first = time.monotonic() - t_start
    kill_session(runner.pid(handle))
    sc.duration = outcome.wall_s
    sc.first_output = min(sc.duration if first is None else first, sc.duration)
    _set_reference(sc, outcome, tally)
    return tally


def _set_reference(sc: Scenario, outcome: Outcome, tally: Tally) -> None:
    if outcome.rc != 0:
        raise RuntimeError(f"{sc.name}: the uninterrupted run failed (exit {outcome.rc}):\n{outcome.output[-3000:]}")
    if sc.query_cache:
        sc.queries = query_rows(sc.root / sc.query_cache)
    sc.ref, sc.ref_entries = sc.snapshot(), sc.entries()
    for art, cache in sc.same_as.items():
        local = read_cache(sc.root / cache)
        if sc.ref[art] != local:
            tally.fail(f"the uninterrupted {art} differs from a local run's cache: "
                       f"{differences(sc.ref[art], local)}", "reference run")


def random_kills(sc: Scenario, runner, kills: int, rng: np.random.Generator) -> Tally:
    """Kill the command at seeded moments until `kills` kills happened (at most 4x as many tries).
    The duration the moments are drawn against is the median of the uninterrupted runs seen so far:
    on a shared machine one run's duration says little."""
    tally = Tally()
    t0 = time.monotonic()
    durations = [sc.duration]
    for trial in range(4 * kills):
        if tally.kills >= kills:
            break
        duration = float(np.median(durations))
        low = 0.0 if trial % 2 == 0 else min(sc.first_output, duration)
        moment = float(rng.uniform(low, 1.1 * duration))
        sc.reset()
        outcome, session = kill_at(runner, sc, moment)
        where = f"kill at {moment:.2f} s of {duration:.2f} s"
        if outcome.killed:
            after_kill(sc, runner, session, tally, where)
        else:  # it ended before the moment came: an ordinary run, checked as one
            durations.append(outcome.wall_s)
            kill_session(session)
            judge_run(sc, outcome, tally, f"run that ended before {where}", rerun=False)
    tally.seconds = time.monotonic() - t0
    return tally


def _step(log: Path) -> str:
    lines = log.read_text().splitlines() if log.exists() else []
    return lines[-1].replace("\t", " ", 2) if lines else "?"


def inject(sc: Scenario, forker: Forker, when: str, logs: Path, limit: int = 500) -> Tally:
    """Kill the command right `when` (before/after) its N-th mutation in the phase, N = 1, 2, ...
    until a run completes without reaching N; rerun and check after each kill."""
    tally = Tally()
    t0 = time.monotonic()
    log = logs / f"{sc.name}-{when}.calls"
    for n in range(1, limit + 1):
        sc.reset()
        log.unlink(missing_ok=True)
        outcome = forker.run(sc.argv, sc.root, phase=sc.phase, at=n, when=when, log=log, timeout=sc.timeout)
        if not outcome.killed:
            if n <= sc.calls:
                tally.fail(f"no kill at step {n} of {sc.calls}: the phase made fewer mutations than counted",
                           f"{when} #{n}")
            judge_run(sc, outcome, tally, f"run with a kill due {when} step {n}", rerun=False)
            break
        after_kill(sc, ForkRunner(forker), outcome.pid, tally, f"killed {when} #{_step(log)}")
    tally.seconds = time.monotonic() - t0
    return tally


def prepare_injection(sc: Scenario, forker: Forker, logs: Path) -> Tally:
    """Set up, then an uninterrupted run that counts the phase's mutations: the reference."""
    tally = Tally()
    sc.root.mkdir(parents=True, exist_ok=True)
    sc.setup(sc, forker)
    sc.reset()
    log = logs / f"{sc.name}-count.calls"
    outcome = forker.run(sc.argv, sc.root, phase=sc.phase, at=0, log=log, timeout=sc.timeout)
    sc.calls = len(log.read_text().splitlines()) if log.exists() else 0
    sc.duration = outcome.wall_s
    _set_reference(sc, outcome, tally)
    return tally


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def allocate(scenarios: list[Scenario], total: int) -> dict[str, int]:
    """`total` kills shared by weight, at least one each."""
    weights = sum(sc.weight for sc in scenarios) or 1
    share = {sc.name: max(1, round(total * sc.weight / weights)) for sc in scenarios}
    for sc in itertools.cycle(sorted(scenarios, key=lambda s: -s.weight)):
        if sum(share.values()) >= total:
            break
        share[sc.name] += 1
    return share


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)])


def _row(name: str, kind: str, t: Tally) -> str:
    equal = "yes" if t.finals and t.finals == t.finals_equal and t.reruns == t.reruns_ok else "no"
    return (f"{name:<22}{kind:<8}{t.kills:>6}{t.torn:>6}{f'{t.reruns_ok}/{t.reruns}':>11}{equal:>8}"
            f"{t.leftovers:>11}{t.seconds:>9.0f}")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _run_one(sc: Scenario, kind: str, kills: int, seed: int, forker: Forker, env, logs: Path) -> Tally:
    t0 = time.monotonic()
    if kind == "random":
        tally = prepare(sc, ProcessRunner(env, logs), forker)
        _say(f"[{sc.name}] uninterrupted: {sc.duration:.1f} s, first output at {sc.first_output:.1f} s; "
             f"{kills} kills")
        tally.add(random_kills(sc, ProcessRunner(env, logs), kills, _rng(seed, sc.name)))
    else:
        tally = prepare_injection(sc, forker, logs)
        _say(f"[{sc.name}] phase {sc.phase}: {sc.calls} file-system mutations; kills before and after each")
        for when in WHEN:
            tally.add(inject(sc, forker, when, logs))
    tally.seconds = time.monotonic() - t0
    _say(f"[{sc.name}] {tally.kills} kills, {tally.reruns_ok}/{tally.reruns} reruns ok, "
         f"{sum(tally.failures.values())} failed checks")
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.torture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small inputs; no Ray, no quickstart pipeline")
    parser.add_argument("--kills", type=int, default=None, help="random kills in all (default 20 quick, 40 full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where to work (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (kept anyway on failure)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the runs (default 1: on a loaded machine more threads spin-wait)")
    parser.add_argument("scenarios", nargs="*", help="names to run (default: all of the mode); see --list")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    base = Path(args.workdir or tempfile.mkdtemp(prefix="embedder-torture-")).absolute()
    every = [(sc, "random") for sc in kill_scenarios(base, args.quick and not args.scenarios)]
    every += [(sc, "inject") for sc in inject_scenarios(base, args.quick and not args.scenarios)]
    if args.list:
        print("\n".join(f"{sc.name:<22}{kind:<8}{' '.join(sc.argv)}" for sc, kind in every))
        return 0
    unknown = sorted(set(args.scenarios) - {sc.name for sc, _ in every})
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; see --list")
    chosen = [(sc, kind) for sc, kind in every if not args.scenarios or sc.name in args.scenarios]
    if args.quick and args.scenarios:  # named scenarios in quick mode still get the quick inputs
        quick = {sc.name: sc for sc in kill_scenarios(base, True) + inject_scenarios(base, True)}
        chosen = [(quick.get(sc.name, sc), kind) for sc, kind in chosen]
    return _run_all(chosen, args, base)


def _run_all(chosen: list[tuple[Scenario, str]], args, base: Path) -> int:
    total_kills = args.kills if args.kills is not None else (20 if args.quick else 40)
    share = allocate([sc for sc, kind in chosen if kind == "random"], total_kills)
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**env_with_repo(), "OMP_NUM_THREADS": str(args.threads)}
    rows, failed = [], Tally()
    t0 = time.monotonic()
    with Forker(env, logs) as forker:
        for sc, kind in chosen:
            try:
                tally = _run_one(sc, kind, share.get(sc.name, 0), args.seed, forker, env, logs)
            except Exception as exc:  # noqa: BLE001 - a scenario that cannot even be set up is a failure
                tally = Tally()
                tally.fail(f"scenario aborted: {type(exc).__name__}: {str(exc)[:500]}", "setup")
            rows.append((sc.name, kind, tally))
            failed.failures.update({f"{sc.name}: {k}": v for k, v in tally.failures.items()})
            failed.examples.update({f"{sc.name}: {k}": f"{sc.name}: {e}" for k, e in tally.examples.items()})
    _print_report(rows, failed, args, time.monotonic() - t0)
    if failed.failures or args.keep:
        print(f"work folder kept: {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failed.failures else 0


def _print_report(rows, failed: Tally, args, seconds: float) -> None:
    print(f"\n{'scenario':<22}{'kind':<8}{'kills':>6}{'torn':>6}{'reruns ok':>11}{'equal':>8}{'leftovers':>11}"
          f"{'seconds':>9}")
    print("(torn: kills that left an unreadable cache or a mixed folder; equal: every completed run's artefacts"
          " equal the uninterrupted run's; leftovers: most stray entries after a completed run)")
    for name, kind, tally in rows:
        print(_row(name, kind, tally))
    random_kills_done = sum(t.kills for _, kind, t in rows if kind == "random")
    injected = sum(t.kills for _, kind, t in rows if kind == "inject")
    print(f"\n{random_kills_done} random kills, {injected} injected kills, seed {args.seed}, "
          f"{'quick' if args.quick else 'full'} mode, {seconds:.0f} s")
    if failed.failures:
        print(f"\nFAILED checks ({sum(failed.failures.values())}):")
        print(failed.report())
    else:
        print("all checks passed")


if __name__ == "__main__":
    sys.exit(main())
