"""ONNX Runtime's int8 options for ResNet-50, model only, side by side: which settings make it fastest.

    python -m benchmarks int8_options           # ResNet-50 (random init), 224 px, batches 1, 4 and 16
    python -m benchmarks int8_options --quick   # ResNet-18 at 64 px, batches 1 and 4

Every variant quantises the same `quant_pre_process`ed fp32 graph (the one `embed` exports) on the
same 32 calibration crops (the card's `read_sample`), MinMax calibration for all (the method moves
the scales, not the kernels, so not the speed); the production settings are embedder.models.quantize's
(QDQ, per-channel int8 weights, uint8 activations, Conv/Gemm/MatMul):

  format       QDQ (ours) against QOperator (QLinearConv nodes written by the quantiser)
  types        uint8 activations (U8S8, ours: MLAS's AVX512-VNNI kernels) against int8 (S8S8)
  scales       per channel (ours) against per tensor and reduce_range (7-bit weights)
  operators    also Add (the residual sums stay int8) and MaxPool / GlobalAveragePool / Relu
  session      spinning threads; graph optimisation EXTENDED instead of ALL (ours: ALL, no spinning)

Each variant runs in an ONNX Runtime session made as embedder.models.onnx.OnnxSession makes it, unless
the row says otherwise; img/s are medians over interleaved rounds; fidelity is the card's figures
(embedder.extract.fidelity.fidelity_card) against ONNX Runtime fp32 on the 160 held-aside crops.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.fastpaths import cpu_flags, photo_crops
from embedder.data.sources import list_source
from embedder.extract.config import EmbedConfig
from embedder.extract.core import load_backbone
from embedder.extract.fidelity import fidelity_card, read_sample
from embedder.models.onnx import cache_root, graph_key
from embedder.models.quantize import QUANTISED_OPS
from embedder.models.space import components

OURS = "QDQ U8S8 per channel (ours)"
# name: (quantize_static keyword arguments, operators quantised, session: (spinning, optimisation level))
VARIANTS = {
    OURS: ({}, QUANTISED_OPS, (False, "ALL")),
    "QOperator U8S8 per channel": ({"quant_format": "QOperator"}, QUANTISED_OPS, (False, "ALL")),
    "QDQ S8S8 per channel": ({"activation_type": "QInt8"}, QUANTISED_OPS, (False, "ALL")),
    "QDQ U8S8 per tensor": ({"per_channel": False}, QUANTISED_OPS, (False, "ALL")),
    "QDQ U8S8 per channel, reduce_range": ({"reduce_range": True}, QUANTISED_OPS, (False, "ALL")),
    "QDQ U8S8 per channel, + Add": ({}, [*QUANTISED_OPS, "Add"], (False, "ALL")),
    "QDQ U8S8 per channel, + Add, pools, Relu": ({}, [*QUANTISED_OPS, "Add", "MaxPool", "GlobalAveragePool", "Relu"],
                                                 (False, "ALL")),
    "ours, threads spinning": ({}, QUANTISED_OPS, (True, "ALL")),
    "ours, optimisation EXTENDED": ({}, QUANTISED_OPS, (False, "EXTENDED")),
}


def session(path: Path, spinning: bool = False, level: str = "ALL"):
    """An ONNX Runtime session as OnnxSession makes it (torch's threads, no spinning, level ALL) but for the two options."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.use_deterministic_compute = True
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def build(prepared: Path, out: Path, calibration: np.ndarray, extra: dict, ops: list[str]) -> float:
    """Quantise `prepared` into `out` with the production keywords overridden by `extra`; the seconds it took."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = _Reader(onnx.load(str(prepared)).graph.input[0].name, calibration)
    keywords = {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
                "weight_type": QuantType.QInt8, "calibrate_method": CalibrationMethod.MinMax}
    for key, value in extra.items():
        keywords[key] = {"quant_format": QuantFormat, "activation_type": QuantType}[key][value] \
            if isinstance(value, str) else value
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(prepared), str(out), reader, op_types_to_quantize=ops,
                        calibration_providers=["CPUExecutionProvider"],
                        extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False}, **keywords)
    return time.perf_counter() - started


class _Reader:
    """The calibration pixels one row at a time, as embedder.models.quantize feeds them."""

    def __init__(self, name: str, pixels: np.ndarray):
        self.rows = iter([{name: pixels[i:i + 1].astype(np.float32) / np.float32(255.0)} for i in range(len(pixels))])

    def get_next(self) -> dict | None:
        return next(self.rows, None)


def sessions(model: str, size: int | None, crops: Path, tmp: Path):
    """({name: session} with ONNX Runtime fp32 first, the held-aside pixels as float, their labels)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    exact = load_backbone(model, "none", image_size=size, device="cpu", precision="fp32", runtime="onnxruntime")
    config = EmbedConfig.of(source=str(crops), model=model, out=str(tmp / "x.h5"), weights="none", image_size=size,
                            precision="int8", progress=False)
    sample = read_sample(config, list_source(str(crops), "auto"), exact, None)
    base = cache_root() / graph_key(exact, components(exact))[0] / "graph.onnx"
    prepared = tmp / "prepared.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(base), str(prepared), skip_symbolic_shape=False)
    found, graphs = {"ONNX Runtime fp32 (the exact default)": session(base)}, {}
    for i, (name, (extra, ops, (spinning, level))) in enumerate(VARIANTS.items()):
        key = (tuple(sorted(extra.items())), tuple(ops))
        if key not in graphs:
            graphs[key] = tmp / f"int8-{i}.onnx"
            build(prepared, graphs[key], sample.calibration, extra, ops)
        found[name] = session(graphs[key], spinning, level)
    return found, sample.held.astype(np.float32) / np.float32(255.0), sample.labels


def rates(found: dict, held: np.ndarray, batch: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    """{name: (median, lowest, highest) img/s over `rounds` interleaved rounds of about 16 images each}."""
    x, repeats = held[:batch], max(1, 16 // batch)
    seen = {name: [] for name in found}
    for s in found.values():
        s.run(None, {s.get_inputs()[0].name: x})
    for _ in range(rounds):
        for name, s in found.items():
            feed = {s.get_inputs()[0].name: x}
            started = time.perf_counter()
            for _ in range(repeats):
                s.run(None, feed)
            seen[name].append(repeats * batch / (time.perf_counter() - started))
    return {name: (statistics.median(r), min(r), max(r)) for name, r in seen.items()}


def compare(model: str, size: int | None, crops: Path, tmp: Path, batches: tuple[int, ...], rounds: int) -> None:
    found, held, labels = sessions(model, size, crops, tmp)
    exact_name = next(iter(found))
    outputs = {name: np.concatenate([s.run(None, {s.get_inputs()[0].name: held[i:i + 16]})[0]
                                     for i in range(0, len(held), 16)]) for name, s in found.items()}
    print(f"\n{model}, {held.shape[-1]} px, {len(held)} held-aside crops; fidelity against {exact_name}")
    for name in found:
        card = fidelity_card({"f": outputs[exact_name]}, {"f": outputs[name]}, labels)
        print(f"  {name:<42} cosine mean {card['mean_cosine']:.5f} min {card['min_cosine']:.5f}  "
              f"k-NN@10 {card['knn_overlap']:.3f}")
    for batch in batches:
        measured = rates(found, held, batch, rounds)
        base = measured[exact_name][0]
        print(f"  batch {batch}, median of {rounds} interleaved rounds:")
        for name, (median, low, high) in measured.items():
            print(f"    {name:<42}{median:7.1f} img/s {median / base:5.2f}x   (rounds {low:.1f}-{high:.1f})")


def run(quick: bool = False) -> None:
    print(f"# CPU: {cpu_flags()}; {torch.get_num_threads()} threads. The machine is shared: timings move.")
    tmp = Path(tempfile.mkdtemp(prefix="int8-options-"))
    try:
        crops = photo_crops(tmp, count=48 if quick else 192, size=256 if quick else 448)
        if quick:
            compare("resnet18", 64, crops, tmp, (1, 4), rounds=3)
        else:
            compare("resnet50", None, crops, tmp, (1, 4, 16), rounds=7)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
