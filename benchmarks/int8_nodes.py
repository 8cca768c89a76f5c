"""Which nodes to keep in fp32: ranked by ONNX Runtime's own per-tensor error, against the level ladder.

    python -m benchmarks int8_nodes          # Lite0 (shipped weights), 192 photo crops, k = 2, 4, 8
    python -m benchmarks int8_nodes --quick  # 48 smaller crops, k = 2

The level-0 int8 graph is compared tensor by tensor with the fp32 graph on 8 calibration crops
(`onnxruntime.quantization.qdq_loss_debug`: each int8 tensor's SQNR against fp32's). A convolution's
cost is the SQNR its output (after its activation) loses against its input. The k costliest are kept
in fp32 (with their activations, as embedder.models.quantize keeps a level's nodes), the graph is
quantised again on the same calibration crops, and its figures on the held-aside crops are printed
beside levels 0 and 2 (what `embed --precision int8` tries). Speed: one held-aside pass of the variant
against one of ONNX Runtime fp32 just before it.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from benchmarks.fastpaths import Held, cpu_flags, photo_crops
from embedder.models.onnx import OnnxSession
from embedder.models.quantize import COMPUTE_OPS, QuantSettings, _activations_of, _quantize_file, quantize

MODEL, WEIGHTS = "efficientnet_lite0", "DEFAULT"


def run(quick: bool = False) -> None:
    print(f"# CPU: {cpu_flags()}")
    tmp = Path(tempfile.mkdtemp(prefix="int8-nodes-"))
    try:
        crops = photo_crops(tmp, count=48 if quick else 192, size=256 if quick else 448)
        held = Held(tmp, MODEL, WEIGHTS, crops)
        calibration = held.sample.calibration
        print(f"\n{MODEL} ({WEIGHTS}) on {len(held.sample.held)} held-aside crops, {len(calibration)} calibration")
        for level in (0, 2):
            session, record = quantize(held.backbone("int8"), calibration, QuantSettings(level=level))
            _measure(held, f"level {level}", session, record["fp32_nodes"])
            if level == 0:
                ranked = _ranked(held.exact._session.path, session.path, calibration[:8], tmp)
        print("  costliest convolutions (SQNR lost, dB): "
              + ", ".join(f"{name} {lost:.1f}" for lost, name in ranked[:8]))
        for k in (2,) if quick else (2, 4, 8):
            chosen = [name for _, name in ranked[:k]]
            out = tmp / f"top{k}"
            out.mkdir()
            kept = _quantize_file(held.exact._session.path, out, calibration, QuantSettings(),
                                  keep=lambda model, chosen=chosen: chosen + _activations_of(model, set(chosen)))
            _measure(held, f"the {k} costliest", OnnxSession(out / "graph.onnx"), kept)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(held: Held, what: str, session: OnnxSession, kept: list[str]) -> None:
    int8 = held.backbone("int8")
    int8.use_quantized(session, {"fp32_nodes": kept})
    card, ratio = held.figures(int8, again=True)
    print(f"  {what:<18} ({len(kept):>2} nodes fp32): mean cosine {card['mean_cosine']:.4f}, "
          f"min {card['min_cosine']:.4f}, k-NN@10 overlap {card['knn_overlap']:.3f}; {ratio:.2f}x fp32")


def _ranked(fp32: Path, int8: Path, pixels: np.ndarray, tmp: Path) -> list[tuple[float, str]]:
    """(SQNR lost, conv name) for every convolution of the prepared fp32 graph, costliest first."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import qdq_loss_debug as debug
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = tmp / "prepared.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
        debug.modify_model_output_intermediate_tensors(str(prepared), str(tmp / "all_fp32.onnx"))
        debug.modify_model_output_intermediate_tensors(str(int8), str(tmp / "all_int8.onnx"))
    model = onnx.load(str(prepared))
    name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(range(len(pixels)))

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {name: pixels[row:row + 1].astype(np.float32) / np.float32(255.0)}

    matched = debug.create_activation_matching(debug.collect_activations(str(tmp / "all_int8.onnx"), Reader()),
                                               debug.collect_activations(str(tmp / "all_fp32.onnx"), Reader()))
    error = debug.compute_activation_error(matched)
    readers = {}
    for node in model.graph.node:
        for tensor in node.input:
            readers.setdefault(tensor, []).append(node)
    ranked = []
    for node in (n for n in model.graph.node if n.op_type in COMPUTE_OPS):
        out = node.output[0]
        after = [n for n in readers.get(out, []) if n.op_type in ("Relu", "Clip")]
        out = after[0].output[0] if after else out
        if node.input[0] in error and out in error:
            ranked.append((error[node.input[0]]["xmodel_err"] - error[out]["xmodel_err"], node.name))
    return sorted(ranked, reverse=True)
