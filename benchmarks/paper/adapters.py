"""The adapters rows 5 to 8 serve: found in the trainer's cache by the key `promptintern train` would use, or
trained now (a tiny schedule under --quick), and the LoRA slot size vLLM needs for them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.paper.options import QUICK_ADAPTER_DIR, QUICK_STEPS, Progress, clock
from core.basemodel import base_model_dir
from core.config import Settings
from gateway.vllm_server import VLLM_LORA_RANKS


@dataclass(frozen=True)
class AdapterInfo:
    """Where one schedule's adapter came from, and what its manifest says about its training."""

    schedule: str
    path: Path
    source: str
    cache_key: str
    training_seconds: float | None
    created: str | None
    evaluation: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "path": str(self.path), "source": self.source,
                "cache_key": self.cache_key, "training_seconds": self.training_seconds, "created": self.created,
                "evaluation": self.evaluation}


def _train_job(settings: Settings, example: Any, schedule: Any, out_dir: Path) -> Any:
    """The job `promptintern train --example nl2bash` builds, so the cache key is the same."""
    from trainer.data import validate_examples, validate_rows
    from trainer.evaluate import EvalOptions
    from trainer.train import TrainJob

    template = example.template
    return TrainJob(
        name=example.name, template=template, rows=validate_rows(template, example.train),
        examples=validate_examples(template, example.examples), test_rows=validate_rows(template, example.test),
        out_dir=out_dir, base_model_dir=base_model_dir(settings), served_model_name=settings.served_model_name,
        schedule=schedule, evaluation=EvalOptions(enabled=False), lora_rank=settings.lora_rank,
        lora_targets=tuple(settings.lora_targets), cache_dir=settings.data_dir / "trainer-cache",
        threads=settings.torch_threads, show_progress=True,
    )


def _adapter_info(schedule: str, path: Path, source: str, key: str) -> AdapterInfo:
    from core.adapter_store import read_manifest

    manifest = read_manifest(path) or {}
    seconds = manifest.get("training_seconds")
    return AdapterInfo(schedule, path, source, key, float(seconds) if seconds is not None else None,
                       manifest.get("created"), manifest_evaluation(manifest))


def manifest_evaluation(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer's own held-out figures from a manifest (its decoding, its rows), for comparison."""
    evaluation = manifest.get("evaluation")
    if not isinstance(evaluation, dict):
        return None
    keep = ("n", "bleu", "exact_match", "input_tokens", "latency_s")
    return {"decoding": evaluation.get("decoding"), "rows": evaluation.get("rows"),
            "conditions": {name: {k: c.get(k) for k in keep}
                           for name, c in (evaluation.get("conditions") or {}).items()}}


def resolve_adapter(settings: Settings, example: Any, schedule: str, quick: bool, progress: Progress) -> AdapterInfo:
    """The cached adapter for this schedule, else one trained now (a tiny schedule under --quick)."""
    from core.adapter_store import next_version_dir
    from trainer.cache import find_cached_adapter
    from trainer.schedule import preset
    from trainer.train import adapter_cache_key_for, train_prompt

    prompt_dir = settings.adapter_dir / example.name
    job = _train_job(settings, example, preset(schedule), next_version_dir(prompt_dir))
    key = adapter_cache_key_for(job)
    cached = find_cached_adapter(prompt_dir, key)
    if cached is not None:
        return _adapter_info(schedule, cached, "trainer cache", key)
    source = "trained by this run (it was not in the cache)"
    if quick:
        quick_dir = settings.adapter_dir / QUICK_ADAPTER_DIR / schedule
        job = _train_job(settings, example, preset(schedule, steps_per_stage=QUICK_STEPS[schedule]),
                         next_version_dir(quick_dir))
        key = adapter_cache_key_for(job)
        cached = find_cached_adapter(quick_dir, key)
        tiny = f"tiny --quick schedule, {sum(QUICK_STEPS[schedule])} steps: NOT the real adapter"
        if cached is not None:
            return _adapter_info(schedule, cached, f"quick cache ({tiny})", key)
        source = f"trained by this run ({tiny})"
    progress.say(f"adapter {schedule}: not in the cache; training into {job.out_dir}")
    train_prompt(job, progress=_training_progress(progress, schedule))
    return _adapter_info(schedule, job.out_dir, source, key)


def _training_progress(progress: Progress, schedule: str) -> Callable[[Any], None]:
    """A `train_prompt` callback: one line per phase change, and every 30 s."""
    last_phase = [""]
    last_at = [0.0]

    def report(p: Any) -> None:
        now = time.monotonic()
        if p.phase == last_phase[0] and now - last_at[0] < 30:
            return
        last_phase[0], last_at[0] = p.phase, now
        eta = f", ETA {clock(p.eta_s)}" if p.eta_s is not None else ""
        loss = f", loss {p.loss:.3f}" if p.loss is not None else ""
        progress.say(f"training {schedule}: {p.phase} {p.stage_name} step {p.global_step}/{p.global_total_steps}"
                     f"{loss}{eta}")

    return report


def lora_rank_limit(paths: Sequence[Path], limit: int) -> int:
    """The smallest rank vLLM accepts that fits every adapter served: vLLM sizes its LoRA weights (and, on
    CPU, the per-token work of every LoRA layer) by --max-lora-rank, not by the adapter's own rank."""
    from core.adapter_store import adapter_rank, read_adapter_config

    needed = max((adapter_rank(read_adapter_config(path, limit)) for path in paths), default=limit)
    return next((r for r in VLLM_LORA_RANKS if r >= needed), limit)
