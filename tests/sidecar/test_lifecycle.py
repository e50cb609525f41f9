"""Lifecycle and limits: drain on SIGTERM or /quitquitquit, handshake timeout, connection cap,
exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest
from dataplane import ENV_PATH, Files, client_context, free_port, log_fields, running_sidecar
from kubemtls_sidecar import __main__ as sidecar_main
from testkit import REPO, eventually


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def post(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("trigger", ["SIGTERM", "POST /quitquitquit"])
async def test_stop_drains_in_flight_data_then_exits_0(files: Files, tmp_path, trigger):
    """A slow app answers after the stop: the client still gets every byte; new conns refused.

    ``/quitquitquit`` from 127.0.0.1 (a container of the pod) takes SIGTERM's path.
    """
    release, received = asyncio.Event(), asyncio.Event()

    async def slow_app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.readexactly(4 << 20)
        received.set()
        await release.wait()
        w.write(data)
        await w.drain()
        w.close()

    app = await asyncio.start_server(slow_app, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    port, admin = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubemtls_sidecar", "--cert-dir", str(files.cert_dir),
        "--trust-dir", str(files.trust_dir), "--inbound", f"{port}:127.0.0.1:{app_port}",
        "--admin-port", str(admin), "--admin-address", "127.0.0.1", "--listen-address",
        "127.0.0.1", "--drain-timeout", "20", "--log-format", "json",
        cwd=REPO, env={**os.environ, "PATH": f"{ENV_PATH}:{os.environ['PATH']}"},
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await eventually(lambda: _listening(port), 15)
        ctx = client_context(files.pki.leaf(), files.trust_dir, tmp_path)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        payload = os.urandom(4 << 20)
        writer.write(payload)
        await writer.drain()
        await asyncio.wait_for(received.wait(), 15)  # every byte is at the app, unanswered
        if trigger == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            assert await post(admin, "/quitquitquit") == (200, "draining\n")
        await eventually(lambda: not _listening(port), 5)  # stopped accepting
        release.set()
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 15)
        assert echoed == payload
        writer.close()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        app.close()
    assert proc.stderr is not None
    lines = [json.loads(x) for x in (await proc.stderr.read()).decode().splitlines() if x]
    stopped = [x for x in lines if x["msg"] == "stopped"]
    assert stopped
    assert stopped[0]["drained"] >= 1  # ours (a readiness probe of this test may add one)
    assert stopped[0]["cut"] == 0


async def test_handshake_timeout_closes_a_silent_client(sidecar_args, echo_port, caplog):
    port = free_port()
    extra = ["--inbound", f"{port}:127.0.0.1:{echo_port}", "--handshake-timeout", "0.3"]
    async with running_sidecar(sidecar_args(extra=extra)) as r:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the sidecar
        assert asyncio.get_running_loop().time() - start < 3
        writer.close()
        m = r.sidecar.metrics.exposition().decode()
        assert 'kubemtls_sidecar_connections_total{direction="inbound",result="timeout"} 1.0' in m
    line = log_fields(caplog, "TLS handshake refused")[0]
    assert "0.3s" in str(line["reason"])


async def test_connection_cap_refuses_the_extra_connection(
    sidecar_args, echo_port, files, tmp_path
):
    port = free_port()
    extra = ["--inbound", f"{port}:127.0.0.1:{echo_port}", "--max-connections", "2"]
    ctx = client_context(files.pki.leaf(), files.trust_dir, tmp_path)
    async with running_sidecar(sidecar_args(extra=extra)) as r:
        open_ = []
        for _ in range(2):
            rd, wr = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
            )
            wr.write(b"hi")
            assert await rd.readexactly(2) == b"hi"
            open_.append(wr)
        rd, wr = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(rd.read(), 5) == b""
        wr.close()
        m = r.sidecar.metrics.exposition().decode()
        assert (
            'kubemtls_sidecar_connections_total{direction="inbound",result="over_limit"} 1.0' in m
        )
        for w in open_:
            w.close()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], "no certificate source"),
        (["--cert-dir", "/nonexistent", "--trust-dir", "/tmp"], "--cert-dir: cannot read"),
        (
            ["--cert-dir", "{certs}", "--trust-dir", "{trust}", "--inbound", "8443:8080"],
            "expected LISTEN_PORT:APP_HOST:APP_PORT",
        ),
        (
            ["--cert-dir", "{certs}", "--trust-dir", "{trust}", "--inbound", "8443:10.0.0.5:8080"],
            "--allow-remote-app",
        ),
        (
            ["--cert-dir", "{certs}", "--trust-dir", "{trust}", "--outbound", "99999=a:1"],
            "a port must be a number",
        ),
        (
            ["--cert-dir", "{certs}", "--trust-dir", "{trust}", "--handshake-timeout", "soon"],
            "not a number",
        ),
    ],
)
def test_bad_flag_exits_2_with_one_line(files: Files, capsys, argv, words):
    argv = [a.format(certs=files.cert_dir, trust=files.trust_dir) for a in argv]
    assert sidecar_main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert words in err, err


def test_unusable_cert_file_exits_2_with_one_line(files: Files, tmp_path):
    (files.cert_dir / "tls.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n")
    proc = subprocess.run(
        [sys.executable, "-m", "kubemtls_sidecar", "--cert-dir", str(files.cert_dir),
         "--trust-dir", str(files.trust_dir), "--admin-port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("kubemtls-sidecar: --cert-dir"), proc.stderr
    assert "private key" in lines[-1]
    assert "not a key" not in proc.stderr


async def test_half_close_towards_a_reset_peer_ends_the_connection_quietly():
    """A peer that reset the connection before our FIN: ``write_eof`` must not raise into
    the connection's task (the selector loop's shutdown(SHUT_WR) gives ENOTCONN)."""
    import socket

    from kubemtls_sidecar import pipe

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        loop = asyncio.get_running_loop()
        _, ep = await loop.create_connection(pipe.PlainEndpoint, *listener.getsockname())
        assert isinstance(ep, pipe.PlainEndpoint)
        peer, _ = listener.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # RST, delivered at once on loopback; the loop has not seen it yet
        ep.write_eof()  # raised OSError(ENOTCONN) before
        await asyncio.wait_for(ep.wait_closed(), 5)
