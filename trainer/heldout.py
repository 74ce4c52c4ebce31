"""Held-out evaluation of a training job: which conditions run, on which inputs, with cached base figures.

`evaluate.py` measures one condition (greedy generation, exact match and BLEU); this module decides
what a job's manifest compares: the base model with the full prompt and with the bare query, the new
adapter with the bare query (and with the full prompt for the full-prompt baseline). Base-model
conditions do not depend on the adapter, so they come from the evaluation cache when possible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from trainer import cache as store
from trainer.data import REFERENCES, RESPONSE, Row, TrainDataError, slot_values, validate_examples
from trainer.dataset import check_lengths, encode_prompt, prompt_text
from trainer.evaluate import (
    EvalOptions,
    InputSide,
    ModelSide,
    condition_name,
    format_table,
    manifest_view,
    run_condition,
    subset_figures,
)
from trainer.job import ProgressCallback, TrainJob, emit, load_base, split_job_rows
from trainer.prompting import PromptLayout


def check_held_out_lengths(job: TrainJob, tokenizer: Any, layout: PromptLayout, test: Sequence[Row],
                           context: int) -> None:
    """Fail before training when a held-out full prompt plus its answer cannot fit the model's context."""
    if not test or not job.evaluation.enabled:
        return
    full = [encode_prompt(tokenizer, i, layout.full_prompt(slot_values(job.template, r))) for i, r in enumerate(test)]
    check_lengths({"held-out full prompt": full}, context - job.evaluation.max_new_tokens,
                  "the model's context minus evaluation.max_new_tokens; test rows")


def evaluate_base(job: TrainJob) -> dict[str, Any]:
    """The no-fine-tuning baseline: base model with the full prompt and with the bare query."""
    _, _, test = split_job_rows(job)
    if not test:
        raise TrainDataError("nothing to evaluate: no held-out rows (set eval_fraction or test rows)")
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    tokenizer, model = load_base(job)
    layout = PromptLayout.build(job.template, validate_examples(job.template, job.examples))
    return evaluate_job(job, model, tokenizer, layout, test, adapter_key=None)


def evaluate_job(
    job: TrainJob, model: Any, tokenizer: Any, layout: PromptLayout, test: Sequence[Row], *, adapter_key: str | None,
    progress: ProgressCallback | None = None, predictions: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Every condition on the held-out rows; base-model conditions come from the cache when possible.

    With `adapter_key` None the model is the bare base model and only base conditions run. `predictions`, when
    given, receives each condition's answers by name (the promotion gate reuses the adapter's).
    """
    opts = job.evaluation
    values = [slot_values(job.template, r) for r in test]
    refs = [[r[RESPONSE], *r.get(REFERENCES, [])] for r in test]
    n_full = len(test) if opts.full_prompt_limit is None else min(len(test), opts.full_prompt_limit)
    inputs: dict[InputSide, list[str]] = {
        "full_prompt": [prompt_text(tokenizer, layout.full_prompt(v)) for v in values[:n_full]],
        "bare": [prompt_text(tokenizer, layout.bare(v)) for v in values],
    }
    cache = store.EvalCache(job.cache_dir / "eval" if job.cache_dir else None)
    base_id = store.base_model_identity(job.base_model_dir, job.served_model_name)
    wanted: list[tuple[ModelSide, InputSide]] = [("base", "full_prompt"), ("base", "bare")]
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
            name = condition_name(side, kind)

            def tick(done: int, total: int = len(prompts), name: str = name) -> None:
                emit(progress, phase="evaluate", stage_index=0, stage_count=0, stage_name=f"evaluating {name}",
                     step=done, total_steps=total, global_step=0, global_total_steps=0, loss=None, eta_s=None)

            result = _run_condition(
                model, tokenizer, prompts, wanted_refs, opts, base=side == "base" and adapter_key is not None,
                label=f"eval {name}", show=job.show_progress, on_item=tick,
            )
            cache.put(key, result)
            result["cached"] = False
        if kind == "bare" and n_full < len(test):
            result["on_full_prompt_subset"] = subset_figures(result, refs, n_full)
        conditions[condition_name(side, kind)] = manifest_view(result, wanted_refs)
        if predictions is not None:
            predictions[condition_name(side, kind)] = list(result["predictions"])
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
    """One condition with a progress bar; `base` runs the base model under a PEFT model's adapter."""
    from tqdm.auto import tqdm

    with tqdm(total=len(prompts), desc=label, unit="req", disable=not show) as bar:

        def step(done: int) -> None:
            bar.update(1)
            on_item(done)

        if not base:
            return run_condition(model, tokenizer, prompts, refs, max_new_tokens=opts.max_new_tokens, on_item=step)
        with model.disable_adapter():
            return run_condition(model, tokenizer, prompts, refs, max_new_tokens=opts.max_new_tokens, on_item=step)
