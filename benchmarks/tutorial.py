"""embedder's defaults against the classic transfer-learning tutorial loop.

    python -m benchmarks tutorial [--quick]

The baseline is the feature loop of the PyTorch transfer-learning tutorial: torchvision's
`ImageFolder` with PIL transforms (Resize, CenterCrop, ToTensor, Normalize) in a
`DataLoader` (batch 4, 4 workers, as the tutorial has it) feeding an fp32 model in eval
mode under `no_grad`, with `fc` replaced by `Identity` to get the pooled features. The
same network (same seeded weights) runs both sides.

Part 1 (speed): ResNet-50 on photo-sized JPEGs (random init: the weights do not change
the cost). Variants alternate round by round in one process: the tutorial loop, the
tutorial loop at batch 32, and `embedder.embed` with its defaults (JPEG -> committed HDF5
cache). Prints images/s and ratios, and the cosine similarity of the default's features
to fp32-contiguous features of the same pipeline (precision and layout alone).

Part 2 (accuracy): the shipped EfficientNet-Lite0 on the 1,797 digit images (a third in
quick mode): features from the tutorial loop and from embedder's default, both written to
caches, and a linear probe trained on each with the same seeded split. Prints both test
accuracies and their difference in points.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from benchmarks.extraction import make_jpegs
from embedder.cache.reader import CacheSpec, FeatureCache
from embedder.cache.writer import CacheWriter
from embedder.data.sources import list_source
from embedder.extract.config import EmbedConfig
from embedder.extract.core import load_backbone
from embedder.extract.local import embed
from embedder.learn.config import ProbeConfig
from embedder.learn.train import run_probe
from embedder.models.backbone import build_model
from embedder.models.registry import get_backbone_spec
from embedder.models.runtime import auto_batch_size, auto_workers
from embedder.models.weights import resolve_weights


def tutorial_model(name: str, weights: str) -> nn.Module:
    """The registry's network with the same weights embedder loads, its head cut off as the tutorial does."""
    spec = get_backbone_spec(name)
    model = build_model(spec, resolve_weights(spec.weights, weights))
    if hasattr(model, "fc"):
        model.fc = nn.Identity()
    else:  # timm EfficientNet: forward() ends in `classifier`
        model.reset_classifier(0)
    return model.eval()


def tutorial_features(model: nn.Module, root: Path, name: str, batch_size: int = 4, workers: int = 4):
    """(paths relative to root, features) from the tutorial's ImageFolder + PIL + fp32 loop."""
    pre = get_backbone_spec(name).preprocessing
    interpolation = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[pre.interpolation]
    transform = T.Compose([T.Resize(pre.resize_size, interpolation=interpolation), T.CenterCrop(pre.crop_size),
                           T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    dataset = datasets.ImageFolder(str(root), transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    feats = []
    with torch.no_grad():
        for x, _ in loader:
            feats.append(model(x))
    paths = [str(Path(p).relative_to(root)) for p, _ in dataset.samples]
    return paths, torch.cat(feats).numpy()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def cache_features(path: Path, paths: list[str]) -> np.ndarray:
    with FeatureCache(path) as cache:
        order = {p: i for i, p in enumerate(cache.paths)}
        return cache.features()[[order[p] for p in paths]]


def write_cache(path: Path, like: Path, root: Path, paths: list[str], feats: np.ndarray) -> None:
    """Tutorial features into a cache with the real listing (labels, classes), for the same probe.

    The components are those of the cache `like`, marked as coming from the tutorial loop."""
    listing = list_source(str(root), "auto", None)
    order = {p: i for i, p in enumerate(paths)}
    rows = np.array([order[p] for p in listing.paths])
    with FeatureCache(like) as cache:
        components = dict(cache.components, decoder="tutorial loop: PIL transforms", memory_layout="contiguous")
    spec = CacheSpec(components, str(root), feats.shape[1], layout=listing.layout)
    with CacheWriter(path, spec, listing) as w:
        w.add(np.arange(len(listing)), feats[rows], [])
        w.finish()


def speed(quick: bool, work: Path) -> None:
    name, n, rounds = ("resnet18", 64, 1) if quick else ("resnet50", 160, 2)
    root = work / "photos"
    make_jpegs(root / "a", n // 2, seed=0)
    make_jpegs(root / "b", n - n // 2, seed=1)
    model = tutorial_model(name, "none")
    default = load_backbone(name, "none")
    exact = load_backbone(name, "none", precision="fp32", memory_layout="contiguous")
    cfg = default.config
    print(f"# part 1: {name} (random init), {n} photo-like JPEGs (about 0.1-0.9 MP), {torch.get_num_threads()} threads; "
          f"embedder default = precision {cfg.precision}, "
          f"{'channels_last' if cfg.channels_last else 'contiguous'}, batch {auto_batch_size()}, "
          f"{auto_workers(None)} reader worker(s)")
    seconds = {"tutorial loop (batch 4, 4 workers)": 0.0, "tutorial loop (batch 32, 4 workers)": 0.0,
               "embedder default (JPEG -> cache)": 0.0}
    for r in range(rounds):
        t = time.perf_counter()
        tut_paths, _ = tutorial_features(model, root, name, batch_size=4)
        seconds["tutorial loop (batch 4, 4 workers)"] += time.perf_counter() - t
        t = time.perf_counter()
        tutorial_features(model, root, name, batch_size=32)
        seconds["tutorial loop (batch 32, 4 workers)"] += time.perf_counter() - t
        t = time.perf_counter()
        embed(EmbedConfig.of(source=str(root), model=name, weights="none", out=str(work / f"d{r}.h5"), progress=False),
              backbone=default)
        seconds["embedder default (JPEG -> cache)"] += time.perf_counter() - t
    base = rounds * n / seconds["tutorial loop (batch 4, 4 workers)"]
    print(f"{'variant':<40}{'img/s':>8}{'vs tutorial':>13}")
    for variant, s in seconds.items():
        rate = rounds * n / s
        print(f"{variant:<40}{rate:>8.1f}{rate / base:>12.2f}x")
    embed(EmbedConfig.of(source=str(root), model=name, weights="none", out=str(work / "exact.h5"), progress=False,
                      precision="fp32", memory_layout="contiguous"), backbone=exact)
    mine = cache_features(work / "d0.h5", tut_paths)
    fp32 = cache_features(work / "exact.h5", tut_paths)
    print(f"cosine, default vs fp32 contiguous (same pipeline): min {cosine_rows(mine, fp32).min():.6f}")
    # No cosine to the tutorial's features here: random-init ResNet features all point almost the
    # same way, so that cosine would say nothing; part 2 measures it with real weights.


def digits_sample(work: Path, quick: bool) -> Path:
    """The digits sample under `work`; in quick mode every third image, keeping the class folders."""
    from embedder.data.samples import make_samples

    digits = make_samples(work, only=["digits"])["digits"]
    if not quick:
        return digits
    sub = work / "digits_third"
    for i, p in enumerate(sorted(digits.rglob("*.png"))):
        if i % 3 == 0:
            (sub / p.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, sub / p.parent.name / p.name)
    return sub


def accuracy(quick: bool, work: Path) -> None:
    name = "efficientnet_lite0"
    digits = digits_sample(work, quick)
    t = time.perf_counter()
    embed(EmbedConfig.of(source=str(digits), model=name, out=str(work / "default.h5"), progress=False))
    emb_s = time.perf_counter() - t
    t = time.perf_counter()
    paths, feats = tutorial_features(tutorial_model(name, "DEFAULT"), digits, name)
    tut_s = time.perf_counter() - t
    write_cache(work / "tutorial.h5", work / "default.h5", digits, paths, feats)
    cos = cosine_rows(cache_features(work / "default.h5", paths), feats)
    print(f"# part 2: {name} (shipped ImageNet weights), {len(paths)} digit images, linear probe, seeded 60/20/20 split")
    print(f"{'features from':<40}{'extract s':>10}{'test acc':>10}{'val acc':>9}")
    accs = {}
    for label, cache, s in (("tutorial loop", "tutorial.h5", tut_s), ("embedder default", "default.h5", emb_s)):
        r = run_probe(ProbeConfig(str(work / cache), out=str(work / f"{cache}.probe")))
        accs[label] = r["test_accuracy"]
        print(f"{label:<40}{s:>10.1f}{100 * r['test_accuracy']:>9.2f}%{100 * r['val_accuracy']:>8.2f}%")
    diff = 100 * (accs["embedder default"] - accs["tutorial loop"])
    print(f"test accuracy difference: {diff:+.2f} points; feature cosine to the tutorial's: min {cos.min():.6f}")


def run(quick: bool = False) -> None:
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-"))
    try:
        speed(quick, work)
        accuracy(quick, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
