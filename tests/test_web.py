"""The hardened HTTP server (agent/web.py): TLS and basic auth from an exporter-toolkit web config,
checked end to end with a real `curl` and a real Prometheus; bounded threads under slow clients;
request size and head deadline; the probes stay open."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from agent.web import MetricsServer, load_web_config
from collectors.schema import InputError
from tests.helpers import START, simulated

bcrypt = pytest.importorskip("bcrypt")
x509 = pytest.importorskip("cryptography.x509")

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "prometheus", "s3cret-scrape"
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


def make_cert(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (made at test time: no key in the repo)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpucap-test")])
    now = dt.datetime.now(dt.UTC)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "tls.crt", tmp / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def write_web_config(tmp: Path, tls: bool = True, auth: bool = True) -> Path:
    lines = []
    if tls:
        cert, key = make_cert(tmp)
        lines += ["tls_server_config:", f"  cert_file: {cert.name}", f"  key_file: {key.name}"]
    if auth:
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
        lines += ["basic_auth_users:", f"  {USER}: '{hashed}'"]
    path = tmp / "web.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def demo_state():
    with simulated("demo") as rt:
        yield rt.agent.run_until(rt.clock, START + 60, 10)


def serve(state, web=None, **kw) -> MetricsServer:
    return MetricsServer("127.0.0.1", 0, lambda: state, time.monotonic, web_config=web,
                         ready=lambda: (True, "nvml ok; podresources ok"), **kw).start()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], check=False,
                          capture_output=True, text=True, timeout=20)


@needs_curl
def test_tls_and_basic_auth_with_a_real_curl(tmp_path: Path, demo_state) -> None:
    web = load_web_config(str(write_web_config(tmp_path)))
    server = serve(demo_state, web)
    base = f"https://127.0.0.1:{server.port}"
    ca = str(tmp_path / "tls.crt")
    try:
        ok = curl("--cacert", ca, "-u", f"{USER}:{PASSWORD}", "-w", "\n%{http_code}", f"{base}/metrics")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.rstrip().endswith("200") and "gpucap_gpu_up" in ok.stdout
        # no credentials, a wrong password, an unknown user: 401 with a Basic challenge
        for creds in ([], ["-u", f"{USER}:wrong"], ["-u", f"nobody:{PASSWORD}"]):
            r = curl("--cacert", ca, *creds, "-o", "/dev/null", "-D", "-", f"{base}/metrics")
            assert r.returncode == 0 and " 401" in r.stdout.splitlines()[0], r.stdout
            assert 'WWW-Authenticate: Basic realm="gpucap"' in r.stdout
        # the probes stay open: kubelet probes carry no credentials
        for path in ("/healthz", "/readyz"):
            r = curl("--cacert", ca, "-w", "%{http_code}", "-o", "/dev/null", f"{base}{path}")
            assert r.stdout == "200", (path, r.stdout, r.stderr)
        # plain HTTP to the TLS port fails (no answer in clear text)
        r = curl("-u", f"{USER}:{PASSWORD}", f"http://127.0.0.1:{server.port}/metrics")
        assert r.returncode != 0 and "gpucap_gpu_up" not in r.stdout
        # an unknown certificate authority is refused by the client, as it should be
        assert curl(f"{base}/healthz").returncode != 0
    finally:
        server.stop()


def test_without_web_config_everything_is_plain_and_open(demo_state) -> None:
    server = serve(demo_state)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.status == 200 and b"gpucap_gpu_up" in r.read()
    finally:
        server.stop()


def test_a_real_prometheus_scrapes_through_tls_and_basic_auth(tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (make test installs Debian's package)")
    web_path = write_web_config(tmp_path)
    agent_port, prom_port = _free_port(), _free_port()
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--simulate", "demo", "--speed", "60",
         "--listen", f"127.0.0.1:{agent_port}", "--web.config.file", str(web_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: gpucap\n"
        "    scheme: https\n"
        f"    tls_config: {{ca_file: {tmp_path / 'tls.crt'}}}\n"
        f"    basic_auth: {{username: {USER}, password: {PASSWORD}}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{agent_port}']}}]\n"
        "  - job_name: no-auth\n"
        "    scheme: https\n"
        f"    tls_config: {{ca_file: {tmp_path / 'tls.crt'}}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{agent_port}']}}]\n")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def query(q: str) -> list:
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            with urllib.request.urlopen(url, timeout=2) as r:
                return json.loads(r.read())["data"]["result"]

        ups = _wait(lambda: len(query('gpucap_gpu_up{job="gpucap"} == 1')) == 8, 60, "8 GPUs through TLS + auth")
        assert ups
        targets = _wait(lambda: query('up{job="no-auth"}'), 30, "the unauthenticated job's up")
        assert targets[0]["value"][1] == "0"  # 401: Prometheus without the password gets nothing
        assert query('up{job="gpucap"}')[0]["value"][1] == "1"
    finally:
        prom.terminate()
        agent.terminate()
        prom.wait(10)
        agent.wait(10)


def test_slow_clients_cannot_pile_up_threads_or_starve_scrapes(demo_state) -> None:
    server = serve(demo_state, workers=4, read_timeout=1.0, busy_wait=0.2)
    before = threading.active_count()
    socks = []
    try:
        for _ in range(60):  # each sends half a request line and then nothing
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"GET /metr")
            socks.append(s)
        time.sleep(0.3)
        assert threading.active_count() <= before + 4 + 1, "a thread per connection"
        deadline = time.monotonic() + 10
        while True:  # the slow ones are cut at their head deadline; a scrape then gets through
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=3) as r:
                    assert r.status == 200
                break
            except (urllib.error.URLError, OSError, TimeoutError):
                assert time.monotonic() < deadline, "scrapes starved by slow clients"
    finally:
        for s in socks:
            s.close()
        server.stop()


def test_slow_loris_is_cut_at_the_head_deadline_not_by_idle_timeout(demo_state) -> None:
    server = serve(demo_state, read_timeout=1.0)
    try:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        t0 = time.monotonic()
        closed = False
        for ch in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 40:
            try:
                s.sendall(bytes([ch]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)  # every byte well inside any per-recv timeout
            if time.monotonic() - t0 > 3.0:
                break
        s.settimeout(2.0)
        try:
            closed = closed or s.recv(100) == b""
        except (ConnectionResetError, TimeoutError):
            closed = True
        assert closed and time.monotonic() - t0 < 4.0
        s.close()
    finally:
        server.stop()


def test_a_huge_request_head_or_a_body_is_refused(demo_state) -> None:
    server = serve(demo_state, max_request_bytes=4096)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 8000 + b"\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 431")
        req = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics", data=b"x" * 10, method="GET")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 413
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics",
                                                          data=b"", method="POST"), timeout=5)
        assert e.value.code == 405
    finally:
        server.stop()


def test_stop_answers_the_scrape_in_flight(demo_state) -> None:
    gate = threading.Event()

    def slow_state():
        gate.wait(5)
        return demo_state

    server = MetricsServer("127.0.0.1", 0, slow_state, time.monotonic).start()
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10).status))
    t.start()
    time.sleep(0.3)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    time.sleep(0.2)
    with pytest.raises(OSError):  # no new connections once stopping
        socket.create_connection(("127.0.0.1", server.port), timeout=1).recv(1)
    gate.set()
    t.join(5)
    stopper.join(5)
    assert got == [200]


def test_readyz_and_healthz_report_their_checks(demo_state) -> None:
    server = MetricsServer("127.0.0.1", 0, lambda: demo_state, time.monotonic,
                           ready=lambda: (False, "nvml no fresh reading; podresources ok")).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/readyz", timeout=5)
        assert e.value.code == 503 and b"nvml no fresh reading" in e.value.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
            assert r.status == 200  # not ready is no reason to restart the pod
    finally:
        server.stop()


@pytest.mark.parametrize("text, key", [
    ("basic_auth_users:\n  alice: hunter2\n", "basic_auth_users.alice"),
    ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n", "tls_server_config"),
    ("tls_server_config:\n  cert_file: a.crt\n", "tls_server_config.key_file"),
    ("tls_server_config:\n  client_auth_type: Sometimes\n  cert_file: a\n  key_file: b\n",
     "tls_server_config.client_auth_type"),
    ("basic_auth_user: {}\n", "basic_auth_user"),
])
def test_a_bad_web_config_names_file_and_key_and_never_shows_a_password(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "web.yml"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        load_web_config(str(path))
    assert str(path) in str(e.value) and key in str(e.value)
    assert "hunter2" not in str(e.value)
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--simulate", "demo", "--listen", "127.0.0.1:0",
                        "--web.config.file", str(path)], check=False, capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "hunter2" not in r.stderr
    assert r.stderr.startswith("gpucap: error: ")


def test_a_verified_password_is_not_rehashed_on_every_scrape(tmp_path: Path, demo_state) -> None:
    web = load_web_config(str(write_web_config(tmp_path, tls=False)))
    server = serve(demo_state, web)
    header = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    try:
        for _ in range(3):
            req = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics", headers={"Authorization": header})
            with urllib.request.urlopen(req, timeout=5) as r:
                assert r.status == 200
        assert len(server.auth._ok) == 1
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def test_the_chart_mounts_the_web_config_secret_and_probes_over_https() -> None:
    helm = pytest.importorskip("tests.test_helm", reason="helm-python-sdk not installed")
    objects = helm.render({"web": {"configSecret": "gpucap-web", "tls": True}})
    ds = helm.one(objects, "DaemonSet")
    c = helm.container(objects)
    assert c["args"][-2:] == ["--web.config.file", "/etc/gpucap/web/web-config.yml"]
    assert {"name": "web-config", "mountPath": "/etc/gpucap/web", "readOnly": True} in c["volumeMounts"]
    vol = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "web-config")
    assert vol["secret"]["secretName"] == "gpucap-web"
    assert c["livenessProbe"]["httpGet"]["scheme"] == c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    plain = helm.container(helm.render({}))
    assert "--web.config.file" not in plain["args"]
