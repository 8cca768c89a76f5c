"""ONNX Runtime for the frozen backbone: exported once, cached on disk, checked against torch.

What the graph computes is `FrozenBackbone`'s own inference pass, traced by
`torch.onnx.export` (the dynamo exporter) from the eval-locked module: the [0, 1] float
pixels in, the normalisation, every requested layer pooled (and L2-normalised when asked),
and the raw maps of the style layers out; the batch axis is dynamic. BatchNorm is exported
in eval mode, with its running statistics (ONNX Runtime then folds it into the convolutions).
The Gram style descriptor is computed around the graph, in torch, from those maps, so
`--style` gives the same descriptor under either runtime.

The graph is cached under `$EMBEDDER_CACHE/onnx/<key>/` (default `~/.cache/embedder`), keyed by a
hash of everything that decides it: the backbone's configuration and outputs, a hash of its
parameters and buffers, and the torch / onnx / onnxscript versions. `graph.onnx` sits beside
`meta.json`, which records that identity and the file's sha256: a file that does not match
(a disk error, an interrupted copy) is rebuilt, never used. Every session is checked against
an fp64 pass of the torch module on the sample photos when it is opened; features further from it than
fp32 round-off on that model explains (check_against_torch) are refused, so the runtime is never silently
different.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from embedder.atomic import WriteLock, file_sha256, staging
from embedder.errors import ConfigError, EmbedderNotice
from embedder.models.constants import STYLE

if TYPE_CHECKING:
    from embedder.models.backbone import FrozenBackbone

GRAPH_FORMAT = "embedder-onnx-1"  # bump when what the graph computes changes
OPSET = 18
MIN_COSINE = 0.99999  # torch vs ONNX Runtime on random crops (tests); measured: 1.000000 (docs/BENCHMARKS.md)
INSTALL = "pip install onnxruntime onnx onnxscript"
EXPORT_WAIT_S = 900.0  # another process exporting the same graph: wait for it rather than export twice


def versions() -> dict[str, str] | None:
    """The versions of the ONNX packages, or None when one is missing."""
    try:
        import onnx
        import onnxruntime
        import onnxscript
    except ImportError:
        return None
    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__}


def require() -> dict[str, str]:
    found = versions()
    if found is None:
        raise ConfigError(f"--runtime onnxruntime needs ONNX Runtime: {INSTALL} (or use --runtime torch).")
    return found


def runtime_component() -> str:
    """The fingerprint's `runtime` entry: what can change the last bits of the features."""
    v = require()
    return (f"onnxruntime {v['onnxruntime']} CPUExecutionProvider, onnx {v['onnx']}, onnxscript {v['onnxscript']}, "
            f"opset {OPSET}, {GRAPH_FORMAT}")


def cache_root() -> Path:
    base = os.environ.get("EMBEDDER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedder"
    return Path(base) / "onnx"


class _Graph(nn.Module):
    """The backbone's inference pass as one traceable module: pooled outputs, then raw style maps."""

    def __init__(self, backbone: FrozenBackbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = self.backbone.maps(pixels)
        pooled = [self.backbone.pooled_output(maps, n) for n in self.backbone.layers]
        return (*pooled, *(maps[n].float() for n in self.backbone.style_nodes))


# WeightBiasQuantization quantises, per tensor, the fp32 weights of any node fed by a DequantizeLinear:
# it undid every node an int8 graph keeps in fp32 (nodes_to_exclude). Lite0 level 1 (its depthwise
# convolutions in fp32), digits: mean cosine 0.65 with it, 0.99 without, as the graph run unoptimised
# computes it. An fp32 graph has no DequantizeLinear, so nothing else changes.
KEPT_OPTIMISATIONS_OFF = ["WeightBiasQuantization"]


def session_options():
    """ONNX Runtime's session options for every graph we run; `KEPT_OPTIMISATIONS_OFF` goes with them,
    as the session's `disabled_optimizers` (it is not a session option)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.use_deterministic_compute = True
    # No spinning: ORT's idle threads otherwise busy-wait after each run, on the cores that the
    # uint8 -> float step and the reader process need next. Measured: Lite0 model-only 245
    # against 160-198 img/s with spinning, ResNet-50 equal (docs/BENCHMARKS.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings would land in front of --json output
    return options


class OnnxSession:
    """An ONNX Runtime session over a cached graph, run with torch's thread count."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"],
                                            disabled_optimizers=KEPT_OPTIMISATIONS_OFF)
        self.input = self.session.get_inputs()[0].name
        self.path = path

    def run(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The graph's outputs for uint8 RGB crops (scaled to [0, 1] here) or float ones in [0, 1]."""
        array = np.ascontiguousarray(pixels.cpu().numpy())
        if array.dtype == np.uint8:
            # numpy, not torch: on 2 cores, waking torch's idle thread pool for this one step cost
            # 3-5 ms per batch of 4 (0.1-0.2 ms on one thread), a fifth of a Lite0 batch. Same bits
            # as torch's x.float().div_(255.0): one correctly rounded float32 division per value.
            array = array.astype(np.float32)
            array /= np.float32(255.0)
        arrays = self.session.run(None, {self.input: array.astype(np.float32, copy=False)})
        return [torch.from_numpy(a) for a in arrays]


def check_runnable(backbone: FrozenBackbone) -> None:
    """Refuse, before any graph is built, a backbone ONNX Runtime cannot run as configured."""
    require()
    if backbone.config.compile:
        raise ConfigError("--compile is a torch.compile option; drop it, or use --runtime torch.")
    if backbone.config.precision not in ("fp32", "int8") or backbone.device.type != "cpu":
        raise ConfigError(
            f"--runtime onnxruntime runs fp32 on the CPU (got {backbone.config.precision} on {backbone.device.type}); "
            "use --device cpu --precision fp32, or --runtime torch."
        )


_CHECKED: set[tuple[str, str]] = set()  # (graph folder, sha256) that passed check_against_torch in this process


def session_for(backbone: FrozenBackbone, components: dict) -> OnnxSession:
    """The checked session of `backbone`'s graph, exporting it first when the cache lacks it. `components`:
    the backbone's fingerprint components (embedder.models.space.components), which key the graph.
    `FeatureSpace.load` attaches it to every backbone of runtime onnxruntime."""
    check_runnable(backbone)
    key, identity = graph_key(backbone, components)
    folder = cache_root() / key
    with WriteLock(folder, wait_s=EXPORT_WAIT_S):
        first = not folder.exists()
        found = open_cached(folder, identity)
        if found is None:
            if first:  # seconds to a minute with no other sign of life (docs/BENCHMARKS.md)
                warnings.warn(f"Exporting {backbone.spec.name} to ONNX, once: later runs load it from {folder}.",
                              EmbedderNotice, stacklevel=3)
            with staging(folder) as tmp:
                _export(backbone, tmp / "graph.onnx")
                meta = {"identity": identity, "sha256": file_sha256(tmp / "graph.onnx")}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            found = OnnxSession(folder / "graph.onnx"), meta
    session, meta = found
    # int8: the fp32 graph it is quantised from (embedder.models.quantize). Once per process and graph:
    # the same bytes (sha256, checked on open) of the same network (its tensors are in the key) give the
    # same verdict, and a fidelity card builds the fp32 backbone twice (1.4 s each for ResNet-50).
    if (key, meta["sha256"]) not in _CHECKED:
        check_against_torch(backbone, session)
        _CHECKED.add((key, meta["sha256"]))
    return session


def graph_key(backbone: FrozenBackbone, components: dict) -> tuple[str, dict]:
    """(folder name, identity): a hash of what decides the graph among the backbone's fingerprint
    `components` (model, weights, preprocessing, the pooled layers, the style layers, pooling,
    normalisation, layout, torch), the exporter's versions and the network's own tensors (so two
    checkpoints that share a file name never share a graph). The identity keeps the form it had before
    issue 27, so graphs cached then (an int8 cache's own, which query by image needs) are still found."""
    tensors = hashlib.sha256()
    for name, value in backbone.body.state_dict().items():
        tensors.update(name.encode())
        tensors.update(value.detach().cpu().contiguous().numpy().tobytes())
    outputs = json.loads(components["layers"]) if "layers" in components else [components["layer"]]
    style = json.loads(components[STYLE])["layers"] if STYLE in components else []
    identity = {
        "format": GRAPH_FORMAT, "opset": OPSET, "model": components["model"], "weights": components["weights"],
        "preprocessing": json.loads(components["preprocessing"]), "layers": [n for n in outputs if n != STYLE],
        "style_nodes": style, "pool": components["pooling"], "normalize": components["normalization"],
        "channels_last": components["memory_layout"] == "channels_last", "tensors": tensors.hexdigest(),
        "torch": components["torch_version"], **{k: v for k, v in require().items() if k != "onnxruntime"},
    }
    text = json.dumps(identity, sort_keys=True)
    # As meta.json reads it back (tuples become lists), so the cached copy compares equal.
    return f"{components['model']}-{hashlib.sha256(text.encode()).hexdigest()[:24]}", json.loads(text)


def open_cached(folder: Path, identity: dict, what: str = "ONNX graph", redo: str = "exporting it again"
                ) -> tuple[OnnxSession, dict] | None:
    """(session, meta.json) of the graph cached in `folder`, or None when it is missing, stale or
    damaged: the caller then makes it again (`redo`, said in a notice naming `what`)."""
    graph, meta_file = folder / "graph.onnx", folder / "meta.json"
    if not folder.exists():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        intact = meta.get("identity") == identity and meta.get("sha256") == file_sha256(graph)
        found = (OnnxSession(graph), meta) if intact else None
    except Exception:  # noqa: BLE001 - anything unreadable is rebuilt, whatever the error
        found = None
    if found is None:
        warnings.warn(f"The cached {what} in {folder} is damaged or stale; {redo}.", EmbedderNotice, stacklevel=4)
    return found


def _export(backbone: FrozenBackbone, path: Path) -> None:
    size = backbone.preprocessing.crop_size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(backbone.device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    graph = _Graph(backbone).eval()
    names = [f"out{i}" for i in range(len(backbone.layers) + len(backbone.style_nodes))]
    # The exporter reports its progress on stdout and warns about its own internals; a library
    # must not print, and stdout may be carrying --json.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(graph, (example,), input_names=["pixels"], output_names=names,
                                        dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True,
                                        external_data=False, verbose=False)
        except Exception as exc:
            raise ConfigError(
                f"{backbone.spec.name} could not be exported to ONNX ({type(exc).__name__}: {str(exc)[:300]}); "
                "use --runtime torch."
            ) from exc
        program.save(str(path))


# The self-check's bar (1 - cosine to an fp64 pass): ROUNDOFF_FACTOR x torch's own fp32 error on the same
# images (ONNX Runtime's kernels sum in other orders; measured within 0.03-8x of torch's, docs/RELIABILITY.md),
# and never below ROUNDOFF_FLOOR, the README's "cosine >= 0.99999".
ROUNDOFF_FACTOR = 20.0
ROUNDOFF_FLOOR = 1e-5


def check_against_torch(backbone: FrozenBackbone, session: OnnxSession) -> float:
    """The session's largest error (1 - cosine) to an fp64 pass of the backbone on natural images (the
    sample photos, at the backbone's preprocessing), refused when it exceeds what fp32 round-off on this
    model explains: ROUNDOFF_FACTOR x torch's own fp32 error to the same fp64 pass (at least ROUNDOFF_FLOOR).
    A correct graph differs from torch in the last bits only; a wrong one by far more."""
    import copy

    from embedder.data.samples import probe_photos
    from embedder.data.transforms import geometric_transform

    crop = geometric_transform(backbone.preprocessing)
    pixels = torch.stack([crop(p) for p in probe_photos()])  # uint8 [N, 3, crop, crop]
    x = pixels.float().div_(255.0).to(backbone.device)
    reference = copy.deepcopy(backbone).double()  # _session is not set yet: a plain torch module
    with torch.inference_mode():
        fp32 = _Graph(backbone)(x)
        fp64 = _Graph(reference)(x.double())
    del reference
    got = session.run(pixels)
    torch_error, onnx_error = _worst_error(fp32, fp64), _worst_error(got, fp64)
    bar = max(ROUNDOFF_FACTOR * torch_error, ROUNDOFF_FLOOR)
    if onnx_error > bar:
        raise ConfigError(
            f"ONNX Runtime's features for {backbone.spec.name} differ from an fp64 pass by 1 - cosine "
            f"{onnx_error:.2e}, more than fp32 round-off explains ({bar:.2e}: torch fp32 is at {torch_error:.2e}); "
            f"use --runtime torch. The graph is {session.path}."
        )
    return 1.0 - onnx_error


def _worst_error(outputs, reference) -> float:
    """The largest 1 - cosine between matching rows of two output lists (1.0 for a shape mismatch)."""
    worst = 0.0
    for g, e in zip(outputs, reference):
        e, g = e.cpu().flatten(1).double(), g.cpu().flatten(1).double()
        if e.shape != g.shape:
            return 1.0
        scale = e.norm(dim=1) * g.norm(dim=1)
        both_zero = (e.norm(dim=1) == 0) & (g.norm(dim=1) == 0)
        error = torch.where(scale > 0, 1.0 - (e * g).sum(1) / scale.clamp_min(1e-300),
                            torch.where(both_zero, 0.0, 1.0).double())
        worst = max(worst, float(error.max()))
    return worst
