"""int8 on the CPU: the backbone's ONNX graph, statically quantised on a sample of the user's images.

The fp32 graph (embedder.models.onnx: normalisation, every requested layer, pooling, L2) is
prepared with ONNX Runtime's `quant_pre_process` (shape inference, BatchNorm folded into the
convolutions) and quantised by `quantize_static`: QDQ format, int8 weights per output channel,
uint8 activations, calibrated on the caller's pixels (`method`: percentile, entropy or minmax).
The compute-heavy operators (Conv, Gemm, MatMul) are quantised together with the activation that
follows them (Relu, Clip = ReLU6): the quantiser then folds the activation into the convolution's
output range. Without it a convolution's output is quantised over its pre-activation range
(Lite0: [-101, 95] for values a ReLU6 then keeps in [0, 6], about 8 of 256 steps), which took
Lite0's digits to a mean cosine of 0.75. The pooling, the concatenation of `a+b` layers and the
L2 normalisation stay fp32 (they are cheap and decide the vector's direction).

`level` keeps sensitive nodes in fp32 (`nodes_to_exclude`): 0 none, 1 the depthwise convolutions
(EfficientNet's and MobileNet's, known to quantise badly), 2 also the first convolution and the
last compute node before each output; an excluded node's activation is excluded with it. The caller (embedder.extract.fidelity) walks the levels
until the fidelity card passes; which nodes stayed fp32 is part of what `quantize` returns.

The quantised graph is cached beside the fp32 one, under `$EMBEDDER_CACHE/onnx/<fp32 key>-int8-<hash>/`,
keyed by the fp32 graph's identity, the settings, the level and the calibration pixels' sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embedder.atomic import WriteLock, file_sha256, staging
from embedder.errors import ConfigError
from embedder.models.onnx import EXPORT_WAIT_S, OnnxSession, cache_root, graph_key, open_cached, require
from embedder.models.space import components

if TYPE_CHECKING:
    from embedder.models.backbone import FrozenBackbone

QUANT_FORMAT = "embedder-int8-2"  # bump when what the quantised graph computes changes
METHODS = ("percentile", "entropy", "minmax")
LEVELS = (0, 1, 2)  # nodes kept in fp32: none; depthwise convolutions; and the first and last compute nodes
QUANTISED_OPS = ["Conv", "Gemm", "MatMul", "Relu", "Clip"]  # an activation goes with its conv (see above)
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
ACTIVATIONS = ("Relu", "Clip")
CALIBRATION_BATCH = 1  # ORT's histogram collector stacks every batch of a tensor: they must have one shape


@dataclass(frozen=True)
class QuantSettings:
    method: str = "percentile"  # ORT's default percentile, 99.999: clips the rare outliers minmax keeps
    per_channel: bool = True  # per output channel weight scales: the depthwise and 1x1 convs' ranges differ a lot
    level: int = 0

    def describe(self) -> dict:
        return {"format": QUANT_FORMAT, "scheme": "ONNX Runtime quantize_static, QDQ, int8 weights "
                f"({'per channel' if self.per_channel else 'per tensor'}), uint8 activations",
                "ops": QUANTISED_OPS, **asdict(self)}


def calibration_sha256(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def quantize(backbone: FrozenBackbone, pixels: np.ndarray, settings: QuantSettings) -> tuple[OnnxSession, dict]:
    """(session, record) of `backbone`'s graph quantised on `pixels` (uint8 [n, 3, S, S]); the record
    (settings, calibration size and sha256, the nodes kept in fp32) is what a cache's fingerprint holds."""
    require()
    if settings.method not in METHODS or settings.level not in LEVELS:
        raise ConfigError(f"--calibration must be one of {', '.join(METHODS)}, got {settings.method!r}.")
    fp32_key, identity = graph_key(backbone, components(backbone))
    base = cache_root() / fp32_key / "graph.onnx"
    if not base.is_file():
        raise ConfigError(f"{backbone.spec.name}'s fp32 ONNX graph is missing from {base.parent}; "
                          "build the backbone with --runtime onnxruntime first.")
    record = {**settings.describe(), "calibration_images": len(pixels),
              "calibration_sha256": calibration_sha256(pixels)}
    full = {"fp32_graph": identity, **record}
    key = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_root() / f"{fp32_key}-int8-{key}"
    with WriteLock(folder, wait_s=EXPORT_WAIT_S):
        found = _open_cached(folder, full)
        if found is None:
            with staging(folder) as tmp:
                excluded = _quantize_file(base, tmp, pixels, settings)
                meta = {"identity": full, "fp32_nodes": excluded, "sha256": file_sha256(tmp / "graph.onnx")}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            found = OnnxSession(folder / "graph.onnx"), excluded
    session, excluded = found
    return session, {**record, "fp32_nodes": excluded}


def cached(backbone: FrozenBackbone, record: dict) -> OnnxSession:
    """The session of the int8 graph a cache recorded (its `quantization` component), from the graph
    cache: a query by image needs the very graph, and the calibration images may be gone."""
    require()
    fp32_key, identity = graph_key(backbone, components(backbone))
    full = {"fp32_graph": identity, **{k: v for k, v in record.items() if k != "fp32_nodes"}}
    key = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_root() / f"{fp32_key}-int8-{key}"
    found = _open_cached(folder, full) if folder.exists() else None
    if found is None:
        raise ConfigError(f"The int8 graph this cache was embedded with is not in {folder.parent} (it is made "
                          "when the cache is, on its calibration images); query by vector, or re-embed here.")
    return found[0]


def _open_cached(folder: Path, identity: dict) -> tuple[OnnxSession, list[str]] | None:
    found = open_cached(folder, identity, "int8 graph", "quantising it again")
    return (found[0], list(found[1]["fp32_nodes"])) if found else None


def _quantize_file(base: Path, tmp: Path, pixels: np.ndarray, settings: QuantSettings,
                   keep: Callable[[object], list[str]] | None = None) -> list[str]:
    """Write tmp/graph.onnx, the quantised `base`; return the nodes kept in fp32: `keep(prepared model)`'s,
    by default the level's (`sensitive_nodes`). benchmarks/int8_nodes.py keeps others to compare."""
    prepared = tmp / "prepared.onnx"
    # The quantiser reports its progress with print(); a library must not print (stdout may carry --json).
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _quantize_quietly(base, prepared, tmp, pixels, settings,
                                 keep or (lambda model: sensitive_nodes(model, settings.level)))


def _quantize_quietly(base: Path, prepared: Path, tmp: Path, pixels: np.ndarray, settings: QuantSettings,
                      keep: Callable[[object], list[str]]) -> list[str]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(base), str(prepared), skip_symbolic_shape=False)
    model = onnx.load(str(prepared))
    excluded = keep(model)
    method = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy,
              "minmax": CalibrationMethod.MinMax}[settings.method]
    quantize_static(
        str(prepared), str(tmp / "graph.onnx"), _Reader(model.graph.input[0].name, pixels),
        quant_format=QuantFormat.QDQ, per_channel=settings.per_channel, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, op_types_to_quantize=QUANTISED_OPS, nodes_to_exclude=excluded,
        calibrate_method=method, calibration_providers=["CPUExecutionProvider"],
        extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False},
    )
    prepared.unlink()
    for leftover in tmp.glob("*.onnx.data"):
        leftover.unlink()
    return excluded


def sensitive_nodes(model, level: int) -> list[str]:
    """The nodes that `level` keeps in fp32 (names of the prepared graph): the compute nodes, then their activations."""
    compute = [n for n in model.graph.node if n.op_type in COMPUTE_OPS]
    if level == 0 or not compute:
        return []
    chosen = [n.name for n in compute if n.op_type == "Conv" and _group(n) > 1]  # depthwise / grouped
    if level >= 2:
        chosen += [compute[0].name, *_last_compute(model, compute)]
    return list(dict.fromkeys(chosen + _activations_of(model, set(chosen))))


def _activations_of(model, names: set[str]) -> list[str]:
    """The Relu/Clip nodes reading an output of the nodes `names`: a quantised activation behind an
    fp32 node would quantise that node's output after all."""
    outputs = {o for n in model.graph.node if n.name in names for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in ACTIVATIONS and n.input and n.input[0] in outputs]


def _group(node) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _last_compute(model, compute) -> list[str]:
    """For each graph output, the last compute node upstream of it (the block that writes the feature)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    names = {n.name for n in compute}
    found = []
    for out in model.graph.output:
        queue, seen = deque([out.name]), set()
        while queue:  # breadth first: the nearest compute node
            node = producer.get(queue.popleft())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if node.name in names:
                found.append(node.name)
                break
            queue.extend(node.input)
    return found


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over uint8 pixels, in fixed batches."""

    def __init__(self, name: str, pixels: np.ndarray):
        self.name, self.pixels, self.start = name, pixels, 0

    def get_next(self) -> dict | None:
        if self.start >= len(self.pixels):
            return None
        batch = self.pixels[self.start : self.start + CALIBRATION_BATCH].astype(np.float32) / np.float32(255.0)
        self.start += CALIBRATION_BATCH
        return {self.name: batch}

    def rewind(self) -> None:
        self.start = 0
