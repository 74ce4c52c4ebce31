"""The training schedule: which stages run, what each stage's input holds, and the optimiser settings.

PromptIntern trains one LoRA adapter through stages whose inputs shrink: the template's
instructions at a falling `keep_ratio` plus `k` retrieved examples falling to 0, then the bare
query alone. The baselines are schedules of the same code: `direct` (bare query from the start),
`full_prompt` (the registered prompt throughout, kept at inference) and `none` (no training);
`demo` is a short run of the method for a first look.

Steps scale with the data: `steps_per_stage` are sized for `steps_reference_rows` training rows, and a
job with N rows runs each stage for `round(steps × N / steps_reference_rows)` steps, the factor clamped
to [MIN_STEP_SCALE, MAX_STEP_SCALE]. Steps a caller gives are taken literally unless the caller also
sets `steps_reference_rows`. Every field is type-checked and bounded, so a REST override is a clear 422.
"""

from __future__ import annotations

import hashlib
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

StageKind = Literal["full_prompt", "compressed", "bare"]
Inference = Literal["bare", "full_prompt"]
PRESET_HELP = {
    "promptintern": "the method: the template compressed to 100/60/30% with 4/2/1 retrieved examples, then the "
                    "bare query; 30/30/30/70 steps for 200 rows, scaled with the rows (the NL2Bash example: "
                    "about 10 minutes on 2 CPU cores)",
    "demo": "demo quality, for a first look: one stage with the template compressed to 30% and 1 example, "
            "then the bare query, 60 steps of 4 rows whatever the data size (the NL2Bash example: about "
            "3 minutes on 2 CPU cores); train with promptintern for an adapter worth serving",
    "direct": "baseline: the bare query from the start, as many steps as promptintern",
    "full_prompt": "baseline: the registered prompt throughout, kept at inference, as many steps as promptintern",
    "none": "no training (evaluate the base model only)",
}
PRESETS = tuple(PRESET_HELP)
MIN_STEP_SCALE, MAX_STEP_SCALE = 0.25, 8.0
MAX_STAGES = 8
MAX_STEPS = 50_000  # optimiser steps of one job, all stages together
MAX_EPOCHS = 100.0
MAX_BATCH_SIZE = 512
MAX_LEARNING_RATE = 0.1
MAX_EXAMPLES = 32
MAX_LENGTH = 32_768
MAX_BATCH_TOKENS = 65_536
MAX_REFERENCE_ROWS = 1_000_000


class ScheduleError(ValueError):
    """A schedule that cannot run; the message names the field, and `field` holds it when there is one."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Stage:
    """One stage of training: the input it builds and how long it runs."""

    index: int
    kind: StageKind
    keep_ratio: float
    examples: int
    steps: int | None
    epochs: float | None
    reference_rows: int = 0  # `steps` are for this many training rows; 0: take them literally

    @property
    def name(self) -> str:
        if self.kind == "bare":
            return f"stage {self.index + 1}: bare query"
        if self.kind == "full_prompt":
            return f"stage {self.index + 1}: full prompt"
        return (
            f"stage {self.index + 1}: template {self.keep_ratio:.0%} + "
            f"{self.examples} example{'s' if self.examples != 1 else ''}"
        )

    def num_steps(self, train_rows: int, batch_size: int) -> int:
        """Optimiser steps for this stage: epochs over the training rows, or steps scaled to the rows."""
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * train_rows / batch_size))
        assert self.steps is not None
        if not self.reference_rows:
            return self.steps
        scale = min(MAX_STEP_SCALE, max(MIN_STEP_SCALE, train_rows / self.reference_rows))
        return max(1, round(self.steps * scale))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _checked(name: str, value: Any, hint: Any, what: str = "") -> Any:
    """`value` as the field's annotated type, or a ScheduleError naming the field (JSON brings any type)."""
    what = what or name
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ScheduleError(f"{name} must be a list, got {_shown(value)}", field=name)
        return tuple(_checked(name, v, args[0], f"each entry of {name}") for v in value)
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            raise ScheduleError(f"{what} must be one of {', '.join(args)}, got {_shown(value)}", field=name)
        return value
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            kind = "a boolean" if hint is bool else "a string"
            raise ScheduleError(f"{what} must be {kind}, got {_shown(value)}", field=name)
        return value
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        if not (numeric and (isinstance(value, int) or value.is_integer())):
            raise ScheduleError(f"{what} must be a whole number, got {_shown(value)}", field=name)
        return int(value)
    if hint is float:
        try:
            number = float(value) if numeric else math.nan
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if not math.isfinite(number):
            raise ScheduleError(f"{what} must be a finite number, got {_shown(value)}", field=name)
        return number
    raise TypeError(f"schedule field {name} has an annotation the checker does not know: {hint!r}")


@dataclass
class ProgressiveSchedule:
    """Stages, rates, examples per stage, length and optimiser settings of one training run.

    The defaults are the worked NL2Bash example's: they train SmolLM2-135M on about 200 pairs
    on 2 CPU cores in about 10 minutes, and scale their steps with the number of training rows.
    """

    name: str = field(
        default="promptintern",
        metadata={"help": "Label recorded in the manifest (not part of the schedule's hash)."},
    )
    keep_ratios: tuple[float, ...] = field(
        default=(1.0, 0.6, 0.3),
        metadata={
            "help": "Fraction of the template's instruction tokens kept in each compressed stage, "
            "non-increasing, each in (0, 1]; pruned by the base model's self-information."
        },
    )
    examples_per_stage: tuple[int, ...] = field(
        default=(4, 2, 1),
        metadata={
            "help": "Retrieved examples (k) shown with each compressed stage's query, non-increasing; "
            "one per keep ratio."
        },
    )
    bare_stage: bool = field(
        default=True,
        metadata={"help": "End with a stage on the bare query alone, the input the gateway serves."},
    )
    full_prompt: bool = field(
        default=False,
        metadata={
            "help": "Full-prompt fine-tuning baseline: one stage on the prompt exactly as registered, "
            "which the adapter then keeps at inference (needs no keep ratios and no bare stage)."
        },
    )
    steps_per_stage: tuple[int, ...] = field(
        default=(30, 30, 30, 70),
        metadata={"help": "Optimiser steps of each stage, in order (compressed stages, then the bare one)."},
    )
    epochs_per_stage: tuple[float, ...] = field(
        default=(),
        metadata={"help": "Epochs of each stage over the training rows; when given it replaces steps_per_stage."},
    )
    steps_reference_rows: int = field(
        default=200,
        metadata={
            "help": f"Training rows steps_per_stage are sized for: N rows run round(steps × N / this) steps per "
            f"stage, the factor clamped to [{MIN_STEP_SCALE}, {MAX_STEP_SCALE:g}]; 0 takes the steps literally "
            "(as do steps a caller sets without this field)."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Training rows per optimiser step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    lr_scheduler: Literal["cosine", "linear", "constant"] = field(
        default="cosine",
        metadata={"help": "Learning-rate decay over all stages together (training is continuous)."},
    )
    warmup_steps: int = field(default=10, metadata={"help": "Linear warm-up steps at the start of training."})
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "Final learning rate as a fraction of the peak (cosine and linear)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the LoRA weights."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 turns it off)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (alpha / rank scales the update)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input during training."})
    max_length: int = field(
        default=2048,
        metadata={"help": "Longest training sequence (stage input + response) in tokens; longer rows are an error."},
    )
    max_batch_tokens: int = field(
        default=6144,
        metadata={"help": "Tokens per forward pass; larger batches are split (gradient accumulation)."},
    )
    retrieval: Literal["embedding", "bm25"] = field(
        default="embedding",
        metadata={"help": "How examples are chosen for a query: MiniLM embedding similarity or BM25."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for LoRA initialisation, shuffling and dropout."})
    objective: Literal["sft", "kl"] = field(
        default="sft",
        metadata={
            "help": "sft: cross-entropy on the rows' answers. kl: distil the base model's token distributions "
            "given the full registered prompt (prompt baking): at each answer token the adapter, reading its "
            "stage input, is trained toward the full-prompt base model's whole next-token distribution. For "
            "rows the base model itself answered (traffic recorded with the local base model as the teacher)."
        },
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(ProgressiveSchedule)
        for f in fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), hints[f.name]))
        if len(self.keep_ratios) != len(self.examples_per_stage):
            raise ScheduleError(
                f"keep_ratios ({len(self.keep_ratios)}) and examples_per_stage "
                f"({len(self.examples_per_stage)}) need one entry per compressed stage", field="examples_per_stage"
            )
        if len(self.keep_ratios) > MAX_STAGES:
            raise ScheduleError(f"keep_ratios has {len(self.keep_ratios)} entries: at most {MAX_STAGES} compressed "
                                "stages", field="keep_ratios")
        for r in self.keep_ratios:
            if not 0.0 < r <= 1.0:
                raise ScheduleError(f"keep_ratios must lie in (0, 1], got {r} (the bare stage has no template)",
                                    field="keep_ratios")
        if any(b > a for a, b in zip(self.keep_ratios, self.keep_ratios[1:], strict=False)):
            raise ScheduleError(f"keep_ratios must not increase from stage to stage: {list(self.keep_ratios)}",
                                field="keep_ratios")
        if any(not 0 <= k <= MAX_EXAMPLES for k in self.examples_per_stage):
            raise ScheduleError(f"examples_per_stage must lie in [0, {MAX_EXAMPLES}]", field="examples_per_stage")
        if any(b > a for a, b in zip(self.examples_per_stage, self.examples_per_stage[1:], strict=False)):
            raise ScheduleError(
                f"examples_per_stage must not increase from stage to stage: {list(self.examples_per_stage)}",
                field="examples_per_stage",
            )
        if self.full_prompt and (self.keep_ratios or self.bare_stage):
            raise ScheduleError(
                "full_prompt trains on the registered prompt only: set keep_ratios and examples_per_stage "
                "to [] and bare_stage to false", field="full_prompt"
            )
        self._check_length()
        checks: list[tuple[str, bool, str]] = [
            ("batch_size", 1 <= self.batch_size <= MAX_BATCH_SIZE, f"batch_size must lie in [1, {MAX_BATCH_SIZE}]"),
            ("learning_rate", 0 < self.learning_rate <= MAX_LEARNING_RATE,
             f"learning_rate must lie in (0, {MAX_LEARNING_RATE}]"),
            ("warmup_steps", 0 <= self.warmup_steps <= MAX_STEPS, f"warmup_steps must lie in [0, {MAX_STEPS}]"),
            ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must lie in [0, 1]"),
            ("weight_decay", 0.0 <= self.weight_decay <= 1.0, "weight_decay must lie in [0, 1]"),
            ("max_grad_norm", self.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
            ("lora_alpha", 1 <= self.lora_alpha <= 1024, "lora_alpha must lie in [1, 1024]"),
            ("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "lora_dropout must lie in [0, 1)"),
            ("max_length", 16 <= self.max_length <= MAX_LENGTH, f"max_length must lie in [16, {MAX_LENGTH}]"),
            ("max_batch_tokens", self.max_length <= self.max_batch_tokens <= MAX_BATCH_TOKENS,
             f"max_batch_tokens must lie in [max_length, {MAX_BATCH_TOKENS}]"),
            ("seed", 0 <= self.seed < 2**32, "seed must lie in [0, 2**32)"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ScheduleError(message, field=name)

    def _check_length(self) -> None:
        """One steps or epochs entry per stage, each positive and bounded, and a bounded total."""
        n = self.num_stages
        if self.epochs_per_stage:
            if len(self.epochs_per_stage) != n:
                raise ScheduleError(
                    f"epochs_per_stage needs {n} entries (one per stage), got {len(self.epochs_per_stage)}",
                    field="epochs_per_stage",
                )
            if any(not 0 < e <= MAX_EPOCHS for e in self.epochs_per_stage):
                raise ScheduleError(f"epochs_per_stage must lie in (0, {MAX_EPOCHS:g}]", field="epochs_per_stage")
            return
        if len(self.steps_per_stage) != n:
            raise ScheduleError(
                f"steps_per_stage needs {n} entries (one per stage), got {len(self.steps_per_stage)}",
                field="steps_per_stage",
            )
        if any(s < 1 for s in self.steps_per_stage):
            raise ScheduleError("steps_per_stage must be >= 1", field="steps_per_stage")
        if sum(self.steps_per_stage) > MAX_STEPS:
            raise ScheduleError(f"steps_per_stage add up to {sum(self.steps_per_stage)}, more than {MAX_STEPS}",
                                field="steps_per_stage")
        if not 0 <= self.steps_reference_rows <= MAX_REFERENCE_ROWS:
            raise ScheduleError(f"steps_reference_rows must lie in [0, {MAX_REFERENCE_ROWS}]",
                                field="steps_reference_rows")

    def total_steps(self, train_rows: int) -> int:
        """Optimiser steps of a job with this many training rows, all stages together."""
        return sum(stage.num_steps(train_rows, self.batch_size) for stage in self.stages())

    @property
    def num_stages(self) -> int:
        return len(self.keep_ratios) + int(self.bare_stage) + int(self.full_prompt)

    @property
    def trains(self) -> bool:
        return self.num_stages > 0

    @property
    def inference(self) -> Inference:
        """What the adapter is served with: the bare query, or the full prompt (full-prompt baseline)."""
        return "full_prompt" if self.full_prompt else "bare"

    def stages(self) -> list[Stage]:
        specs: list[tuple[StageKind, float, int]] = []
        if self.full_prompt:
            specs.append(("full_prompt", 1.0, -1))
        specs += [("compressed", r, k) for r, k in zip(self.keep_ratios, self.examples_per_stage, strict=True)]
        if self.bare_stage:
            specs.append(("bare", 0.0, 0))
        out = []
        for i, (kind, ratio, k) in enumerate(specs):
            steps = None if self.epochs_per_stage else self.steps_per_stage[i]
            epochs = self.epochs_per_stage[i] if self.epochs_per_stage else None
            out.append(Stage(index=i, kind=kind, keep_ratio=ratio, examples=k, steps=steps, epochs=epochs,
                             reference_rows=self.steps_reference_rows))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def digest(self) -> str:
        """Stable hash of everything that changes the trained weights (the label excluded)."""
        body = self.to_dict()
        body.pop("name")
        if body["objective"] == "sft":  # the default: hashes stay those of the schedules before it existed
            body.pop("objective")
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: ProgressiveSchedule | None = None) -> ProgressiveSchedule:
        """A schedule from `base` (default: the promptintern preset) with `values` overriding fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ScheduleError(f"unknown schedule field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        merged = (base or cls()).to_dict()
        merged.update(values)
        try:
            return cls(**merged)
        except TypeError as exc:
            raise ScheduleError(str(exc)) from None


DEMO: dict[str, Any] = {
    "keep_ratios": (0.3,), "examples_per_stage": (1,), "steps_per_stage": (15, 45), "batch_size": 4,
    "learning_rate": 2e-3, "warmup_steps": 5, "retrieval": "bm25", "steps_reference_rows": 0,
}


def preset(name: str, **overrides: Any) -> ProgressiveSchedule:
    """A named schedule (`PRESET_HELP` says what each is for), with the caller's field overrides on top.

    The baselines train for as many steps in total as the promptintern preset, so they compare at
    the same budget of optimiser updates. Steps or epochs the caller gives are taken literally unless
    the caller also sets `steps_reference_rows`.
    """
    total = sum(ProgressiveSchedule().steps_per_stage)
    base: dict[str, Any]
    if name == "promptintern":
        base = {}
    elif name == "demo":
        base = dict(DEMO)
    elif name == "direct":
        base = {"keep_ratios": (), "examples_per_stage": (), "steps_per_stage": (total,)}
    elif name == "full_prompt":
        base = {
            "keep_ratios": (), "examples_per_stage": (), "bare_stage": False, "full_prompt": True,
            "steps_per_stage": (total,),
        }
    elif name == "none":
        base = {"keep_ratios": (), "examples_per_stage": (), "bare_stage": False, "steps_per_stage": ()}
    else:
        raise ScheduleError(f"unknown schedule preset {name!r}; choose one of {', '.join(PRESETS)}", field="preset")
    base["name"] = name
    if not overrides:
        return ProgressiveSchedule(**base)
    overrides = dict(overrides)
    if {"steps_per_stage", "epochs_per_stage"} & overrides.keys():
        overrides.setdefault("steps_reference_rows", 0)
    # A preset's own shape first, then the caller's fields on top.
    return ProgressiveSchedule.from_dict(overrides, ProgressiveSchedule(**base))


def schedule_from_overrides(overrides: dict[str, Any] | None) -> ProgressiveSchedule:
    """The schedule of a REST `train.schedule` object: an optional `preset` (default promptintern),
    then field overrides. Raises ScheduleError (a 422) for unknown fields or bad values."""
    values = dict(overrides or {})
    name = values.pop("preset", None)
    if name is None:
        name = "promptintern"
    if not isinstance(name, str):
        raise ScheduleError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}", field="preset")
    return preset(name, **values)
