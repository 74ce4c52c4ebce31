"""Prompt discovery through a running gateway (tiny model, embedded engine): mixed passthrough traffic of recurring
prompts and noise yields candidates; registering them makes fresh requests of each match (route `fallback`) and
none of the noise. Also the registry's discovery tables on SQLite and PostgreSQL, and the routes' errors."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.discovery_traffic import static_text, value
from gateway.registry.store import DiscoveredPrompt, PromptRegistry
from tests.conftest import LiveServer, gateway_settings

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHORT = {"max_tokens": 1, "temperature": 0}


def triage(v: list[str]) -> dict[str, Any]:
    return {"messages": [
        {"role": "system", "content": "You sort support tickets into billing, outage, account or other. "
                                      "Answer with the category only, in lower case. {Be brief.}"},
        {"role": "user", "content": f"Ticket:\n{v[0]}\nCategory:"}]}


def extract(v: list[str]) -> dict[str, Any]:
    return {"messages": [
        {"role": "user", "content": f"Read the product page and list its price and its colour as JSON.\n"
                                    f"Product: {v[0]}\nPage text: {v[1]}\nJSON:"}]}


def complete(v: list[str]) -> dict[str, Any]:
    return {"prompt": f"Write a one-line commit message for this change.\nDiff summary: {v[0]}\n"
                      f"Commit message (imperative mood, at most 60 characters):"}


RECURRING = {"triage": (triage, 1), "extract": (extract, 2), "complete": (complete, 1)}


def send(server: LiveServer, body: dict[str, Any]) -> httpx.Response:
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    response = httpx.post(f"{server.url}{path}", json={"model": MODEL, **body, **SHORT}, timeout=60)
    assert response.status_code == 200, response.text
    return response


def noise(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.3:
        return {"prompt": static_text(rng, rng.randint(3, 30))}
    return {"messages": [{"role": "user", "content": static_text(rng, rng.randint(3, 40))}]}


def fresh(rng: random.Random, name: str) -> dict[str, Any]:
    make, slots = RECURRING[name]
    return make([value(rng, 6) for _ in range(slots)])


@pytest.fixture(scope="module")
def server(tiny_model_path: Path, module_tmp: Path) -> Iterator[LiveServer]:
    settings = gateway_settings(module_tmp, tiny_model_path, torch_threads=1, discovery_flush_seconds=0.5)
    with LiveServer(settings) as live:
        yield live


def candidates(admin: httpx.Client) -> list[dict[str, Any]]:
    response = admin.get("/v1/prompts/candidates")
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def test_mixed_traffic_yields_candidates_that_once_registered_match_fresh_requests(server: LiveServer) -> None:
    rng = random.Random(15)
    traffic = [fresh(rng, name) for name in RECURRING for _ in range(24)] + [noise(rng) for _ in range(20)]
    rng.shuffle(traffic)
    for body in traffic:
        assert send(server, body).headers["x-promptintern-route"] == "passthrough"
    with server.admin() as admin:
        import time
        deadline = time.monotonic() + 20
        while len(found := candidates(admin)) < len(RECURRING):
            assert time.monotonic() < deadline, f"only {len(found)} candidates: {found}"
            time.sleep(0.2)
        assert len(found) == len(RECURRING)
        savings = [c["projected_saved_tokens"] for c in found]
        assert savings == sorted(savings, reverse=True)
        for c in found:
            assert c["requests"] == 24 and c["static_share"] >= 0.5 and len(c["examples"]) <= 3
            assert c["projected_saved_tokens"] == c["requests"] * c["projected_saved_tokens_per_1k_requests"] // 1000
            assert c["first_seen"].endswith("Z") and c["first_seen"] <= c["last_seen"]
        triage_found = next(c for c in found if c["kind"] == "chat" and len(c["template"]) == 2)
        assert triage_found["template"][0]["content"].endswith("{{Be brief.}}")  # literal braces escaped
        for n, c in enumerate(found):
            slots = {c["slots"][0]: f"renamed{n}"}
            created = admin.post(f"/v1/prompts/candidates/{c['id']}/register",
                                 json={"name": f"found{n}", "slots": slots, "record": {"rate": 1.0}})
            assert created.status_code == 201, created.text
            prompt = created.json()
            assert prompt["name"] == f"found{n}" and f"renamed{n}" in prompt["slots"]
            assert prompt["record"] == {"rate": 1.0, "max_rows": 10_000}
            again = admin.post(f"/v1/prompts/candidates/{c['id']}/register", json={"name": f"other{n}"})
            assert again.status_code == 404 and again.json()["error"]["code"] == "candidate_not_found"
        assert candidates(admin) == []  # registered candidates leave the list
    for name in RECURRING:
        for _ in range(5):
            response = send(server, fresh(rng, name))
            assert response.headers["x-promptintern-route"] == "fallback"
            assert response.headers["x-promptintern-prompt"].startswith("found")
    for _ in range(10):
        assert send(server, noise(rng)).headers["x-promptintern-route"] == "passthrough"


def test_register_errors_and_the_reserved_name(server: LiveServer) -> None:
    with server.admin() as admin:
        missing = admin.post("/v1/prompts/candidates/nope/register", json={"name": "x"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "candidate_not_found"
        bad = admin.post("/v1/prompts/candidates/nope/register", json={"name": "x", "extra": 1})
        assert bad.status_code == 422
        reserved = admin.post("/v1/prompts", json={"name": "candidates",
                                                   "messages": [{"role": "user", "content": "Q: {query}"}]})
        assert reserved.status_code == 422 and reserved.json()["error"]["code"] == "invalid_name"
    assert httpx.get(f"{server.url}/v1/prompts/candidates").status_code == 401


def test_registering_with_a_taken_name_or_a_bad_slot_keeps_the_candidate(server: LiveServer) -> None:
    rng = random.Random(7)
    make = lambda v: {"messages": [{"role": "system", "content": "Summarise the meeting notes in three bullet "  # noqa: E731
                                                                "points for the weekly newsletter of the team."},
                                   {"role": "user", "content": v[0]}]}
    for _ in range(21):
        send(server, make([value(rng, 5)]))
    with server.admin() as admin:
        import time
        deadline = time.monotonic() + 20
        while not (found := [c for c in candidates(admin) if c["template"][0]["content"].startswith("Summarise")]):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        cid = found[0]["id"]
        assert found[0]["slots"] == ["query"]
        admin.post("/v1/prompts", json={"name": "taken", "messages": [{"role": "user", "content": "T: {query}"}]})
        taken = admin.post(f"/v1/prompts/candidates/{cid}/register", json={"name": "taken"})
        assert taken.status_code == 409
        unknown = admin.post(f"/v1/prompts/candidates/{cid}/register", json={"name": "n1", "slots": {"nope": "a"}})
        assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "unknown_slot"
        invalid = admin.post(f"/v1/prompts/candidates/{cid}/register", json={"name": "n1", "slots": {"query": "1x"}})
        assert invalid.status_code == 422
        assert [c["id"] for c in candidates(admin) if c["id"] == cid] == [cid]
        ok = admin.post(f"/v1/prompts/candidates/{cid}/register", json={"name": "notes"})
        assert ok.status_code == 201 and ok.json()["template"][1]["content"] == "{query}"


def test_discovery_off_answers_404(tiny_model_path: Path, tmp_path: Path) -> None:
    with LiveServer(gateway_settings(tmp_path, tiny_model_path, torch_threads=1, discovery=False)) as live:
        send(live, {"prompt": "hello there"})
        with live.admin() as admin:
            off = admin.get("/v1/prompts/candidates")
            assert off.status_code == 404 and off.json()["error"]["code"] == "discovery_off"


def _found(cid: str, requests: int, at: datetime, tenant: str | None = None) -> DiscoveredPrompt:
    return DiscoveredPrompt(cid, tenant, "completion", "Q: {query}\nA:", ["query"], requests, requests * 20, 6,
                            [{"query": f"v{requests}"}], at, at)


def test_replicas_rows_add_up_and_registered_ones_leave(database_url: str) -> None:
    registry = PromptRegistry(database_url)
    try:
        early, late = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
        assert registry.save_discovered("r1", [_found("a", 5, early), _found("b", 1, early)], 20) == frozenset()
        registry.save_discovered("r2", [_found("a", 7, late)], 20)
        (a,) = [f for f in registry.discovered() if f.id == "a"]
        assert (a.requests, a.chars_total, a.first_seen, a.last_seen) == (12, 240, early, late)
        assert [e["query"] for e in a.examples] == ["v5", "v7"]
        registry.save_discovered("r1", [_found("a", 6, late)], 20)  # `b` gone from r1 and below 20: dropped
        assert {f.id: f.requests for f in registry.discovered()} == {"a": 13}
        assert registry.claim_discovered("a", "p") and not registry.claim_discovered("a", "q")
        assert registry.discovered() == [] and registry.discovered("a") == []
        assert registry.save_discovered("r1", [_found("a", 9, late)], 20) == frozenset({"a"})
        registry.release_discovered("a")
        assert registry.discovered("a")[0].requests == 16
    finally:
        registry.close()


def test_the_cli_lists_and_registers_candidates(server: LiveServer, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import time

    from gateway.cli import main
    from tests.conftest import ADMIN_KEY

    rng = random.Random(11)
    for _ in range(20):
        send(server, {"prompt": f"Classify the sentiment of this review as positive or negative, one word.\n"
                                f"Review: {value(rng, 6)}\nSentiment:"})
    monkeypatch.setenv("PROMPTINTERN_ADMIN_KEY", ADMIN_KEY)

    def listed() -> list[dict[str, Any]]:
        with pytest.raises(SystemExit) as done:
            main(["prompts", "--url", server.url, "candidates"])
        assert done.value.code in (0, None)
        data: list[dict[str, Any]] = json.loads(capsys.readouterr().out)["data"]
        return [c for c in data if isinstance(c["template"], str) and c["template"].startswith("Classify")]

    deadline = time.monotonic() + 20
    while not (found := listed()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert found[0]["slots"] == ["review"]
    with pytest.raises(SystemExit) as done:
        main(["prompts", "--url", server.url, "candidates", "--register", found[0]["id"], "--name", "sentiment",
              "--slot", "review=text"])
    assert done.value.code in (0, None)
    assert json.loads(capsys.readouterr().out)["slots"] == ["text"]
