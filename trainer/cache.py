"""Hashes that identify a training run, the adapter store's versions, and cached evaluations.

An adapter is reusable when prompt, data, schedule, LoRA shape and base model are the same: its
manifest records that `cache_key`, and `find_cached_adapter` looks it up, so benchmarks and the
worked example reuse adapters instead of training again. Base-model evaluations (which do not
depend on the schedule) are cached as JSON files keyed the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from core.adapter_store import read_manifest, version_dirs

MANIFEST = "manifest.json"


def stable_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def base_model_identity(base_dir: Path, served_model_name: str) -> str:
    """The base model as configuration, weight file sizes and public name (cheap to compute)."""
    base_dir = Path(base_dir)
    config = (base_dir / "config.json").read_text() if (base_dir / "config.json").is_file() else ""
    weights = sorted(
        (p.name, p.stat().st_size) for p in base_dir.glob("*.safetensors")
    ) + sorted((p.name, p.stat().st_size) for p in base_dir.glob("*.bin"))
    return stable_hash({"config": config, "weights": weights, "served": served_model_name})


def find_cached_adapter(prompt_dir: Path, cache_key: str) -> Path | None:
    """The newest complete version under `prompt_dir` trained with exactly this cache key."""
    for _, path in reversed(version_dirs(prompt_dir)):
        manifest = read_manifest(path)
        if (
            manifest is not None
            and manifest.get("cache_key") == cache_key
            and (path / "adapter_model.safetensors").is_file()
        ):
            return path
    return None


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EvalCache:
    """Evaluation results (figures and predictions) stored as one JSON file per key."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def get(self, key: str) -> dict[str, Any] | None:
        if self.folder is None:
            return None
        try:
            value = json.loads((self.folder / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.folder is not None:
            write_json_atomic(self.folder / f"{key}.json", value)
