"""deploy/ and docker-compose.cluster.yml: the Kubernetes manifests validate against the Kubernetes OpenAPI schemas
(kubernetes-validate, which ships them: no network) and agree with the code they deploy: the settings' environment
names, the ports the processes listen on, the health service names, the drain periods; the Redis Cluster chart values
and the compose file's 6-node cluster, whose init command is run against 6 real redis-servers."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from rwkv_serve.v1 import api_pb2, worker_pb2
from service.settings import FrontSettings
from service.stack import redis_server_binary
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
REDIS_VALUES = ROOT / "deploy" / "redis" / "values-bitnami-redis-cluster.yaml"
COMPOSE_CLUSTER = ROOT / "docker-compose.cluster.yml"
OLDEST_K8S = "1.27.0"  # gRPC probes are GA from 1.27: the oldest version the manifests claim
FRONT_SERVICE = api_pb2.DESCRIPTOR.services_by_name["RwkvService"].full_name
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
POD_IP = "10.1.2.3"  # what the downward API's status.podIP stands for here
SECRET = "0123abcd"  # what a secretKeyRef stands for here (URL-safe, as the README asks of the real one)


# ---- the settings' environment names ----

def settings_env_names(cls: type[BaseSettings]) -> set[str]:
    """Every environment variable name a settings class reads: env_prefix + field name, or the field's validation
    alias(es) instead (pydantic-settings applies no prefix to those); upper case (the classes are case-insensitive)."""
    prefix = cls.model_config.get("env_prefix", "")
    names: set[str] = set()
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(prefix + field_name)
    return {name.upper() for name in names}


FRONT_NAMES = settings_env_names(FrontSettings)
WORKER_NAMES = settings_env_names(WorkerSettings)
COMPONENTS = {"front": ("RWKV_FRONT_", FrontSettings, FRONT_NAMES), "worker": ("RWKV_WORKER_", WorkerSettings,
                                                                              WORKER_NAMES)}


def test_settings_names_are_read_from_the_classes() -> None:
    # The set is built from the classes, not written down: these exist, the unprefixed alias too.
    assert {"RWKV_FRONT_REDIS_URL", "REDIS_URL", "RWKV_FRONT_API_KEY_PEPPER", "RWKV_FRONT_GRACE_S"} <= FRONT_NAMES
    assert {"RWKV_WORKER_REDIS_URL", "RWKV_WORKER_ADVERTISE_HOST", "RWKV_WORKER_DRAIN_S",
            "RWKV_WORKER_MODEL_PATH", "RWKV_WORKER_DEVICE"} <= WORKER_NAMES
    assert "RWKV_FRONT_NO_SUCH_SETTING" not in FRONT_NAMES and "RWKV_WORKER_REDIS_URL" not in FRONT_NAMES


def build_settings(cls: type[BaseSettings], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """cls() as the process would build it from exactly `env` (nothing from this test run's environment)."""
    import os

    prefix = cls.model_config.get("env_prefix", "")
    names = settings_env_names(cls)
    for name in list(os.environ):
        if name.upper().startswith(prefix) or name.upper() in names:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return cls()


# ---- Kubernetes manifests ----

def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in manifest_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((f"{path.name}#{i}", doc))
    return docs


DOCS = load_docs()


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == kind}


def deployment(component: str) -> dict[str, Any]:
    found = [d for d in objects("Deployment").values()
             if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"one {component} Deployment, found {len(found)}"
    return found[0]


def only_container(deploy: dict[str, Any]) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_entries(container: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, literal value or valueFrom dict) in the order the kubelet builds them: envFrom ConfigMaps, then env."""
    configmaps = objects("ConfigMap")
    entries: list[tuple[str, Any]] = []
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"envFrom only from ConfigMaps here: {source}"
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"envFrom names ConfigMap {name!r}, which deploy/kubernetes does not define"
        entries += list(configmaps[name].get("data", {}).items())
    for item in container.get("env", []):
        entries.append((item["name"], item["value"] if "value" in item else item["valueFrom"]))
    return entries


def resolved_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would build it: $(VAR) expanded from variables defined before
    it ($$ escapes), secrets and the pod IP replaced by the stand-ins above."""
    env: dict[str, str] = {}
    for name, value in env_entries(container):
        if isinstance(value, dict):
            if "secretKeyRef" in value:
                value = SECRET
            elif value.get("fieldRef", {}).get("fieldPath") == "status.podIP":
                value = POD_IP
            else:
                raise AssertionError(f"{name}: unexpected valueFrom {value}")
        else:
            def expand(m: re.Match[str]) -> str:
                if m.group(0) == "$$":
                    return "$"
                ref = m.group(1)
                assert ref in env, f"{name} refers to $({ref}), which is not defined before it (left unexpanded)"
                return env[ref]

            value = re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, str(value))
        env[name] = value
    return env


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]
    images = {image["name"] for image in kustomization["images"]}
    used = {only_container(d)["image"].split(":")[0] for d in objects("Deployment").values()}
    assert used == images, "every Deployment's image is one the kustomization renames, and no other"


@pytest.mark.parametrize("name,doc", DOCS, ids=[name for name, _ in DOCS])
def test_manifest_validates_against_the_kubernetes_schema(name: str, doc: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the validator tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for version in (OLDEST_K8S, latest_version()):
        kubernetes_validate.validate(doc, version, strict=True)  # strict: unknown fields are errors too
    assert "namespace" not in doc["metadata"], f"{name}: namespace-agnostic manifests name no namespace"


def test_the_validator_rejects_a_broken_manifest() -> None:
    import kubernetes_validate

    broken = yaml.safe_load(yaml.safe_dump(deployment("worker")))
    only_container(broken)["startupProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take a number only
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST_K8S, strict=True)
    only_container(broken)["startupProbe"]["grpc"]["port"] = 50052
    only_container(broken)["livenesProbe"] = only_container(broken).pop("livenessProbe")  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST_K8S, strict=True)


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_deployment_env_names_are_settings(component: str) -> None:
    prefix, _, names = COMPONENTS[component]
    for name, _ in env_entries(only_container(deployment(component))):
        if name.startswith("RWKV_"):
            assert name.startswith(prefix), f"{component} sets {name}: another process's setting"
            assert name in names, f"{component} sets {name}, which is no field of its settings class"
        else:  # a helper such as REDIS_PASSWORD: it must not be read as a setting (REDIS_URL would be)
            assert name not in names, f"{component}'s helper variable {name} is also a setting name"


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_deployment_selectors_and_budgets_match_the_pods(component: str) -> None:
    deploy = deployment(component)
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    budgets = [p for p in objects("PodDisruptionBudget").values()
               if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
    assert len(budgets) == 1, f"one PodDisruptionBudget covers the {component} pods"
    assert budgets[0]["spec"].get("maxUnavailable") == 1 or budgets[0]["spec"].get("minAvailable") is not None


def grpc_probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    probes = {kind: container.get(kind) for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert all(probes.values()), f"startup, readiness and liveness probes: {sorted(k for k, v in probes.items() if v)}"
    for kind, probe in probes.items():
        assert "grpc" in probe, f"{kind} is a gRPC health probe"
    return probes


def probe_window_s(probe: dict[str, Any]) -> int:
    """How long a probe may fail before the kubelet acts (Kubernetes' defaults where a field is unset)."""
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def test_worker_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    deploy = deployment("worker")
    pod = deploy["spec"]["template"]["spec"]
    container = only_container(deploy)
    env = resolved_env(container)
    settings = build_settings(WorkerSettings, env, monkeypatch)

    # One GPU, and the worker told to use it.
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources.get("requests", {}).get("nvidia.com/gpu", 1)) == 1
    assert settings.device.startswith("cuda")

    # It listens where the probes, the containerPort and the registry say.
    assert settings.host == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [settings.port] and settings.port == 50052
    probes = grpc_probes(container)
    assert {p["grpc"]["port"] for p in probes.values()} == {settings.port}
    assert probes["readinessProbe"]["grpc"].get("service") == WORKER_SERVICE
    advertise = [item for item in container["env"] if item["name"] == "RWKV_WORKER_ADVERTISE_HOST"]
    assert advertise and advertise[0]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert settings.advertise_host == POD_IP

    # No Service selects the workers: the fronts find them in the Redis registry.
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    for service in objects("Service").values():
        assert not service["spec"]["selector"].items() <= labels.items(), "workers need no Service"

    # The model: a file on a PVC mounted read-only.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = [m for m in container["volumeMounts"] if settings.model_path.is_relative_to(m["mountPath"])]
    assert len(mounts) == 1, f"RWKV_WORKER_MODEL_PATH {settings.model_path} lies on one mounted volume"
    assert mounts[0]["readOnly"] is True
    claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    assert claim["claimName"] in objects("PersistentVolumeClaim")

    # Shutdown: the grace period covers the drain, with the defaults and with what the manifests set.
    grace = pod["terminationGracePeriodSeconds"]
    defaults = WorkerSettings.model_fields
    assert grace >= defaults["drain_s"].default + defaults["grace_s"].default
    assert grace >= settings.drain_s + settings.grace_s
    assert "lifecycle" not in container, "SIGTERM drains the worker: no preStop hook"
    # A liveness probe failing during the drain (NOT_SERVING) must not get to kill the worker before it is done.
    assert probe_window_s(probes["livenessProbe"]) > grace
    # Startup: the port opens after the model load; a 23 GB checkpoint from network storage needs minutes.
    assert probe_window_s(probes["startupProbe"]) >= 20 * 60
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a surge pod would wait for a free GPU"


def test_front_deployment_and_service(monkeypatch: pytest.MonkeyPatch) -> None:
    deploy = deployment("front")
    pod = deploy["spec"]["template"]["spec"]
    container = only_container(deploy)
    settings = build_settings(FrontSettings, resolved_env(container), monkeypatch)
    assert deploy["spec"]["replicas"] == 2
    assert container["resources"]["requests"] and container["resources"]["limits"]

    assert settings.host == "0.0.0.0" and settings.port == 50051
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port}
    probes = grpc_probes(container)
    assert {p["grpc"]["port"] for p in probes.values()} == {settings.port}
    assert probes["readinessProbe"]["grpc"].get("service") == FRONT_SERVICE

    # Keys required; the pepper and the Redis password come from Secrets.
    assert settings.auth_mode == "keys"
    assert settings.api_key_pepper is not None and settings.api_key_pepper.get_secret_value() == SECRET
    env_from = dict(env_entries(container))
    assert "secretKeyRef" in env_from["RWKV_FRONT_API_KEY_PEPPER"]
    assert urlsplit(settings.redis_url).password == SECRET

    # The Service: ClusterIP 50051 onto the container's grpc port, selecting exactly the front pods.
    service = objects("Service")["rwkv-front"]  # (the gateway adds Services of its own: gateway-service.yaml)
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 50051 and ports[port["targetPort"]] == settings.port

    # Shutdown: preStop pause + the front's drain (grace_s) + server.stop's 0.5 s fit in the grace period.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= float(pre_stop[1]) + settings.grace_s + 0.5
    assert grace >= float(pre_stop[1]) + FrontSettings.model_fields["grace_s"].default + 0.5
    assert probe_window_s(probes["livenessProbe"]) > grace


def test_front_and_worker_share_one_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    front = build_settings(FrontSettings, resolved_env(only_container(deployment("front"))), monkeypatch)
    worker = build_settings(WorkerSettings, resolved_env(only_container(deployment("worker"))), monkeypatch)
    assert front.redis_url == worker.redis_url
    assert front.redis_prefix == worker.redis_prefix
    url = urlsplit(worker.redis_url)
    assert url.scheme in ("redis", "rediss") and url.password == SECRET and url.path in ("", "/0")

    # The Redis Cluster chart's values: the Service the URL names, the Secret the pods read, no eviction.
    values = yaml.safe_load(REDIS_VALUES.read_text())
    assert values["fullnameOverride"] == url.hostname
    assert values["cluster"]["nodes"] == 6 and values["cluster"]["replicas"] == 1
    assert values["persistence"]["enabled"] is True and values["redis"]["useAOFPersistence"] == "yes"
    assert values["usePassword"] is True
    for component in COMPONENTS:
        refs = [v["secretKeyRef"] for _, v in env_entries(only_container(deployment(component)))
                if isinstance(v, dict) and "secretKeyRef" in v and v["secretKeyRef"]["key"] == "redis-password"]
        assert refs == [{"name": values["existingSecret"], "key": values["existingSecretPasswordKey"]}]
    config = dict(line.split(None, 1) for line in values["redis"]["configmap"].splitlines() if line.strip())
    assert config["maxmemory-policy"] == "noeviction"


# ---- docker-compose.cluster.yml ----

def interpolate(value: Any) -> Any:
    """Compose's interpolation with every variable unset: ${VAR:-default} -> default, ${VAR} -> '', $$ -> $."""
    if isinstance(value, str):
        return re.sub(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}",
                      lambda m: "$" if m.group(0) == "$$" else (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def compose_services() -> dict[str, dict[str, Any]]:
    return interpolate(yaml.safe_load(COMPOSE_CLUSTER.read_text()))["services"]


def redis_nodes(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items()
            if s.get("image", "").startswith("redis:7") and "--cluster-enabled" in s.get("command", [])}


def node_address(service: dict[str, Any]) -> str:
    (network,) = service["networks"].values()
    return f"{network['ipv4_address']}:6379"


def init_command(services: dict[str, dict[str, Any]]) -> str:
    (init,) = [s for s in services.values() if "--cluster create" in " ".join(s.get("command", []))]
    assert init["entrypoint"] == ["sh", "-c"]
    (script,) = init["command"]
    return script


def test_compose_cluster_has_six_nodes_and_an_init() -> None:
    services = compose_services()
    nodes = redis_nodes(services)
    assert sorted(nodes) == [f"redis-{i}" for i in range(1, 7)]
    for node in nodes.values():
        args = node["command"]
        assert args[args.index("--cluster-enabled") + 1] == "yes"
        assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    addresses = [node_address(n) for n in nodes.values()]
    assert len(set(addresses)) == 6
    script = init_command(services)
    create = script[script.index("redis-cli --cluster create"):]
    assert re.search(r"--cluster-replicas 1\b", create) and "--cluster-yes" in create
    listed = re.findall(r"\d+\.\d+\.\d+\.\d+:\d+", create.split("--cluster-replicas")[0])
    assert sorted(listed) == sorted(addresses), "the init creates the cluster from exactly the 6 nodes"
    init_name = next(name for name, s in services.items() if s.get("command") == [script])
    assert {n: {"condition": "service_healthy"} for n in nodes} == services[init_name]["depends_on"]


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_compose_cluster_front_and_workers(component: str, monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose_services()
    service = services[component]
    prefix, cls, names = COMPONENTS[component]
    env = {k: str(v) for k, v in service["environment"].items()}
    for name in env:
        if name.startswith("RWKV_"):
            assert name.startswith(prefix) and name in names, f"compose {component}: {name} is no setting"
        else:
            assert name not in names
    settings = build_settings(cls, env, monkeypatch)
    url = urlsplit(settings.redis_url)
    assert url.hostname in redis_nodes(services) and url.port == 6379, "one cluster node's URL"
    init_name = next(n for n, s in services.items() if "--cluster create" in " ".join(s.get("command", [])))
    assert service["depends_on"][init_name] == {"condition": "service_completed_successfully"}
    command = " ".join(service["command"])
    port = int(re.search(r"--port\s+(\d+)", command).group(1))
    assert f"127.0.0.1:{port}" in " ".join(service["healthcheck"]["test"]), "the healthcheck asks the served port"
    if component == "worker":
        assert settings.device == "cpu"
        assert int(service["deploy"]["replicas"]) == 2
        assert "--advertise-host" in command
        stop_s = int(service["stop_grace_period"].rstrip("s"))
        assert stop_s >= settings.drain_s + settings.grace_s


def _free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def _redis_cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10).stdout


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli (apt-get install redis-tools)")
def test_compose_cluster_init_creates_the_cluster_once(tmp_path: Path) -> None:
    """The nodes' redis-server arguments and the init script, as written in the compose file, on 6 local
    redis-servers: addresses rewritten to loopback ports, nothing else changed."""
    services = compose_services()
    nodes = redis_nodes(services)
    ports = {name: _free_cluster_port() for name in sorted(nodes)}
    procs = []
    try:
        for name, node in sorted(nodes.items()):
            args = list(node["command"][1:])
            args[args.index("--port") + 1] = str(ports[name])
            workdir = tmp_path / name
            workdir.mkdir()
            procs.append(subprocess.Popen([redis_server_binary(), *args, "--bind", "127.0.0.1", "--dir", str(workdir)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 15
        while not all(_redis_cli(p, "ping").strip() == "PONG" for p in ports.values()):
            assert time.monotonic() < deadline, "the cluster nodes did not start"
            assert all(p.poll() is None for p in procs), "a redis-server refused the compose file's arguments"
            time.sleep(0.1)

        script = init_command(services)
        for name, node in nodes.items():
            script = script.replace(node_address(node), f"127.0.0.1:{ports[name]}")
        script = script.replace("-h redis-1", f"-h 127.0.0.1 -p {ports['redis-1']}")
        assert not re.search(r"redis-\d|:6379\b", script), f"a node name or address left in {script}"

        first = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=90)
        assert first.returncode == 0, first.stdout + first.stderr
        info = _redis_cli(ports["redis-1"], "cluster", "info")
        assert "cluster_state:ok" in info and "cluster_size:3" in info and "cluster_known_nodes:6" in info
        # The replicas' roles reach redis-1 by gossip, a moment after the slots do (cluster_state:ok).
        deadline = time.monotonic() + 15
        while True:
            roles = [line.split()[2].replace("myself,", "")
                     for line in _redis_cli(ports["redis-1"], "cluster", "nodes").splitlines()]
            if sorted(roles) == ["master"] * 3 + ["slave"] * 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert sorted(roles) == ["master"] * 3 + ["slave"] * 3, "3 masters, one replica each"

        again = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=90)
        assert again.returncode == 0 and "the cluster exists" in again.stdout, again.stdout + again.stderr
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
