"""`promptintern train`: flags, config files, the adapter cache, and clear errors on bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings
from tests.trainer_fixtures import EXAMPLES, SERVED, smollm_dir, tiny_messages, tiny_rows, trainer_tiny_model
from trainer.cli import add_train_parser, build_schedule, configure_parser, run_train

__all__ = ["smollm_dir", "trainer_tiny_model"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(list(argv))


def settings(tmp: Path) -> Settings:
    return Settings(data_dir=tmp / "data", adapter_dir=tmp / "adapters", served_model_name=SERVED)  # type: ignore[call-arg]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    template = tmp_path / "tiny.json"
    template.write_text(json.dumps({"messages": tiny_messages(), "examples": EXAMPLES}))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_rows()))
    return {"template": template, "data": data}


def test_standalone_help_explains_every_schedule_field(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)  # the installed package, from anywhere
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for flag in ("--keep-ratios", "--examples-per-stage", "--steps-per-stage", "--epochs-per-stage",
                 "--bare-stage", "--learning-rate", "--retrieval", "--eval-fraction", "--no-eval", "--config"):
        assert flag in text
    assert "Fraction of the template's instruction tokens kept" in text
    assert "(default: 1.0,0.6,0.3)" in text


def test_the_gateway_cli_can_mount_train() -> None:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--example", "nl2bash", "--schedule", "direct"])
    assert args.command == "train" and callable(args.func)


def test_schedule_from_preset_config_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text('[schedule]\nlearning_rate = 0.0005\nkeep_ratios = [0.8, 0.4]\nexamples_per_stage = [2, 1]\n'
                    'steps_per_stage = [1, 2, 3]\n')
    s = build_schedule(parse("--config", str(toml), "--batch-size", "2", "--no-bare-stage",
                             "--steps-per-stage", "4,5"))
    assert (s.learning_rate, s.keep_ratios, s.batch_size, s.bare_stage, s.steps_per_stage) == (
        5e-4, (0.8, 0.4), 2, False, (4, 5))
    js = tmp_path / "s.json"
    js.write_text(json.dumps({"steps_per_stage": [7]}))
    assert build_schedule(parse("--schedule", "direct", "--config", str(js))).steps_per_stage == (7,)


def test_train_then_reuse_the_cached_adapter(trainer_tiny_model: Path, tmp_path: Path, files: dict[str, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--template-file", str(files["template"]), "--data", str(files["data"]), "--name", "tiny",
            "--base-model", str(trainer_tiny_model), "--schedule", "direct", "--steps-per-stage", "2",
            "--batch-size", "4", "--retrieval", "bm25", "--eval-max-new-tokens", "2", "--quiet"]
    assert run_train(parse(*argv), settings(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "base+full_prompt" in out and "adapter+bare" in out
    manifest = json.loads((tmp_path / "adapters" / "tiny" / "v1" / "manifest.json").read_text())
    assert manifest["schedule"]["name"] == "direct" and manifest["eval_rows"] == 4

    assert run_train(parse(*argv), settings(tmp_path)) == 0
    assert "reusing" in capsys.readouterr().out
    assert not (tmp_path / "adapters" / "tiny" / "v2").exists()
    assert run_train(parse(*argv, "--force", "--no-eval"), settings(tmp_path)) == 0
    assert (tmp_path / "adapters" / "tiny" / "v2" / "adapter_model.safetensors").is_file()


def test_no_fine_tuning_baseline_only_evaluates(trainer_tiny_model: Path, tmp_path: Path, files: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--template-file", str(files["template"]), "--data", str(files["data"]), "--schedule", "none",
            "--base-model", str(trainer_tiny_model), "--eval-max-new-tokens", "2", "--quiet"]
    assert run_train(parse(*argv), settings(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "base+bare" in out and "adapter" not in out
    assert not (tmp_path / "adapters").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "has no rows"),
        ('{"query": "a", "response": "b"}\nnot json\n', "line 2: not valid JSON"),
        ('{"question": "a", "response": "b"}\n', "row 0: missing slot(s) query"),
        ('{"query": "a"}\n', "needs a non-empty string 'response'"),
    ],
)
def test_bad_data_files_are_clear_errors(content: str, message: str, tmp_path: Path, files: dict[str, Path],
                                         trainer_tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    argv = ["--template-file", str(files["template"]), "--data", str(data), "--base-model", str(trainer_tiny_model)]
    assert run_train(parse(*argv), settings(tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("promptintern train: error:")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give --template-file and --data, or --example"),
        (["--example", "nl2bash", "--name", "../escape"], "invalid prompt name"),
        (["--example", "nl2bash", "--keep-ratios", "0.3,0.6", "--examples-per-stage", "1,1",
          "--steps-per-stage", "1,1,1"], "must not increase"),
    ],
)
def test_bad_arguments_are_clear_errors(argv: list[str], message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert run_train(parse(*argv), settings(tmp_path)) == 2
    assert message in capsys.readouterr().err


def test_bad_template_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, Any]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no slot here"}]}))
    assert run_train(parse("--template-file", str(bad), "--data", str(files["data"])), settings(tmp_path)) == 2
    assert "at least one {slot}" in capsys.readouterr().err
