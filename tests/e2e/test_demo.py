"""End to end: ``kubemtls demo`` runs the whole system and every outcome is observed.

The slow tests share one demo run (``demo_run``): the emulated API server with admission, the
real operator and webhook, pods run from their patched specs with real sidecars, and the
mock EHR. The fast tests pin down the demo's own parts that the scenes rely on: the EHR
sends real TLS alerts on the wire, serves valid FHIR, and the demo kubelet publishes files
the way kubelet does.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import secrets
import shutil
import socket
import subprocess

import pytest
import testkit
from kubemtls_operator.demo import ehr, netns, pods, report, scenes, stage, volumes

EXPECTED_SCENES = list(scenes.NAMES)


# --- the demo, end to end (slow) ---------------------------------------------------------


@pytest.mark.slow
def test_every_scene_passes(demo_run: report.Result) -> None:
    statuses = {s.name: s.status for s in demo_run.scenes}
    assert statuses == dict.fromkeys(EXPECTED_SCENES, "pass"), "\n".join(demo_run.output)


@pytest.mark.slow
def test_runs_in_network_namespaces_when_root(demo_run: report.Result) -> None:
    if os.geteuid() != 0:
        # Not root: the demo runs on loopback instead (the other e2e tests cover that run).
        # CI runs as root, so there this test always runs.
        pytest.skip("network namespaces need root")
    assert demo_run.mode == "network namespaces"


@pytest.mark.slow
def test_app_request_reaches_ehr_with_pod_identity(demo_run: report.Result) -> None:
    scene = demo_run.scene("request")
    assert scene.data["identity"] == "spiffe://cluster.local/ns/clinic/sa/ehr-client"
    assert scene.data["serial"]


@pytest.mark.slow
def test_direct_request_without_sidecar_gets_certificate_required(demo_run: report.Result) -> None:
    scene = demo_run.scene("no-sidecar")
    assert scene.data["alert"] == "certificate_required"
    assert "alert certificate required" in scene.data["client"]


@pytest.mark.slow
def test_peer_api_gets_mesh_client_identity_and_refuses_no_certificate(
    demo_run: report.Result,
) -> None:
    scene = demo_run.scene("peer-api")
    assert scene.data["server"] == "spiffe://cluster.local/ns/clinic/sa/peer-api"
    assert "URI=spiffe://cluster.local/ns/clinic/sa/batch-export" in scene.data["xfcc"]
    assert scene.data["alert"] == "certificate_required"


@pytest.mark.slow
def test_renewal_under_traffic_fails_no_request(demo_run: report.Result) -> None:
    scene = demo_run.scene("renewal")
    assert scene.data["before"] != scene.data["after"]
    assert scene.data["requests"] > 0
    assert scene.data["failed"] == 0, scene.data["errors"]


@pytest.mark.slow
def test_revoked_pod_rekeys_without_failed_requests(demo_run: report.Result) -> None:
    scene = demo_run.scene("revocation")
    assert scene.data["after"] != scene.data["revoked"]
    assert scene.data["recorded"]  # status.revocations
    assert scene.data["in_crl"]  # the CRL the EHR enforces lists the old serial
    assert scene.data["before_ehr_crl_fetch"]  # re-keyed before the EHR's own CRL fetch
    assert scene.data["rekey_seconds"] < 35  # the sidecar polls /v1/trust every 30 s
    assert scene.data["failed"] == 0, scene.data["errors"]


@pytest.mark.slow
def test_revoked_file_identity_is_refused_with_certificate_revoked(demo_run: report.Result) -> None:
    scene = demo_run.scene("file-identity")
    assert scene.data["identity"] == "spiffe://cluster.local/ns/clinic/sa/batch-export"
    assert scene.data["alert"] == "certificate_revoked"


@pytest.mark.slow
def test_nothing_is_left_behind(demo_run: report.Result) -> None:
    result = demo_run
    assert result.leftovers == []
    assert result.pids, "the demo started no process?"
    assert stage.live_processes(result.pids) == []
    assert not pathlib.Path(result.workdir).exists()
    if os.geteuid() == 0:
        assert netns.leftovers(result.run_id) == []


@pytest.mark.slow
def test_demo_finishes_within_its_budget(demo_run: report.Result) -> None:
    # Typically 35-45 s; the revocation waits for the sidecar's 30 s /v1/trust poll.
    assert demo_run.seconds < 90, "\n".join(demo_run.output)


# --- the demo's own parts (fast) ---------------------------------------------------------


@pytest.fixture
def running_ehr(test_pki: testkit.TestPKI, tmp_path: pathlib.Path) -> ehr.MockEHR:
    server = test_pki.leaf("ehr", "ehr", dns_names=("fhir.ehr.example.org",)).write(tmp_path)
    revoked = test_pki.leaf("clinic", "revoked")
    trust = test_pki.trust_dir(tmp_path / "trust", revoked=(revoked.cert,))
    revoked.write(tmp_path / "revoked")
    server_ehr = ehr.MockEHR(
        host="127.0.0.1",
        port=0,
        cert_file=server / "tls.crt",
        key_file=server / "tls.key",
        trust=lambda: ((trust / "ca.crt").read_bytes(), (trust / "crl.pem").read_bytes()),
    )
    server_ehr.start()
    yield server_ehr  # type: ignore[misc]
    server_ehr.stop()


def _s_client(port: int, *args: str) -> str:
    proc = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", *args],
        input=b"GET /fhir/Patient/123 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        capture_output=True,
        timeout=20,
        check=False,
    )
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_ehr_sends_real_tls_alerts(
    running_ehr: ehr.MockEHR,
    test_pki: testkit.TestPKI,
    other_pki: testkit.TestPKI,
    tmp_path: pathlib.Path,
) -> None:
    good = test_pki.leaf("clinic", "ehr-client").write(tmp_path / "good")
    stranger = other_pki.leaf("clinic", "stranger").write(tmp_path / "stranger")
    port = running_ehr.port

    def key_pair(d: pathlib.Path) -> tuple[str, ...]:
        return ("-cert", str(d / "tls.crt"), "-key", str(d / "tls.key"))

    assert "alert certificate required" in _s_client(port)
    assert "alert unknown ca" in _s_client(port, *key_pair(stranger))
    assert "alert certificate revoked" in _s_client(port, *key_pair(tmp_path / "revoked"))
    answer = _s_client(port, *key_pair(good))
    assert "HTTP/1.1 200 OK" in answer
    assert "X-Client-Identity: spiffe://cluster.local/ns/clinic/sa/ehr-client" in answer
    alerts = [e.alert for e in running_ehr.events if not e.ok]
    assert alerts == ["certificate_required", "unknown_ca", "certificate_revoked"]


def _reaches(pod: netns.PodNet, host: str, port: int) -> bool:
    """Whether a TCP connection from inside the pod's namespace to host:port completes."""
    probe = f"exec 3<>/dev/tcp/{host}/{port}"
    argv = [*pod.exec_prefix(), "timeout", "3", "bash", "-c", probe]
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


@pytest.mark.netns
@pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))
def test_bridge_keeps_its_mac_when_a_port_with_a_lower_mac_joins() -> None:
    # A Linux bridge takes the lowest MAC of its ports unless it has one of its own. The demo
    # adds batch-export half-way; had the host IP's MAC changed then, the pods that cached
    # the old one would time out talking to the EHR until their ARP entry expired.
    net = netns.Network(secrets.token_hex(2))
    low = f"kmt{net.run_id}lo"
    listener = socket.socket()
    try:
        net.create()
        pods_ = [net.add_pod("a"), net.add_pod("b")]
        listener.bind((net.host_ip, 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        mac = pathlib.Path(f"/sys/class/net/{net.bridge}/address").read_text().strip()
        assert mac == netns.bridge_mac(net.run_id)
        assert all(_reaches(p, net.host_ip, port) for p in pods_)  # ARP caches filled
        subprocess.run(
            ["ip", "link", "add", low, "address", "02:00:00:00:00:01", "type", "veth",
             "peer", "name", f"{low}p"],
            check=True,
        )  # fmt: skip
        subprocess.run(["ip", "link", "set", low, "master", net.bridge, "up"], check=True)
        assert pathlib.Path(f"/sys/class/net/{net.bridge}/address").read_text().strip() == mac
        assert all(_reaches(p, net.host_ip, port) for p in pods_)
    finally:
        listener.close()
        subprocess.run(["ip", "link", "del", low], capture_output=True, check=False)
        assert net.destroy() == []
    assert netns.leftovers(net.run_id) == []


def test_ehr_resources_are_valid_fhir() -> None:
    ehr.validate_resources()  # raises on an invalid resource
    assert ehr.CAPABILITY["fhirVersion"] == "4.0.1"


def test_atomic_write_swaps_data_symlink(tmp_path: pathlib.Path) -> None:
    assert volumes.atomic_write(tmp_path, {"token": b"one"})
    first = os.readlink(tmp_path / "..data")
    assert os.readlink(tmp_path / "token") == "..data/token"
    assert not volumes.atomic_write(tmp_path, {"token": b"one"})  # unchanged: no swap
    assert volumes.atomic_write(tmp_path, {"token": b"two"})
    assert os.readlink(tmp_path / "..data") != first
    assert not (tmp_path / first).exists()  # the old generation is gone
    assert (tmp_path / "token").read_bytes() == b"two"


def test_loopback_remap_rewrites_ports_paths_and_upstreams() -> None:
    remap = pods.Remap(
        ports={15001: 41001, 8443: 41443, 8080: 41080},
        upstreams={"fhir.ehr.example.org:443": "127.0.0.1:40443"},
        paths={"/var/run/kubemtls/trust": "/tmp/p/volumes/kubemtls-trust"},
    )
    assert remap.apply("15001=fhir.ehr.example.org:443") == "41001=127.0.0.1:40443"
    assert remap.apply("8443:127.0.0.1:8080") == "41443:127.0.0.1:41080"
    assert remap.apply("/var/run/kubemtls/trust") == "/tmp/p/volumes/kubemtls-trust"
    assert remap.apply("https://10.0.0.1:9444") == "https://10.0.0.1:9444"


def test_manifests_are_opted_in_pods() -> None:
    for name in ("ehr-client", "peer-api", "batch-export"):
        (pod,) = stage.manifest(name)
        assert pod["kind"] == "Pod"
        assert pod["metadata"]["annotations"]["kubemtls.io/inject"] == "true"


def test_table_renders_printer_columns() -> None:
    from kubemtls_operator.demo import table

    now = datetime.datetime(2026, 1, 1, 12, 0, 30, tzinfo=datetime.UTC)
    item = {
        "metadata": {"name": "ehr-client", "creationTimestamp": "2026-01-01T12:00:00Z"},
        "spec": {"podName": "ehr-client", "identity": "spiffe://cluster.local/ns/c/sa/a"},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "notAfter": "2026-01-01T12:02:00Z",
            "renewalTime": "2026-01-01T12:01:20Z",
        },
    }
    lines = table.render([item], now).splitlines()
    assert lines[0].split() == ["NAME", "POD", "IDENTITY", "READY", "EXPIRES", "RENEWS", "AGE"]
    assert lines[1].split() == [
        "ehr-client",
        "ehr-client",
        "spiffe://cluster.local/ns/c/sa/a",
        "True",
        "2026-01-01T12:02:00Z",
        "2026-01-01T12:01:20Z",
        "30s",
    ]


def test_inspect_prints_certificate_facts(
    test_pki: testkit.TestPKI, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubemtls_operator import cli

    leaf = test_pki.leaf("clinic", "ehr-client")
    leaf.write(tmp_path)
    assert cli.main(["inspect", str(tmp_path / "tls.crt")]) == 0
    out = capsys.readouterr().out
    assert f"serial:       {leaf.cert.serial_number:x}" in out
    assert "identity:     spiffe://cluster.local/ns/clinic/sa/ehr-client" in out
    assert "usage:        clientAuth, serverAuth" in out
    assert cli.main(["inspect", str(tmp_path / "tls.key")]) == 2  # a key is no certificate
