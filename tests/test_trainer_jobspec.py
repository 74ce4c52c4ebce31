"""The trainer's boundary with the gateway: submissions checked with domain errors, a JSON job spec in,
an adapter folder and its manifest out (in process and through the training process's entry point)."""

from __future__ import annotations

import ast
import json
import multiprocessing
import queue
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import trainer
from core.errors import InvalidInput
from core.templates import parse_template
from tests.trainer_fixtures import EXAMPLES, SERVED, smollm_dir, tiny_messages, tiny_rows, trainer_tiny_model
from trainer.jobspec import (
    MAX_TRAIN_ROWS,
    ChildMessage,
    JobSpec,
    TrainData,
    TrainResult,
    run,
    run_in_child,
    validate_submission,
)

__all__ = ["smollm_dir", "trainer_tiny_model"]
TEMPLATE = parse_template(messages=tiny_messages())
SCHEDULE = {"preset": "direct", "steps_per_stage": [2], "batch_size": 4, "retrieval": "bm25"}


def make_spec(base: Path, out: Path, **data: Any) -> JobSpec:
    values: dict[str, Any] = {"rows": tiny_rows(), "schedule": SCHEDULE, "eval_fraction": 0.0, **data}
    submitted = validate_submission(TEMPLATE, data=values.pop("rows"), path=None, **values)
    return JobSpec(prompt="tiny", kind=TEMPLATE.kind, template=TEMPLATE.source(), examples=EXAMPLES,
                   data=submitted, out_dir=out, base_model_dir=base, served_model_name=SERVED, threads=1,
                   cache_dir=out.parent.parent / ".cache")


@pytest.mark.parametrize("kwargs,param,code", [
    ({"data": None, "path": None}, "train", "invalid_train_data"),
    ({"data": tiny_rows(), "path": "rows.jsonl"}, "train", "invalid_train_data"),
    ({"data": [], "path": None}, "train.data", "invalid_train_data"),
    ({"data": [{"query": "x"}], "path": None}, "train.data", "invalid_train_data"),
    ({"data": tiny_rows()[:1], "path": None, "eval_fraction": 0.5}, "train.data", "invalid_train_data"),
    ({"data": tiny_rows(), "path": None, "eval_fraction": 1.0}, "train.eval_fraction", "invalid_train_data"),
    ({"data": None, "path": "/nonexistent.jsonl"}, "train.path", "invalid_train_data"),
    ({"data": tiny_rows(), "path": None, "schedule": {"bogus": 1}}, "train.schedule", "invalid_schedule"),
    ({"data": tiny_rows(), "path": None, "schedule": {"learning_rate": -1}}, "train.schedule.learning_rate",
     "invalid_schedule"),
    ({"data": tiny_rows(), "path": None, "schedule": {"learning_rate": 5}}, "train.schedule.learning_rate",
     "invalid_schedule"),
    ({"data": tiny_rows(), "path": None, "schedule": {"batch_size": "8"}}, "train.schedule.batch_size",
     "invalid_schedule"),
    ({"data": tiny_rows(), "path": None, "schedule": {"batch_size": 10_000}}, "train.schedule.batch_size",
     "invalid_schedule"),
    ({"data": tiny_rows(), "path": None, "schedule": {"steps_per_stage": [10**12, 1, 1, 1]}},
     "train.schedule.steps_per_stage", "invalid_schedule"),
    ({"data": tiny_rows(), "path": None, "schedule": {"preset": 3}}, "train.schedule.preset", "invalid_schedule"),
    ({"data": tiny_rows(), "path": None, "schedule": {"preset": "none"}}, "train.schedule", "invalid_schedule"),
    ({"data": [tiny_rows()[0]] * (MAX_TRAIN_ROWS + 1), "path": None}, "train.data", "invalid_train_data"),
])
def test_a_bad_submission_is_invalid_input_naming_the_field(kwargs: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_submission(TEMPLATE, **kwargs)
    assert caught.value.param == param and caught.value.code == code and caught.value.message


def test_epochs_that_add_up_to_too_many_steps_on_the_rows_given_are_refused() -> None:
    rows = [{"query": f"list the files of folder {i}", "response": f"ls dir{i}"} for i in range(600)]
    schedule = {"preset": "direct", "epochs_per_stage": [100], "batch_size": 1}
    with pytest.raises(InvalidInput) as caught:
        validate_submission(TEMPLATE, data=rows, path=None, schedule=schedule, eval_fraction=0.0)
    assert caught.value.param == "train.schedule.epochs_per_stage" and "60000 optimiser steps" in caught.value.message
    schedule["epochs_per_stage"] = [10]
    accepted = validate_submission(TEMPLATE, data=rows, path=None, schedule=schedule, eval_fraction=0.0)
    assert accepted.schedule == schedule and accepted.parsed_schedule().total_steps(len(rows)) == 6000


def test_a_submission_from_a_file_names_the_bad_line(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(tiny_rows()[0]) + "\n{broken\n")
    with pytest.raises(InvalidInput, match="line 2") as caught:
        validate_submission(TEMPLATE, data=None, path=str(rows), param="body")
    assert caught.value.param == "body.path"
    rows.write_text("".join(json.dumps(r) + "\n" for r in tiny_rows()))
    data = validate_submission(TEMPLATE, data=None, path=str(rows))
    assert len(data.rows) == len(tiny_rows()) and data.schedule == {} and data.eval_fraction == 0.2


def test_submitted_data_is_normalised_and_survives_json(tmp_path: Path) -> None:
    data = validate_submission(TEMPLATE, data=[{"query": "print the date\r\n", "response": "date"}, *tiny_rows()],
                               path=None, schedule=SCHEDULE, eval_fraction=0.25)
    assert data.rows[0] == {"query": "print the date", "response": "date", "references": []}
    assert TrainData.model_validate_json(data.model_dump_json()) == data
    assert data.parsed_schedule().name == "direct" and data.parsed_schedule().steps_per_stage == (2,)
    spec = make_spec(tmp_path, tmp_path / "a" / "v1")
    again = JobSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json"))))
    assert again == spec and again.prompt_template().digest() == TEMPLATE.digest()
    job = again.train_job()
    assert job.rows == list(spec.data.rows) and job.schedule.digest() == spec.data.parsed_schedule().digest()
    assert job.evaluation.enabled is False and tuple(job.lora_targets) == tuple(spec.lora_targets)


def test_completion_templates_round_trip(tmp_path: Path) -> None:
    template = parse_template(prompt="Translate to bash.\nInput: {query}\nOutput:")
    data = validate_submission(template, data=tiny_rows(), path=None)
    spec = JobSpec(prompt="c", kind=template.kind, template=template.source(), data=data, out_dir=tmp_path / "v1",
                   base_model_dir=tmp_path, served_model_name=SERVED)
    assert JobSpec.model_validate_json(spec.model_dump_json()).prompt_template() == template


def test_run_returns_the_adapter_folder_and_its_manifest(trainer_tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapters" / "tiny" / "v1"
    phases: list[str] = []
    result = run(make_spec(trainer_tiny_model, out), lambda p: phases.append(p.phase))
    assert result.adapter_dir == out
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "manifest.json"]
    assert json.loads((out / "manifest.json").read_text()) == result.manifest
    assert result.manifest["prompt"] == "tiny" and result.manifest["schedule"]["name"] == "direct"
    assert result.manifest["train_rows"] == len(tiny_rows()) and result.manifest["evaluation"] is None
    assert phases[0] == "prepare" and phases.count("train") == 2 and phases[-1] == "done"


def drain(messages: Any) -> list[ChildMessage]:
    """Everything a finished training process sent."""
    out: list[ChildMessage] = []
    while True:
        try:
            out.append(messages.get(timeout=1))
        except queue.Empty:
            return out


def test_the_training_process_entry_point_reports_progress_then_the_result(
        trainer_tiny_model: Path, tmp_path: Path) -> None:
    messages = multiprocessing.get_context("spawn").Queue()
    spec = make_spec(trainer_tiny_model, tmp_path / "adapters" / "tiny" / "v1", eval_fraction=0.25)
    run_in_child(spec.model_dump(mode="json"), messages)
    sent = drain(messages)
    kinds = [kind for kind, _ in sent]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"progress"}
    progress = [body for kind, body in sent if kind == "progress"]
    assert {"phase", "stage", "stages", "stage_name", "step", "steps", "global_step", "global_steps", "loss",
            "eta_s"} == set(progress[0])
    trained = [p for p in progress if p["phase"] == "train"]
    assert [p["global_step"] for p in trained] == [1, 2] and trained[-1]["stage"] == 1
    assert any(p["phase"] == "evaluate" for p in progress)
    result = TrainResult.model_validate(sent[-1][1])
    assert result.adapter_dir == spec.out_dir and result.manifest["eval_rows"] == 4
    json.dumps(sent)  # all of it crosses a process boundary as plain data


def test_the_training_process_entry_point_reports_a_failure(trainer_tiny_model: Path, tmp_path: Path) -> None:
    messages = multiprocessing.get_context("spawn").Queue()
    rows = [{"query": "word " * 2000, "response": "ls"}, *tiny_rows()]
    spec = make_spec(trainer_tiny_model, tmp_path / "adapters" / "tiny" / "v1", rows=rows)
    run_in_child(spec.model_dump(mode="json"), messages)
    (kind, body), *_ = [m for m in drain(messages) if m[0] != "progress"]
    assert kind == "error" and body.startswith("TrainDataError: ") and "too long" in body
    assert not spec.out_dir.exists()
    run_in_child({"prompt": "missing fields"}, messages)
    assert drain(messages)[0][0] == "error"


def test_importing_the_boundary_loads_no_model_code() -> None:
    code = "import sys, trainer.jobspec; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'peft'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_trainer_imports_nothing_from_the_gateway() -> None:
    imported: set[str] = set()
    for path in Path(trainer.__path__[0]).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert "core" in imported and "gateway" not in imported
