"""The Kubernetes manifests name real settings, endpoints and files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from churnsignal.app.settings import load_settings

MANIFEST = Path(__file__).parents[2] / "deploy" / "k8s" / "churnsignal.yaml"


def test_manifest_settings_load_and_probes_hit_the_worker_endpoints(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    assert set(docs) == {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service"}
    for name, value in docs["ConfigMap"]["data"].items():
        monkeypatch.setenv(name, value)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for var in container["env"]:  # secret files: point them at stand-ins here
        assert var["name"].endswith("_FILE")
        assert var["value"].startswith(mounts["secrets"] + "/")
        stand_in = tmp_path / Path(var["value"]).name
        stand_in.write_text("https://u:p@clickhouse:8443/churn" if "DSN" in var["name"]
                            else "a-long-enough-api-token" if "TOKEN" in var["name"] else "pw")
        monkeypatch.setenv(var["name"], str(stand_in))
    settings = load_settings()  # every setting the manifest gives is valid
    assert settings.kafka.sasl_password is not None
    assert settings.api_token is not None and not settings.api_open
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == settings.web_port
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert mounts["state"] == "/var/lib/churnsignal"  # the image's CHURNSIGNAL_STATE_DIR
