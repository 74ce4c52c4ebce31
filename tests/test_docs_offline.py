"""`/docs` works with no network, and the OpenAPI document states the API's rules, keys and examples."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from core.config import Settings
from gateway.app import create_app
from gateway.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from gateway.prompts.protocol import AddAdapter, RegisterPrompt, TrainSpec
from tests.conftest import ADMIN_KEY

# Nothing runs the lifespan here: the docs page and the schema need no model.


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("docs")
    settings = Settings(data_dir=tmp / "data", adapter_dir=tmp / "adapters", admin_key=ADMIN_KEY)
    yield TestClient(create_app(settings))


@pytest.fixture(scope="module")
def openapi(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def test_docs_page_loads_swagger_from_the_gateway_itself(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "://" not in page.text, "the page must not name an external URL"
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(Path(a).name for a in assets) == ["favicon-32x32.png", "swagger-ui-bundle.js", "swagger-ui.css"]
    kinds = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for asset in assets:
        assert asset.startswith("/docs/assets/"), asset
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert response.headers["content-type"].startswith(kinds[Path(asset).suffix]), asset
    bundle = client.get("/docs/assets/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle" in bundle and len(bundle) > 500_000
    assert "url: '/openapi.json'" in page.text
    assert client.get("/redoc").status_code == 404  # ReDoc would load its script from a CDN


def test_swagger_ui_reads_openapi_3_1(client: TestClient, openapi: dict[str, Any]) -> None:
    """FastAPI writes OpenAPI 3.1, which Swagger UI renders from version 5 on."""
    assert openapi["openapi"].startswith("3.1")
    from swagger_ui_bundle import swagger_ui_path

    version = Path(str(swagger_ui_path)).name.removeprefix("swagger-ui-")
    assert int(version.split(".")[0]) >= 5, version


def test_admin_and_inference_routes_declare_their_bearer_scheme(openapi: dict[str, Any]) -> None:
    schemes = openapi["components"]["securitySchemes"]
    for name in ("AdminKey", "APIKey"):
        assert schemes[name]["type"] == "http" and schemes[name]["scheme"] == "bearer", name
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            expected = ([{"AdminKey": []}] if path.startswith("/v1/prompts")
                        else [{"APIKey": []}] if path.startswith("/v1/") else None)
            assert operation.get("security") == expected, f"{method.upper()} {path}"


def _one_of_required(schema: dict[str, Any]) -> list[list[str]]:
    return sorted(branch["required"] for branch in schema["oneOf"])


def test_the_schema_states_which_fields_exclude_each_other(openapi: dict[str, Any]) -> None:
    assert _one_of_required(json_body_schema(openapi, "/v1/prompts")) == [["messages"], ["prompt"]]
    train = json_body_schema(openapi, "/v1/prompts/{name}/train")
    assert _one_of_required(train) == [["data"], ["path"], ["source"]]
    # A branch forbids the other fields (null or absent), so a body with two matches no branch.
    branch = next(b for b in train["oneOf"] if b["required"] == ["data"])
    assert branch["properties"]["path"] == branch["properties"]["source"] == {"type": "null"}


def json_body_schema(openapi: dict[str, Any], path: str) -> dict[str, Any]:
    schema = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in schema:
        return openapi["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]  # type: ignore[no-any-return]
    return schema  # type: ignore[no-any-return]


@pytest.mark.parametrize("path,model", [
    ("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest),
    ("/v1/prompts", RegisterPrompt), ("/v1/prompts/{name}/train", TrainSpec),
    ("/v1/prompts/{name}/adapters", AddAdapter),
])
def test_request_bodies_carry_valid_examples(openapi: dict[str, Any], path: str, model: type[BaseModel]) -> None:
    examples = json_body_schema(openapi, path)["examples"]
    assert examples
    for example in examples:
        model.model_validate(example)


def test_the_examples_name_the_served_model(openapi: dict[str, Any]) -> None:
    """A fuzzer or a reader trying the examples reaches the model, not a 404 for an unknown model."""
    served = Settings().served_model_name
    assert {example["model"] for path in ("/v1/chat/completions", "/v1/completions")
            for example in json_body_schema(openapi, path)["examples"]} == {served}
