"""The admin port: /healthz, /readyz and /metrics over real HTTP."""

from __future__ import annotations

import asyncio

from dataplane import Files, client_context, free_port, running_sidecar


async def get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_probes_and_metrics(sidecar_args, echo_port, files: Files, tmp_path):
    port = free_port()
    async with running_sidecar(
        sidecar_args(extra=["--inbound", f"{port}:127.0.0.1:{echo_port}"])
    ) as r:
        admin = r.cfg.admin_port
        assert await get(admin, "/healthz") == (200, "ok\n")
        assert await get(admin, "/readyz") == (200, "ready\n")
        assert (await get(admin, "/nope"))[0] == 404
        ctx = client_context(files.pki.leaf(), files.trust_dir, tmp_path)
        rd, wr = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        wr.write(b"12345")
        assert await rd.readexactly(5) == b"12345"
        wr.close()
        await asyncio.sleep(0.1)
        status, body = await get(admin, "/metrics")
        assert status == 200
        for name in (
            "kubemtls_sidecar_connections_total",
            "kubemtls_sidecar_active_connections",
            "kubemtls_sidecar_handshake_duration_seconds_bucket",
            "kubemtls_sidecar_certificate_not_after_timestamp_seconds",
            "kubemtls_sidecar_reloads_total",
            "kubemtls_sidecar_crl_stale{issuer=",
        ):
            assert name in body, name
        expected = r.sidecar.store.current.leaf.not_valid_after_utc.timestamp()
        line = next(
            x
            for x in body.splitlines()
            if x.startswith("kubemtls_sidecar_certificate_not_after_timestamp_seconds ")
        )
        assert float(line.split()[1]) == expected
        r.sidecar.draining = True
        status, body = await get(admin, "/readyz")
        assert status == 503
        assert "draining" in body


def _bytes(body: str, direction: str, flow: str) -> float:
    prefix = f'kubemtls_sidecar_bytes_total{{direction="{direction}",flow="{flow}"}} '
    line = next((x for x in body.splitlines() if x.startswith(prefix)), prefix + "0")
    return float(line.split()[-1])


async def test_bytes_of_an_open_connection_show_while_it_is_open(
    sidecar_args, echo_port, files: Files, tmp_path
):
    """A long-lived connection's bytes appear at each scrape, and are not counted twice
    when it closes."""
    port = free_port()
    async with running_sidecar(
        sidecar_args(extra=["--inbound", f"{port}:127.0.0.1:{echo_port}"])
    ) as r:
        admin = r.cfg.admin_port
        ctx = client_context(files.pki.leaf(), files.trust_dir, tmp_path)
        rd, wr = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        wr.write(b"12345")
        assert await rd.readexactly(5) == b"12345"
        _, body = await get(admin, "/metrics")
        assert (_bytes(body, "inbound", "rx"), _bytes(body, "inbound", "tx")) == (5, 5)
        wr.write(b"x" * 70000)
        assert len(await rd.readexactly(70000)) == 70000
        _, body = await get(admin, "/metrics")
        assert (_bytes(body, "inbound", "rx"), _bytes(body, "inbound", "tx")) == (70005, 70005)
        wr.close()
        await wr.wait_closed()

        async def closed() -> bool:
            return (
                'active_connections{direction="inbound"} 0.0' in (await get(admin, "/metrics"))[1]
            )

        deadline = asyncio.get_running_loop().time() + 5
        while not await closed():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        _, body = await get(admin, "/metrics")
        assert (_bytes(body, "inbound", "rx"), _bytes(body, "inbound", "tx")) == (70005, 70005)
