"""Imports confined to IMPORT_DIR, adapters uploaded as files, `/ready` without internals, the CLI's upload and
its message when no gateway answers: on a live gateway with the tiny model."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.local_server import free_port
from gateway.prompts.imports import adapter_path_refused, train_path_refused
from tests.conftest import ADMIN_KEY, LiveServer, gateway_settings
from trainer.lora import random_lora

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEMPLATE = [
    {"role": "system", "content": "Answer with one shell command.\nInput: show files\nOutput: ls"},
    {"role": "user", "content": "Input: {query}\nOutput:"},
]
REQUEST_LIMIT = 4096  # smaller than any adapter: uploads pass only under their own limit
UPLOAD_LIMIT = 200_000
SECRET = b"root:$6$not-really-a-shadow-line:19000:0:99999:7:::\n"
ROW = {"query": "list files", "response": "ls"}


@pytest.fixture(scope="module")
def server(tiny_model_path: Path, module_tmp: Path) -> Iterator[LiveServer]:
    settings = gateway_settings(module_tmp, tiny_model_path, import_dir=module_tmp / "imports",
                                max_request_bytes=REQUEST_LIMIT, max_upload_bytes=UPLOAD_LIMIT)
    with LiveServer(settings) as live:
        yield live


@pytest.fixture(scope="module")
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    with server.admin() as client:
        yield client


@pytest.fixture(scope="module")
def imports(server: LiveServer) -> Path:
    return Path(server.settings.resolved_import_dir)


@pytest.fixture(scope="module")
def outside(tiny_model_path: Path, module_tmp: Path) -> Path:
    """A valid adapter, and a valid JSONL file, that lie outside IMPORT_DIR: never to be read through a path."""
    folder = random_lora(tiny_model_path, module_tmp / "outside" / "lora", seed=31, scale=20.0)
    (module_tmp / "outside" / "rows.jsonl").write_text(json.dumps(ROW) + "\n")
    return folder


@pytest.fixture(scope="module")
def secret(module_tmp: Path) -> Path:
    """Stands in for /etc/shadow: a file the process can read but no import may."""
    path = module_tmp / "shadow"
    path.write_bytes(SECRET)
    return path


def chat(server: LiveServer, query: str) -> httpx.Response:
    messages = [TEMPLATE[0], {"role": "user", "content": f"Input: {query}\nOutput:"}]
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                      json={"model": BASE, "messages": messages, "max_tokens": 4, "temperature": 0})


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


def assert_store_untouched(server: LiveServer, secret: Path) -> None:
    """No staging folder, no version folder, and the secret's bytes nowhere in the adapter store."""
    store = Path(server.settings.adapter_dir)
    leftovers = [p for p in store.rglob("*") if p.name.startswith(".tmp-") or p.name.startswith("v")]
    assert leftovers == []
    assert not any(SECRET in p.read_bytes() for p in store.rglob("*") if p.is_file() and not p.is_symlink())


def weights_of(folder: Path) -> bytes:
    return (folder / "adapter_model.safetensors").read_bytes()


# -- adapter_path: every way out is the same 422 ---------------------------------------------------------


def _outside_absolute(imports: Path, outside: Path, secret: Path) -> str:
    return str(outside)


def _dot_dot_relative(imports: Path, outside: Path, secret: Path) -> str:
    return os.path.relpath(outside, imports)  # ../outside/lora


def _dot_dot_absolute(imports: Path, outside: Path, secret: Path) -> str:
    return f"{imports}/../outside/lora"


def _symlinked_folder(imports: Path, outside: Path, secret: Path) -> str:
    link = imports / "link-out"
    if not link.is_symlink():
        link.symlink_to(outside, target_is_directory=True)
    return "link-out"


def _symlinked_weights(imports: Path, outside: Path, secret: Path) -> str:
    folder = imports / "shadow-weights"
    if not folder.exists():
        folder.mkdir()
        shutil.copy(outside / "adapter_config.json", folder / "adapter_config.json")
        (folder / "adapter_model.safetensors").symlink_to(secret)
    return "shadow-weights"


def _symlinked_config(imports: Path, outside: Path, secret: Path) -> str:
    folder = imports / "outside-config"
    if not folder.exists():
        folder.mkdir()
        (folder / "adapter_config.json").symlink_to(outside / "adapter_config.json")
        shutil.copy(outside / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    return str(folder)


def _pickled_bin(imports: Path, outside: Path, secret: Path) -> str:
    folder = imports / "pickled"
    if not folder.exists():
        folder.mkdir()
        shutil.copy(outside / "adapter_config.json", folder / "adapter_config.json")
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: never opened
    return "pickled"


def _missing(imports: Path, outside: Path, secret: Path) -> str:
    return "no-such-adapter"


def _missing_outside(imports: Path, outside: Path, secret: Path) -> str:
    return "/no/such/folder/anywhere"


def _a_file(imports: Path, outside: Path, secret: Path) -> str:
    (imports / "notes.txt").write_text("not a folder")
    return "notes.txt"


REFUSED_ADAPTERS: list[Callable[[Path, Path, Path], str]] = [
    _outside_absolute, _dot_dot_relative, _dot_dot_absolute, _symlinked_folder, _symlinked_weights,
    _symlinked_config, _pickled_bin, _missing, _missing_outside, _a_file,
]


@pytest.mark.parametrize("where", REFUSED_ADAPTERS, ids=lambda f: f.__name__.strip("_"))
def test_an_adapter_path_that_leads_out_or_nowhere_is_one_and_the_same_422(
        server: LiveServer, admin: httpx.Client, imports: Path, outside: Path, secret: Path,
        where: Callable[[Path, Path, Path], str]) -> None:
    adapter_path = where(imports, outside, secret)
    registered = admin.post("/v1/prompts", json={"name": "refused", "messages": TEMPLATE,
                                                 "adapter_path": adapter_path})
    error = error_of(registered, 422, "invalid_import_path")
    assert error["param"] == "adapter_path" and error["message"] == adapter_path_refused().message
    assert admin.get("/v1/prompts/refused").status_code == 404

    assert admin.post("/v1/prompts", json={"name": "kept", "messages": TEMPLATE}).status_code == 201
    try:
        added = admin.post("/v1/prompts/kept/adapters", json={"adapter_path": adapter_path})
        assert error_of(added, 422, "invalid_import_path") == error
        assert admin.get("/v1/prompts/kept").json()["versions"] == []
    finally:
        assert admin.delete("/v1/prompts/kept").status_code == 204
    assert_store_untouched(server, secret)


def test_an_adapter_inside_import_dir_is_served_by_relative_or_absolute_path(
        server: LiveServer, admin: httpx.Client, imports: Path, outside: Path) -> None:
    shutil.copytree(outside, imports / "team" / "lora")
    (imports / "linked-inside").symlink_to(imports / "team", target_is_directory=True)  # stays inside: fine
    assert admin.post("/v1/prompts", json={"name": "inside", "messages": TEMPLATE,
                                           "adapter_path": "linked-inside/lora"}).status_code == 201
    try:
        added = admin.post("/v1/prompts/inside/adapters", json={"adapter_path": str(imports / "team" / "lora")})
        assert added.status_code == 201 and added.json()["status"] == "ready", added.text
        assert added.json()["manifest"]["uploaded_from"] == str(imports / "team" / "lora")
        assert chat(server, "make a dir").headers["x-promptintern-route"] == "adapter"
    finally:
        assert admin.delete("/v1/prompts/inside").status_code == 204


# -- training `path`: the same confinement ---------------------------------------------------------------


@pytest.fixture(scope="module")
def untrained(admin: httpx.Client) -> Iterator[str]:
    """A prompt of its own template, so requests made by other tests never match it."""
    template = [{"role": "user", "content": "Translate to bash: {query}"}]
    assert admin.post("/v1/prompts", json={"name": "untrained", "messages": template}).status_code == 201
    yield "untrained"
    admin.delete("/v1/prompts/untrained")


@pytest.mark.parametrize("where", ["absolute-outside", "dot-dot", "symlink-out", "missing", "a-folder"])
def test_a_training_path_that_leads_out_or_nowhere_is_one_and_the_same_422(
        admin: httpx.Client, imports: Path, outside: Path, untrained: str, where: str) -> None:
    rows = outside.parent / "rows.jsonl"
    if where == "symlink-out" and not (imports / "rows-link.jsonl").is_symlink():
        (imports / "rows-link.jsonl").symlink_to(rows)
    (imports / "a-folder").mkdir(exist_ok=True)
    path = {"absolute-outside": str(rows), "dot-dot": os.path.relpath(rows, imports),
            "symlink-out": "rows-link.jsonl", "missing": "no-such-rows.jsonl", "a-folder": "a-folder"}[where]
    error = error_of(admin.post(f"/v1/prompts/{untrained}/train", json={"path": path}), 422, "invalid_import_path")
    assert error["param"] == "train.path" and error["message"] == train_path_refused().message
    registered = admin.post("/v1/prompts", json={"name": "with-train", "messages": TEMPLATE,
                                                 "train": {"path": path}})
    assert error_of(registered, 422, "invalid_import_path") == error
    assert admin.get(f"/v1/prompts/{untrained}").json()["job"] is None
    assert admin.get("/v1/prompts/with-train").status_code == 404


def test_a_training_file_inside_import_dir_is_read(admin: httpx.Client, imports: Path, untrained: str) -> None:
    (imports / "rows.jsonl").write_text("\n".join(json.dumps(ROW) for _ in range(4)) + "\n")
    # The rows pass (the error is the schedule's): the file was read, and no job is queued.
    r = admin.post(f"/v1/prompts/{untrained}/train", json={"path": "rows.jsonl", "schedule": {"preset": "none"}})
    assert error_of(r, 422, "invalid_schedule")["param"] == "train.schedule"
    (imports / "bad-rows.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps({"query": "x"}) + "\n")
    r = admin.post(f"/v1/prompts/{untrained}/train", json={"path": "bad-rows.jsonl"})
    assert error_of(r, 422, "invalid_train_data")["param"] == "train.path"
    assert admin.get(f"/v1/prompts/{untrained}").json()["job"] is None


# -- uploads ---------------------------------------------------------------------------------------------


def upload(admin: httpx.Client, name: str, files: dict[str, bytes]) -> httpx.Response:
    return admin.post(f"/v1/prompts/{name}/adapters",
                      files={field: (field, content, "application/octet-stream") for field, content in files.items()})


def adapter_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def test_an_uploaded_adapter_becomes_a_ready_version_and_routes(server: LiveServer, admin: httpx.Client,
                                                               outside: Path) -> None:
    assert len(weights_of(outside)) > REQUEST_LIMIT  # past the JSON limit: the upload has its own
    assert admin.post("/v1/prompts", json={"name": "uploaded", "messages": TEMPLATE}).status_code == 201
    try:
        assert chat(server, "make a dir").headers["x-promptintern-route"] == "fallback"
        files = {**adapter_files(outside), "manifest.json": json.dumps({"inference": "bare"}).encode()}
        r = upload(admin, "uploaded", files)
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.json()["status"] == "ready"
        assert r.json()["manifest"]["uploaded_from"] == "upload"
        routed = chat(server, "make a dir")
        assert routed.headers["x-promptintern-route"] == "adapter"
        assert int(routed.headers["x-promptintern-saved-tokens"]) > 0
        stored = Path(server.settings.adapter_dir) / "uploaded" / "v1"
        assert weights_of(stored) == weights_of(outside)
        assert json.loads((stored / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE
    finally:
        assert admin.delete("/v1/prompts/uploaded").status_code == 204


def _bad_config(**change: Any) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    def edit(files: dict[str, bytes]) -> dict[str, bytes]:
        config = {**json.loads(files["adapter_config.json"]), **change}
        return {**files, "adapter_config.json": json.dumps(config).encode()}
    return edit


BAD_UPLOADS: dict[str, tuple[Callable[[dict[str, bytes]], dict[str, bytes]], str, str]] = {
    "no weights": (lambda f: {"adapter_config.json": f["adapter_config.json"]}, "invalid_upload",
                   "adapter_model.safetensors"),
    "pickled weights": (lambda f: {"adapter_config.json": f["adapter_config.json"],
                                   "adapter_model.bin": f["adapter_model.safetensors"]}, "invalid_upload",
                        "adapter_model.bin"),
    "weights not safetensors": (lambda f: {**f, "adapter_model.safetensors": b"\x80\x04K\x01." * 10},
                                "invalid_adapter", "adapter_model.safetensors"),
    "config not JSON": (lambda f: {**f, "adapter_config.json": b"{not json"}, "invalid_adapter",
                        "adapter_config.json"),
    "rank a string": (_bad_config(r="x"), "invalid_adapter", "adapter_config.json"),
    "rank_pattern a list": (_bad_config(rank_pattern=[1]), "invalid_adapter", "adapter_config.json"),
    "rank too large": (_bad_config(r=64), "adapter_rank_too_large", "adapter_config.json"),
    "not LoRA": (_bad_config(peft_type="PREFIX_TUNING"), "invalid_adapter", "adapter_config.json"),
    "manifest not an object": (lambda f: {**f, "manifest.json": b"[1]"}, "invalid_adapter", "manifest.json"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_a_bad_upload_is_a_422_naming_its_part_and_leaves_nothing(server: LiveServer, admin: httpx.Client,
                                                                  outside: Path, secret: Path, case: str) -> None:
    edit, code, param = BAD_UPLOADS[case]
    assert admin.post("/v1/prompts", json={"name": "bad-upload", "messages": TEMPLATE}).status_code == 201
    try:
        error = error_of(upload(admin, "bad-upload", edit(adapter_files(outside))), 422, code)
        assert error["param"] == param
        assert admin.get("/v1/prompts/bad-upload").json()["versions"] == []
    finally:
        assert admin.delete("/v1/prompts/bad-upload").status_code == 204
    assert_store_untouched(server, secret)


def test_a_text_field_or_an_unknown_prompt_is_refused(admin: httpx.Client, outside: Path) -> None:
    assert admin.post("/v1/prompts", json={"name": "fields", "messages": TEMPLATE}).status_code == 201
    try:
        r = admin.post("/v1/prompts/fields/adapters", data={"adapter_config.json": "{}"},
                       files={"adapter_model.safetensors": ("w", weights_of(outside))})
        assert error_of(r, 422, "invalid_upload")["param"] == "adapter_config.json"
        r = admin.post("/v1/prompts/fields/adapters", content=b"adapter_path=x",
                       headers={"content-type": "application/x-www-form-urlencoded"})
        error_of(r, 415, "unsupported_media_type")
    finally:
        assert admin.delete("/v1/prompts/fields").status_code == 204
    error_of(upload(admin, "nobody", adapter_files(outside)), 404, "prompt_not_found")


def test_an_oversized_upload_is_413_declared_or_chunked(admin: httpx.Client, outside: Path) -> None:
    assert admin.post("/v1/prompts", json={"name": "big", "messages": TEMPLATE}).status_code == 201
    try:
        huge = {**adapter_files(outside), "adapter_model.safetensors": b"\0" * (UPLOAD_LIMIT + 1)}
        error_of(upload(admin, "big", huge), 413, "request_too_large")

        def chunked(files: dict[str, bytes]) -> httpx.Response:
            request = admin.build_request("POST", "/v1/prompts/big/adapters", files={
                name: (name, content, "application/octet-stream") for name, content in files.items()})
            body = request.read()
            return admin.post("/v1/prompts/big/adapters", headers={"content-type": request.headers["content-type"]},
                              content=(body[i:i + 8192] for i in range(0, len(body), 8192)))  # no Content-Length

        error_of(chunked(huge), 413, "request_too_large")
        ok = chunked(adapter_files(outside))
        assert ok.status_code == 201 and ok.json()["status"] == "ready", ok.text
    finally:
        assert admin.delete("/v1/prompts/big").status_code == 204


def test_openapi_documents_both_content_types(server: LiveServer) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    body = spec["paths"]["/v1/prompts/{name}/adapters"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["required"] == ["adapter_path"]
    form = body["multipart/form-data"]["schema"]
    assert form["required"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert "manifest.json" in form["properties"]
    assert {"413", "415", "422"} <= set(spec["paths"]["/v1/prompts/{name}/adapters"]["post"]["responses"])


# -- /ready ----------------------------------------------------------------------------------------------


def test_ready_says_what_is_up(server: LiveServer) -> None:
    r = httpx.get(f"{server.url}/ready")
    assert r.status_code == 200 and r.json() == {"status": "ready", "engine": "up", "registry": "up"}


def test_ready_says_what_is_down_without_internals(tiny_model_path: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    vllm_url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the engine is down
    settings = gateway_settings(tmp_path, tiny_model_path, engine="vllm", vllm_url=vllm_url)
    with TestClient(create_app(settings)) as client, caplog.at_level(logging.WARNING, logger="gateway.app"):
        r = client.get("/ready")
    assert r.status_code == 503
    assert r.json() == {"status": "not_ready", "engine": "down", "registry": "up"}
    assert vllm_url in caplog.text  # the reason is in the log, not in the answer


# -- the CLI ---------------------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from gateway.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_cli_uploads_an_adapter_folder_to_a_live_gateway(server: LiveServer, admin: httpx.Client, outside: Path,
                                                         imports: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The folder lies outside IMPORT_DIR: its files travel, as they would to a remote gateway."""
    monkeypatch.setenv("PROMPTINTERN_ADMIN_KEY", ADMIN_KEY)
    template = tmp_path / "t.json"
    template.write_text(json.dumps({"messages": TEMPLATE}))
    code, out, _ = run_cli(capsys, "prompts", "--url", server.url, "register", "cli", "--file", str(template),
                           "--adapter", str(outside))
    try:
        assert code == 0 and json.loads(out)["status"] == "ready"
        code, out, _ = run_cli(capsys, "prompts", "--url", server.url, "add-adapter", "cli", str(outside))
        assert code == 0 and json.loads(out)["version"] == 2 and json.loads(out)["status"] == "ready"
        assert chat(server, "make a dir").headers["x-promptintern-route"] == "adapter"
    finally:
        assert admin.delete("/v1/prompts/cli").status_code == 204

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(outside / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    code, out, err = run_cli(capsys, "prompts", "--url", server.url, "register", "cli2", "--file", str(template),
                             "--adapter", str(pickled))
    assert code == 2 and out == "" and "safetensors" in err and len(err.strip().splitlines()) == 1
    assert admin.get("/v1/prompts/cli2").status_code == 404


def test_cli_says_which_gateway_it_cannot_reach(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens on it
    monkeypatch.setenv("PROMPTINTERN_HOST", "127.0.0.1")
    monkeypatch.setenv("PROMPTINTERN_PORT", str(port))
    for argv in (("prompts", "list"), ("prompts", "--url", f"http://127.0.0.1:{port}", "show", "x")):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert f"http://127.0.0.1:{port}" in err and "--url" in err and "PROMPTINTERN_PORT" in err
