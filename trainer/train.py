"""`train_prompt`: one registered prompt and its rows in, an adapter version and its manifest out.

The gateway's training jobs (through `trainer.jobspec`) and `promptintern train` both call it; the
held-out evaluation it records is `heldout.py`'s. The adapter is written to a temporary sibling of
`out_dir` and renamed into place, so a reader never sees half a version.
Raising from the `progress` callback (e.g. `TrainCancelled`) stops the run and writes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from core.adapter_store import make_staging_dir, publish_dir
from trainer import cache as store
from trainer.data import RESPONSE, TrainDataError, slot_values, validate_examples
from trainer.dataset import Encoded, StageBuilder, check_lengths, encode, prompt_text
from trainer.gate import run_gate
from trainer.heldout import check_held_out_lengths, evaluate_base, evaluate_job
from trainer.job import (
    ProgressCallback,
    TrainCancelled,
    TrainJob,
    TrainProgress,
    adapter_cache_key,
    adapter_cache_key_for,
    data_hash,
    emit,
    load_base,
    split_job_rows,
)
from trainer.loop import train_stages
from trainer.schedule import ScheduleError

__all__ = [
    "MANIFEST_FORMAT", "TrainCancelled", "TrainJob", "TrainProgress", "adapter_cache_key_for", "evaluate_base",
    "save_adapter", "train_prompt",
]
log = logging.getLogger(__name__)
MANIFEST_FORMAT = 1


def _context_length(model: Any) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)


def train_prompt(job: TrainJob, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train, evaluate and store one adapter version; returns its manifest.

    Raises TrainDataError for data that cannot be trained on (bad examples, rows too long) before
    any training starts, ScheduleError for a schedule that trains nothing.
    """
    schedule = job.schedule
    if not schedule.trains:
        raise ScheduleError(f"schedule {schedule.name!r} has no stages: there is nothing to train")
    if job.out_dir.exists():
        raise FileExistsError(f"{job.out_dir} already exists")
    started = time.monotonic()
    if job.threads:
        torch.set_num_threads(job.threads)
    torch.manual_seed(schedule.seed)

    examples = validate_examples(job.template, job.examples)
    train_ids, train, test = split_job_rows(job)
    if not train:
        raise TrainDataError("no training rows left after the held-out split")
    if job.gate is not None and not test:
        raise TrainDataError("the promotion gate needs held-out rows: set eval_fraction above 0")
    stages = schedule.stages()
    emit(progress, phase="prepare", stage_index=0, stage_count=len(stages), stage_name="preparing data",
          step=0, total_steps=0, global_step=0, global_total_steps=0, loss=None, eta_s=None)

    tokenizer, model = load_base(job)
    context = _context_length(model)
    limit = min(schedule.max_length, context)
    from trainer.compress import SelfInformationCompressor

    builder = StageBuilder(
        job.template, examples, train,
        compressor=SelfInformationCompressor(model, tokenizer),
        retrieval=schedule.retrieval,
        max_examples=max((s.examples for s in stages), default=0),
    )
    encoded: dict[str, list[Encoded]] = {s.name: builder.encode_stage(s, tokenizer, train_ids) for s in stages}
    teacher = None
    if schedule.objective == "kl":  # the full prompt and answer of every training row: the base model reads it
        teacher_items = [encode(tokenizer, i, prompt_text(tokenizer, builder.layout.full_prompt(
            slot_values(job.template, row))), row[RESPONSE]) for i, row in zip(train_ids, train, strict=True)]
        encoded["teacher (full prompt, kl objective)"] = teacher_items
        teacher = {e.row: e for e in teacher_items}
    check_lengths(encoded, limit, "schedule.max_length or the model's context")
    check_held_out_lengths(job, tokenizer, builder.layout, test, context)
    data = data_hash(job, train, test)

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=job.lora_rank, lora_alpha=schedule.lora_alpha, lora_dropout=schedule.lora_dropout,
        target_modules=list(job.lora_targets), task_type="CAUSAL_LM", bias="none",
    )
    torch.manual_seed(schedule.seed)
    peft_model = get_peft_model(model, lora)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def on_step(stage: int, step: int, steps: int, gstep: int, gtotal: int, loss: float, eta: float | None) -> None:
        emit(progress, phase="train", stage_index=stage, stage_count=len(stages), stage_name=stages[stage].name,
              step=step, total_steps=steps, global_step=gstep, global_total_steps=gtotal, loss=loss, eta_s=eta)

    train_started, cpu_started = time.monotonic(), time.process_time()
    results = train_stages(
        peft_model, schedule, stages, [encoded[s.name] for s in stages], pad_id=pad_id,
        on_step=on_step, show_progress=job.show_progress, teacher=teacher,
    )
    training_seconds = time.monotonic() - train_started
    training_cpu_seconds = time.process_time() - cpu_started

    evaluation = None
    predictions: dict[str, list[str]] = {}
    if test and job.evaluation.enabled:
        evaluation = evaluate_job(
            job, peft_model, tokenizer, builder.layout, test, adapter_key=data + schedule.digest(), progress=progress,
            predictions=predictions,
        )
    gate = None
    if job.gate is not None:
        emit(progress, phase="evaluate", stage_index=len(stages) - 1, stage_count=len(stages),
             stage_name="promotion gate", step=0, total_steps=0, global_step=0, global_total_steps=0, loss=None,
             eta_s=None)
        gate = run_gate(job.gate, peft_model, tokenizer, builder.layout, job.template, test,
                        predictions.get("adapter+bare"), job.evaluation.max_new_tokens)

    emit(progress, phase="save", stage_index=len(stages) - 1, stage_count=len(stages), stage_name="saving",
          step=0, total_steps=0, global_step=0, global_total_steps=0, loss=None, eta_s=None)
    manifest = {
        "format": MANIFEST_FORMAT,
        "prompt": job.name,
        "prompt_hash": job.template.digest(),
        "base_model": job.served_model_name,
        "inference": schedule.inference,
        "schedule": {**schedule.to_dict(), "hash": schedule.digest()},
        "stages": [
            {
                "index": r.stage.index, "name": r.stage.name, "kind": r.stage.kind,
                "keep_ratio": r.stage.keep_ratio, "examples": r.stage.examples, "steps": r.steps,
                "loss_first": _mean(r.losses[: max(1, len(r.losses) // 10)]),
                "loss_last": _mean(r.losses[-max(1, len(r.losses) // 10):]),
                "loss_mean": _mean(r.losses), "losses": _thin(r.losses, 100),
                "seconds": round(r.seconds, 2), "tokens": r.tokens,
                "mean_input_tokens": _mean([e.prompt_len for e in encoded[r.stage.name]]),
            }
            for r in results
        ],
        "lora": {"rank": job.lora_rank, "alpha": schedule.lora_alpha, "dropout": schedule.lora_dropout,
                 "targets": list(job.lora_targets)},
        "data_hash": data,
        "cache_key": adapter_cache_key(job, data),
        "train_rows": len(train),
        "eval_rows": len(test),
        "examples": len(examples),
        "training_seconds": round(training_seconds, 2),
        "training_cpu_seconds": round(training_cpu_seconds, 2),
        "total_seconds": None,
        "evaluation": evaluation,
        "gate": gate,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": _environment(),
    }
    manifest["total_seconds"] = round(time.monotonic() - started, 2)
    save_adapter(peft_model, job, manifest)
    emit(progress, phase="done", stage_index=len(stages) - 1, stage_count=len(stages), stage_name="done",
          step=0, total_steps=0, global_step=0, global_total_steps=0, loss=None, eta_s=0.0)
    return manifest


def save_adapter(peft_model: Any, job: TrainJob, manifest: dict[str, Any]) -> None:
    """Write adapter files and manifest into a staging sibling named after this process, sync it, then rename it
    to `out_dir`."""
    out = Path(job.out_dir)
    tmp = make_staging_dir(out.parent, out.name)
    try:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = job.served_model_name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / "README.md").unlink(missing_ok=True)
        (tmp / store.MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        os.chmod(tmp, 0o755)
        publish_dir(tmp, out)  # files and folder synced before the rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _thin(values: Sequence[float], n: int) -> list[float]:
    if len(values) <= n:
        return [round(v, 4) for v in values]
    step = len(values) / n
    return [round(values[int(i * step)], 4) for i in range(n)]


def _environment() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "threads": str(torch.get_num_threads())}
