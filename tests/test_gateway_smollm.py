"""End to end on the real SmolLM2 model: a live gateway, the official `openai` SDK, sync and async.

A registered prompt is detected, stripped and answered by its adapter; the answer must equal the
adapter's own greedy answer to the bare query computed directly with transformers + peft.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from core.templates import bare_query_messages, parse_template
from tests.conftest import ADMIN_KEY, LiveServer, gateway_settings
from trainer.lora import random_lora as make_lora

pytestmark = pytest.mark.model

SYSTEM = (
    "You translate requests into a single bash command. Answer with the command only.\n"
    "Examples:\nInput: list files in the current directory\nOutput: ls\n"
    "Input: show the current working directory\nOutput: pwd\n"
    "Input: count lines in file.txt\nOutput: wc -l file.txt"
)
TEMPLATE = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Input: {query}\nOutput:"}]
COMPLETION_TEMPLATE = "Translate to bash.\nInput: {query}\nOutput:"
QUERIES = ["delete all .tmp files in /var/tmp", "print the disk usage of my home directory"]
MAX_TOKENS = 12


def full_messages(query: str) -> list[dict[str, str]]:
    rendered = parse_template(messages=TEMPLATE).render({"query": query})
    assert isinstance(rendered, list)
    return rendered


class Reference:
    """Greedy answers computed directly with transformers + peft, outside the gateway."""

    def __init__(self, base_path: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        self.base_path = base_path
        self.model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)

    def answer(self, messages: list[dict[str, str]], adapter: Path | None = None) -> str:
        from peft import PeftModel

        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        model: Any = self.model
        if adapter is not None:
            model = PeftModel.from_pretrained(self.model, str(adapter))
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        if adapter is not None:
            model.unload()
        return str(self.tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True))


@pytest.fixture(scope="module")
def adapters(base_model_path: Path, module_tmp: Path) -> dict[str, Path]:
    imports = module_tmp / "data" / "import"  # the gateway's IMPORT_DIR (DATA_DIR/import)
    return {name: make_lora(base_model_path, imports / f"lora-{name}", seed=seed, scale=1.0)
            for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def reference(base_model_path: Path) -> Reference:
    return Reference(base_model_path)


@pytest.fixture(scope="module")
def server(base_model_path: Path, module_tmp: Path, adapters: dict[str, Path]) -> Iterator[LiveServer]:
    with LiveServer(gateway_settings(module_tmp, base_model_path)) as live, live.admin() as admin:
        r = admin.post("/v1/prompts", json={"name": "nl2bash", "messages": TEMPLATE,
                                            "adapter_path": str(adapters["a"])})
        assert r.status_code == 201, r.text
        r = admin.post("/v1/prompts", json={"name": "bash-completion", "prompt": COMPLETION_TEMPLATE,
                                            "adapter_path": str(adapters["b"])})
        assert r.status_code == 201, r.text
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_registered_prompt_is_ready_and_listed(server: LiveServer, client: openai.OpenAI) -> None:
    with server.admin() as admin:
        body = admin.get("/v1/prompts/nl2bash").json()
    assert body["status"] == "ready" and body["active_version"] == 1
    assert body["slots"] == ["query"]
    models = [m.id for m in client.models.list().data]
    assert models[0] == server.settings.served_model_name
    assert {"nl2bash@v1", "bash-completion@v1"} <= set(models)


def test_matched_prompt_is_stripped_and_answered_by_the_adapter(
        client: openai.OpenAI, reference: Reference, adapters: dict[str, Path]) -> None:
    query = QUERIES[0]
    raw = client.chat.completions.with_raw_response.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=full_messages(query),  # type: ignore[arg-type]
        temperature=0, max_tokens=MAX_TOKENS)
    completion = raw.parse()
    assert raw.headers["x-promptintern-route"] == "adapter"
    assert raw.headers["x-promptintern-prompt"] == "nl2bash"
    template = parse_template(messages=TEMPLATE)
    expected = reference.answer(bare_query_messages(template, {"query": query}), adapters["a"])
    assert completion.choices[0].message.content == expected
    # ...and the adapter is what answered: the base model says something else to the bare query.
    assert expected != reference.answer(bare_query_messages(template, {"query": query}))
    usage = completion.usage
    assert usage is not None
    extra = usage.model_extra or {}
    assert extra["promptintern"]["original_prompt_tokens"] > usage.prompt_tokens
    assert extra["promptintern"]["saved_prompt_tokens"] == extra["promptintern"]["original_prompt_tokens"] - \
        usage.prompt_tokens
    assert int(raw.headers["x-promptintern-saved-tokens"]) == extra["promptintern"]["saved_prompt_tokens"]
    # The prompt really was stripped: the model processed the bare query's tokens only.
    bare_ids = reference.tokenizer.apply_chat_template(bare_query_messages(template, {"query": query}),
                                                       tokenize=False, add_generation_prompt=True)
    assert usage.prompt_tokens == len(reference.tokenizer(bare_ids, add_special_tokens=False)["input_ids"])


def test_async_streaming_matches_and_reports_usage(server: LiveServer, reference: Reference,
                                                   adapters: dict[str, Path]) -> None:
    async def run() -> tuple[str, Any]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=full_messages(QUERIES[1]),  # type: ignore[arg-type]
            temperature=0, max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        await client.close()
        return "".join(parts), usage

    text, usage = asyncio.run(run())
    template = parse_template(messages=TEMPLATE)
    assert text == reference.answer(bare_query_messages(template, {"query": QUERIES[1]}), adapters["a"])
    assert usage is not None and (usage.model_extra or {})["promptintern"]["saved_prompt_tokens"] > 0


def test_completion_template_routes_to_its_adapter(client: openai.OpenAI, reference: Reference,
                                                   adapters: dict[str, Path]) -> None:
    query = QUERIES[0]
    raw = client.completions.with_raw_response.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", prompt=COMPLETION_TEMPLATE.format(query=query),
        temperature=0, max_tokens=MAX_TOKENS)
    assert raw.headers["x-promptintern-route"] == "adapter"
    assert raw.headers["x-promptintern-prompt"] == "bash-completion"
    template = parse_template(prompt=COMPLETION_TEMPLATE)
    expected = reference.answer(bare_query_messages(template, {"query": query}), adapters["b"])
    assert raw.parse().choices[0].text == expected


def test_unregistered_prompt_passes_through_unchanged(client: openai.OpenAI, reference: Reference) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    raw = client.chat.completions.with_raw_response.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=messages,  # type: ignore[arg-type]
        temperature=0, max_tokens=MAX_TOKENS)
    assert raw.headers["x-promptintern-route"] == "passthrough"
    assert raw.headers["x-promptintern-prompt"] == ""
    assert raw.parse().choices[0].message.content == reference.answer(messages)


def test_adapters_interleaved_under_concurrency_get_their_own_answers(
        server: LiveServer, reference: Reference, adapters: dict[str, Path]) -> None:
    template = parse_template(messages=TEMPLATE)
    expected_chat = {q: reference.answer(bare_query_messages(template, {"query": q}), adapters["a"]) for q in QUERIES}
    ctemplate = parse_template(prompt=COMPLETION_TEMPLATE)
    expected_completion = {q: reference.answer(bare_query_messages(ctemplate, {"query": q}), adapters["b"])
                           for q in QUERIES}

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        model = "HuggingFaceTB/SmolLM2-135M-Instruct"
        calls = []
        for q in QUERIES * 2:
            calls.append(client.chat.completions.create(model=model, messages=full_messages(q),  # type: ignore[arg-type]
                                                        temperature=0, max_tokens=MAX_TOKENS))
            calls.append(client.completions.create(model=model, prompt=COMPLETION_TEMPLATE.format(query=q),
                                                   temperature=0, max_tokens=MAX_TOKENS))
        results = await asyncio.gather(*calls)
        await client.close()
        for i, result in enumerate(results):
            q = (QUERIES * 2)[i // 2]
            if i % 2 == 0:
                assert result.choices[0].message.content == expected_chat[q]  # type: ignore[union-attr]
            else:
                assert result.choices[0].text == expected_completion[q]  # type: ignore[union-attr]

    asyncio.run(run())


def test_metrics_show_saved_tokens(server: LiveServer, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                   messages=full_messages(QUERIES[0]),  # type: ignore[arg-type]
                                   temperature=0, max_tokens=2)
    import httpx

    text = httpx.get(f"{server.url}/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    saved = samples['promptintern_saved_prompt_tokens_total{prompt="nl2bash",tenant="none"}']
    original = samples['promptintern_original_prompt_tokens_total{prompt="nl2bash",tenant="none"}']
    sent = samples['promptintern_sent_prompt_tokens_total{prompt="nl2bash",tenant="none"}']
    assert saved > 0 and saved == original - sent
    assert samples['promptintern_saved_cost_usd_total{prompt="nl2bash",tenant="none"}'] == pytest.approx(
        saved / 1000 * server.settings.price_input_per_1k)
    assert samples['promptintern_requests_total{prompt="nl2bash",route="adapter",tenant="none"}'] >= 1
    assert samples['promptintern_requests_total{prompt="none",route="passthrough",tenant="none"}'] >= 1
    assert samples['promptintern_adapters{status="ready"}'] == 2


def test_restart_keeps_registry_and_reloads_adapters(server: LiveServer, base_model_path: Path,
                                                     module_tmp: Path) -> None:
    """A second gateway on the same data dir and adapter store serves the adapters again."""
    settings = gateway_settings(module_tmp, base_model_path)
    with LiveServer(settings) as second:
        client = openai.OpenAI(base_url=f"{second.url}/v1", api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=full_messages(QUERIES[0]),  # type: ignore[arg-type]
            temperature=0, max_tokens=4)
        assert raw.headers["x-promptintern-route"] == "adapter"
        with httpx_admin(second.url) as admin:
            assert admin.get("/v1/prompts/nl2bash").json()["status"] == "ready"


def httpx_admin(url: str) -> Any:
    import httpx

    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
