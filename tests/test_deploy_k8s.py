"""deploy/k8s: valid against the Kubernetes schemas, offline, and consistent with itself and the gateway.

Every manifest is checked with `kubernetes-validate` (the schemas ship inside the package; strict:
unknown fields fail) for the oldest and the newest Kubernetes version supported here, and so is what
`kubectl kustomize` renders where kubectl is at hand. Then the cross-references a schema cannot see:
Services select pods that exist, probes and scrape annotations hit the gateway's real routes and
ports, env names are real settings, every referenced ConfigMap, Secret key and volume claim exists,
the replicas and the worker share one registry and one adapter store, and the images are those of
docker-compose.yml.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from core import basemodel
from core.config import Settings

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e .[dev] (kubernetes-validate)")

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
SECRETS_EXAMPLE = K8S / "secrets.env.example"
COMPOSE = REPO / "docker-compose.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
# The oldest Kubernetes still commonly run, and the newest whose schemas the package ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
WORKLOADS = ("Deployment", "StatefulSet", "Job")
SECRET_NAME = "promptintern-secrets"
SETTINGS_NAME = "promptintern-settings"
COMPONENT = "app.kubernetes.io/component"


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def manifests() -> list[tuple[str, dict[str, Any]]]:
    files = sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)
    assert files
    return [(p.name, doc) for p in files for doc in _load(p)]


def _objects(manifests: list[tuple[str, dict[str, Any]]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _f, doc in manifests if doc["kind"] == kind}


def _one(manifests: list[tuple[str, dict[str, Any]]], kind: str, name: str) -> dict[str, Any]:
    found = _objects(manifests, kind)
    assert name in found, f"no {kind} {name} in deploy/k8s"
    return found[name]


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _containers(pod: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    return [*(pod.get("initContainers", []) if init else []), *pod["containers"]]


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    [container] = [c for c in _pod_spec(workload)["containers"] if c["name"] == name]
    return container


def _mounts(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """mountPath -> (volume name, volume) of one container."""
    volumes = {v["name"]: v for v in _pod_spec(workload).get("volumes", [])}
    return {m["mountPath"]: (m["name"], volumes[m["name"]]) for m in container.get("volumeMounts", [])}


def _claim(volume: dict[str, Any]) -> str | None:
    claim = volume.get("persistentVolumeClaim")
    return str(claim["claimName"]) if claim else None


def _settings_data(manifests: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    data: dict[str, str] = _one(manifests, "ConfigMap", SETTINGS_NAME)["data"]
    return data


def _secret_example() -> dict[str, str]:
    entries = {}
    for line in SECRETS_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            entries[key.strip()] = value
    return entries


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _validate(doc: dict[str, Any], version: str) -> str | None:
    """None when `doc` passes the strict schema of its kind for `version`, else why not."""
    utils = kubernetes_validate.utils
    try:
        utils.validate(doc, version, strict=True)
    except utils.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}"
    except utils.SchemaNotFoundError as exc:
        return f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}"
    return None


# --- schemas ------------------------------------------------------------------------------------


def test_the_schemas_ship_with_the_package() -> None:
    """Validation must run offline: the JSON schemas are files inside the installed package."""
    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    for version in K8S_VERSIONS:
        folder = schemas / f"v{version}-local-strict"
        assert (folder / "deployment-apps-v1.json").is_file() and (folder / "_definitions.json").is_file()


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid(manifests: list[tuple[str, dict[str, Any]]], version: str) -> None:
    errors = [f"{name}: {error}" for name, doc in manifests if (error := _validate(doc, version))]
    assert errors == []


def test_the_validator_rejects_what_kubernetes_would(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    """A misspelt field and a wrong type fail: the check above is not vacuous."""
    gateway = _one(manifests, "Deployment", "promptintern-gateway")
    misspelt = yaml.safe_load(yaml.safe_dump(gateway))
    _container(misspelt, "gateway")["readinessProbe"]["periodSecond"] = 5
    assert "periodSecond" in (_validate(misspelt, K8S_VERSIONS[-1]) or "")
    wrong_type = yaml.safe_load(yaml.safe_dump(gateway))
    wrong_type["spec"]["replicas"] = "two"
    assert "replicas" in (_validate(wrong_type, K8S_VERSIONS[-1]) or "")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    files = {p.name for p in K8S.glob("*.yaml") if p != KUSTOMIZATION}
    assert set(kustomization["resources"]) == files
    assert kustomization["namespace"] == "promptintern"
    [generator] = kustomization["secretGenerator"]
    assert generator["name"] == SECRET_NAME and generator["envs"] == ["secrets.env"]
    # The filled-in secrets stay out of git; the example is what to copy.
    assert "secrets.env" in (K8S / ".gitignore").read_text().split()
    assert SECRETS_EXAMPLE.is_file()


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def test_kustomize_renders_valid_objects(tmp_path: Path) -> None:
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kubectl nor kustomize here")
    folder = tmp_path / "k8s"
    shutil.copytree(K8S, folder)
    password = "s3cret-Password-42"
    values = {
        "PROMPTINTERN_ADMIN_KEY": "an-admin-key-of-32-characters-ok",
        "PROMPTINTERN_DATABASE_URL": f"postgresql+psycopg://promptintern:{password}@postgres:5432/promptintern",
        "POSTGRES_PASSWORD": password,
        "PROMPTINTERN_API_KEYS": "team-a:key-a,key-b",
    }
    assert set(values) == set(_secret_example())
    (folder / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    result = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "KUBECONFIG": str(tmp_path / "no-cluster")})
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for version in K8S_VERSIONS:
        assert [e for doc in rendered if (e := _validate(doc, version))] == []
    [secret] = [d for d in rendered if d["kind"] == "Secret"]
    assert secret["metadata"]["name"].startswith(SECRET_NAME + "-")  # hashed: a change rolls the pods
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "promptintern", doc["metadata"]["name"]
    # Every reference to the Secret follows its hashed name.
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for doc in rendered if doc["kind"] in WORKLOADS
            for c in _containers(_pod_spec(doc)) for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert refs and set(refs) == {secret["metadata"]["name"]}


# --- references between the manifests -------------------------------------------------------------


def test_workload_selectors_match_their_pods(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    for kind in ("Deployment", "StatefulSet"):
        for name, workload in _objects(manifests, kind).items():
            labels = workload["spec"]["template"]["metadata"]["labels"]
            selector = workload["spec"]["selector"]["matchLabels"]
            assert selector.items() <= labels.items(), f"{kind} {name}"


def test_services_select_existing_pods_and_ports(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    templates = [w for kind in ("Deployment", "StatefulSet") for w in _objects(manifests, kind).values()]
    services = _objects(manifests, "Service")
    assert {"promptintern-gateway", "vllm", "postgres"} <= set(services)
    for name, service in services.items():
        selector = service["spec"]["selector"]
        matched = [w for w in templates if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, f"Service {name} selects {len(matched)} workloads"
        ports = {p["name"]: p["containerPort"] for c in _pod_spec(matched[0])["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), f"Service {name}: no container port {target}"
    for name, budget in _objects(manifests, "PodDisruptionBudget").items():
        selector = budget["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= w["spec"]["template"]["metadata"]["labels"].items() for w in templates), name
    # The StatefulSet's governing Service exists.
    for name, stateful in _objects(manifests, "StatefulSet").items():
        assert stateful["spec"]["serviceName"] in services, name


def test_env_names_are_real_settings(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    fields = Settings.model_fields
    names = set(_settings_data(manifests)) | {k for k in _secret_example() if k.startswith("PROMPTINTERN_")}
    for kind in WORKLOADS:
        for workload in _objects(manifests, kind).values():
            for container in _containers(_pod_spec(workload)):
                names |= {n for n in _env(container) if n.startswith("PROMPTINTERN_")}
    assert names
    unknown = sorted(n for n in names if n.removeprefix("PROMPTINTERN_").lower() not in fields)
    assert unknown == [], "not settings of core/config.py"


def test_settings_parse(manifests: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConfigMap and the example Secret, as the pods get them, are settings the gateway accepts."""
    for key in [k for k in os.environ if k.startswith("PROMPTINTERN_")]:
        monkeypatch.delenv(key)
    for key, value in {**_settings_data(manifests), **_secret_example()}.items():
        if key == "PROMPTINTERN_ADMIN_KEY":
            value = "x" * 32  # left empty in the example: the gateway refuses to start without a real one
        if key.startswith("PROMPTINTERN_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.engine == "vllm" and settings.host == "0.0.0.0"
    assert make_url(settings.resolved_database_url).drivername == "postgresql+psycopg"


def test_config_and_secret_references_exist(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    config_maps = _objects(manifests, "ConfigMap")
    secret_keys = set(_secret_example())
    for kind in WORKLOADS:
        for name, workload in _objects(manifests, kind).items():
            for container in _containers(_pod_spec(workload)):
                for source in container.get("envFrom", []):
                    assert source["configMapRef"]["name"] in config_maps, name
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {})
                    if "secretKeyRef" in ref:
                        assert ref["secretKeyRef"]["name"] == SECRET_NAME, name
                        assert ref["secretKeyRef"]["key"] in secret_keys, f"{name}: {ref}"
                    if "configMapKeyRef" in ref:
                        config = config_maps[ref["configMapKeyRef"]["name"]]
                        assert ref["configMapKeyRef"]["key"] in config["data"], f"{name}: {ref}"


def test_volumes_and_claims_exist(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    claims = _objects(manifests, "PersistentVolumeClaim")
    for kind in WORKLOADS:
        for name, workload in _objects(manifests, kind).items():
            pod = _pod_spec(workload)
            volumes = {v["name"] for v in pod.get("volumes", [])}
            templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
            for volume in pod.get("volumes", []):
                claim = _claim(volume)
                assert claim is None or claim in claims, f"{name}: no PersistentVolumeClaim {claim}"
            for container in _containers(pod):
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes | templates, f"{name}/{container['name']}: {mount['name']}"
    for name in ("promptintern-adapters", "promptintern-models"):
        assert claims[name]["spec"]["accessModes"] == ["ReadWriteMany"], f"{name}: pods on several nodes mount it"


def test_every_container_has_requests_and_a_memory_limit(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    for kind in WORKLOADS:
        for name, workload in _objects(manifests, kind).items():
            for container in _containers(_pod_spec(workload)):
                resources = container.get("resources", {})
                assert resources.get("requests", {}).keys() >= {"cpu", "memory"}, f"{name}/{container['name']}"
                assert "memory" in resources.get("limits", {}), f"{name}/{container['name']}"


# --- the gateway, the worker, vLLM and PostgreSQL ---------------------------------------------------


def _routes() -> set[str]:
    from gateway.app import create_app

    app = create_app(Settings(admin_key="x" * 32))
    return {str(getattr(route, "path", "")) for route in app.routes}


def test_gateway_probes_and_scrape_annotations_hit_real_routes(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    routes = _routes()
    settings = _settings_data(manifests)
    gateway = _one(manifests, "Deployment", "promptintern-gateway")
    container = _container(gateway, "gateway")
    assert container["command"] == ["promptintern", "serve"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(settings["PROMPTINTERN_PORT"])}
    assert settings["PROMPTINTERN_HOST"] == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes and get["port"] in ports, probe
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] in routes
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    # Streams and rolling updates: a replica leaves the Service before it stops.
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


def _cli_subcommands() -> set[str]:
    import argparse

    from gateway.cli import build_parser

    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_worker_runs_training_without_serving(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    worker = _one(manifests, "Deployment", "promptintern-worker")
    container = _container(worker, "worker")
    assert container["command"] == ["promptintern", "worker"]
    assert "worker" in _cli_subcommands()
    assert "ports" not in container
    assert not _objects(manifests, "Service").keys() & {"promptintern-worker"}


def test_replicas_and_worker_share_registry_and_adapter_store(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    settings = _settings_data(manifests)
    adapter_dir, model = settings["PROMPTINTERN_ADAPTER_DIR"], settings["PROMPTINTERN_BASE_MODEL"]
    gateway = _one(manifests, "Deployment", "promptintern-gateway")
    worker = _one(manifests, "Deployment", "promptintern-worker")
    vllm = _one(manifests, "Deployment", "vllm")
    assert gateway["spec"]["replicas"] >= 2
    pods = ((gateway, _container(gateway, "gateway")), (worker, _container(worker, "worker")),
            (vllm, _container(vllm, "vllm")))
    for workload, container in pods:
        mounts = _mounts(workload, container)
        name = workload["metadata"]["name"]
        assert _claim(mounts[adapter_dir][1]) == "promptintern-adapters", f"{name}: adapters at {adapter_dir}"
        model_mount = next(path for path in mounts if model.startswith(path + "/"))
        assert _claim(mounts[model_mount][1]) == "promptintern-models", name
    # The gateway and the worker: the same settings, the same registry URL and admin key from one Secret.
    for workload, container in pods[:2]:
        assert {"configMapRef": {"name": SETTINGS_NAME}} in container["envFrom"]
        url = _env(container)["PROMPTINTERN_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert url == {"name": SECRET_NAME, "key": "PROMPTINTERN_DATABASE_URL"}
        # Each pod's own data folder is scratch; what replicas share is in the registry and the store.
        data = _mounts(workload, container)[settings["PROMPTINTERN_DATA_DIR"]][1]
        assert "emptyDir" in data
    gateway_env = _env(_container(gateway, "gateway"))
    assert gateway_env["PROMPTINTERN_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": SECRET_NAME, "key": "PROMPTINTERN_ADMIN_KEY"}
    # Training is the worker's alone; the worker needs no admin key (it serves nothing).
    assert gateway_env["PROMPTINTERN_TRAIN_IN_GATEWAY"]["value"] == "false"
    assert Settings(train_in_gateway=gateway_env["PROMPTINTERN_TRAIN_IN_GATEWAY"]["value"]).train_in_gateway is False
    assert "PROMPTINTERN_ADMIN_KEY" not in _env(_container(worker, "worker"))


def test_base_model_is_written_once_where_the_pods_wait_for_it(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    settings = _settings_data(manifests)
    job = _one(manifests, "Job", "promptintern-base-model")
    container = _container(job, "base-model")
    assert container["command"] == ["promptintern", "model"] and "model" in _cli_subcommands()
    data_dir = _env(container)["PROMPTINTERN_DATA_DIR"]["value"]
    assert f"{data_dir}/{basemodel.MATERIALISED_DIR}" == settings["PROMPTINTERN_BASE_MODEL"]
    assert _claim(_mounts(job, container)[data_dir][1]) == "promptintern-models"
    marker = f"{settings['PROMPTINTERN_BASE_MODEL']}/{basemodel.MARKER}"
    for name in ("promptintern-gateway", "promptintern-worker", "vllm"):
        [wait] = _pod_spec(_one(manifests, "Deployment", name))["initContainers"]
        assert marker in " ".join(wait["command"]), name


def test_vllm_serves_what_the_gateway_expects(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    settings = _settings_data(manifests)
    vllm = _one(manifests, "Deployment", "vllm")
    container = _container(vllm, "vllm")
    args = [str(a) for a in container["args"]]
    assert container["command"] == ["vllm", "serve"]
    assert args[0] == settings["PROMPTINTERN_BASE_MODEL"]
    assert args[args.index("--served-model-name") + 1] == settings["PROMPTINTERN_SERVED_MODEL_NAME"]
    assert args[args.index("--max-lora-rank") + 1] == settings["PROMPTINTERN_MAX_LORA_RANK"]
    assert args[args.index("--max-model-len") + 1] == settings["PROMPTINTERN_MAX_MODEL_LEN"]
    modules = args[args.index("--lora-target-modules") + 1:]
    assert ",".join(modules[:modules.index("--max-model-len")]) == settings["PROMPTINTERN_VLLM_LORA_TARGET_MODULES"]
    assert "--enable-lora" in args
    assert _env(container)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    port = int(args[args.index("--port") + 1])
    assert {p["containerPort"] for p in container["ports"]} == {port}
    service = _one(manifests, "Service", "vllm")
    assert settings["PROMPTINTERN_VLLM_URL"] == f"http://vllm:{service['spec']['ports'][0]['port']}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert vllm["spec"]["replicas"] == 1  # runtime LoRA loads reach one pod through the Service


def test_bundled_postgres_matches_the_database_url(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    stateful = _one(manifests, "StatefulSet", "postgres")
    container = _container(stateful, "postgres")
    env = _env(container)
    url = make_url(_secret_example()["PROMPTINTERN_DATABASE_URL"])
    assert url.drivername == "postgresql+psycopg"  # psycopg 3
    service = _one(manifests, "Service", "postgres")
    assert url.host == service["metadata"]["name"] and url.port == service["spec"]["ports"][0]["port"] == 5432
    assert url.username == env["POSTGRES_USER"]["value"] and url.database == env["POSTGRES_DB"]["value"]
    assert url.password == _secret_example()["POSTGRES_PASSWORD"]
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": "POSTGRES_PASSWORD"}
    [template] = stateful["spec"]["volumeClaimTemplates"]
    data = next(m for m in container["volumeMounts"] if m["name"] == template["metadata"]["name"])
    assert env["PGDATA"]["value"].startswith(data["mountPath"] + "/")
    assert "pg_isready" in container["readinessProbe"]["exec"]["command"]


def test_images_are_pinned_and_those_of_compose(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    expected = {
        "promptintern-gateway": compose["gateway"]["image"],
        "vllm": compose["vllm"]["image"],
        "postgres": compose["postgres"]["image"],
    }
    images = {c["image"] for kind in WORKLOADS for w in _objects(manifests, kind).values()
              for c in _containers(_pod_spec(w))}
    assert images == set(expected.values())
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    [override] = kustomization["images"]
    assert f"{override['newName']}:{override['newTag']}" == expected["promptintern-gateway"]
    assert override["name"] == expected["promptintern-gateway"].split(":")[0]


# --- Prometheus -----------------------------------------------------------------------------------


def _scrape_config(manifests: list[tuple[str, dict[str, Any]]]) -> str:
    text: str = _one(manifests, "ConfigMap", "promptintern-prometheus-scrape")["data"]["prometheus.yml"]
    return text


def test_scrape_jobs_are_those_of_compose(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    """Same job names as deploy/prometheus/prometheus.yml, so the rules and the dashboard work unchanged."""
    jobs = {job["job_name"]: job for job in yaml.safe_load(_scrape_config(manifests))["scrape_configs"]}
    compose_jobs = {job["job_name"] for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    assert {"promptintern-gateway", "vllm"} <= set(jobs) <= compose_jobs
    for job_name, deployment in (("promptintern-gateway", "promptintern-gateway"), ("vllm", "vllm")):
        template = _one(manifests, "Deployment", deployment)["spec"]["template"]["metadata"]
        [sd] = jobs[job_name]["kubernetes_sd_configs"]
        [selector] = sd["selectors"]
        wanted = dict(item.split("=") for item in selector["label"].split(","))
        assert wanted.items() <= template["labels"].items(), job_name
        assert template["annotations"]["prometheus.io/scrape"] == "true"


def _relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus's relabelling (keep and replace, the actions used here) of one target; None if dropped."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(name, "") for name in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if match is None:
                return None
        elif action == "replace":
            if match is not None:
                replacement = re.sub(r"\$(\d+)", r"\\\1", rule.get("replacement", "$1"))
                labels[rule["target_label"]] = match.expand(replacement)
        else:
            raise AssertionError(f"relabel action {action} is not simulated here")
    return labels


def test_relabelling_scrapes_each_running_pod_at_its_port(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    """What Kubernetes pod discovery hands Prometheus for a gateway pod, through the job's relabelling."""
    jobs = {job["job_name"]: job for job in yaml.safe_load(_scrape_config(manifests))["scrape_configs"]}
    template = _one(manifests, "Deployment", "promptintern-gateway")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    port = _container_port(template["spec"]["containers"][0])
    pod = {
        "__address__": f"10.1.2.3:{port}",
        "__metrics_path__": "/metrics",
        "__meta_kubernetes_namespace": "promptintern",
        "__meta_kubernetes_pod_name": "promptintern-gateway-7d9f-abcde",
        "__meta_kubernetes_pod_phase": "Running",
        **{f"__meta_kubernetes_pod_annotation_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v for k, v in annotations.items()},
    }
    rules = jobs["promptintern-gateway"]["relabel_configs"]
    target = _relabel(rules, pod)
    assert target is not None
    assert target["__address__"] == f"10.1.2.3:{annotations['prometheus.io/port']}"
    assert target["__metrics_path__"] == annotations["prometheus.io/path"]
    assert target["pod"] == pod["__meta_kubernetes_pod_name"] and target["namespace"] == "promptintern"
    # A pod discovered without a declared port gets the annotated one.
    assert _relabel(rules, {**pod, "__address__": "10.1.2.3"})["__address__"] == f"10.1.2.3:{port}"  # type: ignore[index]
    assert _relabel(rules, {**pod, "__meta_kubernetes_pod_phase": "Pending"}) is None
    assert _relabel(rules, {**pod, "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "false"}) is None


def _container_port(container: dict[str, Any]) -> int:
    [port] = container["ports"]
    return int(port["containerPort"])


def test_promtool_accepts_the_scrape_config(manifests: list[tuple[str, dict[str, Any]]], tmp_path: Path) -> None:
    """All of it but the pod discovery itself, which Debian's Prometheus is built without: that part is
    replaced by a static target, so promtool still checks the relabelling (fields, regular expressions)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool missing under CI=true (`make prometheus`)")
        pytest.skip("promtool missing: apt-get install -y --no-install-recommends prometheus")
    config = yaml.safe_load(_scrape_config(manifests))
    for job in config["scrape_configs"]:
        assert [sd["role"] for sd in job.pop("kubernetes_sd_configs")] == ["pod"]
        job["static_configs"] = [{"targets": ["10.1.2.3:8000"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_merged_engine_serves_the_version_its_init_container_merges(
        manifests: list[tuple[str, dict[str, Any]]]) -> None:
    settings = _settings_data(manifests)
    workload = _one(manifests, "Deployment", "vllm-merged")
    [merge] = _pod_spec(workload)["initContainers"]
    vllm = _container(workload, "vllm")
    assert merge["command"] == ["python", "-m", "trainer.merge"]
    merge_args = dict(zip(merge["args"][::2], merge["args"][1::2], strict=True))
    assert merge_args["--base"] == settings["PROMPTINTERN_BASE_MODEL"]
    assert merge_args["--adapter"] == settings["PROMPTINTERN_ADAPTER_DIR"] + "/$(MERGED_PROMPT)/v$(MERGED_VERSION)"
    assert {k: v["value"] for k, v in _env(merge).items()} == {
        k: v["value"] for k, v in _env(vllm).items() if k.startswith("MERGED_")}
    args = [str(a) for a in vllm["args"]]
    assert args[0] == merge_args["--out"]
    assert args[args.index("--served-model-name") + 1] == "$(MERGED_PROMPT)@v$(MERGED_VERSION)"
    assert "--enable-lora" not in args
    assert _mounts(workload, merge)["/merged"][0] == _mounts(workload, vllm)["/merged"][0]
    service = _one(manifests, "Service", "vllm-merged")
    assert service["spec"]["ports"][0]["port"] == int(args[args.index("--port") + 1])
