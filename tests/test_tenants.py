"""Tenants: `API_KEYS` entries `tenant:key`; a prompt registered for a tenant is matched for that tenant's requests
only (its template stays private), its adapters are listed and served to that tenant only; global prompts serve
every caller, after the caller's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from core.config import Settings
from gateway.app import create_app
from tests.conftest import ADMIN_KEY, gateway_settings
from trainer.lora import random_lora

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEYS = {"alpha": "alpha-key-0001", "beta": "beta-key-0002", None: "plain-key-0003"}
TEMPLATE = [{"role": "system", "content": "You translate requests into one bash command, nothing else."},
            {"role": "user", "content": "Input: {query}\nOutput:"}]
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def client(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    keys = ",".join(f"{tenant}:{key}" if tenant else key for tenant, key in KEYS.items())
    settings = gateway_settings(tmp_path_factory.mktemp("tenants"), tiny_model_path, api_keys=keys)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def admin(client: TestClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def as_(tenant: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def ask(client: TestClient, tenant: str | None, model: str = BASE, query: str = "list files") -> Any:
    body = {"model": model, "max_tokens": 2, "temperature": 0,
            "messages": [TEMPLATE[0], {"role": "user", "content": f"Input: {query}\nOutput:"}]}
    return client.post("/v1/chat/completions", json=body, headers=as_(tenant))


def route(response: Any) -> tuple[str, str]:
    assert response.status_code == 200, response.text
    return response.headers["x-promptintern-route"], response.headers["x-promptintern-prompt"]


def upload(client: TestClient, admin: dict[str, str], name: str, folder: Path) -> Any:
    files = {f: (f, (folder / f).read_bytes(), "application/octet-stream") for f in (CONFIG_FILE, WEIGHTS_FILE)}
    return client.post(f"/v1/prompts/{name}/adapters", files=files, headers=admin)


def test_api_keys_name_their_tenant_at_the_first_colon() -> None:
    settings = Settings(api_keys="alpha:k:with:colons,plain")
    assert [(t, k.get_secret_value()) for t, k in settings.tenant_keys] == [("alpha", "k:with:colons"),
                                                                            (None, "plain")]
    assert settings.tenants == {"alpha"}
    for bad in (":no-tenant", "bad tenant:key", "alpha:"):
        with pytest.raises(ValidationError, match="tenant:key"):
            Settings(api_keys=bad)


def test_a_tenants_prompt_matches_its_own_requests_only(client: TestClient, admin: dict[str, str],
                                                        tiny_model_path: Path, tmp_path: Path) -> None:
    registered = client.post("/v1/prompts", headers=admin,
                             json={"name": "alpha-shell", "tenant": "alpha", "messages": TEMPLATE})
    assert registered.status_code == 201, registered.text
    assert registered.json()["tenant"] == "alpha"
    assert route(ask(client, "alpha")) == ("fallback", "alpha-shell")
    assert route(ask(client, "beta")) == ("passthrough", "")  # another tenant's template is not matched
    assert route(ask(client, None)) == ("passthrough", "")  # nor for a key of no tenant

    assert upload(client, admin, "alpha-shell", random_lora(tiny_model_path, tmp_path / "a", seed=5)).status_code == 201
    assert route(ask(client, "alpha")) == ("adapter", "alpha-shell")
    models = {t: {m["id"] for m in client.get("/v1/models", headers=as_(t)).json()["data"]} for t in KEYS}
    assert "alpha-shell@v1" in models["alpha"]
    assert "alpha-shell@v1" not in models["beta"] | models[None]
    refused = ask(client, "beta", model="alpha-shell@v1")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    assert route(ask(client, "alpha", model="alpha-shell@v1")) == ("adapter", "alpha-shell")
    assert client.delete("/v1/prompts/alpha-shell", headers=admin).status_code in (200, 204)


def test_a_tenant_gets_its_own_prompt_before_a_global_one(client: TestClient, admin: dict[str, str]) -> None:
    for body in ({"name": "global-shell", "messages": TEMPLATE},
                 {"name": "beta-shell", "tenant": "beta", "messages": TEMPLATE}):
        assert client.post("/v1/prompts", headers=admin, json=body).status_code == 201
    try:
        assert route(ask(client, "beta")) == ("fallback", "beta-shell")
        assert route(ask(client, "alpha")) == ("fallback", "global-shell")
        assert route(ask(client, None)) == ("fallback", "global-shell")
        listed = {p["name"]: p["tenant"] for p in client.get("/v1/prompts", headers=admin).json()["data"]}
        assert listed == {"global-shell": None, "beta-shell": "beta"}
    finally:
        for name in ("global-shell", "beta-shell"):
            client.delete(f"/v1/prompts/{name}", headers=admin)


def test_an_unknown_tenant_is_a_422_naming_the_configured_ones(client: TestClient, admin: dict[str, str]) -> None:
    response = client.post("/v1/prompts", headers=admin, json={"name": "x", "tenant": "gamma", "messages": TEMPLATE})
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("tenant", "unknown_tenant")
    assert "alpha" in error["message"] and "beta" in error["message"]
    assert client.get("/v1/prompts/x", headers=admin).status_code == 404


def test_admin_routes_stay_on_the_admin_key(client: TestClient) -> None:
    response = client.get("/v1/prompts", headers=as_("alpha"))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_admin_key"


def test_savings_are_counted_per_tenant_with_a_bounded_label(client: TestClient, admin: dict[str, str]) -> None:
    """`tenant` is a configured tenant or `none` (keys of no tenant): it can never take a value from a request."""
    assert client.post("/v1/prompts", headers=admin,
                       json={"name": "counted", "tenant": "beta", "messages": TEMPLATE}).status_code == 201
    try:
        for tenant in ("beta", "beta", None):
            ask(client, tenant)
        text = client.get("/metrics").text
        lines = [line for line in text.splitlines() if line.startswith("promptintern_requests_total{")]
        assert 'promptintern_requests_total{prompt="counted",route="fallback",tenant="beta"} 2.0' in lines
        passthrough = [line for line in lines if line.startswith(
            'promptintern_requests_total{prompt="none",route="passthrough",tenant="none"}')]
        assert len(passthrough) == 1 and float(passthrough[0].split()[-1]) >= 1  # with the module's other tests
        assert {line.split('tenant="')[1].split('"')[0] for line in lines} <= {"alpha", "beta", "none"}
    finally:
        client.delete("/v1/prompts/counted", headers=admin)
