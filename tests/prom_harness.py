"""What the Prometheus tests share beyond the harness itself (`benchmarks.prometheus`): the checkout's deploy
files, located from pytest's root rather than from a module's path, and the binary required."""

from __future__ import annotations

import os

import pytest

from benchmarks.deploy import DeployFiles
from benchmarks.prometheus import INSTALL_HINT, prometheus_binary


def deploy_files(config: pytest.Config) -> DeployFiles:
    """The deploy files of the checkout under test (`deploy/` at pytest's root directory)."""
    return DeployFiles(config.rootpath / "deploy").checked()


def require_prometheus() -> str:
    """The prometheus binary; without it a skip, or a failure under CI=true, where a skip would hide a gap."""
    binary = prometheus_binary()
    if binary is not None:
        return binary
    reason = f"no prometheus binary (`make prometheus`, or {INSTALL_HINT})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true, so the dashboard and rule tests must run")
    pytest.skip(reason)
