"""The one validation layer (collectors/schema.py) as a user meets it through config, scenario and
price files: every mistake of a file at once, each naming the file, the dotted key, the value and
the expectation; unknown keys and scenario names with a "did you mean"; the `collectors:` section."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from agent.cli import main
from agent.config import COLLECTOR_NAMES, CollectorSettings, Config, config_from_dict, load_config
from collectors.pricing import PricingConfigError, parse_catalog, pricing_config_from_dict
from collectors.schema import InputError, Problem, Reader
from collectors.simulated.scenario import load_scenario, resolve

ROOT = Path(__file__).resolve().parents[1]

THREE_MISTAKES = """\
nvml:
  interval: fast
idle:
  treshold: 0.1
saturation:
  queue_fraction: 1.5
"""
THREE_LINES = [
    "cfg.yaml: nvml.interval: expected a duration like 30s, 5m, 2h or 7d (> 0), got 'fast'",
    "cfg.yaml: idle.treshold: unknown key (known here: threshold, window; did you mean 'threshold'?)",
    "cfg.yaml: saturation.queue_fraction: expected a number between 0 and 1, got 1.5",
]


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- config files
def test_a_config_with_three_mistakes_reports_all_three() -> None:
    with pytest.raises(InputError) as e:
        config_from_dict(yaml.safe_load(THREE_MISTAKES), "cfg.yaml")
    assert str(e.value).splitlines() == THREE_LINES
    assert [(p.where, p.path) for p in e.value.problems] == [
        ("cfg.yaml", "nvml.interval"), ("cfg.yaml", "idle.treshold"), ("cfg.yaml", "saturation.queue_fraction")]
    assert [p.got for p in e.value.problems] == ["fast", "treshold", 1.5]
    # the first problem stays available as before, for callers that show one
    assert (e.value.where, e.value.path, e.value.got) == ("cfg.yaml", "nvml.interval", "fast")
    assert e.value.expected == "a duration like 30s, 5m, 2h or 7d (> 0)"


def test_the_value_is_shown_as_written_never_a_reason_in_its_place() -> None:
    with pytest.raises(InputError) as e:
        config_from_dict({"listen": "9470", "log": {"level": "loud"}, "kubernetes": {"enabled": "no"}}, "cfg.yaml")
    assert str(e.value).splitlines() == [
        "cfg.yaml: listen: expected HOST:PORT or :PORT (e.g. :9470), got '9470'",
        "cfg.yaml: log.level: expected one of debug, info, warning, error, got 'loud'",
        "cfg.yaml: kubernetes.enabled: expected true or false, got 'no'",
    ]


@pytest.mark.parametrize(("data", "line"), [
    ({"idel": {"threshold": 0.1}}, ("cfg.yaml: idel: unknown key (known here: collectors, cost, history, idle, "
     "inference, kubelet, kubernetes, listen, log, node_name, nvml, outcome, pricing, processes, recommend, saturation; "
     "did you mean 'idle'?)")),
    ({"nvml": {"intervall": "5s"}}, ("cfg.yaml: nvml.intervall: unknown key (known here: interval, timeout; "
     "did you mean 'interval'?)")),
    ({"nvml": {"zzz": 1}}, "cfg.yaml: nvml.zzz: unknown key (known here: interval, timeout)"),
])
def test_an_unknown_key_suggests_the_nearest_known_one(data: dict[str, object], line: str) -> None:
    with pytest.raises(InputError) as e:
        config_from_dict(data, "cfg.yaml")
    assert str(e.value) == line


def test_a_missing_config_file_says_so(tmp_path: Path) -> None:
    missing = str(tmp_path / "cfg.yaml")
    with pytest.raises(InputError) as e:
        load_config(missing)
    assert str(e.value) == f"{missing}: no such config file"


def test_a_value_that_is_not_a_mapping_is_one_problem_not_a_cascade() -> None:
    with pytest.raises(InputError) as e:
        config_from_dict({"inference": {"targets": ["http://a:1/metrics"]}, "idle": 5}, "cfg.yaml")
    assert str(e.value).splitlines() == [
        "cfg.yaml: inference.targets[0]: expected a mapping, got 'http://a:1/metrics'",
        "cfg.yaml: idle: expected a mapping, got 5",
    ]


def test_a_missing_required_key_names_the_key_and_its_expectation() -> None:
    with pytest.raises(InputError) as e:
        config_from_dict({"inference": {"targets": [{"namespace": "serving"}]}}, "cfg.yaml")
    assert str(e.value) == "cfg.yaml: inference.targets[0].url: missing required key, expected a string"


# --------------------------------------------------------------------------- collectors:
def test_collectors_default_to_enabled_with_max_age_three_intervals() -> None:
    c = Config()
    assert [name for name, _ in c.collectors] == list(COLLECTOR_NAMES)
    assert all(s == CollectorSettings(True, None) for _, s in c.collectors)
    assert c.max_age("nvml", 10.0) == 30.0
    assert config_from_dict({}, "cfg.yaml").collectors == c.collectors
    with pytest.raises(KeyError, match="nvml, podresources"):
        c.collector("bogus")


def test_collectors_max_age_and_enabled_are_read() -> None:
    c = config_from_dict({"collectors": {"nvml": {"max_age": "45s"}, "inference": {"enabled": False}}}, "cfg.yaml")
    assert c.collector("nvml") == CollectorSettings(True, 45.0)
    assert c.max_age("nvml", 10.0) == 45.0 and c.max_age("kubernetes", 15.0) == 45.0
    assert c.collector("inference").enabled is False
    assert c.collector("podresources") == CollectorSettings()
    assert [name for name, _ in c.collectors] == list(COLLECTOR_NAMES)


@pytest.mark.parametrize(("collectors", "line"), [
    ({"bogus": {}}, ("cfg.yaml: collectors.bogus: unknown key (known here: inference, kubernetes, nvml, "
     "podresources, processes)")),
    ({"nvml": {"enabled": "yes"}}, "cfg.yaml: collectors.nvml.enabled: expected true or false, got 'yes'"),
    ({"nvml": {"max_age": "soon"}}, ("cfg.yaml: collectors.nvml.max_age: expected a duration like 30s, 5m, 2h "
     "or 7d (> 0), got 'soon'")),
    ({"nvml": {"maxage": "1m"}}, ("cfg.yaml: collectors.nvml.maxage: unknown key (known here: enabled, max_age; "
     "did you mean 'max_age'?)")),
    ({"kubelet": {}}, ("cfg.yaml: collectors.kubelet: unknown key (known here: inference, kubernetes, nvml, "
     "podresources, processes; did you mean 'podresources'?)")),
])
def test_bad_collectors_settings_are_refused(collectors: dict[str, object], line: str) -> None:
    with pytest.raises(InputError) as e:
        config_from_dict({"collectors": collectors}, "cfg.yaml")
    assert str(e.value) == line


def test_the_old_enabled_switches_mean_the_collectors_ones() -> None:
    old = config_from_dict({"kubernetes": {"enabled": False}, "processes": {"enabled": False}}, "cfg.yaml")
    assert not old.collector("kubernetes").enabled and not old.collector("processes").enabled
    new = config_from_dict({"collectors": {"kubernetes": {"enabled": False}, "processes": {"enabled": False}}},
                           "cfg.yaml")
    assert not new.kubernetes.enabled and not new.processes.enabled  # what builds the sources reads
    # false in either place wins: the Helm chart sets processes.enabled: false without hostPID
    both = config_from_dict({"processes": {"enabled": False}, "collectors": {"processes": {"enabled": True}}},
                            "cfg.yaml")
    assert not both.processes.enabled and not both.collector("processes").enabled
    assert both.collector("nvml").enabled and both.kubernetes.enabled


# --------------------------------------------------------------------------- price files
def test_a_price_file_with_a_bad_row_names_the_price_file_and_the_key(tmp_path: Path) -> None:
    write(tmp_path, "my-prices.yaml", "instance_types:\n  x.large: {gpus: 8, gpu_model: L4, hourly: cheap}\n"
                                      "gpu_models:\n  L4: {gpu_hourly: 1.0}\n")
    cfg = write(tmp_path, "cfg.yaml", "pricing:\n  catalog_path: my-prices.yaml\n  spot_ration: 0.3\n")
    with pytest.raises(InputError) as e:
        load_config(cfg)
    prices = str(tmp_path / "my-prices.yaml")
    assert str(e.value).splitlines() == [
        f"{prices}: instance_types.x.large.hourly: expected a non-negative number, got 'cheap'",
        (f"{cfg}: pricing.spot_ration: unknown key (known here: catalog_path, default_gpu_hourly, "
        "gpu_hourly_by_instance_type, gpu_hourly_by_model, mig_cost_basis, reserved_ratio, spot_ratio; "
        "did you mean 'spot_ratio'?)"),
    ]


def test_every_mistake_of_a_price_file_is_reported() -> None:
    with pytest.raises(PricingConfigError) as e:
        parse_catalog("instance_types:\n  a: {gpus: 0, gpu_model: L4, hourly: 1}\n  b: {gpus: 1, gpu_model: ''}\n"
                      "gpu_models:\n  L4: {gpu_hourly: -1}\n", "p.yaml")
    assert str(e.value).splitlines() == [
        "p.yaml: instance_types.a.gpus: expected a positive whole number, got 0",
        "p.yaml: instance_types.b.gpu_model: expected a GPU model name, got ''",
        "p.yaml: gpu_models.L4.gpu_hourly: expected a non-negative number, got -1",
    ]


def test_pricing_config_error_is_the_same_mechanism() -> None:
    with pytest.raises(PricingConfigError) as e:
        pricing_config_from_dict({"spot_ratio": 0, "reserved_ratio": 2}, "cfg.yaml")
    assert isinstance(e.value, InputError) and isinstance(e.value, ValueError)
    assert [p.path for p in e.value.problems] == ["pricing.spot_ratio", "pricing.reserved_ratio"]
    assert e.value.key_path == e.value.path == "pricing.spot_ratio"


def test_a_missing_price_file_is_the_config_keys_mistake(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        config_from_dict({"pricing": {"catalog_path": "/nonexistent/prices.yaml"}}, "cfg.yaml")
    assert str(e.value) == ("cfg.yaml: pricing.catalog_path: expected a readable price file (no such file), "
                            "got '/nonexistent/prices.yaml'")


# --------------------------------------------------------------------------- scenarios
SCENARIO_TWO_MISTAKES = """\
name: bad
gpus: {model: H100-SXM-80GB, count: 2, colour: red}
pods:
  - name: p
    containers: [{name: c, gpus: 8, load: {pattern: constant, level: -0.5}}]
"""


def test_a_scenario_with_two_mistakes_reports_both(tmp_path: Path) -> None:
    path = write(tmp_path, "sc.yaml", SCENARIO_TWO_MISTAKES)
    with pytest.raises(InputError) as e:
        load_scenario(path)
    # gpus: 8 on a 2-GPU node is not reported: the first-fit only runs on a scenario without mistakes
    assert str(e.value).splitlines() == [
        f"{path}: gpus.colour: unknown key (known here: count, mig, minor_numbers, model, time_slicing, uuids)",
        f"{path}: pods[0].containers[0].load.level: expected a non-negative number, got -0.5",
    ]


def test_the_first_fit_check_runs_once_the_rest_is_clean(tmp_path: Path) -> None:
    path = write(tmp_path, "sc.yaml", SCENARIO_TWO_MISTAKES.replace(", colour: red", "").replace("-0.5", "0.5"))
    with pytest.raises(InputError) as e:
        load_scenario(path)
    assert str(e.value) == f"{path}: pods[0].containers[0].gpus: expected at most 2 free GPUs, got 8"


def test_a_bad_kind_or_pattern_does_not_guess_at_the_other_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "sc.yaml", "gpus: {model: H100-SXM-80GB, count: 1, mig: {0: [3g.40gb, 3g.4gb]}}\n"
                 "pods:\n  - {name: p, containers: [{load: {pattern: constnt, level: 0.5}}]}\n"
                 "faults:\n  - {kind: gpu_los, gpu: 0}\n")
    with pytest.raises(InputError) as e:
        load_scenario(path)
    assert str(e.value).splitlines() == [
        (f"{path}: gpus.mig.0[1]: expected a MIG profile of H100-SXM-80GB (1g.10gb, 1g.20gb, 2g.20gb, 3g.40gb, "
        "4g.40gb, 7g.80gb), got '3g.4gb'; did you mean '3g.40gb'?"),
        (f"{path}: pods[0].containers[0].load.pattern: expected one of idle, constant, diurnal, bursty, ramp, "
        "trace, got 'constnt'; did you mean 'constant'?"),
        (f"{path}: faults[0].kind: expected one of gpu_lost, xid, not_supported, nvml_init_failure, slow, "
        "source_down, got 'gpu_los'; did you mean 'gpu_lost'?"),
    ]


def test_an_unknown_builtin_scenario_suggests_the_nearest_name() -> None:
    with pytest.raises(InputError) as e:
        resolve("deom")
    assert str(e.value).startswith("deom: not a built-in scenario (demo, ")
    assert "did you mean 'demo'?" in str(e.value)
    assert e.value.got == "deom"


def test_an_unknown_extends_names_the_key_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "child.yaml", "extends: timeslise\n")
    with pytest.raises(InputError) as e:
        load_scenario(path)
    assert str(e.value).startswith(f"{path}: extends: expected a built-in scenario (")
    assert str(e.value).endswith(", got 'timeslise'; did you mean 'timeslice'?")


def test_a_missing_scenario_file_says_so(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.yaml")
    with pytest.raises(InputError) as e:
        load_scenario(missing)
    assert str(e.value) == f"{missing}: no such scenario file"


# --------------------------------------------------------------------------- the Reader itself
def test_reader_reads_never_raise_and_return_the_default() -> None:
    r = Reader({"a": "x", "b": -1, "c": "nope"}, "f.yaml")
    assert r.number("a", 3) == 3 and r.number("b", minimum=0) == 0 and r.duration("c", "5m") == 300.0
    assert r.str("missing") == "" and r.bool("also_missing", True) is True
    r.done()
    assert [p.path for p in r.problems] == ["a", "b", "c", "missing"]
    with pytest.raises(InputError) as e:
        r.raise_problems()
    assert len(e.value.problems) == 4 and str(e.value).count("\n") == 3


def test_input_error_keeps_its_one_problem_constructor() -> None:
    e = InputError("s.yaml", "pods[0].gpus", "at most 2 free GPUs", 8)
    assert str(e) == "s.yaml: pods[0].gpus: expected at most 2 free GPUs, got 8"
    assert e.problems == [Problem("s.yaml", "pods[0].gpus", "at most 2 free GPUs", 8)]


def test_a_huge_value_is_cut_short_in_the_message() -> None:
    r = Reader({"a": list(range(1000))}, "f.yaml")
    r.str("a")
    assert len(str(r.problems[0])) < 140 and str(r.problems[0]).endswith("…")


# --------------------------------------------------------------------------- through the real CLI
def test_check_config_prints_every_problem_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "cfg.yaml", THREE_MISTAKES)
    result = CliRunner().invoke(main, ["check-config", path])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    expected = [f"gpucap: error: {line.replace('cfg.yaml', path, 1)}" for line in THREE_LINES]
    assert result.stderr.splitlines() == expected
    assert result.stdout == ""


def test_check_config_in_a_subprocess_exits_2_without_a_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "cfg.yaml", THREE_MISTAKES + "collectors:\n  bogus: {}\n  nvml: {enabled: 'yes'}\n")
    result = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", path], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 5 and all(line.startswith(f"gpucap: error: {path}: ") for line in lines)
    for key in ("nvml.interval", "idle.treshold", "saturation.queue_fraction", "collectors.bogus",
                "collectors.nvml.enabled"):
        assert any(f": {key}: " in line for line in lines), key
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_check_scenario_prints_every_problem_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "sc.yaml", SCENARIO_TWO_MISTAKES)
    result = CliRunner().invoke(main, ["check-scenario", path])
    assert result.exit_code == 2
    assert [line.split(": ")[3] for line in result.stderr.splitlines()] == [
        "gpus.colour", "pods[0].containers[0].load.level"]


def test_the_documented_defaults_are_a_valid_config_equal_to_the_defaults() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert block is not None
    c = dataclasses.replace(config_from_dict(yaml.safe_load(block.group(1)), "docs"), path="")
    # the one difference: a socket written in the file is explicit (it wins over the simulator's)
    assert c == dataclasses.replace(Config(), kubelet=dataclasses.replace(Config().kubelet, explicit=True))
