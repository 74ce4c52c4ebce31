"""The shadow guard and the promotion gate (learning from traffic, issue 13): agreement, the gate's rule, a guard
that rolls a bad version back by itself (to the previous version, then to the fallback), and the whole path in
front of a real upstream provider: record its answers, train from them with no labels, serve held-out requests
locally with no upstream call, refuse a version the gate rejects, roll back under the guard."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.agreement import agreement, mean_agreement
from gateway.local_server import LocalGateway
from tests.conftest import LiveServer, gateway_settings
from tests.test_recording import (
    CONFIG_FILE,
    MODEL,
    SCHEDULE,
    WEIGHTS_FILE,
    chat,
    register,
    traffic,
    wait_for_job,
    wait_until,
)
from trainer.gate import decide
from trainer.lora import random_lora

GREEDY = {"temperature": 0, "max_tokens": 8, "stop": None}


def test_agreement_is_exact_after_collapsing_whitespace_or_a_sentence_score() -> None:
    assert agreement("  ls   -la\n", "ls -la") == 1.0
    assert agreement("ls -l", "ls -la") == 0.0
    assert 0.5 < agreement("find . -name '*.py'", "find . -name '*.py' -type f", "chrf") < 1.0
    assert 0.0 < agreement("find . -name '*.py'", "find . -name '*.py' -type f", "bleu") < 1.0
    assert agreement("", " ", "chrf") == 1.0
    assert mean_agreement(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5
    with pytest.raises(ValueError):
        mean_agreement(["a"], [])


def test_the_gate_passes_a_version_no_worse_than_the_active_one_or_reaching_the_guard_minimum() -> None:
    assert decide(0.5, 0.5, None)[0] and decide(0.6, 0.5, 0.9)[0]
    assert decide(0.4, 0.5, 0.3)[0]  # worse than the active version, but reaches the guard's minimum
    assert decide(0.1, None, None)[0]  # nothing to compare with
    passed, reason = decide(0.25, 0.5, 0.8)
    assert not passed and "0.250" in reason and "0.500" in reason and "0.8" in reason
    assert not decide(0.2, None, 0.5)[0]


@pytest.fixture(scope="module")
def server(tiny_model_path: Path, module_tmp: Path) -> Iterator[LiveServer]:
    with LiveServer(gateway_settings(module_tmp, tiny_model_path, torch_threads=1, train_threads=1)) as live:
        yield live


def upload(admin: httpx.Client, name: str, folder: Path) -> dict[str, Any]:
    files = {f: (f, (folder / f).read_bytes(), "application/octet-stream") for f in (CONFIG_FILE, WEIGHTS_FILE)}
    response = admin.post(f"/v1/prompts/{name}/adapters", files=files)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def metric(server: LocalGateway, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no series {name}{{{wanted}}}")


def test_guard_is_a_merge_patch_field_with_checked_values(server: LiveServer) -> None:
    with server.admin() as admin:
        register(admin, "gset")
        body = admin.patch("/v1/prompts/gset", json={"guard": {"shadow_rate": 0.1, "min_agreement": 0.7}})
        assert body.status_code == 200, body.text
        assert body.json()["guard"] == {"shadow_rate": 0.1, "min_agreement": 0.7, "window": 50, "metric": "exact"}
        assert server.app.state.prompts.routable("gset").guard.min_agreement == 0.7
        recorded = admin.patch("/v1/prompts/gset", json={"record": {"rate": 0.5}}).json()
        assert recorded["guard"]["shadow_rate"] == 0.1  # a merge patch: the guard stays
        for bad in ({"shadow_rate": 1.5, "min_agreement": 0.5}, {"shadow_rate": 0.5, "min_agreement": -0.1},
                    {"shadow_rate": 0.5, "min_agreement": 0.5, "window": 0},
                    {"shadow_rate": 0.5, "min_agreement": 0.5, "metric": "rouge"}, {"min_agreement": 0.5}):
            refused = admin.patch("/v1/prompts/gset", json={"guard": bad})
            assert refused.status_code == 422, (bad, refused.text)
            assert refused.json()["error"]["param"].startswith("guard"), refused.json()
        off = admin.patch("/v1/prompts/gset", json={"guard": None}).json()
        assert off["guard"] is None and server.app.state.prompts.routable("gset").guard is None
        assert admin.patch("/v1/prompts/nothere", json={"guard": None}).status_code == 404


def test_the_guard_rolls_a_bad_version_back_to_the_previous_one_then_to_the_fallback(
        server: LiveServer, tiny_model_path: Path, tmp_path: Path) -> None:
    """Random adapters answer unlike the base model with the full prompt: each version the guard judges falls
    below min_agreement over its window and is rejected, the one before it taking over, then the fallback."""
    with server.admin() as admin:
        register(admin, "bad")
        upload(admin, "bad", random_lora(tiny_model_path, tmp_path / "v1", seed=1, scale=4.0))
        upload(admin, "bad", random_lora(tiny_model_path, tmp_path / "v2", seed=2, scale=4.0))
        guard = {"shadow_rate": 1.0, "min_agreement": 0.9, "window": 2}
        assert admin.patch("/v1/prompts/bad", json={"guard": guard}).status_code == 200
        for query in ("list files", "show disk usage"):
            response = chat(server, "bad", query, **GREEDY)
            assert response.headers["x-promptintern-route"] == "adapter"
            assert response.json()["model"] == MODEL
        body = wait_until(lambda: (b := admin.get("/v1/prompts/bad").json())["active_version"] == 1 and b,
                          "the guard rolling v2 back to v1")
        v2 = body["versions"][1]
        assert v2["status"] == "rejected" and v2["error"] is None
        assert "shadow guard" in v2["reason"] and "below min_agreement 0.9" in v2["reason"]
        assert metric(server, "promptintern_rollbacks_total", prompt="bad") == 1
        assert metric(server, "promptintern_shadow_requests_total", prompt="bad", agree="false") >= 2
        verdicts = [v for v in server.app.state.shadow.verdicts if v.prompt == "bad"]
        assert [v.adapter for v in verdicts][:2] == ["bad@v2", "bad@v2"] and verdicts[1].rolled_back
        assert all(v.answer != v.teacher for v in verdicts)
        for query in ("count lines", "print the date"):  # now v1 is judged, and fails the same way
            assert chat(server, "bad", query, **GREEDY).headers["x-promptintern-route"] == "adapter"
        body = wait_until(lambda: (b := admin.get("/v1/prompts/bad").json())["active_version"] is None and b,
                          "the guard rolling v1 back to the fallback")
        assert [v["status"] for v in body["versions"]] == ["rejected", "rejected"]
        assert body["status"] == "registered"
        assert chat(server, "bad", "list files", **GREEDY).headers["x-promptintern-route"] == "fallback"
        assert metric(server, "promptintern_rollbacks_total", prompt="bad") == 2
        assert "bad@v1" not in server.app.state.engine.loaded_adapters()


def test_a_guard_that_is_met_keeps_the_version_and_sampled_answers_are_asked_again_greedily(
        server: LiveServer, tiny_model_path: Path, tmp_path: Path) -> None:
    with server.admin() as admin:
        register(admin, "kept")
        upload(admin, "kept", random_lora(tiny_model_path, tmp_path / "v1", seed=3))
        admin.patch("/v1/prompts/kept", json={"guard": {"shadow_rate": 1.0, "min_agreement": 0.0, "window": 2,
                                                        "metric": "chrf"}})
        sampled = chat(server, "kept", "list files", temperature=1.0, seed=11, max_tokens=8)
        chat(server, "kept", "show disk usage", **GREEDY)
        verdicts = wait_until(lambda: len(v := [x for x in server.app.state.shadow.verdicts
                                                if x.prompt == "kept"]) == 2 and v, "two shadow checks")
        greedy_again = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={  # its stop kept
            "model": "kept@v1", "messages": [{"role": "user", "content": "list files"}],
            **GREEDY, "stop": ["e"]}).json()
        assert verdicts[0].answer == greedy_again["choices"][0]["message"]["content"]  # asked again, greedily
        assert sampled.json()["choices"][0]["message"]["content"] is not None
        assert all(0.0 <= v.agreement <= 1.0 and not v.rolled_back for v in verdicts)
        assert admin.get("/v1/prompts/kept").json()["active_version"] == 1
        assert 0.0 <= metric(server, "promptintern_shadow_agreement", prompt="kept") <= 1.0


def test_the_cli_sets_and_turns_off_the_guard(server: LiveServer, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main
    from tests.conftest import ADMIN_KEY

    monkeypatch.setenv("PROMPTINTERN_ADMIN_KEY", ADMIN_KEY)
    with server.admin() as admin:
        register(admin, "cli-guard")

    def run(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_info:
            main(["prompts", "--url", server.url, "guard", *args])
        return int(exit_info.value.code or 0), capsys.readouterr().out

    code, out = run("cli-guard", "--shadow-rate", "0.2", "--min-agreement", "0.6", "--window", "10")
    assert code == 0 and json.loads(out)["guard"] == {"shadow_rate": 0.2, "min_agreement": 0.6, "window": 10,
                                                      "metric": "exact"}
    code, out = run("cli-guard", "--off")
    assert code == 0 and json.loads(out)["guard"] is None
    assert run("cli-guard", "--shadow-rate", "2")[0] == 1


def test_learning_from_a_real_upstream_gate_guard_and_rollback(tiny_model_path: Path, tmp_path: Path) -> None:
    """In front of a real upstream (a second gateway process): its answers are recorded, a version trained from
    them with a guard asking for perfect agreement is rejected by the gate, one trained without is served from
    the bare query with no upstream call, and the guard, turned on, rolls a bad version uploaded after it back
    to it by itself (the shadow calls asking the upstream)."""
    from tests.upstream_server import MODEL as UPSTREAM_MODEL
    from tests.upstream_server import UPSTREAM_KEY, UpstreamProcess

    with UpstreamProcess(tmp_path / "upstream", tiny_model_path) as upstream, LocalGateway(gateway_settings(
            tmp_path / "front", tiny_model_path, upstream_url=f"{upstream.url}/v1", upstream_api_key=UPSTREAM_KEY,
            upstream_models=[UPSTREAM_MODEL], min_traffic_rows=8, torch_threads=1,
            train_threads=1)) as front, front.admin() as admin:
        register(admin, "learned", record={"rate": 1.0})
        system = {"role": "system", "content": "Translate the request into one bash command (learned)."}

        def ask(query: str, **fields: Any) -> httpx.Response:
            user = {"role": "user", "content": f"Input: {query}\nOutput:"}
            body = {"model": UPSTREAM_MODEL, "messages": [system, user],
                    "temperature": 1.0, "seed": 7, "stop": ["e"], "max_tokens": 16, **fields}
            response = httpx.post(f"{front.url}/v1/chat/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            return response

        for i in range(10):
            assert ask(f"show file number {i}").headers["x-promptintern-route"] == "fallback"
        wait_until(lambda: traffic(admin, "learned")["total"] == 10, "ten upstream answers recorded")

        admin.patch("/v1/prompts/learned", json={"guard": {"shadow_rate": 0.0, "min_agreement": 1.0}})
        job = admin.post("/v1/prompts/learned/train", json={"source": "traffic", "schedule": SCHEDULE,
                                                            "eval_fraction": 0.3})
        assert job.status_code == 202, job.text
        body = wait_for_job(admin, "learned")
        assert body["job"]["status"] == "rejected", body["job"]
        v1 = body["versions"][0]
        assert v1["status"] == "rejected" and "promotion gate" in v1["reason"] and "min_agreement 1.0" in v1["reason"]
        gate = v1["manifest"]["gate"]
        assert not gate["passed"] and gate["rows"] == 3 and gate["agreement"] < 1.0
        assert body["active_version"] is None

        admin.patch("/v1/prompts/learned", json={"guard": None})
        assert admin.post("/v1/prompts/learned/train", json={"source": "traffic", "schedule": SCHEDULE,
                                                             "eval_fraction": 0.3}).status_code == 202
        body = wait_for_job(admin, "learned")
        assert body["job"]["status"] == "succeeded" and body["active_version"] == 2, body["job"]
        before = upstream.requests()
        calibration = front.app.state.inference.calibration  # learnt from the upstream's usage while relaying
        assert calibration.ratio("learned") > 0
        for query in ("show file number 20", "show file number 21"):  # held out: never recorded nor trained on
            response = ask(query, temperature=0, stop=None, max_tokens=8)
            assert response.headers["x-promptintern-route"] == "adapter"
            counted = front.app.state.planner.counter.original_tokens(
                front.app.state.prompts.static_tokens(front.app.state.prompts.routable("learned")), {"query": query})
            assert response.json()["usage"]["promptintern"]["original_prompt_tokens"] == calibration.scale(
                "learned", counted)
        assert upstream.requests() == before  # answered here, from the bare query

        guard = {"shadow_rate": 1.0, "min_agreement": 0.5, "window": 2}
        assert admin.patch("/v1/prompts/learned", json={"guard": guard}).status_code == 200
        upload(admin, "learned", random_lora(tiny_model_path, tmp_path / "bad", seed=2, scale=4.0))  # v3: bad
        for query in ("show file number 22", "show file number 23"):
            response = ask(query, temperature=0, stop=None, max_tokens=8)
            assert response.headers["x-promptintern-route"] == "adapter"
        body = wait_until(lambda: (b := admin.get("/v1/prompts/learned").json())["active_version"] == 2 and b,
                          "the guard rolling v3 back to v2", timeout=60)
        assert body["versions"][2]["status"] == "rejected" and "shadow guard" in body["versions"][2]["reason"]
        assert upstream.requests() == before + 2  # the two shadow calls asked the upstream, greedily
        verdicts = list(front.app.state.shadow.verdicts)
        assert [v.adapter for v in verdicts] == ["learned@v3", "learned@v3"] and verdicts[-1].rolled_back
        response = ask("show file number 24", temperature=0, stop=None, max_tokens=8)
        assert response.headers["x-promptintern-route"] == "adapter"  # v2 again, shadowed and kept
        wait_until(lambda: len(front.app.state.shadow.verdicts) == 3, "v2's answer shadowed")
        assert admin.get("/v1/prompts/learned").json()["active_version"] == 2


def test_upstream_calibration_scales_the_gateways_count_by_what_the_upstream_billed() -> None:
    from gateway.tokens import UpstreamCalibration

    calibration = UpstreamCalibration(max_prompts=2)
    assert calibration.scale("a", 100) == 100  # nothing learnt yet
    calibration.observe("a", counted=100, billed=130)
    calibration.observe("a", counted=300, billed=390)
    assert calibration.ratio("a") == pytest.approx(1.3) and calibration.scale("a", 200) == 260
    calibration.observe("a", counted=0, billed=50)  # nothing to learn from
    calibration.observe("", counted=10, billed=10)
    assert calibration.ratio("a") == pytest.approx(1.3)
    calibration.observe("b", 10, 20)
    calibration.observe("c", 10, 5)  # beyond max_prompts: the least recently observed ("a") is forgotten
    assert calibration.ratio("a") == 1.0 and calibration.ratio("b") == 2.0 and calibration.ratio("c") == 0.5
