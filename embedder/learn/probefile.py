"""`probe.pt`: a trained linear probe on disk, written by `embedder probe`, read by
`evaluate`, `export` and `finetune --init-head`.

One `torch.save` of a dict of plain tensors and strings, loadable with
`torch.load(weights_only=True)`:

    format       "embedder-probe/1"
    coef         float32 [n_classes, dim], applies to raw (unstandardised) features
    intercept    float32 [n_classes]
    classes      list of class names, the order of the rows of coef
    model        registry name of the backbone
    layer        the feature layer (node name) the probe was trained on
    fingerprint  fingerprint of the cache's feature space
    components   JSON text of the cache's components (what the fingerprint hashes)
    C            the chosen inverse L2 strength

Only coef, intercept, classes, model and layer are required to read a file: a probe
written by hand for `--init-head` need not come from a cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from embedder.atomic import save_torch
from embedder.errors import ConfigError

PROBE_FILE = "probe.pt"
SKLEARN_FILE = "classifier.joblib"  # what PROBE_DIR holds instead when a scikit-learn classifier was trained
SWEEP_FILE = "sweep.json"  # what PROBE_DIR holds after `--layer all` (embedder.learn.sweep), beside one folder per layer
FORMAT = "embedder-probe/1"
REQUIRED = ("coef", "intercept", "classes", "model", "layer")


@dataclass
class ProbeFile:
    coef: torch.Tensor  # float32 [n_classes, dim]
    intercept: torch.Tensor  # float32 [n_classes]
    classes: list[str]
    model: str
    layer: str
    fingerprint: str | None = None
    components: dict = field(default_factory=dict)  # empty for a probe that records none
    C: float | None = None
    path: Path | None = None  # the file it was read from (not part of the format)


def write_probe(path: str | os.PathLike, probe: ProbeFile) -> None:
    payload = {
        "format": FORMAT,
        "coef": probe.coef,
        "intercept": probe.intercept,
        "classes": list(probe.classes),
        "model": probe.model,
        "layer": probe.layer,
        "fingerprint": probe.fingerprint,
        "components": json.dumps(probe.components),
        "C": float(probe.C),
    }
    save_torch(payload, Path(path))


def read_probe(location: str | os.PathLike, option: str | None = None) -> ProbeFile:
    """The probe in `location` (a PROBE_DIR, or the probe.pt file itself).

    `option`: the command-line option that named `location` (e.g. "--init-head"); the errors
    then start with it, so the user sees which argument was wrong.
    """
    path = _probe_path(location, option)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{_prefix(option)}{path} is not a readable probe file: {exc}") from exc
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED):
        raise ConfigError(
            f"{_prefix(option)}{path} is not a linear probe (it needs the keys {', '.join(REQUIRED)})."
        )
    if payload.get("format", FORMAT) != FORMAT:
        raise ConfigError(
            f"{_prefix(option)}{path} is a {payload['format']!r} file; this version of embedder reads {FORMAT}. "
            "Train the probe again with this version."
        )
    return ProbeFile(
        coef=torch.as_tensor(payload["coef"], dtype=torch.float32),
        intercept=torch.as_tensor(payload["intercept"], dtype=torch.float32),
        classes=list(payload["classes"]),
        model=payload["model"],
        layer=payload["layer"],
        fingerprint=payload.get("fingerprint"),
        components=json.loads(payload.get("components", "{}")),
        C=payload.get("C"),
        path=path,
    )


def _probe_path(location: str | os.PathLike, option: str | None) -> Path:
    folder = Path(location).expanduser()  # the messages show `location` as the user typed it
    path = folder / PROBE_FILE if folder.is_dir() else folder
    if path.is_file():
        return path
    if (folder / SKLEARN_FILE).is_file():
        raise ConfigError(
            f"{_prefix(option)}{location} holds a scikit-learn classifier; this needs a linear probe "
            "(--classifier probe)."
        )
    if option:
        raise ConfigError(
            f"{option}: no {PROBE_FILE} in {location}. Pass the output directory of a trained linear probe."
        )
    raise ConfigError(f"No linear probe in {location}. Train one with `embedder probe CACHE.h5 --out {location}`.")


def _prefix(option: str | None) -> str:
    return f"{option}: " if option else ""
