"""`embedder export`: a trained linear probe + its backbone -> one image classifier.

The probe's folded weights go into a *new* `nn.Linear(in_features, n_classes)` installed
where the pretrained head was (ResNet `fc`, VGG `classifier[6]` for fc7 features, ...),
so the exported network computes exactly the cached features and then the probe.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from embedder.cache.vectors import imported_refusal
from embedder.errors import ConfigError
from embedder.learn.checkpoint import ClassifierInfo, save_classifier
from embedder.learn.probefile import read_probe
from embedder.models.heads import replace_head
from embedder.models.space import FeatureSpace
from embedder.outputs import CLASSIFIER, claim, require_suffix


def export_probe(probe_dir: str | os.PathLike, out: str | os.PathLike, weights_path: str | None = None,
                 overwrite: bool = False) -> Path:
    require_suffix(out, CLASSIFIER)
    claim(out, CLASSIFIER, [probe_dir], overwrite)  # before the backbone is built
    _check_standalone(out)
    probe = read_probe(probe_dir)
    components = probe.components
    if "weights" not in components:  # a probe.pt written by hand (enough for --init-head, not here)
        raise ConfigError(
            f"The probe in {probe_dir} does not record the cache it was trained on, which export needs to rebuild "
            "the backbone. Train it with `embedder probe CACHE.h5`."
        )
    refusal = imported_refusal(components, "put the probe on",
                               "Apply the probe to caches of the same vectors with `embedder evaluate` instead.")
    if refusal:
        raise ConfigError(refusal)
    if components.get("normalization", "none") != "none":
        raise ConfigError(
            "This probe was trained on L2-normalised features, which the replaced head cannot reproduce inside "
            "the network. Embed without --normalize l2 and train the probe again to export it."
        )
    if components.get("pooling", "avg") != "avg":
        raise ConfigError(
            f"This probe was trained on {components['pooling']}-pooled features, but the network's classifier "
            "sits after global *average* pooling. Embed with --pool avg and train the probe again to export it."
        )
    space = FeatureSpace.from_components(components, weights_path)
    spec, model, _ = space.network(recorded_weights=components["weights"])
    head, _ = replace_head(model, spec, probe.layer, len(probe.classes))
    with torch.no_grad():
        head.weight.copy_(probe.coef)
        head.bias.copy_(probe.intercept)
    info = ClassifierInfo(
        model=probe.model,
        layer=probe.layer,
        classes=list(probe.classes),
        image_size=space.image_size,
        precision=space.precision,
        memory_layout=space.memory_layout,
        weights=components["weights"],
        origin={"kind": "linear-probe", "probe_dir": str(probe_dir), "fingerprint": probe.fingerprint, "C": probe.C},
    )
    path = save_classifier(out, model, info)
    from embedder.models.onnx import versions

    if versions() is not None:  # without the ONNX packages, the checkpoint alone (predict needs no more)
        write_standalone(path)
    return path


STANDALONE_FORMAT = "embedder-standalone-classifier/1"


def _check_standalone(out: str | os.PathLike) -> None:
    """MODEL.onnx and MODEL.json beside MODEL.pt are written only over a pair this export wrote
    (its JSON names the format), never over files of the user's (embedder.outputs' rule)."""
    import json

    onnx_path, json_path = standalone_paths(out)
    if not (onnx_path.exists() or json_path.exists()):
        return
    try:
        ours = json.loads(json_path.read_text()).get("format") == STANDALONE_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        there = " and ".join(str(p) for p in (onnx_path, json_path) if p.exists())
        raise ConfigError(f"export writes {onnx_path.name} and {json_path.name} beside --out, and {there} "
                          "is not an export of embedder's: choose another --out, or move it away.")


def standalone_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(MODEL.onnx, MODEL.json) beside MODEL.pt: the classifier for a deployment without embedder."""
    path = Path(path)
    return path.with_suffix(".onnx"), path.with_suffix(".json")


def write_standalone(path: str | os.PathLike) -> tuple[Path, Path]:
    """Beside the checkpoint `path`: MODEL.onnx, backbone + head as one ONNX graph (float32 RGB pixels in
    [0, 1], [N, 3, crop, crop] -> logits [N, classes]; the normalisation inside), and MODEL.json, what an
    outside program needs to feed it (resize, crop, interpolation, mean/std applied inside, class names).
    onnxruntime alone runs it; `embedder predict MODEL.pt` gives the same predictions (tests/test_probe.py)."""
    import contextlib
    import io
    import json
    import warnings

    from embedder.atomic import staged_file
    from embedder.learn.checkpoint import load_classifier
    from embedder.models.onnx import OPSET, require

    require()
    classifier = load_classifier(path, device="cpu", runtime="torch")
    network, pre = classifier.network, classifier.preprocessing
    graph = _Logits(network).eval()
    example = torch.rand(2, 3, pre.crop_size, pre.crop_size, generator=torch.Generator().manual_seed(0))
    onnx_path, json_path = standalone_paths(path)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), staged_file(onnx_path) as tmp:
        warnings.simplefilter("ignore")  # the exporter's notes about its own internals
        program = torch.onnx.export(graph, (example,), input_names=["pixels"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},),
                                    opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
        program.save(str(tmp))
    described = {
        "format": STANDALONE_FORMAT, "graph": onnx_path.name, "input": "pixels", "output": "logits",
        "pixels": "float32 RGB [N, 3, crop, crop] in [0, 1] (uint8 / 255); mean and std are applied inside",
        "preprocessing": {**pre.as_dict(), "steps": [(
            f"decode to RGB; resize the shorter side to {pre.resize_size} ({pre.interpolation}, antialias "
            f"{pre.antialias}); centre-crop {pre.crop_size}x{pre.crop_size}; divide by 255")]},
        "classes": list(classifier.classes), "probabilities": "softmax over logits",
        "model": classifier.info.model, "layer": classifier.info.layer, "weights": classifier.info.weights,
    }
    with staged_file(json_path) as tmp:
        tmp.write_text(json.dumps(described, indent=1))
    return onnx_path, json_path


class _Logits(torch.nn.Module):
    """The classifier's pass on float pixels in [0, 1] (normalisation, backbone, head), for the exporter."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network.pooled_output(self.network.maps(pixels), self.network.node)
