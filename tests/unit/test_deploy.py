"""The deploy files name real settings, endpoints and files: the Kubernetes manifest, the image."""

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


DOCKERFILE = Path(__file__).parents[2] / "Dockerfile"


def _dockerfile() -> dict[str, str]:
    """The final stage's instructions (continuation lines joined), by name."""
    text = DOCKERFILE.read_text().split("\nFROM ")[-1].replace("\\\n", " ")
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, rest = line.strip().partition(" ")
            out[name] = f"{out.get(name, '')} {rest}".strip()
    return out


def test_the_image_serves_the_worker_and_the_gateway_and_checks_whichever_runs() -> None:
    from churnsignal.app.settings import Settings

    defaults = Settings()
    image = _dockerfile()
    assert set(image["EXPOSE"].split()) == {str(defaults.web_port), str(defaults.gateway.port)}
    env = dict(part.split("=", 1) for part in image["ENV"].split())
    assert env["CHURNSIGNAL_WEB_HOST"] == env["CHURNSIGNAL_GATEWAY__HOST"] == "0.0.0.0"  # noqa: S104
    assert '"-m", "churnsignal.tools.healthcheck"' in image["HEALTHCHECK"]
    assert image["ENTRYPOINT"] == '["churnsignal"]' and image["CMD"] == '["worker"]'


@pytest.mark.parametrize(("argv", "command", "port"), [
    (["/usr/local/bin/python", "/usr/local/bin/churnsignal", "worker"], "worker", 6066),
    (["/usr/local/bin/python", "/usr/local/bin/churnsignal", "gateway"], "gateway", 8000),
    (["python", "-m", "churnsignal", "notify"], "notify", 6066),
    (["/usr/local/bin/python", "/usr/local/bin/churnsignal", "migrate"], "migrate", None),
    (["/usr/local/bin/python", "/usr/local/bin/churnsignal", "--help"], None, None),
    (["/bin/sh", "-c", "sleep 1"], None, None),
])
def test_the_health_check_probes_the_port_of_the_command_running(
        argv: list[str], command: str | None, port: int | None) -> None:
    from churnsignal.tools.healthcheck import command_of, port_for

    assert command_of(argv) == command
    assert port_for(command, {}) == port
    if port is not None:  # the settings the compose file and manifests give are honoured
        assert port_for(command, {"CHURNSIGNAL_GATEWAY__PORT": "9001",
                                  "CHURNSIGNAL_WEB_PORT": "9002"}) == (
            9001 if command == "gateway" else 9002)


def test_the_health_check_answers_for_a_real_gateway_process(tmp_path: Path) -> None:
    """`python -m churnsignal.tools.healthcheck PID` as Docker runs it (PID 1 there): healthy
    while a real `churnsignal gateway` answers /healthz (Kafka unreachable: it serves
    anyway), unhealthy once it is stopped."""
    import os
    import subprocess
    import sys

    from churnsignal.app.embedded import PARENT_PID_ENV, free_port, wait_for_port
    from churnsignal.tools.demo import stop_process

    port = free_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
           "CHURNSIGNAL_KAFKA__CONNECT_TIMEOUT_S": "1", "CHURNSIGNAL_STATE_DIR": str(tmp_path),
           "CHURNSIGNAL_GATEWAY__HOST": "127.0.0.1", "CHURNSIGNAL_GATEWAY__PORT": str(port),
           PARENT_PID_ENV: str(os.getpid())}
    log = (tmp_path / "gateway.log").open("wb")
    gateway = subprocess.Popen([sys.executable, "-m", "churnsignal", "gateway"], env=env,
                               stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                               start_new_session=True)

    # A process whose arguments say `churnsignal gateway` but that serves nothing.
    mute = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "churnsignal",
                             "gateway"], stdin=subprocess.DEVNULL, start_new_session=True)

    def check(pid: int) -> int:
        return subprocess.run([sys.executable, "-m", "churnsignal.tools.healthcheck", str(pid)],
                              env=env, timeout=30).returncode

    try:
        assert wait_for_port(port, 60), (tmp_path / "gateway.log").read_text()[-2000:]
        assert check(gateway.pid) == 0
        assert stop_process(gateway) == 0
        assert check(mute.pid) == 1  # nothing answers on the gateway's port any more
    finally:
        stop_process(gateway)
        stop_process(mute)
        log.close()
