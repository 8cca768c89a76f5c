"""Cache fingerprints: everything that can change a feature's bits, as readable components.

`fingerprint_components(backbone)` is what a cache records; `fingerprint_of` hashes it;
`component_differences` is the one comparison every refusal (resume, append, probe on
another cache, query backbone) is made with, so each lists the same differing fields.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from embedder.models.constants import STYLE

if TYPE_CHECKING:
    from embedder.models.backbone import FrozenBackbone


def fingerprint_of(components: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


def layer_view_components(components: dict[str, str], name: str) -> dict[str, str]:
    """The components a cache embedded with `--layer name` alone would have."""
    view = {k: v for k, v in components.items() if k != "layers"}
    view["layer"] = name
    if name != STYLE:
        view.pop(STYLE, None)
    return view


def component_differences(a: dict, b: dict, ignore: frozenset[str] | set[str] = frozenset()) -> dict:
    """{component: (a's value, b's value)} for every component that differs (missing = None)."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)}


def fingerprint_components(backbone: FrozenBackbone, feature_dtype: str = "float32", *,
                           jpeg_draft: bool = False) -> dict[str, str]:
    """Everything that can change a feature's bits, as readable strings (`jpeg_draft`: embed --jpeg-draft):
    `embedder.models.space.components`, whose inverse is `FeatureSpace.from_components`."""
    # Imported here: reading a cache (this module's other half) must not pay for torch.
    from embedder.models.space import components

    return components(backbone, feature_dtype, jpeg_draft=jpeg_draft)


def backbone_settings(components: dict, weights_path: str | None = None) -> dict:
    """The `load_backbone` settings (model included) that rebuild the backbone a cache records: the fields
    of `FeatureSpace.from_components(components, weights_path)`."""
    from dataclasses import asdict

    from embedder.models.space import FeatureSpace

    return asdict(FeatureSpace.from_components(components, weights_path))
