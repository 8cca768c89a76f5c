"""Extraction: `config` (EmbedConfig), `core` (the one embed core), `local` and `ray` (the drivers that
call it), `images` and `api` (features of images in memory).

This package is also the public function `embedder.extract(images, model, ...)`: Python binds a
subpackage to its parent's attribute of the same name once it is imported, so the package itself
is made callable, and calling it calls `embedder.extract.api.extract` (imported then, so that
importing `embedder.extract.config` for the CLI's `--help` still does not load torch).
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """`embedder.extract.api.extract(images, model, ...)`: features of images, row i for image i."""
        from embedder.extract.api import extract

        return extract(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
