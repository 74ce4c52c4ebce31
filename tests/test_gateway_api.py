"""Routing, registry and error handling of a live gateway on a tiny model (fast, same code paths)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, LiveServer
from trainer.lora import random_lora as make_lora

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEMPLATE = [
    {"role": "system", "content": "Answer with one shell command.\nInput: show files\nOutput: ls"},
    {"role": "user", "content": "Input: {query}\nOutput:"},
]


def chat(server: LiveServer, body: dict[str, Any], **kw: Any) -> httpx.Response:
    payload = {"model": BASE, "max_tokens": 4, "temperature": 0, **body}
    return httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=120, **kw)


def full(query: str) -> list[dict[str, str]]:
    return [TEMPLATE[0], {"role": "user", "content": f"Input: {query}\nOutput:"}]


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def imports(tiny_server: LiveServer) -> Path:
    """The server's IMPORT_DIR (DATA_DIR/import): the only folder an `adapter_path` may name."""
    return Path(tiny_server.settings.resolved_import_dir)


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_path: Path, imports: Path) -> dict[str, Path]:
    return {
        "a": make_lora(tiny_model_path, imports / "tiny-a", seed=11, scale=20.0),
        "b": make_lora(tiny_model_path, imports / "tiny-b", seed=12, scale=20.0),
        "rank32": make_lora(tiny_model_path, imports / "tiny-r32", seed=13, rank=32),
        "mlp": make_lora(tiny_model_path, imports / "tiny-mlp", seed=14, targets=("gate_proj",)),
    }


@pytest.fixture(scope="module")
def admin(tiny_server: LiveServer) -> httpx.Client:
    return tiny_server.admin()


# -- operations and models ---------------------------------------------------------------------


def test_health_ready_and_models(tiny_server: LiveServer) -> None:
    assert httpx.get(f"{tiny_server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{tiny_server.url}/ready").json()["status"] == "ready"
    models = httpx.get(f"{tiny_server.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == BASE


def test_openapi_documents_every_route(tiny_server: LiveServer) -> None:
    spec = httpx.get(f"{tiny_server.url}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/prompts", "/v1/prompts/{name}",
                 "/v1/prompts/{name}/adapters", "/health", "/ready", "/metrics"):
        assert path in spec["paths"], path
    assert "404" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    schemas = spec["components"]["schemas"]
    assert "tool_calls" in schemas["ChatMessageOut"]["properties"]  # relayed from vLLM
    for choice in ("ChatChoice", "CompletionChoice"):
        assert {"type": "object", "additionalProperties": True} in schemas[choice]["properties"]["logprobs"]["anyOf"]


# -- OpenAI errors -----------------------------------------------------------------------------


def test_unknown_model_is_404(tiny_server: LiveServer) -> None:
    assert_error(chat(tiny_server, {"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}), 404,
                 "model_not_found")


def test_alias_means_the_base_model(tiny_server: LiveServer) -> None:
    r = chat(tiny_server, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["model"] == "gpt-4o-mini"


def test_malformed_json_is_400(tiny_server: LiveServer) -> None:
    r = httpx.post(f"{tiny_server.url}/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")


@pytest.mark.parametrize("body,param", [
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": "two"}, "n"),
])
def test_wrong_types_are_400_with_param(tiny_server: LiveServer, body: dict[str, Any], param: str) -> None:
    error = assert_error(chat(tiny_server, body), 400, "invalid_value")
    assert error["param"] and error["param"].startswith(param)


def test_missing_model_is_400(tiny_server: LiveServer) -> None:
    r = httpx.post(f"{tiny_server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert assert_error(r, 400)["param"] == "model"


def test_prompt_over_context_length_is_400(tiny_server: LiveServer) -> None:
    long_text = "word " * 2000  # the tiny model's context is 512 tokens
    assert_error(chat(tiny_server, {"messages": [{"role": "user", "content": long_text}]}), 400,
                 "context_length_exceeded")
    assert_error(chat(tiny_server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}), 400,
                 "context_length_exceeded")


def test_oversized_body_is_413(tiny_server: LiveServer) -> None:
    huge = "x" * (tiny_server.settings.max_request_bytes + 10)
    assert_error(chat(tiny_server, {"messages": [{"role": "user", "content": huge}]}), 413, "request_too_large")


def test_oversized_chunked_body_is_413_and_small_chunked_body_is_served(tiny_server: LiveServer) -> None:
    """Without a Content-Length (chunked transfer encoding) the limit still holds."""
    def chunked(body: dict[str, Any]) -> httpx.Response:
        data = json.dumps({"model": BASE, "max_tokens": 2, "temperature": 0, **body}).encode()
        parts = (data[i:i + 4096] for i in range(0, len(data), 4096))
        return httpx.post(f"{tiny_server.url}/v1/chat/completions", content=parts, timeout=120,
                          headers={"content-type": "application/json"})

    huge = "x" * (tiny_server.settings.max_request_bytes + 10)
    assert_error(chunked({"messages": [{"role": "user", "content": huge}]}), 413, "request_too_large")
    ok = chunked({"messages": [{"role": "user", "content": "list files"}]})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] >= 1


def test_tools_pass_through_and_the_embedded_engine_refuses_them(tiny_server: LiveServer) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    error = assert_error(chat(tiny_server, {"messages": full("list files"), "tools": tools}), 400,
                         "unsupported_parameter")
    assert error["param"] == "tools"


def test_openai_sdk_raises_typed_errors(tiny_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], temperature=9)


# -- OpenAI features ---------------------------------------------------------------------------


def test_n_choices_and_stop(tiny_server: LiveServer) -> None:
    r = chat(tiny_server, {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3,
                           "temperature": 1.0, "seed": 1})
    assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert r.headers["x-promptintern-route"] == "passthrough"
    base = chat(tiny_server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).json()
    text = base["choices"][0]["message"]["content"]
    assert len(text) > 3, f"the tiny model's greedy answer is deterministic and longer than this: {text!r}"
    stop = text[2:4]
    stopped = chat(tiny_server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                                 "stop": [stop]}).json()
    assert stopped["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(tiny_server: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 1.0, "seed": 42}
    assert chat(tiny_server, body).json()["choices"] == chat(tiny_server, body).json()["choices"]


def test_streaming_sse_ends_with_done_and_usage(tiny_server: LiveServer) -> None:
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{tiny_server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    plain = chat(tiny_server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).json()
    assert streamed == plain["choices"][0]["message"]["content"]


def test_completions_stream(tiny_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="x", max_retries=0)
    stream = client.completions.create(model=BASE, prompt="Hello", max_tokens=4, temperature=0, stream=True)
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text == client.completions.create(model=BASE, prompt="Hello", max_tokens=4, temperature=0).choices[0].text


# -- registry ----------------------------------------------------------------------------------


def test_registry_needs_the_admin_key(tiny_server: LiveServer) -> None:
    assert_error(httpx.get(f"{tiny_server.url}/v1/prompts"), 401, "invalid_admin_key")
    assert_error(httpx.get(f"{tiny_server.url}/v1/prompts", headers={"Authorization": "Bearer wrong"}), 401)
    ok = httpx.get(f"{tiny_server.url}/v1/prompts", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert ok.status_code == 200


@pytest.mark.parametrize("body,code", [
    ({"messages": [{"role": "user", "content": "no slot here"}]}, "invalid_template"),
    ({"messages": [{"role": "user", "content": "unbalanced {query"}]}, "invalid_template"),
    ({"messages": [{"role": "user", "content": "a {q} b {q}"}]}, "invalid_template"),
    ({"messages": [{"role": "user", "content": "{a}{b}"}]}, "invalid_template"),
    ({"prompt": "x {q}", "messages": [{"role": "user", "content": "{q}"}]}, "invalid_template"),
    ({"messages": [{"role": "user", "content": "Q: {query}"}], "examples": [{"query": "absent", "response": "x"}]},
     "example_not_in_template"),
    ({"messages": [{"role": "user", "content": "Q: {query}"}], "adapter_path": "/nonexistent"}, "invalid_import_path"),
])
def test_invalid_registrations_are_422_and_create_nothing(admin: httpx.Client, body: dict[str, Any],
                                                          code: str) -> None:
    assert_error(admin.post("/v1/prompts", json={"name": "bad", **body}), 422, code)
    assert admin.get("/v1/prompts/bad").status_code == 404


def test_bad_names_and_bodies(admin: httpx.Client) -> None:
    assert_error(admin.post("/v1/prompts", json={"name": "a/b", "prompt": "{q}"}), 422, "invalid_name")
    assert_error(admin.post("/v1/prompts", json={"prompt": "{q}"}), 422)
    assert_error(admin.post("/v1/prompts", json={"name": "x", "prompt": "{q}", "bogus": 1}), 422)
    assert_error(admin.get("/v1/prompts/missing"), 404, "prompt_not_found")
    assert_error(admin.delete("/v1/prompts/missing"), 404, "prompt_not_found")


def test_adapters_that_do_not_fit_are_refused(admin: httpx.Client, tiny_adapters: dict[str, Path],
                                              base_model_path: Path, module_tmp: Path, imports: Path) -> None:
    assert_error(admin.post("/v1/prompts", json={"name": "r32", "prompt": "R: {q}",
                                                 "adapter_path": str(tiny_adapters["rank32"])}), 422,
                 "adapter_rank_too_large")
    other_model = make_lora(base_model_path, imports / "smol-lora", seed=3)  # wrong hidden size
    assert_error(admin.post("/v1/prompts", json={"name": "misfit", "prompt": "M: {q}",
                                                 "adapter_path": str(other_model)}), 422, "adapter_mismatch")
    assert admin.get("/v1/prompts/misfit").status_code == 404
    assert not (module_tmp / "adapters" / "misfit").exists()
    # An adapter for other modules of the same architecture does fit.
    r = admin.post("/v1/prompts", json={"name": "mlp", "prompt": "MLP: {q}", "adapter_path": str(tiny_adapters["mlp"])})
    assert r.status_code == 201 and r.json()["status"] == "ready"
    assert admin.delete("/v1/prompts/mlp").status_code == 204


def test_duplicate_name_is_409(admin: httpx.Client) -> None:
    assert admin.post("/v1/prompts", json={"name": "dup", "prompt": "D: {q}"}).status_code == 201
    assert_error(admin.post("/v1/prompts", json={"name": "dup", "prompt": "D2: {q}"}), 409, "prompt_exists")
    assert admin.delete("/v1/prompts/dup").status_code == 204


def test_prompt_lifecycle_fallback_adapter_new_version_delete(
        tiny_server: LiveServer, admin: httpx.Client, tiny_adapters: dict[str, Path]) -> None:
    r = admin.post("/v1/prompts", json={"name": "shell", "messages": TEMPLATE,
                                        "examples": [{"query": "show files", "response": "ls"}]})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "registered" and r.json()["active_version"] is None

    # Registered, no adapter: matched, full prompt to the base model.
    fallback = chat(tiny_server, {"messages": full("make a dir")})
    assert fallback.headers["x-promptintern-route"] == "fallback"
    assert fallback.headers["x-promptintern-prompt"] == "shell"
    assert fallback.headers["x-promptintern-saved-tokens"] == "0"
    base_answer = chat(tiny_server, {"messages": full("make a dir"), "model": "gpt-4o-mini"}).json()
    assert fallback.json()["choices"] == base_answer["choices"]

    # Upload version 1: now the adapter answers the bare query.
    v1 = admin.post("/v1/prompts/shell/adapters", json={"adapter_path": str(tiny_adapters["a"])})
    assert v1.status_code == 201 and v1.json()["version"] == 1 and v1.json()["status"] == "ready"
    routed = chat(tiny_server, {"messages": full("make a dir")})
    assert routed.headers["x-promptintern-route"] == "adapter"
    assert int(routed.headers["x-promptintern-saved-tokens"]) > 0
    direct = chat(tiny_server, {"model": "shell@v1", "messages": [{"role": "user", "content": "make a dir"}]})
    assert direct.headers["x-promptintern-route"] == "adapter"
    assert routed.json()["choices"] == direct.json()["choices"]
    assert routed.json()["choices"] != fallback.json()["choices"]

    # Version 2 replaces version 1.
    v2 = admin.post("/v1/prompts/shell/adapters", json={"adapter_path": str(tiny_adapters["b"])})
    assert v2.json()["version"] == 2
    models = [m["id"] for m in httpx.get(f"{tiny_server.url}/v1/models").json()["data"]]
    assert "shell@v2" in models and "shell@v1" not in models
    assert_error(chat(tiny_server, {"model": "shell@v1", "messages": [{"role": "user", "content": "x"}]}), 404)
    direct2 = chat(tiny_server, {"model": "shell@v2", "messages": [{"role": "user", "content": "make a dir"}]})
    assert chat(tiny_server, {"messages": full("make a dir")}).json()["choices"] == direct2.json()["choices"]
    body = admin.get("/v1/prompts/shell").json()
    assert body["active_version"] == 2 and [v["status"] for v in body["versions"]] == ["ready", "ready"]
    assert body["versions"][1]["manifest"]["prompt_hash"]

    # Delete: routing stops at once, files go.
    assert admin.delete("/v1/prompts/shell").status_code == 204
    after = chat(tiny_server, {"messages": full("make a dir")})
    assert after.headers["x-promptintern-route"] == "passthrough"
    assert not (Path(tiny_server.settings.adapter_dir) / "shell").exists()
    assert "shell@v2" not in [m["id"] for m in httpx.get(f"{tiny_server.url}/v1/models").json()["data"]]


def test_matching_normalises_crlf_trailing_space_and_text_parts(tiny_server: LiveServer, admin: httpx.Client,
                                                                  tiny_adapters: dict[str, Path]) -> None:
    assert admin.post("/v1/prompts", json={"name": "norm", "messages": TEMPLATE,
                                           "adapter_path": str(tiny_adapters["a"])}).status_code == 201
    try:
        crlf = [{"role": "system", "content": TEMPLATE[0]["content"].replace("\n", "\r\n") + "  \n"},
                {"role": "user", "content": "Input: go home\r\nOutput:"}]
        assert chat(tiny_server, {"messages": crlf}).headers["x-promptintern-route"] == "adapter"
        parts = [{"role": "system", "content": [{"type": "text", "text": TEMPLATE[0]["content"]}]},
                 {"role": "user", "content": [{"type": "text", "text": "Input: go home"}, {"type": "text",
                                                                                         "text": "Output:"}]}]
        assert chat(tiny_server, {"messages": parts}).headers["x-promptintern-route"] == "adapter"
        changed = [{"role": "system", "content": TEMPLATE[0]["content"] + "!"},
                   {"role": "user", "content": "Input: go home\nOutput:"}]
        assert chat(tiny_server, {"messages": changed}).headers["x-promptintern-route"] == "passthrough"
        # n > 1 is never stripped.
        multi = chat(tiny_server, {"messages": full("go home"), "n": 2})
        assert multi.headers["x-promptintern-route"] == "passthrough"
    finally:
        admin.delete("/v1/prompts/norm")


def test_adapter_missing_from_engine_falls_back_for_that_request(tiny_server: LiveServer, admin: httpx.Client,
                                                                 tiny_adapters: dict[str, Path]) -> None:
    assert admin.post("/v1/prompts", json={"name": "evicted", "messages": TEMPLATE,
                                           "adapter_path": str(tiny_adapters["a"])}).status_code == 201
    try:
        engine = tiny_server.app.state.engine
        asyncio.run(engine.unload_adapter("evicted@v1"))  # as if the engine lost it (restart, eviction)
        r = chat(tiny_server, {"messages": full("go")})
        assert r.status_code == 200
        assert r.headers["x-promptintern-route"] == "fallback"
        expected = chat(tiny_server, {"model": "gpt-4o-mini", "messages": full("go")}).json()["choices"]
        assert r.json()["choices"] == expected
    finally:
        admin.delete("/v1/prompts/evicted")


def _sample(text: str, series: str) -> float:
    """The value of one exposition line (0 when the series is not there yet)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_routes_and_adapters(tiny_server: LiveServer) -> None:
    passthrough = 'promptintern_requests_total{prompt="none",route="passthrough",tenant="none"}'
    unknown_model = 'promptintern_request_errors_total{code="404",route="none"}'
    too_long = 'promptintern_request_errors_total{code="400",route="passthrough"}'
    before = httpx.get(f"{tiny_server.url}/metrics").text
    assert chat(tiny_server, {"messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert chat(tiny_server, {"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}).status_code == 404
    assert chat(tiny_server, {"messages": [{"role": "user", "content": "word " * 2000}]}).status_code == 400
    text = httpx.get(f"{tiny_server.url}/metrics").text
    for series in (passthrough, unknown_model, too_long):
        assert _sample(text, series) == _sample(before, series) + 1, series
    for name in ("promptintern_requests_total", "promptintern_original_prompt_tokens_total",
                 "promptintern_sent_prompt_tokens_total", "promptintern_saved_prompt_tokens_total",
                 "promptintern_saved_cost_usd_total", "promptintern_request_duration_seconds_bucket",
                 "promptintern_time_to_first_token_seconds_bucket", "promptintern_detection_duration_seconds_bucket",
                 "promptintern_adapters", "promptintern_request_errors_total"):
        assert name in text, name


def test_cli_manages_prompts_on_a_running_gateway(tiny_server: LiveServer, tiny_adapters: dict[str, Path],
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    monkeypatch.setenv("PROMPTINTERN_ADMIN_KEY", ADMIN_KEY)
    template = tmp_path / "t.json"
    template.write_text(json.dumps({"prompt": "CLI: {q}"}))

    def run(*argv: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_info:
            main(["prompts", "--url", tiny_server.url, *argv])
        return int(exit_info.value.code or 0), capsys.readouterr().out

    code, out = run("register", "cli", "--file", str(template), "--adapter", str(tiny_adapters["a"]))
    assert code == 0 and json.loads(out)["status"] == "ready"
    code, out = run("list")
    assert code == 0 and "cli" in [p["name"] for p in json.loads(out)["data"]]
    code, out = run("add-adapter", "cli", str(tiny_adapters["b"]))
    assert code == 0 and json.loads(out)["version"] == 2
    code, out = run("register", "cli", "--file", str(template))
    assert code == 1 and json.loads(out)["error"]["code"] == "prompt_exists"
    assert run("delete", "cli")[0] == 0
    code, out = run("show", "cli")
    assert code == 1 and json.loads(out)["error"]["code"] == "prompt_not_found"


def test_full_prompt_adapter_is_sent_the_full_prompt(tiny_server: LiveServer, admin: httpx.Client,
                                                     tiny_adapters: dict[str, Path], imports: Path) -> None:
    """An adapter trained with the prompt kept (the full-prompt baseline) must see the prompt at inference."""
    import shutil

    folder = imports / "full-prompt-adapter"
    shutil.copytree(tiny_adapters["a"], folder)
    (folder / "manifest.json").write_text(json.dumps({"inference": "full_prompt"}))
    assert admin.post("/v1/prompts", json={"name": "fullft", "messages": TEMPLATE,
                                           "adapter_path": str(folder)}).status_code == 201
    try:
        r = chat(tiny_server, {"messages": full("go")})
        assert r.headers["x-promptintern-route"] == "adapter"
        assert r.headers["x-promptintern-saved-tokens"] == "0"
        usage = r.json()["usage"]
        assert usage["promptintern"]["saved_prompt_tokens"] == 0
        direct = chat(tiny_server, {"model": "fullft@v1", "messages": full("go")})
        assert r.json()["choices"] == direct.json()["choices"]
        assert usage["prompt_tokens"] == direct.json()["usage"]["prompt_tokens"]
    finally:
        admin.delete("/v1/prompts/fullft")
