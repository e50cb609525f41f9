"""Hot reload: certificates, trust and CRLs change under live traffic without dropping it."""

from __future__ import annotations

import asyncio
import datetime
import os
import pathlib
import signal
import ssl
import sys

import pytest
from dataplane import (
    ENV_PATH,
    Files,
    client_context,
    free_port,
    leaf_args,
    log_fields,
    running_sidecar,
    s_client,
    stop_sidecar,
)
from kubemtls_operator import pki
from testkit import REPO, Leaf, eventually, utcnow


async def open_client(port: int, ctx: ssl.SSLContext):
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    return reader, writer


async def echo(reader, writer, payload: bytes) -> bytes:
    writer.write(payload)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(payload)), 5)


def served_serial(writer) -> str:
    return f"{int(writer.get_extra_info('peercert')['serialNumber'], 16):x}"


def swap_data_dir(cert_dir: pathlib.Path, leaf: Leaf, generation: int) -> None:
    """What kubelet does: new files in a fresh directory, then rename the ..data symlink."""
    new = cert_dir / f"..gen{generation}"
    leaf.write(new)
    tmp_link = cert_dir / "..data_tmp"
    tmp_link.symlink_to(new.name)
    os.replace(tmp_link, cert_dir / "..data")
    for name in ("tls.crt", "tls.key"):
        link = cert_dir / name
        if not link.is_symlink():
            link.unlink(missing_ok=True)
            link.symlink_to(f"..data/{name}")


@pytest.mark.parametrize("style", ["in-place", "kubelet-symlink-swap"])
async def test_new_cert_serves_new_handshakes_and_open_connections_stay_up(
    sidecar_args, echo_port, files: Files, tmp_path, style
):
    cert_dir = tmp_path / "watched"
    cert_dir.mkdir()
    first = files.pki.leaf("app", "server", name="gen1")
    if style == "in-place":
        first.write(cert_dir)
    else:
        swap_data_dir(cert_dir, first, 1)
    port = free_port()
    args = sidecar_args(
        cert_dir=cert_dir,
        extra=["--inbound", f"{port}:127.0.0.1:{echo_port}", "--reload-interval", "0.1"],
    )
    ctx = client_context(files.pki.leaf("billing", "api"), files.trust_dir, tmp_path)
    async with running_sidecar(args) as r:
        reader, writer = await open_client(port, ctx)
        assert served_serial(writer) == r.sidecar.store.current.facts.serial
        assert await echo(reader, writer, b"before") == b"before"
        second = files.pki.leaf("app", "server", name="gen2")
        if style == "in-place":
            second.write(cert_dir)
        else:
            swap_data_dir(cert_dir, second, 2)
        new_serial = f"{second.cert.serial_number:x}"
        await eventually(lambda: r.sidecar.store.current.facts.serial == new_serial, 5)
        assert await echo(reader, writer, b"after swap") == b"after swap"  # still up
        r2, w2 = await open_client(port, ctx)
        assert served_serial(w2) == new_serial
        assert await echo(r2, w2, b"new") == b"new"
        for w in (writer, w2):
            w.close()


async def test_broken_new_cert_is_refused_and_old_keeps_serving(
    sidecar_args, echo_port, files: Files, tmp_path, caplog
):
    cert_dir = files.pki.leaf("app", "server").write(tmp_path / "watched")
    port = free_port()
    args = sidecar_args(
        cert_dir=cert_dir,
        extra=["--inbound", f"{port}:127.0.0.1:{echo_port}", "--reload-interval", "0.1"],
    )
    async with running_sidecar(args) as r:
        old = r.sidecar.store.current.facts.serial
        other = files.pki.leaf("app", "server")
        (cert_dir / "tls.crt").write_bytes(other.chain_pem)  # key no longer matches
        metric = 'kubemtls_sidecar_reload_failures_total{kind="cert"'
        await eventually(lambda: metric in r.sidecar.metrics.exposition().decode(), 5)
        assert r.sidecar.store.current.facts.serial == old
        ctx = client_context(files.pki.leaf(), files.trust_dir, tmp_path)
        reader, writer = await open_client(port, ctx)
        assert served_serial(writer) == old
        assert await echo(reader, writer, b"x") == b"x"
        writer.close()
    refused = log_fields(caplog, "new cert material refused; keeping the old")
    assert "does not match" in str(refused[0]["reason"])
    assert "PRIVATE KEY" not in caplog.text


async def test_new_crl_revokes_the_next_handshake(sidecar_args, echo_port, files: Files, tmp_path):
    port = free_port()
    client = files.pki.leaf("billing", "api")
    args = sidecar_args(
        extra=["--inbound", f"{port}:127.0.0.1:{echo_port}", "--reload-interval", "0.1"]
    )
    ca = str(files.trust_dir / "ca.crt")
    async with running_sidecar(args) as r:
        assert "ping" in await s_client(
            port, "-CAfile", ca, *leaf_args(client, tmp_path), until="ping"
        )
        generation = r.sidecar.store.current.generation
        files.pki.trust_dir(files.trust_dir, revoked=(client.cert,))
        await eventually(lambda: r.sidecar.store.current.generation > generation, 5)
        out = await s_client(port, "-CAfile", ca, *leaf_args(client, tmp_path))
        assert "alert certificate revoked" in out, out


async def test_missing_crl_is_a_warning_not_a_refusal(
    sidecar_args, echo_port, files: Files, tmp_path, caplog
):
    (files.trust_dir / "crl.pem").unlink()
    port = free_port()
    async with running_sidecar(
        sidecar_args(extra=["--inbound", f"{port}:127.0.0.1:{echo_port}"])
    ) as r:
        out = await s_client(
            port,
            "-CAfile",
            str(files.trust_dir / "ca.crt"),
            *leaf_args(files.pki.leaf(), tmp_path),
            until="ping",
        )
        assert "ping" in out
        assert "kubemtls_sidecar_crl_missing 1.0" in r.sidecar.metrics.exposition().decode()
    assert log_fields(caplog, "no crl.pem in the trust directory: revocation is not enforced")


async def test_stale_crl_still_revokes_but_never_refuses_everyone(
    sidecar_args, echo_port, files: Files, tmp_path, caplog
):
    revoked = files.pki.leaf("billing", "stolen")
    past = utcnow() - datetime.timedelta(days=3)
    entry = pki.RevokedEntry(revoked.cert.serial_number, "keyCompromise", past)
    stale = pki.build_crl(
        files.pki.ca, [entry], now=past, number=7, next_update=datetime.timedelta(days=1)
    )
    (files.trust_dir / "crl.pem").write_bytes(pki.crl_pem(stale))
    port = free_port()
    ca = str(files.trust_dir / "ca.crt")
    async with running_sidecar(
        sidecar_args(extra=["--inbound", f"{port}:127.0.0.1:{echo_port}"])
    ) as r:
        good = await s_client(
            port, "-CAfile", ca, *leaf_args(files.pki.leaf(), tmp_path), until="ping"
        )
        assert "ping" in good
        bad = await s_client(port, "-CAfile", ca, *leaf_args(revoked, tmp_path))
        assert "ping" not in bad.splitlines()
        m = r.sidecar.metrics.exposition().decode()
        stale = [x for x in m.splitlines() if x.startswith("kubemtls_sidecar_crl_stale{")]
        assert stale
        assert stale[0].endswith(" 1.0")
    lines = log_fields(caplog, "peer refused after the handshake")
    assert [x["alert"] for x in lines] == ["certificate_revoked"]


async def test_sighup_reloads_at_once(files: Files, echo_port, tmp_path):
    cert_dir = files.pki.leaf("app", "server").write(tmp_path / "hup")
    port, admin = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubemtls_sidecar", "--cert-dir", str(cert_dir),
        "--trust-dir", str(files.trust_dir), "--inbound", f"{port}:127.0.0.1:{echo_port}",
        "--admin-port", str(admin), "--admin-address", "127.0.0.1",
        "--listen-address", "127.0.0.1", "--reload-interval", "3600",
        cwd=REPO, env={**os.environ, "PATH": f"{ENV_PATH}:{os.environ['PATH']}"},
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    ctx = client_context(files.pki.leaf(), files.trust_dir, tmp_path)
    try:
        await eventually(lambda: _listening(port), 15)
        new = files.pki.leaf("app", "server", name="after-hup")
        new.write(cert_dir)
        proc.send_signal(signal.SIGHUP)
        want = f"{new.cert.serial_number:x}"

        async def serial() -> str:
            _, w = await open_client(port, ctx)
            s = served_serial(w)
            w.close()
            return s

        for _ in range(100):
            if await serial() == want:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("SIGHUP did not reload the certificate")
    finally:
        await stop_sidecar(proc)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
