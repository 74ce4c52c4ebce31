"""`train_prompt`: one registered prompt and its rows in, an adapter version and its manifest out.

The job runner (another process) and `promptintern train` both call it. The adapter is written to a
temporary sibling of `out_dir` and renamed into place, so a reader never sees half a version.
Raising from the `progress` callback (e.g. `TrainCancelled`) stops the run and writes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from core.templates import PromptTemplate
from trainer import cache as store
from trainer.data import (
    REFERENCES,
    RESPONSE,
    Row,
    TrainDataError,
    rows_digest,
    slot_values,
    split_indices,
    validate_examples,
)
from trainer.dataset import Encoded, StageBuilder, check_lengths, encode_prompt, prompt_text
from trainer.evaluate import EvalOptions, condition_name, format_table, manifest_view, run_condition, subset_figures
from trainer.loop import train_stages
from trainer.prompting import PromptLayout
from trainer.schedule import ProgressiveSchedule, ScheduleError, preset

log = logging.getLogger(__name__)
MANIFEST_FORMAT = 1
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
    _, train, test = _split(job)
    return adapter_cache_key(job, data_hash(job, train, test))


def evaluate_base(job: TrainJob) -> dict[str, Any]:
    """The no-fine-tuning baseline: base model with the full prompt and with the bare query."""
    _, _, test = _split(job)
    if not test:
        raise TrainDataError("nothing to evaluate: no held-out rows (set eval_fraction or test rows)")
    if job.threads:
        torch.set_num_threads(job.threads)
    tokenizer, model = _load_base(job)
    layout = PromptLayout.build(job.template, validate_examples(job.template, job.examples))
    return evaluate_job(job, model, tokenizer, layout, test, adapter_key=None)


def _split(job: TrainJob) -> tuple[list[int], list[Row], list[Row]]:
    """Training rows (with their indices in job.rows) and held-out rows."""
    if job.test_rows is not None:
        return list(range(len(job.rows))), list(job.rows), list(job.test_rows)
    fraction = job.eval_fraction if job.evaluation.enabled else 0.0
    train_ids, test_ids = split_indices(job.template, job.rows, fraction)
    return train_ids, [job.rows[i] for i in train_ids], [job.rows[i] for i in test_ids]


def _emit(job_progress: Callable[[TrainProgress], None] | None, **kw: Any) -> None:
    if job_progress is not None:
        job_progress(TrainProgress(**kw))


def _load_base(job: TrainJob) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(job.base_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(job.base_model_dir), dtype=torch.float32)
    model.eval()
    return tokenizer, model


def _context_length(model: Any) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)


def train_prompt(job: TrainJob, progress: Callable[[TrainProgress], None] | None = None) -> dict[str, Any]:
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
    train_ids, train, test = _split(job)
    if not train:
        raise TrainDataError("no training rows left after the held-out split")
    stages = schedule.stages()
    _emit(progress, phase="prepare", stage_index=0, stage_count=len(stages), stage_name="preparing data",
          step=0, total_steps=0, global_step=0, global_total_steps=0, loss=None, eta_s=None)

    tokenizer, model = _load_base(job)
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
    check_lengths(encoded, limit, "schedule.max_length or the model's context")
    if test and job.evaluation.enabled:
        full = [encode_prompt(tokenizer, i, builder.layout.full_prompt(slot_values(job.template, r)))
                for i, r in enumerate(test)]
        check_lengths({"held-out full prompt": full}, context - job.evaluation.max_new_tokens,
                      "the model's context minus evaluation.max_new_tokens; test rows")
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
        _emit(progress, phase="train", stage_index=stage, stage_count=len(stages), stage_name=stages[stage].name,
              step=step, total_steps=steps, global_step=gstep, global_total_steps=gtotal, loss=loss, eta_s=eta)

    train_started, cpu_started = time.monotonic(), time.process_time()
    results = train_stages(
        peft_model, schedule, stages, [encoded[s.name] for s in stages], pad_id=pad_id,
        on_step=on_step, show_progress=job.show_progress,
    )
    training_seconds = time.monotonic() - train_started
    training_cpu_seconds = time.process_time() - cpu_started

    evaluation = None
    if test and job.evaluation.enabled:
        evaluation = evaluate_job(
            job, peft_model, tokenizer, builder.layout, test, adapter_key=data + schedule.digest(), progress=progress
        )

    _emit(progress, phase="save", stage_index=len(stages) - 1, stage_count=len(stages), stage_name="saving",
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
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": _environment(),
    }
    manifest["total_seconds"] = round(time.monotonic() - started, 2)
    save_adapter(peft_model, job, manifest)
    _emit(progress, phase="done", stage_index=len(stages) - 1, stage_count=len(stages), stage_name="done",
          step=0, total_steps=0, global_step=0, global_total_steps=0, loss=None, eta_s=0.0)
    return manifest


def save_adapter(peft_model: Any, job: TrainJob, manifest: dict[str, Any]) -> None:
    """Write adapter files and manifest into a temporary sibling, then rename it to `out_dir`."""
    out = Path(job.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-tmp-", dir=out.parent))
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
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def evaluate_job(
    job: TrainJob, model: Any, tokenizer: Any, layout: PromptLayout, test: Sequence[Row], *, adapter_key: str | None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> dict[str, Any]:
    """Every condition on the held-out rows; base-model conditions come from the cache when possible.

    With `adapter_key` None the model is the bare base model and only base conditions run.
    """
    opts = job.evaluation
    values = [slot_values(job.template, r) for r in test]
    refs = [[r[RESPONSE], *r.get(REFERENCES, [])] for r in test]
    n_full = len(test) if opts.full_prompt_limit is None else min(len(test), opts.full_prompt_limit)
    inputs = {
        "full_prompt": [prompt_text(tokenizer, layout.full_prompt(v)) for v in values[:n_full]],
        "bare": [prompt_text(tokenizer, layout.bare(v)) for v in values],
    }
    cache = store.EvalCache(job.cache_dir / "eval" if job.cache_dir else None)
    base_id = store.base_model_identity(job.base_model_dir, job.served_model_name)
    wanted: list[tuple[str, str]] = [("base", "full_prompt"), ("base", "bare")]
    if adapter_key is not None:
        wanted.append(("adapter", "bare"))
    if adapter_key is not None and job.schedule.inference == "full_prompt":
        wanted.append(("adapter", "full_prompt"))
    conditions: dict[str, Any] = {}
    for side, kind in wanted:
        prompts = inputs[kind]
        wanted_refs = refs[: len(prompts)]
        key = store.stable_hash({
            "v": 1, "side": side, "kind": kind, "prompts": prompts, "refs": wanted_refs,
            "base": base_id, "max_new_tokens": opts.max_new_tokens,
            "adapter": adapter_key if side == "adapter" else None,
        })
        result = cache.get(key)
        if result is not None and side == "base":
            result["cached"] = True
        else:
            name = condition_name(side, kind)  # type: ignore[arg-type]

            def tick(done: int, total: int = len(prompts), name: str = name) -> None:
                _emit(progress, phase="evaluate", stage_index=0, stage_count=0, stage_name=f"evaluating {name}",
                      step=done, total_steps=total, global_step=0, global_total_steps=0, loss=None, eta_s=None)

            result = _run_condition(
                model, tokenizer, prompts, wanted_refs, opts, base=side == "base" and adapter_key is not None,
                label=f"eval {name}", show=job.show_progress, on_item=tick,
            )
            cache.put(key, result)
            result["cached"] = False
        if kind == "bare" and n_full < len(test):
            result["on_full_prompt_subset"] = subset_figures(result, refs, n_full)
        conditions[condition_name(side, kind)] = manifest_view(result, wanted_refs)  # type: ignore[arg-type]
    evaluation = {
        "metric": "exact match (whitespace-normalised, any reference) and sacrebleu corpus BLEU",
        "decoding": f"greedy, max_new_tokens={opts.max_new_tokens}, batch 1, no prefix caching",
        "rows": len(test),
        "full_prompt_subset": n_full if n_full < len(test) else None,
        "conditions": conditions,
    }
    evaluation["table"] = format_table(evaluation)
    return evaluation


def _run_condition(
    model: Any, tokenizer: Any, prompts: Sequence[str], refs: Sequence[Sequence[str]], opts: EvalOptions,
    *, base: bool, label: str, show: bool, on_item: Callable[[int], None],
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    with tqdm(total=len(prompts), desc=label, unit="req", disable=not show) as bar:

        def step(done: int) -> None:
            bar.update(1)
            on_item(done)

        if not base:
            return run_condition(model, tokenizer, prompts, refs, max_new_tokens=opts.max_new_tokens, on_item=step)
        with model.disable_adapter():
            return run_condition(model, tokenizer, prompts, refs, max_new_tokens=opts.max_new_tokens, on_item=step)


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
