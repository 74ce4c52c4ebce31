"""What each row sends: the app's full prompt, the bare query, or the template compressed LLMLingua-style."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.paper.conditions import Condition
from core.templates import PromptTemplate, bare_query_messages

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class CompressedTemplate:
    """The template's static messages pruned to `keep_ratio` of their tokens (slot messages kept)."""

    keep_ratio: float
    messages: dict[int, str]
    kept_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Workload:
    """The test rows every condition answers."""

    queries: list[str]
    references: list[list[str]]
    inputs: dict[str, list[Messages]]
    warmup: dict[str, list[Messages]]
    throughput_requests: int


def compress_template(model_dir: Path, template: PromptTemplate, keep_ratios: Sequence[float]) -> list[
        CompressedTemplate]:
    """LLMLingua-style compression with the trainer's compressor (the base model's self-information)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.compress import SelfInformationCompressor

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    compressor = SelfInformationCompressor(model, tokenizer)
    out = []
    for keep in keep_ratios:
        texts: dict[int, str] = {}
        kept = total = 0
        for i, message in enumerate(template.messages):
            if message.is_static and message.static_text.strip():
                result = compressor.compress(message.static_text, keep)
                texts[i], kept, total = result.text, kept + result.kept_tokens, total + result.total_tokens
        out.append(CompressedTemplate(keep, texts, kept, total))
    del compressor, model
    gc.collect()
    return out


def input_key(condition: Condition) -> str:
    """The key of a condition's messages in `build_inputs`' answer."""
    return f"compressed:{condition.keep_ratio}" if condition.inputs == "compressed" else condition.inputs


def build_inputs(template: PromptTemplate, queries: Sequence[str],
                 compressed: Sequence[CompressedTemplate]) -> dict[str, list[Messages]]:
    """Every row's messages: the app's full prompt, the bare query, the compressed prompts."""
    slot = template.slots[0]
    full: list[Messages] = [_chat(template.render({slot: q})) for q in queries]
    inputs = {"full": full, "bare": [bare_query_messages(template, {slot: q}) for q in queries]}
    for c in compressed:
        inputs[f"compressed:{c.keep_ratio}"] = [
            [{**m, "content": c.messages.get(i, m["content"])} for i, m in enumerate(messages)] for messages in full
        ]
    return inputs


def _chat(rendered: Any) -> Messages:
    if not isinstance(rendered, list):
        raise TypeError("the paper benchmark needs a chat template")
    return rendered
