#!/usr/bin/env python3
"""Checks of Parley's deployment artifacts, offline: the Helm chart (linted and
rendered by Helm's own Go SDK through helm-python-sdk), the rendered manifests
(Kubernetes API schemas through kubernetes-validate), the alert rules and the
dashboard queries (promtool), the dashboard's panels, and the generated CRD.

Prints one summary line per check and exits non-zero if any failed.

    python3 ci/artifacts/check.py [--kube-version 1.37.0]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "parley"
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "dashboards" / "parley.json"
CRD = CHART / "crds" / "parleyclusters.parley.io.yaml"
EXAMPLE = CHART / "examples" / "parleycluster.yaml"

RELEASE = "parley"
NAMESPACE = "parley"

# Value sets the chart is linted and rendered with.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "rbac.clusterWide=true": {"rbac": {"clusterWide": True, "secretNamespaces": ["team-a"]}},
    "monitoring off": {
        "serviceMonitor": {"enabled": False},
        "prometheusRule": {"enabled": False},
        "grafanaDashboard": {"enabled": False},
    },
}

# Custom resources of the Prometheus Operator: kubernetes-validate has no schema for
# them, so they are skipped by kind (their content is checked by other checks).
SKIPPED_KINDS = {"ServiceMonitor", "PrometheusRule"}


class CheckFailed(Exception):
    """A check found a problem; the message says what."""


def ensure(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# --- Helm ---------------------------------------------------------------------------


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Renders the chart as `helm install` would, offline; returns its objects."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            ensure("kubectl" in text and "get pc" in text, f"{template}: no `kubectl get pc`")
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            ensure(isinstance(doc, dict), f"{template}: a document is not a mapping")
            for key in ("apiVersion", "kind", "metadata"):
                ensure(key in doc, f"{template}: a document has no {key}")
            doc.setdefault("metadata", {})
            doc["__template"] = template
            objects.append(doc)
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"].get("name") == name]
    ensure(len(found) == 1, f"expected one {kind}{' ' + name if name else ''}, found {len(found)}")
    return found[0]


def check_helm_lint(kube_version: str) -> str:
    notes = []
    for label, values in VALUE_SETS.items():
        report = helm.lint(
            CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}"
        )
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        problems_text = "; ".join(f"{m['path']}: {m['error']}" for m in problems)
        ensure(not report.get("errors") and not problems,
               f"[{label}] {report.get('errors') or ''} {problems_text}".strip())
        notes += [f"{m['path']}: {m['error']}" for m in report.get("messages", [])]
    infos = sorted(set(notes))
    return f"{len(VALUE_SETS)} value sets clean (strict)" + (
        f"; info: {'; '.join(infos)}" if infos else ""
    )


def rules_of(role: dict[str, Any]) -> list[tuple[str, str, set[str]]]:
    """(apiGroup, resource, verbs) for each group and resource a Role grants."""
    out = []
    for rule in role.get("rules") or []:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                out.append((group, resource, set(rule.get("verbs", []))))
    return out


def check_least_privilege(objects: list[dict[str, Any]], label: str) -> None:
    for role in by_kind(objects, "Role") + by_kind(objects, "ClusterRole"):
        where = f"[{label}] {role['kind']} {role['metadata']['name']}"
        for group, resource, verbs in rules_of(role):
            ensure("*" not in verbs and resource != "*" and group != "*", f"{where}: wildcard rule")
            ensure(not resource.startswith("pods/"), f"{where}: grants {resource}")
            if resource == "secrets":
                ensure(role["kind"] == "Role", f"{where}: Secrets granted cluster-wide")
                ensure(verbs == {"get"}, f"{where}: Secrets verbs {sorted(verbs)}, only get allowed")
            if role["kind"] == "ClusterRole" and resource in ("nodes", "persistentvolumes"):
                ensure(verbs <= {"get", "list", "watch"}, f"{where}: {resource} not read-only")


def grants(objects: list[dict[str, Any]], kind: str, resource: str) -> set[str]:
    verbs: set[str] = set()
    for role in by_kind(objects, kind):
        for _, res, v in rules_of(role):
            if res == resource:
                verbs |= v
    return verbs


def check_defaults(objects: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in objects)
    for kind, count in [("ServiceAccount", 1), ("Role", 1), ("RoleBinding", 1), ("ClusterRole", 1),
                        ("ClusterRoleBinding", 1), ("Deployment", 1), ("Service", 1),
                        ("ServiceMonitor", 2), ("PrometheusRule", 1), ("ConfigMap", 1)]:
        ensure(kinds.count(kind) == count, f"[defaults] {count} {kind} expected, got {kinds.count(kind)}")
    # Namespaced mode: what it manages comes from the Role, the ClusterRole only reads.
    ensure("watch" in grants(objects, "Role", "parleyclusters"), "[defaults] Role lacks parleyclusters")
    ensure(not grants(objects, "ClusterRole", "statefulsets"), "[defaults] ClusterRole grants statefulsets")
    ensure(grants(objects, "ClusterRole", "nodes") == {"get", "list", "watch"}, "[defaults] nodes not readable")
    ensure(grants(objects, "Role", "leases") >= {"get", "create", "update"}, "[defaults] no Lease rights")

    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    ensure(spec["replicas"] == 2, "[defaults] the operator Deployment should have 2 replicas")
    pod = spec["template"]["spec"]
    ensure(pod["securityContext"].get("runAsNonRoot") is True, "[defaults] pod not runAsNonRoot")
    (container,) = pod["containers"]
    ensure(container["args"] == ["run", "--metrics-addr", "0.0.0.0:8080"], f"[defaults] args {container['args']}")
    with helm.Chart.load(CHART) as chart:
        image = f"{chart.values['operator']['image']['repository']}:{chart.metadata['appVersion']}"
    ensure(container["image"] == image, f"[defaults] image {container['image']}, expected {image}")
    env = {e["name"]: e for e in container["env"]}
    ensure(env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "[defaults] POD_NAME")
    ensure(env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", "[defaults] POD_NAMESPACE")
    ensure(env["WATCH_NAMESPACE"].get("value") == NAMESPACE, "[defaults] WATCH_NAMESPACE is not the release namespace")
    ensure(container["ports"] == [{"name": "http-metrics", "containerPort": 8080, "protocol": "TCP"}],
           f"[defaults] ports {container['ports']}")
    ensure(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "[defaults] liveness path")
    ensure(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "[defaults] readiness path")
    security = container["securityContext"]
    ensure(security.get("readOnlyRootFilesystem") is True and security.get("capabilities", {}).get("drop") == ["ALL"]
           and security.get("allowPrivilegeEscalation") is False, "[defaults] container securityContext")
    ensure(container.get("resources", {}).get("requests"), "[defaults] no resource requests")

    monitors = {m["metadata"]["name"]: m for m in by_kind(objects, "ServiceMonitor")}
    node_monitor = next((m for m in monitors.values()
                         if m["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == "node"), None)
    ensure(node_monitor is not None, "[defaults] no ServiceMonitor selects component=node")
    ensure(node_monitor["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name") == "parley",
           "[defaults] node ServiceMonitor does not select app.kubernetes.io/name=parley")
    endpoint = node_monitor["spec"]["endpoints"][0]
    ensure(endpoint["port"] == "http-admin" and endpoint["path"] == "/metrics", "[defaults] node scrape endpoint")

    rule = one(objects, "PrometheusRule")
    ensure(rule["spec"] == yaml.safe_load(ALERTS.read_text()),
           "[defaults] the PrometheusRule's spec differs from files/alerts.yaml")
    dashboard = one(objects, "ConfigMap")
    ensure(dashboard["metadata"]["labels"].get("grafana_dashboard") == "1", "[defaults] dashboard label")
    ensure(json.loads(dashboard["data"]["parley.json"]) == json.loads(DASHBOARD.read_text()),
           "[defaults] the dashboard ConfigMap differs from files/dashboards/parley.json")


def check_cluster_wide(objects: list[dict[str, Any]]) -> None:
    label = "rbac.clusterWide=true"
    ensure(grants(objects, "ClusterRole", "parleyclusters") >= {"get", "list", "watch", "patch"},
           f"[{label}] ClusterRole lacks parleyclusters")
    ensure(grants(objects, "ClusterRole", "statefulsets"), f"[{label}] ClusterRole lacks statefulsets")
    ensure(not grants(objects, "Role", "statefulsets"), f"[{label}] Role still grants statefulsets")
    ensure(grants(objects, "Role", "leases"), f"[{label}] Lease rights should stay namespaced")
    secret_roles = [r["metadata"]["namespace"] for r in by_kind(objects, "Role") if grants([r], "Role", "secrets")]
    ensure(sorted(secret_roles) == sorted([NAMESPACE, "team-a"]),
           f"[{label}] Secrets readable in {secret_roles}, expected the release namespace and team-a")
    env = {e["name"]: e for e in one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    ensure(env["WATCH_NAMESPACE"].get("value") == "", f"[{label}] WATCH_NAMESPACE should be empty")
    node_monitor = [m for m in by_kind(objects, "ServiceMonitor") if m["metadata"]["name"].endswith("-nodes")]
    ensure(node_monitor and node_monitor[0]["spec"].get("namespaceSelector") == {"any": True},
           f"[{label}] the node ServiceMonitor should select every namespace")


def check_monitoring_off(objects: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in objects}
    ensure(not kinds & {"ServiceMonitor", "PrometheusRule", "ConfigMap"},
           f"[monitoring off] still renders {sorted(kinds & {'ServiceMonitor', 'PrometheusRule', 'ConfigMap'})}")


RENDERED: dict[str, list[dict[str, Any]]] = {}


def check_helm_render(kube_version: str) -> str:
    for label, values in VALUE_SETS.items():
        try:
            RENDERED[label] = render(values)
        except helm.HelmError as e:
            raise CheckFailed(f"[{label}] {type(e).__name__}: {e}") from e
        check_least_privilege(RENDERED[label], label)
    # values.schema.json is in force: a misspelt value is refused, not ignored.
    try:
        render({"rbac": {"clusterwide": True}})
        raise CheckFailed("a misspelt value (rbac.clusterwide) was accepted: values.schema.json not in force")
    except helm.HelmError:
        pass
    check_defaults(RENDERED["defaults"])
    check_cluster_wide(RENDERED["rbac.clusterWide=true"])
    check_monitoring_off(RENDERED["monitoring off"])
    counts = ", ".join(f"{label}: {len(objs)} objects" for label, objs in RENDERED.items())
    return f"Helm SDK {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}); {counts}"


def check_manifests(kube_version: str) -> str:
    ensure(bool(RENDERED), "nothing rendered (the render check failed)")
    validated, skipped, failures = 0, set(), []
    for label, objects in RENDERED.items():
        for obj in objects:
            obj = {k: v for k, v in obj.items() if k != "__template"}
            what = f"[{label}] {obj['kind']} {obj['metadata'].get('name')}"
            if obj["kind"] in SKIPPED_KINDS:
                skipped.add(f"{obj['kind']} {obj['metadata'].get('name')}")
                continue
            try:
                kubernetes_validate.validate(obj, kube_version, strict=True)
                validated += 1
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                failures.append(f"{what}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                failures.append(f"{what}: {e.message}")
    for item in sorted(skipped):
        print(f"  skipped (a CRD kubernetes-validate does not know): {item}")
    ensure(not failures, "; ".join(failures))
    return f"{validated} objects valid against Kubernetes {kube_version} (strict); skipped {len(skipped)} by kind: {', '.join(sorted(SKIPPED_KINDS))}"


# --- Prometheus ---------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    ensure(path is not None, "promtool not found: install it (`apt-get install -y prometheus`)")
    return path


def check_alert_rules(kube_version: str) -> str:
    result = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    ensure(result.returncode == 0, f"promtool check rules failed:\n{output}")
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        name = rule.get("alert", rule.get("record"))
        if "alert" in rule:
            ensure("for" in rule, f"alert {name} has no `for`")
            ensure(rule.get("labels", {}).get("severity") in ("critical", "warning", "info"),
                   f"alert {name} has no severity label")
            annotations = rule.get("annotations", {})
            ensure(annotations.get("summary") and annotations.get("description"),
                   f"alert {name} lacks a summary or description")
    return f"promtool: {output.splitlines()[-1].strip()}"


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included (rows themselves are layout)."""
    out = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def check_dashboard(kube_version: str) -> str:
    try:
        dashboard = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        raise CheckFailed(f"{DASHBOARD.relative_to(ROOT)} is not JSON: {e}") from e
    ensure(dashboard.get("uid") and dashboard.get("title"), "dashboard has no uid or title")
    ensure(isinstance(dashboard.get("schemaVersion"), int) and dashboard["schemaVersion"] >= 36,
           f"schemaVersion {dashboard.get('schemaVersion')} is too old")
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    ensure(any(v.get("type") == "datasource" and v.get("query") == "prometheus" for v in variables.values()),
           "no Prometheus datasource variable")
    panels = panels_of(dashboard)
    ensure(panels, "dashboard has no panels")
    ids = [p.get("id") for p in panels]
    ensure(len(set(ids)) == len(ids), "panel ids are not unique")
    exprs = []
    for panel in panels:
        title = panel.get("title", f"panel {panel.get('id')}")
        ensure(bool(panel.get("datasource")), f"panel {title!r} has no datasource")
        targets = panel.get("targets") or []
        ensure(len(targets) >= 1, f"panel {title!r} has no target")
        for target in targets:
            ensure(bool(target.get("expr", "").strip()), f"panel {title!r} has a target without expr")
            exprs.append((title, target["expr"]))
        ensure("gridPos" in panel, f"panel {title!r} has no gridPos")
    # PromQL syntax of every query, through promtool: each one becomes a recording rule,
    # with Grafana's variables replaced by plausible values.
    def concrete(expr: str) -> str:
        expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
        return re.sub(r"\$\{?(\w+)\}?", "x", expr)
    for v in variables.values():
        query = v.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if v.get("type") == "query" and isinstance(query, str):
            match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query, re.S)
            ensure(match is not None, f"variable {v['name']}: unexpected query {query!r}")
            exprs.append((f"variable {v['name']}", match.group(1)))
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query:{i}", "expr": concrete(e)} for i, (_, e) in enumerate(exprs)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(rules, f)
        f.flush()
        result = subprocess.run([promtool(), "check", "rules", f.name], capture_output=True, text=True)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        bad = sorted({exprs[int(n)][0] for n in re.findall(r"dashboard:query:(\d+)", output)})
        raise CheckFailed(f"PromQL errors in {bad or 'queries'}:\n{output.strip()}")
    return f"{len(panels)} panels, each with a datasource and targets; {len(exprs)} PromQL queries parse"


# --- CRD ----------------------------------------------------------------------------


def check_crd(kube_version: str) -> str:
    ensure(CRD.is_file(), f"{CRD.relative_to(ROOT)} is missing: generate it from the operator's types "
                          "and place it in the chart's crds/")
    docs = [d for d in yaml.safe_load_all(CRD.read_text()) if d is not None]
    ensure(len(docs) == 1, f"{CRD.name}: expected one document, found {len(docs)}")
    crd = docs[0]
    ensure(crd.get("apiVersion") == "apiextensions.k8s.io/v1" and crd.get("kind") == "CustomResourceDefinition",
           f"{CRD.name} is a {crd.get('apiVersion')} {crd.get('kind')}, not a CustomResourceDefinition")
    spec = crd.get("spec", {})
    names = spec.get("names", {})
    ensure(spec.get("group") == "parley.io", f"CRD group is {spec.get('group')!r}, not parley.io")
    ensure(names.get("kind") == "ParleyCluster", f"CRD kind is {names.get('kind')!r}, not ParleyCluster")
    ensure(crd["metadata"].get("name") == f"{names.get('plural')}.parley.io" == "parleyclusters.parley.io",
           f"CRD name {crd['metadata'].get('name')!r} is not parleyclusters.parley.io")
    ensure("pc" in names.get("shortNames", []), "CRD has no short name pc (NOTES.txt uses `kubectl get pc`)")
    try:
        kubernetes_validate.validate(crd, kube_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise CheckFailed(f"CRD invalid: {'.'.join(str(p) for p in e.path)}: {e.message}") from e
    # The examples (the chart's, printed by NOTES.txt, and the repository's) must be
    # accepted by the CRD's structural schema.
    served = {v["name"]: v for v in spec.get("versions", []) if v.get("served")}
    examples = [EXAMPLE] + sorted((ROOT / "examples").glob("*.yaml"))
    checked = []
    for path in examples:
        for example in yaml.safe_load_all(path.read_text()):
            if not example or example.get("kind") != "ParleyCluster":
                continue
            where = f"{path.relative_to(ROOT)} ({example.get('metadata', {}).get('name')})"
            group, _, version = example["apiVersion"].partition("/")
            ensure(group == "parley.io" and version in served,
                   f"{where}: {example['apiVersion']} is not a served version ({sorted(served)})")
            schema = served[version].get("schema", {}).get("openAPIV3Schema")
            ensure(schema is not None, f"CRD version {version} has no openAPIV3Schema")
            errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(example), key=lambda e: list(e.path))
            ensure(not errors, f"{where} does not match the CRD schema: "
                               + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors))
            checked.append(str(path.relative_to(ROOT)))
    return (f"CRD {crd['metadata']['name']} (versions {', '.join(sorted(served))}) valid; "
            f"{len(checked)} example ParleyCluster(s) match its schema")


CHECKS: list[tuple[str, Callable[[str], str]]] = [
    ("helm lint", check_helm_lint),
    ("helm render", check_helm_render),
    ("manifests", check_manifests),
    ("alert rules", check_alert_rules),
    ("dashboard", check_dashboard),
    ("crd", check_crd),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kube-version", default=kubernetes_validate.latest_version(),
                        help="Kubernetes version to lint and validate against (default: newest known)")
    args = parser.parse_args()
    failed = []
    for name, check in CHECKS:
        try:
            summary = check(args.kube_version)
            print(f"PASS {name}: {summary}", flush=True)
        except CheckFailed as e:
            failed.append(name)
            print(f"FAIL {name}: {e}", flush=True)
        except Exception:  # a bug in a check, or a library failing: still a failure, with its trace
            failed.append(name)
            print(f"FAIL {name}: unexpected error\n{traceback.format_exc()}", flush=True)
    if failed:
        print(f"artifacts: {len(failed)} of {len(CHECKS)} checks failed: {', '.join(failed)}")
        return 1
    print(f"artifacts: all {len(CHECKS)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
