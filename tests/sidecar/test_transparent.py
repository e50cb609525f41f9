"""Transparent mode: the redirect rules, and a real redirected mTLS path between namespaces.

The pure tests check ``transparent.redirect_rules`` and the capture's upstream choice.
The netns test builds two network namespaces joined by a veth pair; in each one the
rules are installed by ``kubemtls-sidecar --install-redirects`` and a sidecar runs as
UID 1337. An unmodified plain HTTP client in A reaches the app in B; on the veth the
bytes are TLS, and B's app sees A's identity in X-Forwarded-Client-Cert.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable

import aiohttp
import dataplane
import pytest
import testkit_netns
from aiohttp import web
from kubemtls_sidecar import appprobes, capture, config, contract, errors, transparent
from testkit import TestPKI, eventually

ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def cfg_of(*argv: str, env: dict[str, str] | None = None) -> config.Config:
    return config.parse(
        ["--install-redirects", "--mode", "transparent", *argv], env=ENV if env is None else env
    )


def test_rules_redirect_app_ports_and_outbound_ports_only() -> None:
    cfg = cfg_of("--inbound", "8080,9090", "--outbound", "80=fhir.ehr.example.org:443")
    rules = transparent.redirect_rules(cfg)
    assert rules[0] == "*nat"
    assert rules[-1] == "COMMIT"
    text = "\n".join(rules)
    inb, outb = transparent.INBOUND_CHAIN, transparent.OUTBOUND_CHAIN
    assert f":{inb} - [0:0]" in rules
    assert f"-F {outb}" in rules  # own chains flushed: installing twice is idempotent
    for port in (8080, 9090):
        assert f"-A {inb} -p tcp --dport {port} -j REDIRECT --to-ports 15006" in rules
    assert f"-A {outb} -p tcp --dport 80 -j REDIRECT --to-ports 15001" in rules
    assert f"-A PREROUTING -p tcp -j {inb}" in rules
    assert f"-A OUTPUT -p tcp -j {outb}" in rules
    # Never redirected, and each exclusion comes before any REDIRECT of its chain.
    exclusions = [
        f"-A {outb} -m owner --uid-owner {contract.SIDECAR_UID} -j RETURN",
        f"-A {outb} -d 127.0.0.0/8 -j RETURN",
        f"-A {outb} -p tcp --dport {contract.ADMIN_PORT} -j RETURN",
        f"-A {outb} -p tcp --dport 53 -j RETURN",
        f"-A {outb} -d 10.96.0.1/32 -p tcp --dport 443 -j RETURN",
        f"-A {inb} -p tcp --dport {contract.ADMIN_PORT} -j RETURN",
    ]
    for rule in exclusions:
        chain = rule.split()[1]
        first_redirect = min(
            i for i, r in enumerate(rules) if r.startswith(f"-A {chain} ") and "REDIRECT" in r
        )
        assert rules.index(rule) < first_redirect, rule
    assert "--dport 53 -j REDIRECT" not in text


def test_rules_follow_the_capture_ports_and_skip_an_unset_api_server() -> None:
    cfg = cfg_of(
        "--inbound",
        "8080",
        "--inbound-capture-port",
        "25006",
        "--outbound-capture-port",
        "25001",
        "--outbound",
        "80=a.example:443",
        env={},
    )
    rules = transparent.redirect_rules(cfg)
    assert any(r.endswith("--dport 8080 -j REDIRECT --to-ports 25006") for r in rules)
    assert any(r.endswith("--dport 80 -j REDIRECT --to-ports 25001") for r in rules)
    assert not any("/32" in r for r in rules)


@pytest.mark.parametrize(
    "argv",
    [
        ["--mode", "transparent", "--inbound", "15006"],  # a capture port
        ["--mode", "transparent", "--inbound", str(contract.ADMIN_PORT)],
        ["--mode", "transparent", "--outbound", "53=dns.example:853"],
        ["--mode", "transparent"],  # nothing to redirect
        ["--mode", "explicit", "--inbound", "8443:127.0.0.1:8080"],
        ["--mode", "transparent", "--inbound", "http"],
    ],
)
def test_a_bad_config_exits_2_before_touching_iptables(argv: list[str]) -> None:
    done = install_in_scratch_netns(argv)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("kubemtls-sidecar: ")
    assert done.stderr.count("\n") == 1


def install_in_scratch_netns(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``--install-redirects`` in a new, empty network namespace (never the host's)."""
    cmd = [sys.executable, "-m", "kubemtls_sidecar", "--install-redirects", *argv]
    if os.geteuid() == 0:
        cmd = ["unshare", "--net", *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBEMTLS_")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=60)


def test_install_is_idempotent_in_a_scratch_netns() -> None:
    if os.geteuid() != 0 or shutil.which("iptables-restore") is None:
        # Installing rules needs root and iptables (scripts/bootstrap.sh installs it); CI
        # runs as root with the set-up done, so there this test always runs.
        pytest.skip("needs root and iptables")
    script = (
        "set -e; for i in 1 2; do "
        f"{sys.executable} -m kubemtls_sidecar --install-redirects --mode transparent "
        "--inbound 8080 --outbound 80=fhir.ehr.example.org:443; done; iptables-save -t nat; "
        "echo ===; ip6tables-save -t filter"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBEMTLS_")}
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    v4, v6 = done.stdout.split("===")
    assert v4.count(f"-j {transparent.INBOUND_CHAIN}") == 1
    assert v4.count("--to-ports 15001") == 1
    assert "--uid-owner 1337 -j RETURN" in v4
    # IPv6 fails closed: the same ports are reset, once.
    assert v6.count(f"-A OUTPUT -p tcp -j {transparent.OUTBOUND_CHAIN}") == 1
    assert v6.count("--dport 80 -j REJECT --reject-with tcp-reset") == 1
    assert v6.count("--dport 8080 -j REJECT --reject-with tcp-reset") == 1


def test_ipv6_rejects_what_ipv4_redirects() -> None:
    cfg = cfg_of("--inbound", "8080", "--outbound", "80=fhir.ehr.example.org:443")
    rules = transparent.ipv6_reject_rules(cfg)
    assert rules[0] == "*filter"
    outb = transparent.OUTBOUND_CHAIN
    uid = f"-A {outb} -m owner --uid-owner {contract.SIDECAR_UID} -j RETURN"
    reject = f"-A {outb} -p tcp --dport 80 -j REJECT --reject-with tcp-reset"
    assert rules.index(uid) < rules.index(reject)
    assert not any("REDIRECT" in r for r in rules)


def test_choose_upstream_by_port_and_host() -> None:
    entries = (
        config.parse_outbound("80=fhir.ehr.example.org:443"),
        config.parse_outbound("8080=a.example:443"),
        config.parse_outbound("8080=b.example:8443"),
    )
    assert capture.choose_upstream(entries, 80, None) == entries[0]
    assert capture.choose_upstream(entries, 80, "FHIR.ehr.example.org") == entries[0]
    assert capture.choose_upstream(entries, 80, "evil.example") is None
    assert capture.choose_upstream(entries, 8080, None) is None  # ambiguous without Host
    assert capture.choose_upstream(entries, 8080, "b.example") == entries[2]
    assert capture.choose_upstream(entries, 443, None) is None


# --- the real thing: two namespaces, iptables, UID 1337 ---------------------------------

_APP = r"""
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _material(root: pathlib.Path, name: str, leaf: object, test_pki: TestPKI) -> dict[str, str]:
    """cert-dir and trust-dir readable by UID 1337 only."""
    d = root / name
    leaf.write(d / "certs")  # type: ignore[attr-defined]
    test_pki.trust_dir(d / "trust")
    for path in [d, *d.rglob("*")]:
        os.chown(path, contract.SIDECAR_UID, contract.SIDECAR_GID)
    return {"KUBEMTLS_CERT_DIR": str(d / "certs"), "KUBEMTLS_TRUST_DIR": str(d / "trust")}


@pytest.mark.netns
def test_plain_client_reaches_the_other_namespace_over_mtls(test_pki: TestPKI) -> None:
    reason = testkit_netns.skip_reason()
    if reason is not None:
        # Not root, or no ip/iptables/tcpdump: printed, then skipped. CI runs as root with
        # the set-up done, so there this test always runs.
        print(f"skipping the netns test: {reason}")
        pytest.skip(reason)
    py = testkit_netns.sidecar_python()
    assert py is not None
    exe, py_env = py
    root = pathlib.Path(tempfile.mkdtemp(prefix="kmt-"))
    os.chmod(root, 0o755)  # noqa: S103 - UID 1337 must reach its files
    try:
        with testkit_netns.pair(root) as p:
            _run_pair(p, root, exe, py_env, test_pki)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_pair(
    p: testkit_netns.Pair, root: pathlib.Path, exe: str, py_env: dict[str, str], pki: TestPKI
) -> None:
    app_port = 8080
    a_leaf = pki.leaf("clinic", "app-a", name="app-a", dns_names=(), ip_addresses=(p.a_ip,))
    b_leaf = pki.leaf(
        "ehr", "fhir", name="fhir-0", dns_names=("fhir.ehr.test",), ip_addresses=(p.b_ip,)
    )
    common = {
        **py_env,
        "KUBEMTLS_MODE": "transparent",
        "KUBEMTLS_PROTOCOL": "http",
        "KUBEMTLS_LOG_LEVEL": "debug",
    }
    env_a = {
        **common,
        **_material(root, "a", a_leaf, pki),
        "KUBEMTLS_OUTBOUND": f"{app_port}={p.b_ip}:{app_port}",
    }
    env_b = {
        **common,
        **_material(root, "b", b_leaf, pki),
        "KUBEMTLS_INBOUND": str(app_port),
        "KUBEMTLS_ALLOWED_PEER": "spiffe://cluster.local/ns/clinic/sa/*",
    }

    # The init containers: install the rules (twice: idempotent), exit 0.
    for ns, env in ((p.a, env_a), (p.b, env_b)):
        for _ in range(2):
            done = p.run(
                ns,
                [exe, "-m", "kubemtls_sidecar", "--install-redirects"],
                env={**os.environ, **env},
            )
            assert done.returncode == 0, done.stderr
        saved = p.run(ns, ["iptables-save", "-t", "nat"]).stdout
        assert saved.count(f"-j {transparent.INBOUND_CHAIN}") == 1, saved
        assert saved.count(f"-j {transparent.OUTBOUND_CHAIN}") == 1, saved

    p.start(p.b, "app-b", [sys.executable, "-c", _APP, str(app_port)])
    sc_a = p.start(p.a, "sidecar-a", [exe, "-m", "kubemtls_sidecar"], env=env_a, as_sidecar=True)
    sc_b = p.start(p.b, "sidecar-b", [exe, "-m", "kubemtls_sidecar"], env=env_b, as_sidecar=True)
    for ns, proc in ((p.a, sc_a), (p.b, sc_b)):
        testkit_netns.wait_for(
            lambda ns=ns, proc=proc: (
                proc.popen.poll() is not None
                or p.run(
                    ns, ["curl", "-sf", f"http://127.0.0.1:{contract.ADMIN_PORT}/readyz"]
                ).returncode
                == 0
            ),
            20,
            f"{proc.name} ready",
        )
        assert proc.popen.poll() is None, proc.text()
    testkit_netns.wait_for(
        lambda: p.run(p.b, ["curl", "-s", f"http://127.0.0.1:{app_port}/"]).returncode == 0,
        10,
        "the app in B",
    )

    pcap = root / "veth.pcap"
    dump = p.start(
        p.a,
        "tcpdump",
        [
            "tcpdump",
            "-i",
            p.a_if,
            "-n",
            "-U",
            "--immediate-mode",
            "-w",
            str(pcap),
            "tcp",
            "port",
            str(app_port),
        ],
    )
    testkit_netns.wait_for(lambda: "listening on" in dump.text(), 10, "tcpdump")

    marker = f"PLAINTEXT-MARKER-{os.getpid()}"
    url = f"http://{p.b_ip}:{app_port}/{marker}"
    got = p.run(p.a, ["curl", "-s", "-m", "10", "-H", f"X-Secret: {marker}", url])
    assert got.returncode == 0, (got.stderr, sc_a.text(), sc_b.text())
    seen = json.loads(got.stdout)
    assert seen["path"] == f"/{marker}"
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert "URI=spiffe://cluster.local/ns/clinic/sa/app-a" in headers["x-forwarded-client-cert"]

    # A host with no --outbound entry is refused, never sent on in plaintext.
    refused = p.run(
        p.a,
        [
            "curl",
            "-s",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: evil.example",
            "-H",
            f"X-Secret: {marker}",
            url,
        ],
    )
    assert refused.stdout == "502", (refused.stdout, sc_a.text())

    testkit_netns.wait_for(lambda: pcap.stat().st_size > 2000, 5, "packets in the capture")
    p.stop(dump, signal.SIGINT)
    raw = pcap.read_bytes()
    assert marker.encode() not in raw, "plaintext on the wire"
    assert b"\x16\x03" in raw, ("no TLS handshake record on the wire", dump.text())
    assert "captured outbound connection refused" in sc_a.text()
    # The sidecars ran as UID 1337 (the uid-owner exclusion is what let them out).
    status = pathlib.Path(f"/proc/{_child_pid(sc_a.popen.pid)}/status").read_text()
    assert f"Uid:\t{contract.SIDECAR_UID}" in status


def _child_pid(pid: int) -> int:
    """The sidecar python under ``ip netns exec`` → ``setpriv`` (exec'd: same pid)."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    return int(out[0]) if out else pid


# --- in-process, no root: app probes and connections that were not redirected -----------


async def test_admin_replays_the_rewritten_app_probes_and_unredirected_is_refused(
    sidecar_args: Callable[..., list[str]],
    files: dataplane.Files,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def ok(request: web.Request) -> web.Response:
        assert request.headers["X-Probe"] == "yes"
        return web.Response(text="fine")

    async def sick(request: web.Request) -> web.Response:
        return web.Response(status=500, text="database down")

    app_ = web.Application()
    app_.router.add_get("/healthz", ok)
    app_.router.add_get("/sick", sick)
    runner = web.AppRunner(app_, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    app_port = runner.addresses[0][1]
    prefix = contract.APP_HEALTH_PREFIX
    probes = {
        f"{prefix}app/livez": {
            "httpGet": {"port": app_port, "path": "/healthz", "scheme": "HTTP",
                        "httpHeaders": [{"name": "X-Probe", "value": "yes"}]},
            "timeoutSeconds": 2,
        },
        f"{prefix}app/readyz": {"httpGet": {"port": app_port, "path": "/sick"}},
        f"{prefix}app/startupz": {"tcpSocket": {"port": dataplane.free_port()}},
        f"{prefix}web/livez": {"tcpSocket": {"port": app_port}},
    }  # fmt: skip
    admin = dataplane.free_port()
    inbound_capture, outbound_capture = dataplane.free_port(), dataplane.free_port()
    args = [
        *sidecar_args(),
        "--mode", "transparent", "--inbound", str(app_port),
        "--outbound", "80=fhir.ehr.example.org:443",
        "--inbound-capture-port", str(inbound_capture),
        "--outbound-capture-port", str(outbound_capture),
        "--app-probes", json.dumps(probes),
    ]  # fmt: skip
    args[args.index("--admin-port") + 1] = str(admin)
    try:
        async with dataplane.running_sidecar(args), aiohttp.ClientSession() as session:

            async def status(path: str) -> int:
                async with session.get(f"http://127.0.0.1:{admin}{path}") as r:
                    return r.status

            assert await status(f"{prefix}app/livez") == 200
            assert await status(f"{prefix}app/readyz") == 500
            assert await status(f"{prefix}app/startupz") == 503
            assert await status(f"{prefix}web/livez") == 200
            assert await status(f"{prefix}nope/livez") == 404

            # Straight to a capture port, not redirected: refused, nothing forwarded.
            ctx = dataplane.client_context(files.pki.leaf("ehr", "x"), files.trust_dir, tmp_path)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", inbound_capture, ssl=ctx, server_hostname="localhost"
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", outbound_capture)
            writer.write(b"GET / HTTP/1.1\r\nHost: fhir.ehr.example.org\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await eventually(lambda: "captured outbound connection refused" in caplog.text)
            assert "captured inbound connection refused" in caplog.text
    finally:
        await runner.cleanup()


def test_bad_app_probes_are_a_config_error() -> None:
    for bad in ("{", "[]", '{"/x": {"httpGet": {"port": 1}}}',
                f'{{"{contract.APP_HEALTH_PREFIX}a/livez": {{"exec": {{}}}}}}'):  # fmt: skip
        with pytest.raises(errors.ConfigError):
            appprobes.parse(bad)
