"""The training schedule: which stages run, what each stage's input holds, and the optimiser settings.

PromptIntern trains one LoRA adapter through stages whose inputs shrink: the template's
instructions at a falling `keep_ratio` plus `k` retrieved examples falling to 0, then the bare
query alone. The baselines are schedules of the same code: `direct` (bare query from the start),
`full_prompt` (the registered prompt throughout, kept at inference) and `none` (no training).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

StageKind = Literal["full_prompt", "compressed", "bare"]
Inference = Literal["bare", "full_prompt"]
PRESETS = ("promptintern", "direct", "full_prompt", "none")


class ScheduleError(ValueError):
    """A schedule that cannot run; the message names the field."""


@dataclass(frozen=True)
class Stage:
    """One stage of training: the input it builds and how long it runs."""

    index: int
    kind: StageKind
    keep_ratio: float
    examples: int
    steps: int | None
    epochs: float | None

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
        """Optimiser steps for this stage: given directly, or epochs over the training rows."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        return max(1, math.ceil(self.epochs * train_rows / batch_size))


def _tuple_of(value: Any, kind: type, name: str) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ScheduleError(f"{name} must be a list, got {value!r}")
    try:
        return tuple(kind(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ScheduleError(f"{name} must be a list of {kind.__name__}: {exc}") from None


@dataclass
class ProgressiveSchedule:
    """Stages, rates, examples per stage, length and optimiser settings of one training run.

    The defaults are the worked NL2Bash example's: they train SmolLM2-135M on about 200 pairs
    on 2 CPU cores in about 10 minutes.
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

    def __post_init__(self) -> None:
        self.keep_ratios = _tuple_of(self.keep_ratios, float, "keep_ratios")
        self.examples_per_stage = _tuple_of(self.examples_per_stage, int, "examples_per_stage")
        self.steps_per_stage = _tuple_of(self.steps_per_stage, int, "steps_per_stage")
        self.epochs_per_stage = _tuple_of(self.epochs_per_stage, float, "epochs_per_stage")
        if len(self.keep_ratios) != len(self.examples_per_stage):
            raise ScheduleError(
                f"keep_ratios ({len(self.keep_ratios)}) and examples_per_stage "
                f"({len(self.examples_per_stage)}) need one entry per compressed stage"
            )
        for r in self.keep_ratios:
            if not 0.0 < r <= 1.0:
                raise ScheduleError(f"keep_ratios must lie in (0, 1], got {r} (the bare stage has no template)")
        if any(b > a for a, b in zip(self.keep_ratios, self.keep_ratios[1:], strict=False)):
            raise ScheduleError(f"keep_ratios must not increase from stage to stage: {list(self.keep_ratios)}")
        if any(k < 0 for k in self.examples_per_stage):
            raise ScheduleError("examples_per_stage must be >= 0")
        if any(b > a for a, b in zip(self.examples_per_stage, self.examples_per_stage[1:], strict=False)):
            raise ScheduleError(
                f"examples_per_stage must not increase from stage to stage: {list(self.examples_per_stage)}"
            )
        if self.full_prompt and (self.keep_ratios or self.bare_stage):
            raise ScheduleError(
                "full_prompt trains on the registered prompt only: set keep_ratios and examples_per_stage "
                "to [] and bare_stage to false"
            )
        n = self.num_stages
        if self.epochs_per_stage:
            if len(self.epochs_per_stage) != n:
                raise ScheduleError(
                    f"epochs_per_stage needs {n} entries (one per stage), got {len(self.epochs_per_stage)}"
                )
            if any(e <= 0 for e in self.epochs_per_stage):
                raise ScheduleError("epochs_per_stage must be > 0")
        else:
            if len(self.steps_per_stage) != n:
                raise ScheduleError(
                    f"steps_per_stage needs {n} entries (one per stage), got {len(self.steps_per_stage)}"
                )
            if any(s < 1 for s in self.steps_per_stage):
                raise ScheduleError("steps_per_stage must be >= 1")
        checks: list[tuple[bool, str]] = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.lr_scheduler in ("cosine", "linear", "constant"), "lr_scheduler must be cosine, linear or constant"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must lie in [0, 1]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
            (self.lora_alpha >= 1, "lora_alpha must be >= 1"),
            (0.0 <= self.lora_dropout < 1.0, "lora_dropout must lie in [0, 1)"),
            (self.max_length >= 16, "max_length must be >= 16"),
            (self.max_batch_tokens >= self.max_length, "max_batch_tokens must be >= max_length"),
            (self.retrieval in ("embedding", "bm25"), "retrieval must be embedding or bm25"),
        ]
        for ok, message in checks:
            if not ok:
                raise ScheduleError(message)

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
            out.append(Stage(index=i, kind=kind, keep_ratio=ratio, examples=k, steps=steps, epochs=epochs))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def digest(self) -> str:
        """Stable hash of everything that changes the trained weights (the label excluded)."""
        body = self.to_dict()
        body.pop("name")
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


def preset(name: str, **overrides: Any) -> ProgressiveSchedule:
    """A named schedule: `promptintern` (the method) or a baseline (`direct`, `full_prompt`, `none`).

    The baselines train for as many steps in total as the promptintern preset, so they compare at
    the same budget of optimiser updates.
    """
    total = sum(ProgressiveSchedule().steps_per_stage)
    base: dict[str, Any]
    if name == "promptintern":
        base = {}
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
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(PRESETS)}")
    base["name"] = name
    if overrides:
        # A preset's own shape first, then the caller's fields on top.
        return ProgressiveSchedule.from_dict(overrides, ProgressiveSchedule(**base))
    return ProgressiveSchedule(**base)


def schedule_from_overrides(overrides: dict[str, Any] | None) -> ProgressiveSchedule:
    """The schedule of a REST `train.schedule` object: an optional `preset` (default promptintern),
    then field overrides. Raises ScheduleError (a 422) for unknown fields or bad values."""
    values = dict(overrides or {})
    name = values.pop("preset", None) or "promptintern"
    if not isinstance(name, str):
        raise ScheduleError("preset must be a string")
    return preset(name, **values)
