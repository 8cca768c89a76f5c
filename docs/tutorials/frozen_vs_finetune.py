"""Tutorial: a frozen pretrained backbone as a fixed feature extractor, versus fine-tuning.

The classic transfer-learning tutorial (ants vs bees) trains a new head on a frozen network by
running the whole network over every image in every epoch. The features of a frozen network do
not change, so embedder computes them once into a cache; a linear probe then trains on the cache
in a fraction of a second, and every later experiment reuses it.

Data: a two-class folder made from the shipped digits (threes and eights), in the tutorial's
train/val layout. Backbone: the shipped pretrained EfficientNet-Lite0 at 64 px (small, so this
runs in a minute on two cores).

Run:  python docs/tutorials/frozen_vs_finetune.py [DATA_DIR]      (DATA_DIR default: data)
"""

import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

from embedder.cli.main import main
from embedder.data.samples import make_samples


def run(*argv: str) -> dict:
    """Run an embedder command as a user would type it, and return its --json report."""
    print("$ embedder " + " ".join(argv))
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--json"]) == 0
    report = json.loads(out.getvalue())
    report["seconds"] = time.perf_counter() - t0
    return report


data = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
digits = make_samples(data, only=["digits"])["digits"]
folder = data / "tutorials" / "threes_eights"
if not folder.is_dir():  # train/ val/ folders, like hymenoptera_data/: every method uses the same split
    for split, part in (("train", slice(0, 80)), ("val", slice(80, 130))):
        for digit, name in (("3", "three"), ("8", "eight")):
            (folder / split / name).mkdir(parents=True)
            for f in sorted((digits / digit).glob("*.png"))[part]:
                shutil.copy(f, folder / split / name / f.name)
out = data / "tutorials" / "out" / "frozen_vs_finetune"
shutil.rmtree(out, ignore_errors=True)  # a fresh run each time: the timings are of the first embedding
model = ["--model", "efficientnet_lite0", "--image-size", "64"]

embedded = run("embed", str(folder), *model, "--out", str(out / "threes_eights.h5"), "--quiet")
probe = run("probe", str(out / "threes_eights.h5"), "--out", str(out / "probe"))
frozen = run("finetune", str(folder), *model, "--freeze-backbone", "--epochs", "10", "--lr", "0.01", "--batch-size", "16",
             "--out", str(out / "frozen"), "--quiet", "--seed", "0")
tuned = run("finetune", str(folder), *model, "--epochs", "10", "--lr", "0.001", "--batch-size", "16",
            "--out", str(out / "finetuned"), "--quiet", "--seed", "0")

embed_s = embedded["seconds"]
print()
print(f"{'method':<40}{'val accuracy':>13}{'training':>10}  one-time cost")
print(f"{'linear probe on the cached features':<40}{100 * probe['val_accuracy']:>12.1f}%{probe['fit_s']:>9.2f}s"
      f"  embed {embedded['embedded']} images once: {embed_s:.1f} s")
print(f"{'fixed feature extractor, 10 epochs':<40}{100 * frozen['val_accuracy']:>12.1f}%{frozen['seconds']:>9.2f}s  -")
print(f"{'full fine-tuning, 10 epochs':<40}{100 * tuned['val_accuracy']:>12.1f}%{tuned['seconds']:>9.2f}s  -")
speedup = frozen["seconds"] / probe["fit_s"]
print(f"\nTraining on the cache took {speedup:.0f}x less time than the fixed feature extractor, which runs the "
      f"frozen network over all {embedded['embedded']} images again in every epoch. The embedding is paid once: "
      f"ten experiments (other C values, classifiers, splits) cost {embed_s + 10 * probe['fit_s']:.0f} s on the "
      f"cache against {10 * frozen['seconds']:.0f} s of fixed-extractor training.")
# Tolerances, in points of the 100 validation images: the probe's features and seeded fit give the same
# answer on any CPU up to one image on a boundary; SGD's float sums depend on the thread count, so the
# two trained networks may differ by a few images between machines.
print(f"RESULT probe_val_accuracy={100 * probe['val_accuracy']:.1f} tolerance=1")
print(f"RESULT frozen_val_accuracy={100 * frozen['val_accuracy']:.1f} tolerance=4")
print(f"RESULT finetune_val_accuracy={100 * tuned['val_accuracy']:.1f} tolerance=4")
print(f"TIME probe_fit_s={probe['fit_s']:.2f}")
print(f"TIME frozen_over_probe_training={speedup:.1f}")
