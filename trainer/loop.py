"""The optimisation loop: one LoRA adapter, one optimiser and one learning-rate curve across stages.

Loss is the mean cross-entropy over response tokens only (or, with the `kl` objective, the mean KL divergence from
the full-prompt base model's next-token distributions at those tokens). Rows of a batch that start with the same
tokens (the instructions, or the whole registered prompt) share one forward pass of that prefix:
its keys and values are computed once, broadcast to the batch, and gradients flow back through
them, which gives the same loss and gradients as running each row in full at a fraction of the
cost of long prompts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import (
    DynamicCache,
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
)

from trainer.dataset import Encoded
from trainer.schedule import ProgressiveSchedule, Stage

MIN_SHARED_PREFIX = 16


@dataclass
class StageResult:
    stage: Stage
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


StepCallback = Callable[[int, int, int, int, int, float, float | None], None]
"""(stage index, step in stage, steps in stage, global step, global steps, loss, eta seconds)"""


def plan_batches(n_items: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """`steps` batches drawn from seeded permutations of the items, epoch after epoch."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    need = steps * batch_size
    while len(order) < need:
        order += torch.randperm(n_items, generator=gen).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def shared_prefix_len(items: Sequence[Encoded]) -> int:
    """Tokens every item starts with, stopping before any target token is predicted."""
    if len(items) < 2:
        return 0
    first = items[0].input_ids
    limit = min(e.prompt_len for e in items) - 1
    n = 0
    while n < limit and all(e.input_ids[n] == first[n] for e in items):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def micro_cost(items: Sequence[Encoded]) -> int:
    """Tokens one forward pass processes (shared prefix once, the rest padded per row)."""
    prefix = shared_prefix_len(items)
    longest = max(len(e.input_ids) for e in items)
    return prefix + len(items) * (longest - prefix)


def plan_micro_batches(items: Sequence[Encoded], max_tokens: int) -> list[list[Encoded]]:
    micro: list[list[Encoded]] = []
    current: list[Encoded] = []
    for e in items:
        if current and micro_cost([*current, e]) > max_tokens:
            micro.append(current)
            current = []
        current.append(e)
    if current:
        micro.append(current)
    return micro


def micro_loss_sum(model: Any, items: Sequence[Encoded], pad_id: int) -> torch.Tensor:
    """Summed cross-entropy over the target tokens of `items` (a differentiable scalar)."""
    logits, targets = target_logits(model, items, pad_id)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def micro_kl_sum(model: Any, items: Sequence[Encoded], teacher: Mapping[int, Encoded], pad_id: int) -> torch.Tensor:
    """Summed KL(teacher || student) over the target tokens of `items` (prompt baking): the student is the model
    with its adapter reading each item's stage input, the teacher the same model with the adapter off reading the
    row's full prompt (`teacher[item.row]`, the same answer tokens after it)."""
    student, targets = target_logits(model, items, pad_id)
    with torch.no_grad(), model.disable_adapter():
        taught, teacher_targets = target_logits(model, [teacher[e.row] for e in items], pad_id)
    if not torch.equal(targets, teacher_targets):
        raise ValueError("the teacher's answer tokens differ from the student's: cannot distil token by token")
    return torch.nn.functional.kl_div(torch.log_softmax(student, dim=-1), torch.log_softmax(taught, dim=-1),
                                      log_target=True, reduction="sum")


def target_logits(model: Any, items: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits predicting each target token of `items` (rows: targets in order) and those target ids."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, base.base_model_prefix)
    head = base.get_output_embeddings()
    prefix = shared_prefix_len(items)
    width = max(len(e.input_ids) for e in items) - prefix
    batch = len(items)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, prefix + width), dtype=torch.long)
    for b, e in enumerate(items):
        tail = e.input_ids[prefix:]
        ids[b, : len(tail)] = torch.tensor(tail)
        mask[b, : prefix + len(tail)] = 1
    kwargs: dict[str, Any] = {}
    if prefix:
        past = decoder(input_ids=torch.tensor([items[0].input_ids[:prefix]]), use_cache=True).past_key_values
        cache = DynamicCache(config=base.config)
        for i, layer in enumerate(past.layers):
            cache.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), i)
        kwargs = {
            "past_key_values": cache,
            "position_ids": torch.arange(prefix, prefix + width).unsqueeze(0).expand(batch, -1),
        }
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=bool(prefix), **kwargs).last_hidden_state
    rows, cols, targets = [], [], []
    for b, e in enumerate(items):
        for t in range(e.prompt_len, len(e.input_ids)):
            rows.append(b)
            cols.append(t - 1 - prefix)
            targets.append(e.input_ids[t])
    logits = head(hidden[torch.tensor(rows), torch.tensor(cols)]).float()
    return logits, torch.tensor(targets)


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: ProgressiveSchedule, total_steps: int) -> LambdaLR:
    """transformers' scheduler for the schedule's curve, one optimiser update per step.

    Warm-up rises linearly to the peak over `warmup_steps` updates, starting at lr / (warmup + 1) rather
    than at 0 (transformers' convention spends the first update at lr 0): the scheduler starts one step
    in (`last_epoch=0`). The decay then reaches `min_lr_ratio` of the peak exactly at the last update.
    """
    warmup = min(schedule.warmup_steps, max(total_steps - 1, 0)) + 1  # counted from the shifted start
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # what a scheduler started at last_epoch=0 decays from
    low = schedule.min_lr_ratio
    if schedule.lr_scheduler == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total_steps, min_lr_rate=low, last_epoch=0)
    if schedule.lr_scheduler == "linear" and total_steps > warmup and low < 1.0:
        return get_polynomial_decay_schedule_with_warmup(
            optimizer, warmup, total_steps, lr_end=schedule.learning_rate * low, power=1.0, last_epoch=0)
    return get_constant_schedule_with_warmup(optimizer, warmup, last_epoch=0)


def train_stages(
    model: Any,
    schedule: ProgressiveSchedule,
    stages: Sequence[Stage],
    encoded: Sequence[Sequence[Encoded]],
    *,
    pad_id: int,
    on_step: StepCallback | None = None,
    show_progress: bool = False,
    teacher: Mapping[int, Encoded] | None = None,
) -> list[StageResult]:
    """Run every stage in order on the same adapter, optimiser and learning-rate curve. With `teacher` (each
    training row's full prompt and answer, by row), the loss is the KL objective (`micro_kl_sum`)."""
    n_rows = len(encoded[0]) if encoded else 0
    plans: list[list[list[list[Encoded]]]] = []
    for stage, items in zip(stages, encoded, strict=True):
        steps = stage.num_steps(n_rows, schedule.batch_size)
        size = min(schedule.batch_size, len(items))
        batches = plan_batches(len(items), steps, size, schedule.seed + 1000 * stage.index)
        plans.append([plan_micro_batches([items[i] for i in b], schedule.max_batch_tokens) for b in batches])
    step_costs = [[sum(micro_cost(m) for m in step) for step in plan] for plan in plans]
    total_cost = sum(sum(c) for c in step_costs)
    total_steps = sum(len(p) for p in plans)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.learning_rate, weight_decay=schedule.weight_decay)
    scheduler = lr_scheduler(optimizer, schedule, total_steps)
    model.train()
    results: list[StageResult] = []
    done_cost, global_step, started = 0, 0, time.monotonic()
    for stage, plan, costs in zip(stages, plans, step_costs, strict=True):
        result = StageResult(stage=stage, steps=len(plan))
        stage_started = time.monotonic()
        bar = tqdm(total=len(plan), desc=stage.name, unit="step", disable=not show_progress, leave=True)
        for step, (micro_batches, cost) in enumerate(zip(plan, costs, strict=True)):
            n_targets = sum(e.target_len for m in micro_batches for e in m)
            total = 0.0
            for micro in micro_batches:
                summed = (micro_loss_sum(model, micro, pad_id) if teacher is None
                          else micro_kl_sum(model, micro, teacher, pad_id))
                loss = summed / n_targets
                loss.backward()
                total += float(loss.detach())
            if schedule.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, schedule.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            done_cost += cost
            result.losses.append(total)
            result.tokens += cost
            elapsed = time.monotonic() - started
            eta = elapsed * (total_cost - done_cost) / done_cost if done_cost else None
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            bar.update(1)
            if on_step:
                on_step(stage.index, step + 1, len(plan), global_step, total_steps, total, eta)
        bar.close()
        result.seconds = time.monotonic() - stage_started
        results.append(result)
    return results
