"""A real Prometheus on loopback, driven from Python: start it with the repo's rules, wait for scrapes, query it.

The dashboard picture and the tests use it to read the deploy files' PromQL against live metrics:
the recording rules and the dashboard's panels are checked, and drawn, as Prometheus computes them.
Needs the `prometheus` binary (Debian's package `prometheus`); `prometheus_binary()` is None
without it. The deploy files are read from a `deploy/` folder named by the caller (`DeployFiles`:
`--deploy-dir`, or `deploy` in the working directory), never found relative to this module.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.deploy import DeployFiles
from benchmarks.errors import BenchInputError
from gateway.local_server import free_port

GATEWAY_JOB = "promptintern-gateway"
INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus"

# Grafana's built-in variables, replaced by fixed values so that the queries run as plain PromQL.
GRAFANA_DEFAULTS = {
    "__rate_interval": "15s",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}



def prometheus_binary() -> str | None:
    found = shutil.which("prometheus")
    if found:
        return found
    return "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None


def _check_loopback(target: str) -> None:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"scrape target {target!r} is not on loopback (127.0.0.0/8, localhost or [::1])")


@dataclass
class PrometheusHandle:
    """A running Prometheus process and where it keeps its files; stop it with `.stop()` or `with`."""

    url: str
    process: subprocess.Popen[bytes]
    workdir: Path
    config_path: Path
    log_path: Path
    _log: Any = field(repr=False, default=None)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PrometheusHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_config(path: Path, jobs: dict[str, list[str]], rule_files: list[str], scrape_interval: str = "1s") -> Path:
    """A Prometheus config scraping `jobs` (job name -> host:port targets), evaluating `rule_files` (globs)."""
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": rule_files,
        "scrape_configs": [
            {"job_name": job, "scrape_timeout": scrape_interval, "static_configs": [{"targets": targets}]}
            for job, targets in jobs.items()
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_prometheus(
    tmp_path: Path,
    targets: list[str],
    scrape_interval: str = "1s",
    *,
    job: str = GATEWAY_JOB,
    extra_jobs: dict[str, list[str]] | None = None,
    scrape_self: bool = False,
    deploy: DeployFiles = DeployFiles(),
    timeout: float = 60.0,
) -> PrometheusHandle:
    """Start Prometheus on a free loopback port, scraping `targets` as `job`; wait until it is ready.

    It evaluates the rules of `deploy` (default: `deploy/` in the working directory). `extra_jobs`
    adds more jobs (e.g. {"vllm": ["127.0.0.1:8100"]}); `scrape_self` adds a job "prometheus"
    scraping this Prometheus's own /metrics. Stop it with `.stop()` (or `with`).
    """
    jobs: dict[str, list[str]] = {}
    if targets:
        jobs[job] = list(targets)
    for name, more in (extra_jobs or {}).items():
        jobs[name] = list(more)
    for job_targets in jobs.values():
        for target in job_targets:
            _check_loopback(target)
    rule_files = [str(deploy.checked().rules_dir / "*.yml")]
    binary = prometheus_binary()
    if binary is None:
        raise BenchInputError(f"no prometheus binary: {INSTALL_HINT}")

    workdir = Path(tmp_path) / f"prometheus-{free_port()}"
    workdir.mkdir(parents=True)
    last_error = ""
    for _attempt in range(3):  # the free port can be taken between choosing it and binding it
        port = free_port()
        address = f"127.0.0.1:{port}"
        all_jobs = dict(jobs)
        if scrape_self:
            all_jobs["prometheus"] = [address]
        config_path = write_config(workdir / "prometheus.yml", all_jobs, rule_files, scrape_interval)
        log_path = workdir / f"prometheus-{port}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={address}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        handle = PrometheusHandle(f"http://{address}", process, workdir, config_path, log_path, log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{handle.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return handle
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        handle.stop()
        last_error = handle.log_tail()
        if "address already in use" not in last_error:
            break
    raise RuntimeError(f"Prometheus did not become ready; its log ends with:\n{last_error}")


def api_get(url: str, path: str, params: dict[str, str]) -> Any:
    """The `data` of a Prometheus HTTP API answer; ValueError with Prometheus's reason when it refuses."""
    full = f"{url}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(full, timeout=10) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:  # 400/422: a bad expression; the body says why
        body = json.loads(exc.read() or b"{}")
    if body.get("status") != "success":
        raise ValueError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """Evaluate `expr` now (or at unix time `at`); the result's series as Prometheus returns them.

    Each item is {"metric": {labels}, "value": [time, "number"]}; a scalar or string result comes
    back as one item with empty labels. Raises ValueError when Prometheus refuses the expression.
    """
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = api_get(url, "/api/v1/query", params)
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    return list(data["result"])


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    """Evaluate `expr` every `step` seconds from `start` to `end` (unix times), as a graph panel does.

    Each item is {"metric": {labels}, "values": [[time, "number"], ...]}.
    """
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    data = api_get(url, "/api/v1/query_range", params)
    if data["resultType"] == "scalar":
        return [{"metric": {}, "values": data["result"]}]
    return list(data["result"])


def values(url: str, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
    """`query` as {sorted label pairs: float value}: handy for asserting on numbers."""
    return {tuple(sorted(item["metric"].items())): float(item["value"][1]) for item in query(url, expr)}


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration such as `90s`, `5m` or `1h30m`."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def scrape_interval_seconds(url: str, default: float = 15.0) -> float:
    """The global scrape interval of a running Prometheus, which Grafana's `$__rate_interval` builds on."""
    config = yaml.safe_load(api_get(url, "/api/v1/status/config", {})["yaml"]) or {}
    interval = (config.get("global") or {}).get("scrape_interval")
    return parse_duration(interval) if isinstance(interval, str) else default


def wait_for_scrapes(url: str, n: int, job: str | None = None, timeout: float = 60.0) -> int:
    """Wait until every target (of `job`, or all) has been scraped successfully at least `n` times.

    Returns the smallest count of successful scrapes over the targets.
    """
    selector = f'{{job="{job}"}}' if job else ""
    deadline = time.monotonic() + timeout
    counts: dict[tuple[str, str], float] = {}
    while time.monotonic() < deadline:
        active = api_get(url, "/api/v1/targets", {"state": "active"})["activeTargets"]
        wanted = {
            (t["labels"].get("job", ""), t["labels"].get("instance", ""))
            for t in active
            if job is None or t["labels"].get("job") == job
        }
        counts = {
            (item["metric"].get("job", ""), item["metric"].get("instance", "")): float(item["value"][1])
            for item in query(url, f"sum_over_time(up{selector}[1h])")
        }
        if wanted and all(counts.get(key, 0.0) >= n for key in wanted):
            return int(min(counts[key] for key in wanted))
        time.sleep(0.25)
    raise TimeoutError(f"targets{selector}: successful scrapes {counts} after {timeout} s, wanted {n} each")


_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def substitute(expr: str, variables: dict[str, str] | None = None, default: str = ".+") -> str:
    """Replace Grafana's variables in `expr`: built-ins by fixed durations, the others by `variables`
    (a template variable not given becomes `default`, a regex matching any value)."""
    given = {**GRAFANA_DEFAULTS, **(variables or {})}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name in given:
            return given[name]
        if name.startswith("__"):
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return default

    return _VARIABLE.sub(replace, expr)


def _exprs(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for target in node.get("targets", []) or []:
            if isinstance(target, dict) and target.get("expr"):
                found.append(target["expr"])
        for panel in node.get("panels", []) or []:
            found.extend(_exprs(panel))
    elif isinstance(node, list):
        for item in node:
            found.extend(_exprs(item))
    return found


def dashboard_expressions(path: Path, variables: dict[str, str] | None = None, default: str = ".+") -> list[str]:
    """Every panel query (`targets[].expr`, rows included) of a dashboard JSON, as plain PromQL.

    `$__rate_interval`, `$__interval` and `$__range` become fixed durations; template variables
    such as `$prompt` become `variables[name]`, or `default` (`.+`) when not given.
    """
    dashboard = json.loads(Path(path).read_text())
    return [substitute(expr, variables, default) for expr in _exprs(dashboard.get("panels", []))]


def _rules(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    files = sorted(path.glob("*.yml")) if path.is_dir() else [path]
    rules: list[dict[str, Any]] = []
    for file in files:
        for group in (yaml.safe_load(file.read_text()) or {}).get("groups", []):
            rules.extend(group.get("rules", []))
    return rules


def rule_expressions(path: Path) -> list[str]:
    """The `expr` of every recording and alerting rule in a rules file (or in every *.yml of a folder)."""
    return [rule["expr"] for rule in _rules(path)]


def rule_names(path: Path) -> list[str]:
    """The names of every recording rule (`record`) and alert (`alert`), in file order."""
    return [rule.get("record") or rule["alert"] for rule in _rules(path)]
