"""Schedule logic: stages, rates and k per stage, presets, validation, hashing; the final stage is the
gateway's bare query, token for token."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch

from core.templates import bare_query_messages, parse_template
from tests.trainer_fixtures import EXAMPLES, smollm_dir, tiny_messages, tiny_rows, tiny_tokenizer, trainer_tiny_model
from trainer.dataset import StageBuilder, prompt_text
from trainer.loop import lr_scheduler
from trainer.schedule import (
    MAX_STEP_SCALE,
    MIN_STEP_SCALE,
    PRESET_HELP,
    PRESETS,
    ProgressiveSchedule,
    ScheduleError,
    Stage,
    preset,
    schedule_from_overrides,
)

__all__ = ["smollm_dir", "tiny_tokenizer", "trainer_tiny_model"]


def test_promptintern_preset_stages_fall_to_the_bare_query() -> None:
    stages = preset("promptintern").stages()
    assert [s.kind for s in stages] == ["compressed", "compressed", "compressed", "bare"]
    assert [s.keep_ratio for s in stages] == [1.0, 0.6, 0.3, 0.0]
    assert [s.examples for s in stages] == [4, 2, 1, 0]
    assert [s.index for s in stages] == [0, 1, 2, 3]
    assert stages[-1].name.endswith("bare query")
    assert preset("promptintern").inference == "bare"


def test_baselines_are_schedules_of_the_same_code() -> None:
    total = sum(preset("promptintern").steps_per_stage)
    direct = preset("direct")
    assert [s.kind for s in direct.stages()] == ["bare"]
    assert direct.steps_per_stage == (total,)
    full = preset("full_prompt")
    assert [s.kind for s in full.stages()] == ["full_prompt"]
    assert full.inference == "full_prompt" and full.steps_per_stage == (total,)
    none = preset("none")
    assert none.stages() == [] and not none.trains


def test_custom_rates_and_examples() -> None:
    s = preset("promptintern", keep_ratios=[0.8, 0.5], examples_per_stage=[3, 0], steps_per_stage=[5, 6, 7])
    assert [(st.kind, st.keep_ratio, st.examples, st.steps) for st in s.stages()] == [
        ("compressed", 0.8, 3, 5), ("compressed", 0.5, 0, 6), ("bare", 0.0, 0, 7),
    ]


def test_epochs_per_stage_give_steps_from_the_data_size() -> None:
    s = preset("direct", epochs_per_stage=[2.5])
    (stage,) = s.stages()
    assert stage.steps is None
    assert stage.num_steps(train_rows=100, batch_size=8) == 32  # ceil(2.5 * 100 / 8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"keep_ratios": [0.3, 0.6], "examples_per_stage": [1, 1], "steps_per_stage": [1, 1, 1]}, "must not increase"),
        ({"keep_ratios": [1.0, 0.0], "examples_per_stage": [1, 0], "steps_per_stage": [1, 1, 1]}, "(0, 1]"),
        ({"examples_per_stage": [1, 2, 4]}, "must not increase"),
        ({"examples_per_stage": [4, 2]}, "one entry per compressed stage"),
        ({"steps_per_stage": [10, 10]}, "steps_per_stage needs 4 entries"),
        ({"steps_per_stage": [10, 0, 10, 10]}, ">= 1"),
        ({"full_prompt": True}, "full_prompt trains on the registered prompt only"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lr_scheduler": "exponential"}, "lr_scheduler"),
        ({"retrieval": "tfidf"}, "retrieval"),
        ({"epochs_per_stage": [1.0]}, "epochs_per_stage needs 4 entries"),
        ({"keep_ratios": "1.0"}, "must be a list"),
        ({"no_such_field": 1}, "unknown schedule field"),
    ],
)
def test_post_init_rejects_bad_schedules(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ScheduleError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        preset("promptintern", **overrides)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"batch_size": 0}, "batch_size"), ({"batch_size": 513}, "batch_size"), ({"batch_size": "8"}, "batch_size"),
    ({"batch_size": True}, "batch_size"), ({"batch_size": 2.5}, "batch_size"),
    ({"learning_rate": 0.5}, "learning_rate"), ({"learning_rate": float("nan")}, "learning_rate"),
    ({"learning_rate": "1e-3"}, "learning_rate"), ({"learning_rate": 10**400}, "learning_rate"),
    ({"steps_per_stage": [30_000, 30_000, 1, 1]}, "steps_per_stage"), ({"steps_per_stage": [1, 2.5, 3, 4]},
                                                                       "steps_per_stage"),
    ({"epochs_per_stage": [1, 1, 1, 101]}, "epochs_per_stage"), ({"warmup_steps": 10**9}, "warmup_steps"),
    ({"keep_ratios": [1.0] * 9, "examples_per_stage": [1] * 9, "steps_per_stage": [1] * 10}, "keep_ratios"),
    ({"keep_ratios": [1, "a", 0.3]}, "keep_ratios"), ({"examples_per_stage": [33, 2, 1]}, "examples_per_stage"),
    ({"max_batch_tokens": 10**6}, "max_batch_tokens"), ({"max_length": 10**6}, "max_length"),
    ({"seed": -1}, "seed"), ({"seed": 2**32}, "seed"), ({"bare_stage": "yes"}, "bare_stage"),
    ({"lr_scheduler": None}, "lr_scheduler"), ({"retrieval": ["bm25"]}, "retrieval"),
    ({"steps_reference_rows": -1}, "steps_reference_rows"), ({"lora_alpha": 10**6}, "lora_alpha"),
    ({"preset": 5}, "preset"), ({"preset": "lora"}, "preset"),
])
def test_every_override_is_typed_and_bounded_and_names_its_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        schedule_from_overrides(overrides)
    assert caught.value.field == field and field in str(caught.value) and len(str(caught.value)) < 200


def test_whole_floats_count_as_integers_and_integers_as_floats() -> None:
    s = schedule_from_overrides({"batch_size": 4.0, "weight_decay": 1, "steps_per_stage": [1, 2, 3, 4.0]})
    assert (s.batch_size, s.weight_decay, s.steps_per_stage) == (4, 1.0, (1, 2, 3, 4))
    assert isinstance(s.batch_size, int) and isinstance(s.weight_decay, float)


def test_default_steps_scale_with_the_training_rows() -> None:
    s = preset("promptintern")
    assert s.steps_reference_rows == 200
    per_stage = {rows: [st.num_steps(rows, s.batch_size) for st in s.stages()] for rows in (200, 400, 100)}
    assert per_stage == {200: [30, 30, 30, 70], 400: [60, 60, 60, 140], 100: [15, 15, 15, 35]}
    assert s.total_steps(10) == s.total_steps(200 * MIN_STEP_SCALE) == 42  # clamped: 1/4 of 160, per stage
    assert s.total_steps(10**6) == s.total_steps(int(200 * MAX_STEP_SCALE)) == 1280
    for rows in (20, 77, 206, 999, 5000):  # the baselines keep the same budget at any size (per-stage rounding)
        assert abs(preset("direct").total_steps(rows) - s.total_steps(rows)) <= 2
        assert abs(preset("full_prompt").total_steps(rows) - s.total_steps(rows)) <= 2


def test_steps_a_caller_gives_are_literal_unless_they_ask_for_scaling() -> None:
    literal = preset("promptintern", steps_per_stage=[5, 6, 7, 8])
    assert literal.steps_reference_rows == 0 and literal.total_steps(10_000) == 26
    scaled = preset("promptintern", steps_per_stage=[5, 6, 7, 8], steps_reference_rows=100)
    assert [st.num_steps(200, 8) for st in scaled.stages()] == [10, 12, 14, 16]
    assert preset("direct", epochs_per_stage=[2.0]).total_steps(80) == 20  # epochs: ceil(2 * 80 / 8)


def test_demo_preset_is_short_fixed_and_says_it_is_demo_quality() -> None:
    demo = preset("demo")
    assert [s.kind for s in demo.stages()] == ["compressed", "bare"]
    assert demo.total_steps(20) == demo.total_steps(206) == demo.total_steps(10_000) == sum(demo.steps_per_stage)
    assert demo.total_steps(206) * demo.batch_size < preset("promptintern").total_steps(206) * 8 / 4
    assert demo.inference == "bare" and demo.name == "demo"
    assert "demo quality" in PRESET_HELP["demo"] and "3 minutes" in PRESET_HELP["demo"]
    assert set(PRESETS) == set(PRESET_HELP) and "demo" in PRESETS
    assert schedule_from_overrides({"preset": "demo"}) == demo


def test_unknown_preset() -> None:
    with pytest.raises(ScheduleError, match="unknown schedule"):
        preset("lora")


def test_every_field_has_a_default_and_help() -> None:
    for f in fields(ProgressiveSchedule):
        assert f.metadata.get("help"), f.name
    ProgressiveSchedule()  # every field defaulted


def test_hash_is_stable_ignores_the_label_and_follows_the_fields() -> None:
    a = preset("promptintern")
    assert a.digest() == preset("promptintern").digest()
    assert a.digest() == ProgressiveSchedule.from_dict({"name": "renamed"}).digest()
    assert a.digest() != preset("promptintern", learning_rate=5e-4).digest()
    assert preset("direct").digest() != a.digest()
    assert ProgressiveSchedule.from_dict(a.to_dict()) == a


def test_stage_names_say_what_they_feed() -> None:
    assert Stage(0, "compressed", 0.6, 2, 10, None).name == "stage 1: template 60% + 2 examples"
    assert Stage(1, "compressed", 0.3, 1, 10, None).name == "stage 2: template 30% + 1 example"
    assert Stage(0, "full_prompt", 1.0, -1, 10, None).name == "stage 1: full prompt"


@pytest.mark.parametrize(
    "template_kw",
    [
        {"messages": tiny_messages()},
        {"messages": [{"role": "system", "content": "Translate {source} to {target}."},
                      {"role": "user", "content": "Text: {text}"}]},
        {"prompt": "Answer briefly.\nQ: {query}\nA:"},
    ],
)
def test_final_stage_is_exactly_the_gateways_bare_query(template_kw: dict[str, Any], tiny_tokenizer: Any) -> None:
    template = parse_template(**template_kw)
    rows = [{**{s: f"{s} value {i}" for s in template.slots}, "response": f"answer {i}"} for i in range(3)]
    builder = StageBuilder(template, [], rows, compressor=None, retrieval="bm25", max_examples=0)
    bare = preset("direct").stages()[0]
    encoded = builder.encode_stage(bare, tiny_tokenizer, list(range(len(rows))))
    for row, enc in zip(rows, encoded, strict=True):
        values = {s: row[s] for s in template.slots}
        expected = tiny_tokenizer.apply_chat_template(
            bare_query_messages(template, values), add_generation_prompt=True, tokenize=False
        )
        assert prompt_text(tiny_tokenizer, builder.render(bare, rows.index(row))) == expected
        expected_ids = tiny_tokenizer(expected, add_special_tokens=False)["input_ids"]
        assert list(enc.input_ids[: enc.prompt_len]) == expected_ids
        target = tiny_tokenizer.decode(enc.input_ids[enc.prompt_len :])
        assert target == row["response"] + tiny_tokenizer.eos_token


def test_full_prompt_stage_is_the_registered_prompt(tiny_tokenizer: Any) -> None:
    template = parse_template(messages=tiny_messages())
    rows = tiny_rows()[:2]
    builder = StageBuilder(template, EXAMPLES, rows, compressor=None, retrieval="bm25", max_examples=0)
    stage = preset("full_prompt").stages()[0]
    for i, row in enumerate(rows):
        assert builder.render(stage, i) == template.render({"query": row["query"]})


def test_smollm_chat_template_is_what_the_tiny_model_carries(trainer_tiny_model: Path, smollm_dir: Path) -> None:
    assert (trainer_tiny_model / "tokenizer.json").read_bytes() == (smollm_dir / "tokenizer.json").read_bytes()


def test_schedule_from_a_rest_train_object() -> None:
    assert schedule_from_overrides(None) == preset("promptintern")
    s = schedule_from_overrides({"preset": "direct", "steps_per_stage": [12], "learning_rate": 3e-4})
    assert (s.name, s.steps_per_stage, s.learning_rate) == ("direct", (12,), 3e-4)
    with pytest.raises(ScheduleError, match="unknown schedule field"):
        schedule_from_overrides({"stepz": 3})
    with pytest.raises(ScheduleError, match="unknown schedule"):
        schedule_from_overrides({"preset": "magic"})


def documented_lr_factor(schedule: ProgressiveSchedule, total_steps: int, step: int) -> float:
    """The curve the schedule's fields describe, written out: the reference for transformers' schedulers."""
    warmup = min(schedule.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule.lr_scheduler == "constant" or total_steps <= warmup + 1:
        return 1.0
    progress = (step - warmup) / (total_steps - warmup - 1)
    low = schedule.min_lr_ratio
    if schedule.lr_scheduler == "linear":
        return 1.0 - (1.0 - low) * progress
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,total,low", [(10, 160, 0.1), (0, 5, 0.0), (3, 4, 0.5), (50, 11, 0.1), (2, 1, 0.1),
                                              (4, 30, 1.0)])
def test_learning_rate_per_step_follows_the_documented_curve(kind: Any, warmup: int, total: int, low: float) -> None:
    schedule = ProgressiveSchedule(lr_scheduler=kind, warmup_steps=warmup, min_lr_ratio=low, learning_rate=2e-3)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=schedule.learning_rate)
    scheduler = lr_scheduler(optimizer, schedule, total)
    used = []
    for _ in range(total):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [schedule.learning_rate * documented_lr_factor(schedule, total, i) for i in range(total)]
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert used[0] == pytest.approx(schedule.learning_rate / (min(warmup, total - 1) + 1))  # never a step at lr 0
    if kind != "constant" and total > warmup + 1:
        assert used[-1] == pytest.approx(schedule.learning_rate * low)  # the floor, at the last update
