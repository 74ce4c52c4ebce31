"""The embedded engine's own sampler, as a step-wise loop over independent sequences decoded in one batch.

Each `Sequence` carries everything its choice of tokens needs (tokens, penalty counts, random generator,
streamed text, its adapter), and `DecodeLoop.step()` advances every live sequence by one token, so
sequences join and leave between steps (continuous batching). A new request's prompt is prefilled alone,
once for all its `n` choices; then all live rows decode together in one forward pass over a left-padded
KV batch (`kv_batch.PaddedKVBatch`), each row under its own LoRA through peft's per-row `adapter_names`
(`"__base__"` for the base model), so a row never runs with another row's adapter.
At batch 1, greedy output is token for token that of transformers' `generate(do_sample=False)`; in a
batch, padding and batch shapes change the floating-point sums slightly, so a greedy answer can differ.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from gateway.engines.base import Finished, SamplingParams, TextDelta
from gateway.engines.detokenize import IncrementalDetokenizer, StopStringHoldback
from gateway.engines.kv_batch import PaddedKVBatch

SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads the choices of one seeded request over unrelated seeds
BASE_ROW = "__base__"  # peft's name for a row that runs on the base model alone
# Prompt tokens prefilled per step at most (one prompt always goes): bounds how long running rows wait for
# their next token, and how long a cancelled request waits to be dropped, while many new requests arrive.
PREFILL_TOKENS_PER_STEP = 512
StepEvent = tuple["Sequence", TextDelta | Finished]


def seeded_generator(seed: int | None, index: int) -> Any:
    """Choice `index`'s random generator: `seed` itself for the first choice, so n=1 replays exactly."""
    import torch

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed((seed + index * SEED_STRIDE) % 2**64)
    return generator


@dataclass(eq=False)
class Sequence:
    """One choice being generated: its prompt, its tokens so far and its sampling state."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    generator: Any
    detokenizer: IncrementalDetokenizer
    holdback: StopStringHoldback
    adapter: str | None = None  # the peft adapter name of this row; None: the base model
    ignore_eos: bool = False  # vLLM's `ignore_eos`: an end-of-sequence token is kept and decoding goes on
    generated: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)
    logits: Any = None
    finish_reason: str | None = None


class DecodeLoop:
    """Sequences decoded together, one token each per `step()`, in one batch.

    `model` is the base model, or a peft model when adapters are loaded; the engine may swap one for the
    other between steps (the KV cache does not depend on the wrapper).
    """

    def __init__(self, model: Any, tokenizer: Any, eos_ids: set[int]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.batch = PaddedKVBatch()
        self.rows: list[Sequence] = []  # the batch's rows, in order
        self.pending: list[list[Sequence]] = []  # groups of new choices that share one prompt prefill
        base = getattr(model, "get_base_model", lambda: model)()
        self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters

    def add(self, prompt_ids: list[int], params: SamplingParams, max_new: int, *, adapter: str | None = None,
            n: int = 1, ignore_eos: bool = False) -> list[Sequence]:
        """Start `n` choices of one prompt (indices 0..n-1); they join the batch at the next step. With
        `ignore_eos` they end only at `max_new` tokens or a stop string (a fixed answer length, as vLLM's)."""
        group = [Sequence(index=index, prompt_ids=prompt_ids, params=params, max_new=max_new,
                          generator=seeded_generator(params.seed, index),
                          detokenizer=IncrementalDetokenizer(self.tokenizer),
                          holdback=StopStringHoldback(params.stop), adapter=adapter, ignore_eos=ignore_eos)
                 for index in range(n)]
        self.pending.append(group)
        return group

    @property
    def live(self) -> list[Sequence]:
        return [*self.rows, *(s for group in self.pending for s in group)]

    def remove(self, sequences: list[Sequence]) -> None:
        """Drop sequences now (their client went away): their rows and KV cache are freed at once."""
        import torch

        gone = set(sequences)
        self.pending = [g for g in ([s for s in group if s not in gone] for group in self.pending) if g]
        if any(s in gone for s in self.rows):
            with torch.inference_mode():
                self._keep([s for s in self.rows if s not in gone])

    def clear(self) -> None:
        """Forget every sequence (after a failed step, whose cache can no longer be trusted)."""
        self.batch = PaddedKVBatch()
        self.rows, self.pending = [], []

    def step(self) -> list[StepEvent]:
        """Prefill new prompts, decode every row in one pass, then choose and stream one token each.

        Events are for the sequences that took part; pending ones beyond the prefill budget wait.
        """
        import torch

        with torch.inference_mode():
            joining = self._take_pending()
            prefills = [self._prefill(group) for group in joining]
            if self.rows:
                self._decode()
            if prefills:
                self.batch.join([(cache, len(group)) for cache, group in zip(prefills, joining, strict=True)])
                self.rows += [s for group in joining for s in group]
            events = [(s, e) for s in self.rows for e in self._advance(s)]
            if any(s.finish_reason is not None for s in self.rows):
                self._keep([s for s in self.rows if s.finish_reason is None])
        return events

    def _take_pending(self) -> list[list[Sequence]]:
        """The groups to prefill this step, first come first served, within PREFILL_TOKENS_PER_STEP."""
        taken, tokens = 0, 0
        for group in self.pending:
            tokens += len(group[0].prompt_ids)
            if taken and tokens > PREFILL_TOKENS_PER_STEP:
                break
            taken += 1
        joining, self.pending = self.pending[:taken], self.pending[taken:]
        return joining

    def _forward(self, input_ids: Any, adapters: list[str | None], **kwargs: Any) -> Any:
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if hasattr(self.model, "peft_config"):
            kwargs["adapter_names"] = [name or BASE_ROW for name in adapters]
        return self.model(input_ids=input_ids, use_cache=True, **kwargs)

    def _prefill(self, group: list[Sequence]) -> Any:
        """Run a prompt alone (batch 1, no padding) and give its logits to every choice; return its cache."""
        import torch

        first = group[0]
        ids = torch.tensor([first.prompt_ids])
        out = self._forward(ids, [first.adapter], attention_mask=torch.ones_like(ids))
        for sequence in group:
            sequence.logits = out.logits[0, -1]
        return out.past_key_values

    def _decode(self) -> None:
        """Every row's last token in one forward pass over the padded batch."""
        import torch

        mask, positions = self.batch.decode_inputs()
        ids = torch.tensor([[s.generated[-1]] for s in self.rows])
        out = self._forward(ids, [s.adapter for s in self.rows], attention_mask=mask, position_ids=positions,
                            past_key_values=self.batch.cache)
        self.batch.decoded(out.past_key_values, mask)
        for row, sequence in enumerate(self.rows):
            sequence.logits = out.logits[row, -1]

    def _keep(self, rows: list[Sequence]) -> None:
        index = {s: i for i, s in enumerate(self.rows)}
        self.batch.keep([index[s] for s in rows])
        self.rows = rows

    def _advance(self, sequence: Sequence) -> list[TextDelta | Finished]:
        token = choose_token(sequence.logits, sequence.params, sequence.counts, sequence.generator)
        if token in self.eos_ids and not sequence.ignore_eos:
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
        sequence.logits = None
        rest = sequence.holdback.flush()
        return [*([TextDelta(sequence.index, rest)] if rest else []), Finished(sequence.index, reason)]


MIN_TEMPERATURE = 1e-5  # as vLLM: below this, sampling is greedy


def choose_token(logits: Any, params: SamplingParams, counts: dict[int, int], generator: Any) -> int:
    """OpenAI's penalties, then greedy (temperature 0) or temperature and nucleus sampling."""
    import torch

    if counts and (params.presence_penalty or params.frequency_penalty):
        logits = logits.clone()
        ids = torch.tensor(list(counts))
        freq = torch.tensor([float(c) for c in counts.values()])
        logits[ids] -= params.frequency_penalty * freq + params.presence_penalty
    if params.temperature < MIN_TEMPERATURE:  # dividing by a vanishing temperature overflows: it is greedy
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        keep[0] = True  # the most likely token always stays, however small top_p is
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
