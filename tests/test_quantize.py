"""The int8 graph itself (embedder.models.quantize): what is quantised, and what stays fp32 when run."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from embedder.extract.core import load_backbone
from embedder.models.onnx import KEPT_OPTIMISATIONS_OFF, OnnxSession, session_options
from embedder.models.quantize import QuantSettings, quantize


@pytest.fixture
def lite0():
    """Random-init EfficientNet-Lite0 at 64 px on ONNX Runtime: depthwise convolutions and ReLU6 (Clip)."""
    settings = {"image_size": 64, "device": "cpu", "runtime": "onnxruntime"}
    pixels = np.random.default_rng(0).integers(0, 256, (12, 3, 64, 64), dtype=np.uint8)
    exact = load_backbone("efficientnet_lite0", "none", precision="fp32", **settings)
    exact(torch.from_numpy(pixels[:2]))  # its first pass exports the fp32 graph that int8 starts from
    backbone = load_backbone("efficientnet_lite0", "none", precision="int8", **settings)
    return backbone, pixels


def _graph(session: OnnxSession) -> onnx.ModelProto:
    return onnx.load(str(session.path))


def test_each_activation_is_quantised_with_its_convolution(lite0):
    """A ReLU6 left in fp32 behind a quantised conv made the quantiser use the conv's pre-activation
    range (Lite0 digits: mean cosine 0.75). Folded, no Clip remains and each conv's output range
    starts at 0, the activation's lower bound."""
    backbone, pixels = lite0
    session, record = quantize(backbone, pixels[:8], QuantSettings(method="minmax", level=0))
    graph = _graph(session)
    assert "Clip" in record["ops"] and record["fp32_nodes"] == []
    assert [n.name for n in graph.graph.node if n.op_type in ("Clip", "Relu")] == []
    producer = {o: n for n in graph.graph.node for o in n.output}
    zero = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    after_conv = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"
                  and producer.get(n.input[0]) is not None and producer[n.input[0]].op_type == "Conv"]
    clipped = [n for n in after_conv if int(zero[n.input[2]]) == 0]
    assert len(clipped) >= 16  # every expansion and depthwise conv's ReLU6 (the projections have none)


def _weight_dequantizers(graph: onnx.ModelProto) -> int:
    constants = {i.name for i in graph.graph.initializer}
    return sum(1 for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants)


def test_nodes_kept_in_fp32_stay_fp32_when_the_graph_runs(lite0, tmp_path):
    """Level 1 keeps the depthwise convs (and their ReLU6) in fp32. ONNX Runtime's WeightBiasQuantization
    optimisation quantises such weights again, per tensor, when the session is built (Lite0 digits: mean
    cosine 0.99 -> 0.65). The graph ONNX Runtime makes with our session's options must keep them fp32."""
    backbone, pixels = lite0
    session, record = quantize(backbone, pixels[:8], QuantSettings(method="minmax", level=1))
    graph = _graph(session)
    depthwise = [n.name for n in graph.graph.node if n.op_type == "Conv"
                 and next((a.i for a in n.attribute if a.name == "group"), 1) > 1]
    kept = set(record["fp32_nodes"])
    assert depthwise and set(depthwise) <= kept
    assert sum(1 for n in graph.graph.node if n.op_type == "Clip") == len(depthwise)  # their ReLU6 stays with them
    options = session_options()
    # The optimisations that rewrite weights run at the basic level; beyond it the graph holds fused
    # kernels that cannot be saved as ONNX.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(session.path), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=KEPT_OPTIMISATIONS_OFF)
    optimised = onnx.load(str(tmp_path / "optimised.onnx"))
    assert _weight_dequantizers(optimised) == _weight_dequantizers(graph) == len(
        [n for n in graph.graph.node if n.op_type == "Conv"]) - len(depthwise)
