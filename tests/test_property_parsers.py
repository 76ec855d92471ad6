"""Property-based tests (hypothesis) for every parser and loader a user or a pod can feed: whatever
the input, a value, a clear error (InputError naming the file) or a skip (None), never a crash or
a hang. And label values with quotes, backslashes, newlines and non-ASCII survive /metrics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from agent.config import config_from_dict, load_config
from agent.web import load_web_config
from collectors.inference_parse import ParseError, UnknownServerError, parse_exposition
from collectors.podresources import parse_device_id
from collectors.pricing import _parse_annotation, parse_catalog
from collectors.processes import parse_cgroup
from collectors.redact import redact_text, redact_url
from collectors.schema import InputError, parse_yaml
from collectors.simulated.scenario import load_scenario
from tests.helpers import builtin_scenario, parse, run_to, simulated, write_scenario

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# YAML-ish documents: real structure with hostile leaves
leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30),
                   st.sampled_from(["1e308", "-5s", "10x", "nan", "0", "1.0e+308", "9" * 50, "30s", "99999d"]))
trees = st.recursive(leaves, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(st.text(max_size=12), kids, max_size=4)),
                     max_leaves=20)
CONFIG_KEYS = ["nvml", "kubelet", "kubernetes", "inference", "idle", "saturation", "pricing", "history",
               "collectors", "listen", "log", "outcome", "processes", "node_name"]
SUB_KEYS = ["interval", "timeout", "window", "threshold", "targets", "url", "max_age", "enabled", "catalog_path",
            "retention", "max_size", "socket", "resync", "gpu_hourly_by_model", "default_gpu_hourly"]
configs = st.dictionaries(st.sampled_from(CONFIG_KEYS),
                          st.one_of(trees, st.dictionaries(st.sampled_from(SUB_KEYS), trees, max_size=4)), max_size=5)


@FAST
@given(data=configs)
def test_any_config_mapping_is_a_config_or_an_input_error(data) -> None:
    try:
        cfg = config_from_dict(data, "cfg.yaml")
    except InputError as e:
        assert all(str(p).startswith("cfg.yaml") for p in e.problems)
        return
    assert 1.0 <= cfg.nvml.interval <= 86400.0 and 0.1 <= cfg.kubelet.timeout <= 3600.0


@FAST
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_config_bytes_are_a_config_or_an_input_error(tmp_path_factory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(raw)
    try:
        load_config(str(path))
    except InputError as e:
        assert str(e).startswith(str(path))


@FAST
@given(text=st.text(alphabet="[]{}:,-&*!|>'\"#\n ab1", max_size=200))
def test_yaml_punctuation_never_crashes_the_loader(text: str) -> None:
    try:
        parse_yaml(text, "f.yaml", "config")
    except InputError as e:
        assert str(e).startswith("f.yaml")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(st.sampled_from(["gpus", "pods", "faults", "node", "seed", "extends", "name"]),
                            trees, max_size=4))
def test_any_scenario_is_a_scenario_or_an_input_error(tmp_path_factory, data) -> None:
    path = tmp_path_factory.mktemp("sc") / "s.yaml"
    try:
        path.write_text(yaml.safe_dump(data))
    except yaml.YAMLError:
        return
    try:
        load_scenario(str(path))
    except InputError as e:
        assert str(path) in str(e) or "not a built-in scenario" in str(e) or "s.yaml" in str(e)


@FAST
@given(data=st.dictionaries(st.sampled_from(["instance_types", "models", "default", "x"]),
                            st.dictionaries(st.text(max_size=10), trees, max_size=3) | trees, max_size=3))
def test_any_price_file_is_a_catalog_or_an_input_error(data) -> None:
    try:
        parse_catalog(yaml.safe_dump(data), "prices.yaml")
    except InputError as e:
        assert str(e).startswith("prices.yaml")


@FAST
@given(value=st.text(max_size=40) | st.sampled_from(["1e308", "-1", "nan", "inf", "4.20", " 3 ", "1_000"]))
def test_a_node_price_annotation_is_a_finite_price_or_ignored(value: str) -> None:
    price = _parse_annotation(value)
    assert price is None or (price >= 0 and price != float("inf"))


@FAST
@given(data=st.dictionaries(st.sampled_from(["tls_server_config", "basic_auth_users", "http_server_config", "x"]),
                            st.dictionaries(st.text(max_size=10), trees, max_size=3) | trees, max_size=3))
def test_any_web_config_is_loaded_or_an_input_error(tmp_path_factory, data) -> None:
    path = tmp_path_factory.mktemp("web") / "web.yml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_web_config(str(path))
    except InputError as e:
        assert str(e).startswith(str(path))


@FAST
@given(resource=st.sampled_from(["nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-1g.10gb", "x"]),
       device=st.text(max_size=60) | st.from_regex(r"(GPU|MIG|nvidia)[-A-Za-z0-9/:.]{0,50}", fullmatch=True))
def test_any_device_id_parses_or_is_skipped(resource: str, device: str) -> None:
    parse_device_id(resource, device)  # a DeviceRef or None; never raises


@FAST
@given(text=st.text(max_size=400) | st.lists(
    st.from_regex(r"\d{1,2}:[a-z,=]{0,20}:/[-a-zA-Z0-9_./:]{0,120}", fullmatch=True), max_size=6).map("\n".join))
def test_any_cgroup_file_parses_or_is_skipped(text: str) -> None:
    parse_cgroup(text)


metric_lines = st.from_regex(
    r"(vllm:|nv_inference_|tgi_|sglang:)?[a-z_:]{1,30}(\{[a-z_]{1,8}=\"[^\"\n]{0,12}\"\})? [-+0-9.eE]{1,12}",
    fullmatch=True)


@FAST
@given(text=st.text(max_size=500) | st.lists(metric_lines | st.text(max_size=40), max_size=30).map("\n".join))
def test_any_inference_exposition_parses_or_is_a_parse_error(text: str) -> None:
    try:
        parse_exposition(text)
    except (ParseError, UnknownServerError):
        pass


@FAST
@given(user=st.text(alphabet="abcXYZ019-_.~%", min_size=1, max_size=8),
       password=st.text(alphabet="abcXYZ019-_~!$", min_size=6, max_size=16),
       token=st.text(alphabet="abcXYZ019", min_size=6, max_size=16),
       junk=st.text(max_size=10))
def test_redaction_never_lets_the_password_or_query_through(user: str, password: str, token: str, junk: str) -> None:
    url = f"https://{user}:{password}@host.example:8443/metrics?token={token}#frag"
    shown = redact_url(url)
    assert shown == f"https://{user}:***@host.example:8443/metrics"
    assert "token=" not in redact_text(f"GET {url} failed: refused", [url])
    hostile = redact_url(f"https://{junk}{user}:{password}@host.example:8443/m?token={token}")
    assert "token=" not in hostile and f":{password}@" not in hostile  # any junk: masked or redacted


# ------------------------------------------------------------------------------------------ labels
NASTY = ['quote"d', "back\\slash", "new\nline", "café-ü-東京", 'all "\\\n" three', "tab\tand ${x}"]


def test_label_values_round_trip_through_metrics(tmp_path: Path) -> None:
    """Team names from pod labels (any string the API server returns) come back exactly from our
    /metrics as prometheus_client parses it, and promtool finds nothing wrong with the text."""
    sc = builtin_scenario("demo")
    for pod, team in zip(sc["pods"], NASTY):
        pod.setdefault("labels", {})["team"] = team
    path = write_scenario(tmp_path, "nasty", sc)
    from agent.exposition import render

    with simulated(path) as rt:
        text = render(run_to(rt, 60))
    families = list(text_string_to_metric_families(text))  # parses at all
    assert families
    teams = {labels.get("team") for labels, _ in parse(text)["gpucap_gpu_allocation_ratio"]}
    assert set(NASTY[: len(sc["pods"])]) <= teams
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                           check=False, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("value", NASTY)
def test_nasty_label_values_are_escaped_on_one_line(value: str) -> None:
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.exposition import generate_latest

    class One:
        def collect(self):
            g = GaugeMetricFamily("gpucap_x", "x", labels=["team"])
            g.add_metric([value], 1.0)
            yield g

    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    reg.register(One())
    text = generate_latest(reg).decode()
    sample = next(f for f in text_string_to_metric_families(text) if f.name == "gpucap_x").samples[0]
    assert sample.labels["team"] == value
