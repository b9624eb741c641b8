"""The gateway's deployment: its Kubernetes manifests (schema-validated with the others by tests/test_deploy.py)
agree with GatewaySettings and with the fronts they reach, and the compose files run it from the front's image."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import yaml

from gateway.settings import GatewaySettings
from service.settings import FrontSettings
from tests.test_deploy import (
    ROOT,
    SECRET,
    build_settings,
    deployment,
    env_entries,
    interpolate,
    objects,
    only_container,
    probe_window_s,
    resolved_env,
    settings_env_names,
)

GATEWAY_NAMES = settings_env_names(GatewaySettings)


def test_gateway_env_names_are_settings() -> None:
    for name, _ in env_entries(only_container(deployment("gateway"))):
        if name.startswith("RWKV_"):
            assert name.startswith("RWKV_GATEWAY_") and name in GATEWAY_NAMES, f"gateway sets {name}: no setting"
        else:
            assert name not in GATEWAY_NAMES, f"the helper variable {name} is also a setting name"


def test_gateway_deployment_and_services(monkeypatch: pytest.MonkeyPatch) -> None:
    deploy = deployment("gateway")
    container = only_container(deploy)
    settings = build_settings(GatewaySettings, resolved_env(container), monkeypatch)
    front = build_settings(FrontSettings, resolved_env(only_container(deployment("front"))), monkeypatch)

    # The front's image (no torch), the same tenants, the same Redis.
    assert container["image"].split(":")[0] == only_container(deployment("front"))["image"].split(":")[0]
    assert settings.auth_mode == front.auth_mode == "keys"
    assert settings.api_key_pepper.get_secret_value() == SECRET
    assert settings.redis_url == front.redis_url and settings.redis_prefix == front.redis_prefix
    assert urlsplit(settings.redis_url).password == SECRET

    # It listens where the containerPort, the probes and its Service say.
    assert settings.host == "0.0.0.0" and settings.port == 8000
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.port}
    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {p["httpGet"]["port"] for p in probes.values()} == {settings.port}
    assert {p["httpGet"]["path"] for p in probes.values()} == {"/health"}
    services = objects("Service")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    service = services["rwkv-gateway"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert ports[service["spec"]["ports"][0]["targetPort"]] == settings.port

    # The fronts: a headless Service over their pods, dialled with round_robin (calls spread over every front).
    host, _, port = settings.front_target.removeprefix("dns:///").partition(":")
    assert settings.front_target.startswith("dns:///") and settings.front_lb_policy == "round_robin"
    headless = services[host]
    assert headless["spec"]["clusterIP"] == "None" and int(port) == front.port
    front_labels = deployment("front")["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= front_labels.items()

    # Shutdown: preStop + uvicorn's graceful period fit in the grace period; liveness never trips during it.
    grace = deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert grace >= pause + settings.grace_s and grace >= pause + GatewaySettings.model_fields["grace_s"].default
    assert probe_window_s(probes["livenessProbe"]) > grace
    budgets = [p for p in objects("PodDisruptionBudget").values()
               if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
    assert len(budgets) == 1 and budgets[0]["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("compose", ["docker-compose.yml", "docker-compose.cluster.yml"])
def test_compose_runs_the_gateway_from_the_front_image(compose: str, monkeypatch: pytest.MonkeyPatch) -> None:
    services = interpolate(yaml.safe_load((ROOT / compose).read_text()))["services"]
    gateway, front = services["gateway"], services["front"]
    assert gateway["image"].split(":")[0] == front["image"].split(":")[0] == "rwkv-serve-front"
    env = {k: str(v) for k, v in gateway["environment"].items()}
    assert all(name in GATEWAY_NAMES for name in env), env
    settings = build_settings(GatewaySettings, env, monkeypatch)
    front_env = {k: str(v) for k, v in front["environment"].items()}
    assert settings.redis_url == front_env["RWKV_FRONT_REDIS_URL"]
    assert settings.auth_mode == front_env["RWKV_FRONT_AUTH_MODE"]
    command = gateway["command"]
    assert command[command.index("--front") + 1] == "front:" + front["command"][front["command"].index("--port") + 1]
    assert command[command.index("--port") + 1] == "8000" and "8000" in gateway["healthcheck"]["test"][-1]
    assert gateway["depends_on"]["front"] == {"condition": "service_healthy"}


def test_the_gateway_loads_no_torch_tokenizer_or_worker_code() -> None:
    """It runs in the front's image: the package and everything it imports stay torch-free (also lazily)."""
    from tests.test_layout import HEAVY, _imported_roots, _loaded_after

    loaded = _loaded_after(["gateway.server", "gateway.app"])
    assert {"gateway", "fastapi", "uvicorn", "rwkv_serve_client"} <= loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    for path, roots in _imported_roots(ROOT / "gateway").items():
        assert not roots & set(HEAVY), f"{path} imports {sorted(roots & set(HEAVY))}"
