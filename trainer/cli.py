"""`promptintern train`: train one prompt's adapter from a data file and print its evaluation.

Schedule fields come from a preset (`--schedule`), then a config file (`--config`, JSON or TOML),
then one flag per field; `--help` lists them all with their meaning.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from core.adapter_store import next_version_dir, read_manifest
from core.config import Settings
from core.templates import PromptTemplate, TemplateError, parse_template
from trainer.cache import find_cached_adapter
from trainer.data import Row, TrainDataError, load_jsonl, validate_examples, validate_rows
from trainer.evaluate import EvalOptions, format_table
from trainer.schedule import PRESETS, ProgressiveSchedule, ScheduleError, preset

PROMPT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
EXAMPLES = ("nl2bash",)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _list_parser(kind: type) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return tuple(kind(t) for t in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def _add_schedule_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "schedule fields", "Override one field of the chosen preset (lists are comma separated; an empty "
        "string gives an empty list). Defaults shown are the promptintern preset's."
    )
    hints = typing.get_type_hints(ProgressiveSchedule)
    defaults = ProgressiveSchedule()
    for f in fields(ProgressiveSchedule):
        if f.name == "name":
            continue
        hint = hints[f.name]
        default = getattr(defaults, f.name)
        shown = (",".join(map(str, default)) or "none") if isinstance(default, tuple) else default
        text = f"{f.metadata['help']} (default: {shown!s})"
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        elif origin is tuple:
            group.add_argument(_flag(f.name), type=_list_parser(args[0]), default=None, metavar="LIST", help=text)
        elif origin is typing.Literal:
            group.add_argument(_flag(f.name), choices=list(args), default=None, help=text)
        else:
            group.add_argument(_flag(f.name), type=hint, default=None, help=text)


def add_train_parser(subparsers: Any) -> None:
    """Add `train` to a subparsers object (`promptintern train`)."""
    parser = subparsers.add_parser(
        "train",
        help="train a prompt's adapter (progressive LoRA) and evaluate it",
        description=__doc__,
    )
    configure_parser(parser)
    parser.set_defaults(func=_run_with_env_settings)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("prompt and data")
    src.add_argument("--name", help="prompt name: the adapter goes to ADAPTER_DIR/<name>/v<N>")
    src.add_argument("--template-file", type=Path,
                     help="JSON with `messages` (chat) or `prompt` (completion) and optional `examples`, "
                          "as registered with POST /v1/prompts")
    src.add_argument("--example", choices=EXAMPLES,
                     help="a worked example shipped in the repo (template, training rows and test rows)")
    src.add_argument("--data", type=Path,
                     help="JSONL training rows {<slot>: value, ..., response, references?}; "
                          "`query` names the slot of a one-slot template")
    src.add_argument("--test-data", type=Path,
                     help="JSONL held-out rows; without it --eval-fraction of --data is held out")
    run = parser.add_argument_group("run")
    run.add_argument("--schedule", choices=PRESETS, default="promptintern",
                     help="preset: promptintern (the method), direct (bare query from the start), full_prompt "
                          "(full prompt throughout, kept at inference), none (evaluate the base model only); "
                          "default %(default)s")
    run.add_argument("--config", type=Path, help="JSON or TOML file of schedule field overrides "
                                                 "(top level or a [schedule] table)")
    run.add_argument("--eval-fraction", type=float, default=0.2,
                     help="share of the rows held out for evaluation (deterministic, by row hash); default %(default)s")
    run.add_argument("--no-eval", action="store_true", help="skip the evaluation")
    run.add_argument("--eval-max-new-tokens", type=int, default=EvalOptions.max_new_tokens,
                     help="longest generated answer during evaluation; default %(default)s")
    run.add_argument("--eval-full-prompt-limit", type=int, default=EvalOptions.full_prompt_limit,
                     help="evaluate full-prompt conditions (slow) on at most this many held-out rows, "
                          "0 for all; default %(default)s")
    run.add_argument("--adapter-dir", type=Path, help="adapter store (default: PROMPTINTERN_ADAPTER_DIR)")
    run.add_argument("--out", type=Path, help="exact output folder instead of ADAPTER_DIR/<name>/v<N>")
    run.add_argument("--base-model", type=Path, help="HF model folder (default: the gateway's base model)")
    run.add_argument("--threads", type=int, help="torch threads (default: PROMPTINTERN_TORCH_THREADS or torch's)")
    run.add_argument("--force", action="store_true",
                     help="train even if an adapter with the same data, schedule and base model exists")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--json", action="store_true", help="print the manifest as JSON at the end")
    _add_schedule_flags(parser)


def _run_with_env_settings(args: argparse.Namespace) -> int:
    return run_train(args, Settings())  # type: ignore[call-arg]


def load_template_file(path: Path) -> tuple[PromptTemplate, list[Row], str | None]:
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainDataError(f"cannot read template file {path}: {exc}") from None
    if not isinstance(body, dict):
        raise TrainDataError(f"{path}: expected a JSON object with `messages` or `prompt`")
    template = parse_template(messages=body.get("messages"), prompt=body.get("prompt"))
    return template, validate_examples(template, body.get("examples") or []), body.get("name")


def load_overrides(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise ScheduleError(f"cannot read schedule config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ScheduleError(f"{path}: expected an object of schedule fields")
    section = data.get("schedule", data)
    if not isinstance(section, dict):
        raise ScheduleError(f"{path}: `schedule` must be a table")
    return dict(section)


def build_schedule(args: argparse.Namespace) -> ProgressiveSchedule:
    overrides: dict[str, Any] = load_overrides(args.config) if args.config else {}
    for f in fields(ProgressiveSchedule):
        value = getattr(args, f.name, None)
        if f.name != "name" and value is not None:
            overrides[f.name] = value
    return preset(args.schedule, **overrides)


def run_train(args: argparse.Namespace, settings: Settings) -> int:
    """`promptintern train`; returns the exit status (2 for bad input)."""
    try:
        return _run(args, settings)
    except (TrainDataError, TemplateError, ScheduleError, FileExistsError, ValueError) as exc:
        print(f"promptintern train: error: {exc}", file=sys.stderr)
        return 2


def _inputs(args: argparse.Namespace) -> tuple[str, PromptTemplate, list[Row], list[Row], list[Row] | None]:
    test_rows: list[Row] | None = None
    if args.example == "nl2bash":
        from trainer.nl2bash import build

        worked = build()
        template, examples, name = worked.template, validate_examples(worked.template, worked.examples), worked.name
        rows, test_rows = validate_rows(template, worked.train), validate_rows(template, worked.test)
    elif args.template_file:
        template, examples, name_in_file = load_template_file(args.template_file)
        name = name_in_file or args.template_file.stem
        if not args.data:
            raise TrainDataError("--data is required with --template-file")
        rows = []
    else:
        raise TrainDataError("give --template-file and --data, or --example")
    if args.data:
        rows = validate_rows(template, load_jsonl(args.data))
        test_rows = None
    if args.test_data:
        test_rows = validate_rows(template, load_jsonl(args.test_data))
    name = args.name or name
    if not name or not PROMPT_NAME.fullmatch(name):
        raise TrainDataError(f"invalid prompt name {name!r}: letters, digits, '.', '_' and '-' only")
    return name, template, examples, rows, test_rows


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from core.basemodel import base_model_dir
    from trainer.heldout import evaluate_base
    from trainer.job import TrainJob, adapter_cache_key_for
    from trainer.train import train_prompt

    name, template, examples, rows, test_rows = _inputs(args)
    schedule = build_schedule(args)
    limit = args.eval_full_prompt_limit or None
    evaluation = EvalOptions(enabled=not args.no_eval, max_new_tokens=args.eval_max_new_tokens,
                             full_prompt_limit=limit)
    store = args.adapter_dir or settings.adapter_dir
    prompt_dir = store / name
    job = TrainJob(
        name=name, template=template, rows=rows, examples=examples, test_rows=test_rows,
        out_dir=args.out or next_version_dir(prompt_dir),
        base_model_dir=args.base_model.resolve() if args.base_model else base_model_dir(settings),
        served_model_name=settings.served_model_name, schedule=schedule, eval_fraction=args.eval_fraction,
        evaluation=evaluation, lora_rank=settings.lora_rank, lora_targets=tuple(settings.lora_targets),
        cache_dir=settings.data_dir / "trainer-cache", threads=args.threads or settings.torch_threads,
        show_progress=not args.quiet,
    )
    if not schedule.trains:
        result = evaluate_base(job)
        print(format_table(result))
        if args.json:
            print(json.dumps(result, indent=2))
        return 0
    if not args.force and args.out is None:
        cached = find_cached_adapter(prompt_dir, adapter_cache_key_for(job))
        if cached is not None:
            manifest = read_manifest(cached) or {}
            print(f"reusing {cached} (same prompt, data, schedule and base model; --force trains anew)")
            _report(cached, manifest, args.json)
            return 0
    manifest = train_prompt(job)
    _report(job.out_dir, manifest, args.json)
    return 0


def _report(path: Path, manifest: dict[str, Any], as_json: bool) -> None:
    print(f"\nadapter: {path}")
    print(f"schedule: {manifest.get('schedule', {}).get('name')}  training: {manifest.get('training_seconds')} s")
    for stage in manifest.get("stages", []):
        print(f"  {stage['name']}: {stage['steps']} steps, loss {stage['loss_first']} -> {stage['loss_last']}, "
              f"{stage['mean_input_tokens']:.0f} input tokens, {stage['seconds']:.0f} s")
    if manifest.get("evaluation"):
        print(manifest["evaluation"]["table"])
    if as_json:
        print(json.dumps(manifest, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="promptintern train", description=__doc__)
    configure_parser(parser)
    return run_train(parser.parse_args(argv), Settings())  # type: ignore[call-arg]


if __name__ == "__main__":
    raise SystemExit(main())
