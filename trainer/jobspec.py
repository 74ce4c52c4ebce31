"""The trainer's one boundary with the gateway: a job spec in, an adapter folder and its manifest out.

At submission the gateway calls `validate_submission` (bad rows or a bad schedule are an `InvalidInput`
now, not a failed job later) and queues the `TrainData` it returns. When the job's turn comes it builds
a `JobSpec` and starts `run_in_child` in a spawned process, which calls `run` and reports progress and
the `TrainResult` as messages, and which ends with the process that started it. Spec, data and result are
JSON, so they cross the database and the process boundary unchanged. Importing this module loads neither
torch nor a model.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.agreement import AgreementMetric
from core.errors import InvalidInput
from core.templates import PromptTemplate, TemplateKind, parse_template
from trainer.data import TrainDataError, load_jsonl, split_indices, validate_rows
from trainer.schedule import MAX_STEPS, ProgressiveSchedule, ScheduleError, schedule_from_overrides

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    from trainer.job import ProgressCallback, TrainJob, TrainProgress

log = logging.getLogger(__name__)
INVALID_TRAIN_DATA = "invalid_train_data"
INVALID_SCHEDULE = "invalid_schedule"
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MAX_TRAIN_ROWS = 50_000
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_S = 0.5
ORPHANED_EXIT_CODE = 75  # the training process ended because the process that started it had ended
ChildMessage = tuple[Literal["progress", "done", "error"], Any]
"""What the training process sends: ("progress", progress_json), then ("done", TrainResult JSON) or ("error", text)."""


class TrainData(BaseModel):
    """A submission's training input after validation: what a queued job keeps in the registry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rows: list[dict[str, Any]] = Field(description="Rows normalised to `{slot: value, ..., response, references}`.")
    schedule: dict[str, Any] = Field(default_factory=dict, description="Schedule overrides, `preset` included.")
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of rows held out for evaluation.")
    source: Literal["rows", "traffic"] = Field(
        "rows", description="`traffic`: the rows are recorded answers (the promotion gate applies).")

    def parsed_schedule(self) -> ProgressiveSchedule:
        return schedule_from_overrides(self.schedule)


class GateSpec(BaseModel):
    """The promotion gate of a traffic-trained version (`trainer.gate`): the agreement metric, the guard's
    minimum if the prompt has a guard, and the version serving the prompt now, to compare with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: AgreementMetric = "exact"
    min_agreement: float | None = Field(None, ge=0.0, le=1.0)
    incumbent_dir: Path | None = None
    incumbent_version: int | None = None


class JobSpec(BaseModel):
    """Everything one training job needs: the prompt as registered, its data, where to write, which model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field(description="The registered prompt's name (recorded in the manifest).")
    kind: TemplateKind
    template: list[dict[str, str]] | str = Field(description="The template's source: messages, or a prompt.")
    examples: list[dict[str, str]] = Field(default_factory=list, description="Few-shot examples it contains.")
    data: TrainData
    out_dir: Path = Field(description="The version folder to create (it must not exist yet).")
    base_model_dir: Path
    served_model_name: str = Field(description="Written as the adapter's `base_model_name_or_path`.")
    lora_rank: int = Field(8, ge=1)
    lora_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    cache_dir: Path | None = Field(None, description="Trainer cache (base-model evaluations, compressions).")
    threads: int | None = Field(None, ge=1, description="Torch threads for this job; None keeps torch's default.")
    gate: GateSpec | None = Field(None, description="The promotion gate (a version trained from traffic).")

    def prompt_template(self) -> PromptTemplate:
        if self.kind == "completion":
            assert isinstance(self.template, str)
            return parse_template(prompt=self.template, max_chars=10**9)
        assert isinstance(self.template, list)
        return parse_template(messages=self.template, max_chars=10**9)

    def train_job(self) -> TrainJob:
        """The in-process description of this job (loads the training code, and torch with it)."""
        from trainer.evaluate import EvalOptions
        from trainer.gate import GateOptions
        from trainer.job import TrainJob

        return TrainJob(
            name=self.prompt, template=self.prompt_template(), rows=list(self.data.rows), out_dir=self.out_dir,
            base_model_dir=self.base_model_dir, served_model_name=self.served_model_name,
            examples=list(self.examples), schedule=self.data.parsed_schedule(),
            eval_fraction=self.data.eval_fraction, evaluation=EvalOptions(enabled=self.data.eval_fraction > 0),
            lora_rank=self.lora_rank, lora_targets=tuple(self.lora_targets), cache_dir=self.cache_dir,
            threads=self.threads,
            gate=None if self.gate is None else GateOptions(**self.gate.model_dump()),
        )


class TrainResult(BaseModel):
    """A finished job: the adapter folder (`adapter_config.json`, weights, `manifest.json`) and its manifest."""

    model_config = ConfigDict(frozen=True)

    adapter_dir: Path
    manifest: dict[str, Any]


def validate_submission(
    template: PromptTemplate, *, data: Sequence[Any] | None, path: str | None,
    schedule: Mapping[str, Any] | None = None, eval_fraction: float = 0.2, param: str = "train",
) -> TrainData:
    """Check a training request against its template now; `param` prefixes the offending field's name.

    Raises InvalidInput with code `invalid_train_data` (rows, file, split, more than MAX_TRAIN_ROWS rows)
    or `invalid_schedule` (whose `param` names the schedule field, e.g. `train.schedule.batch_size`).
    """
    if (data is None) == (path is None):
        raise InvalidInput("give exactly one of 'data' (rows) or 'path' (a server-side JSONL file)", param=param,
                           code=INVALID_TRAIN_DATA)
    where = f"{param}.data" if data is not None else f"{param}.path"
    if not 0.0 <= eval_fraction < 1.0:
        raise InvalidInput(f"eval_fraction must lie in [0, 1), got {eval_fraction}", param=f"{param}.eval_fraction",
                           code=INVALID_TRAIN_DATA)
    if data is not None and len(data) > MAX_TRAIN_ROWS:
        raise InvalidInput(f"at most {MAX_TRAIN_ROWS} training rows, got {len(data)}", param=where,
                           code=INVALID_TRAIN_DATA)
    overrides = dict(schedule or {})
    parsed = _parsed_schedule(overrides, f"{param}.schedule")
    try:
        rows = validate_rows(template, data if data is not None else load_jsonl(Path(path or "")))
        if len(rows) > MAX_TRAIN_ROWS:
            raise TrainDataError(f"at most {MAX_TRAIN_ROWS} training rows, got {len(rows)}")
        train_ids, _ = split_indices(template, rows, eval_fraction)  # something must be left to train on
    except TrainDataError as exc:
        raise InvalidInput(str(exc), param=where, code=INVALID_TRAIN_DATA) from exc
    steps = parsed.total_steps(len(train_ids))
    if steps > MAX_STEPS:
        field = "epochs_per_stage" if parsed.epochs_per_stage else "steps_per_stage"
        raise InvalidInput(f"the schedule runs {steps} optimiser steps on {len(train_ids)} training rows, more than "
                           f"{MAX_STEPS}", param=f"{param}.schedule.{field}", code=INVALID_SCHEDULE)
    return TrainData(rows=rows, schedule=overrides, eval_fraction=eval_fraction)


def _parsed_schedule(overrides: dict[str, Any], param: str) -> ProgressiveSchedule:
    """The submission's schedule, or InvalidInput whose `param` names the offending field."""
    try:
        parsed = schedule_from_overrides(overrides)
    except ScheduleError as exc:
        raise InvalidInput(f"invalid schedule: {exc}", param=f"{param}.{exc.field}" if exc.field else param,
                           code=INVALID_SCHEDULE) from exc
    if not parsed.trains:
        raise InvalidInput("the schedule trains nothing", param=param, code=INVALID_SCHEDULE)
    return parsed


def run(spec: JobSpec, report: ProgressCallback | None = None) -> TrainResult:
    """Train, evaluate and publish the spec's adapter version; `report` may raise `TrainCancelled` to stop."""
    from trainer.train import train_prompt

    manifest = train_prompt(spec.train_job(), report)
    return TrainResult(adapter_dir=spec.out_dir, manifest=manifest)


def progress_json(p: TrainProgress) -> dict[str, Any]:
    """A progress report as the job object shows it (stages counted from 1)."""
    return {
        "phase": p.phase, "stage": p.stage_index + 1, "stages": p.stage_count, "stage_name": p.stage_name,
        "step": p.step, "steps": p.total_steps, "global_step": p.global_step, "global_steps": p.global_total_steps,
        "loss": p.loss, "eta_s": None if p.eta_s is None else round(p.eta_s, 1),
    }


def die_with_parent(parent_pid: int, *, use_prctl: bool = True) -> None:
    """Make this process end when `parent_pid`, the process that started it, ends, however it ends (`kill -9`
    too): a training process left behind would go on training beside the runner that takes the job over.

    Two guards: on Linux, PR_SET_PDEATHSIG has the kernel send SIGKILL when the parent goes (it follows the
    parent *thread* that started this process, here one of the runner's long-lived worker threads); and, where
    prctl is missing or refused (or `use_prctl` is False), a thread that ends the process once its parent pid
    changes (it is reparented).
    """
    if use_prctl and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): watching the parent only", ctypes.get_errno())
        except (OSError, AttributeError) as exc:
            log.warning("prctl is not available (%s): watching the parent only", exc)
    if os.getppid() != parent_pid:  # it ended before the guard was set
        os._exit(ORPHANED_EXIT_CODE)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(ORPHANED_EXIT_CODE)


def run_in_child(spec: dict[str, Any], messages: Queue[ChildMessage], parent_pid: int | None = None) -> None:
    """Entry point of a spawned training process: `run` the spec, sending progress and the outcome; with
    `parent_pid`, the process ends with its parent (`die_with_parent`)."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    put: Callable[[ChildMessage], None] = messages.put
    try:
        result = run(JobSpec.model_validate(spec), lambda p: put(("progress", progress_json(p))))
        put(("done", result.model_dump(mode="json")))
    except BaseException as exc:  # the parent must learn why, whatever it was
        put(("error", f"{type(exc).__name__}: {exc}"))
