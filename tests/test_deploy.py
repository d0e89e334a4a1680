"""The files in deploy/, checked the way the platforms would check them, without those platforms: the systemd
unit with `systemd-analyze verify` (and its exposure score), the Kubernetes manifests against the
Kubernetes API's JSON schemas (kubernetes-validate ships them, so this runs offline), and each config
file they carry against the agent's own flags. No container engine runs here: the Dockerfile's sources
are checked to exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from agent import config
from agent.cli import build_parser
from agent.observe.server import listen_address
from conftest import REPO

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "kong-metering-agent.service"
DAEMONSET = DEPLOY / "kubernetes" / "daemonset.yaml"
KUBERNETES_VERSION = "1.30.0"  # the oldest release still widely run; the manifests use nothing newer
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def accepted_by_the_agent(document: str, tmp_path: Path) -> dict:
    """The flags a config file sets, as the agent reads them (it exits 2 on a bad key or value)."""
    path = tmp_path / "agent.yaml"
    path.write_text(document)
    return vars(config.parse_args(build_parser(), ["--config", str(path)], {}))


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root for systemd-analyze: the system's own units, the agent's unit, and the agent at the path the
    unit runs (where `pip install` puts it on a host)."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    executable = unit_settings(UNIT.read_text())["ExecStart"][0].split()[0]
    installed = root / executable.lstrip("/")
    installed.parent.mkdir(parents=True)
    installed.write_text(f"#!{sys.executable}\nfrom agent.cli import main\nraise SystemExit(main())\n")
    installed.chmod(0o755)
    return root


def test_the_systemd_unit_verifies_clean_and_is_hardened(unit_root: Path) -> None:
    unit = unit_root / "etc/systemd/system" / UNIT.name
    verify = subprocess.run(["systemd-analyze", "verify", f"--root={unit_root}", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout == verify.stderr == "", verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={unit_root}", str(unit)],
                              capture_output=True, text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert exposure and float(exposure[1]) <= 3.0, security.stdout  # systemd calls up to 4.9 "OK"


def test_the_unit_grants_only_what_capture_needs_and_keeps_its_state(tmp_path: Path) -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["CapabilityBoundingSet"] == settings["AmbientCapabilities"] == ["CAP_NET_RAW CAP_SYS_NICE"]
    assert settings["NoNewPrivileges"] == ["yes"] and settings["ProtectSystem"] == ["strict"]
    assert settings["StateDirectory"] == ["kong-metering-agent"]
    assert settings["Environment"] == ["AGENT_DATA_DIR=/var/lib/kong-metering-agent"]
    assert settings["ExecStart"] == ["/usr/local/bin/agent --config /etc/kong-metering-agent/agent.yaml"]
    example = accepted_by_the_agent((DEPLOY / "systemd" / "agent.yaml").read_text(), tmp_path)
    assert example["iface"] and example["metrics_listen"] == ("127.0.0.1", 9464)


def manifests() -> list[dict]:
    return list(yaml.safe_load_all(DAEMONSET.read_text()))


def test_the_kubernetes_manifests_match_the_api_schema() -> None:
    for manifest in manifests():
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_would_catch_a_mistake() -> None:
    daemonset = next(m for m in manifests() if m["kind"] == "DaemonSet")
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")  # a typo kubectl would refuse
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)


def test_the_daemonset_runs_one_capturing_agent_per_node_probed_on_its_endpoints(tmp_path: Path) -> None:
    by_kind = {manifest["kind"]: manifest for manifest in manifests()}
    pod = by_kind["DaemonSet"]["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_RAW", "SYS_NICE"]}
    assert container["securityContext"]["privileged"] is False
    # the config file it mounts is one the agent accepts, and the probes and the scrape use its address
    settings = accepted_by_the_agent(by_kind["ConfigMap"]["data"]["agent.yaml"], tmp_path)
    host, port = settings["metrics_listen"]
    assert host == "0.0.0.0" and listen_address(f"{host}:{port}") == (host, port)
    assert container["ports"][0]["containerPort"] == port == int(pod["metadata"]["annotations"]["prometheus.io/port"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["state"] == settings["data_dir"].as_posix()
    assert container["args"] == ["--config", f"{mounts['config']}/agent.yaml"]
    environment = {variable["name"] for variable in container["env"]}
    assert environment == {config.env_name("source"), "METERING_API_TOKEN"}


def test_the_dockerfile_builds_from_files_that_exist() -> None:
    dockerfile = (DEPLOY / "container" / "Dockerfile").read_text()
    sources = [word for line in dockerfile.splitlines() if line.startswith("COPY ") and "--from" not in line
               for word in line.split()[1:-1]]
    assert sources and all((REPO / source).exists() for source in sources), sources
    build_requires = re.search(r'requires = \["(maturin[^"]*)"\]', (REPO / "pyproject.toml").read_text())
    assert build_requires and f'"{build_requires[1]}"' in dockerfile  # the maturin pyproject asks for
    assert 'ENTRYPOINT ["agent"]' in dockerfile
