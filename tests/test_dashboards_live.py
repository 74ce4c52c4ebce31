"""The deploy files against live traffic: a real gateway, a real Prometheus, every dashboard and rule query.

The gateway (tiny model) answers a known mix of adapter, fallback, passthrough and failing
requests; Prometheus scrapes it every second with the repo's rules. One prompt's adapter is guarded
and fails its shadow checks (rolled back), and a recurring unregistered prompt becomes a discovery
candidate. Every query of the Grafana dashboard and of the rules must find series, and the savings,
the guard's counts and the candidates must equal what the gateway said.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks import dashboard
from benchmarks import prometheus as prom
from benchmarks.deploy import DeployFiles
from core.config import Settings
from tests.conftest import LiveServer, gateway_settings
from tests.prom_harness import deploy_files, require_prometheus
from trainer.lora import random_lora

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHELL = [  # registered with an adapter: the adapter route
    {"role": "system", "content": "Answer with one shell command.\nInput: show files\nOutput: ls\n"
                                  "Input: where am I\nOutput: pwd"},
    {"role": "user", "content": "Input: {query}\nOutput:"},
]
SQL = [  # registered without one: the fallback route
    {"role": "system", "content": "Answer with one SQL query on orders(id, total).\nQ: count orders\n"
                                  "A: SELECT COUNT(*) FROM orders;"},
    {"role": "user", "content": "Q: {query}\nA:"},
]
SORT = [  # registered without one, given one after a round: both routes, so the net-seconds-saved rule has data
    {"role": "system", "content": "Answer with one sort command.\nInput: sort a.txt\nOutput: sort a.txt"},
    {"role": "user", "content": "Input: {query}\nOutput:"},
]
GUARDED = [  # registered with a random adapter and a guard it fails: shadowed, then rolled back to the fallback
    {"role": "system", "content": "Answer with one git command.\nInput: show changes\nOutput: git status"},
    {"role": "user", "content": "Input: {query}\nOutput:"},
]
GUARD_WINDOW = 2
GUARD = {"shadow_rate": 1.0, "min_agreement": 0.5, "window": GUARD_WINDOW}
GUARDED_ROUND = 1  # its `window` requests are sent in this round; none after, so it never falls back here
REVIEW = [  # never registered: passthrough requests that discovery finds as a candidate
    {"role": "system", "content": "You label the sentiment of a product review as positive, negative or neutral. "
                                  "Answer with the label only, in lower case, and nothing else at all."},
    {"role": "user", "content": "Review: {query}\nSentiment:"},
]
REVIEWS = ("the blender broke after two days", "great sound and the battery lasts all week",
           "it does what the box says", "arrived late and the lid was cracked", "my kids love this puzzle",
           "too small for a queen bed", "solid kettle, boils fast, a bit loud", "the colour faded after one wash",
           "comfortable shoes for long walks", "the charger stopped working", "fine for the price",
           "beautiful lamp but the cable is short")
REVIEWS_PER_ROUND = 2
DISCOVERY_MIN_REQUESTS = 5  # the gateway's setting here (default 20): the candidate appears within the test
QUERIES = ("make a dir", "count lines in a.txt", "print the date", "show the biggest order", "list big files")
ROUNDS = 6
ERROR_ROUNDS = (0, 3)  # each: one unknown model (404), one prompt longer than the context (400)
# Prompt `sort` falls back in the first two rounds, then has its adapter, answered three times a round: 2 of 14 fall
# back, under the alert. Its speed histograms exist at 0 from registration, so rate() sees every answer.
SORT_ADAPTER_FROM = 2
SORT_PER_ADAPTER_ROUND = 3
SENT = {("shell", "adapter"): 2 * ROUNDS, ("sql", "fallback"): ROUNDS,
        ("none", "passthrough"): ROUNDS + REVIEWS_PER_ROUND * ROUNDS,
        ("sort", "fallback"): SORT_ADAPTER_FROM,
        ("sort", "adapter"): SORT_PER_ADAPTER_ROUND * (ROUNDS - SORT_ADAPTER_FROM),
        ("guarded", "adapter"): GUARD_WINDOW}
PROMPTS = ("shell", "sql", "sort", "guarded", "none")
RATE_INTERVAL = "1m"  # `$__rate_interval` for the checks: wide enough to hold all of the test's traffic
# Alerts are conditions: empty while healthy. vLLM's holds here, since there is no vLLM, and the guard's two,
# since prompt `guarded` agrees with its teacher less than 80% and was rolled back.
ALERTS_FIRING = {"PromptInternVllmDown", "PromptInternAdapterRolledBack", "PromptInternShadowAgreementLow"}
# Its numerator counts 5xx errors only; with none sent it has no series (the test sends 4xx only).
EMPTY_WITHOUT_SERVER_ERRORS = {"promptintern:request_errors:ratio_rate5m"}


@dataclass
class Observed:
    """What the test sent and what the responses said, next to the Prometheus that scraped it all."""

    server: LiveServer
    prometheus_url: str
    started: float
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    original: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    saved: Counter[str] = field(default_factory=Counter)
    rejected: dict[str, Any] = field(default_factory=dict)  # prompt `guarded`'s version the guard rolled back
    candidate: dict[str, Any] = field(default_factory=dict)  # the review prompt, as GET /v1/prompts/candidates said


def _chat(server: LiveServer, messages: list[dict[str, str]], model: str = BASE) -> httpx.Response:
    body = {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)


def _fill(template: list[dict[str, str]], query: str) -> list[dict[str, str]]:
    return [{**m, "content": m["content"].replace("{query}", query)} for m in template]


def _answered(seen: Observed, response: httpx.Response, prompt: str, route: str) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["x-promptintern-route"] == route
    if prompt != "none":
        assert response.headers["x-promptintern-prompt"] == prompt
    usage = response.json()["usage"]
    seen.requests[prompt, route] += 1
    seen.original[prompt] += usage["promptintern"]["original_prompt_tokens"]
    seen.sent[prompt] += usage["prompt_tokens"]
    seen.saved[prompt] += usage["promptintern"]["saved_prompt_tokens"]


def _failed(seen: Observed, response: httpx.Response, route: str, code: int) -> None:
    assert response.status_code == code, response.text
    seen.errors[route, str(code)] += 1


def _send_traffic(seen: Observed, sort_adapter: Path) -> None:
    server = seen.server
    for r in range(ROUNDS):
        if r == SORT_ADAPTER_FROM:
            with server.admin() as admin:
                added = admin.post("/v1/prompts/sort/adapters", json={"adapter_path": str(sort_adapter)})
                assert added.status_code == 201, added.text
        adapter = r >= SORT_ADAPTER_FROM
        for i in range(SORT_PER_ADAPTER_ROUND if adapter else 1):
            _answered(seen, _chat(server, _fill(SORT, QUERIES[(r + i) % len(QUERIES)])), "sort",
                      "adapter" if adapter else "fallback")
        for i in range(2):
            _answered(seen, _chat(server, _fill(SHELL, QUERIES[(2 * r + i) % len(QUERIES)])), "shell", "adapter")
        _answered(seen, _chat(server, _fill(SQL, QUERIES[r % len(QUERIES)])), "sql", "fallback")
        _answered(seen, _chat(server, [{"role": "user", "content": f"hello {r}"}]), "none", "passthrough")
        if r == GUARDED_ROUND:
            for i in range(GUARD_WINDOW):
                _answered(seen, _chat(server, _fill(GUARDED, QUERIES[i])), "guarded", "adapter")
        for i in range(REVIEWS_PER_ROUND):
            review = REVIEWS[(REVIEWS_PER_ROUND * r + i) % len(REVIEWS)]
            _answered(seen, _chat(server, _fill(REVIEW, review)), "none", "passthrough")
        if r in ERROR_ROUNDS:
            _failed(seen, _chat(server, [{"role": "user", "content": "hi"}], model="gpt-5"), "none", 404)
            too_long = [{"role": "user", "content": "word " * 2000}]  # the tiny model's context is 512
            _failed(seen, _chat(server, too_long), "passthrough", 400)
        # Two scrapes between rounds (the first may have read the metrics before this round's last answer): a
        # histogram's series is created at its first observation, so rate() only sees an observation that a scrape
        # follows; prompt `sort`'s two fallback answers (rounds 0 and 1) must be in different scrapes, whatever the
        # speed of the machine. A fixed sleep between rounds let both land in one scrape on a fast one.
        _next_scrapes(seen.prometheus_url, 2)
    with server.admin() as admin:
        # The shadow checks run after the answers, in the background: the guard rejects v1, the fallback takes over.
        body = _wait_for(lambda: (b := admin.get("/v1/prompts/guarded").json())["active_version"] is None and b,
                         "the shadow guard rolling prompt `guarded` back")
        [seen.rejected] = body["versions"]
        # Mined in the background too; a listing flushes this replica's findings and sets the candidate gauges.
        seen.candidate = _wait_for(lambda: next((c for c in admin.get("/v1/prompts/candidates").json()["data"]
                                                 if c["template"][0]["content"] == REVIEW[0]["content"]), None),
                                   "discovery finding the review prompt")


def _next_scrapes(url: str, n: int) -> None:
    """Wait until Prometheus has scraped the gateway `n` more times."""
    now = prom.wait_for_scrapes(url, 1, job=prom.GATEWAY_JOB)
    prom.wait_for_scrapes(url, now + n, job=prom.GATEWAY_JOB)


def _wait_for(condition: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    """The condition's value once truthy (background work: shadow checks, mining); fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


@pytest.fixture(scope="module")
def deploy(request: pytest.FixtureRequest) -> DeployFiles:
    return deploy_files(request.config)


@pytest.fixture(scope="module")
def observed(tiny_model_path: Path, module_tmp: Path, deploy: DeployFiles) -> Iterator[Observed]:
    require_prometheus()
    adapter = random_lora(tiny_model_path, module_tmp / "data" / "import" / "shell-lora", seed=21, scale=20.0)
    sort_adapter = random_lora(tiny_model_path, module_tmp / "data" / "import" / "sort-lora", seed=22, scale=20.0)
    # Random weights answer unlike the base model with the full prompt: every shadow check disagrees.
    guarded = random_lora(tiny_model_path, module_tmp / "data" / "import" / "guarded-lora", seed=23, scale=20.0)
    settings = gateway_settings(module_tmp, tiny_model_path, discovery_min_requests=DISCOVERY_MIN_REQUESTS,
                                discovery_flush_seconds=0.5)
    with LiveServer(settings) as server:
        with server.admin() as admin:
            r = admin.post("/v1/prompts", json={"name": "shell", "messages": SHELL, "adapter_path": str(adapter)})
            assert r.status_code == 201 and r.json()["status"] == "ready", r.text
            assert admin.post("/v1/prompts", json={"name": "sql", "messages": SQL}).status_code == 201
            assert admin.post("/v1/prompts", json={"name": "sort", "messages": SORT}).status_code == 201
            r = admin.post("/v1/prompts", json={"name": "guarded", "messages": GUARDED, "adapter_path": str(guarded)})
            assert r.status_code == 201 and r.json()["status"] == "ready", r.text
            assert admin.patch("/v1/prompts/guarded", json={"guard": GUARD}).status_code == 200
        target = server.url.removeprefix("http://")
        with prom.start_prometheus(module_tmp, [target], "1s", deploy=deploy) as prometheus:
            prom.wait_for_scrapes(prometheus.url, 2, job=prom.GATEWAY_JOB)
            seen = Observed(server, prometheus.url, started=time.time())
            _send_traffic(seen, sort_adapter)
            done = prom.wait_for_scrapes(prometheus.url, 1, job=prom.GATEWAY_JOB)
            prom.wait_for_scrapes(prometheus.url, done + 2, job=prom.GATEWAY_JOB)
            yield seen


def _settled(url: str, expr: str, expected: float, rel: float = 1e-9) -> float:
    """The value of a one-series expression once the rules have evaluated after the last scrape."""
    value = math.nan
    for _ in range(40):
        result = prom.query(url, expr)
        if len(result) == 1:
            value = float(result[0]["value"][1])
            if value == pytest.approx(expected, rel=rel):
                break
        time.sleep(0.25)
    return value


def _by(url: str, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(item["metric"].get(k, "") for k in labels): float(item["value"][1])
            for item in prom.query(url, expr)}


def test_every_dashboard_query_returns_data(observed: Observed, deploy: DeployFiles) -> None:
    variables = {"__rate_interval": RATE_INTERVAL, "__range": "5m"}
    exprs = prom.dashboard_expressions(deploy.dashboard, variables)
    assert len(exprs) >= 20
    empty, vllm = [], []
    for expr in exprs:
        result = prom.query(observed.prometheus_url, expr)  # raises ValueError if Prometheus refuses it
        if "vllm:" in expr:
            vllm.append((expr, result))  # no vLLM in this test: accepted by Prometheus, and empty
        elif not result:
            empty.append(expr)
    assert empty == []
    assert vllm and all(result == [] for _expr, result in vllm)
    # The per-prompt panels, with the Prompt selector on one prompt.
    one = [e for e in prom.dashboard_expressions(deploy.dashboard, {**variables, "prompt": "shell"})
           if "saved_prompt_tokens" in e]
    assert one and all(prom.query(observed.prometheus_url, e) for e in one)


def test_every_rule_evaluates_and_has_data_or_the_alert_state_expected(observed: Observed,
                                                                        deploy: DeployFiles) -> None:
    url = observed.prometheus_url
    names, exprs = prom.rule_names(deploy.rules_dir), prom.rule_expressions(deploy.rules_dir)
    assert len(names) == len(exprs) >= 10
    missing, firing = [], set()
    for name, expr in zip(names, exprs, strict=True):
        result = prom.query(url, expr)
        if name.startswith("PromptIntern"):
            if result:
                firing.add(name)
        elif name in EMPTY_WITHOUT_SERVER_ERRORS:
            assert [float(item["value"][1]) for item in result] in ([], [0.0]), name
        elif not result or not prom.query(url, name):  # the expression, and the series Prometheus recorded
            missing.append(name)
    assert missing == []
    assert firing == ALERTS_FIRING
    groups = prom.api_get(url, "/api/v1/rules", {})["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == set(names)
    assert all(rule["health"] == "ok" for rule in rules.values()), rules
    assert rules["PromptInternVllmDown"]["state"] == "pending"  # its `for: 5m` has not passed
    assert rules["PromptInternGatewayDown"]["state"] == "inactive"


def test_counters_equal_what_the_responses_said(observed: Observed) -> None:
    url, price = observed.prometheus_url, observed.server.settings.price_input_per_1k
    assert observed.requests == Counter(SENT)
    by_route = _by(url, "sum by (prompt, route) (promptintern_requests_total)", "prompt", "route")
    assert {k: v for k, v in by_route.items() if v} == dict(SENT)
    # Every registered prompt's series exist from registration on, at 0 where nothing was sent.
    assert by_route[("shell", "fallback")] == 0 and by_route[("sql", "adapter")] == 0
    assert _by(url, "sum by (route, code) (promptintern_request_errors_total)", "route", "code") == {
        ("none", "404"): len(ERROR_ROUNDS), ("passthrough", "400"): len(ERROR_ROUNDS)}
    for metric, expected in (("original", observed.original), ("sent", observed.sent), ("saved", observed.saved)):
        got = _by(url, f"promptintern_{metric}_prompt_tokens_total", "prompt")
        # `other` (prompts past METRICS_MAX_PROMPTS) is always exported, at 0 here: four prompts are far below it.
        assert got == {**{(p,): float(expected[p]) for p in PROMPTS}, ("other",): 0.0}, metric
    assert observed.saved["shell"] > 0 and observed.saved["sql"] == observed.saved["none"] == 0
    cost = _by(url, "promptintern_saved_cost_usd_total", "prompt")
    assert cost[("shell",)] == pytest.approx(observed.saved["shell"] / 1000 * price, rel=1e-9)
    assert cost[("sql",)] == cost[("none",)] == 0


def test_recording_rules_equal_what_the_responses_said(observed: Observed) -> None:
    url, price = observed.prometheus_url, observed.server.settings.price_input_per_1k
    share = observed.saved["shell"] / observed.original["shell"]
    assert 0 < share < 1
    got = _settled(url, 'promptintern:saved_prompt_tokens:ratio_rate5m{prompt="shell"}', share)
    assert got == pytest.approx(share, rel=1e-9)
    assert _settled(url, 'promptintern:saved_prompt_tokens:ratio_rate5m{prompt="sql"}', 0.0) == 0.0
    assert _settled(url, 'promptintern:fallback_requests:ratio_rate5m{prompt="sql"}', 1.0) == 1.0
    # Rates over the same scrapes, from a common zero: their ratios are the ratios of the totals.
    per_hour = _by(url, "promptintern:saved_cost_usd_per_hour:rate5m", "prompt")[("shell",)]
    tokens = _by(url, "promptintern:saved_prompt_tokens:rate5m", "prompt")[("shell",)]
    assert per_hour == pytest.approx(tokens / 1000 * price * 3600, rel=1e-6)
    rates = _by(url, "promptintern:requests:rate5m", "prompt", "route")
    passthrough = SENT[("none", "passthrough")]
    for key in (("shell", "adapter"), ("sql", "fallback"), ("guarded", "adapter")):
        assert rates[key] / rates[("none", "passthrough")] == pytest.approx(SENT[key] / passthrough, rel=1e-9)


def _alert_states(url: str) -> dict[str, str]:
    return {item["metric"]["alertname"]: item["metric"]["alertstate"]
            for item in prom.query(url, 'ALERTS{alertname=~"PromptIntern.*"}')}


def test_the_shadow_guard_panels_and_alerts_show_the_rollback(observed: Observed, deploy: DeployFiles) -> None:
    url, window = observed.prometheus_url, GUARD_WINDOW
    rejected = observed.rejected
    assert rejected["status"] == "rejected" and "shadow guard" in rejected["reason"]
    # Every guarded answer was shadowed, and none agreed well enough (the window's mean fell below 0.5).
    shadowed = _by(url, "sum by (prompt, agree) (promptintern_shadow_requests_total)", "prompt", "agree")
    assert shadowed[("guarded", "true")] + shadowed[("guarded", "false")] == window
    assert shadowed[("guarded", "false")] >= 1
    assert {k: v for k, v in shadowed.items() if k[0] != "guarded"} == {
        (p, agree): 0.0 for p in (*PROMPTS, "other") if p != "guarded" for agree in ("true", "false")}
    assert _by(url, "sum by (prompt) (promptintern_rollbacks_total)", "prompt")[("guarded",)] == 1
    assert _by(url, "sum(promptintern_shadow_dropped_total)")[()] == 0
    agreement = _by(url, "min by (prompt) (promptintern_shadow_agreement)", "prompt")
    assert set(agreement) == {("guarded",)} and agreement[("guarded",)] < GUARD["min_agreement"]
    ratio = _settled(url, 'promptintern:shadow_agreement:ratio_rate5m{prompt="guarded"}',
                     shadowed[("guarded", "true")] / window)
    assert ratio == pytest.approx(shadowed[("guarded", "true")] / window, rel=1e-9)
    # The row's panels, with the Prompt selector on the prompt.
    panels = [e for e in prom.dashboard_expressions(deploy.dashboard, {"__rate_interval": RATE_INTERVAL,
                                                                       "__range": "5m", "prompt": "guarded"})
              if "shadow_" in e or "rollbacks" in e]
    assert len(panels) == 4 and all(prom.query(url, e) for e in panels)
    # The rollback alert fires at once (no `for`), naming the prompt; low agreement waits out its 10 minutes.
    states: dict[str, str] = {}
    for _ in range(40):
        if (states := _alert_states(url)).get("PromptInternAdapterRolledBack") == "firing":
            break
        time.sleep(0.25)
    assert states["PromptInternAdapterRolledBack"] == "firing"
    assert states["PromptInternShadowAgreementLow"] == "pending"
    [alert] = prom.query(url, 'ALERTS{alertname="PromptInternAdapterRolledBack"}')
    assert alert["metric"]["prompt"] == "guarded" and alert["metric"]["severity"] == "warning"


def test_the_candidates_table_shows_what_discovery_found(observed: Observed, deploy: DeployFiles) -> None:
    url, found = observed.prometheus_url, observed.candidate
    assert found["requests"] == REVIEWS_PER_ROUND * ROUNDS >= DISCOVERY_MIN_REQUESTS
    assert found["projected_saved_tokens"] > 0
    [table] = [p for p in json.loads(deploy.dashboard.read_text())["panels"]
               if p["title"] == "Prompt candidates (discovery)"]
    assert table["type"] == "table"
    columns: dict[str, float] = {}
    for target in table["targets"]:
        expr = prom.substitute(target["expr"], {}, ".+")
        [row] = [r for r in prom.query(url, expr) if r["metric"].get("candidate") == found["id"]]
        assert row["metric"] == {"candidate": found["id"], "tenant": "none", "kind": "chat"}
        columns[target["refId"]] = float(row["value"][1])
    assert columns == {"A": found["requests"], "B": found["projected_saved_tokens_per_1k_requests"],
                       "C": found["projected_saved_tokens"], "D": pytest.approx(found["projected_saved_usd"])}


def _check_png(path: Path) -> Any:
    assert path.is_file() and path.stat().st_size > 20_000
    image = pytest.importorskip("PIL.Image")
    with image.open(path) as img:
        img.verify()
    with image.open(path) as img:
        assert img.format == "PNG" and img.width > 1000 and img.height > 600
        return img.convert("L").getextrema()


def test_render_draws_the_dashboard_from_prometheus(observed: Observed, deploy: DeployFiles, tmp_path: Path) -> None:
    window = f"{math.ceil(time.time() - observed.started) + 5}s"
    out = dashboard.render(observed.prometheus_url, tmp_path / "dashboard.png", window, deploy=deploy,
                           subtitle="test traffic")
    low, high = _check_png(out)
    assert high - low > 100  # not a blank page


def test_run_without_prometheus_builds_a_demo_stack(tiny_model_path: Path, deploy: DeployFiles,
                                                     tmp_path: Path) -> None:
    require_prometheus()
    settings = Settings(torch_threads=2, data_dir=tmp_path / "unused", adapter_dir=tmp_path / "unused-adapters")
    out = dashboard.run(settings, tmp_path / "demo.png", duration=4, model_path=tiny_model_path, deploy=deploy)
    assert out == tmp_path / "demo.png"
    _check_png(out)


def test_legend_and_cumulative_follow_grafana_and_increase(deploy: DeployFiles) -> None:
    assert dashboard.legend("p95 {{route}}", {"route": "adapter"}) == "p95 adapter"
    assert dashboard.legend("__auto", {"prompt": "a"}) == "prompt=a"
    # A reset (5 -> 1) counts the 1 after it, as Prometheus's increase() does.
    assert dashboard.cumulative([(0, 2.0), (1, 5.0), (2, 1.0), (3, 4.0)], appeared_late=False) == [0, 3, 4, 7]
    assert dashboard.cumulative([(0, 2.0), (1, 5.0)], appeared_late=True) == [2, 5]
    assert [dashboard.dollars(v) for v in (3.06e-5, 0.5, 1234.5, 0)] == ["$0.0000306", "$0.500", "$1,234.50",
                                                                         "$0.00"]
    assert set(dashboard.GRAPH_TITLES) | set(dashboard.STAT_TITLES) <= set(dashboard.load_panels(deploy.dashboard))
