"""One training run as data: `TrainJob` (what to train), `TrainProgress` (where it stands), and the facts
derived from a job that training and evaluation share (the held-out split, the cache keys, the base model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.templates import PromptTemplate
from trainer import cache as store
from trainer.data import Row, rows_digest, split_indices
from trainer.evaluate import EvalOptions
from trainer.gate import GateOptions
from trainer.schedule import ProgressiveSchedule, preset

Phase = Literal["prepare", "train", "evaluate", "save", "done"]


class TrainCancelled(Exception):
    """Raise from a progress callback to stop a run; nothing is written."""


@dataclass(frozen=True)
class TrainProgress:
    """Where a run stands; `eta_s` estimates the training time left (from tokens still to process)."""

    phase: Phase
    stage_index: int
    stage_count: int
    stage_name: str
    step: int
    total_steps: int
    global_step: int
    global_total_steps: int
    loss: float | None
    eta_s: float | None


ProgressCallback = Callable[[TrainProgress], None]


@dataclass
class TrainJob:
    """Everything one training run needs; `rows` are already validated (`validate_rows`)."""

    name: str
    template: PromptTemplate
    rows: list[Row]
    out_dir: Path
    base_model_dir: Path
    served_model_name: str
    examples: list[Row] = field(default_factory=list)
    schedule: ProgressiveSchedule = field(default_factory=lambda: preset("promptintern"))
    eval_fraction: float = 0.2
    test_rows: list[Row] | None = None
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    lora_rank: int = 8
    lora_targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    cache_dir: Path | None = None
    threads: int | None = None
    show_progress: bool = False
    gate: GateOptions | None = None  # a traffic-trained version: the promotion gate runs on the held-out rows


def emit(progress: ProgressCallback | None, **fields: Any) -> None:
    """Report a `TrainProgress` to the caller, when it asked for progress."""
    if progress is not None:
        progress(TrainProgress(**fields))


def split_job_rows(job: TrainJob) -> tuple[list[int], list[Row], list[Row]]:
    """Training rows (with their indices in job.rows) and held-out rows."""
    if job.test_rows is not None:
        return list(range(len(job.rows))), list(job.rows), list(job.test_rows)
    fraction = job.eval_fraction if job.evaluation.enabled else 0.0
    train_ids, test_ids = split_indices(job.template, job.rows, fraction)
    return train_ids, [job.rows[i] for i in train_ids], [job.rows[i] for i in test_ids]


def data_hash(job: TrainJob, train: Sequence[Row], test: Sequence[Row]) -> str:
    return store.stable_hash(
        {
            "template": job.template.digest(),
            "examples": rows_digest(job.examples),
            "train": rows_digest(train),
            "test": rows_digest(test),
        }
    )


def adapter_cache_key(job: TrainJob, data: str) -> str:
    """What makes two runs interchangeable: data, schedule, LoRA shape and base model."""
    return store.stable_hash(
        {
            "data": data,
            "schedule": job.schedule.digest(),
            "base": store.base_model_identity(job.base_model_dir, job.served_model_name),
            "lora": {"rank": job.lora_rank, "targets": sorted(job.lora_targets)},
        }
    )


def adapter_cache_key_for(job: TrainJob) -> str:
    """The cache key `train_prompt` would record for this job (to look for a reusable adapter)."""
    _, train, test = split_job_rows(job)
    return adapter_cache_key(job, data_hash(job, train, test))


def load_base(job: TrainJob) -> tuple[Any, Any]:
    """The job's base model (float32, eval mode) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(job.base_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(job.base_model_dir), dtype=torch.float32)
    model.eval()
    return tokenizer, model
