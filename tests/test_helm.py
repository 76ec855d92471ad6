"""The chart as `helm install` would see it: rendered by the real Helm SDK, validated against the
Kubernetes API schemas, and checked for what an SRE reviewing a DaemonSet on every GPU node cares about
(least-privilege RBAC, a hardened container, a read-only kubelet socket, no drift from the repo's alerts).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from agent.cli import main as gpucap_cli
from tests.test_dashboard import PROMTOOL, run_promtool

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (pip install -e .[test])")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "gpucap"
ALL_FEATURES = ROOT / "deploy" / "helm" / "ci" / "all-features-values.yaml"
RULES = CHART / "rules" / "gpucap-alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "rules-tests"
K8S_VERSION = kubernetes_validate.latest_version()
NAMESPACE = "gpucap-system"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
# Top-level keys of gpucap's config file (docs: contract).
CONFIG_KEYS = {"node_name", "listen", "log", "nvml", "kubelet", "kubernetes", "processes", "inference", "idle",
               "saturation", "outcome", "pricing", "history"}

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'); CI installs it")

Objects = dict[tuple[str, str], dict[str, Any]]


def all_features_values() -> dict[str, Any]:
    return yaml.safe_load(ALL_FEATURES.read_text())


def render(values: dict[str, Any] | None = None, name: str = "gpucap") -> Objects:
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=name, namespace=NAMESPACE)
    objects: Objects = {}
    for template, text in manifests.items():
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in objects, f"{key} rendered twice"
                objects[key] = doc
    return objects


def one(objects: Objects, kind: str) -> dict[str, Any]:
    found = [o for (k, _), o in objects.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def absent(objects: Objects, kind: str) -> bool:
    return not any(k == kind for k, _ in objects)


@pytest.fixture(scope="module")
def default_objects() -> Objects:
    return render()


@pytest.fixture(scope="module")
def full_objects() -> Objects:
    return render(all_features_values(), name="gpu")


def container(objects: Objects) -> dict[str, Any]:
    return one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]


def gpucap_config(objects: Objects) -> dict[str, Any]:
    """The config the pod reads: the ConfigMap its `config` volume names."""
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/gpucap")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return yaml.safe_load(objects[("ConfigMap", volume["configMap"]["name"])]["data"]["config.yaml"])


# -- lint and Kubernetes schemas ---------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, "all-features"])
def test_helm_lint_has_no_errors(values: str | None) -> None:
    report = helm_python.lint(CHART, all_features_values() if values else None, namespace=NAMESPACE)
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not errors, errors


@pytest.mark.parametrize("which", ["default", "all-features"])
def test_every_manifest_validates_strictly_against_kubernetes(which: str, default_objects: Objects,
                                                              full_objects: Objects) -> None:
    objects = default_objects if which == "default" else full_objects
    checked = set()
    for (kind, name), obj in objects.items():
        if kind in CRD_KINDS:
            continue  # no schema in kubernetes-validate: see the CRD structure tests below
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}/{name} invalid for Kubernetes {K8S_VERSION}: {str(exc).splitlines()[0]}")
        checked.add(kind)
    assert checked == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Service", "DaemonSet"}


def test_the_validator_rejects_an_invalid_daemonset(default_objects: Objects) -> None:
    """The strict validation above can fail: a misplaced field in the pod spec is refused."""
    ds = copy.deepcopy(one(default_objects, "DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["readOnly"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


def test_optional_objects_only_when_enabled(default_objects: Objects, full_objects: Objects) -> None:
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert absent(default_objects, kind)
        one(full_objects, kind)
    assert [n for k, n in default_objects if k == "ConfigMap"] == ["gpucap"]
    assert sorted(n for k, n in full_objects if k == "ConfigMap") == ["gpucap-agent", "gpucap-agent-dashboard"]


# -- RBAC and security -------------------------------------------------------------------------------

def test_rbac_is_exactly_read_only_on_what_attribution_needs(default_objects: Objects) -> None:
    role = one(default_objects, "ClusterRole")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    wanted = {(group, resource, verb) for group, resource in
              [("", "pods"), ("", "nodes"), ("", "namespaces"), ("apps", "replicasets"), ("batch", "jobs")]
              for verb in ("get", "list", "watch")}
    assert granted == wanted
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in role["rules"])  # no resourceNames games
    assert absent(default_objects, "Role") and absent(default_objects, "RoleBinding")
    binding = one(default_objects, "ClusterRoleBinding")
    sa = one(default_objects, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert one(default_objects, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


@pytest.mark.parametrize("which", ["default", "all-features"])
def test_container_is_hardened(which: str, default_objects: Objects, full_objects: Objects) -> None:
    objects = default_objects if which == "default" else full_objects
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    sc = container(objects)["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostIPC" not in pod
    # read-only root: only /tmp (an emptyDir) and the ledger's own directory on the node are writable
    writable = {m["mountPath"] for m in container(objects)["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp", "/var/lib/gpucap"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = next(m for m in container(objects)["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]


def test_non_root_is_a_values_choice(default_objects: Objects, full_objects: Objects) -> None:
    """Root without capabilities by default (the kubelet socket is root's); non-root when asked."""
    assert one(default_objects, "DaemonSet")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 0
    pod_sc = one(full_objects, "DaemonSet")["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 65532 and pod_sc["supplementalGroups"] == [990]


@pytest.mark.parametrize("which", ["default", "all-features"])
def test_kubelet_socket_dir_is_mounted_read_only_and_config_points_into_it(
        which: str, default_objects: Objects, full_objects: Objects) -> None:
    objects = default_objects if which == "default" else full_objects
    host = "/var/lib/kubelet/pod-resources" if which == "default" else "/var/lib/k0s/kubelet/pod-resources"
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v.get("hostPath", {}).get("path") == host)
    assert volume["hostPath"]["type"] == "Directory"
    mount = next(m for m in container(objects)["volumeMounts"] if m["name"] == volume["name"])
    assert mount["readOnly"] is True
    socket = gpucap_config(objects)["kubelet"]["socket"]
    assert Path(socket).parent == Path(mount["mountPath"]) and Path(socket).name == "kubelet.sock"


# -- the DaemonSet -----------------------------------------------------------------------------------

def test_daemonset_lands_on_gpu_nodes_and_sees_every_gpu(default_objects: Objects) -> None:
    pod = one(default_objects, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {(t["key"], t["operator"], t["effect"]) for t in pod["tolerations"]} >= {
        ("nvidia.com/gpu", "Exists", "NoSchedule")}
    assert pod["hostPID"] is False and "runtimeClassName" not in pod
    c = container(default_objects)
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NVIDIA_MIG_MONITOR_DEVICES"]["value"] == "all"
    # It watches GPUs, it must not take one from the scheduler.
    assert not any(k.startswith("nvidia.com/") for part in c["resources"].values() for k in part)
    assert c["command"] + c["args"] == ["gpucap", "run", "--config", "/etc/gpucap/config.yaml"]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics", "scheme": "HTTP"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics", "scheme": "HTTP"}
    # Of the node it mounts the kubelet's socket directory (read-only) and the ledger's directory.
    assert [v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v] == [
        "/var/lib/kubelet/pod-resources", "/var/lib/gpucap"]
    assert gpucap_config(default_objects)["history"]["path"] == "/var/lib/gpucap/history.db"
    off = render({"history": {"enabled": False}})
    assert gpucap_config(off)["history"] == {"enabled": False}
    assert [v["hostPath"]["path"] for v in one(off, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
            if "hostPath" in v] == ["/var/lib/kubelet/pod-resources"]


def test_all_features_switch_on_runtime_class_host_pid_and_processes(full_objects: Objects) -> None:
    pod = one(full_objects, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia" and pod["hostPID"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert gpucap_config(full_objects)["processes"] == {"enabled": True}
    assert container(full_objects)["image"] == "registry.example.com/platform/gpucap:0.1.0-rc1"


def parse_gpucap_command_line(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse a command line the way the `gpucap` entry point would, without running it: click raises
    UsageError on an unknown command or option, or a bad value."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[argv[0]] == "agent.cli:main", f"{argv[0]!r} is not gpucap's entry point"
    args = argv[1:]
    ctx = gpucap_cli.make_context(argv[0], list(args))
    command = gpucap_cli.get_command(ctx, args[0]) if args else None
    assert command is not None, f"{args[:1]} is not a gpucap command"
    with command.make_context(args[0], list(args[1:]), parent=ctx) as sub:
        return args[0], sub.params


@pytest.mark.parametrize("which", ["default", "all-features"])
def test_gpucap_accepts_the_daemonset_command_line(which: str, default_objects: Objects,
                                                   full_objects: Objects) -> None:
    """A pod whose `gpucap run` exits 2 on an unknown option crash-loops on every GPU node."""
    objects = default_objects if which == "default" else full_objects
    c = container(objects)
    name, params = parse_gpucap_command_line(c["command"] + c["args"])
    assert name == "run"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(Path(params["config_path"]).parent))
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = objects[("ConfigMap", volume["configMap"]["name"])]
    assert Path(params["config_path"]).name in config_map["data"]


def test_command_line_check_rejects_an_option_gpucap_lacks(default_objects: Objects) -> None:
    """The check above can fail: an option `gpucap run` lacks is refused, as `gpucap run` would."""
    c = container(default_objects)
    with pytest.raises(click.UsageError, match="--ledger"):
        parse_gpucap_command_line(c["command"] + c["args"] + ["--ledger", "/var/lib/gpucap/history.db"])


def test_config_change_rolls_the_pods(default_objects: Objects) -> None:
    changed = render({"config": {"idle": {"threshold": 0.1}}})
    key = "checksum/config"
    before = one(default_objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"][key]
    after = one(changed, "DaemonSet")["spec"]["template"]["metadata"]["annotations"][key]
    assert before != after


# -- gpucap's config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["default", "all-features"])
def test_config_has_only_known_keys_and_agrees_with_the_pod(which: str, default_objects: Objects,
                                                            full_objects: Objects) -> None:
    objects = default_objects if which == "default" else full_objects
    cfg = gpucap_config(objects)
    assert set(cfg) <= CONFIG_KEYS, set(cfg) - CONFIG_KEYS
    port = container(objects)["ports"][0]
    assert port["name"] == "metrics"
    assert cfg["listen"] == f":{port['containerPort']}"
    service = one(objects, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": port["containerPort"], "targetPort": "metrics",
                                         "protocol": "TCP"}]


@pytest.mark.parametrize("which", ["default", "all-features"])
def test_gpucap_accepts_the_rendered_config(which: str, default_objects: Objects, full_objects: Objects,
                                            tmp_path: Path) -> None:
    """`gpucap check-config` on the ConfigMap's file: a pod that would crash-loop on its config fails here."""
    objects = default_objects if which == "default" else full_objects
    cm = next(o for (k, n), o in objects.items() if k == "ConfigMap" and "config.yaml" in o["data"])
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    result = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_processes_follow_host_pid(default_objects: Objects) -> None:
    """Without the host PID namespace gpucap cannot see other pods' processes: don't pretend."""
    assert gpucap_config(default_objects)["processes"]["enabled"] is False


def test_pricing_and_thresholds_flow_from_values(full_objects: Objects) -> None:
    cfg = gpucap_config(full_objects)
    assert cfg["pricing"]["gpu_hourly_by_instance_type"] == {"p5.48xlarge": 5.2}
    assert cfg["pricing"]["mig_cost_basis"] == "memory"
    assert cfg["idle"] == {"threshold": 0.1, "window": "45m"}
    assert cfg["inference"]["max_bytes"] == 10485760  # not 1.048576e+07
    assert cfg["kubernetes"]["team_label_keys"] == ["team", "example.com/cost-center"]
    assert cfg["kubernetes"]["interval"] == "30s"


@pytest.mark.parametrize("gpus, accepted", [(8, True), (0, False)])
def test_price_catalog_path_reaches_gpucap(gpus: int, accepted: bool, tmp_path: Path) -> None:
    """config.pricing.catalog_path is passed through, and `gpucap check-config` reads the file it names
    (a bad row fails there, not in the pod)."""
    catalog = tmp_path / "prices-extra.yaml"
    catalog.write_text(yaml.safe_dump({"instance_types": {"onprem-dgx-a100": {
        "gpus": gpus, "gpu_model": "A100-80GB", "hourly": 18.4, "source": "finance sheet", "date": "2026-01-01"}}}))
    objects = render({"config": {"pricing": {"catalog_path": str(catalog)}}})
    assert gpucap_config(objects)["pricing"]["catalog_path"] == str(catalog)
    path = tmp_path / "config.yaml"
    path.write_text(objects[("ConfigMap", "gpucap")]["data"]["config.yaml"])
    result = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    if accepted:
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        assert result.returncode == 2 and "onprem-dgx-a100.gpus" in result.stderr, result.stdout + result.stderr


# -- values schema -----------------------------------------------------------------------------------

@pytest.mark.parametrize("values, complaint", [
    ({"serviceMonitr": {"enabled": True}}, "serviceMonitr"),
    ({"config": {"idle": {"treshold": 0.1}}}, "treshold"),
    ({"config": {"node_name": "n1"}}, "node_name"),           # the chart owns it (downward API)
    ({"hostPID": "yes"}, "hostPID"),
    ({"service": {"port": "9470"}}, "port"),
    ({"config": {"pricing": {"default_gpu_hourly": -1}}}, "default_gpu_hourly"),
    ({"config": {"idle": {"window": "thirty minutes"}}}, "window"),
    ({"prometheusRule": {"alerts": {"GpucapIdleReserved": {"threshold": 1}}}}, "GpucapIdleReserved"),
    # the chart owns the ledger's place: values.history, never config.history
    ({"history": {"enabled": "yes"}}, "enabled"),
    ({"history": {"retention": "two weeks"}}, "retention"),
    ({"history": {"hostPath": "gpucap"}}, "hostPath"),
    ({"config": {"history": {"retention": "14d"}}}, "history"),
    ({"config": {"kubernetes": {"kubeconfig": "/root/.kube/config"}}}, "kubeconfig"),  # in-cluster: ServiceAccount
    ({"config": {"kubernetes": {"interval": "soon"}}}, "interval"),
    ({"config": {"pricing": {"catalog_path": "prices.yaml"}}}, "catalog_path"),  # relative: /etc/gpucap has none
])
def test_schema_rejects_typos_and_wrong_types(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=complaint):
        render(values)


def test_schema_knows_exactly_the_alerts_in_the_rules_file() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    in_schema = set(schema["properties"]["prometheusRule"]["properties"]["alerts"]["properties"])
    in_rules = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert in_schema == in_rules


# -- CRDs: ServiceMonitor and PrometheusRule (checked by hand: no schema in kubernetes-validate) ------

def test_service_monitor_scrapes_the_service_as_job_gpucap_and_keeps_owner_labels(full_objects: Objects) -> None:
    sm = one(full_objects, "ServiceMonitor")
    service = one(full_objects, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["namespace"] == "monitoring"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(sm["spec"]) == {"jobLabel", "selector", "namespaceSelector", "endpoints"}
    assert service["metadata"]["labels"][sm["spec"]["jobLabel"]] == "gpucap"
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "15s" and endpoint["scrapeTimeout"] == "5s"
    assert endpoint["honorLabels"] is True
    dropped = next(r for r in endpoint["relabelings"] if r["action"] == "labeldrop")
    assert set(dropped["regex"].strip("()").split("|")) >= {"namespace", "pod", "container"}
    known = {"port", "path", "interval", "scrapeTimeout", "honorLabels", "relabelings"}
    assert set(endpoint) <= known


def _rule_groups(objects: Objects) -> list[dict[str, Any]]:
    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for r in group["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"} and isinstance(r["expr"], str)
    return rule["spec"]["groups"]


def test_rendered_rules_are_the_repo_rules_file_unchanged() -> None:
    objects = render({"prometheusRule": {"enabled": True}})
    assert _rule_groups(objects) == yaml.safe_load(RULES.read_text())["groups"]


def test_rule_overrides_apply_to_the_one_alert_named(full_objects: Objects) -> None:
    rendered = {r["alert"]: r for g in _rule_groups(full_objects) for r in g["rules"]}
    repo = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert "GpucapAbsent" not in rendered
    assert "gpucap_gpu_idle_reserved_seconds >= 14400 # threshold" in rendered["GpucapIdleReservedGpu"]["expr"]
    spend = rendered["GpucapIdleReservedSpendHigh"]
    assert "> 100 # threshold" in spend["expr"] and spend["for"] == "2h" and spend["labels"]["severity"] == "critical"
    assert "> 0.5 # threshold" in rendered["GpucapInferenceCostPer1kHigh"]["expr"]
    assert rendered["GpucapCollectorFailing"]["for"] == "15m"
    assert rendered["GpucapGpuLost"]["annotations"]["runbook_url"] == "https://runbooks.example.com/gpucap#gpucapgpulost"
    untouched = {a for a in rendered if a not in all_features_values()["prometheusRule"]["alerts"]}
    for alert in untouched:
        assert rendered[alert]["expr"] == repo[alert]["expr"] and rendered[alert]["for"] == repo[alert]["for"]


@pytest.mark.parametrize("alerts, complaint", [
    ({"GpucapGpuLost": {"threshold": 3}}, "no \"# threshold\" marker"),
])
def test_threshold_on_an_alert_without_one_fails_the_install(alerts: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmError, match=complaint):
        render({"prometheusRule": {"enabled": True, "alerts": alerts}})


@needs_promtool
@pytest.mark.parametrize("which", ["default", "all-features"])
def test_rendered_rules_pass_promtool_check(which: str, tmp_path: Path) -> None:
    values = {"prometheusRule": {"enabled": True}} if which == "default" else all_features_values()
    groups = _rule_groups(render(values))
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_repo_promtool_unit_tests_pass_on_the_rendered_rules(tmp_path: Path) -> None:
    """The alerts Helm installs are the ones the unit tests exercise, literally."""
    groups = _rule_groups(render({"prometheusRule": {"enabled": True}}))
    (tmp_path / "rendered.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    tests = []
    for src in sorted(RULE_TESTS.glob("*.yaml")):
        doc = yaml.safe_load(src.read_text())
        doc["rule_files"] = ["rendered.yaml"]
        dst = tmp_path / src.name
        dst.write_text(yaml.safe_dump(doc, sort_keys=False))
        tests.append(str(dst))
    result = run_promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr


# -- dashboard ConfigMap -----------------------------------------------------------------------------

def test_dashboard_configmap_carries_the_repo_dashboard_for_the_sidecar(full_objects: Objects) -> None:
    cm = full_objects[("ConfigMap", "gpucap-agent-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "grafana"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "GPU"}
    assert json.loads(cm["data"]["gpucap.json"]) == json.loads((CHART / "dashboards" / "gpucap.json").read_text())


def test_packaged_chart_keeps_rules_and_dashboard(tmp_path: Path) -> None:
    """.helmignore must not drop the files the templates read: render the packaged .tgz."""
    with helm_python.Chart.load(CHART) as chart:
        archive = chart.save(tmp_path)
    with helm_python.Chart.load(archive) as packaged:
        manifests = packaged.render(all_features_values(), name="gpu", namespace=NAMESPACE)
    assert "GpucapIdleReservedGpu" in manifests["gpucap/templates/prometheusrule.yaml"]
    assert '"uid": "gpucap"' in manifests["gpucap/templates/dashboard-configmap.yaml"]
