"""Tutorial: cleaning a labelled dataset with `embedder curate`.

Label mistakes, outliers, near-duplicates and train/test leaks hide in every real dataset. Here
5% of 600 shipped digits are put into the wrong class folder on purpose, and `embedder curate`
ranks every image by how likely its label is wrong (confident learning on an out-of-fold linear
probe of the cached features). The question is how many of the planted mistakes come first.

Run:  python docs/tutorials/cleaning.py [DATA_DIR]      (DATA_DIR default: data)
"""

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from embedder.cli.main import main
from embedder.data.samples import make_samples

data = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
digits = make_samples(data, only=["digits"])["digits"]
folder = data / "tutorials" / "digits_noisy"
planted = set()
rng = np.random.default_rng(0)
files = [f for d in sorted(digits.iterdir()) if d.is_dir() for f in sorted(d.glob("*.png"))[:60]]
wrong = set(rng.choice(len(files), size=len(files) // 20, replace=False).tolist())
for n, f in enumerate(files):
    label = f.parent.name
    if n in wrong:  # into another class's folder
        label = str((int(label) + 1 + int(rng.integers(9))) % 10)
        planted.add(f"{label}/{f.name}")
    target = folder / label / f.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)


def run(*argv: str) -> dict:
    print("$ embedder " + " ".join(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--json"]) == 0
    return json.loads(out.getvalue())


cache, report = data / "tutorials" / "out" / "digits_noisy.h5", data / "tutorials" / "out" / "curate"
run("embed", str(folder), "--model", "efficientnet_lite0", "--image-size", "64", "--out", str(cache), "--quiet")
summary = run("curate", str(cache), "--out", str(report), "--gallery", "0")

scores = pq.read_table(report / "scores.parquet").to_pandas().sort_values("label_quality")
top = scores["path"].head(len(planted)).tolist()
found = sum(p in planted for p in top)
print(f"\n{len(planted)} labels were planted wrong among {len(files)} images.")
print(f"curate flags {summary['label_mistakes']['issues']} likely mistakes; among its {len(planted)} lowest "
      f"label_quality scores, {found} are planted ones (precision {found / len(planted):.2f}).")
for path in top[:5]:
    print(f"  {'planted' if path in planted else 'other  '}  {path}")
# Tolerance: two images, for a probe fit whose float sums differ between CPUs.
print(f"RESULT planted={len(planted)}")
print(f"RESULT found_in_top={found} tolerance=2")
