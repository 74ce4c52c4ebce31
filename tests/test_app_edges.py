"""Edge cases of the OpenAI surface, on `create_app` in process (TestClient, tiny model, embedded engine)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from core.config import Settings
from gateway.app import create_app
from tests.conftest import ADMIN_KEY, gateway_settings

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
API_KEY = "team-a-key-ключ"  # non-ASCII keys are allowed; comparing them must never fail


@pytest.fixture(scope="module")
def client(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = gateway_settings(tmp_path_factory.mktemp("edges"), tiny_model_path, api_keys=API_KEY)
    auth = f"Bearer {API_KEY}".encode()  # header values are bytes; a UTF-8 key is sent as its UTF-8 bytes
    with TestClient(create_app(settings), headers={"Authorization": auth}) as test_client:  # type: ignore[dict-item]
        yield test_client


def chat(client: TestClient, **fields: Any) -> Any:
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            **fields}
    return client.post("/v1/chat/completions", json=body)


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


def sse_chunks(response: Any) -> list[Any]:
    assert response.headers["content-type"].startswith("text/event-stream")
    data = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"}),
])
def test_an_unknown_field_is_a_400_naming_it(client: TestClient, path: str, body: dict[str, Any]) -> None:
    error = error_of(client.post(path, json={"model": BASE, **body, "frobnicate": 1}), 400)
    assert error["param"] == "frobnicate" and error["code"] == "unrecognized_argument"
    assert "frobnicate" in error["message"]


def test_a_vllm_extra_the_embedded_engine_cannot_honour_is_a_400_naming_it(client: TestClient) -> None:
    error = error_of(chat(client, top_k=5), 400)
    assert error["param"] == "top_k" and error["code"] == "unsupported_parameter"


def test_descriptive_fields_are_accepted(client: TestClient) -> None:
    response = chat(client, user="u-1", metadata={"team": "a"}, store=False, service_tier="auto")
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1])
def test_a_seed_outside_64_bits_is_a_400(client: TestClient, seed: int) -> None:
    assert error_of(chat(client, seed=seed, temperature=1.0), 400)["param"] == "seed"


@pytest.mark.parametrize("seed", [2**63 - 1, -1, 0])
def test_any_64_bit_seed_is_served(client: TestClient, seed: int) -> None:
    response = chat(client, seed=seed, temperature=1.0)
    assert response.status_code == 200, response.text


def test_an_empty_completion_prompt_is_a_400(client: TestClient) -> None:
    error = error_of(client.post("/v1/completions", json={"model": BASE, "prompt": ""}), 400)
    assert error["param"] == "prompt"


def test_bearer_keys_with_any_characters_are_a_401_not_a_500(client: TestClient) -> None:
    for token in ("ключ", "k\u00e9y", "x" * 5000):
        headers = {"Authorization": f"Bearer {token}".encode()}
        assert error_of(client.get("/v1/prompts", headers=headers), 401)["code"] == "invalid_admin_key"
        refused = client.post("/v1/chat/completions", headers=headers,
                              json={"model": BASE, "messages": [{"role": "user", "content": "hi"}]})
        assert error_of(refused, 401)["code"] == "invalid_api_key"
    assert client.get("/v1/prompts", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200


def test_a_chat_stream_is_shaped_as_openai_sends_it(client: TestClient) -> None:
    chunks = sse_chunks(chat(client, stream=True, stream_options={"include_usage": True}, max_tokens=4))
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["delta"] == {}
    assert all("usage" not in c for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert set(chunks[-1]["usage"]["promptintern"]) == {"original_prompt_tokens", "saved_prompt_tokens"}


def test_a_completion_stream_without_usage_has_no_usage_chunk(client: TestClient) -> None:
    chunks = sse_chunks(client.post("/v1/completions", json={"model": BASE, "prompt": "Hello", "max_tokens": 3,
                                                             "temperature": 0, "stream": True}))
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert all(c["choices"] and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_whole_answer_matches_its_documented_model(client: TestClient) -> None:
    from gateway.openai_api.responses import ChatCompletionResponse

    body = chat(client).json()
    assert ChatCompletionResponse.model_validate(body).model_dump(mode="json") == body


def test_an_admin_key_shorter_than_16_characters_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(admin_key="short")
    from gateway.cli import main

    monkeypatch.setenv("PROMPTINTERN_ADMIN_KEY", "short")
    monkeypatch.setenv("PROMPTINTERN_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exited:
        main(["serve"])
    assert exited.value.code == 2
    assert "PROMPTINTERN_ADMIN_KEY" in capsys.readouterr().err


@pytest.mark.parametrize("fields", [{"top_p": 5e-324}, {"temperature": 5e-324}, {"temperature": 1e-40, "top_p": 1e-46}])
def test_vanishing_temperature_or_top_p_is_served(client: TestClient, fields: dict[str, Any]) -> None:
    response = chat(client, **fields)
    assert response.status_code == 200, response.text
    completion = client.post("/v1/completions", json={"model": BASE, "prompt": "Hello", "max_tokens": 2, **fields})
    assert completion.status_code == 200, completion.text


def test_a_non_text_part_is_a_400_on_the_embedded_engine(client: TestClient) -> None:
    image = [{"type": "image_url", "image_url": {"url": "http://example.invalid/x.png"}}]
    error = error_of(chat(client, messages=[{"role": "user", "content": image}]), 400)
    assert error["code"] == "unsupported_parameter" and error["param"] == "messages.0.content"


def test_a_registry_database_locked_past_its_busy_timeout_is_a_503_and_the_retry_is_served(
        tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that waits out SQLite's busy timeout behind another process's write lock (or a PostgreSQL that is
    down) is a 503 with Retry-After in OpenAI's shape, not a 500; reads go on meanwhile; once the lock is gone,
    the same request is served and nothing was registered twice."""
    import sqlite3

    from sqlalchemy.engine import make_url

    import gateway.registry.db as db

    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)  # read when each connection opens
    settings = gateway_settings(tmp_path, tiny_model_path)
    body = {"name": "locked", "prompt": "L: {q}"}
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        other = sqlite3.connect(make_url(settings.resolved_database_url).database, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            response = admin.post("/v1/prompts", json=body)
            error = error_of(response, 503)
            assert error["type"] == "service_unavailable" and error["code"] == "registry_unavailable"
            assert "registry's database did not answer" in error["message"] and "INSERT" not in error["message"]
            assert response.headers["retry-after"] == "2"
            assert admin.get("/v1/prompts").status_code == 200  # WAL: readers are not blocked by the writer
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert admin.post("/v1/prompts", json=body).status_code == 201
        assert [p["name"] for p in admin.get("/v1/prompts").json()["data"]] == ["locked"]


def test_only_a_database_that_did_not_answer_is_called_unavailable(tmp_path: Path) -> None:
    """A locked SQLite database is a 503; a statement SQLite refuses (a bug: "no such table") stays a 500."""
    import sqlite3

    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    from gateway.errors import database_unavailable

    path = tmp_path / "db.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
    try:
        with pytest.raises(OperationalError) as locked, engine.begin() as connection:
            connection.execute(text("INSERT INTO t VALUES (1)"))
        with pytest.raises(OperationalError) as wrong, engine.connect() as connection:
            connection.execute(text("SELECT * FROM no_such_table"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        engine.dispose()
    assert database_unavailable(locked.value)
    assert not database_unavailable(wrong.value)


def test_a_registry_on_a_postgresql_that_is_down_is_a_503_and_is_used_again_once_it_is_back(
        tiny_model_path: Path, tmp_path: Path) -> None:
    from tests.pg import PostgresServer, find_server_programs

    server = PostgresServer(find_server_programs())  # its own: the session's server stays up for the others
    try:
        server.start()
        settings = gateway_settings(tmp_path, tiny_model_path, database_url=server.create_database("down"))
        with TestClient(create_app(settings), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            assert admin.post("/v1/prompts", json={"name": "before", "prompt": "B: {q}"}).status_code == 201
            server.halt()
            response = admin.post("/v1/prompts", json={"name": "during", "prompt": "D: {q}"})
            error = error_of(response, 503)
            assert error["code"] == "registry_unavailable" and response.headers["retry-after"] == "2"
            assert str(server.port) not in error["message"]  # the database's address is for the log only
            assert error_of(admin.get("/v1/prompts/before"), 503)["code"] == "registry_unavailable"
            server.resume()
            assert admin.post("/v1/prompts", json={"name": "during", "prompt": "D: {q}"}).status_code == 201
            assert [p["name"] for p in admin.get("/v1/prompts").json()["data"]] == ["before", "during"]
    finally:
        server.stop()
