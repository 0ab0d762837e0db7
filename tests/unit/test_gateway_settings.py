"""GatewaySettings from the environment, secret files, masking; the shipped gateway manifests
and compose service name real settings and endpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from churnsignal.app.settings import load_settings
from churnsignal.gateway.openapi import document

ROOT = Path(__file__).parents[2]


def test_secret_lists_from_env_and_files_are_masked(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("CHURNSIGNAL_GATEWAY__SEGMENT_WRITE_KEYS", '["wk_a", "wk_b"]')
    keys = tmp_path / "stripe"
    keys.write_text('["whsec_one", "whsec_two"]\n')
    monkeypatch.setenv("CHURNSIGNAL_GATEWAY__STRIPE_WEBHOOK_SECRETS_FILE", str(keys))
    settings = load_settings()
    g = settings.gateway
    assert [k.get_secret_value() for k in g.segment_write_keys] == ["wk_a", "wk_b"]
    assert [k.get_secret_value() for k in g.stripe_webhook_secrets] == ["whsec_one", "whsec_two"]
    assert (g.port, g.zendesk_signing_secrets, g.intercom_client_secrets) == (8000, [], [])
    shown = json.dumps(settings.masked())
    for secret in ("wk_a", "wk_b", "whsec_one", "whsec_two"):
        assert secret not in shown
    assert settings.masked()["gateway"]["port"] == 8000


def test_a_bad_list_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from churnsignal.errors import ConfigError

    monkeypatch.setenv("CHURNSIGNAL_GATEWAY__PORT", "99999")
    with pytest.raises(ConfigError, match="CHURNSIGNAL_GATEWAY__PORT"):
        load_settings()


def test_k8s_gateway_manifest_loads_and_probes_hit_the_gateway(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    worker_docs = {d["kind"]: d for d in yaml.safe_load_all(
        (ROOT / "deploy/k8s/churnsignal.yaml").read_text())}
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy/k8s/gateway.yaml").read_text())}
    assert set(docs) == {"Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                         "Service", "Ingress"}
    for name, value in worker_docs["ConfigMap"]["data"].items():  # the shared ConfigMap
        monkeypatch.setenv(name, value)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == ["gateway"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for var in container["env"]:
        if var["name"].endswith("_FILE"):
            assert str(Path(var["value"]).parent) in mounts
            stand_in = tmp_path / Path(var["value"]).name
            stand_in.write_text("pw" if "SASL" in var["name"] else '["s1", "s2"]')
            monkeypatch.setenv(var["name"], str(stand_in))
        else:
            monkeypatch.setenv(var["name"], var["value"])
    settings = load_settings()
    assert settings.gateway.host == "0.0.0.0"  # noqa: S104 - a pod's address
    assert len(settings.gateway.stripe_webhook_secrets) == 2
    assert settings.kafka.sasl_password is not None
    assert container["ports"][0]["containerPort"] == settings.gateway.port
    served = set(document()["paths"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in served
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in served
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    prefixes = [p["path"] for p in docs["Ingress"]["spec"]["rules"][0]["http"]["paths"]]
    assert all(any(route.startswith(p) for route in served) for p in prefixes)


def test_compose_gateway_service(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["gateway"]
    assert service["command"] == ["gateway"]
    for name, value in service["environment"].items():
        # compose's ${NAME:-default}: the default, as with nothing set
        monkeypatch.setenv(name, re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", str(value)))
    settings = load_settings()
    assert settings.gateway.port == 8000 and settings.gateway.segment_write_keys == []
    assert f"{settings.gateway.port}:{settings.gateway.port}" in service["ports"][0]
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
