"""HTTP mode inbound: identity headers, spoofing, RFC 8705 binding, HTTP/1.1 framing.

Real TLS with client certificates from the test CA, real sockets, and a real aiohttp app
behind the forwarder that echoes what it received.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import pathlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import dataplane
import h11
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubemtls_sidecar import certs, httpmode, xfcc
from testkit import Leaf, TestPKI

# --- the app: echoes what reached it ---------------------------------------------------


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "chunked": request.headers.get("Transfer-Encoding", ""),
        }
    )


async def _early(request: web.Request) -> web.Response:
    return web.Response(status=413, text="too big\n")  # without reading the body


async def _ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str("echo:" + msg.data)
    return ws


@pytest.fixture
async def app_port() -> AsyncIterator[int]:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/echo", _echo)
    app.router.add_route("*", "/early", _early)
    app.router.add_get("/ws", _ws)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port
    finally:
        await runner.cleanup()


# --- the sidecar's inbound HTTP path: TLS in, HttpForwarder, plain to the app ---------

Front = Callable[..., Awaitable[int]]


@pytest.fixture
async def front(test_pki: TestPKI, app_port: int, tmp_path: pathlib.Path) -> AsyncIterator[Front]:
    servers: list[asyncio.Server] = []
    server_leaf = test_pki.leaf("app", "server", name="server")

    async def start(**settings: object) -> int:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(
            cadata=test_pki.ca.anchor.public_bytes(serialization.Encoding.PEM).decode()
        )
        d = server_leaf.write(tmp_path / f"srv{len(servers)}")
        ctx.load_cert_chain(d / "tls.crt", d / "tls.key")
        http_settings = httpmode.HttpSettings(**settings)  # type: ignore[arg-type]

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
            peer = certs.facts(x509.load_der_x509_certificate(der)).spiffe_id or "?"
            ur, uw = await asyncio.open_connection("127.0.0.1", app_port)
            try:
                fwd = httpmode.HttpForwarder(httpmode.Peer(der, name=peer), http_settings)
                await fwd.run(r, w, ur, uw)
            finally:
                for writer in (w, uw):
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    try:
        yield start
    finally:
        for s in servers:
            s.close()


@pytest.fixture(scope="module")
def client_leaf(test_pki: TestPKI) -> Leaf:
    return test_pki.leaf("ehr", "client", name="client-pod")


def client_ctx(test_pki: TestPKI, leaf: Leaf, tmp: pathlib.Path) -> ssl.SSLContext:
    d = leaf.write(tmp / "client")
    ctx = ssl.create_default_context(
        cadata=test_pki.ca.anchor.public_bytes(serialization.Encoding.PEM).decode()
    )
    ctx.load_cert_chain(d / "tls.crt", d / "tls.key")
    return ctx


async def exchange(
    port: int, ctx: ssl.SSLContext, raw: bytes, responses: int = 1
) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw request bytes (possibly pipelined) and read ``responses`` answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    out: list[tuple[int, dict[str, str], bytes]] = []
    pending = b""
    try:
        writer.write(raw)
        await writer.drain()
        for _ in range(responses):
            # A client connection that "sent" a GET parses the next response.
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
            if pending:
                conn.receive_data(pending)
            status, headers, body = 0, {}, bytearray()
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await asyncio.wait_for(reader.read(65536), 10))
                elif isinstance(ev, h11.Response):
                    status = ev.status_code
                    headers = {k.decode().lower(): v.decode() for k, v in ev.headers}
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
                elif isinstance(ev, h11.ConnectionClosed):
                    raise ConnectionError("closed before a response")
            out.append((status, headers, bytes(body)))
            pending = conn.trailing_data[0]
        return out
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def request(
    path: str = "/echo",
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    body: bytes | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: app.example"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def seen(body: bytes) -> dict[str, object]:
    doc = json.loads(body)
    assert isinstance(doc, dict)
    return doc


def header_values(doc: dict[str, object], name: str) -> list[str]:
    pairs = doc["headers"]
    assert isinstance(pairs, list)
    return [v for k, v in pairs if k.lower() == name.lower()]


# --- tests ------------------------------------------------------------------------------


async def test_app_sees_the_true_identity_and_spoofed_headers_are_stripped(
    front: Front, test_pki: TestPKI, client_leaf: Leaf, tmp_path: pathlib.Path
) -> None:
    port = await front()
    spoof = [
        ("X-Forwarded-Client-Cert", "Hash=00;URI=spiffe://cluster.local/ns/kube-system/sa/admin"),
        ("Client-Cert", ":AAAA:"),
        ("client-cert-chain", ":AAAA:"),
        ("X-Other", "kept"),
    ]
    [(status, _, body)] = await exchange(
        port, client_ctx(test_pki, client_leaf, tmp_path), request(headers=spoof)
    )
    assert status == 200
    doc = seen(body)
    der = client_leaf.cert.public_bytes(serialization.Encoding.DER)
    [xfcc_value] = header_values(doc, "X-Forwarded-Client-Cert")
    assert f"Hash={hashlib.sha256(der).hexdigest()}" in xfcc_value.split(";")
    assert "URI=spiffe://cluster.local/ns/ehr/sa/client" in xfcc_value.split(";")
    assert f'Subject="{client_leaf.cert.subject.rfc4514_string()}"' in xfcc_value
    assert "DNS=localhost" in xfcc_value.split(";")
    assert "kube-system" not in json.dumps(doc)
    [cc] = header_values(doc, "Client-Cert")
    assert cc == ":" + base64.b64encode(der).decode() + ":"
    assert header_values(doc, "Client-Cert-Chain") == []
    assert header_values(doc, "X-Other") == ["kept"]


def test_xfcc_quotes_values_with_separators(test_pki: TestPKI) -> None:
    leaf = test_pki.leaf("ehr", "client", name='odd;name,"x"')
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    value = xfcc.xfcc(der, by="spiffe://cluster.local/ns/app/sa/server")
    assert value.startswith("By=spiffe://cluster.local/ns/app/sa/server;Hash=")
    subject = leaf.cert.subject.rfc4514_string()
    assert 'Subject="' + subject.replace('"', '\\"') + '"' in value  # quotes escaped
    chain = xfcc.client_cert_chain([der, der])
    assert chain.count(":") == 4
    assert ", " in chain


def bound_jwt(thumb: str | None) -> str:
    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    payload: dict[str, object] = {"sub": "smart-app"}
    if thumb is not None:
        payload["cnf"] = {"x5t#S256": thumb}
    return f"{b64({'alg': 'RS256'})}.{b64(payload)}.c2ln"


async def test_bound_tokens(
    front: Front, test_pki: TestPKI, client_leaf: Leaf, tmp_path: pathlib.Path
) -> None:
    port = await front()
    ctx = client_ctx(test_pki, client_leaf, tmp_path)
    good = bound_jwt(certs.x5t_s256(client_leaf.cert))
    [(status, _, body)] = await exchange(
        port, ctx, request(headers=[("Authorization", f"Bearer {good}")])
    )
    assert status == 200
    assert header_values(seen(body), "Authorization") == [f"Bearer {good}"]

    other = bound_jwt(certs.x5t_s256(test_pki.leaf("ehr", "thief").cert))
    [(status, headers, _)] = await exchange(
        port, ctx, request(headers=[("Authorization", f"Bearer {other}")])
    )
    assert status == 401
    assert headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert "another certificate" in headers["www-authenticate"]

    malformed = bound_jwt(None).split(".")[0] + ".e30K!!.sig"
    [(status, _, _)] = await exchange(
        port, ctx, request(headers=[("Authorization", f"Bearer {malformed}")])
    )
    assert status == 401

    # Unbound bearer and Basic pass when binding is not required.
    for auth in (f"Bearer {bound_jwt(None)}", "Basic dXNlcjpwYXNz"):
        [(status, _, _)] = await exchange(port, ctx, request(headers=[("Authorization", auth)]))
        assert status == 200, auth


async def test_require_bound_token_refuses_unbound_bearers(
    front: Front, test_pki: TestPKI, client_leaf: Leaf, tmp_path: pathlib.Path
) -> None:
    port = await front(require_bound_token=True)
    ctx = client_ctx(test_pki, client_leaf, tmp_path)
    [(status, headers, _)] = await exchange(
        port, ctx, request(headers=[("Authorization", f"Bearer {bound_jwt(None)}")])
    )
    assert status == 401
    assert "not bound" in headers["www-authenticate"]
    good = bound_jwt(certs.x5t_s256(client_leaf.cert))
    ok = await exchange(port, ctx, request(headers=[("Authorization", f"Bearer {good}")]))
    assert ok[0][0] == 200
    basic = await exchange(port, ctx, request(headers=[("Authorization", "Basic eDp5")]))
    assert basic[0][0] == 200


async def test_pipelined_requests_are_answered_in_order(
    front: Front, test_pki: TestPKI, client_leaf: Leaf, tmp_path: pathlib.Path
) -> None:
    port = await front()
    raw = b"".join(
        request(f"/echo?n={i}", method="POST", body=f"body-{i}".encode() * 100) for i in range(5)
    )
    answers = await exchange(port, client_ctx(test_pki, client_leaf, tmp_path), raw, responses=5)
    assert [seen(b)["path"] for _, _, b in answers] == [f"/echo?n={i}" for i in range(5)]
    assert all(s == 200 for s, _, _ in answers)
    # Each pipelined request got its own identity header, exactly one.
    assert all(len(header_values(seen(b), "X-Forwarded-Client-Cert")) == 1 for _, _, b in answers)


async def test_large_and_chunked_bodies_stream_through(
    front: Front, test_pki: TestPKI, client_leaf: Leaf, tmp_path: pathlib.Path
) -> None:
    port = await front()
    ctx = client_ctx(test_pki, client_leaf, tmp_path)
    big = bytes(range(256)) * (16 * 1024 * 4)  # 16 MiB
    [(status, _, body)] = await exchange(port, ctx, request(method="PUT", body=big))
    assert status == 200
    assert seen(body)["body_sha256"] == hashlib.sha256(big).hexdigest()

    chunks = [b"a" * 10, b"b" * 70000, b"c"]
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
        + b"0\r\nX-Trailer: t\r\n\r\n"
    )
    [(status, _, body)] = await exchange(port, ctx, raw)
    doc = seen(body)
    assert status == 200
    assert doc["chunked"] == "chunked"
    assert doc["body_sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()


async def test_header_limit(
    front: Front, test_pki: TestPKI, client_leaf: Leaf, tmp_path: pathlib.Path
) -> None:
    port = await front(max_header_bytes=32 * 1024)
    ctx = client_ctx(test_pki, client_leaf, tmp_path)
    fits = [(f"X-Pad-{i}", "p" * 4000) for i in range(6)]  # ~24 KiB
    assert (await exchange(port, ctx, request(headers=fits)))[0][0] == 200
    too_big = [(f"X-Pad-{i}", "p" * 4000) for i in range(10)]  # ~40 KiB
    [(status, headers, _)] = await exchange(port, ctx, request(headers=too_big))
    assert status == 431
    assert headers["connection"] == "close"


async def test_garbage_gets_400_and_connect_405(
    front: Front, test_pki: TestPKI, client_leaf: Leaf, tmp_path: pathlib.Path
) -> None:
    port = await front()
    ctx = client_ctx(test_pki, client_leaf, tmp_path)
    [(status, _, _)] = await exchange(port, ctx, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400
    raw = b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n"
    [(status, _, _)] = await exchange(port, ctx, raw)
    assert status == 405


async def test_early_response_before_the_body_is_read(
    front: Front, test_pki: TestPKI, client_leaf: Leaf, tmp_path: pathlib.Path
) -> None:
    port = await front()
    ctx = client_ctx(test_pki, client_leaf, tmp_path)
    [(status, _, _)] = await exchange(
        port, ctx, request("/early", method="POST", body=b"x" * (4 * 1024 * 1024))
    )
    assert status == 413


async def test_websocket_upgrade_is_tunnelled(
    front: Front, test_pki: TestPKI, client_leaf: Leaf, tmp_path: pathlib.Path
) -> None:
    port = await front()
    ctx = client_ctx(test_pki, client_leaf, tmp_path)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"https://127.0.0.1:{port}/ws", ssl=ctx) as ws,
    ):
        for i in range(3):
            await ws.send_str(f"hello {i}")
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.data == f"echo:hello {i}"


# --- through the real sidecar (app.serve): the inbound seam and the EHR side -------------


async def test_through_the_sidecar_inbound_http_mode(
    sidecar_args: Callable[..., list[str]],
    app_port: int,
    test_pki: TestPKI,
    client_leaf: Leaf,
    tmp_path: pathlib.Path,
) -> None:
    port = dataplane.free_port()
    extra = ["--inbound", f"{port}:127.0.0.1:{app_port}", "--protocol", "http",
             "--require-bound-token"]  # fmt: skip
    ctx = client_ctx(test_pki, client_leaf, tmp_path)
    async with dataplane.running_sidecar(sidecar_args(extra=extra)) as r:
        good = bound_jwt(certs.x5t_s256(client_leaf.cert))
        spoof = ("X-Forwarded-Client-Cert", "URI=spiffe://cluster.local/ns/x/sa/admin")
        raw = request(headers=[("Authorization", f"Bearer {good}"), spoof]) + request(
            headers=[("Authorization", f"Bearer {bound_jwt(None)}")]
        )
        answers = await exchange(port, ctx, raw, responses=2)
        assert [a[0] for a in answers] == [200, 401]
        [xfcc_value] = header_values(seen(answers[0][2]), "X-Forwarded-Client-Cert")
        assert "URI=spiffe://cluster.local/ns/ehr/sa/client" in xfcc_value
        assert "ns/x/sa/admin" not in xfcc_value
        assert answers[1][1]["www-authenticate"].startswith('Bearer error="invalid_token"')
        metrics_text = r.sidecar.metrics.exposition().decode()
        assert 'kubemtls_sidecar_connections_total{direction="inbound",result="ok"}' in metrics_text


async def test_plain_http_out_reaches_an_mtls_ehr_that_sees_our_spiffe_id(
    sidecar_args: Callable[..., list[str]], test_pki: TestPKI, tmp_path: pathlib.Path
) -> None:
    """The EHR side: the app speaks plain HTTP to the outbound port, the EHR demands mTLS."""
    ehr_leaf = test_pki.leaf("ehr", "fhir", name="fhir-0")
    d = ehr_leaf.write(tmp_path / "ehr")
    ehr_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ehr_ctx.verify_mode = ssl.CERT_REQUIRED
    ehr_ctx.load_verify_locations(
        cadata=test_pki.ca.anchor.public_bytes(serialization.Encoding.PEM).decode()
    )
    ehr_ctx.load_cert_chain(d / "tls.crt", d / "tls.key")

    async def patient(request: web.Request) -> web.Response:
        der = request.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        who = certs.facts(x509.load_der_x509_certificate(der)).spiffe_id
        return web.json_response({"resourceType": "Patient", "id": "1", "caller": who})

    ehr = web.Application()
    ehr.router.add_get("/fhir/Patient/1", patient)
    runner = web.AppRunner(ehr, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ehr_ctx)
    await site.start()
    ehr_port = runner.addresses[0][1]
    local = dataplane.free_port()
    try:
        extra = ["--outbound", f"{local}=localhost:{ehr_port}"]
        async with (
            dataplane.running_sidecar(sidecar_args(extra=extra)),
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{local}/fhir/Patient/1") as resp,
        ):
            assert resp.status == 200
            doc = await resp.json()
        assert doc["caller"] == "spiffe://cluster.local/ns/app/sa/server"
    finally:
        await runner.cleanup()
