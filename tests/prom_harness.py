"""The tests' name for the Prometheus harness, which lives in the package (gateway/bench/prometheus.py)."""

from __future__ import annotations

import os

import pytest

from benchmarks.prometheus import (
    DASHBOARD,
    GATEWAY_JOB,
    GRAFANA_DEFAULTS,
    INSTALL_HINT,
    REPO,
    RULES_DIR,
    PrometheusHandle,
    api_get,
    dashboard_expressions,
    free_port,
    parse_duration,
    prometheus_binary,
    query,
    query_range,
    rule_expressions,
    rule_names,
    scrape_interval_seconds,
    start_prometheus,
    substitute,
    values,
    wait_for_scrapes,
    write_config,
)

__all__ = [
    "DASHBOARD", "GATEWAY_JOB", "GRAFANA_DEFAULTS", "INSTALL_HINT", "REPO", "RULES_DIR", "PrometheusHandle", "api_get",
    "dashboard_expressions", "free_port", "parse_duration", "prometheus_binary", "query", "query_range",
    "require_prometheus", "rule_expressions", "rule_names", "scrape_interval_seconds", "start_prometheus",
    "substitute", "values", "wait_for_scrapes", "write_config",
]


def require_prometheus() -> str:
    """The prometheus binary; without it a skip, or a failure under CI=true, where a skip would hide a gap."""
    binary = prometheus_binary()
    if binary is not None:
        return binary
    reason = f"no prometheus binary (`make prometheus`, or {INSTALL_HINT})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true, so the dashboard and rule tests must run")
    pytest.skip(reason)
