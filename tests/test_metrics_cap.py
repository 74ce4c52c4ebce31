"""Per-prompt metric series are capped (`METRICS_MAX_PROMPTS`): the first prompts get series of their own, the
rest are counted under `prompt="other"`, on the metrics themselves and through a live gateway."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from core.config import Settings
from gateway.metrics import NO_PROMPT, OTHER_PROMPT, GatewayMetrics
from tests.conftest import LiveServer, gateway_settings

PER_PROMPT = ("promptintern_requests", "promptintern_original_prompt_tokens", "promptintern_sent_prompt_tokens",
              "promptintern_saved_prompt_tokens", "promptintern_saved_cost_usd", "promptintern_completion_tokens")


def series(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every `_total` sample of the per-prompt counters in a /metrics text: (name, sorted labels) -> value."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in PER_PROMPT:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def prompts_of(metrics: GatewayMetrics) -> set[str]:
    from prometheus_client import generate_latest

    return {dict(labels)["prompt"] for _, labels in series(generate_latest(metrics.registry).decode())}


def test_prompts_past_the_cap_share_the_other_series() -> None:
    metrics = GatewayMetrics(max_prompts=2)
    assert prompts_of(metrics) == {NO_PROMPT, OTHER_PROMPT}  # both at 0 from the start, taking no place
    for name in ("p1", "p2", "p3", "p4"):
        metrics.track_prompt(name)
    assert prompts_of(metrics) == {NO_PROMPT, OTHER_PROMPT, "p1", "p2"}
    assert len(metrics.prompt_labels) == 2
    for name in ("p1", "p3", "p4", NO_PROMPT):
        metrics.requests.labels(prompt=name, route="fallback").inc()
        metrics.saved_prompt_tokens.labels(prompt=name).inc(10)
    assert metrics.requests.counter.labels(prompt="p1", tenant="none", route="fallback")._value.get() == 1
    assert metrics.requests.counter.labels(prompt=OTHER_PROMPT, tenant="none", route="fallback")._value.get() == 2
    assert metrics.saved_prompt_tokens.counter.labels(prompt=OTHER_PROMPT, tenant="none")._value.get() == 20
    assert metrics.saved_prompt_tokens.counter.labels(prompt=NO_PROMPT, tenant="none")._value.get() == 10
    assert prompts_of(metrics) == {NO_PROMPT, OTHER_PROMPT, "p1", "p2"}


def test_a_registered_prompt_exports_its_speed_histograms_at_zero() -> None:
    """The net-seconds-saved rule divides their rates: an observation into a series it creates is lost to rate()."""
    from prometheus_client import generate_latest

    metrics = GatewayMetrics(max_prompts=2)
    metrics.track_prompt("p1")
    counts = {(s.name, s.labels["prompt"], s.labels["route"]): s.value
              for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
              if family.name in ("promptintern_time_to_first_token_seconds",
                                 "promptintern_time_per_output_token_seconds")
              for s in family.samples if s.name.endswith("_count")}
    assert counts == {(f"{name}_count", prompt, route): 0.0
                      for name in ("promptintern_time_to_first_token_seconds",
                                   "promptintern_time_per_output_token_seconds")
                      for prompt, route in (("p1", "adapter"), ("p1", "fallback"), (OTHER_PROMPT, "adapter"),
                                            (OTHER_PROMPT, "fallback"), (NO_PROMPT, "passthrough"))}


def test_a_prompt_first_seen_in_traffic_takes_a_free_place() -> None:
    metrics = GatewayMetrics(max_prompts=1)
    metrics.completion_tokens.labels(prompt="seen").inc(5)  # never tracked, but a place was free
    metrics.track_prompt("registered-later")
    metrics.completion_tokens.labels(prompt="registered-later").inc(7)
    assert prompts_of(metrics) == {NO_PROMPT, OTHER_PROMPT, "seen"}
    assert metrics.completion_tokens.counter.labels(prompt=OTHER_PROMPT, tenant="none")._value.get() == 7


def test_a_cap_of_zero_counts_every_prompt_as_other() -> None:
    metrics = GatewayMetrics(max_prompts=0)
    metrics.track_prompt("p1")
    metrics.requests.labels(prompt="p1", route="adapter").inc()
    assert prompts_of(metrics) == {NO_PROMPT, OTHER_PROMPT}
    with pytest.raises(ValueError, match="at least 0"):
        GatewayMetrics(max_prompts=-1)


def test_many_prompts_keep_metrics_bounded() -> None:
    metrics = GatewayMetrics(max_prompts=500)
    for i in range(20_000):
        metrics.track_prompt(f"prompt-{i}")
    assert len(prompts_of(metrics)) == 502


def test_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().metrics_max_prompts == 500
    monkeypatch.setenv("PROMPTINTERN_METRICS_MAX_PROMPTS", "3")
    assert Settings().metrics_max_prompts == 3
    monkeypatch.setenv("PROMPTINTERN_METRICS_MAX_PROMPTS", "-1")
    with pytest.raises(ValidationError, match="metrics_max_prompts"):
        Settings()


def test_a_live_gateway_counts_prompts_past_the_cap_as_other(tiny_model_path: Path, tmp_path: Path) -> None:
    settings = gateway_settings(tmp_path, tiny_model_path, metrics_max_prompts=1)
    with LiveServer(settings) as server, server.admin() as admin:
        for name, word in (("first", "Translate"), ("second", "Summarise")):
            r = admin.post("/v1/prompts", json={"name": name, "messages": [
                {"role": "system", "content": f"{word} the text, carefully and briefly."},
                {"role": "user", "content": "Text: {query}"}]})
            assert r.status_code == 201, r.text
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": settings.served_model_name, "max_tokens": 2, "messages": [
                {"role": "system", "content": "Summarise the text, carefully and briefly."},
                {"role": "user", "content": "Text: the meeting moved to Tuesday."}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-promptintern-prompt"] == "second"
        assert r.headers["x-promptintern-route"] == "fallback"
        found = series(httpx.get(f"{server.url}/metrics").text)
    labels = {dict(labels)["prompt"] for _, labels in found}
    assert labels == {NO_PROMPT, OTHER_PROMPT, "first"}
    other = (("prompt", OTHER_PROMPT), ("route", "fallback"), ("tenant", "none"))
    assert found[("promptintern_requests_total", other)] == 1
    first = (("prompt", "first"), ("route", "fallback"), ("tenant", "none"))
    assert found[("promptintern_requests_total", first)] == 0
    assert found[("promptintern_original_prompt_tokens_total", (("prompt", OTHER_PROMPT), ("tenant", "none")))] > 0
