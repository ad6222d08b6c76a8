"""diffusers-ext: recent diffusion research as drop-in Hugging Face diffusers components.

``import diffusers_ext`` is cheap: components (and torch, diffusers) are imported on first attribute access, e.g.
``from diffusers_ext import GaussianMixtureDenoiser``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .components import COMPONENTS, HELPERS, Component, list_components

__version__ = "0.1.0"

_LAZY = {c.name: c.module for c in COMPONENTS} | HELPERS

__all__ = ["Component", "__version__", "list_components", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffusers_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
