"""Merged serving on real vLLM servers: a prompt's active version answered by a vLLM with its adapter merged into
the base weights (`PATCH /v1/prompts/{name} {"serving": {"mode": "merged"}}`), started and supervised by the gateway.

The engines run a tiny random Llama (head size 32, which vLLM's CPU attention accepts) in eager mode, one OMP thread
each: the main vLLM (LoRA) and the merged engine the gateway starts on a port of MERGED_PORTS. Run alone with
`pytest -m vllm tests/test_merged_serving.py`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import Settings
from gateway.engines.base import EngineEvent, EngineRequest, Finished, SamplingParams, TextDelta
from gateway.engines.merged import MergedRoutes
from gateway.engines.vllm import VLLMEngine
from gateway.local_server import free_port
from gateway.registry.store import PromptRegistry
from gateway.vllm_server import VLLMProcess, vllm_python
from tests.conftest import LiveServer, gateway_settings
from trainer.lora import random_lora

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUERIES = ["remove the folder build", "show running processes"]
MAX_TOKENS = 8
MAX_MODEL_LEN = 512


def template(tag: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": f"[{tag}] Translate the request into one bash command."},
            {"role": "user", "content": "Input: {query}\nOutput:"}]


def full(query: str, tag: str) -> list[dict[str, str]]:
    return [template(tag)[0], {"role": "user", "content": f"Input: {query}\nOutput:"}]


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@pytest.fixture(scope="module")
def vllm_tiny_model(base_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's tiny Llama with head size 32 (vLLM's CPU attention refuses 16): SmolLM2's tokenizer, random
    weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-vllm-model")
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=MAX_MODEL_LEN, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("merged")


@pytest.fixture(scope="module")
def main_vllm(vllm_tiny_model: Path, workdir: Path) -> Iterator[VLLMProcess]:
    if not vllm_python().exists():
        pytest.fail("the vLLM venv is missing: `make vllm-venv` (run by `make test`) creates it")
    process = VLLMProcess(Settings(), vllm_tiny_model, port=free_port(), log_path=workdir / "vllm.log", threads=1,
                          fast_start=True, max_model_len=MAX_MODEL_LEN)
    with process:
        yield process


@pytest.fixture(scope="module")
def adapters(vllm_tiny_model: Path, workdir: Path) -> dict[str, Path]:
    imports = workdir / "data" / "import"
    return {name: random_lora(vllm_tiny_model, imports / f"lora-{name}", seed=seed, scale=4.0)
            for name, seed in (("a", 31), ("b", 32))}


@pytest.fixture(scope="module")
def gateway(main_vllm: VLLMProcess, vllm_tiny_model: Path, workdir: Path) -> Iterator[LiveServer]:
    settings = gateway_settings(workdir, vllm_tiny_model, engine="vllm", vllm_url=main_vllm.url,
                                merged_ports=[free_port()], merged_fast_start=True, merged_threads=1,
                                max_model_len=MAX_MODEL_LEN, job_lease_seconds=15)
    with LiveServer(settings) as live:
        yield live


def register(gateway: LiveServer, name: str, adapter: Path) -> None:
    with gateway.admin() as admin:
        r = admin.post("/v1/prompts", json={"name": name, "messages": template(name), "adapter_path": str(adapter)})
        assert r.status_code == 201, r.text


def ask(url: str, name: str, query: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": BASE, "messages": full(query, name), "temperature": 0, "max_tokens": MAX_TOKENS})


def answers(url: str, name: str) -> list[str]:
    out = []
    for query in QUERIES:
        r = ask(url, name, query)
        assert r.status_code == 200 and r.headers["x-promptintern-route"] == "adapter", r.text
        out.append(r.json()["choices"][0]["message"]["content"])
    return out


def serving(gateway: LiveServer, name: str) -> dict[str, Any]:
    with gateway.admin() as admin:
        return admin.get(f"/v1/prompts/{name}").json()["serving"]  # type: ignore[no-any-return]


def merged_models(port: int) -> list[dict[str, Any]]:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["data"]  # type: ignore[no-any-return]
    except httpx.HTTPError:
        return []


class Traffic:
    """Requests for one prompt, one after another in a thread, every status kept: the window-of-errors check."""

    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.statuses.append(ask(self.url, self.name, QUERIES[0]).status_code)
            except httpx.HTTPError as exc:
                self.statuses.append(-1)
                print("traffic:", exc)
            time.sleep(1.0)  # steady traffic, leaving the CPUs to the engines starting

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=150)


@pytest.mark.vllm
def test_merged_engine_answers_like_the_adapter_through_new_versions_rollback_and_delete(
        gateway: LiveServer, main_vllm: VLLMProcess, adapters: dict[str, Path]) -> None:
    port = gateway.settings.merged_ports[0]
    register(gateway, "m", adapters["a"])
    lora_a = answers(gateway.url, "m")
    with Traffic(gateway.url, "m") as traffic, gateway.admin() as admin:
        r = admin.patch("/v1/prompts/m", json={"serving": {"mode": "merged", "url": None}})
        assert r.status_code == 200, r.text
        assert r.json()["serving"]["requested"] == "merged"
        assert wait_until(lambda: serving(gateway, "m")["current"] == "merged", 600), serving(gateway, "m")
        cards = merged_models(port)
        assert [c["id"] for c in cards] == ["m@v1"] and "merged-v1" in cards[0]["root"]
        assert answers(gateway.url, "m") == lora_a  # greedy: the merged weights answer as base + LoRA did

        # A new version: its adapter answers at once, its merged engine takes over once up.
        r = admin.post("/v1/prompts/m/adapters", json={"adapter_path": str(adapters["b"])})
        assert r.status_code == 201 and r.json()["version"] == 2
        lora_b = answers(gateway.url, "m")
        assert lora_b != lora_a and serving(gateway, "m")["current"] == "lora"
        assert wait_until(lambda: [c["id"] for c in merged_models(port)] == ["m@v2"]
                          and serving(gateway, "m")["current"] == "merged", 600), serving(gateway, "m")
        assert answers(gateway.url, "m") == lora_b

        # A rollback (v2 rejected, as the guard does): v1's adapter answers at once (v1 is merged again meanwhile).
        registry = PromptRegistry(gateway.settings.resolved_database_url)
        registry.update_version("m", 2, status="rejected", error="rolled back by the test")
        registry.close()
        assert wait_until(lambda: answers(gateway.url, "m") == lora_a, 30)
        assert serving(gateway, "m")["current"] == "lora"

        # Deleted (its v1 engine being merged or started): routing stops at once, the engine and its folder go.
        assert admin.delete("/v1/prompts/m").status_code == 204
        # (A merge under way has no engine yet: its folder goes once the next check stops it.)
        assert wait_until(lambda: not merged_models(port) and not (gateway.settings.adapter_dir / "m").exists(), 120)
    assert traffic.statuses and set(traffic.statuses) == {200}, traffic.statuses


@pytest.mark.vllm
def test_an_answer_under_way_on_a_merged_engine_finishes_when_the_route_goes(
        main_vllm: VLLMProcess, adapters: dict[str, Path]) -> None:
    """Unrouting (a rollback, a new version, back to LoRA) while an answer streams from the merged engine: the answer
    finishes there. The main vLLM stands in as the merged engine: it serves the adapter's id."""
    settings = Settings(engine="vllm", vllm_url=main_vllm.url)

    async def run() -> tuple[list[EngineEvent], list[EngineEvent]]:
        main = VLLMEngine(settings)
        routes = MergedRoutes(main, settings)
        await routes.start()
        await routes.load_adapter("u@v1", adapters["a"])
        await routes.route("u@v1", main_vllm.url)
        request = EngineRequest(kind="chat", adapter="u@v1", messages=full(QUERIES[0], "u"),
                                params=SamplingParams(max_tokens=32, temperature=0.0))
        stream = routes.generate(request)
        first = [await anext(stream)]
        await routes.unroute("u@v1")  # closes the merged engine's client only once this answer has ended
        rest = [event async for event in stream]
        after = [event async for event in routes.generate(request)]  # the adapter on the main engine now
        await routes.close()
        return first + rest, after

    during, after = asyncio.run(run())
    assert any(isinstance(e, Finished) for e in during) and any(isinstance(e, Finished) for e in after)
    text = "".join(e.text for e in during if isinstance(e, TextDelta))
    assert text and text == "".join(e.text for e in after if isinstance(e, TextDelta))


@pytest.mark.vllm
def test_merged_engine_at_a_url_is_routed_to_only_once_it_serves_the_version(
        gateway: LiveServer, main_vllm: VLLMProcess, adapters: dict[str, Path]) -> None:
    register(gateway, "remote", adapters["a"])
    lora = answers(gateway.url, "remote")
    with gateway.admin() as admin:
        # An engine that does not serve `remote@v1`: the adapter keeps answering, the error says why.
        elsewhere = f"http://127.0.0.1:{free_port()}/v1"
        r = admin.patch("/v1/prompts/remote", json={"serving": {"mode": "merged", "url": elsewhere}})
        assert r.status_code == 200 and r.json()["serving"]["url"] == elsewhere.removesuffix("/v1")
        assert wait_until(lambda: serving(gateway, "remote")["error"] is not None, 30)
        assert serving(gateway, "remote")["current"] == "lora" and answers(gateway.url, "remote") == lora
        # The main vLLM lists its LoRA adapters as models: it serves the id `remote@v1`, so it passes the check.
        r = admin.patch("/v1/prompts/remote", json={"serving": {"mode": "merged", "url": main_vllm.url}})
        assert r.status_code == 200
        assert wait_until(lambda: serving(gateway, "remote")["current"] == "merged", 30), serving(gateway, "remote")
        assert serving(gateway, "remote")["error"] is None and answers(gateway.url, "remote") == lora
        # Back to LoRA: at once.
        assert admin.patch("/v1/prompts/remote", json={"serving": None}).json()["serving"] == {
            "requested": "lora", "current": "lora", "url": None, "error": None}
        assert answers(gateway.url, "remote") == lora
        assert admin.delete("/v1/prompts/remote").status_code == 204


@pytest.mark.vllm
@pytest.mark.parametrize(("body", "param"), [
    ({"serving": {"mode": "fused"}}, "serving.mode"),
    ({"serving": {"mode": "merged", "port": 1}}, "serving.port"),
    ({"serving": {"mode": "lora", "url": "http://x:1"}}, "serving.url"),
    ({"serving": {"mode": "merged", "url": "ftp://x"}}, "serving.url"),
    ({"serving": {"mode": "merged", "url": "http://x:99999"}}, "serving.url"),
    ({"serving": {"mode": "merged", "url": "http://x/?q=1"}}, "serving.url"),
    ({"serving": "merged"}, "serving"),
])
def test_bad_serving_patches_are_422(gateway: LiveServer, adapters: dict[str, Path], body: dict[str, Any],
                                     param: str) -> None:
    with gateway.admin() as admin:
        if admin.get("/v1/prompts/bad").status_code == 404:
            register(gateway, "bad", adapters["a"])
        r = admin.patch("/v1/prompts/bad", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"].startswith(param)
        assert admin.get("/v1/prompts/bad").json()["serving"]["requested"] == "lora"


@pytest.mark.vllm
def test_more_local_merged_engines_than_allowed_is_422(gateway: LiveServer, adapters: dict[str, Path]) -> None:
    with gateway.admin() as admin:
        for name in ("one", "two"):
            register(gateway, name, adapters["a"])
        registry = PromptRegistry(gateway.settings.resolved_database_url)
        try:  # `one` asks for an engine (no replica gets to start it: the setting only is written here)
            registry.set_serving("one", {"mode": "merged", "url": None})
            r = admin.patch("/v1/prompts/two", json={"serving": {"mode": "merged"}})
            assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_merged_engines", r.text
            assert admin.patch("/v1/prompts/two", json={"serving": {"mode": "merged", "url": "http://x:1"}}
                               ).status_code == 200
        finally:
            registry.set_serving("one", None)
            registry.close()
        assert admin.patch("/v1/prompts/missing", json={"serving": {"mode": "merged"}}).status_code == 404
        for name in ("one", "two"):
            assert admin.delete(f"/v1/prompts/{name}").status_code == 204


def test_merged_serving_on_the_embedded_engine_is_422(tiny_server: LiveServer) -> None:
    with tiny_server.admin() as admin:
        assert admin.post("/v1/prompts", json={"name": "emb", "messages": template("emb")}).status_code == 201
        r = admin.patch("/v1/prompts/emb", json={"serving": {"mode": "merged"}})
        assert r.status_code == 422 and r.json()["error"]["code"] == "merged_needs_vllm", r.text
        body = admin.patch("/v1/prompts/emb", json={"serving": {"mode": "lora"}}).json()
        assert body["serving"] == {"requested": "lora", "current": "lora", "url": None, "error": None}


def test_the_merged_engine_lease_is_held_by_one_replica_and_taken_over_when_it_expires(database_url: str) -> None:
    registry = PromptRegistry(database_url)
    registry.create("p", "chat", template("p"), [])
    assert registry.claim_serving("p", "a", timedelta(seconds=60)) is None  # served by LoRA: nothing to hold
    registry.set_serving("p", {"mode": "merged", "url": None})
    assert registry.claim_serving("p", "a", timedelta(seconds=60)) is not None
    assert registry.claim_serving("p", "b", timedelta(seconds=60)) is None
    assert registry.update_serving_engine("p", "a", timedelta(seconds=60), endpoint="http://127.0.0.1:1", version=1)
    assert not registry.update_serving_engine("p", "b", timedelta(seconds=60), endpoint="http://127.0.0.1:2")
    before = registry.revision()
    registry.set_serving("p", {"mode": "merged", "url": None})  # the same setting again keeps the engine
    assert registry.get("p").serving["engine"]["endpoint"] == "http://127.0.0.1:1"  # type: ignore[index]
    assert registry.revision() == before + 1
    assert registry.update_serving_engine("p", "a", timedelta(seconds=-1))  # a's lease runs out
    taken = registry.claim_serving("p", "b", timedelta(seconds=60))
    assert taken is not None and taken["engine"]["owner"] == "b" and taken["engine"]["endpoint"] is None
    registry.release_serving("p", "a")  # not a's any more: nothing happens
    assert registry.get("p").serving["engine"]["owner"] == "b"  # type: ignore[index]
    registry.release_serving("p", "b")
    assert registry.get("p").serving == {"mode": "merged", "url": None}
    assert set(registry.merged_prompts()) == {"p"}
    registry.set_serving("p", None)
    assert registry.get("p").serving is None and registry.merged_prompts() == {}
    # A prompt deleted meanwhile: nothing to hold, record or release.
    assert registry.claim_serving("gone", "a", timedelta(seconds=60)) is None
    assert not registry.update_serving_engine("gone", "a", timedelta(seconds=60), error="x")
    registry.release_serving("gone", "a")
    registry.close()
