"""The embedded engine's own sampler, as a step-wise loop over independent sequences.

Each `Sequence` carries everything its decoding needs (tokens, KV cache, penalty counts, random
generator, streamed text), and `DecodeLoop.step()` advances every live sequence by one token, so
sequences can join and leave between steps. Today each sequence gets its own forward pass; batching
them into one pass (padding, attention mask, peft's per-row `adapter_names`) changes `_forward` only.
At batch 1, greedy output is token for token that of transformers' `generate(do_sample=False)`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from gateway.engines.base import Finished, SamplingParams, TextDelta
from gateway.engines.detokenize import IncrementalDetokenizer, StopStringHoldback

SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads the choices of one seeded request over unrelated seeds


def seeded_generator(seed: int | None, index: int) -> Any:
    """Choice `index`'s random generator: `seed` itself for the first choice, so n=1 replays exactly."""
    import torch

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed((seed + index * SEED_STRIDE) % 2**64)
    return generator


@dataclass
class Sequence:
    """One choice being generated: its prompt, its tokens so far and its sampling state."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    generator: Any
    detokenizer: IncrementalDetokenizer
    holdback: StopStringHoldback
    generated: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)
    past: Any = None
    logits: Any = None
    finish_reason: str | None = None


class DecodeLoop:
    """Sequences decoded together, one token each per `step()`; the model and its adapter are the caller's."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: set[int]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.sequences: list[Sequence] = []
        base = getattr(model, "get_base_model", lambda: model)()
        self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters

    def add(self, index: int, prompt_ids: list[int], params: SamplingParams, max_new: int) -> Sequence:
        sequence = Sequence(index=index, prompt_ids=prompt_ids, params=params, max_new=max_new,
                            generator=seeded_generator(params.seed, index),
                            detokenizer=IncrementalDetokenizer(self.tokenizer),
                            holdback=StopStringHoldback(params.stop))
        self.sequences.append(sequence)
        return sequence

    @property
    def live(self) -> list[Sequence]:
        return [s for s in self.sequences if s.finish_reason is None]

    def step(self) -> list[TextDelta | Finished]:
        """Run the model once for every live sequence, then choose and stream one token each."""
        live = self.live
        self._forward(live)
        events: list[TextDelta | Finished] = []
        for sequence in live:
            events.extend(self._advance(sequence))
        return events

    def _forward(self, sequences: list[Sequence]) -> None:
        """Next-token logits of each sequence: its whole prompt on the first step, then its last token."""
        import torch

        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        for sequence in sequences:
            ids = sequence.prompt_ids if sequence.past is None else sequence.generated[-1:]
            out = self.model(input_ids=torch.tensor([ids]), past_key_values=sequence.past, use_cache=True, **extra)
            sequence.past = out.past_key_values
            sequence.logits = out.logits[0, -1]

    def _advance(self, sequence: Sequence) -> list[TextDelta | Finished]:
        token = choose_token(sequence.logits, sequence.params, sequence.counts, sequence.generator)
        if token in self.eos_ids:
            return self._finish(sequence, "stop")
        sequence.generated.append(token)
        sequence.counts[token] = sequence.counts.get(token, 0) + 1
        piece = sequence.holdback.add(sequence.detokenizer.add(token))
        events: list[TextDelta | Finished] = [TextDelta(sequence.index, piece)] if piece else []
        if sequence.holdback.stopped:
            events += self._finish(sequence, "stop")
        elif len(sequence.generated) >= sequence.max_new:
            events += self._finish(sequence, "length")
        return events

    def _finish(self, sequence: Sequence, reason: str) -> list[TextDelta | Finished]:
        sequence.finish_reason = reason
        sequence.past = sequence.logits = None  # free the KV cache now, not when the request ends
        rest = sequence.holdback.flush()
        return [*([TextDelta(sequence.index, rest)] if rest else []), Finished(sequence.index, reason)]


def choose_token(logits: Any, params: SamplingParams, counts: dict[int, int], generator: Any) -> int:
    """OpenAI's penalties, then greedy (temperature 0) or temperature and nucleus sampling."""
    import torch

    if counts and (params.presence_penalty or params.frequency_penalty):
        logits = logits.clone()
        ids = torch.tensor(list(counts))
        freq = torch.tensor([float(c) for c in counts.values()])
        logits[ids] -= params.frequency_penalty * freq + params.presence_penalty
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
