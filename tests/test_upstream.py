"""Upstream provider mode against a real upstream over HTTP: a second gateway, in its own process, on the tiny model.

The upstream takes only its own key (`UPSTREAM_KEY`), so every answer that comes through proves that the front
gateway sent its UPSTREAM_API_KEY and never the client's key. The upstream's `/metrics` tells whether a request
reached it at all.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.local_server import LocalGateway, free_port
from tests.conftest import gateway_settings
from tests.upstream_server import MODEL, UPSTREAM_KEY, UpstreamProcess
from trainer.lora import random_lora

CLIENT_KEY = "client-key"
TEMPLATE = [
    {"role": "system", "content": "Answer with one shell command.\nInput: show files\nOutput: ls\n"
                                  "Input: show the date\nOutput: date"},
    {"role": "user", "content": "Input: {query}\nOutput:"},
]
CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
UPSTREAM = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
HELLO = [{"role": "user", "content": "x"}]


def full(query: str) -> list[dict[str, str]]:
    return [TEMPLATE[0], {"role": "user", "content": f"Input: {query}\nOutput:"}]


@pytest.fixture(scope="module")
def upstream(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamProcess]:
    with UpstreamProcess(tmp_path_factory.mktemp("upstream"), tiny_model_path) as server:
        yield server


@contextmanager
def front_gateway(tmp: Path, model_path: Path, upstream_url: str, **overrides: Any) -> Iterator[LocalGateway]:
    values: dict[str, Any] = dict(upstream_url=upstream_url, upstream_api_key=UPSTREAM_KEY,
                                  upstream_models=[MODEL], api_keys=[CLIENT_KEY])
    with LocalGateway(gateway_settings(tmp, model_path, **{**values, **overrides})) as server:
        yield server


@pytest.fixture(scope="module")
def front(upstream: UpstreamProcess, tiny_model_path: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    with front_gateway(tmp_path_factory.mktemp("front"), tiny_model_path, f"{upstream.url}/v1") as server:
        yield server


def post(url: str, body: dict[str, Any], path: str = "/v1/chat/completions",
         headers: dict[str, str] | None = None) -> httpx.Response:
    payload = {"model": MODEL, "max_tokens": 6, "temperature": 0, **body}
    return httpx.post(f"{url}{path}", json=payload, headers=CLIENT if headers is None else headers, timeout=120)


def streamed(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[str]:
    """The `data:` payloads of a streamed answer, `[DONE]` included."""
    payload = {"model": MODEL, "max_tokens": 6, "temperature": 0, "stream": True, **body}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=payload, headers=headers or CLIENT,
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def metric(url: str, name: str, **labels: str) -> float:
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and wanted <= set(match.group(1).split(",")):
            total += float(match.group(2))
    return total


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


def test_the_upstream_refuses_the_clients_key(upstream: UpstreamProcess) -> None:
    """So an answer through the front proves the front used its own key."""
    assert post(upstream.url, {"messages": [{"role": "user", "content": "hi"}]}).status_code == 401
    assert post(upstream.url, {"messages": [{"role": "user", "content": "hi"}]}, headers=UPSTREAM).status_code == 200


def test_passthrough_is_relayed_whole_and_billed_from_the_upstreams_usage(front: LocalGateway,
                                                                           upstream: UpstreamProcess) -> None:
    body = {"messages": [{"role": "user", "content": "what is the capital of France?"}]}
    before = upstream.requests()
    sent_before = metric(front.url, "promptintern_sent_prompt_tokens_total", prompt="none")
    relayed = post(front.url, body)
    assert relayed.status_code == 200, relayed.text
    assert relayed.headers["x-promptintern-route"] == "passthrough"
    assert upstream.requests() == before + 1
    direct = post(upstream.url, body, headers=UPSTREAM).json()
    answer = relayed.json()
    assert answer["model"] == MODEL and answer["object"] == "chat.completion"
    assert answer["choices"] == direct["choices"] and answer["usage"] == direct["usage"]
    assert answer["id"] != direct["id"]  # the upstream's own ids, relayed as they came
    billed = direct["usage"]["prompt_tokens"]
    assert metric(front.url, "promptintern_sent_prompt_tokens_total", prompt="none") == sent_before + billed
    assert metric(front.url, "promptintern_upstream_requests_total", route="passthrough", code="200") >= 1


def test_a_stream_is_relayed_chunk_by_chunk_and_the_added_usage_chunk_kept_from_a_client_that_did_not_ask(
        front: LocalGateway, upstream: UpstreamProcess) -> None:
    body = {"messages": [{"role": "user", "content": "tell me a story"}]}
    whole = post(upstream.url, body, headers=UPSTREAM).json()
    sent_before = metric(front.url, "promptintern_sent_prompt_tokens_total", prompt="none")
    data = streamed(front.url, body)
    assert data[-1] == "[DONE]"
    # The gateway asked for the usage chunk all the same, and counted what the upstream billed.
    assert metric(front.url, "promptintern_sent_prompt_tokens_total",
                  prompt="none") == sent_before + whole["usage"]["prompt_tokens"]
    chunks = [json.loads(d) for d in data[:-1]]
    assert len(chunks) > 2 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert not any(c.get("usage") for c in chunks)
    text = "".join(choice["delta"].get("content") or "" for c in chunks for choice in c["choices"])
    assert text == whole["choices"][0]["message"]["content"]

    asked = streamed(front.url, {**body, "stream_options": {"include_usage": True}})
    assert asked[-1] == "[DONE]"
    last = json.loads(asked[-2])
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]


def test_a_completion_list_prompt_is_the_upstreams_to_judge(front: LocalGateway) -> None:
    answer = post(front.url, {"prompt": ["one", "two"]}, path="/v1/completions")
    single = post(front.url, {"prompt": "one"}, path="/v1/completions")
    assert single.status_code == 200 and single.headers["x-promptintern-route"] == "passthrough"
    assert single.json()["object"] == "text_completion"
    # The upstream (a gateway) answers one prompt per request: its 400, relayed.
    assert "single prompt" in assert_openai_error(answer, 400)["message"]


def test_registered_prompt_falls_back_to_the_upstream_and_its_adapter_answers_locally(
        front: LocalGateway, upstream: UpstreamProcess, tiny_model_path: Path) -> None:
    with front.admin() as admin:
        assert admin.post("/v1/prompts", json={"name": "shell", "messages": TEMPLATE}).status_code == 201
        before = upstream.requests()
        fallback = post(front.url, {"messages": full("make a dir")})
        assert fallback.status_code == 200, fallback.text
        assert fallback.headers["x-promptintern-route"] == "fallback"
        assert upstream.requests() == before + 1
        streamed_fallback = streamed(front.url, {"messages": full("make a dir")})
        assert streamed_fallback[-1] == "[DONE]" and upstream.requests() == before + 2
        assert metric(front.url, "promptintern_upstream_requests_total", route="fallback", code="200") == 2

        folder = random_lora(tiny_model_path, front.settings.resolved_import_dir / "shell-a", seed=11, scale=20.0)
        added = admin.post("/v1/prompts/shell/adapters", json={"adapter_path": str(folder)})
        assert added.status_code == 201, added.text
    before = upstream.requests()
    saved_before = metric(front.url, "promptintern_saved_prompt_tokens_total", prompt="shell")
    local = post(front.url, {"messages": full("make a dir")})
    assert local.status_code == 200 and local.headers["x-promptintern-route"] == "adapter"
    assert local.json()["model"] == MODEL
    assert streamed(front.url, {"messages": full("make a dir")})[-1] == "[DONE]"
    assert upstream.requests() == before  # no upstream call for the adapter route
    saved = local.json()["usage"]["promptintern"]["saved_prompt_tokens"]
    assert saved > 0
    assert metric(front.url, "promptintern_saved_prompt_tokens_total", prompt="shell") == saved_before + 2 * saved


def test_an_upstream_4xx_is_relayed_with_its_status_and_message(front: LocalGateway,
                                                                upstream: UpstreamProcess) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "guided_regex": "[a-z]+"}
    direct = assert_openai_error(post(upstream.url, body, headers=UPSTREAM), 400)
    relayed = assert_openai_error(post(front.url, body), 400)
    assert relayed == direct
    with httpx.stream("POST", f"{front.url}/v1/chat/completions", headers=CLIENT, timeout=60,
                      json={"model": MODEL, "stream": True, **body}) as response:
        response.read()
        assert response.status_code == 400 and response.json()["error"] == direct


def test_models_lists_the_named_upstream_models(front: LocalGateway) -> None:
    models = httpx.get(f"{front.url}/v1/models", headers=CLIENT).json()["data"]
    assert [m["id"] for m in models if m.get("owned_by") == "upstream"] == [MODEL]
    assert post(front.url, {"model": "other-model", "messages": [{"role": "user", "content": "x"}]}).status_code == 404


def test_upstream_refusing_the_gateways_key_is_a_502(upstream: UpstreamProcess, tiny_model_path: Path,
                                                    tmp_path: Path) -> None:
    with front_gateway(tmp_path, tiny_model_path, f"{upstream.url}/v1", upstream_api_key="wrong-key") as bad:
        error = assert_openai_error(post(bad.url, {"messages": [{"role": "user", "content": "hi"}]}), 502)
        assert "upstream" in error["message"] and "401" in error["message"]
        with httpx.stream("POST", f"{bad.url}/v1/chat/completions", headers=CLIENT, timeout=60,
                          json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            r.read()
            assert r.status_code == 502


def test_upstream_down_is_a_502_and_every_other_model_name_goes_to_it(tiny_model_path: Path, tmp_path: Path) -> None:
    with front_gateway(tmp_path, tiny_model_path, f"http://127.0.0.1:{free_port()}/v1", upstream_models=[]) as down:
        models = httpx.get(f"{down.url}/v1/models", headers=CLIENT).json()["data"]
        assert not any(m.get("owned_by") == "upstream" for m in models)
        for model in (MODEL, "any-model"):
            started = time.monotonic()
            error = assert_openai_error(post(down.url, {"model": model, "messages": HELLO}), 502)
            assert "upstream" in error["message"] and time.monotonic() - started < 10
        base = post(down.url, {"model": down.settings.served_model_name, "messages": HELLO})
        assert base.status_code == 200 and base.headers["x-promptintern-route"] == "passthrough"
        assert metric(down.url, "promptintern_upstream_requests_total", route="passthrough", code="502") == 2


def test_upstream_slower_than_the_read_timeout_is_a_504(upstream: UpstreamProcess, tiny_model_path: Path,
                                                       tmp_path: Path) -> None:
    with front_gateway(tmp_path, tiny_model_path, f"{upstream.url}/v1", upstream_read_timeout=0.05) as impatient:
        body = {"messages": [{"role": "user", "content": "write a long essay"}], "max_tokens": 400}
        started = time.monotonic()
        error = assert_openai_error(post(impatient.url, body), 504)
        assert "upstream" in error["message"] and time.monotonic() - started < 10
        assert metric(impatient.url, "promptintern_upstream_requests_total", route="passthrough", code="504") == 1


def test_an_adapter_refusing_a_field_sends_the_request_to_the_upstream(front: LocalGateway, upstream: UpstreamProcess,
                                                                       tiny_model_path: Path) -> None:
    """Locally the adapter cannot honour `guided_regex`; the upstream judges it (this one refuses it too)."""
    template = [{"role": "system", "content": "Translate to French, one word.\nEnglish: cat\nFrench: chat"},
                {"role": "user", "content": "English: {word}\nFrench:"}]
    folder = random_lora(tiny_model_path, front.settings.resolved_import_dir / "french", seed=12, scale=20.0)
    with front.admin() as admin:
        registered = admin.post("/v1/prompts", json={"name": "french", "messages": template,
                                                     "adapter_path": str(folder)})
        assert registered.status_code == 201, registered.text
    messages = [template[0], {"role": "user", "content": "English: dog\nFrench:"}]
    assert post(front.url, {"messages": messages}).headers["x-promptintern-route"] == "adapter"
    body = {"messages": messages, "guided_regex": "[a-z]+"}
    before = upstream.requests()
    relayed = post(front.url, body)
    assert upstream.requests() == before + 1
    assert relayed.headers.get("x-promptintern-route") is None  # an error answer carries no route header
    assert assert_openai_error(relayed, 400) == assert_openai_error(post(upstream.url, body, headers=UPSTREAM), 400)
    assert metric(front.url, "promptintern_upstream_requests_total", route="fallback", code="400") == 1


def test_an_upstream_dying_mid_stream_ends_the_stream_with_one_error_event(tiny_model_path: Path,
                                                                          tmp_path: Path) -> None:
    with UpstreamProcess(tmp_path / "up", tiny_model_path) as dying, \
            front_gateway(tmp_path / "front", tiny_model_path, f"{dying.url}/v1") as relay:
        payload = {"model": MODEL, "max_tokens": 400, "temperature": 0, "stream": True,
                   "messages": [{"role": "user", "content": "write a very long essay"}]}
        data: list[str] = []
        started = time.monotonic()
        with httpx.stream("POST", f"{relay.url}/v1/chat/completions", json=payload, headers=CLIENT,
                          timeout=60) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    data.append(line[6:])
                    if len(data) == 3:
                        dying.process.kill()
        assert time.monotonic() - started < 60
        assert data[-1] == "[DONE]"
        error = json.loads(data[-2])["error"]
        assert error["type"] == "upstream_error" and "upstream" in error["message"]
        assert all("error" not in json.loads(d) for d in data[:-2])
        assert metric(relay.url, "promptintern_upstream_requests_total", route="passthrough", code="502") == 1
