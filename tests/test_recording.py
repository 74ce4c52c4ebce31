"""Recording a prompt's fallback answers as training rows, and training from them (self-distillation), on the
tiny model with the local base model as the teacher; a second replica follows a change of the setting."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.local_server import LocalGateway
from tests.conftest import LiveServer, gateway_settings
from trainer.lora import random_lora

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def template(name: str) -> list[dict[str, str]]:
    """Each test's prompt has a template of its own, so requests match only that prompt."""
    return [{"role": "system", "content": f"Translate the request into one bash command ({name})."},
            {"role": "user", "content": "Input: {query}\nOutput:"}]


# The tiny model's sampled words stop at their first `e`: a whole answer (finish_reason `stop`), not empty.
WHOLE = {"temperature": 1.0, "seed": 7, "stop": ["e"], "max_tokens": 16}
SCHEDULE = {"preset": "demo", "steps_per_stage": [2, 2], "batch_size": 4, "retrieval": "bm25",
            "warmup_steps": 0}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def chat(server: LocalGateway, name: str, query: str, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [template(name)[0], {"role": "user", "content": f"Input: {query}\nOutput:"}],
            **WHOLE, **fields}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def streamed_text(response: httpx.Response) -> str:
    parts = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices") or []:
                parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def traffic(admin: httpx.Client, name: str, **params: Any) -> dict[str, Any]:
    response = admin.get(f"/v1/prompts/{name}/traffic", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def settled() -> None:
    """Every answer offered to the recorder so far is written (the recorder runs on the server's loop)."""
    time.sleep(0.3)


def register(admin: httpx.Client, name: str, **fields: Any) -> dict[str, Any]:
    response = admin.post("/v1/prompts", json={"name": name, "messages": template(name), **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def server(tiny_model_path: Path, module_tmp: Path) -> Iterator[LiveServer]:
    with LiveServer(gateway_settings(module_tmp, tiny_model_path, torch_threads=1, train_threads=1)) as live:
        yield live


def test_rate_one_records_whole_and_streamed_fallback_answers(server: LiveServer) -> None:
    with server.admin() as admin:
        assert register(admin, "rec", record={"rate": 1.0})["record"] == {"rate": 1.0, "max_rows": 10_000}
        answers = []
        for query in ("list files", "show disk usage"):
            response = chat(server, "rec", query)
            assert response.headers["x-promptintern-route"] == "fallback"
            assert response.json()["choices"][0]["finish_reason"] == "stop"
            answers.append((query, response.json()["choices"][0]["message"]["content"]))
        streamed = chat(server, "rec", "count lines", stream=True)
        answers.append(("count lines", streamed_text(streamed)))
        body = wait_until(lambda: (b := traffic(admin, "rec"))["total"] == 3 and b, "three recorded answers")
        assert [(row["query"], row["response"]) for row in body["data"]] == answers[::-1]  # newest first
        assert all(row["model"] == MODEL and isinstance(row["created"], int) for row in body["data"])
        assert traffic(admin, "rec", limit=1)["data"] == body["data"][:1]
        assert traffic(admin, "rec", limit=1)["total"] == 3
        _, rows = server.app.state.registry.traffic("rec")
        assert {row.tenant for row in rows} == {None}


def test_only_whole_single_fallback_answers_are_recorded(server: LiveServer, tiny_model_path: Path,
                                                         tmp_path: Path) -> None:
    with server.admin() as admin:
        register(admin, "only", record={"rate": 1.0})
        chat(server, "only", "cut short", max_tokens=1, stop=None)  # finish_reason `length`: not whole
        chat(server, "only", "two answers", n=2)  # n > 1: passthrough
        other = {"model": MODEL, "messages": [{"role": "user", "content": "unrelated"}], **WHOLE}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=other,
                          timeout=60).headers["x-promptintern-route"] == "passthrough"
        chat(server, "only", "list files")  # recorded after the others were offered: they were not
        body = wait_until(lambda: (b := traffic(admin, "only"))["total"] and b, "the whole answer recorded")
        assert body["total"] == 1 and body["data"][0]["query"] == "list files"
        assert admin.delete("/v1/prompts/only/traffic").status_code == 204
        folder = random_lora(tiny_model_path, tmp_path / "lora", seed=5)
        files = {f: (f, (folder / f).read_bytes(), "application/octet-stream") for f in (CONFIG_FILE, WEIGHTS_FILE)}
        assert admin.post("/v1/prompts/only/adapters", files=files).status_code == 201
        assert chat(server, "only", "list files").headers["x-promptintern-route"] == "adapter"
        settled()
        assert traffic(admin, "only")["total"] == 0


def test_rate_zero_records_nothing_and_the_ring_keeps_the_newest(server: LiveServer) -> None:
    with server.admin() as admin:
        register(admin, "ring", record={"rate": 0})
        chat(server, "ring", "list files")
        settled()
        assert traffic(admin, "ring")["total"] == 0
        patched = admin.patch("/v1/prompts/ring", json={"record": {"rate": 1, "max_rows": 2}})
        assert patched.status_code == 200 and patched.json()["record"] == {"rate": 1.0, "max_rows": 2}
        for query in ("first", "second", "third", "fourth"):
            chat(server, "ring", query)
        body = wait_until(lambda: (b := traffic(admin, "ring"))["data"] and b["data"][0]["query"] == "fourth" and b,
                          "the fourth answer recorded")
        assert body["total"] == 2 and [row["query"] for row in body["data"]] == ["fourth", "third"]


def test_patch_is_a_merge_patch_and_refuses_bad_values(server: LiveServer) -> None:
    with server.admin() as admin:
        assert register(admin, "merge")["record"] is None
        assert admin.patch("/v1/prompts/merge", json={"record": {"rate": 0.5}}).json()["record"]["rate"] == 0.5
        assert admin.patch("/v1/prompts/merge", json={}).json()["record"] == {"rate": 0.5, "max_rows": 10_000}
        assert admin.get("/v1/prompts/merge").json()["record"]["rate"] == 0.5
        assert admin.patch("/v1/prompts/merge", json={"record": None}).json()["record"] is None
        for bad in ({"record": {"rate": 1.5}}, {"record": {"rate": -0.1}}, {"record": {"rate": 1, "max_rows": 0}},
                    {"record": {"rate": 1, "max_rows": -3}}, {"record": {"rate": 1, "other": 1}}, {"bogus": 1},
                    {"record": {}}):
            response = admin.patch("/v1/prompts/merge", json=bad)
            assert response.status_code == 422, (bad, response.text)
            assert response.json()["error"]["message"]
        bad_register = admin.post("/v1/prompts", json={"name": "bad", "messages": template("bad"),
                                                         "record": {"rate": 2}})
        assert bad_register.status_code == 422
        assert admin.patch("/v1/prompts/nowhere", json={"record": None}).status_code == 404
        assert admin.get("/v1/prompts/nowhere/traffic").status_code == 404


def test_traffic_needs_the_admin_key_and_delete_purges(server: LiveServer) -> None:
    with server.admin() as admin:
        register(admin, "purge", record={"rate": 1.0})
        chat(server, "purge", "list files")
        wait_until(lambda: traffic(admin, "purge")["total"] == 1, "one recorded answer")
        assert httpx.get(f"{server.url}/v1/prompts/purge/traffic").status_code == 401
        assert httpx.delete(f"{server.url}/v1/prompts/purge/traffic").status_code == 401
        assert admin.delete("/v1/prompts/purge/traffic").status_code == 204
        assert traffic(admin, "purge") == {"total": 0, "data": []}


def wait_for_job(admin: httpx.Client, name: str, timeout: float = 300) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = admin.get(f"/v1/prompts/{name}").json()
        job = body.get("job") or {}
        return body if job.get("status") in ("succeeded", "failed", "rejected", "interrupted") else None

    result: dict[str, Any] = wait_until(finished, f"the training job of {name}", timeout)
    return result


def test_training_from_traffic_uses_a_snapshot_of_the_recorded_rows(server: LiveServer) -> None:
    registry = server.app.state.registry
    with server.admin() as admin:
        register(admin, "distil", record={"rate": 1.0})
        for i in range(19):
            registry.add_traffic("distil", None, {"query": f"show file number {i}"}, f"cat file{i}.txt", MODEL,
                                 10_000)
        few = admin.post("/v1/prompts/distil/train", json={"source": "traffic", "schedule": SCHEDULE})
        assert few.status_code == 422 and "at least 20" in few.json()["error"]["message"]
        registry.add_traffic("distil", None, {"query": "show file number 19"}, "cat file19.txt", MODEL, 10_000)
        chat(server, "distil", "list files")  # one more, recorded by the gateway itself
        wait_until(lambda: traffic(admin, "distil")["total"] == 21, "the served answer recorded")
        both = admin.post("/v1/prompts/distil/train",
                          json={"source": "traffic", "data": [{"query": "a", "response": "b"}]})
        assert both.status_code == 422
        assert admin.post("/v1/prompts/distil/train", json={"source": "labels"}).status_code == 422
        neither = admin.post("/v1/prompts/distil/train", json={"schedule": SCHEDULE})
        assert neither.status_code == 422 and "'source'" in neither.json()["error"]["message"]
        unheld = admin.post("/v1/prompts/distil/train", json={"source": "traffic", "schedule": SCHEDULE,
                                                              "eval_fraction": 0})  # nothing for the gate
        assert unheld.status_code == 422 and unheld.json()["error"]["param"] == "train.eval_fraction"
        job = admin.post("/v1/prompts/distil/train", json={"source": "traffic", "schedule": SCHEDULE,
                                                           "eval_fraction": 0.2})
        assert job.status_code == 202, job.text
        assert job.json()["rows"] == 21
        assert admin.delete("/v1/prompts/distil/traffic").status_code == 204  # the job has its own copy
        body = wait_for_job(admin, "distil")
        assert body["job"]["status"] == "succeeded", body["job"]
        assert body["job"]["rows"] == 21
        assert body["status"] == "ready" and body["active_version"] == 1
        gate = body["versions"][0]["manifest"]["gate"]  # no active version, no guard: nothing to compare with
        assert gate["passed"] and gate["incumbent"] is None and gate["rows"] == 5 and gate["metric"] == "exact"
        assert chat(server, "distil", "list files").headers["x-promptintern-route"] == "adapter"
        assert traffic(admin, "distil")["total"] == 0  # adapter answers are not recorded


def test_a_second_replica_follows_a_patch_of_record(tiny_model_path: Path, tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'registry.db'}"
    settings = [gateway_settings(tmp_path / name, tiny_model_path, database_url=database,
                                 adapter_dir=tmp_path / "adapters") for name in ("a", "b")]
    with LocalGateway(settings[0]) as a, LocalGateway(settings[1]) as b, a.admin() as admin:
        register(admin, "follow")
        wait_until(lambda: b.app.state.prompts.routable("follow") is not None, "B routing the prompt", 10)
        assert admin.patch("/v1/prompts/follow", json={"record": {"rate": 1, "max_rows": 5}}).status_code == 200
        wait_until(lambda: b.app.state.prompts.routable("follow").record_rate == 1.0, "B following the PATCH", 10)
        assert b.app.state.prompts.routable("follow").record_max_rows == 5
        chat(b, "follow", "list files")
        wait_until(lambda: traffic(admin, "follow")["total"] == 1, "B recording into the shared registry")
        assert admin.patch("/v1/prompts/follow", json={"record": None}).status_code == 200
        wait_until(lambda: b.app.state.prompts.routable("follow").record_rate == 0.0, "B following the off", 10)


def test_the_cli_mirrors_record_traffic_and_train(server: LiveServer, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main
    from tests.conftest import ADMIN_KEY

    monkeypatch.setenv("PROMPTINTERN_ADMIN_KEY", ADMIN_KEY)

    def run(*argv: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_info:
            main(["prompts", "--url", server.url, *argv])
        return int(exit_info.value.code or 0), capsys.readouterr().out

    with server.admin() as admin:
        register(admin, "cli-rec")
    code, out = run("record", "cli-rec", "--rate", "1", "--max-rows", "3")
    assert code == 0 and json.loads(out)["record"] == {"rate": 1.0, "max_rows": 3}
    chat(server, "cli-rec", "list files")
    with server.admin() as admin:
        wait_until(lambda: traffic(admin, "cli-rec")["total"] == 1, "the answer recorded")
    code, out = run("traffic", "cli-rec", "--limit", "1")
    assert code == 0 and json.loads(out)["data"][0]["query"] == "list files"
    code, out = run("train", "cli-rec", "--source", "traffic")
    assert code == 1 and json.loads(out)["error"]["code"] == "not_enough_traffic"
    assert run("traffic", "cli-rec", "--purge")[0] == 0
    assert json.loads(run("traffic", "cli-rec")[1])["total"] == 0
    code, out = run("record", "cli-rec", "--off")
    assert code == 0 and json.loads(out)["record"] is None
    assert run("record", "cli-rec", "--rate", "1.5")[0] == 1


def test_answers_of_a_real_upstream_are_recorded_with_the_tenant(tiny_model_path: Path, tmp_path: Path) -> None:
    """A second gateway process is the upstream provider; the front gateway records what it answered, whole and
    streamed, under the tenant of the caller's key."""
    from tests.upstream_server import MODEL as UPSTREAM_MODEL
    from tests.upstream_server import UPSTREAM_KEY, UpstreamProcess

    with UpstreamProcess(tmp_path / "upstream", tiny_model_path) as upstream, LocalGateway(gateway_settings(
            tmp_path / "front", tiny_model_path, upstream_url=f"{upstream.url}/v1", upstream_api_key=UPSTREAM_KEY,
            upstream_models=[UPSTREAM_MODEL], api_keys=["acme:acme-key"])) as front, front.admin() as admin:
        register(admin, "relayed", record={"rate": 1.0})
        headers = {"Authorization": "Bearer acme-key"}
        body = {"model": UPSTREAM_MODEL, **WHOLE,
                "messages": [template("relayed")[0], {"role": "user", "content": "Input: list files\nOutput:"}]}
        whole = httpx.post(f"{front.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        assert whole.status_code == 200 and whole.headers["x-promptintern-route"] == "fallback"
        stream = httpx.post(f"{front.url}/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                            timeout=120)
        assert stream.status_code == 200
        recorded = wait_until(lambda: (b := traffic(admin, "relayed"))["total"] == 2 and b, "both answers recorded")
        answer = whole.json()["choices"][0]["message"]["content"]
        assert [row["response"] for row in recorded["data"]] == [streamed_text(stream), answer]
        assert {row["model"] for row in recorded["data"]} == {whole.json()["model"]}
        _, rows = front.app.state.registry.traffic("relayed")
        assert {row.tenant for row in rows} == {"acme"}


class _FailingRegistry:
    def __init__(self) -> None:
        self.calls = 0

    def add_traffic(self, *args: Any) -> bool:
        self.calls += 1
        raise RuntimeError("the database is away")


async def test_the_recorder_drops_what_its_queue_cannot_hold_and_a_failed_write_only_logs(
        caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from core.templates import parse_template
    from gateway.prompts.recording import TrafficRecorder
    from gateway.prompts.routing import RoutablePrompt

    entry = RoutablePrompt("p", parse_template(messages=template("p")), 0, None, record_rate=0.5, record_max_rows=9)
    registry = _FailingRegistry()
    draws = iter([0.9, 0.1, 0.2, 0.3])  # the first is above the rate: not recorded
    recorder = TrafficRecorder(registry, lambda name: entry if name == "p" else None,  # type: ignore[arg-type]
                               queue_size=1, draw=lambda: next(draws))
    offer = {"prompt": "p", "tenant": None, "slots": {"query": "x"}, "text": "ls", "finish": "stop", "model": "m"}
    for _ in range(3):
        recorder.offer(**offer)  # type: ignore[arg-type]
    assert recorder.dropped == 1  # one drawn out, one queued, one over the queue's bound
    recorder.offer(**{**offer, "prompt": "unknown"})  # type: ignore[arg-type]
    recorder.offer(**{**offer, "finish": "length"})  # type: ignore[arg-type]
    await recorder.start()
    for _ in range(50):
        if registry.calls:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    await recorder.close()
    assert registry.calls == 1 and "recording an answer of p failed" in caplog.text
