"""SSL modes of the sidecar's contexts and connections, read back from OpenSSL itself.

The modes are read through ctypes (``SSL_CTX_ctrl``/``SSL_ctrl``), independently of
``sslknobs``: on the contexts a running sidecar built, on its live connections (whose mode
is copied at ``SSL_new`` and must survive the move to the data-phase context), across a
certificate reload. ``SSL_MODE_NO_AUTO_CHAIN`` is set; ``SSL_MODE_RELEASE_BUFFERS`` keeps
CPython's default on purpose (``sslknobs``: keeping the record buffers saved instructions
but not CPU time, and costs memory per connection). ``keep_record_buffers``, the measured
alternative, is checked on its own: it must reach the connections of a context.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import ssl
import sys

import pytest
import testkit
from dataplane import Files, free_port, running_sidecar
from kubemtls_operator import pki
from kubemtls_sidecar import sslknobs, tlsconn, tlsstore

pytestmark = pytest.mark.skipif(
    sys.implementation.name != "cpython", reason="reads CPython's _ssl objects"
)

SSL_CTRL_MODE = 33
RELEASE_BUFFERS = 0x10
NO_AUTO_CHAIN = 0x8


def _lib() -> ctypes.CDLL:
    import _ssl

    lib = ctypes.CDLL(_ssl.__file__)
    for name in ("SSL_CTX_ctrl", "SSL_ctrl"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_long
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
    lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
    return lib


LIB = _lib()


def _ctx_ptr(ctx: ssl.SSLContext) -> int:
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    assert ptr
    assert LIB.SSL_CTX_get_options(ptr) == int(ctx.options), "not the SSL_CTX"
    return int(ptr)


def ctx_mode(ctx: ssl.SSLContext) -> int:
    return int(LIB.SSL_CTX_ctrl(_ctx_ptr(ctx), SSL_CTRL_MODE, 0, None))


def conn_mode(obj: ssl.SSLObject) -> int:
    """``SSL_get_mode`` of a live connection (PySSLSocket: head, weakref, then ``SSL *``)."""
    sslobj = obj._sslobj  # type: ignore[attr-defined]
    ptr = ctypes.c_void_p.from_address(id(sslobj) + object.__basicsize__ + 8).value
    assert ptr
    assert LIB.SSL_get_SSL_CTX(ptr) == _ctx_ptr(obj.context), "not the SSL"
    return int(LIB.SSL_ctrl(ptr, SSL_CTRL_MODE, 0, None))


def test_cpython_default_releases_buffers():
    # What the sidecar undoes; if CPython stops setting it, this test says so.
    assert ctx_mode(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)) & RELEASE_BUFFERS


def live_endpoints() -> list[tlsconn.TlsEndpoint]:
    """Open endpoints (closed ones of earlier tests may linger until a collection)."""
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, tlsconn.TlsEndpoint) and o.established and not o.closed.done()
    ]


async def exchange(port: int, payload: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await roundtrip(reader, writer, payload)
    return reader, writer


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes):
    writer.write(data)
    assert await asyncio.wait_for(reader.readexactly(len(data)), 10) == data


async def test_sidecar_modes_on_contexts_and_connections_across_reload(
    sidecar_args, echo_port, files: Files, tmp_path
):
    """A mesh round trip through the sidecar itself: outbound (client) → inbound (server)."""
    cert_dir = files.pki.leaf("app", "server", name="gen1").write(tmp_path / "watched")
    inbound, outbound = free_port(), free_port()
    args = sidecar_args(
        cert_dir=cert_dir,
        extra=[
            "--inbound", f"{inbound}:127.0.0.1:{echo_port}",
            "--outbound", f"{outbound}=localhost:{inbound}",
            "--reload-interval", "0.1",
        ],
    )  # fmt: skip
    async with running_sidecar(args) as r:
        snap = r.sidecar.store.current
        for ctx in (snap.server_ctx, snap.client_ctx):
            mode = ctx_mode(ctx)
            assert mode & RELEASE_BUFFERS, hex(mode)  # CPython's default, kept on purpose
            assert mode & NO_AUTO_CHAIN, hex(mode)
        big = bytes(range(256)) * 256  # 64 KiB: several full records each way
        reader, writer = await exchange(outbound, b"x" * 1024)
        await roundtrip(reader, writer, big)
        eps = live_endpoints()
        assert sorted(e.ssl.server_side for e in eps) == [False, True]  # both ends of TLS
        for e in eps:
            assert e.ssl.context is not snap.server_ctx  # moved to the data-phase context
            assert conn_mode(e.ssl) & (RELEASE_BUFFERS | NO_AUTO_CHAIN) == (
                RELEASE_BUFFERS | NO_AUTO_CHAIN
            ), hex(conn_mode(e.ssl))

        second = files.pki.leaf("app", "server", name="gen2")
        second.write(cert_dir)
        serial = f"{second.cert.serial_number:x}"
        await testkit.eventually(lambda: r.sidecar.store.current.facts.serial == serial, 5)
        new = r.sidecar.store.current
        for ctx in (new.server_ctx, new.client_ctx):
            assert ctx_mode(ctx) & NO_AUTO_CHAIN
        await roundtrip(reader, writer, big)  # the old connection still carries data
        _, w2 = await exchange(outbound, big)
        fresh = [e for e in live_endpoints() if e not in eps]
        assert len(fresh) == 2
        assert all(conn_mode(e.ssl) & NO_AUTO_CHAIN for e in fresh)
        for w in (writer, w2):
            w.close()


def test_keep_record_buffers_reaches_the_connections(test_pki):
    """On the sidecar's own contexts: the mode is cleared, connections inherit it, data flows."""
    trust = pki.trust_bundle([test_pki.ca.anchor])
    s_leaf, c_leaf = test_pki.leaf("app", "server"), test_pki.leaf("app", "client")
    server = tlsstore.build_contexts(s_leaf.chain_pem, s_leaf.key_pem, trust, None, None)[0]
    client = tlsstore.build_contexts(c_leaf.chain_pem, c_leaf.key_pem, trust, None, None)[1]
    client.check_hostname = False
    for ctx in (server, client):
        assert sslknobs.keep_record_buffers(ctx)
        assert not ctx_mode(ctx) & RELEASE_BUFFERS
    tls = testkit.memory_tls(client, server)
    c, s = tls.client, tls.server
    tls.handshake()
    for obj, side in ((c, False), (s, True)):
        obj.context = tlsconn._quiet_context(side)  # as TlsEndpoint does after the handshake
        assert not conn_mode(obj) & RELEASE_BUFFERS, hex(conn_mode(obj))
    for n in (1024, 16384, 1024):
        payload = bytes(range(256)) * (n // 256)
        c.write(payload)
        tls.s_in.write(tls.c_out.read())
        got = b""
        while len(got) < n:
            got += s.read(16384)
        assert got == payload
