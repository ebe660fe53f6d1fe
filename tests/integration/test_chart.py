"""The Helm chart renders configurations that wsproxy accepts, and pods that can drain.

Renders ``charts/wsproxy`` with its default values and with every ``ci/*.yaml``, and
the example chart that includes the ``wsproxy.sidecar`` template
(``charts/examples/api-manager``); takes ``config.yaml`` out of each ConfigMap and runs
``wsproxy check`` on it. Also checks what ties the rendering to the config: the ports,
the Service target, the probes, the termination grace period against the drain, and
that ``values.schema.json`` rejects unknown keys and wrong types.

Needs ``helm``: ``.ci/.tools/helm`` (``bash .ci/chart-checks.sh`` installs it there,
and ``.ci/run`` calls that script before the tests) or ``helm`` on PATH. Without it
these tests are skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from wsproxy.config import parse_duration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "wsproxy"
EXAMPLE = ROOT / "charts" / "examples" / "api-manager"
CONFIG_DIR = "/etc/wsproxy/"  # where the chart mounts config.yaml and tls/


def _find_helm() -> str | None:
    local = ROOT / ".ci" / ".tools" / "helm"
    if local.is_file():
        return str(local)
    return shutil.which("helm")


HELM = _find_helm()
pytestmark = pytest.mark.skipif(
    HELM is None,
    reason="helm not found at .ci/.tools/helm or on PATH (run: bash .ci/chart-checks.sh)",
)


@dataclass(frozen=True)
class Case:
    name: str
    chart: Path
    args: tuple[str, ...] = ()


CASES = [
    Case("default", CHART),
    *(Case(f"ci/{f.name}", CHART, ("-f", str(f))) for f in sorted(CHART.glob("ci/*.yaml"))),
    Case("example api-manager", EXAMPLE),
]


def helm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run(
        [HELM, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def render(case: Case, tmp_path: Path, *extra: str) -> list[dict[str, Any]]:
    chart = case.chart
    if chart == EXAMPLE:
        # The example depends on charts/wsproxy (file://); give a scratch copy the
        # dependency in charts/ rather than writing into the repository.
        chart = tmp_path / "example"
        shutil.copytree(EXAMPLE, chart)
        shutil.copytree(CHART, chart / "charts" / "wsproxy")
    res = helm(
        "template",
        "rel",
        str(chart),
        "--api-versions",
        "monitoring.coreos.com/v1",
        *case.args,
        *extra,
    )
    assert res.returncode == 0, f"helm template failed:\n{res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def wsproxy_check(config_text: str, tmp_path: Path, certs: Any) -> dict[str, Any]:
    """``wsproxy check`` on a rendered config.yaml; returns the effective config.

    The files the chart mounts under /etc/wsproxy (tls/tls.crt, tls/tls.key from the
    Secret) are stand-ins under tmp_path: check insists that they are readable.
    """
    root = tmp_path / "mount"
    (root / "tls").mkdir(parents=True, exist_ok=True)
    shutil.copy(certs.cert_file, root / "tls" / "tls.crt")
    shutil.copy(certs.key_file, root / "tls" / "tls.key")
    path = root / "config.yaml"
    path.write_text(config_text.replace(CONFIG_DIR, f"{root}/"), encoding="utf-8")
    # What the pod gets from its Secrets (amqp.urlSecret, extraEnv): check reads them
    # as run does, so stand-ins are in the environment.
    env = {
        **os.environ,
        "RABBITMQ_ADDRESS": "amqp://user:secret@rabbitmq.example:5672/",
        "JWT_KEY": "k" * 32,
    }
    res = subprocess.run(
        [sys.executable, "-m", "wsproxy", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert res.returncode == 0, f"wsproxy check rejected the rendered config:\n{res.stderr}"
    effective: dict[str, Any] = yaml.safe_load(res.stdout)
    return effective


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> Iterator[Case]:
    yield request.param


def test_rendered_config_passes_wsproxy_check(case: Case, tmp_path: Path, certs: Any) -> None:
    docs = render(case, tmp_path)
    configmaps = [cm for cm in of_kind(docs, "ConfigMap") if "config.yaml" in cm["data"]]
    assert len(configmaps) == 1, "expected exactly one ConfigMap with config.yaml"
    effective = wsproxy_check(configmaps[0]["data"]["config.yaml"], tmp_path, certs)
    assert effective["admin"]["enabled"] is True
    assert effective["admin"]["listen"].startswith("0.0.0.0:")
    assert effective["listen"].startswith("0.0.0.0:")

    for deploy in of_kind(docs, "Deployment"):
        pod = deploy["spec"]["template"]
        spec = pod["spec"]
        (proxy,) = [c for c in spec["containers"] if c["name"] == "wsproxy"]
        ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
        assert f"0.0.0.0:{ports['wsproxy']}" == effective["listen"]
        assert f"0.0.0.0:{ports['wsproxy-admin']}" == effective["admin"]["listen"]
        assert proxy["args"] == ["run", "--config", "/etc/wsproxy/config.yaml"]
        assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
        assert proxy["securityContext"]["runAsNonRoot"] is True
        assert any(k.startswith("checksum/") for k in pod["metadata"]["annotations"])

        # Kubernetes must not kill wsproxy in the middle of its drain.
        shutdown = effective["shutdown"]
        prestop = proxy.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        drain = (
            prestop
            + parse_duration(shutdown["drain_delay"])
            + parse_duration(shutdown["grace_period"])
        )
        assert spec["terminationGracePeriodSeconds"] > drain
        # The application beside it stays up until wsproxy has drained.
        for app in spec["containers"]:
            if app is not proxy:
                assert app["lifecycle"]["preStop"]["sleep"]["seconds"] >= drain - prestop

        # Clients reach wsproxy, never the application directly.
        for svc in of_kind(docs, "Service"):
            target_ports = {p["targetPort"] for p in svc["spec"]["ports"]}
            assert target_ports <= {"wsproxy", "wsproxy-admin"}, svc["metadata"]["name"]


def test_tls_secret_is_mounted_where_config_points(tmp_path: Path) -> None:
    docs = render(Case("tls", CHART, ("-f", str(CHART / "ci" / "tls.yaml"))), tmp_path)
    (cm,) = of_kind(docs, "ConfigMap")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config["tls"] == {
        "cert_file": "/etc/wsproxy/tls/tls.crt",
        "key_file": "/etc/wsproxy/tls/tls.key",
    }
    (deploy,) = of_kind(docs, "Deployment")
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    sources = volumes["wsproxy-config"]["projected"]["sources"]
    (secret,) = [s["secret"] for s in sources if "secret" in s]
    assert {i["path"] for i in secret["items"]} == {"tls/tls.crt", "tls/tls.key"}


def test_config_change_changes_checksum(tmp_path: Path) -> None:
    case = Case("standalone", CHART, ("-f", str(CHART / "ci" / "standalone.yaml")))

    def checksum(*extra: str) -> str:
        (deploy,) = of_kind(render(case, tmp_path / str(len(extra)), *extra), "Deployment")
        value: str = deploy["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    assert checksum() != checksum("--set", "config.keepalive.ping_interval=15s")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicas": 3}, "replicas"),  # unknown top-level key (it is replicaCount)
        ({"replicaCount": "three"}, "replicaCount"),
        ({"config": {"keepalive": {"ping_intervall": "20s"}}}, "ping_intervall"),
        ({"config": {"listen": "0.0.0.0:1"}}, "listen"),  # set from containerPorts
        ({"containerPorts": {"proxy": "8080"}}, "proxy"),
        ({"mode": "daemonset"}, "mode"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], message: str, tmp_path: Path) -> None:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values), encoding="utf-8")
    res = helm("template", "rel", str(CHART), "-f", str(f))
    assert res.returncode != 0
    assert "schema" in res.stderr
    assert message in res.stderr


def test_grace_period_shorter_than_drain_is_refused(tmp_path: Path) -> None:
    res = helm(
        "template",
        "rel",
        str(CHART),
        "--set",
        "mode=standalone,upstream.image.repository=app,terminationGracePeriodSeconds=20",
    )
    assert res.returncode != 0
    assert "terminationGracePeriodSeconds (20) must be larger" in res.stderr


def test_standalone_needs_an_upstream_image() -> None:
    res = helm("template", "rel", str(CHART), "--set", "mode=standalone")
    assert res.returncode != 0
    assert "upstream.image.repository is required" in res.stderr
