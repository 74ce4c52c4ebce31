"""The embedded engine's continuous batching on the tiny model: requests on the base model and on several
adapters decoded together answer as each does alone; a request whose consumer goes away gives its place
back; a full engine answers EngineOverloaded; adapters unloaded or reloaded while requests run leave those
requests their own weights. Expected answers are each request run alone on the same engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.engines.base import (
    AdapterNotLoaded,
    EngineEvent,
    EngineOverloaded,
    EngineRequest,
    Finished,
    SamplingParams,
    TextDelta,
    Usage,
)
from gateway.engines.embedded import EmbeddedEngine
from trainer.lora import random_lora

IN_MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
PROMPTS = ["Input: list files\nOutput:", "hi", "Translate to bash: count the lines of every .py file under src",
           "What is 2+2?"]
LONG = 400  # tokens of a request meant to still be running while the test looks at the engine


@pytest.fixture(scope="module")
def loras(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("batching-loras")
    return [random_lora(tiny_model_path, root / f"lora-{seed}", seed=seed) for seed in (11, 12, 13)]


@pytest.fixture(scope="module")
async def engine(tiny_model_path: Path, loras: list[Path]) -> AsyncIterator[EmbeddedEngine]:
    engine = EmbeddedEngine(tiny_model_path, threads=2)
    await engine.start()
    for i, path in enumerate(loras[:2]):
        await engine.load_adapter(f"p{i}@v1", path)
    yield engine
    await engine.close()


def _request(prompt: str, adapter: str | None = None, max_tokens: int = 24, **params: object) -> EngineRequest:
    return EngineRequest(kind="completion", prompt=prompt, adapter=adapter,
                         params=SamplingParams(**{"max_tokens": max_tokens, "temperature": 0.0, **params}))  # type: ignore[arg-type]


async def _answer(engine: EmbeddedEngine, request: EngineRequest) -> tuple[dict[int, str], dict[int, str], Usage]:
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
    assert usage is not None and set(reasons) == set(range(request.params.n))
    return texts, reasons, usage


async def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _started(engine: EmbeddedEngine, request: EngineRequest) -> tuple[AsyncIterator[EngineEvent], EngineEvent]:
    """A running generation and its first event."""
    stream = aiter(engine.generate(request))
    return stream, await anext(stream)


@IN_MODULE_LOOP
async def test_concurrent_requests_on_different_adapters_answer_as_each_alone(engine: EmbeddedEngine) -> None:
    requests = [_request(p, adapter, max_tokens=16 + 4 * i)
                for i, p in enumerate(PROMPTS) for adapter in (None, "p0@v1", "p1@v1")]
    requests += [_request(PROMPTS[0], "p1@v1", n=3), _request(PROMPTS[2], None, n=2, temperature=1.0, seed=5)]
    alone = [await _answer(engine, r) for r in requests]
    together = await asyncio.gather(*[_answer(engine, r) for r in requests])
    assert together == alone
    by_adapter = {r.adapter: a[0][0] for r, a in zip(requests, alone, strict=True) if r.prompt == PROMPTS[0]}
    assert len(set(by_adapter.values())) == 3  # the adapters answer differently: a wrong one would show


@IN_MODULE_LOOP
@pytest.mark.parametrize("leave", ["aclose", "cancel"])
async def test_a_client_that_goes_away_gives_its_place_back(engine: EmbeddedEngine, leave: str) -> None:
    engine.max_queued_requests = 1
    try:
        request = _request(PROMPTS[0], "p0@v1", max_tokens=LONG, temperature=1.0, seed=3)
        if leave == "aclose":
            stream, _ = await _started(engine, request)
            await stream.aclose()  # type: ignore[attr-defined]
        else:
            task = asyncio.create_task(_answer(engine, request))  # a non-streamed request waits for its answer
            await _wait_for(lambda: engine.rows_decoding == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await _wait_for(lambda: engine.requests_held == 0 and engine.rows_decoding == 0)
        _, reasons, _ = await _answer(engine, _request(PROMPTS[1], max_tokens=2))
        assert reasons == {0: "length"}
    finally:
        engine.max_queued_requests = 64


@IN_MODULE_LOOP
async def test_a_full_engine_answers_overloaded_with_a_retry_hint(engine: EmbeddedEngine) -> None:
    engine.max_queued_requests = 2
    try:
        running = [await _started(engine, _request(p, max_tokens=LONG, temperature=1.0, seed=1)) for p in PROMPTS[:2]]
        assert engine.requests_held == 2
        with pytest.raises(EngineOverloaded) as caught:
            await anext(aiter(engine.generate(_request(PROMPTS[2]))))
        error = caught.value
        assert (error.status_code, error.error_type, error.code) == (429, "rate_limit_error", "engine_overloaded")
        assert error.retry_after >= 1
        for stream, _ in running:
            await stream.aclose()  # type: ignore[attr-defined]
        await _wait_for(lambda: engine.requests_held == 0)
        await _answer(engine, _request(PROMPTS[2], max_tokens=2))
    finally:
        engine.max_queued_requests = 64


@IN_MODULE_LOOP
async def test_a_request_waits_while_the_batch_would_outgrow_its_token_bound(engine: EmbeddedEngine) -> None:
    engine.max_batch_tokens = LONG + 50  # room for one long request's padded rows, not two
    try:
        first, _ = await _started(engine, _request(PROMPTS[0], max_tokens=LONG, temperature=1.0, seed=2))
        second = asyncio.create_task(_answer(engine, _request(PROMPTS[1], max_tokens=2)))
        await _wait_for(lambda: engine.requests_held == 2)
        for _ in range(50):  # many steps later, the short second request would long be done had it started
            await anext(first)
        assert engine.rows_decoding == 1 and not second.done()  # both would pad the cache past the bound
        await first.aclose()  # type: ignore[attr-defined]
        _, reasons, _ = await second
        assert reasons == {0: "length"}
    finally:
        engine.max_batch_tokens = 65536


@IN_MODULE_LOOP
async def test_adapters_unloaded_or_reloaded_while_requests_run(engine: EmbeddedEngine, loras: list[Path]) -> None:
    await engine.load_adapter("gone@v1", loras[0])
    await engine.load_adapter("swapped@v1", loras[1])
    on_gone, on_swapped, on_other = (_request(PROMPTS[0], name, max_tokens=200)
                                     for name in ("gone@v1", "swapped@v1", "p1@v1"))
    expected = [await _answer(engine, r) for r in (on_gone, on_swapped, on_other)]
    await engine.load_adapter("new@v1", loras[2])
    expected_new = await _answer(engine, _request(PROMPTS[0], "new@v1", max_tokens=200))

    tasks = [asyncio.create_task(_answer(engine, r)) for r in (on_gone, on_swapped, on_other)]
    await _wait_for(lambda: engine.rows_decoding == 3)
    await engine.unload_adapter("gone@v1")
    await engine.load_adapter("swapped@v1", loras[2])  # a reload: later requests get the new weights
    assert engine.rows_decoding == 3  # all three still running: the changes happened under them
    assert "gone@v1" not in engine.loaded_adapters()
    with pytest.raises(AdapterNotLoaded):
        await anext(aiter(engine.generate(_request(PROMPTS[0], "gone@v1"))))
    after_reload = await _answer(engine, _request(PROMPTS[0], "swapped@v1", max_tokens=200))
    assert await asyncio.gather(*tasks) == expected  # each kept the weights it started with
    assert after_reload[0] == expected_new[0]
    await engine.unload_adapter("swapped@v1")
    await engine.unload_adapter("new@v1")
    await _answer(engine, _request(PROMPTS[1], "p0@v1", max_tokens=2))
    assert engine.loaded_adapters() == {"p0@v1", "p1@v1"}


def test_a_step_prefills_new_prompts_within_its_token_budget(tiny_model_path: Path) -> None:
    """Many new long prompts join over several steps, so the rows already running keep getting tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gateway.engines.sampling import PREFILL_TOKENS_PER_STEP, DecodeLoop

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    loop = DecodeLoop(model, tokenizer, set())
    [running] = loop.add([1, 2, 3], SamplingParams(temperature=0.0), 8)
    loop.step()
    prompt = list(range(5, 5 + PREFILL_TOKENS_PER_STEP * 2 // 5))  # two fit in one step's budget, not three
    for _ in range(3):
        loop.add(prompt, SamplingParams(temperature=0.0), 4)
    loop.step()
    assert len(loop.rows) == 3 and len(loop.pending) == 1 and len(running.generated) == 2
    loop.step()
    assert len(loop.rows) == 4 and not loop.pending and len(running.generated) == 3


@IN_MODULE_LOOP
async def test_the_engine_decodes_on_half_the_cores_while_a_training_runs(engine: EmbeddedEngine) -> None:
    import torch

    assert engine.threads == 2
    assert await engine.share_cores(True) == 1
    assert await engine._call(torch.get_num_threads) == 1  # the decoding thread's own count
    _, reasons, _ = await _answer(engine, _request(PROMPTS[1], max_tokens=2))
    assert reasons == {0: "length"}
    assert await engine.share_cores(False) == 2
    assert await engine._call(torch.get_num_threads) == 2
