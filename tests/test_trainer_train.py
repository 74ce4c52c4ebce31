"""Real training runs on a tiny model: LoRA weights change and loss falls, the adapter round-trips
through PEFT, the shared-prefix forward matches the plain one, and bad input fails before training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from core.templates import bare_query_messages, parse_template
from tests.trainer_fixtures import (
    EXAMPLES,
    SERVED,
    smollm_dir,
    tiny_messages,
    tiny_rows,
    tiny_tokenizer,
    trainer_tiny_model,
)
from trainer.cache import find_cached_adapter
from trainer.data import TrainDataError, validate_rows
from trainer.dataset import StageBuilder
from trainer.evaluate import EvalOptions, score
from trainer.job import TrainCancelled, TrainJob, TrainProgress, adapter_cache_key_for
from trainer.schedule import ScheduleError, preset
from trainer.train import train_prompt

__all__ = ["smollm_dir", "tiny_tokenizer", "trainer_tiny_model"]
TEMPLATE = parse_template(messages=tiny_messages())


def make_job(base: Path, out: Path, **kw: Any) -> TrainJob:
    values: dict[str, Any] = dict(
        name="tiny", template=TEMPLATE, rows=validate_rows(TEMPLATE, tiny_rows()), examples=EXAMPLES,
        out_dir=out, base_model_dir=base, served_model_name=SERVED,
        schedule=preset("promptintern", steps_per_stage=[2, 2, 2, 3], batch_size=4, retrieval="bm25"),
        eval_fraction=0.25, evaluation=EvalOptions(max_new_tokens=4), cache_dir=out.parent.parent / ".cache",
    )
    values.update(kw)
    return TrainJob(**values)


def _lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_training_changes_lora_weights_and_lowers_the_loss(trainer_tiny_model: Path, tmp_path: Path) -> None:
    schedule = preset("direct", steps_per_stage=[30], batch_size=4, learning_rate=2e-2, warmup_steps=0,
                      lr_scheduler="constant", lora_dropout=0.0)
    rows = validate_rows(TEMPLATE, tiny_rows()[:4])
    job = make_job(trainer_tiny_model, tmp_path / "a" / "v1", rows=rows, schedule=schedule,
                   evaluation=EvalOptions(enabled=False))
    manifest = train_prompt(job)
    losses = manifest["stages"][0]["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    assert losses[-1] < losses[0]
    tensors = _lora_tensors(job.out_dir)
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # LoRA B starts at zero

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(schedule.seed)  # the trainer's own initialisation, rebuilt
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(trainer_tiny_model), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    initial = {k.replace(".default", ""): v for k, v in fresh.state_dict().items() if "lora_A" in k}
    assert initial and set(initial) <= set(tensors)
    assert all(not torch.allclose(initial[k], tensors[k]) for k in initial)
    assert {k.split(".")[-2] for k in tensors} == {"lora_A", "lora_B"}
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_progressive_run_writes_adapter_and_manifest(trainer_tiny_model: Path, tmp_path: Path) -> None:
    seen: list[TrainProgress] = []
    out = tmp_path / "adapters" / "tiny" / "v1"
    manifest = train_prompt(make_job(trainer_tiny_model, out), progress=seen.append)

    files = sorted(p.name for p in out.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    assert [p.name for p in out.parent.iterdir()] == ["v1"]  # no temporary folder left behind
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SERVED
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert json.loads((out / "manifest.json").read_text()) == manifest

    assert manifest["prompt_hash"] == TEMPLATE.digest()
    assert manifest["base_model"] == SERVED and manifest["inference"] == "bare"
    assert manifest["schedule"]["hash"] == make_job(trainer_tiny_model, out).schedule.digest()
    assert [s["kind"] for s in manifest["stages"]] == ["compressed", "compressed", "compressed", "bare"]
    means = [s["mean_input_tokens"] for s in manifest["stages"]]
    assert means == sorted(means, reverse=True)  # inputs shrink stage by stage
    assert manifest["train_rows"] == 12 and manifest["eval_rows"] == 4
    assert len(manifest["data_hash"]) == 64 and manifest["training_seconds"] > 0
    assert manifest["cache_key"] == adapter_cache_key_for(make_job(trainer_tiny_model, out.parent / "v9"))
    assert find_cached_adapter(out.parent, manifest["cache_key"]) == out
    assert find_cached_adapter(out.parent, "other") is None

    evaluation = manifest["evaluation"]
    assert set(evaluation["conditions"]) == {"base+full_prompt", "base+bare", "adapter+bare"}
    full, bare = evaluation["conditions"]["base+full_prompt"], evaluation["conditions"]["base+bare"]
    assert full["n"] == bare["n"] == 4
    assert full["input_tokens"] > 2 * bare["input_tokens"]
    for c in evaluation["conditions"].values():
        assert {"exact_match", "bleu", "input_tokens", "latency_s", "samples"} <= set(c)
    assert "base+full_prompt" in evaluation["table"]

    phases = [p.phase for p in seen]
    assert phases[0] == "prepare" and phases[-1] == "done" and "evaluate" in phases
    steps = [p for p in seen if p.phase == "train"]
    assert len(steps) == 9 and steps[-1].global_step == steps[-1].global_total_steps == 9
    assert steps[-1].eta_s == pytest.approx(0.0) and all(p.loss is not None for p in steps)
    assert [p.stage_index for p in steps] == [0, 0, 1, 1, 2, 2, 3, 3, 3]

    # A second run of the same data reuses the cached base-model evaluations.
    again = train_prompt(make_job(trainer_tiny_model, out.parent / "v2", schedule=preset(
        "direct", steps_per_stage=[2], batch_size=4)))
    assert again["evaluation"]["conditions"]["base+bare"]["cached"] is True
    assert again["evaluation"]["conditions"]["adapter+bare"]["cached"] is False
    with pytest.raises(FileExistsError):
        train_prompt(make_job(trainer_tiny_model, out))


def test_full_prompt_baseline_is_evaluated_with_the_full_prompt(trainer_tiny_model: Path, tmp_path: Path) -> None:
    job = make_job(trainer_tiny_model, tmp_path / "fp" / "v1",
                   schedule=preset("full_prompt", steps_per_stage=[2], batch_size=4),
                   evaluation=EvalOptions(max_new_tokens=3, full_prompt_limit=2))
    manifest = train_prompt(job)
    assert manifest["inference"] == "full_prompt"
    conditions = manifest["evaluation"]["conditions"]
    assert conditions["adapter+full_prompt"]["n"] == 2 and conditions["adapter+bare"]["n"] == 4
    assert manifest["evaluation"]["full_prompt_subset"] == 2
    assert conditions["adapter+bare"]["on_full_prompt_subset"]["n"] == 2


def test_adapter_round_trip_with_peft(trainer_tiny_model: Path, tmp_path: Path, tiny_tokenizer: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "rt" / "v1"
    train_prompt(make_job(trainer_tiny_model, out, evaluation=EvalOptions(enabled=False),
                          schedule=preset("direct", steps_per_stage=[3], batch_size=4, learning_rate=1e-2)))
    base = AutoModelForCausalLM.from_pretrained(trainer_tiny_model)
    prompt = tiny_tokenizer.apply_chat_template(
        bare_query_messages(TEMPLATE, {"query": "print the date"}), add_generation_prompt=True, tokenize=False
    )
    ids = tiny_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**ids).logits
    model = PeftModel.from_pretrained(base, str(out))
    model.eval()
    saved = _lora_tensors(out)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    with torch.no_grad():
        assert not torch.allclose(model(**ids).logits, base_logits)
        generated = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tiny_tokenizer.eos_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]


def test_shared_prefix_forward_equals_the_plain_one(trainer_tiny_model: Path, tiny_tokenizer: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import trainer.loop as loop

    rows = validate_rows(TEMPLATE, tiny_rows()[:4])
    builder = StageBuilder(TEMPLATE, EXAMPLES, rows, compressor=None, retrieval="bm25", max_examples=0)
    items = builder.encode_stage(preset("full_prompt").stages()[0], tiny_tokenizer, range(4))  # type: ignore[arg-type]
    assert loop.shared_prefix_len(items) > 50
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(trainer_tiny_model),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False),
    )

    def loss_and_grads() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = loop.micro_loss_sum(model, items, tiny_tokenizer.eos_token_id)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    shared_loss, shared_grads = loss_and_grads()
    assert loop.micro_cost(items) < len(items) * max(len(e.input_ids) for e in items)
    monkeypatch.setattr(loop, "MIN_SHARED_PREFIX", 10**9)
    assert loop.shared_prefix_len(items) == 0
    plain_loss, plain_grads = loss_and_grads()
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5)
    for a, b in zip(shared_grads, plain_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


def test_rows_too_long_for_the_context_fail_before_training(trainer_tiny_model: Path, tmp_path: Path) -> None:
    rows = validate_rows(TEMPLATE, [*tiny_rows(), {"query": "word " * 2000, "response": "x"}])
    job = make_job(trainer_tiny_model, tmp_path / "long" / "v1", rows=rows, eval_fraction=0.0)
    with pytest.raises(TrainDataError, match=r"1 row\(s\) too long: row 16 \("):
        train_prompt(job)
    short = make_job(trainer_tiny_model, tmp_path / "short" / "v1", eval_fraction=0.0,
                     schedule=preset("direct", steps_per_stage=[1], max_length=40, max_batch_tokens=40))
    with pytest.raises(TrainDataError, match=r"schedule\.max_length"):
        train_prompt(short)
    assert not (tmp_path / "long").exists() and not (tmp_path / "short").exists()


def test_bad_examples_and_empty_schedules(trainer_tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainDataError, match="does not appear verbatim"):
        train_prompt(make_job(trainer_tiny_model, tmp_path / "x" / "v1",
                              examples=[{"query": "absent", "response": "nothing"}]))
    with pytest.raises(ScheduleError, match="nothing to train"):
        train_prompt(make_job(trainer_tiny_model, tmp_path / "x" / "v1", schedule=preset("none")))


def test_a_progress_callback_can_cancel_and_nothing_is_written(trainer_tiny_model: Path, tmp_path: Path) -> None:
    def cancel(p: TrainProgress) -> None:
        if p.phase == "train" and p.global_step == 2:
            raise TrainCancelled

    out = tmp_path / "c" / "v1"
    with pytest.raises(TrainCancelled):
        train_prompt(make_job(trainer_tiny_model, out), progress=cancel)
    assert not out.exists()


def test_score_exact_match_and_bleu() -> None:
    figures = score(
        ["ls -l", "grep  -r x src/ | wc -l", "find . -name '*.py' -delete"],
        [["ls -l"], ["nope", "grep -r x src/ | wc -l"], ["find . -name '*.txt' -delete"]],
    )
    assert figures["exact_match"] == pytest.approx(200 / 3)
    assert 0 < figures["bleu"] < 100
    assert score(["a b c d"], [["a b c d"]])["bleu"] == pytest.approx(100.0)


def test_the_kl_objective_is_zero_on_the_teachers_own_input_and_trains_the_bare_query_toward_it(
        trainer_tiny_model: Path, tiny_tokenizer: Any, tmp_path: Path) -> None:
    """Prompt baking: with a no-op adapter (LoRA B at zero) reading the full prompt, the student is the teacher
    (KL 0); reading the bare query it is not (KL > 0, with a gradient); a run with `objective: kl` trains, lowers
    its loss, and records the objective in its schedule (whose hash is unchanged for the default `sft`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import trainer.loop as loop

    rows = validate_rows(TEMPLATE, tiny_rows()[:4])
    builder = StageBuilder(TEMPLATE, EXAMPLES, rows, compressor=None, retrieval="bm25", max_examples=0)
    full = builder.encode_stage(preset("full_prompt").stages()[0], tiny_tokenizer, range(4))  # type: ignore[arg-type]
    bare = builder.encode_stage(preset("direct").stages()[0], tiny_tokenizer, range(4))  # type: ignore[arg-type]
    teacher = {e.row: e for e in full}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(trainer_tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    pad = tiny_tokenizer.eos_token_id
    assert float(loop.micro_kl_sum(model, full, teacher, pad)) == pytest.approx(0.0, abs=1e-4)
    kl = loop.micro_kl_sum(model, bare, teacher, pad)
    assert float(kl) > 1e-3
    kl.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)

    schedule = preset("demo", steps_per_stage=[3, 12], batch_size=4, learning_rate=2e-2, warmup_steps=0,
                      lr_scheduler="constant", lora_dropout=0.0, retrieval="bm25", objective="kl")
    assert schedule.digest() != preset("demo").digest()
    assert preset("demo", objective="sft").digest() == preset("demo").digest()
    job = make_job(trainer_tiny_model, tmp_path / "kl" / "v1", rows=rows, schedule=schedule,
                   evaluation=EvalOptions(enabled=False))
    manifest = train_prompt(job)
    assert manifest["schedule"]["objective"] == "kl"
    losses = manifest["stages"][-1]["losses"]
    assert all(loss >= 0 for loss in losses) and sum(losses[-3:]) < sum(losses[:3])
