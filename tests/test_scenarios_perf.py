"""The performance reference nodes (`large`, `shared`) and what keeps the agent cheap on them:
NVML calls per cycle bounded per unit, static facts read once, and /metrics encoded once per state
with content negotiation (text, OpenMetrics, gzip) still right. Timings live in bench/, not here."""

from __future__ import annotations

import gzip
import threading
import urllib.request
from collections import Counter

from agent import exposition
from agent.exposition import MetricsServer, encode_for, render
from tests.helpers import collected, parse, run_to, samples, simulated, value

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def _calls(rt) -> Counter:  # type: ignore[no-untyped-def]
    return Counter({fn: st.count for fn, st in rt.agent.sources["nvml"].collector.calls.items()})


# --- the scenarios ----------------------------------------------------------------------------------
def test_large_is_56_mig_units_held_by_56_pods_with_8_vllm_servers() -> None:
    with simulated("large") as rt:
        st = run_to(rt, 120)
    m = collected(st)
    units = [v for v in st.units if v.row.mig_profile]
    assert len(st.units) == 56 and len(units) == 56
    assert {v.row.mig_profile for v in units} == {"1g.10gb"}
    assert all(v.row.allocated for v in st.units), "every slice is held by a pod"
    assert len({v.row.owner.pod for v in st.units}) == 56
    assert len(samples(m, "gpucap_gpu_up")) == 64  # 8 parents + 56 instances, all answering
    assert all(v == 1.0 for _, v in samples(m, "gpucap_gpu_up"))
    servers = samples(m, "gpucap_inference_running_requests", server="vllm")
    assert len(servers) == 8 and {lb["pod"] for lb, _ in servers} == {f"chat-small-{i}" for i in range(8)}
    # a slice costs 1/7 of its GPU: the node's price is 8 GPUs' worth
    per_gpu = {}
    for v in st.units:
        per_gpu[v.row.gpu] = per_gpu.get(v.row.gpu, 0.0) + v.row.hourly_price
    assert len(per_gpu) == 8 and max(per_gpu.values()) - min(per_gpu.values()) < 1e-9


def test_shared_is_80_time_sliced_shares_each_with_its_pods_own_processes() -> None:
    with simulated("shared") as rt:
        st = run_to(rt, 120)
    m = collected(st)
    assert len(st.units) == 80 and all(v.row.allocated for v in st.units)
    assert len({v.row.owner.pod for v in st.units}) == 80
    assert {v.row.uuid.rsplit("::", 1)[1] for v in st.units} == {str(i) for i in range(10)}
    use = samples(m, "gpucap_container_gpu_memory_used_bytes")
    assert len({lb["pod"] for lb, _ in use}) == 80, "every pod's processes are found on its GPU"
    assert all(v > 0 for _, v in use)
    assert value(m, "gpucap_podresources_unmatched_devices") == 0


# --- NVML: cheap per cycle ----------------------------------------------------------------------
def test_nvml_reads_at_most_8_calls_per_unit_per_cycle_on_large() -> None:
    with simulated("large") as rt:
        run_to(rt, 60)
        before = _calls(rt)
        cycles = 30  # a whole rediscovery period, so the periodic MIG re-enumeration is counted too
        run_to(rt, 60 + cycles * 10)
        spent = _calls(rt) - before
        units = len(rt.agent.state.units)
    per_cycle = sum(spent.values()) / cycles
    assert per_cycle <= 8 * units, (per_cycle, spent.most_common(8))
    # static facts are not read every cycle
    for fn in ("nvmlDeviceGetName", "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetMaxClockInfo",
               "nvmlDeviceGetAttributes", "nvmlGpmSampleAlloc", "nvmlGpmSampleFree"):
        assert spent[fn] <= 64, (fn, spent[fn])
    assert spent["nvmlGpmMetricsGet"] == cycles * 64  # one per unit (and parent) per cycle


def test_static_facts_are_read_again_after_the_driver_comes_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import write_scenario

    sc = {"extends": "mig", "faults": [{"kind": "source_down", "source": "nvml", "at": "1m", "until": "2m"}]}
    with simulated(write_scenario(tmp_path, "nvml-blip", sc)) as rt:
        run_to(rt, 50)
        first = _calls(rt)["nvmlDeviceGetEnforcedPowerLimit"]
        st = run_to(rt, 200)
        again = _calls(rt)["nvmlDeviceGetEnforcedPowerLimit"]
    assert first == 8 and again == 16, "read once per GPU, and once more after the re-init"
    assert len([d for d in st.devices if d.mig_profile]) == 10 and all(d.up for d in st.devices)
    assert all(d.power_limit_watts for d in st.devices if not d.is_mig)


# --- /metrics: encoded once per state -------------------------------------------------------------
def test_one_state_is_encoded_once_and_a_new_state_gives_new_bytes() -> None:
    with simulated("demo") as rt:
        a = run_to(rt, 60)
        n0 = exposition.cache_stats()["encodings"]
        body1, _ = encode_for(a)
        body2, _ = encode_for(a)
        assert body1 is body2 and render(a).encode() == body1
        assert exposition.cache_stats()["encodings"] == n0 + 1
        b = run_to(rt, 600)
    body3, _ = encode_for(b)
    assert body3 != body1
    cost = "gpucap_cost_dollars_total"
    assert sum(v for _, v in samples(body3.decode(), cost)) > sum(v for _, v in samples(body1.decode(), cost))


def test_a_new_states_body_is_byte_for_byte_what_prometheus_client_encodes() -> None:
    """Unchanged families are reused from the last encoding, changed ones encoded again: the body is
    still exactly prometheus_client's encoding of the whole state, in both formats."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

    with simulated("demo") as rt:
        states = [run_to(rt, t) for t in (60, 70, 600, 900, 4000)]  # the notebook turns idle reserved at 15 m
    r0, e0 = exposition._families.reused, exposition._families.encoded
    for st in states:
        reg = exposition.make_registry(lambda st=st: st)
        assert encode_for(st, "text/plain", "")[0] == generate_latest(reg)
        assert encode_for(st, OPENMETRICS, "")[0] == generate_openmetrics(reg)
    reused, encoded = exposition._families.reused - r0, exposition._families.encoded - e0
    assert reused > 0 and encoded > 0, (reused, encoded)  # both paths ran


def test_text_openmetrics_and_gzip_are_each_right_for_the_same_state() -> None:
    with simulated("demo") as rt:
        st = run_to(rt, 60)
    text, th = encode_for(st, "text/plain", "")
    om, oh = encode_for(st, "application/openmetrics-text; version=1.0.0", "")
    gz, gh = encode_for(st, "", "gzip, deflate")
    omgz, omgh = encode_for(st, "application/openmetrics-text", "GZIP")
    assert dict(th)["Content-Type"].startswith("text/plain; version=0.0.4") and "Content-Encoding" not in dict(th)
    assert dict(oh)["Content-Type"].startswith(OPENMETRICS) and om.endswith(b"# EOF\n") and not text.endswith(b"# EOF\n")
    assert dict(gh)["Content-Encoding"] == "gzip" and gzip.decompress(gz) == text
    assert dict(omgh)["Content-Type"].startswith(OPENMETRICS) and gzip.decompress(omgz) == om
    assert b"gpucap_cost_dollars_total{" in om and b"gpucap_cost_dollars_total{" in text
    assert parse(text.decode()).keys() >= {"gpucap_gpu_up", "gpucap_build_info"}


def test_scrapes_over_http_follow_the_published_state_and_share_one_encoding() -> None:
    with simulated("demo") as rt:
        current = {"state": run_to(rt, 60)}
        server = MetricsServer("127.0.0.1", 0, lambda: current["state"], lambda: 0.0).start()
        url = f"http://127.0.0.1:{server.port}/metrics"
        try:
            current["state"] = run_to(rt, 120)  # a fresh state no one has encoded yet
            n0 = exposition.cache_stats()["encodings"]
            bodies: list[bytes] = []

            def scrape() -> None:
                req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
                with urllib.request.urlopen(req, timeout=20) as r:
                    assert r.headers["Content-Encoding"] == "gzip"
                    bodies.append(gzip.decompress(r.read()))

            threads = [threading.Thread(target=scrape) for _ in range(10)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(bodies) == 10 and len(set(bodies)) == 1
            assert exposition.cache_stats()["encodings"] == n0 + 1, "10 concurrent scrapes, one encoding"
            first = bodies[0]
            current["state"] = run_to(rt, 900)  # the idle notebook becomes idle reserved
            with urllib.request.urlopen(url, timeout=20) as r:
                later = r.read()
        finally:
            server.stop()
    idle = "gpucap_idle_reserved_cost_dollars_per_hour"
    assert sum(v for _, v in samples(first.decode(), idle)) == 0.0
    assert later != first
