"""The `demo` scenario's /metrics at a fixed simulated time, diffed against tests/golden/demo.metrics.

Update deliberately with `make golden` (GPUCAP_UPDATE_GOLDEN=1) and review the diff: every changed
line is a change users' dashboards and alerts will see.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from agent.cli import take_snapshot
from agent.config import Config
from agent.exposition import render
from agent.sources import build_runtime

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "demo.metrics")
START = 1767225600.0  # 2026-01-01T00:00:00Z
# wall-clock durations are the only non-deterministic values
_VOLATILE = re.compile(r"^(gpucap_collector_duration_seconds\{[^}]*\}) .*$", re.MULTILINE)


def demo_metrics(at: float = 45 * 60) -> str:
    rt = build_runtime(Config(), simulate="demo", realtime=False, start=START)
    try:
        state = take_snapshot(rt, at, True)
    finally:
        rt.close()
    return _VOLATILE.sub(r"\1 0.0", render(state))


def test_demo_metrics_match_golden() -> None:
    text = demo_metrics()
    if os.environ.get("GPUCAP_UPDATE_GOLDEN"):
        with open(GOLDEN, "w", encoding="utf-8") as f:
            f.write(text)
    with open(GOLDEN, encoding="utf-8") as f:
        golden = f.read()
    assert text == golden, "demo /metrics changed: review, then run `make golden`"


def test_golden_is_deterministic() -> None:
    assert demo_metrics(600) == demo_metrics(600)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make test installs it)")
def test_golden_passes_promtool_check_metrics() -> None:
    with open(GOLDEN, "rb") as f:
        out = subprocess.run(["promtool", "check", "metrics"], check=False, input=f.read(), capture_output=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


def test_every_metric_is_documented() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with open(GOLDEN, encoding="utf-8") as f:
        families = text_string_to_metric_families(f.read())
    names = {fam.name + ("_total" if fam.type == "counter" else "") for fam in families}
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "metrics.md"), encoding="utf-8") as f:
        doc = f.read()
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"add these to docs/metrics.md: {missing}"


def test_every_series_stays_under_20_labels_even_after_prometheus_adds_job_and_instance() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with open(GOLDEN, encoding="utf-8") as f:
        worst = max(len(s.labels) for fam in text_string_to_metric_families(f.read()) for s in fam.samples)
    assert worst + 2 < 20


def test_pod_label_allowlist_is_capped(tmp_path) -> None:
    from agent.config import MAX_EXTRA_POD_LABELS, config_from_dict
    from collectors.schema import InputError

    ok = {"kubernetes": {"pod_label_allowlist": [f"l{i}" for i in range(MAX_EXTRA_POD_LABELS)]}}
    assert len(config_from_dict(ok, "c.yaml").kubernetes.pod_label_allowlist) == MAX_EXTRA_POD_LABELS
    with pytest.raises(InputError, match="kubernetes.pod_label_allowlist: expected at most"):
        config_from_dict({"kubernetes": {"pod_label_allowlist": [f"l{i}" for i in range(11)]}}, "c.yaml")
