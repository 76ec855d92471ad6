"""Property: on any simulated node, under any mix of faults the scenario format offers, the dollars by state
add up to the node's GPU price at every evaluation, and no unit is free without a fresh kubelet reading."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import STATES
from tests.helpers import simulated, walk, write_scenario

H100_PROFILES = ["1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"]
SLICES = {"1g.10gb": 1, "2g.20gb": 2, "3g.40gb": 3, "4g.40gb": 4, "7g.80gb": 7}


@st.composite
def mig_layout(draw) -> list[str]:
    out: list[str] = []
    used = 0
    for _ in range(draw(st.integers(1, 4))):
        prof = draw(st.sampled_from(H100_PROFILES))
        if used + SLICES[prof] > 7 or (prof in ("4g.40gb", "7g.80gb") and used):
            break
        out.append(prof)
        used += SLICES[prof]
    return out or ["1g.10gb"]


@st.composite
def scenarios(draw) -> dict:
    count = draw(st.integers(1, 4))
    shared = draw(st.booleans())
    gpus: dict = {"model": "H100-SXM-80GB", "count": count}
    mig: dict[int, list[str]] = {}
    if shared:
        gpus["time_slicing"] = {"replicas": draw(st.integers(2, 4))}
    else:
        for i in range(count):
            if draw(st.booleans()):
                mig[i] = draw(mig_layout())
        if mig:
            gpus["mig"] = mig
    full = [i for i in range(count) if i not in mig]
    capacity = len(full) * (gpus.get("time_slicing", {}).get("replicas", 1))
    pods = []
    free_mig = [p for layout in mig.values() for p in layout]
    for n in range(draw(st.integers(0, 4))):
        container: dict = {"name": "main", "load": draw(st.sampled_from([
            {"pattern": "idle"}, {"pattern": "constant", "level": 0.6},
            {"pattern": "bursty", "level": 0.0, "burst_level": 0.9, "every": "4m", "duration": "1m"}]))}
        if free_mig and draw(st.booleans()):
            prof = free_mig.pop(0)
            container["mig"] = {prof: 1}
        elif capacity:
            want = draw(st.integers(1, min(2, capacity)))
            capacity -= want
            container["gpus"] = want
        pod = {"namespace": "ns", "name": f"pod-{n}", "labels": {"team": f"t{n % 2}"}, "containers": [container]}
        if draw(st.booleans()):
            pod["start"] = f"{draw(st.integers(0, 6))}m"
        if draw(st.booleans()):
            pod["end"] = f"{draw(st.integers(7, 12))}m"
        pods.append(pod)
    faults = []
    for kind in draw(st.lists(st.sampled_from(["kubelet_down", "gpu_lost", "xid", "kube_down", "nvml_slow"]),
                              max_size=3, unique=True)):
        at = draw(st.integers(0, 8))
        until = at + draw(st.integers(1, 5))
        if kind == "kubelet_down":
            faults.append({"kind": "source_down", "source": "kubelet", "at": f"{at}m", "until": f"{until}m"})
        elif kind == "kube_down":
            faults.append({"kind": "source_down", "source": "kubernetes", "at": f"{at}m", "until": f"{until}m"})
        elif kind == "gpu_lost":
            faults.append({"kind": "gpu_lost", "gpu": draw(st.integers(0, count - 1)), "at": f"{at}m"})
        elif kind == "xid":
            faults.append({"kind": "xid", "gpu": draw(st.integers(0, count - 1)), "xid": 79, "at": f"{at}m"})
        else:
            faults.append({"kind": "slow", "source": "nvml", "delay": "1s", "at": f"{at}m", "until": f"{until}m"})
    return {
        "node": {"name": "prop-node", "labels": {"node.kubernetes.io/instance-type": "p5.48xlarge"}},
        "gpus": gpus, "namespaces": {"ns": {"labels": {"team": "t"}}}, "pods": pods, "faults": faults,
    }


@pytest.mark.parametrize("basis", ["compute", "memory"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenarios())
def test_states_add_up_to_the_node_price_at_every_evaluation(sc: dict, basis: str) -> None:
    from agent.config import Config
    from collectors.pricing import pricing_config_from_dict

    cfg = Config(pricing=pricing_config_from_dict({"mig_cost_basis": basis}, "test"))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_scenario(Path(tmp), "prop", sc)
        with simulated(path, cfg) as rt:
            n = len(rt.env.sc.gpus)
            for state in walk(rt, 12 * 60, 60):
                by_state = dict.fromkeys(STATES, 0.0)
                for v in state.units:
                    by_state[v.state] += v.row.hourly_price
                node = sum({v.row.gpu: v.row.parent_hourly_price for v in state.units}.values())
                assert len({v.row.gpu for v in state.units}) == n, "a GPU's units vanished"
                assert sum(by_state.values()) == pytest.approx(node, abs=1e-9)
                assert node == pytest.approx(n * 55.04 / 8, rel=1e-12)
                kubelet = next(c for c in state.collectors if c.name == "podresources")
                if kubelet.data_age is None:
                    assert by_state["unallocated"] == 0.0 and by_state["active"] == 0.0
                    assert by_state["idle_reserved"] == 0.0
