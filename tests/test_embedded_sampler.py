"""The embedded engine's own sampler: stop-string holdback, incremental text, the step-wise loop, and
which extra request fields it honours. Greedy output is compared token for token with transformers +
peft's `generate`, on the real SmolLM2 (expected tokens computed, never typed in)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.engines.base import (
    EngineRequest,
    Finished,
    SamplingParams,
    TextDelta,
    UnsupportedParameter,
    Usage,
)
from gateway.engines.detokenize import IncrementalDetokenizer, StopStringHoldback, stop_prefix_length
from gateway.engines.embedded import EmbeddedEngine
from gateway.engines.embedded_fields import refuse_unhonoured_fields
from gateway.engines.sampling import DecodeLoop
from trainer.lora import random_lora

PROMPTS = ["Write a bash command that lists every file in /tmp.", "What is the capital of France?"]

# -- stop-string holdback (pure) ----------------------------------------------------------------


def test_stop_prefix_length_is_the_longest_end_that_starts_a_stop() -> None:
    assert stop_prefix_length("hello wor", ("world",)) == 3
    assert stop_prefix_length("hello", ("world",)) == 0
    assert stop_prefix_length("ab", ("abc", "bx")) == 2
    assert stop_prefix_length("abc", ("abc",)) == 0  # a whole stop string is found, not held


def _cut_at_first_stop(text: str, ends: list[int], stops: list[str]) -> str:
    """What a generation streamed as pieces ending at `ends` answers: the text before the first stop string
    found once a piece arrives (as vLLM checks after each token), or all of it."""
    for end in ends:
        found = [i for s in stops if (i := text[:end].find(s)) != -1]
        if found:
            return text[:min(found)]
    return text


@given(st.text(alphabet="ab\n", max_size=40), st.lists(st.integers(1, 6), max_size=40),
       st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), min_size=1, max_size=3))
@example(text="aba", sizes=[2], stops=["b", "aba"])  # "b" arrives first: "aba" is never completed
def test_streamed_text_is_the_answer_cut_at_the_first_stop(text: str, sizes: list[int], stops: list[str]) -> None:
    pieces, rest = [], text
    for size in [*sizes, len(text)]:
        piece, rest = rest[:size], rest[size:]
        pieces.append(piece)
        if not rest:
            break
    ends = [sum(len(p) for p in pieces[:k + 1]) for k in range(len(pieces))]
    final = _cut_at_first_stop(text, ends, stops)
    holdback = StopStringHoldback(tuple(stops))
    streamed = ""
    for piece in pieces:
        streamed += holdback.add(piece)
        assert final.startswith(streamed)  # nothing streamed is ever taken back
        if holdback.stopped:
            break
    if not holdback.stopped:
        streamed += holdback.flush()
    assert streamed == final
    assert holdback.stopped == any(s in text for s in stops)


def test_holdback_releases_text_that_stops_being_a_stop_prefix() -> None:
    holdback = StopStringHoldback(("\n\n",))
    assert holdback.add("ls -la\n") == "ls -la"
    assert holdback.add("x") == "\nx"
    assert holdback.add("\n\nmore") == "" and holdback.stopped
    assert holdback.text == "ls -la\nx"


# -- incremental text ---------------------------------------------------------------------------


@pytest.mark.parametrize("whole", [False, True], ids=["decode-stream", "whole-decode"])
def test_incremental_text_equals_decode(base_model_path: Path, whole: bool) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    tokenizer.clean_up_tokenization_spaces = whole  # the whole-decode path serves tokenizers that clean up
    text = "ls -la | grep 'ü' 😀 日本語\n<|im_end|> done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


# -- fields the engine honours ------------------------------------------------------------------


def _request(kind: str = "chat", n: int = 1, **extra: Any) -> EngineRequest:
    return EngineRequest(kind=kind, messages=[{"role": "user", "content": "hi"}] if kind == "chat" else None,  # type: ignore[arg-type]
                         prompt="hi" if kind == "completion" else None, params=SamplingParams(n=n), extra=extra)


@pytest.mark.parametrize("extra", [
    {"logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none", "parallel_tool_calls": True},
    {"top_k": -1, "min_p": 0, "repetition_penalty": 1, "skip_special_tokens": True, "add_special_tokens": False},
    {"response_format": {"type": "text"}, "logit_bias": {}, "cache_salt": "s"},
    {"ignore_eos": True, "min_tokens": 0},
])
def test_fields_at_values_the_engine_honours_pass(extra: dict[str, Any]) -> None:
    refuse_unhonoured_fields(_request(**extra), "embedded")


@pytest.mark.parametrize(("kind", "n", "field", "value"), [
    ("chat", 1, "tools", [{"type": "function", "function": {"name": "ls"}}]),
    ("chat", 1, "logprobs", True),
    ("completion", 1, "logprobs", 0),  # 0 still asks for the chosen tokens' log probabilities
    ("completion", 1, "best_of", 3),
    ("completion", 1, "add_special_tokens", False),
    ("chat", 1, "top_k", 5),
    ("chat", 1, "repetition_penalty", 1.1),
    ("chat", 1, "response_format", {"type": "json_object"}),
    ("chat", 1, "guided_regex", "a+"),
    ("chat", 1, "reasoning_effort", "low"),
    ("chat", 1, "some_future_field", 1),
])
def test_fields_the_engine_cannot_honour_are_refused_by_name(kind: str, n: int, field: str, value: Any) -> None:
    with pytest.raises(UnsupportedParameter) as caught:
        refuse_unhonoured_fields(_request(kind, n, **{field: value}), "embedded")
    assert caught.value.param == field and caught.value.status_code == 400


def test_best_of_equal_to_n_is_honoured() -> None:
    refuse_unhonoured_fields(_request("completion", 2, best_of=2), "embedded")


# -- the step-wise loop on the real model -------------------------------------------------------


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


@pytest.mark.model
@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_greedy_loop_equals_transformers_generate(base_model_path: Path, tmp_path: Path, with_adapter: bool) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    model: Any = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32).eval()
    if with_adapter:
        model = PeftModel.from_pretrained(model, str(random_lora(base_model_path, tmp_path / "lora", seed=5))).eval()
    max_new = 16
    for prompt in PROMPTS:
        ids = _chat_ids(tokenizer, prompt)
        with torch.inference_mode():
            inputs = torch.tensor([ids])
            expected = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new,
                                      do_sample=False)[0, len(ids):].tolist()
            loop = DecodeLoop(model, tokenizer, {tokenizer.eos_token_id})
            [sequence] = loop.add(ids, SamplingParams(temperature=0.0), max_new,
                                  adapter="default" if with_adapter else None)
            events = []
            while loop.live:
                events += [event for _, event in loop.step()]
        assert sequence.generated == [t for t in expected if t != tokenizer.eos_token_id]
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        assert events[-1] == Finished(0, "stop" if tokenizer.eos_token_id in expected else "length")


@pytest.mark.model
def test_ignore_eos_decodes_past_the_end_to_max_new(base_model_path: Path) -> None:
    """vLLM's `ignore_eos` (a fixed answer length, as benchmarks ask): the same greedy tokens up to the end of
    sequence, which is kept, then decoding goes on to `max_new`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    model: Any = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32).eval()
    ids = _chat_ids(tokenizer, PROMPTS[1])
    eos = tokenizer.eos_token_id
    loop = DecodeLoop(model, tokenizer, {eos})
    [ends] = loop.add(ids, SamplingParams(temperature=0.0), 48)
    [goes_on] = loop.add(ids, SamplingParams(temperature=0.0), 48, ignore_eos=True)
    while loop.live:
        loop.step()
    assert ends.finish_reason == "stop" and len(ends.generated) < 47  # the short answer ends on its own
    assert goes_on.finish_reason == "length" and len(goes_on.generated) == 48
    assert goes_on.generated[:len(ends.generated) + 1] == [*ends.generated, eos]


# -- the engine on the tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
async def engine(tiny_model_path: Path) -> AsyncIterator[EmbeddedEngine]:
    engine = EmbeddedEngine(tiny_model_path, threads=1)
    await engine.start()
    yield engine
    await engine.close()


async def _run(engine: EmbeddedEngine, **params: Any) -> tuple[dict[int, str], dict[int, str], Usage]:
    request = EngineRequest(kind="completion", prompt="Input: list files\nOutput:",
                            params=SamplingParams(**{"max_tokens": 20, "temperature": 0.0, **params}))
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    async for event in engine.generate(request):
        if isinstance(event, TextDelta):
            texts[event.index] = texts.get(event.index, "") + event.text
        elif isinstance(event, Finished):
            reasons[event.index] = event.reason
        elif isinstance(event, Usage):
            usage = event
    assert usage is not None
    return texts, reasons, usage


@pytest.mark.asyncio(loop_scope="module")
async def test_stop_string_cuts_the_streamed_answer(engine: EmbeddedEngine) -> None:
    texts, reasons, _ = await _run(engine)
    answer = texts[0]
    assert reasons == {0: "length"} and len(answer) > 12
    stop = answer[8:11]
    texts, reasons, _ = await _run(engine, stop=(stop, "\x00never"))
    assert texts.get(0, "") == answer[:answer.find(stop)] and reasons == {0: "stop"}


@pytest.mark.asyncio(loop_scope="module")
async def test_seeded_choices_replay_and_differ(engine: EmbeddedEngine) -> None:
    first = await _run(engine, temperature=1.0, seed=7, n=3)
    again = await _run(engine, temperature=1.0, seed=7, n=3)
    assert first[0] == again[0] and len(set(first[0].values())) == 3
    assert first[2].completion_tokens == 60
    one = await _run(engine, temperature=1.0, seed=7, n=1)
    assert one[0][0] == first[0][0]  # choice 0 draws from the seed itself


@pytest.mark.asyncio(loop_scope="module")
async def test_engine_refuses_an_unhonoured_field(engine: EmbeddedEngine) -> None:
    request = EngineRequest(kind="chat", messages=[{"role": "user", "content": "hi"}], params=SamplingParams(),
                            extra={"logprobs": True})
    with pytest.raises(UnsupportedParameter) as caught:
        await anext(aiter(engine.generate(request)))
    assert caught.value.param == "logprobs"
