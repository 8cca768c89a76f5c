"""Tutorial: choosing a layer with the layer sweep.

Early layers of a CNN respond to edges and textures, late ones to object parts and shapes (the
classic finding of Zeiler and Fergus, and of Yosinski et al. on transferability). Which layer serves
a new task best is measured, not guessed: embed several layers in one pass, then train a probe on
each and compare them on the same split (`embedder probe --layer all`).

Data: 600 of the shipped digits; backbone: the shipped pretrained EfficientNet-Lite0 at 64 px.

Run:  python docs/tutorials/layer_sweep.py [DATA_DIR]      (DATA_DIR default: data)
"""

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

from embedder.cli.main import main
from embedder.data.samples import make_samples

data = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
digits = make_samples(data, only=["digits"])["digits"]
folder = data / "tutorials" / "digits600"
if not folder.is_dir():
    for d in sorted(digits.iterdir()):
        if d.is_dir():
            (folder / d.name).mkdir(parents=True)
            for f in sorted(d.glob("*.png"))[:60]:
                shutil.copy(f, folder / d.name / f.name)
cache = data / "tutorials" / "out" / "digits600.h5"
layers = ["blocks.1", "blocks.3", "blocks.5", "avgpool"]
argv = ["embed", str(folder), "--model", "efficientnet_lite0", "--image-size", "64", "--out", str(cache), "--quiet"]
for layer in layers:
    argv += ["--layer", layer]
print("$ embedder " + " ".join(argv))
with contextlib.redirect_stdout(io.StringIO()):
    assert main(argv) == 0

argv = ["probe", str(cache), "--layer", "all", "--out", str(data / "tutorials" / "out" / "sweep"), "--json"]
print("$ embedder " + " ".join(argv))
out = io.StringIO()
with contextlib.redirect_stdout(out):
    assert main(argv) == 0
sweep = json.loads(out.getvalue())

print(f"\n{'layer':<26}{'width':>7}{'val acc':>10}{'test acc':>10}")
for row in sweep["layers"]:
    print(f"{row['layer']:<26}{row['dim']:>7}{100 * row['val_accuracy']:>9.1f}%{100 * row['test_accuracy']:>9.1f}%")
print(f"best on validation: {sweep['best']}")
# Tolerance: one or two of the 120 validation digits, for float sums that differ between CPUs.
for row in sweep["layers"]:
    print(f"RESULT val_accuracy_{row['layer'].replace('.', '_')}={100 * row['val_accuracy']:.1f} tolerance=2")
