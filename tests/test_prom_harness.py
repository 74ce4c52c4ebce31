"""The Prometheus harness, proven on a real Prometheus: scraping itself, then the gateway's metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from benchmarks import prometheus as harness
from benchmarks.deploy import DeployFiles
from benchmarks.errors import BenchInputError
from gateway.discovery.protocol import CandidateOut
from gateway.local_server import free_port
from tests import prom_harness


@pytest.fixture(scope="module")
def deploy(request: pytest.FixtureRequest) -> DeployFiles:
    return prom_harness.deploy_files(request.config)


def test_dashboard_expressions_are_plain_promql(deploy: DeployFiles) -> None:
    exprs = harness.dashboard_expressions(deploy.dashboard)
    assert len(exprs) >= 20
    assert not [e for e in exprs if "$" in e or "[[" in e]
    assert any('prompt=~".+"' in e for e in exprs)
    assert any('prompt=~"p1"' in e for e in harness.dashboard_expressions(deploy.dashboard, {"prompt": "p1"}))
    assert harness.substitute('rate(x[$__rate_interval]) + y{a=~"${prompt:regex}"}') == 'rate(x[15s]) + y{a=~".+"}'
    with pytest.raises(ValueError):
        harness.substitute("rate(x[$__unknown])")


def test_rule_expressions_match_rule_names(deploy: DeployFiles) -> None:
    exprs = harness.rule_expressions(deploy.rules_dir)
    names = harness.rule_names(deploy.rules_dir)
    assert len(exprs) == len(names) >= 10
    assert "promptintern:saved_prompt_tokens:rate5m" in names
    assert "PromptInternAdaptersFailed" in names


def test_parse_duration() -> None:
    assert harness.parse_duration("90s") == 90
    assert harness.parse_duration("1h30m") == 5400
    assert harness.parse_duration("250ms") == 0.25
    for bad in ("", "5", "5 m", "m5"):
        with pytest.raises(ValueError):
            harness.parse_duration(bad)


def test_missing_prometheus_skips_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prom_harness, "prometheus_binary", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        prom_harness.require_prometheus()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        prom_harness.require_prometheus()


def test_start_prometheus_refuses_non_loopback_targets(tmp_path: Path, deploy: DeployFiles) -> None:
    with pytest.raises(ValueError):
        harness.start_prometheus(tmp_path, ["10.1.2.3:8000"], deploy=deploy)


def test_missing_deploy_files_say_where_they_were_looked_for(tmp_path: Path) -> None:
    with pytest.raises(BenchInputError, match=f"no deploy files at {tmp_path}.*--deploy-dir"):
        DeployFiles(tmp_path).checked()
    with pytest.raises(BenchInputError, match="no deploy files"):
        harness.start_prometheus(tmp_path, ["127.0.0.1:9"], deploy=DeployFiles(tmp_path / "deploy"))


@dataclass
class Stack:
    prom: harness.PrometheusHandle
    metrics: Any


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, deploy: DeployFiles) -> Iterator[Stack]:
    """One Prometheus scraping itself and a gateway-metrics endpoint whose series all start at 0."""
    prom_harness.require_prometheus()
    from prometheus_client import start_http_server

    from gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    # Every series exists at 0 before the first scrape, so rates start from a common zero.
    for counter in (metrics.original_prompt_tokens, metrics.sent_prompt_tokens, metrics.saved_prompt_tokens):
        counter.labels(prompt="p1")
    metrics.saved_cost.labels(prompt="p1")
    metrics.completion_tokens.labels(prompt="p1")
    metrics.requests.labels(prompt="p1", route="adapter")
    metrics.requests.labels(prompt="p1", route="fallback")
    metrics.requests.labels(prompt="none", route="passthrough")
    metrics.request_errors.labels(route="adapter", code="500")
    for route in ("adapter", "fallback"):
        metrics.time_to_first_token.labels(prompt="p1", route=route)
    metrics.time_per_output_token.labels(prompt="p1", route="adapter")
    metrics.time_per_output_token.labels(prompt="none", route="passthrough")
    metrics.decode_tokens.labels(prompt="p1", route="adapter")
    metrics.track_prompt("p1")  # the shadow guard's counters, at 0 like every registered prompt's
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        with harness.start_prometheus(tmp_path_factory.mktemp("prom"), [f"127.0.0.1:{port}"], scrape_self=True,
                                     deploy=deploy) as prom:
            harness.wait_for_scrapes(prom.url, 2)
            yield Stack(prom, metrics)
        assert prom.process.poll() is not None
    finally:
        server.shutdown()
        server.server_close()


def test_prometheus_scrapes_itself_and_accepts_every_query(stack: Stack, deploy: DeployFiles) -> None:
    url = stack.prom.url
    up = harness.query(url, 'up{job="prometheus"}')
    assert [item["value"][1] for item in up] == ["1"]
    assert harness.query(url, "1 + 1")[0]["value"][1] == "2"
    groups = harness.api_get(url, "/api/v1/rules", {})["groups"]
    assert {g["name"] for g in groups} >= {"promptintern-savings", "promptintern-traffic", "promptintern-alerts"}
    assert all(rule["health"] != "err" for g in groups for rule in g["rules"])
    for expr in harness.dashboard_expressions(deploy.dashboard) + harness.rule_expressions(deploy.rules_dir):
        harness.query(url, expr)  # raises ValueError on a query Prometheus refuses
    with pytest.raises(ValueError):
        harness.query(url, "sum(")
    assert harness.scrape_interval_seconds(url) == 1.0
    now = time.time()
    [series] = harness.query_range(url, 'up{job="prometheus"}', now - 5, now, 1)
    assert series["values"] and all(value == "1" for _t, value in series["values"])


def _settled(url: str, expr: str, expected: float | None = None) -> float:
    """The value of a one-series expression once the rules have caught up with the last scrape."""
    value = float("nan")
    for _ in range(40):
        result = harness.query(url, expr)
        if len(result) == 1:
            value = float(result[0]["value"][1])
            if expected is None or value == pytest.approx(expected, rel=1e-6):
                return value
        time.sleep(0.25)
    return value


def test_rules_and_dashboard_compute_savings_from_gateway_metrics(stack: Stack, deploy: DeployFiles) -> None:
    url, metrics = stack.prom.url, stack.metrics
    for _ in range(10):
        metrics.original_prompt_tokens.labels(prompt="p1").inc(100)
        metrics.sent_prompt_tokens.labels(prompt="p1").inc(40)
        metrics.saved_prompt_tokens.labels(prompt="p1").inc(60)
        metrics.saved_cost.labels(prompt="p1").inc(0.009)
        metrics.completion_tokens.labels(prompt="p1").inc(20)
        metrics.requests.labels(prompt="p1", route="adapter").inc(3)
        metrics.requests.labels(prompt="p1", route="fallback").inc(1)
        metrics.requests.labels(prompt="none", route="passthrough").inc(1)
        metrics.request_errors.labels(route="adapter", code="500").inc(1)
        metrics.request_duration.labels(route="adapter").observe(0.3)
        metrics.request_duration.labels(route="fallback").observe(4.0)
        metrics.time_to_first_token.labels(prompt="p1", route="adapter").observe(0.1)
        metrics.time_to_first_token.labels(prompt="p1", route="fallback").observe(1.0)
        metrics.time_per_output_token.labels(prompt="p1", route="adapter").observe(0.05)
        metrics.time_per_output_token.labels(prompt="none", route="passthrough").observe(0.03)
        metrics.decode_tokens.labels(prompt="p1", route="adapter").inc(3 * 9)  # 9 tokens after the first each
        metrics.detection_duration.observe(2e-5)
        metrics.shadow_requests.labels(prompt="p1", agree="true").inc(1)
        metrics.shadow_requests.labels(prompt="p1", agree="false").inc(3)
    metrics.shadow_agreement.labels(prompt="p1").set(0.25)
    metrics.rollbacks.labels(prompt="p1").inc()
    metrics.set_adapter_counts({"ready": 2, "failed": 1})
    metrics.show_candidates([CandidateOut(
        id="c1", tenant=None, kind="chat", template=[{"role": "user", "content": "Review: {value}"}],
        slots=["value"], requests=40, mean_prompt_tokens=50.0, static_tokens=45, static_share=0.9,
        projected_saved_tokens_per_1k_requests=40_000, projected_saved_tokens=1600, projected_saved_usd=0.00024,
        examples=[], first_seen=datetime.now(UTC), last_seen=datetime.now(UTC))])
    done = harness.wait_for_scrapes(url, 1, job=harness.GATEWAY_JOB)
    harness.wait_for_scrapes(url, done + 2, job=harness.GATEWAY_JOB)

    assert _settled(url, 'promptintern:saved_prompt_tokens:ratio_rate5m{prompt="p1"}', 0.6) == pytest.approx(0.6)
    assert _settled(url, 'promptintern:fallback_requests:ratio_rate5m{prompt="p1"}', 0.25) == pytest.approx(0.25)
    # 10 server errors against 50 answered requests plus those 10.
    assert _settled(url, "promptintern:request_errors:ratio_rate5m", 10 / 60) == pytest.approx(10 / 60)
    assert _settled(url, 'promptintern:saved_cost_usd_per_hour:rate5m{prompt="p1"}') > 0
    # Prefill saved (1.0 s - 0.1 s to the first token) minus decode overhead ((0.05 - 0.03) s x 9 tokens).
    net = 'promptintern:net_seconds_saved_per_request:mean5m{prompt="p1"}'
    assert _settled(url, net, 0.9 - 0.02 * 9) == pytest.approx(0.72)
    # 1 in 4 shadowed answers agreed with the teacher.
    shadow = 'promptintern:shadow_agreement:ratio_rate5m{prompt="p1"}'
    assert _settled(url, shadow, 0.25) == pytest.approx(0.25)

    # The dashboard's per-prompt share of tokens removed, with $prompt set to the prompt.
    [share] = [
        e
        for e in harness.dashboard_expressions(deploy.dashboard, {"prompt": "p1"})
        if e.startswith("sum by (prompt) (rate(promptintern_saved_prompt_tokens_total") and "original" in e
    ]
    assert _settled(url, share, 0.6) == pytest.approx(0.6)

    # Every gateway query of the dashboard finds series: a misspelt metric or label would not.
    exprs = harness.dashboard_expressions(deploy.dashboard)
    empty = [e for e in exprs if "vllm:" not in e and not harness.query(url, e)]
    assert empty == []
    # The candidates table: per 1,000 requests is the total over the requests seen.
    [per_1k] = [e for e in exprs if e.startswith("1000 * ") and "discovery_projected_saved_tokens" in e]
    [row] = harness.query(url, per_1k)
    assert row["metric"] == {"candidate": "c1", "tenant": "none", "kind": "chat"}
    assert float(row["value"][1]) == 40_000

    # The alerts' conditions hold; each still waits out its `for` (pending).
    wanted = {"PromptInternAdapterFallbackHigh", "PromptInternErrorRateHigh", "PromptInternAdaptersFailed",
              "PromptInternShadowAgreementLow", "PromptInternAdapterRolledBack"}
    pending: set[str] = set()
    for _ in range(40):
        pending = {item["metric"]["alertname"] for item in harness.query(url, 'ALERTS{alertname=~"PromptIntern.*"}')}
        if pending >= wanted:
            break
        time.sleep(0.25)
    assert pending >= wanted
    assert "PromptInternGatewayDown" not in pending
    # A rollback fires at once (no `for`); the rest wait.
    states = {item["metric"]["alertname"]: item["metric"]["alertstate"]
              for item in harness.query(url, 'ALERTS{alertname=~"PromptIntern.*"}')}
    assert states["PromptInternAdapterRolledBack"] == "firing"
    assert states["PromptInternShadowAgreementLow"] == "pending"
