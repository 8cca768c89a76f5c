"""k-NN and few-shot evaluation beside the linear probe, on the digits sample.

    python -m benchmarks evaluation [--quick]

The shipped EfficientNet-Lite0 embeds the 1,797 digit images (a third in quick mode) once,
storing three layers in one pass (blocks.3, blocks.5 and the pooled avgpool features,
conv maps average-pooled).
On the seeded 60/20/20 split it then prints:

  1. the linear probe (C swept on validation) and DINOv2's k-NN vote (k chosen on
     validation, T = 0.07) on avgpool: test top-1, top-5 and balanced accuracy, and the
     vote's accuracy for every k;
  2. few-shot: 1, 2, 5 and 10 training images per class drawn from the train split only,
     5 seeded draws each, for both classifiers: mean ± std of test accuracy;
  3. the layer sweep (`--layer all`) with the k-NN vote (the probe's C sweep on three
     layers would double the run).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.tutorial import digits_sample
from embedder.extract.config import EmbedConfig
from embedder.extract.local import embed
from embedder.learn.train import ProbeConfig, run_probe

SHOTS = (1, 2, 5, 10)
LAYERS = ("blocks.3", "blocks.5", "avgpool")  # in depth order: the sweep plots them so


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def run(quick: bool = False) -> None:
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-"))
    try:
        digits = digits_sample(work, quick)
        cache = work / "digits.h5"
        t = time.perf_counter()
        embed(EmbedConfig.of(source=str(digits), model="efficientnet_lite0", out=str(cache), layer=LAYERS[0],
                          extra_layers=LAYERS[1:], progress=False))
        print(f"# efficientnet_lite0 (shipped ImageNet weights), digits, layers {', '.join(LAYERS)}: "
              f"embedded in {time.perf_counter() - t:.1f} s; seeded 60/20/20 split")
        reports = {}
        print(f"{'classifier (avgpool)':<24}{'test top-1':>11}{'top-5':>9}{'balanced':>10}{'val':>9}"
              f"{'chosen':>16}{'fit s':>8}{'wall s':>8}")
        for name in ("probe", "knn-vote"):
            r = run_probe(ProbeConfig(str(cache), out=str(work / name), classifier=name, layer="avgpool",
                                      shots=SHOTS, draws=5))
            reports[name] = r
            m = r["metrics"]["test"]
            chosen = f"C={r['chosen']['C']:.3g}" if name == "probe" else f"k={r['chosen']['k']}"
            print(f"{name:<24}{_pct(m['top1_accuracy']):>11}{_pct(m['top5_accuracy']):>9}"
                  f"{_pct(m['balanced_accuracy']):>10}{_pct(r['val_accuracy']):>9}{chosen:>16}"
                  f"{r['fit_s']:>8.2f}{r['wall_s']:>8.1f}")
        print("knn-vote accuracy by k: " + ", ".join(
            f"k={k}: val {_pct(row['val'])} test {_pct(row['test'])}"
            for k, row in reports["knn-vote"]["accuracy_by_k"].items()))
        print(f"\n{'few-shot (5 draws), test acc':<30}" + "".join(f"{f'{n}-shot':>17}" for n in SHOTS))
        for name, r in reports.items():
            rows = r["few_shot"]["shots"]
            cells = [f"{100 * rows[str(n)]['mean']:.2f} ± {100 * rows[str(n)]['std']:.2f}" for n in SHOTS]
            print(f"{name:<30}" + "".join(f"{c:>17}" for c in cells))
            assert r["few_shot"]["val_overlap"] == 0
        t = time.perf_counter()
        sweep = run_probe(ProbeConfig(str(cache), out=str(work / "sweep"), classifier="knn-vote", layer="all"))
        print(f"\nlayer sweep (--layer all, knn-vote, {time.perf_counter() - t:.1f} s):")
        for row in sweep["layers"]:
            mark = "*" if row["layer"] == sweep["best"] else " "
            print(f"  {mark} {row['layer']:<20}{row['dim']:>6}  val {_pct(row['val_accuracy'])}  "
                  f"test {_pct(row['test_accuracy'])}  fit {row['fit_s']:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
