"""Fast paths with a fidelity card: int8 and bf16 on the CPU, and `--precision fast` that picks one.

The exact path is fp32 (what `--precision auto` computes on every CPU). A fast path is run only
with a card that says how far it moves the features, measured on the user's own images:

  * `calibration_images` rows evenly spaced over the sorted listing (deterministic, and across every
    class folder) calibrate int8; a resumed or appended cache reuses the calibration rows its card recorded;
  * `fidelity_images` of the other rows (held aside from calibration, evenly spaced) are embedded by both paths, and
    the card holds, per output, the mean and minimum cosine to fp32 (read without --jpeg-draft, so the
    card includes the draft's cost when it is on) and the overlap of each image's
    k-NN@10 set (cosine, within the sample) with fp32's; when the rows are labelled, the change in
    linear-probe (5-fold logistic regression) and k-NN accuracy, in points, on the same folds.

`Gates` refuse a card that falls short, in one line naming the figure and the flag that moves the
gate. int8 reaches them with what ONNX Runtime's quantiser offers: the calibration method, per-channel
weights, then keeping sensitive nodes in fp32 (embedder.models.quantize levels), in that order.
`--precision fast` times every candidate on the held-aside sample, here and now, and takes the
fastest whose card passes (fp32 when none does); the card records the speeds and the choice.
An `--precision int8` card already made on the same images, graph, gates and CPU is reused
(embedder.extract.cardstore): the same inputs give the same figures, and a rerun skips the fp32
backbone and both passes.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from embedder.data.sources import Listing
from embedder.errors import ConfigError, EmbedderNotice
from embedder.extract import cardstore
from embedder.extract.config import EmbedConfig
from embedder.extract.core import BatchReader
from embedder.models.backbone import FrozenBackbone
from embedder.models.constants import CALIBRATION_IMAGES, FIDELITY_IMAGES
from embedder.models.onnx import cache_root, graph_key
from embedder.models.quantize import LEVELS, QUANT_FORMAT, QuantSettings, calibration_sha256, quantize
from embedder.models.space import components
from embedder.progress import bar as progress_bar

K = 10  # neighbours whose overlap the card reports
FAST_PATHS = ("int8", "bf16", "fast")
CARD_FORMAT = "embedder-fidelity-1"


@dataclass(frozen=True)
class Gates:
    """What a fast path must reach. Mean cosine 0.995: bf16 on real features gave 0.96-0.99 where it
    visibly moved neighbours, fp32 runtimes give >= 0.99999; overlap 0.9: at most one neighbour in ten
    differs; accuracy 0.5 points: below the run-to-run spread of a probe on a few hundred images."""

    min_cosine: float = 0.995
    min_overlap: float = 0.9
    max_accuracy_drop: float = 0.5

    def failure(self, card: dict) -> str | None:
        """The first figure below its gate, as '<figure> <value> < <gate> (<flag> to accept)', or None."""
        if card["mean_cosine"] < self.min_cosine:
            return f"mean cosine to fp32 {card['mean_cosine']:.4f} < {self.min_cosine} (--min-cosine to accept)"
        if card["knn_overlap"] < self.min_overlap:
            return f"k-NN@{K} overlap with fp32 {card['knn_overlap']:.3f} < {self.min_overlap} (--min-overlap to accept)"
        for name in ("probe_drop", "knn_drop"):
            if card.get(name) is not None and card[name] > self.max_accuracy_drop:
                what = "linear-probe" if name == "probe_drop" else "k-NN"
                return (f"{what} accuracy drop {card[name]:.2f} points > {self.max_accuracy_drop} "
                        "(--max-accuracy-drop to accept)")
        return None


@dataclass
class Sample:
    """The rows the card is made from: calibration pixels and the held-aside pixels with their labels."""

    calibration_rows: np.ndarray
    calibration: np.ndarray  # uint8 [n, 3, S, S]
    held: np.ndarray  # uint8 [m, 3, S, S], as the run reads them (--jpeg-draft included)
    labels: np.ndarray  # int64 [m], -1 = unlabelled
    held_exact: np.ndarray  # the same rows' exact pixels (no --jpeg-draft): what fp32 is measured on


def prepare(config: EmbedConfig, listing: Listing, recorded: dict | None = None) -> tuple[FrozenBackbone, dict]:
    """(backbone, card) for `config.space.precision` int8, bf16 or fast (resolved, measured, gated).
    `recorded`: the card of the cache being resumed or appended to (its calibration rows are reused).
    Tens of seconds with nothing else to show: a bar over its steps (`config.progress`)."""
    candidates = (config.space.precision,)
    if config.space.precision == "fast":  # an explicit --runtime is kept: int8 runs on ONNX Runtime, bf16 on torch
        candidates = tuple(p for p, no in (("int8", "torch"), ("bf16", "onnxruntime")) if config.space.runtime != no)
    steps = 3 + (candidates == ("int8",)) + sum(len(LEVELS) if p == "int8" else 1 for p in candidates)
    with progress_bar(desc="fidelity card", unit="step", total=steps, enabled=config.progress) as shown:
        return _prepare(config, listing, recorded, candidates, _Steps(shown))


class _Steps:
    """The card's bar: `start(what)` names the step under way, `done()` counts it, `skip(n)` drops
    steps that will not run (the int8 levels after the one that passes) from the total."""

    def __init__(self, shown):
        self.shown = shown

    def start(self, what: str) -> None:
        self.shown.set_postfix_str(what)

    def done(self) -> None:
        self.shown.update(1)

    def last(self, what: str) -> None:
        """Drop every step left but one, and name that one (the run's remaining work is `what`)."""
        if self.shown.total is not None:
            self.skip(max(self.shown.total - self.shown.n - 1, 0))
        self.start(what)

    def skip(self, count: int) -> None:
        if count and self.shown.total is not None:
            self.shown.total -= count
            self.shown.refresh()


def _prepare(config: EmbedConfig, listing: Listing, recorded: dict | None, candidates: tuple[str, ...],
             steps: _Steps) -> tuple[FrozenBackbone, dict]:
    started = time.perf_counter()
    gates = Gates(config.min_cosine, config.min_overlap, config.max_accuracy_drop)
    # `--precision int8` alone: its backbone reads the sample and keys it first, so a card already made
    # on the same images (embedder.extract.cardstore) is reused without building the fp32 backbone.
    int8_only = candidates == ("int8",)
    steps.start("int8 backbone" if int8_only else "fp32 backbone")
    first = _build(config, "int8", "onnxruntime") if int8_only else _build(config, "fp32", _exact_runtime(config))
    steps.done()
    steps.start("reading the sample")
    sample = read_sample(config, listing, first, recorded)
    steps.done()
    fp32_graph = graph_key(first, components(first))[0] if int8_only else None
    key = _stored_card_key(config, fp32_graph, sample, gates) if int8_only else None
    # Reused only with the fp32 graph at hand: the int8 graph is quantised from it if it has gone.
    stored = cardstore.load(key) if key and (cache_root() / fp32_graph / "graph.onnx").is_file() else None
    if stored is not None:
        exact, exact_part, reused = None, stored["exact"], stored["made"]
        tried = _reuse(config, first, sample, stored, steps)
    else:
        exact = _build(config, "fp32", "onnxruntime") if int8_only else first
        tried, exact_part = _measure(config, exact, sample, candidates, gates, steps, first if int8_only else None)
        reused = None
    chosen, backbone = _choose(config, tried, exact_part["img_per_s"], exact, len(sample.held))
    result = {"format": CARD_FORMAT, "precision": chosen, "asked": config.space.precision, "exact": exact_part,
              "held_aside_images": len(sample.held), "labelled": bool((sample.labels >= 0).any()),
              "calibration": {"images": len(sample.calibration_rows),
                              "paths": [listing.paths[r] for r in sample.calibration_rows]},
              "gates": {"min_cosine": gates.min_cosine, "min_overlap": gates.min_overlap,
                        "max_accuracy_drop": gates.max_accuracy_drop},
              "cards": tried, "jpeg_draft": config.jpeg_draft,
              "seconds": round(time.perf_counter() - started, 2)}  # building, calibrating and measuring
    if reused is not None:
        result["reused"] = reused  # when and in how long the figures were measured
    elif key is not None:
        _keep(key, {"exact": exact_part, "cards": tried, "made": {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": result["seconds"]}})
    return backbone, result


def _keep(key: str, card: dict) -> None:
    """Store a card for reuse; a store that cannot be written costs the next run a measurement, not this run."""
    try:
        cardstore.save(key, card)
    except OSError as exc:
        warnings.warn(f"The fidelity card could not be kept for reuse in {cardstore.folder()} ({exc}); "
                      "the next run measures it again.", EmbedderNotice, stacklevel=2)


def _measure(config: EmbedConfig, exact: FrozenBackbone, sample: Sample, candidates: tuple[str, ...], gates: Gates,
             steps: _Steps, int8: FrozenBackbone | None) -> tuple[dict[str, dict], dict]:
    """(cards by path, each passing one holding its backbone; the exact path's part of the card)."""
    steps.start(f"fp32 on {len(sample.held)} images")
    exact_out, exact_speed = _timed_outputs(exact, sample.held_exact, config.batch_size)
    steps.done()
    tried: dict[str, dict] = {}
    for path in candidates:
        if path == "int8":
            backbone, card = _int8(config, sample, exact_out, gates, exact_speed, steps, int8)
        else:
            backbone, card = _bf16(config, sample, exact_out, gates, exact_speed, steps)
        tried[path] = {**card, "backbone": backbone} if backbone is not None else card
    return tried, {"precision": "fp32", "runtime": exact.config.runtime, "img_per_s": round(exact_speed, 2)}


def _choose(config: EmbedConfig, tried: dict[str, dict], exact_speed: float, exact: FrozenBackbone | None,
            held: int) -> tuple[str, FrozenBackbone]:
    """(the path the run takes, its backbone); the cards lose their backbones. An asked path that fails
    is refused; `fast` takes the fastest passing path, fp32 when none beats it."""
    if config.space.precision != "fast":
        card = tried[config.space.precision]
        if not card["passes"]:
            raise ConfigError(f"--precision {config.space.precision} fails its fidelity card on {held} "
                              f"held-aside images of SOURCE: {card['failure']}; or use --precision fp32.")
        chosen = config.space.precision
    else:
        passing = {p: c for p, c in tried.items() if "backbone" in c and c["passes"]}
        chosen = max(passing, key=lambda p: passing[p]["img_per_s"], default="fp32")
        if chosen != "fp32" and passing[chosen]["img_per_s"] <= exact_speed:
            chosen = "fp32"
    backbone = tried[chosen]["backbone"] if chosen != "fp32" else exact
    for c in tried.values():
        c.pop("backbone", None)
    return chosen, backbone


def _stored_card_key(config: EmbedConfig, fp32_key: str, sample: Sample, gates: Gates) -> str:
    """The store key of this run's int8 card (embedder.extract.cardstore): everything that decides its
    figures. `fp32_key`: the fp32 graph's folder (embedder.models.onnx.graph_key: network, settings, exporter)."""
    import onnxruntime
    import sklearn

    digest = {name: calibration_sha256(a) for name, a in (("calibration", sample.calibration), ("held", sample.held),
                                                           ("held_exact", sample.held_exact), ("labels", sample.labels))}
    return cardstore.card_key({
        "card": CARD_FORMAT, "int8": QUANT_FORMAT, "fp32_graph": fp32_key, **digest, "k": K,
        "method": config.calibration, "levels": list(LEVELS), "gates": [gates.min_cosine, gates.min_overlap,
                                                                         gates.max_accuracy_drop],
        "threads": torch.get_num_threads(), "cpu": cardstore.cpu_identity(),
        "versions": [onnxruntime.__version__, sklearn.__version__, np.__version__, torch.__version__]})


def _reuse(config: EmbedConfig, int8: FrozenBackbone, sample: Sample, stored: dict, steps: _Steps) -> dict[str, dict]:
    """The stored int8 card, its backbone attached from the graph cache (quantised again if it is gone:
    the same pixels and settings give the same graph)."""
    steps.last("reusing the card made on these images")
    card = dict(stored["cards"]["int8"])
    if card["passes"]:
        session, record = quantize(int8, sample.calibration, QuantSettings(config.calibration, True, card["level"]))
        int8.use_quantized(session, record)
        card["backbone"] = int8
    steps.done()
    return {"int8": card}


def model_card(model: str, source: str, *, weights: str = "DEFAULT", image_size: int | None = None,
               calibration_images: int = CALIBRATION_IMAGES, fidelity_images: int = FIDELITY_IMAGES,
               progress: bool = True) -> dict:
    """The fidelity cards of `model`'s fast paths (int8, bf16) on a sample of SOURCE's images, measured as
    `embed --precision fast` measures them (same sample rule, gates and timings), without writing a cache.
    The card names the path `--precision fast` would choose here. `progress`: a bar over its steps on stderr."""
    from embedder.data.sources import list_source

    config = EmbedConfig.of(source=source, model=model, out="card.h5", weights=weights, image_size=image_size,
                            precision="fast", calibration_images=calibration_images, fidelity_images=fidelity_images,
                            progress=progress)  # `out` is never written: only the card is computed
    listing = list_source(config.source, config.layout, config.limit, config.table_columns())
    return prepare(config, listing)[1]


def _exact_runtime(config: EmbedConfig) -> str:
    """Where the exact path runs: the exact default's runtime (`auto`), so a card's speed-up is against
    what the user gets without asking; int8 starts from the fp32 ONNX graph, so it is measured against
    that graph run in fp32 (the exact default wherever ONNX Runtime is, the model families int8 serves).
    bf16 runs on torch; its card compared it with torch fp32, which the default (ONNX Runtime) outruns."""
    if config.space.precision == "int8":
        return "onnxruntime"
    return "auto" if config.space.precision == "bf16" else config.space.runtime


def _build(config: EmbedConfig, precision: str, runtime: str) -> FrozenBackbone:
    return replace(config.space, precision=precision, runtime=runtime).load()


def read_sample(config: EmbedConfig, listing: Listing, backbone: FrozenBackbone, recorded: dict | None) -> Sample:
    """The calibration rows (evenly spaced over the listing, or those `recorded`) and the held-aside rows among the others."""
    n = len(listing)
    known = {p: i for i, p in enumerate(listing.paths)}
    paths = (recorded or {}).get("calibration", {}).get("paths") or []
    if paths and all(p in known for p in paths):
        cal_rows = np.array([known[p] for p in paths], dtype=np.int64)
    else:
        cal_rows = spread(np.arange(n, dtype=np.int64), min(config.calibration_images, n // 2))
    rest = spread(np.setdiff1d(np.arange(n, dtype=np.int64), cal_rows), config.fidelity_images)
    if len(cal_rows) < 1 or len(rest) < K + 1:
        raise ConfigError(f"--precision {config.space.precision} calibrates on some images of SOURCE and checks its "
                          f"fidelity on others: it needs at least {2 * (K + 1)} images, SOURCE has {n}; "
                          "use --precision fp32.")
    calibration, _ = _pixels(config, listing, cal_rows, backbone)
    held, held_rows = _pixels(config, listing, rest, backbone)
    # With --jpeg-draft the card measures its cost too: the exact path reads the exact pixels.
    held_exact = _pixels(replace(config, jpeg_draft=False), listing, held_rows, backbone)[0] if config.jpeg_draft else held
    if len(calibration) < 1 or len(held) < K + 1:
        raise ConfigError(f"Too few of SOURCE's sample images could be read to calibrate and check "
                          f"--precision {config.space.precision} ({len(calibration)} + {len(held)}); "
                          "use --precision fp32.")
    return Sample(cal_rows, calibration, held, np.asarray(listing.labels)[held_rows], held_exact)


def spread(rows: np.ndarray, count: int) -> np.ndarray:
    """`count` rows evenly spaced over `rows` (all of them when fewer): deterministic, and across every
    class folder of a sorted ImageFolder listing, where the first rows would all be one class."""
    if count >= len(rows):
        return rows
    return rows[np.unique(np.linspace(0, len(rows) - 1, max(count, 0)).round().astype(np.int64))]


def _pixels(config: EmbedConfig, listing: Listing, rows: np.ndarray, backbone: FrozenBackbone):
    """(uint8 pixels, the rows that decoded) read exactly as `embed` reads them."""
    reader = BatchReader(listing.root, listing.paths, rows, config.batch_size, backbone.preprocessing,
                         config.max_pixels, config.jpeg_draft, listing.members, config.fetch_settings())
    images, ok = [], []
    for b in range(len(reader)):
        batch = reader[b]
        images.append(batch["images"].numpy())
        ok.append(batch["indices"])
    size = backbone.preprocessing.crop_size
    return (np.concatenate(images) if images else np.zeros((0, 3, size, size), np.uint8),
            np.concatenate(ok) if ok else np.zeros(0, np.int64))


def _timed_outputs(backbone: FrozenBackbone, pixels: np.ndarray, batch: int) -> tuple[dict[str, np.ndarray], float]:
    """Every output for `pixels`, and the model-only speed of that pass (img/s, after one warm-up batch)."""
    backbone(torch.from_numpy(pixels[:batch]))
    parts, started = [], time.perf_counter()
    for s in range(0, len(pixels), batch):
        parts.append({k: v.float().numpy() for k, v in backbone.forward_all(torch.from_numpy(pixels[s:s + batch])).items()})
    seconds = time.perf_counter() - started
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, len(pixels) / max(seconds, 1e-9)


def _int8(config, sample, exact_out, gates, exact_speed, steps, backbone=None):
    """(backbone, card) of the first quantisation level whose card passes, else (None, the last card).
    `backbone`: the int8 backbone, when the caller built it already."""
    if backbone is None:
        steps.start("int8 backbone")
        backbone = _build(config, "int8", "onnxruntime")
    card, attempts = {}, []
    for level in LEVELS:
        steps.start(f"int8 level {level}: quantising" if level == 0 else f"int8 level {level}")
        session, record = quantize(backbone, sample.calibration, QuantSettings(config.calibration, True, level))
        backbone.use_quantized(session, record)
        out, speed = _timed_outputs(backbone, sample.held, config.batch_size)
        steps.done()
        card = {**fidelity_card(exact_out, out, sample.labels), "img_per_s": round(speed, 2),
                "speedup": round(speed / exact_speed, 2), "fp32_nodes": record["fp32_nodes"],
                "calibration_method": config.calibration, "level": level}
        card["failure"] = gates.failure(card)
        card["passes"] = card["failure"] is None
        attempts.append({"level": level, "fp32_nodes": len(record["fp32_nodes"]), "failure": card["failure"],
                         **{k: card[k] for k in ("mean_cosine", "knn_overlap", "speedup")}})
        card["attempts"] = list(attempts)
        if card["passes"]:
            steps.skip(len(LEVELS) - 1 - LEVELS.index(level))
            return backbone, card
    return None, card


def _bf16(config, sample, exact_out, gates, exact_speed, steps):
    """(backbone, card) of torch bf16 autocast; under `fast`, a path slower than fp32 gets no card."""
    steps.start("bf16")
    backbone = _build(config, "bf16", "torch")
    head = sample.held[: 2 * config.batch_size]
    if config.space.precision == "fast":
        _, speed = _timed_outputs(backbone, head, config.batch_size)
        if speed <= exact_speed:
            steps.done()
            return None, {"img_per_s": round(speed, 2), "speedup": round(speed / exact_speed, 2), "passes": False,
                          "failure": "slower than fp32 on this machine (not carded)"}
    out, speed = _timed_outputs(backbone, sample.held, config.batch_size)
    card = {**fidelity_card(exact_out, out, sample.labels), "img_per_s": round(speed, 2),
            "speedup": round(speed / exact_speed, 2), "engine": "torch autocast bf16"}
    card["failure"] = gates.failure(card)
    card["passes"] = card["failure"] is None
    steps.done()
    return backbone, card


def fidelity_card(exact: dict[str, np.ndarray], fast: dict[str, np.ndarray], labels: np.ndarray) -> dict:
    """Mean / min cosine and k-NN@10 overlap per output (the headline figures: the worst output's), and
    the linear-probe and k-NN accuracy of both paths on the labelled rows (drops in points)."""
    outputs = {}
    for name, reference in exact.items():
        cos = _cosines(reference, fast[name])
        outputs[name] = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                         "knn_overlap": knn_overlap(reference, fast[name])}
    card = {"mean_cosine": min(o["mean_cosine"] for o in outputs.values()),
            "min_cosine": min(o["min_cosine"] for o in outputs.values()),
            "knn_overlap": min(o["knn_overlap"] for o in outputs.values()), "outputs": outputs}
    primary = next(iter(exact))
    card.update(accuracy_change(exact[primary], fast[primary], labels))
    return card


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    scale = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(scale > 0, (a * b).sum(1) / np.maximum(scale, 1e-300), 1.0)


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def knn_overlap(exact: np.ndarray, fast: np.ndarray, k: int = K) -> float:
    """Mean share of each row's k nearest rows (cosine, within the sample) that both paths agree on."""
    k = min(k, len(exact) - 1)
    a, b = _neighbours(exact, k), _neighbours(fast, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def accuracy_change(exact: np.ndarray, fast: np.ndarray, labels: np.ndarray) -> dict:
    """Linear-probe and k-NN accuracy (%) of both paths on the same stratified folds; {} without labels."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep = labels >= 0
    y = labels[keep]
    counts = np.bincount(y) if len(y) else np.zeros(0, int)
    folds = int(min(5, counts[counts > 0].min())) if (counts > 0).sum() >= 2 else 0
    if folds < 2:
        return {}
    cv = StratifiedKFold(folds, shuffle=True, random_state=0)
    result = {"labelled_images": int(keep.sum()), "folds": folds}
    models = {"probe": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
              "knn": lambda: KNeighborsClassifier(n_neighbors=min(K, int(keep.sum() * (folds - 1) / folds)),
                                                  metric="cosine")}
    for name, make in models.items():
        with warnings.catch_warnings():  # a probe that stops at max_iter is still a fair comparison of the two
            warnings.simplefilter("ignore", ConvergenceWarning)
            acc = [100.0 * float(np.mean(cross_val_predict(make(), x[keep], y, cv=cv) == y)) for x in (exact, fast)]
        result[f"{name}_accuracy"] = {"fp32": round(acc[0], 2), "fast": round(acc[1], 2)}
        result[f"{name}_drop"] = round(acc[0] - acc[1], 2)
    return result


def card_lines(card: dict) -> list[str]:
    """The card as the run's closing lines and `embedder info` show it."""
    chosen = card["precision"]
    lines = [(f"  fidelity card   : --precision {card['asked']} -> {chosen}, on {card['held_aside_images']} held-aside "
              f"images (calibration: {card['calibration']['images']} others); exact fp32 "
              f"{card['exact']['img_per_s']:.1f} img/s ({card['exact']['runtime']})")]
    if "reused" in card:
        lines.append(f"    reused: measured {card['reused']['at']} in {card['reused']['seconds']:.1f} s on the same "
                     "images, graph, gates and CPU (speeds are from then)")
    for path, c in card["cards"].items():
        if "mean_cosine" not in c:
            lines.append(f"    {path:<5} {c['img_per_s']:.1f} img/s ({c['speedup']:.2f}x): {c['failure']}")
            continue
        acc = "".join(f", {n} acc {c[f'{n}_accuracy']['fp32']:.1f} -> {c[f'{n}_accuracy']['fast']:.1f}"
                      for n in ("probe", "knn") if f"{n}_accuracy" in c)
        kept = f", fp32 nodes: {', '.join(c['fp32_nodes']) or 'none'}" if "fp32_nodes" in c else ""
        verdict = "passes" if c["passes"] else f"FAILS: {c['failure']}"
        lines.append(f"    {path:<5} {c['img_per_s']:.1f} img/s ({c['speedup']:.2f}x), cosine mean {c['mean_cosine']:.4f} "
                     f"min {c['min_cosine']:.4f}, k-NN@{K} overlap {c['knn_overlap']:.3f}{acc}{kept}; {verdict}")
    return lines


def card_json(card: dict | None) -> str:
    return "" if card is None else json.dumps(card, sort_keys=True)
