"""A bounded schemathesis run over the OpenAPI schema: no input gets a 5xx, and the model answers some of it.

The app is `create_app` on the tiny test model, called in process (ASGI) with the admin key and an API key
as bearer tokens. As DESIGN.md's "Fuzzing in CI" says: training is excluded (`POST .../train`, and `train`
in registrations), hooks cap `max_tokens` and `n`, and "no 5xx" allows none at all here (502/503/504 are
for a dependency that is down, and nothing is). The last test checks that the run reached the model.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi

from core.adapter_store import read_adapter_config
from core.config import Settings
from core.errors import InvalidAdapter
from gateway.app import create_app
from gateway.errors import from_domain
from gateway.openai_api.protocol import DESCRIPTIVE_FIELDS, HANDLED_FIELDS
from tests.conftest import ADMIN_KEY, gateway_settings

API_KEY = "fuzz-api-key-0123456789"
MAX_TOKENS = 4
MAX_N = 2
INFERENCE = ("/v1/chat/completions", "/v1/completions")
# Generated cases per operation, on top of the schema's examples and the coverage phase. Derandomized: every run
# sends the same cases, so a red `make test` is a regression, not a lucky draw (explore with other seeds by hand).
MAX_EXAMPLES = 25
BASE_URL = f"http://{asgi.HOST}"

# The document only: the routes do not depend on settings, and nothing is loaded until a lifespan starts.
DOCUMENT = create_app(Settings(admin_key=ADMIN_KEY)).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT).exclude(path="/v1/prompts/{name}/train", method="POST")
TRAFFIC: Counter[tuple[str, int]] = Counter()  # (path, status) of every call the run made


@schema.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    """Keep generation short (a few tokens, at most two choices), never start training, and let valid bodies
    reach the model: positive inference cases keep only the fields the gateway interprets itself (the embedded
    engine refuses most others with a 400, which the negative cases and test_app_edges.py cover)."""
    body = case.body
    if not isinstance(body, dict):
        return case
    if case.operation.path == "/v1/prompts":
        body.pop("train", None)
    if case.operation.path not in INFERENCE:
        return case
    if case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE:
        for name in set(body) - HANDLED_FIELDS - DESCRIPTIVE_FIELDS:
            del body[name]
    for name in ("max_tokens", "max_completion_tokens", "min_tokens"):
        if isinstance(body.get(name), int) and body[name] > MAX_TOKENS:
            body[name] = MAX_TOKENS
    for name in ("n", "best_of"):
        if isinstance(body.get(name), int) and body[name] > MAX_N:
            body[name] = MAX_N
    return case


@pytest.fixture(scope="module")
def gateway(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The app on the tiny model behind a requests session that calls it in process (its lifespan started)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    app = create_app(gateway_settings(tmp, tiny_model_path, api_keys=API_KEY, default_max_tokens=MAX_TOKENS))
    assert app.openapi() == DOCUMENT
    try:
        with asgi.get_client(app) as client:
            yield client
    finally:
        asgi.shutdown_lifespans()


def bearer(path: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY if path.startswith('/v1/prompts') else API_KEY}"}


def openai_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


ROWS = [{"query": "list files in /tmp", "response": "ls /tmp"}, {"query": "show the date", "response": "date"}]


@pytest.mark.parametrize("body,code,param", [
    ({"name": "neither"}, "invalid_template", "messages"),
    ({"name": "both", "prompt": "Q: {query}", "messages": [{"role": "user", "content": "{query}"}]},
     "invalid_template", "messages"),
    ({"name": "nodata", "prompt": "Q: {query}", "train": {}}, "invalid_train_data", "train"),
    ({"name": "twodata", "prompt": "Q: {query}", "train": {"data": ROWS, "path": "rows.jsonl"}},
     "invalid_train_data", "train"),
])
def test_the_rules_the_schema_states_are_enforced(gateway: Any, body: dict[str, Any], code: str,
                                                   param: str) -> None:
    """`messages` xor `prompt` and `data` xor `path` are in the schema as `oneOf`, and answered 422 here."""
    error = openai_error(gateway.post(f"{BASE_URL}/v1/prompts", json=body, headers=bearer("/v1/prompts")), 422)
    assert (error["code"], error["param"]) == (code, param)
    assert gateway.get(f"{BASE_URL}/v1/prompts/{body['name']}", headers=bearer("/v1/prompts")).status_code == 404


@pytest.mark.parametrize("train", [{}, {"data": ROWS, "path": "rows.jsonl"}])
def test_a_train_request_needs_exactly_one_source(gateway: Any, train: dict[str, Any]) -> None:
    headers = bearer("/v1/prompts")
    gateway.post(f"{BASE_URL}/v1/prompts", json={"name": "rules", "prompt": "Q: {query}\nA:"}, headers=headers)
    error = openai_error(gateway.post(f"{BASE_URL}/v1/prompts/rules/train", json=train, headers=headers), 422)
    assert (error["code"], error["param"]) == ("invalid_train_data", "train")


@pytest.mark.parametrize("part", [{}, {"type": ""}, {"type": "text"}, {"type": "text", "text": 5}, "hi"])
def test_a_malformed_content_part_is_a_400_naming_it(gateway: Any, part: Any) -> None:
    body = {"model": Settings().served_model_name, "max_tokens": 2, "messages": [{"role": "user", "content": [part]}]}
    response = gateway.post(f"{BASE_URL}/v1/chat/completions", json=body, headers=bearer("/v1/chat/completions"))
    assert openai_error(response, 400)["param"] == "messages.0.content.parts.0"


@pytest.mark.parametrize("config", [{"r": "x"}, {"r": 8, "rank_pattern": [1]}, {"r": 8, "rank_pattern": {"q": "16"}},
                                    {"r": True}, {"r": -4}, {}])
def test_an_adapter_config_with_ranks_that_are_not_positive_integers_is_invalid(tmp_path: Path,
                                                                                config: dict[str, Any]) -> None:
    """Issue 12: `"r": "x"` and `"rank_pattern": [1]` were 500s; an adapter folder is client input."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(InvalidAdapter) as caught:
        read_adapter_config(tmp_path, max_rank=16)
    assert caught.value.code == "invalid_adapter" and caught.value.param == "adapter_path"
    assert from_domain(caught.value).status_code == 422


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_request_gets_a_server_error(case: schemathesis.Case, gateway: Any) -> None:
    headers = bearer(case.operation.path)
    response = case.call(session=gateway, base_url=BASE_URL, headers=headers)
    TRAFFIC[(case.operation.path, response.status_code)] += 1
    case.validate_response(response, checks=[not_a_server_error], headers=headers)


def test_the_run_reached_the_model() -> None:
    """The examples in the schema name the served model, so inference requests are answered, not 404s."""
    assert sum(TRAFFIC.values()) > 100, f"the fuzz run above must run first: {TRAFFIC}"
    for path in INFERENCE:
        assert TRAFFIC[(path, 200)] >= 1, f"no request to {path} was answered by the model: {TRAFFIC}"
    assert not [key for key in TRAFFIC if key[1] >= 500], f"server errors: {TRAFFIC}"
