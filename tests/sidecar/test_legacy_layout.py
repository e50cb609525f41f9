"""The layout without native sidecars (< 1.29): the ``--wait-ready`` postStart hook, and
``POST /quitquitquit`` (loopback peers only) that a Job's app uses to end the sidecar.

The hook runs exactly as the webhook writes it: ``kubemtls-sidecar --wait-ready`` with the
sidecar's environment. The drain-and-exit-0 half of /quitquitquit is in test_lifecycle
(parametrized with SIGTERM); a non-loopback peer needs a second network namespace.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest
import testkit
import testkit_netns
from dataplane import ENV_PATH, Files, free_port, running_sidecar
from kubemtls_sidecar import admin, contract
from testkit import REPO

_ENV = {**os.environ, "PATH": f"{ENV_PATH}:{os.environ['PATH']}"}


def _sidecar_env(files: Files, admin_port: int) -> dict[str, str]:
    """What the webhook gives the sidecar container (and so its postStart hook)."""
    return {
        **_ENV,
        "KUBEMTLS_CERT_DIR": str(files.cert_dir),
        "KUBEMTLS_TRUST_DIR": str(files.trust_dir),
        "KUBEMTLS_INBOUND": f"{free_port()}:127.0.0.1:{free_port()}",
        "KUBEMTLS_ADMIN_PORT": str(admin_port),
        "KUBEMTLS_LISTEN_ADDRESS": "127.0.0.1",
        "KUBEMTLS_LOG_FORMAT": "json",
    }


async def test_wait_ready_exits_0_once_the_sidecar_is_ready(files: Files):
    admin_port = free_port()
    env = _sidecar_env(files, admin_port)
    waiter = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubemtls_sidecar", "--wait-ready",
        env=env, cwd=REPO, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    sidecar = None
    try:
        # Started before the sidecar (as kubelet does): it polls until the sidecar is ready.
        sidecar = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kubemtls_sidecar", env=env, cwd=REPO,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await asyncio.wait_for(waiter.wait(), 20) == 0
        assert sidecar.returncode is None  # the hook only waited; the sidecar runs on
        reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
        writer.write(b"GET /readyz HTTP/1.0\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        for proc in (waiter, sidecar):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_wait_ready_times_out_with_one_line_while_not_ready():
    """An admin port that answers 503 (e.g. no certificate yet): exit 1 after the timeout."""
    polls = 0

    async def not_ready(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal polls
        polls += 1
        await r.readuntil(b"\r\n\r\n")
        body = b"not ready: no valid certificate\n"
        w.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n" % len(body))
        w.write(body)
        await w.drain()
        w.close()

    server = await asyncio.start_server(not_ready, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kubemtls_sidecar", "--wait-ready",
            "--wait-ready-timeout", "1", "--admin-port", str(port),
            env=_ENV, cwd=REPO, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        server.close()
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "not ready after 1s" in lines[0]
    assert "no valid certificate" in lines[0]
    assert polls >= 2  # it polled, not just tried once


def test_wait_ready_reads_nothing_else_and_imports_nothing_heavy():
    """The hook runs with the whole sidecar env; a bad or absent rest must not matter, and
    the heavy modules of the proxy must stay unloaded (a fresh process per pod start)."""
    script = (
        "import sys\n"
        "from kubemtls_sidecar import __main__ as m\n"
        "rc = m.main(sys.argv[1:])\n"
        "heavy = ('cryptography', 'prometheus_client', 'h11', 'asyncio', 'uvloop', 'ssl')\n"
        "print(rc, sorted(n for n in heavy if n in sys.modules))\n"
    )
    env = {
        **_ENV,
        "KUBEMTLS_CERT_DIR": "/nonexistent",
        "KUBEMTLS_PROTOCOL": "not-a-protocol",
        "KUBEMTLS_INBOUND": "garbage",
        "KUBEMTLS_ADMIN_PORT": str(free_port()),  # nothing listens there
    }
    done = subprocess.run(
        [sys.executable, "-c", script, "--wait-ready", "--wait-ready-timeout", "0"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.stdout.strip() == "1 []", (done.stdout, done.stderr)
    assert "Connection refused" in done.stderr


async def test_quitquitquit_is_post_only(sidecar_args):
    async with running_sidecar(sidecar_args()) as r:
        reader, writer = await asyncio.open_connection("127.0.0.1", r.cfg.admin_port)
        writer.write(b"GET /quitquitquit HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = (await asyncio.wait_for(reader.read(), 5)).decode()
        writer.close()
        assert raw.startswith("HTTP/1.1 405")
        assert "allow: POST" in raw
        assert not r.stop.is_set()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),  # all of 127/8 is this network namespace
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # an IPv4 client of a dual-stack socket
        ("10.0.0.7", False),  # the pod IP, kubelet, another pod
        ("::ffff:10.0.0.7", False),
        ("fe80::1%eth0", False),
        ("", False),
    ],
)
def test_loopback_peers(host: str, loopback: bool) -> None:
    assert admin.is_loopback(host) is loopback


_CLIENT = """
import socket, sys
host, port, method, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with socket.create_connection((host, port), timeout=5) as s:
    s.sendall(f"{method} {path} HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0\\r\\n\\r\\n".encode())
    data = b""
    while chunk := s.recv(4096):
        data += chunk
print(data.split(b" ")[1].decode())
"""


@pytest.mark.netns
def test_quitquitquit_from_outside_the_pod_is_403(test_pki: testkit.TestPKI) -> None:
    """The sidecar in namespace a (the pod), admin on 0.0.0.0 as in a pod: namespace b
    (kubelet, another pod) and a's own pod IP get 403; a's 127.0.0.1 stops it (exit 0)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        # Two pods need two network namespaces: root only. CI runs as root, so it runs there.
        pytest.skip("needs root and iproute2 (network namespaces)")
    root = pathlib.Path(tempfile.mkdtemp(prefix="kmt-quit-"))
    try:
        with testkit_netns.pair(root) as p:
            cert_dir = test_pki.leaf("app", "job", name="job-pod").write(root / "certs")
            trust_dir = test_pki.trust_dir(root / "trust")
            admin_port = contract.ADMIN_PORT
            sc = p.start(
                p.a,
                "sidecar",
                [sys.executable, "-m", "kubemtls_sidecar", "--cert-dir", str(cert_dir),
                 "--trust-dir", str(trust_dir), "--drain-timeout", "2"],
            )  # fmt: skip

            def ask(ns: str, host: str, method: str, path: str) -> str:
                done = p.run(ns, [sys.executable, "-c", _CLIENT, host, str(admin_port), method,
                                  path], timeout=15)  # fmt: skip
                return done.stdout.strip() or done.stderr.strip()

            testkit_netns.wait_for(
                lambda: ask(p.a, "127.0.0.1", "GET", "/readyz") == "200", 15, "sidecar ready"
            )
            assert ask(p.b, p.a_ip, "GET", "/readyz") == "200"  # kubelet's probe path works
            assert ask(p.b, p.a_ip, "POST", "/quitquitquit") == "403"
            assert ask(p.a, p.a_ip, "POST", "/quitquitquit") == "403"  # the pod IP is not loopback
            assert sc.popen.poll() is None
            assert "accepted from loopback only" in sc.text()
            assert ask(p.a, "127.0.0.1", "POST", "/quitquitquit") == "200"
            assert sc.popen.wait(timeout=15) == 0, sc.text()
    finally:
        shutil.rmtree(root, ignore_errors=True)
