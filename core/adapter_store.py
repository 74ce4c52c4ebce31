"""The adapter store on disk: `<ADAPTER_DIR>/<prompt>/v<N>/`, always written atomically.

A version is written into a hidden staging folder beside its final place, synced to disk (files and folder), and
renamed into place. Several replicas share the store (one volume), so a staging folder's name says who writes it
(host and process id): a replica removes leftovers of its own host's dead processes, and another's only once
nothing in them has changed for `STAGING_MAX_AGE_S` (their modification times are the writer's heartbeat).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from core.errors import InvalidAdapter

TMP_PREFIX = ".tmp-"
VERSION_DIR = re.compile(r"v(\d+)")
STAGING_NAME = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_.]+)\.(?P<pid>\d+)-")
STAGING_MAX_AGE_S = 3600.0  # a staging folder untouched this long is abandoned, whoever wrote it


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


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def make_staging_dir(parent: Path, label: str) -> Path:
    """A fresh hidden folder in `parent` (same filesystem as the final folder: the rename is atomic), named after
    its writer: `.tmp-<host>.<pid>-<label>-<random>`."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{_host()}.{os.getpid()}-{label}-", dir=parent))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(staging: Path, final: Path) -> Path:
    """Sync every file of `staging` and the folder itself, rename it to `final` (never over an existing one) and
    sync the parent, so a published version survives a power cut whole or not at all."""
    for folder, _, files in os.walk(staging):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))
    if final.exists():
        raise FileExistsError(f"{final} already exists; adapter versions are never overwritten")
    os.rename(staging, final)
    _fsync(final.parent)
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _last_touched(folder: Path) -> float:
    """The newest modification time of a folder and everything in it: its writer's heartbeat."""
    newest = folder.stat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, (Path(root) / name).stat().st_mtime)
    return newest


def staging_abandoned(folder: Path, max_age_s: float = STAGING_MAX_AGE_S, now: float | None = None) -> bool:
    """Whether a staging folder can go: its writer, a process of this host, is gone; or (another host's, or a
    name without an owner) nothing in it changed for `max_age_s`. A live writer's folder (this process's too)
    stays."""
    owner = STAGING_NAME.match(folder.name)
    if owner is not None and owner["host"] == _host():
        pid = int(owner["pid"])
        if pid != os.getpid() and not _pid_alive(pid):
            return True
    try:
        age = (time.time() if now is None else now) - _last_touched(folder)
    except OSError:
        return False  # removed meanwhile
    return age > max_age_s


class AdapterStore:
    """Folders that vLLM and the embedded engine read; a folder appears whole or not at all."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def version_dir(self, prompt: str, version: int) -> Path:
        return self.root / prompt / f"v{version}"

    def staging_dir(self, prompt: str, version: int) -> Path:
        """A fresh staging folder beside the final one, named after this process (`make_staging_dir`)."""
        return make_staging_dir(self.root / prompt, f"v{version}")

    def highest_version(self, prompt: str) -> int:
        """The largest `v<N>` folder of a prompt (the trainer's CLI writes versions outside the registry);
        the registry allocates new versions above it (`PromptRegistry.allocate_version`)."""
        versions = version_dirs(self.root / prompt)
        return versions[-1][0] if versions else 0

    def publish(self, staging: Path, prompt: str, version: int) -> Path:
        """Sync the staging folder and rename it to `<prompt>/v<version>` (`publish_dir`)."""
        return publish_dir(staging, self.version_dir(prompt, version))

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

    def remove_orphan_version(self, prompt: str, version: int) -> None:
        """A version whose prompt was deleted while it was being added: its folder, then the prompt's folder if
        nothing else is left in it (another writer's staging folder, say, of a prompt registered again, stays)."""
        self.remove_version(prompt, version)
        with contextlib.suppress(OSError):
            (self.root / prompt).rmdir()

    def remove_staging_leftovers(self, max_age_s: float = STAGING_MAX_AGE_S) -> list[Path]:
        """Half-written folders (hidden names) whose writer is gone (`staging_abandoned`): never loaded, removed
        at start-up and when a merged engine's start is stopped. Other replicas' folders being written stay."""
        leftovers = [p for p in self.root.glob("*/.*") if p.is_dir() and staging_abandoned(p, max_age_s)]
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


SAFETENSORS_HEADER_MAX = 100_000_000  # the safetensors format's own limit on its JSON header


def adapter_modules(path: Path) -> set[str]:
    """The modules an adapter folder holds LoRA weights for (`q_proj`, `gate_proj`, `lm_head`, ...), from the tensor
    names in its adapter_model.safetensors header (the weights are not read); from adapter_config.json's
    `target_modules` list for a `.bin` adapter. What vLLM will load, whatever the config says."""
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        try:
            with weights.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size <= SAFETENSORS_HEADER_MAX:
                    raise ValueError(f"header size {size}")
                header = json.loads(f.read(size))
            names = [name for name in header if name != "__metadata__"]
        except (OSError, ValueError, TypeError) as exc:
            raise InvalidAdapter(f"adapter_model.safetensors is not a safetensors file: {exc}", param="adapter_path",
                                 code="invalid_adapter") from exc
        # `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> q_proj (lora_embedding_A for embeddings)
        return {parts[i - 1] for parts in (name.split(".") for name in names)
                for i in range(1, len(parts)) if parts[i].startswith("lora_")}
    config = json.loads((path / "adapter_config.json").read_text())
    targets = config.get("target_modules")
    return set(targets) if isinstance(targets, list) else set()


def check_target_modules(path: Path, allowed: list[str]) -> None:
    """An adapter for a vLLM started with `--lora-target-modules` (`allowed`, empty: every module) must hold weights
    for those modules only: vLLM would load it and leave the others out, serving a different model, silently."""
    if not allowed:
        return
    outside = sorted(adapter_modules(path) - set(allowed))
    if outside:
        raise InvalidAdapter(f"the adapter has LoRA weights for {', '.join(outside)}, which the vLLM engine does not "
                             f"apply LoRA to (VLLM_LORA_TARGET_MODULES: {', '.join(allowed)}); train it on those "
                             "modules only, or add these to VLLM_LORA_TARGET_MODULES and the vLLM's "
                             "--lora-target-modules", param="adapter_path", code="unsupported_target_modules")
