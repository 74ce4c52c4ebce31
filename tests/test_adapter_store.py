"""The adapter store: atomic publication, version numbers that never collide, careful deletion."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.adapter_store import AdapterStore, next_version_dir, version_dirs
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


def test_leftovers_and_deletion(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    half = store.staging_dir("p", 3)  # a crash in the middle of writing
    (store.root / "p" / ".v4-tmp-x").mkdir()  # the trainer's staging name
    (store.root / "p" / "v1").mkdir()
    (store.root / "p" / "v2").mkdir()
    assert sorted(p.name for p in store.remove_staging_leftovers()) == sorted([half.name, ".v4-tmp-x"])
    store.remove_prompt("p", [2])
    assert (store.root / "p" / "v1").is_dir() and not (store.root / "p" / "v2").exists()
    store.remove_prompt("p", [1])
    assert not (store.root / "p").exists()
