"""int8 routes compared: ONNX Runtime static QDQ (embedder's), Intel Neural Compressor, torch.ao / torchao.

    python -m benchmarks int8_routes           # ResNet-50 (random init) and Lite0 (shipped weights), 224 px, batch 32
    python -m benchmarks int8_routes --quick   # ResNet-18 and Lite0 at 64 px, batch 8: a few minutes

Every route quantises the same network (the backbone `embed` builds: normalisation, the layer, pooling)
on the same calibration pixels (32 crops read exactly as `embed` reads them: the fidelity card's
`read_sample`), with its library's own static int8 recipe, per-channel int8 weights throughout:

  onnxruntime QDQ (ours)  embedder.models.quantize level 0: quant_pre_process + quantize_static,
                          uint8 activations, percentile calibration; what `--precision int8` tries first
  torch.ao FX, x86        prepare_fx / convert_fx with get_default_qconfig_mapping("x86"): eager
                          quantized kernels (oneDNN/FBGEMM), no compiler; legacy API, still in torch
  torchao PT2E, x86      X86InductorQuantizer on a strict torch.export graph (torch.ao's PT2E moved to
                          torchao), lowered by torchao's lower_pt2e_quantized_to_x86: oneDNN int8 convs
  Intel Neural Compressor INC 3.x for PyTorch, INT8StaticQuantConfig: its own export, then the same
                          X86InductorQuantizer, lowered the same way (INC's ONNX Runtime support is the
                          separate onnx-neural-compressor 1.0, which needs numpy < 2: not installable here)

and the two fp32 baselines (ONNX Runtime fp32 = the exact default; torch fp32 eager). A route whose
library is missing, or that fails on this torch, is skipped with one line saying why.

1. Model only: img/s at batch 32 on real pixels (held-aside crops), rounds interleaved over the
   routes in one process, the median round; the build (quantise, calibrate, lower) timed apart.
2. Fidelity against ONNX Runtime fp32 (the exact default) with the card's own figures
   (embedder.extract.fidelity.fidelity_card): mean and worst cosine of the pooled features,
   k-NN@10 overlap, and on the digits (labelled) the linear-probe and k-NN accuracy change.
   Photos: 192 seeded crops of the sample photos (32 calibrate, 160 held aside). Digits (Lite0
   only; random-init ResNet features of digits mean little): 32 calibrate, 300 held aside.
3. The decode share of a whole `embed` run: reading (decode + preprocessing, one process, what a
   reader worker does) against the model per image, fp32 and int8, and the `embed()` walls.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.fastpaths import cpu_flags, photo_crops
from embedder.data.samples import make_samples
from embedder.data.sources import list_source
from embedder.extract.config import EmbedConfig
from embedder.extract.core import BatchReader, load_backbone
from embedder.extract.fidelity import fidelity_card, read_sample
from embedder.extract.local import embed
from embedder.models.quantize import QuantSettings, quantize

EXACT = "onnxruntime fp32 (exact default)"
ROUTES = (EXACT, "torch fp32 eager", "onnxruntime QDQ int8 (ours)", "torch.ao FX int8, x86",
          "torchao PT2E int8, x86", "Intel Neural Compressor int8")


class TorchInt8:
    """A quantised copy of the backbone's body run as `embed` runs the backbone: uint8 -> [0, 1] ->
    normalised -> body -> the backbone's own pooling in fp32. Batches are padded to `batch` (one
    shape for the exported routes, whose graphs are specialised to it; rows are independent)."""

    def __init__(self, backbone, body, batch: int):
        self.backbone, self.body, self.batch = backbone, body, batch

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(pixels)
        with torch.no_grad():
            x = _normalised(self.backbone, pixels)
            if n < self.batch:
                x = torch.cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))])
            maps = self.body(x)
            return {name: self.backbone.pooled_output(maps, name)[:n] for name in self.backbone.layers}


def _normalised(backbone, pixels: torch.Tensor) -> torch.Tensor:
    x = (pixels.float() / 255.0 - backbone.mean) / backbone.std
    return x.contiguous(memory_format=torch.channels_last) if backbone.config.channels_last else x


def _calibration_batches(backbone, calibration: np.ndarray, batch: int):
    """The calibration pixels normalised, in batches of exactly `batch` (an exported graph has one shape)."""
    pixels = torch.from_numpy(calibration)
    whole = len(pixels) // batch * batch or len(pixels)
    return [_normalised(backbone, pixels[s:s + batch]) for s in range(0, whole, batch)]


def build_route(name: str, model: str, weights: str, size: int | None, calibration: np.ndarray, batch: int):
    """(callable uint8 pixels -> {output: features}, build seconds), or (None, why it is skipped)."""
    started = time.perf_counter()
    common = {"image_size": size, "device": "cpu", "precision": "fp32"}
    if name == EXACT:
        return load_backbone(model, weights, runtime="onnxruntime", **common).forward_all, 0.0
    if name == "onnxruntime QDQ int8 (ours)":
        net = load_backbone(model, weights, runtime="onnxruntime", **{**common, "precision": "int8"})
        net.use_quantized(*quantize(net, calibration, QuantSettings(level=0)))
        return net.forward_all, time.perf_counter() - started
    backbone = load_backbone(model, weights, runtime="torch", **common)
    if name == "torch fp32 eager":
        return backbone.forward_all, 0.0
    needs = {"torchao PT2E int8, x86": "torchao", "Intel Neural Compressor int8": "neural_compressor"}
    if name in needs and importlib.util.find_spec(needs[name]) is None:
        return None, f"{needs[name]} is not installed (pip install -e '.[bench]')"
    batches = _calibration_batches(backbone, calibration, batch)
    body = {"torch.ao FX int8, x86": _fx, "torchao PT2E int8, x86": _pt2e,
            "Intel Neural Compressor int8": _inc}[name](copy.deepcopy(backbone.body).eval(), batches)
    net = TorchInt8(backbone, body, batch)
    return net, time.perf_counter() - started


def _fx(body, batches):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(body, get_default_qconfig_mapping("x86"), (batches[0],))
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return convert_fx(prepared)


def _lowered(graph, batches):
    """torchao's x86 lowering: freezing passes fuse dequantize-conv-quantize into oneDNN int8
    convolutions with prepacked weights, run as a graph of oneDNN ops (no code generation).
    `torch.compile(..., options={"freezing": True})`, what INC's and torch's tutorials show, fails on
    torch 2.14.1 + torchao 0.18 (UnsupportedOperatorException: onednn.qconv_prepack.default), and
    without freezing the graph runs fp32 convolutions between (de)quantize ops, no faster than eager."""
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

    with torch.no_grad():
        return lower_pt2e_quantized_to_x86(graph, (batches[0],))


def _pt2e(body, batches):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # strict (TorchDynamo) export: the default non-strict graph of torch 2.14 keeps BatchNorm and
    # in-place adds in a form X86InductorQuantizer's patterns reject ("more than one output node").
    with torch.no_grad():
        exported = torch.export.export(body, (batches[0],), strict=True).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return _lowered(convert_pt2e(prepared), batches)


def _inc(body, batches):
    logging.getLogger("neural_compressor").setLevel(logging.ERROR)
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import INT8StaticQuantConfig, convert, prepare

    prepared = prepare(export(body, example_inputs=(batches[0],)), INT8StaticQuantConfig())
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return _lowered(convert(prepared), batches)


def outputs(net, pixels: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    parts = [{k: v.float().numpy() for k, v in net(torch.from_numpy(pixels[s:s + batch].copy())).items()}
             for s in range(0, len(pixels), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def speeds(nets: dict, pixels: np.ndarray, batch: int, rounds: int) -> dict[str, float]:
    """Median img/s over `rounds` rounds, each timing every route once on the same batch."""
    x = torch.from_numpy(pixels[:batch].copy())
    rates: dict[str, list[float]] = {name: [] for name in nets}
    for net in nets.values():
        net(x)
    for _ in range(rounds):
        for name, net in nets.items():
            t0 = time.perf_counter()
            net(x)
            rates[name].append(batch / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def compare(model: str, weights: str, source: Path, size: int | None, batch: int, rounds: int,
            held: int, timed: bool) -> None:
    """Build every route on `source`'s calibration sample; print speed (when `timed`) and fidelity."""
    config = EmbedConfig.of(source=str(source), model=model, out="unused.h5", weights=weights, image_size=size,
                         precision="int8", fidelity_images=held, progress=False)
    listing = list_source(str(source), "auto")
    exact = load_backbone(model, weights, image_size=size, device="cpu", precision="fp32", runtime="onnxruntime")
    sample = read_sample(config, listing, exact, None)
    print(f"\n{model} ({weights}) on {source.name}: {len(sample.calibration)} calibration, {len(sample.held)} "
          f"held-aside images, {sample.held.shape[-1]} px, batch {batch}")
    nets, built = {}, {}
    for name in ROUTES:
        try:
            net, seconds = build_route(name, model, weights, size, sample.calibration, batch)
        except Exception as exc:  # noqa: BLE001 - a route that fails on this torch is a result, not a crash
            net, seconds = None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if net is None:
            print(f"  {name:<32} skipped: {seconds}")
            continue
        nets[name], built[name] = net, seconds
    reference = outputs(nets[EXACT], sample.held, batch)
    rates = speeds(nets, sample.held, batch, rounds) if timed else {}
    for name, net in nets.items():
        card = fidelity_card(reference, outputs(net, sample.held, batch), sample.labels)
        speed = f"{rates[name]:7.1f} img/s {rates[name] / rates[EXACT]:5.2f}x" if timed else ""
        acc = "".join(f"  {n} {card[f'{n}_accuracy']['fp32']:.1f}->{card[f'{n}_accuracy']['fast']:.1f}"
                      for n in ("probe", "knn") if f"{n}_accuracy" in card)
        print(f"  {name:<32}{speed}  build {built[name]:5.1f} s  cosine mean {card['mean_cosine']:.4f} "
              f"min {card['min_cosine']:.4f}  k-NN@10 {card['knn_overlap']:.3f}{acc}")


def decode_share(model: str, weights: str, source: Path, size: int | None, tmp: Path, rounds: int) -> None:
    """Reading vs model per image, and whole `embed()` walls, fp32 (the default) and int8, on `source`."""
    listing = list_source(str(source), "auto")
    config = EmbedConfig.of(source=str(source), model=model, out=str(tmp / "share.h5"), weights=weights,
                         image_size=size, progress=False, overwrite=True, fidelity_images=64)
    exact = load_backbone(model, weights, image_size=size, device="cpu", precision="fp32", runtime="onnxruntime")
    reader = BatchReader(listing.root, listing.paths, np.arange(len(listing)), config.batch_size,
                         exact.preprocessing, config.max_pixels, False, listing.members, config.fetch_settings())
    int8 = load_backbone(model, weights, image_size=size, device="cpu", precision="int8", runtime="onnxruntime")
    sample = read_sample(replace(config, space=replace(config.space, precision="int8")), listing, exact, None)
    int8.use_quantized(*quantize(int8, sample.calibration, QuantSettings(level=0)))
    read_s, model_s = [], {"fp32": [], "int8": []}
    for _ in range(rounds):
        t0, pixels = time.perf_counter(), [reader[b]["images"] for b in range(len(reader))]
        read_s.append((time.perf_counter() - t0) / len(listing))
        for name, net in (("fp32", exact), ("int8", int8)):
            t0 = time.perf_counter()
            for x in pixels:
                net.forward_all(x)
            model_s[name].append((time.perf_counter() - t0) / len(listing))
    read_ms = 1000 * statistics.median(read_s)
    print(f"\n{model} ({weights}) on {source.name} ({len(listing)} images, batch {config.batch_size}), one process, "
          f"median of {rounds} rounds: reading (decode + preprocessing) {read_ms:.2f} ms/image")
    for name in ("fp32", "int8"):
        ms = 1000 * statistics.median(model_s[name])
        print(f"  {name}: model {ms:.2f} ms/image; reading is {read_ms / (read_ms + ms):.0%} of read + model; "
              f"serial bound {1000 / (read_ms + ms):.1f} img/s")
    # The gates are off for the int8 run: this is about where its time goes (Lite0's card refuses it, see fastpaths).
    ungated = {"precision": "int8", "min_cosine": 0.0, "min_overlap": 0.0, "max_accuracy_drop": 100.0}
    for name, extra in (("embed, exact default", {}), ("embed --precision int8", ungated)):
        report = embed(replace(config, **extra))
        card_s = report.fidelity["seconds"] if report.fidelity else 0.0
        st = report.stage_s  # the loop's seconds per stage; decode and resize are the reader worker's
        loop = sum(st.get(k, 0.0) for k in ("wait", "transfer", "model", "write"))
        print(f"  {name:<24} wall {report.wall_s:6.1f} s = card {card_s:5.1f} + loop {loop:5.1f} + the rest "
              f"{report.wall_s - card_s - loop:5.1f} (setup, listing, commit); loop {report.embedded / loop:6.1f} img/s: "
              f"model {st.get('model', 0):5.1f} s, waiting for the reader {st.get('wait', 0):5.1f} s, write "
              f"{st.get('write', 0):4.1f} s; reader decode {st.get('decode', 0):5.1f} s + resize {st.get('resize', 0):5.1f} s")


def run(quick: bool = False) -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("LOGLEVEL", "ERROR")  # Intel Neural Compressor logs at INFO by default
    print(f"# CPU: {cpu_flags()}; {torch.get_num_threads()} threads, torch {torch.__version__}. "
          "The machine is shared: timings move.")
    tmp = Path(tempfile.mkdtemp(prefix="int8-routes-"))
    try:
        crops = photo_crops(tmp, count=48 if quick else 192, size=256 if quick else 448)
        if not (Path("data/digits") / ".complete").exists():
            make_samples("data", only=["digits"])
        size, batch, rounds = (64, 8, 3) if quick else (None, 32, 5)
        compare("resnet18" if quick else "resnet50", "none", crops, size, batch, rounds, 200, timed=True)
        compare("efficientnet_lite0", "DEFAULT", crops, size, batch, rounds, 200, timed=True)
        compare("efficientnet_lite0", "DEFAULT", Path("data/digits"), size, batch, rounds, 100 if quick else 300,
                timed=False)
        for model, weights in (("resnet18" if quick else "resnet50", "none"), ("efficientnet_lite0", "DEFAULT")):
            decode_share(model, weights, crops, size, tmp, rounds=1 if quick else 2)
        decode_share("efficientnet_lite0", "DEFAULT", Path("data/digits"), size, tmp, rounds=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
