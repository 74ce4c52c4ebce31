"""The adapter store: atomic publication, version numbers that never collide, careful deletion."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.adapter_store import (
    STAGING_MAX_AGE_S,
    STAGING_NAME,
    AdapterStore,
    adapter_modules,
    check_target_modules,
    next_version_dir,
    staging_abandoned,
    version_dirs,
)
from gateway.registry.store import PromptRegistry


def test_versions_skip_folders_written_outside_the_registry(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters")
    (store.root / "p" / "v1").mkdir(parents=True)  # e.g. `promptintern train` wrote it
    (store.root / "p" / "v2").mkdir()
    registry = PromptRegistry(f"sqlite:///{tmp_path / 'r.db'}")
    registry.create("p", "chat", [{"role": "user", "content": "{q}"}], [])
    assert store.highest_version("p") == 2
    assert registry.allocate_version("p", "loading", "upload", store) == 3
    assert registry.allocate_version("p", "loading", "upload", store) == 4
    registry.close()


def test_version_folders_are_the_v_n_directories(tmp_path: Path) -> None:
    """One reading of `v<N>` for the store, the registry's allocation and the trainer's CLI."""
    prompt_dir = tmp_path / "p"
    assert version_dirs(prompt_dir) == [] and next_version_dir(prompt_dir) == prompt_dir / "v1"
    for name in ("v10", "v2", "v1x", ".v3-tmp", "vv4"):
        (prompt_dir / name).mkdir(parents=True)
    (prompt_dir / "v11").write_text("a file, not a version")
    assert version_dirs(prompt_dir) == [(2, prompt_dir / "v2"), (10, prompt_dir / "v10")]
    assert next_version_dir(prompt_dir) == prompt_dir / "v11"
    assert AdapterStore(tmp_path).highest_version("p") == 10


def test_publish_is_atomic_and_never_overwrites(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    staging = store.staging_dir("p", 1)
    (staging / "adapter_config.json").write_text("{}")
    final = store.publish(staging, "p", 1)
    assert (final / "adapter_config.json").is_file() and not staging.exists()
    again = store.staging_dir("p", 1)
    with pytest.raises(FileExistsError):
        store.publish(again, "p", 1)


def test_a_replica_removes_only_abandoned_staging_folders(tmp_path: Path) -> None:
    """Several replicas share the store: a staging folder goes when its writer (a process of this host) is dead,
    or when nothing in it changed for STAGING_MAX_AGE_S; a live writer's stays, whoever it is."""
    store = AdapterStore(tmp_path)
    mine = store.staging_dir("p", 1)  # this process is writing it
    owner = STAGING_NAME.match(mine.name)
    assert owner is not None and int(owner["pid"]) == os.getpid()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    folder = store.root / "p"
    dead_writer = folder / f".tmp-{owner['host']}.{int(ended.stdout)}-v2-abc"  # a crash of this host's replica
    elsewhere = folder / ".tmp-otherhost.42-v3-abc"  # another host's replica, writing now
    abandoned = folder / ".tmp-otherhost.43-v4-abc"  # another host's, untouched for two hours
    heartbeat = folder / ".tmp-otherhost.44-v5-abc"  # an old folder whose writer just wrote a file into it
    legacy = folder / ".v6-tmp-x"  # an older release's name, no owner: only its age counts
    for path in (dead_writer, elsewhere, abandoned, heartbeat, legacy):
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"x")
    two_hours_ago = time.time() - 2 * STAGING_MAX_AGE_S
    for path in (abandoned, abandoned / "adapter_model.safetensors", heartbeat):
        os.utime(path, (two_hours_ago, two_hours_ago))
    (store.root / "p" / "v1").mkdir()
    removed = store.remove_staging_leftovers()
    assert sorted(p.name for p in removed) == sorted([dead_writer.name, abandoned.name])
    assert not dead_writer.exists() and not abandoned.exists()
    assert mine.is_dir() and elsewhere.is_dir() and heartbeat.is_dir() and legacy.is_dir()
    assert (store.root / "p" / "v1").is_dir()
    assert staging_abandoned(legacy, max_age_s=0, now=time.time() + 1)  # once old enough, anyone's goes


def test_deletion_removes_the_registrys_versions_and_staging(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.staging_dir("p", 3)
    (store.root / "p" / "v1").mkdir()
    (store.root / "p" / "v2").mkdir()
    store.remove_prompt("p", [2])
    assert (store.root / "p" / "v1").is_dir() and not (store.root / "p" / "v2").exists()
    store.remove_prompt("p", [1])
    assert not (store.root / "p").exists()


def test_an_adapters_modules_are_read_from_its_tensor_names(tiny_model_path: Path, tmp_path: Path) -> None:
    from core.errors import InvalidAdapter
    from trainer.lora import random_lora

    attention = random_lora(tiny_model_path, tmp_path / "attention", seed=1)
    assert adapter_modules(attention) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    check_target_modules(attention, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    check_target_modules(attention, [])  # vLLM's own default: every module
    mlp = random_lora(tiny_model_path, tmp_path / "mlp", seed=1, targets=("v_proj", "up_proj"))
    assert adapter_modules(mlp) == {"v_proj", "up_proj"}
    with pytest.raises(InvalidAdapter, match="LoRA weights for up_proj, which the vLLM engine") as refused:
        check_target_modules(mlp, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert refused.value.code == "unsupported_target_modules"
    (mlp / "adapter_model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(InvalidAdapter, match="not a safetensors file"):
        adapter_modules(mlp)
