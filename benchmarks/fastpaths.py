"""int8 and bf16 on the CPU against the exact fp32 default: speed side by side, and fidelity cards.

    python -m benchmarks fastpaths           # ResNet-50 (random init) and Lite0 (shipped weights), 224 px
    python -m benchmarks fastpaths --quick   # ResNet-18 at 64 px, a minute or two

1. Model only, ResNet-50: ONNX Runtime fp32 against the int8 graph (every Conv/Gemm quantised, level 0,
   and the level the card picks), batches of 4 and 16, interleaved rounds on the same real pixels.
2. End to end, JPEG -> committed cache: `embed` with no --precision (the exact default) against
   `--precision int8` and `fast`, through the real driver; the fast runs' walls include their card
   (building, calibrating, the exact pass over the held-aside images), shown apart.
3. Fidelity cards (what `embed --precision int8` / `bf16` computes first) for Lite0's shipped weights on
   photo crops and on the digits (300 held-aside, so one image is 0.33 points), and for random-init
   ResNet-50 on photo crops; then Lite0's figures at every int8 level, whatever the gates.
4. The exact default (ONNX Runtime fp32) against torch fp32: the smallest cosine over the photo crops.

The photos are only 8 (`embedder make-samples`), too few for a held-aside k-NN@10 sample, so the
benchmark cuts 192 crops from them (seeded; 8 photos x 24 random square crops, 448 px JPEGs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from embedder.data.samples import make_samples
from embedder.data.sources import list_source
from embedder.errors import ConfigError
from embedder.extract.config import EmbedConfig
from embedder.extract.core import load_backbone, with_runtime
from embedder.extract.fidelity import _timed_outputs, card_lines, fidelity_card, prepare, read_sample
from embedder.extract.local import embed
from embedder.models.quantize import LEVELS, QuantSettings, quantize
from embedder.models.runtime import cpu_info

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> str:
    name, flags = cpu_info()
    return f"{name}; " + ", ".join(f"{f} {'yes' if f in flags else 'NO'}" for f in FLAGS)


def photo_crops(root: Path, count: int = 192, size: int = 448) -> Path:
    """`count` seeded random square crops of the sample photos, as JPEGs in root/photo_crops."""
    photos = Path("data/photos")
    if not (photos / ".complete").exists():
        make_samples("data", only=["photos"])
    out = root / "photo_crops"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    for i in range(count):
        src = files[i % len(files)]
        with Image.open(src) as im:
            im = im.convert("RGB")
            side = int(min(im.size) * rng.uniform(0.35, 1.0))
            x, y = rng.integers(0, im.width - side + 1), rng.integers(0, im.height - side + 1)
            crop = im.crop((int(x), int(y), int(x) + side, int(y) + side)).resize((size, size), Image.BICUBIC)
            crop.save(out / f"{src.stem}_{i:03d}.jpg", quality=90)
    return out


def _config(source, out, model, weights, **extra) -> EmbedConfig:
    return EmbedConfig.of(source=str(source), model=model, out=str(out), weights=weights, progress=False,
                       overwrite=True, **extra)


def model_only(crops: Path, tmp: Path, model: str, size: int | None, rounds: int) -> None:
    config = _config(crops, tmp / "m.h5", model, "none", image_size=size, precision="int8")
    exact = load_backbone(model, "none", image_size=size, device="cpu", precision="fp32", runtime="onnxruntime")
    listing = list_source(str(crops), "auto")
    sample = read_sample(config, listing, exact, None)
    int8 = load_backbone(model, "none", image_size=size, device="cpu", precision="int8", runtime="onnxruntime")
    int8.use_quantized(*quantize(int8, sample.calibration, QuantSettings(level=0)))
    nets = {"onnxruntime fp32": exact, "onnxruntime int8 (level 0)": int8}
    print(f"\n{model} model only, {sample.held.shape[-1]} px, real pixels, {rounds} interleaved rounds")
    for batch in (4, 16):
        x = torch.from_numpy(sample.held[:batch].copy())
        seconds = dict.fromkeys(nets, 0.0)
        for net in nets.values():
            net(x)
        for _ in range(rounds):
            for name, net in nets.items():
                t0 = time.perf_counter()
                for _ in range(4):
                    net(x)
                seconds[name] += time.perf_counter() - t0
        base = rounds * 4 * batch / seconds["onnxruntime fp32"]
        for name in nets:
            rate = rounds * 4 * batch / seconds[name]
            print(f"  batch {batch:>2}  {name:<28}{rate:>8.1f} img/s {rate / base:>6.2f}x")


def end_to_end(crops: Path, tmp: Path, model: str, size: int | None, fast: bool = True) -> None:
    """`fast`: also the `--precision fast` run (it times bf16 as well: minutes where bf16 is emulated)."""
    print(f"\n{model} end to end, {len(list(crops.iterdir()))} JPEGs -> committed cache (whole embed() call)")
    runs = (("exact default (no --precision)", {}),
            ("--precision int8", {"precision": "int8", "fidelity_images": 64}),
            ("exact default, again", {}),
            ("--precision int8, again (graph cached)", {"precision": "int8", "fidelity_images": 64}),
            ("--precision fast", {"precision": "fast", "fidelity_images": 64}))
    for name, extra in runs if fast else runs[:4]:
        report = embed(_config(crops, tmp / "e2e.h5", model, "none", image_size=size, **extra))
        card_s = report.fidelity["seconds"] if report.fidelity else 0.0
        loop = report.embedded / max(report.wall_s - card_s, 1e-9)
        print(f"  {name:<40} wall {report.wall_s:6.1f} s = {report.images_per_s:5.1f} img/s; card {card_s:5.1f} s; "
              f"without the card {loop:5.1f} img/s; precision {report.config['precision']}")


def cards(tmp: Path, runs: list[tuple[str, str, Path, dict]]) -> None:
    """Each path's card under the default gates (embed's own `prepare`, without embedding the rest of
    SOURCE); a refused path's figures again with the gates off."""
    for model, weights, source, extra in runs:
        listing = list_source(str(source), "auto")
        for precision in ("int8", "bf16"):
            print(f"\n{model} ({weights}) on {source.name} ({len(listing)} images), --precision {precision}")
            for gates in ({}, {"min_cosine": 0.0, "min_overlap": 0.0, "max_accuracy_drop": 100.0}):
                config = _config(source, tmp / "card.h5", model, weights, precision=precision, **gates, **extra)
                try:
                    _, card = prepare(with_runtime(config), listing)
                except ConfigError as exc:
                    print(f"  refused under the default gates: {exc}\n  with the gates off:")
                    continue
                print("\n".join(card_lines(card)))
                for c in card["cards"].values():
                    for attempt in c.get("attempts", []):
                        print(f"    int8 level {attempt['level']} ({attempt['fp32_nodes']} nodes fp32): mean cosine "
                              f"{attempt['mean_cosine']:.4f}, k-NN@10 overlap {attempt['knn_overlap']:.3f}, "
                              f"{attempt['speedup']:.2f}x fp32: {attempt['failure'] or 'passes'}")
                    for name in ("probe", "knn"):
                        if f"{name}_accuracy" in c:
                            print(f"    {name} accuracy fp32 {c[f'{name}_accuracy']['fp32']:.2f} -> "
                                  f"{c[f'{name}_accuracy']['fast']:.2f} ({c[f'{name}_drop']:+.2f} points drop)")
                break


class Held:
    """A sample of `source` read as `embed --precision int8` reads it, the exact backbone (ONNX Runtime fp32)
    and its outputs on the held-aside rows: what the int8 variants below are measured against."""

    def __init__(self, tmp: Path, model: str, weights: str, source: Path, **extra):
        self.config = _config(source, tmp / "held.h5", model, weights, precision="int8", **extra)
        self.build = {"device": "cpu", "runtime": "onnxruntime", "image_size": self.config.space.image_size}
        self.model, self.weights = model, weights
        self.exact = self.backbone("fp32")
        self.sample = read_sample(self.config, list_source(str(source), "auto"), self.exact, None)
        self.reference, self.exact_speed = _timed_outputs(self.exact, self.sample.held, self.config.batch_size)

    def backbone(self, precision: str):
        return load_backbone(self.model, self.weights, precision=precision, **self.build)

    def figures(self, int8, again: bool = False) -> tuple[dict, float]:
        """(`int8`'s fidelity card against fp32, its speed over fp32's on the held-aside rows); `again`:
        time fp32 once more just before (the VM's speed drifts between variants)."""
        batch = self.config.batch_size
        exact_speed = _timed_outputs(self.exact, self.sample.held, batch)[1] if again else self.exact_speed
        out, speed = _timed_outputs(int8, self.sample.held, batch)
        return fidelity_card(self.reference, out, self.sample.labels), speed / exact_speed


def levels(tmp: Path, model: str, weights: str, source: Path, **extra) -> None:
    """Every int8 level's figures on one sample, whatever the gates (a refused run's card only names
    the last level's failure): what each step of the ladder buys, and what it costs in speed."""
    held = Held(tmp, model, weights, source, **extra)
    print(f"\n{model} ({weights}) on {source.name}: int8 levels, {len(held.sample.held)} held-aside images")
    for level in LEVELS:
        int8 = held.backbone("int8")
        int8.use_quantized(*quantize(int8, held.sample.calibration, QuantSettings(level=level)))
        card, ratio = held.figures(int8)
        drops = "".join(f", {n} {card[f'{n}_drop']:+.2f} points" for n in ("probe", "knn") if f"{n}_drop" in card)
        print(f"  level {level} ({len(int8.quantization['fp32_nodes'])} nodes fp32): mean cosine "
              f"{card['mean_cosine']:.4f}, min {card['min_cosine']:.4f}, k-NN@10 overlap {card['knn_overlap']:.3f}"
              f"{drops}; {ratio:.2f}x fp32")


def methods(tmp: Path, model: str, weights: str, source: Path, **extra) -> None:
    """What each calibration method costs to quantise (level 0, nothing cached: a fresh EMBEDDER_CACHE
    per method) and what it gives: the first int8 run's fixed cost."""
    print(f"\n{model} ({weights}) on {source.name}: calibration methods, level 0, nothing cached")
    kept = os.environ.get("EMBEDDER_CACHE")
    try:
        for method in ("percentile", "minmax", "entropy"):
            os.environ["EMBEDDER_CACHE"] = str(tmp / f"cache-{method}")
            held = Held(tmp, model, weights, source, **extra)  # exports the fp32 graph into this cache
            int8 = held.backbone("int8")
            started = time.perf_counter()
            int8.use_quantized(*quantize(int8, held.sample.calibration, QuantSettings(method=method)))
            seconds = time.perf_counter() - started
            card, ratio = held.figures(int8)
            print(f"  {method:<10} quantising {seconds:5.1f} s on {len(held.sample.calibration)} images; mean "
                  f"cosine {card['mean_cosine']:.4f}, k-NN@10 overlap {card['knn_overlap']:.3f}; {ratio:.2f}x fp32")
    finally:
        if kept is None:
            os.environ.pop("EMBEDDER_CACHE", None)
        else:
            os.environ["EMBEDDER_CACHE"] = kept


def exact_vs_torch(crops: Path, tmp: Path, model: str, weights: str, size: int | None) -> None:
    default = embed(_config(crops, tmp / "d.h5", model, weights, image_size=size))
    reference = embed(_config(crops, tmp / "t.h5", model, weights, image_size=size, precision="fp32", runtime="torch"))
    import h5py

    with h5py.File(tmp / "d.h5") as a, h5py.File(tmp / "t.h5") as b:
        x, y = a["features"][:].astype(np.float64), b["features"][:].astype(np.float64)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    print(f"\n{model} ({weights}): exact default ({default.config.get('runtime', 'torch')[:22]}, "
          f"{default.config['precision']}) vs torch fp32 ({reference.config['precision']}) on {len(x)} crops: "
          f"min cosine {cos.min():.7f}, mean {cos.mean():.7f}")


def cards_and_exact(crops: Path, tmp: Path) -> None:
    """Parts 3 and 4 alone (the digits and ResNet-50 cards, the exact default against torch)."""
    cards(tmp, [("efficientnet_lite0", "DEFAULT", Path("data/digits"), {"fidelity_images": 300}),
                ("resnet50", "none", crops, {})])
    exact_vs_torch(crops, tmp, "efficientnet_lite0", "DEFAULT", None)
    exact_vs_torch(crops, tmp, "resnet50", "none", None)


def run(quick: bool = False) -> None:
    print(f"# CPU: {cpu_flags()}; {torch.get_num_threads()} threads. The machine is shared: timings move.")
    tmp = Path(tempfile.mkdtemp(prefix="fastpaths-"))
    try:
        crops = photo_crops(tmp, count=48 if quick else 192, size=256 if quick else 448)
        model, size = ("resnet18", 64) if quick else ("resnet50", None)
        model_only(crops, tmp, model, size, rounds=2 if quick else 5)
        end_to_end(crops, tmp, model, size)
        if not (Path("data/digits") / ".complete").exists():
            make_samples("data", only=["digits"])
        runs = [("efficientnet_lite0", "DEFAULT", crops, {}),
                ("efficientnet_lite0", "DEFAULT", Path("data/digits"), {"fidelity_images": 300}),
                (model, "none", crops, {"image_size": size} if size else {})]
        cards(tmp, runs[2:] if quick else runs)
        if not quick:
            levels(tmp, "efficientnet_lite0", "DEFAULT", crops)
            levels(tmp, "efficientnet_lite0", "DEFAULT", Path("data/digits"), fidelity_images=300)
        exact_vs_torch(crops, tmp, "efficientnet_lite0", "DEFAULT", None)
        if not quick:
            exact_vs_torch(crops, tmp, model, "none", size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
