"""The config file: documented defaults, every key reaching its dataclass, and precise refusals.

(`gpucap check-config` on the Helm chart's rendered ConfigMap is tested in tests/test_helm.py.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from agent.config import (
    DEFAULT_SOCKET,
    Config,
    IdleConfig,
    InferenceTargetConfig,
    config_from_dict,
    load_config,
)
from collectors.schema import InputError

FULL = """
node_name: gpu-node-7
listen: 127.0.0.1:9999
log: {format: json, level: debug}
nvml: {interval: 5s, timeout: 2s}
kubelet: {socket: /run/kubelet/pod-resources.sock, interval: 20s, timeout: 3s}
kubernetes:
  enabled: false
  kubeconfig: /etc/kube/config
  resync: 2m
  interval: 30s
  team_label_keys: [owner-team]
  pod_label_allowlist: [app, version]
processes: {enabled: false, procfs: /host/proc}
inference:
  discover: false
  interval: 1m
  timeout: 500ms
  max_bytes: 2048
  targets:
    - {url: "http://10.0.0.5:8000/metrics", namespace: serving, pod: chat-0}
    - {url: "https://vllm.internal/metrics"}
idle: {threshold: 0.1, window: 45m}
saturation: {window: 10m, queue_fraction: 0.25, kv_cache_threshold: 0.9, sm_active_threshold: 0.8}
outcome: {window: 1h}
pricing:
  default_gpu_hourly: 2.5
  gpu_hourly_by_instance_type: {p5.48xlarge: 5.2}
  gpu_hourly_by_model: {"NVIDIA H100 80GB HBM3": 4.1}
  spot_ratio: 0.4
  reserved_ratio: 0.7
  mig_cost_basis: memory
history: {interval: 2m, retention: 14d}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_no_file_means_the_documented_defaults() -> None:
    c = load_config(None)
    assert c == Config()
    assert (c.listen, c.log_format, c.log_level) == (":9470", "text", "info")
    assert (c.nvml.interval, c.nvml.timeout) == (10.0, 5.0)
    assert (c.kubelet.socket, c.kubelet.interval, c.kubelet.timeout, c.kubelet.explicit) == (
        DEFAULT_SOCKET, 10.0, 5.0, False)
    assert c.kubernetes.enabled and c.kubernetes.team_label_keys == ("team", "app.kubernetes.io/part-of")
    assert c.kubernetes.resync == 60.0 and c.kubernetes.pod_label_allowlist == ()
    assert (c.processes.enabled, c.processes.procfs) == (True, "/proc")
    assert (c.inference.discover, c.inference.interval, c.inference.timeout, c.inference.max_bytes,
            c.inference.targets) == (True, 15.0, 2.0, 10485760, ())
    assert c.idle == IdleConfig(0.05, 1800.0)
    assert (c.saturation.window, c.saturation.queue_fraction, c.saturation.kv_cache_threshold,
            c.saturation.sm_active_threshold) == (300.0, 0.5, 0.95, 0.95)
    assert c.outcome_window == 900.0
    p = c.pricing
    assert (p.default_gpu_hourly, p.spot_ratio, p.reserved_ratio, p.mig_cost_basis, p.catalog_path) == (
        0.95, 0.35, 0.6, "compute", None)
    assert dict(p.gpu_hourly_by_instance_type) == {} and dict(p.gpu_hourly_by_model) == {}
    assert (c.history.path, c.history.interval, c.history.retention) == ("", 60.0, 35 * 86400.0)


def test_an_empty_file_is_all_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing set\n")
    c = load_config(path)
    assert c.path == path
    assert dataclasses.replace(c, path="") == Config()


def test_a_full_config_reaches_every_dataclass(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, FULL))
    assert (c.node_name, c.resolved_node_name(), c.listen) == ("gpu-node-7", "gpu-node-7", "127.0.0.1:9999")
    assert (c.log_format, c.log_level) == ("json", "debug")
    assert (c.nvml.interval, c.nvml.timeout) == (5.0, 2.0)
    assert (c.kubelet.socket, c.kubelet.interval, c.kubelet.timeout, c.kubelet.explicit) == (
        "/run/kubelet/pod-resources.sock", 20.0, 3.0, True)
    k = c.kubernetes
    assert (k.enabled, k.kubeconfig, k.resync, k.interval, k.team_label_keys, k.pod_label_allowlist) == (
        False, "/etc/kube/config", 120.0, 30.0, ("owner-team",), ("app", "version"))
    assert (c.processes.enabled, c.processes.procfs) == (False, "/host/proc")
    i = c.inference
    assert (i.discover, i.interval, i.timeout, i.max_bytes) == (False, 60.0, 0.5, 2048)
    assert c.idle == IdleConfig(0.1, 2700.0)
    s = c.saturation
    assert (s.window, s.queue_fraction, s.kv_cache_threshold, s.sm_active_threshold) == (600.0, 0.25, 0.9, 0.8)
    assert c.outcome_window == 3600.0
    p = c.pricing
    assert (p.default_gpu_hourly, p.spot_ratio, p.reserved_ratio, p.mig_cost_basis) == (2.5, 0.4, 0.7, "memory")
    assert dict(p.gpu_hourly_by_instance_type) == {"p5.48xlarge": 5.2}
    assert list(p.gpu_hourly_by_model.values()) == [4.1]
    assert (c.history.interval, c.history.retention) == (120.0, 14 * 86400.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.idle.threshold = 0.5  # type: ignore[misc]


def test_inference_targets_are_parsed_in_order(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, FULL))
    assert c.inference.targets == (
        InferenceTargetConfig("http://10.0.0.5:8000/metrics", "serving", "chat-0"),
        InferenceTargetConfig("https://vllm.internal/metrics", "", ""),
    )


@pytest.mark.parametrize(("targets", "key"), [
    ("[{namespace: serving}]", "inference.targets[0].url"),
    ("[{url: 'http://a:1/metrics'}, {url: '10.0.0.5:8000/metrics'}]", "inference.targets[1].url"),
    ("[{url: 'http://a:1/metrics', port: 8000}]", "inference.targets[0].port"),
    ("{url: 'http://a:1/metrics'}", "inference.targets"),
    ("[http://a:1/metrics]", "inference.targets[0]"),
])
def test_bad_inference_targets_name_the_entry(targets: str, key: str) -> None:
    with pytest.raises(InputError) as e:
        config_from_dict(yaml.safe_load(f"inference:\n  targets: {targets}\n"), "cfg.yaml")
    assert (e.value.where, e.value.path) == ("cfg.yaml", key)


@pytest.mark.parametrize(("value", "seconds"), [("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("7d", 604800.0),
                                                 (90, 90.0), ("1.5h", 5400.0)])
def test_durations_are_strings_with_a_unit_or_seconds(value: object, seconds: float) -> None:
    assert config_from_dict({"idle": {"window": value}}, "cfg.yaml").idle.window == seconds


@pytest.mark.parametrize(("data", "key"), [
    ({"listen": "9470"}, "listen"),
    ({"log": {"format": "xml"}}, "log.format"),
    ({"nvml": {"interval": 0}}, "nvml.interval"),
    ({"kubernetes": {"team_label_keys": "team"}}, "kubernetes.team_label_keys"),
    ({"saturation": {"kv_cache_threshold": 1.5}}, "saturation.kv_cache_threshold"),
    ({"inference": {"max_bytes": 10}}, "inference.max_bytes"),
    ({"pricing": {"spot_ratio": 0}}, "pricing.spot_ratio"),
    ({"pricing": {"mig_cost_basis": "power"}}, "pricing.mig_cost_basis"),
    ({"history": {"retention": "forever"}}, "history.retention"),
    (["listen: :9470"], ""),
])
def test_impossible_values_name_their_key(data: object, key: str) -> None:
    with pytest.raises(InputError) as e:
        config_from_dict(data, "cfg.yaml")
    assert e.value.path == key and str(e.value).startswith("cfg.yaml: ")


def test_node_name_comes_from_the_downward_api_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "ip-10-0-1-7.ec2.internal")
    assert Config().resolved_node_name() == "ip-10-0-1-7.ec2.internal"
    assert Config(node_name="explicit").resolved_node_name() == "explicit"


def test_the_example_config_in_the_docs_is_valid() -> None:
    from click.testing import CliRunner

    from agent.cli import main

    path = str(Path(__file__).resolve().parents[1] / "docs" / "examples" / "config.yaml")
    res = CliRunner().invoke(main, ["check-config", path])
    assert res.exit_code == 0, res.output
    c = load_config(path)
    assert c.idle.window == 1200 and c.kubernetes.pod_label_allowlist == ("app",)
