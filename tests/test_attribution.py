"""Attribution end to end (issue 3): the whole agent on simulated nodes, the kubelet a real gRPC server on a
unix socket, read back through the Prometheus text a scrape gets."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.exposition import MetricsServer, render
from collectors.proto import podresources_pb2 as pb
from collectors.proto import podresources_pb2_grpc as pb_grpc
from tests.helpers import (
    START,
    builtin_scenario,
    collected,
    http_get,
    parse,
    run_to,
    samples,
    simulated,
    value,
    walk,
    write_scenario,
)

OWNER = ("namespace", "pod", "container", "workload_kind", "workload", "team")
NO_OWNER = {k: "" for k in OWNER}

# Who holds what in collectors/simulated/scenarios/demo.yaml: pod → owner labels and number of GPUs.
DEMO_HOLDERS = {
    "notebook-alice-7d9f8-x2x9k": ("research", "jupyter", "Deployment", "notebook-alice", "research", 2),
    "chat-llama-70b-6b8c9-k7s2p": ("serving", "vllm", "Deployment", "chat-llama-70b", "ml-platform", 1),
    "assist-llama-1b-5f7d6-q8w4e": ("serving", "vllm", "Deployment", "assist-llama-1b", "ml-platform", 1),
    "finetune-llama-8b-0-worker-0": ("training", "trainer", "Job", "finetune-llama-8b", "foundation-models", 3),
}


def _owner(labels: dict[str, str]) -> tuple[str, ...]:
    return tuple(labels[k] for k in OWNER)


def _collector_ok(text: str, name: str) -> float:
    return value(text, "gpucap_collector_success", collector=name)


def _demo_attribution_is_right(text: str) -> None:
    m = parse(text)
    info = {lb["uuid"]: lb["gpu"] for lb, _ in samples(m, "gpucap_gpu_info")}
    assert len(info) == 8
    alloc = samples(m, "gpucap_gpu_allocation_ratio")
    per_pod = Counter(lb["pod"] for lb, _ in alloc)
    assert per_pod == {pod: h[5] for pod, h in DEMO_HOLDERS.items()}
    for lb, v in alloc:
        ns, container, kind, workload, team, _ = DEMO_HOLDERS[lb["pod"]]
        assert _owner(lb) == (ns, lb["pod"], container, kind, workload, team)
        assert v == 1.0  # a whole GPU
        assert info[lb["uuid"]] == lb["gpu"] and lb["gpu_instance"] == "" and lb["mig_profile"] == ""
    held = [lb["uuid"] for lb, _ in alloc]
    assert len(set(held)) == len(held) == 7  # no GPU held twice
    (free,) = set(info) - set(held)
    assert value(m, "gpucap_gpu_state", uuid=free, state="unallocated") == 1.0
    assert value(m, "gpucap_gpu_state", uuid=free, state="unallocated", **NO_OWNER) == 1.0
    for uuid in held:
        assert value(m, "gpucap_gpu_state", uuid=uuid, state="unallocated") == 0.0


# --- whole GPUs, MIG, time-slicing ------------------------------------------------------------------------
def test_demo_every_gpu_has_its_holder_and_the_free_one_is_unallocated() -> None:
    with simulated("demo") as rt:
        text = render(run_to(rt, 20))
    _demo_attribution_is_right(text)
    pods = samples(text, "gpucap_pod_info")
    assert {lb["pod"]: (lb["namespace"], lb["workload_kind"], lb["workload"], lb["team"]) for lb, _ in pods} == {
        pod: (h[0], h[2], h[3], h[4]) for pod, h in DEMO_HOLDERS.items()}
    assert len(pods) == 4 and all(v == 1.0 for _, v in pods)
    assert all(lb["node"] == "gpu-node-a1" for lb, _ in pods)


def test_snapshot_table_names_every_holder_and_the_unallocated_gpu() -> None:
    res = CliRunner().invoke(main, ["snapshot", "--simulate", "demo", "--wide", "--start", str(START)],
                             env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if "H100" in line]
    assert len(rows) == 8
    for pod, (ns, _, _, workload, team, n) in DEMO_HOLDERS.items():
        mine = [r for r in rows if f"{ns}/{pod}" in r]
        assert len(mine) == n and all(workload in r and team in r for r in mine)
    assert sum("unallocated" in r for r in rows) == 1


def test_mig_instances_go_to_the_pods_that_asked_for_their_profile() -> None:
    with simulated("mig") as rt:
        text = render(run_to(rt, 20))
    m = parse(text)
    alloc = samples(m, "gpucap_gpu_allocation_ratio")
    held = Counter((lb["pod"], lb["mig_profile"]) for lb, _ in alloc)
    assert held == {
        ("rerank-7b-69c4d-r2m8n", "3g.40gb"): 1,
        ("ocr-small-8f5b7-t6v2c", "2g.20gb"): 1,
        ("notebook-bob-5c8d9-h4j7k", "1g.10gb"): 2,
        ("eval-harness-28461-5xk2q", "1g.10gb"): 3,
        ("pretrain-13b-0", ""): 4,
    }
    mig_info = {lb["uuid"]: lb for lb, _ in samples(m, "gpucap_gpu_info") if lb["uuid"].startswith("MIG-")}
    assert len(mig_info) == 10
    for lb, v in alloc:
        assert v == 1.0
        if lb["mig_profile"]:
            inst = mig_info[lb["uuid"]]  # the kubelet's MIG device joined to the NVML instance
            assert (lb["gpu"], lb["gpu_instance"], lb["mig_profile"]) == (
                inst["gpu"], inst["gpu_instance"], inst["mig_profile"])
            assert lb["gpu_instance"] != ""
    team = {lb["pod"]: lb["team"] for lb, _ in alloc}
    assert team["rerank-7b-69c4d-r2m8n"] == "ml-platform" and team["pretrain-13b-0"] == "foundation-models"
    assert {lb["workload_kind"] for lb, _ in alloc if lb["pod"] == "eval-harness-28461-5xk2q"} == {"CronJob"}

    # the three 1g.10gb instances nobody asked for, and GPU 1's unpartitioned slice, are unallocated units
    unalloc = [lb for lb, v in samples(m, "gpucap_gpu_state", state="unallocated") if v == 1.0]
    assert Counter(lb["mig_profile"] for lb in unalloc if lb["mig_profile"]) == {"1g.10gb": 3, "unpartitioned": 1}
    (rest,) = [lb for lb in unalloc if lb["mig_profile"] == "unpartitioned"]
    parent = {lb["gpu"]: lb["uuid"] for lb, _ in samples(m, "gpucap_gpu_info", mig_profile="")}
    assert rest["gpu"] == "1" and rest["uuid"] == parent["1"]  # 6 of 7 slices partitioned on GPU 1 only
    assert _owner(rest) == _owner(NO_OWNER)
    price = value(m, "gpucap_unallocated_cost_dollars_per_hour", mig_profile="unpartitioned")
    assert price == pytest.approx(6.88 / 7, rel=1e-9)
    assert not samples(m, "gpucap_gpu_allocation_ratio", uuid=rest["uuid"])


def test_timesliced_l4_splits_activity_between_its_four_pods() -> None:
    with simulated("timeslice") as rt:
        checked = 0
        for st in walk(rt, 6 * 60, 30):  # across the classifier's bursts
            m = collected(st)
            gpu0 = value(m, "gpucap_gpu_info", gpu="0", mig_profile="")
            assert gpu0 == 1.0
            uuid = samples(m, "gpucap_gpu_info", gpu="0")[0][0]["uuid"]
            per_pod = {lb["pod"]: v for lb, v in samples(m, "gpucap_container_gpu_activity_ratio", uuid=uuid)}
            if not per_pod:
                continue  # first evaluation: no process sample yet
            checked += 1
            assert set(per_pod) == {"summarizer-0", "translator-6d5f-abc12", "classifier-6d5f-def34",
                                    "sandbox-carol"}
            assert len(set(per_pod.values())) == 4, per_pod  # not the device's value copied to every pod
            assert per_pod["summarizer-0"] == pytest.approx(0.35, abs=0.02)
            assert per_pod["translator-6d5f-abc12"] == pytest.approx(0.2, abs=0.02)
            assert per_pod["sandbox-carol"] == pytest.approx(0.0, abs=0.02)
            unattributed = value(m, "gpucap_gpu_unattributed_activity_ratio", uuid=uuid)
            assert unattributed == pytest.approx(0.1, abs=0.02)  # the stray host process
            device = value(m, "gpucap_gpu_utilization_ratio", uuid=uuid)
            assert sum(per_pod.values()) + unattributed == pytest.approx(device, abs=1e-6)
            # each pod holds a quarter of the GPU, as a share unit of its own
            shares = samples(m, "gpucap_gpu_allocation_ratio", gpu="0")
            assert sorted(v for _, v in shares) == [0.25] * 4
            assert len({lb["uuid"] for lb, _ in shares}) == 4
            assert all(lb["uuid"].startswith(uuid + "::") for lb, _ in shares)
            stray = samples(m, "gpucap_gpu_unallocated_processes", uuid=uuid)
            assert stray == [({**stray[0][0], "namespace": "", "pod": ""}, 1.0)]
        assert checked >= 10


# --- kubelet trouble -----------------------------------------------------------------------------------
def test_kubelet_down_keeps_gpu_metrics_and_attribution_returns(tmp_path: Path) -> None:
    sc = {"extends": "demo", "faults": [{"kind": "source_down", "source": "kubelet", "at": 0, "until": "2m"}]}
    with simulated(write_scenario(tmp_path, "kubelet-down", sc)) as rt:
        down = render(run_to(rt, 60))
        assert _collector_ok(down, "podresources") == 0.0
        assert _collector_ok(down, "nvml") == 1.0
        assert [v for _, v in samples(down, "gpucap_gpu_up")] == [1.0] * 8
        assert len(samples(down, "gpucap_gpu_utilization_ratio")) == 8
        assert samples(down, "gpucap_gpu_allocation_ratio") == []  # nothing known yet: no owner invented
        back = None
        for st in walk(rt, 2 * 60 + 300, 10):  # back up at 2m; retried within the longest backoff
            text = render(st)
            if st.time >= START + 120 and _collector_ok(text, "podresources") == 1.0:
                back = text
                break
        assert back is not None, "attribution did not return within 5 minutes of the kubelet coming back"
    _demo_attribution_is_right(back)


def test_kubelet_set_down_by_hand_then_back() -> None:
    with simulated("demo") as rt:
        run_to(rt, 10)
        rt.env.kubelet.set_down(True)
        for _ in range(9):
            rt.clock.advance(10)
            text = render(rt.agent.step(rt.clock.now()))
            assert _collector_ok(text, "podresources") == 0.0
            assert [v for _, v in samples(text, "gpucap_gpu_up")] == [1.0] * 8
        rt.env.kubelet.set_down(False)
        back = None
        for _ in range(30):
            rt.clock.advance(10)
            text = render(rt.agent.step(rt.clock.now()))
            if _collector_ok(text, "podresources") == 1.0:
                back = text
                break
        assert back is not None, "the kubelet was not read again within 5 minutes of coming back"
    _demo_attribution_is_right(back)


def test_reply_over_5mib_is_attributed_correctly() -> None:
    with simulated("demo") as rt:
        rt.env.kubelet.set_padding_pods(600)
        with grpc.insecure_channel(f"unix://{rt.env.kubelet_socket}",
                                   options=[("grpc.max_receive_message_length", 2**30)]) as ch:
            reply = pb_grpc.PodResourcesListerStub(ch).List(pb.ListPodResourcesRequest(), timeout=10)
        assert reply.ByteSize() > 5 * 2**20
        text = render(run_to(rt, 10))
    assert _collector_ok(text, "podresources") == 1.0
    _demo_attribution_is_right(text)
    assert value(text, "gpucap_podresources_unmatched_devices") == 0.0  # padding is not an nvidia.com device


def test_pod_that_ended_has_no_series_at_the_next_evaluation(tmp_path: Path) -> None:
    pods = builtin_scenario("demo")["pods"]
    (notebook,) = [p for p in pods if p["name"].startswith("notebook-alice")]
    notebook["end"] = "10m"
    path = write_scenario(tmp_path, "notebook-ends", {"extends": "demo", "pods": pods})
    families = ("gpucap_gpu_allocation_ratio", "gpucap_pod_info", "gpucap_gpu_state", "gpucap_cost_dollars_total",
                "gpucap_allocated_cost_dollars_per_hour", "gpucap_gpu_idle_reserved_seconds")
    with simulated(path) as rt:
        before = parse(render(run_to(rt, 590)))
        for name in families:
            assert samples(before, name, pod=notebook["name"]), name
        held = {lb["uuid"] for lb, _ in samples(before, "gpucap_gpu_allocation_ratio", pod=notebook["name"])}
        assert len(held) == 2
        rt.clock.advance(10)
        after_text = render(rt.agent.step(rt.clock.now()))  # the first evaluation at 10m
    after = parse(after_text)
    assert notebook["name"] not in after_text
    for name in families:
        assert samples(after, name, pod=notebook["name"]) == [], name
    for uuid in held:  # its GPUs are free now, and say so
        assert value(after, "gpucap_gpu_state", uuid=uuid, state="unallocated") == 1.0
        assert value(after, "gpucap_gpu_processes", uuid=uuid) == 0.0
        assert samples(after, "gpucap_gpu_unallocated_processes", uuid=uuid) == []
    assert len(samples(after, "gpucap_pod_info")) == 3


# --- scrapes read cached state only ---------------------------------------------------------------------
def _count_calls(obj: Any, attr: str, counter: Counter, key: str) -> None:
    inner = getattr(obj, attr)

    def counted(*a: Any, **kw: Any) -> Any:
        counter[key] += 1
        return inner(*a, **kw)

    setattr(obj, attr, counted)


def test_scrapes_never_call_nvml_the_kubelet_or_the_api() -> None:
    calls: Counter = Counter()
    with simulated("demo") as rt:
        _count_calls(rt.env.kubelet, "list_fn", calls, "kubelet")
        _count_calls(rt.agent.sources["kubernetes"].collector, "collect", calls, "kubernetes")
        run_to(rt, 20)
        assert calls["kubelet"] > 0 and calls["kubernetes"] > 0  # the counters do see the agent's calls
        server = MetricsServer("127.0.0.1", 0, lambda: rt.agent.state, lambda: rt.agent.last_evaluation_real)
        server.start()
        try:
            url = f"http://127.0.0.1:{server.port}/metrics"
            rt.env.kubelet.set_delay(3.0)
            nvml_before, before = rt.env.nvml.calls, Counter(calls)
            for _ in range(5):
                t0 = time.perf_counter()
                status, text = http_get(url)
                assert status == 200 and time.perf_counter() - t0 < 1.0
                assert value(text, "gpucap_gpu_allocation_ratio", gpu="4") == 1.0
            assert rt.env.nvml.calls == nvml_before and calls == before

            # while a collection is stuck in the slow kubelet, scrapes still answer at once
            rt.clock.advance(10)
            worker = threading.Thread(target=rt.agent.step, args=(rt.clock.now(),), daemon=True)
            worker.start()
            deadline = time.monotonic() + 2.0
            while rt.env.nvml.calls == nvml_before and time.monotonic() < deadline:
                time.sleep(0.01)  # nvml is collected first; the kubelet call starts right after
            scraped_while_stuck = 0
            while worker.is_alive() and scraped_while_stuck < 5:
                t0 = time.perf_counter()
                status, text = http_get(url)
                assert status == 200 and time.perf_counter() - t0 < 1.0
                assert "gpucap_gpu_up" in text
                scraped_while_stuck += worker.is_alive()  # the step (normally milliseconds) is still waiting
            assert scraped_while_stuck == 5
        finally:
            server.stop()
    worker.join(10)  # closing the kubelet ended the stuck call
    assert not worker.is_alive()
