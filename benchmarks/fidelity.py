"""Fidelity to the libraries: embedder's default and layer features against each library's own model,
transforms and forward pass (tests/fidelity.py), on the sample photos, seeded random weights, for the
torch runtime at two crops and ONNX Runtime at the larger one. Prints a table of minimum cosines.
Not a timing: the numbers do not depend on the machine's load."""

from __future__ import annotations

import tempfile
from pathlib import Path


def run(quick: bool = False) -> None:
    from tests import fidelity

    cases = fidelity.CASES[:2] if quick else fidelity.CASES
    print("| architecture | runtime | crop | default: min cosine | layer (pooled): min cosine |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        images = fidelity.photos(Path(tmp) / "samples")
        for case in cases:
            small, large = fidelity.sizes(case)
            for runtime, size in (("torch", small), ("torch", large), ("onnxruntime", large)):
                got = fidelity.compare(case, size, images, Path(tmp), runtime)
                print(f"| {case.name} (layer {case.layer}, {case.pool}) | {runtime} | {size} | "
                      f"{got['default']:.7f} | {got['layer']:.7f} |", flush=True)
