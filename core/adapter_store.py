"""The adapter store on disk: `<ADAPTER_DIR>/<prompt>/v<N>/`, always written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from core.errors import InvalidAdapter

TMP_PREFIX = ".tmp-"
VERSION_DIR = re.compile(r"v(\d+)")


def version_dirs(prompt_dir: Path) -> list[tuple[int, Path]]:
    """The `v<N>` folders of one prompt, oldest first: what the store holds, whoever wrote it."""
    if not prompt_dir.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in prompt_dir.iterdir()
             if (m := VERSION_DIR.fullmatch(child.name)) and child.is_dir()]
    return sorted(found)


def next_version_dir(prompt_dir: Path) -> Path:
    """Where the trainer's CLI writes a prompt's next version when no registry allocates the number."""
    versions = version_dirs(prompt_dir)
    return prompt_dir / f"v{versions[-1][0] + 1 if versions else 1}"


class AdapterStore:
    """Folders that vLLM and the embedded engine read; a folder appears whole or not at all."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def version_dir(self, prompt: str, version: int) -> Path:
        return self.root / prompt / f"v{version}"

    def staging_dir(self, prompt: str, version: int) -> Path:
        """A fresh temporary folder beside the final one (same filesystem, so rename is atomic)."""
        parent = self.root / prompt
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}v{version}-", dir=parent))

    def highest_version(self, prompt: str) -> int:
        """The largest `v<N>` folder of a prompt (the trainer's CLI writes versions outside the registry);
        the registry allocates new versions above it (`PromptRegistry.allocate_version`)."""
        versions = version_dirs(self.root / prompt)
        return versions[-1][0] if versions else 0

    def publish(self, staging: Path, prompt: str, version: int) -> Path:
        final = self.version_dir(prompt, version)
        if final.exists():
            raise FileExistsError(f"{final} already exists; adapter versions are never overwritten")
        os.replace(staging, final)
        return final

    def remove_prompt(self, prompt: str, versions: list[int]) -> None:
        """Remove the registry's versions of a prompt (and staging leftovers); folders written by hand stay."""
        folder = self.root / prompt
        for version in versions:
            shutil.rmtree(self.version_dir(prompt, version), ignore_errors=True)
        for leftover in folder.glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when nothing else is left in it

    def remove_version(self, prompt: str, version: int) -> None:
        shutil.rmtree(self.version_dir(prompt, version), ignore_errors=True)

    def remove_staging_leftovers(self) -> list[Path]:
        """Half-written folders from a crash or restart (hidden names): never loaded, removed at start-up."""
        leftovers = [p for p in self.root.glob("*/.*") if p.is_dir()]
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        return leftovers


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_adapter_config(path: Path, max_rank: int) -> dict[str, Any]:
    """Check an adapter folder before loading it: PEFT LoRA files present, rank within the limit."""
    config_file = path / "adapter_config.json"
    if not path.is_dir():
        raise InvalidAdapter(f"adapter folder {path} does not exist", param="adapter_path",
                               code="adapter_not_found")
    if not config_file.is_file():
        raise InvalidAdapter(f"{path} has no adapter_config.json (not a PEFT adapter folder)",
                               param="adapter_path", code="invalid_adapter")
    if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise InvalidAdapter(f"{path} has no adapter_model.safetensors", param="adapter_path",
                               code="invalid_adapter")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidAdapter(f"adapter_config.json is not valid JSON: {exc}", param="adapter_path",
                               code="invalid_adapter") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidAdapter("only LoRA adapters are supported (peft_type must be LORA)",
                               param="adapter_path", code="invalid_adapter")
    rank = adapter_rank(config)
    if rank > max_rank:
        raise InvalidAdapter(f"adapter rank {rank} exceeds the gateway's MAX_LORA_RANK {max_rank}",
                               param="adapter_path", code="adapter_rank_too_large")
    return config


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def adapter_rank(config: dict[str, Any], param: str = "adapter_path") -> int:
    """The largest rank in a PEFT LoRA config: `r`, or a larger one from `rank_pattern`.

    A config from a client may hold anything: a rank that is not a positive integer is an `invalid_adapter`.
    """
    if not _is_rank(config.get("r")):
        raise InvalidAdapter(f"adapter_config.json: 'r' must be a positive integer, got {config.get('r')!r:.40}",
                             param=param, code="invalid_adapter")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(_is_rank(v) for v in pattern.values()):
        raise InvalidAdapter("adapter_config.json: 'rank_pattern' must map module names to positive integers",
                             param=param, code="invalid_adapter")
    return max([config["r"], *pattern.values()])
