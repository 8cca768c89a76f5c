"""matplotlib without a display: every PNG embedder writes goes through here."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from embedder.outputs import PICTURE, png_metadata, write_file


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no screen on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: str | Path, inputs: Sequence[str | os.PathLike] | None = None,
                overwrite: bool = False, flag: str = "--out") -> Path:
    """Write `fig` as a PNG marked as embedder's. With `inputs` (a command's own --out), under the
    output policy (embedder.outputs): staged and swapped in, refusing what embedder did not draw;
    without them (a file inside a folder being staged), directly."""
    out = Path(out)
    fig.tight_layout()
    metadata = png_metadata(inputs or ())
    try:
        if inputs is None:
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, format="png", metadata=metadata)
        else:
            with write_file(out, PICTURE, inputs, overwrite, flag) as tmp:
                fig.savefig(tmp, format="png", metadata=metadata)
    finally:
        pyplot().close(fig)
    return out
