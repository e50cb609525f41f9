"""Peers and probes for the socket data-phase tests (``test_sockio*.py``; imported as
``sockpeers``, conftest puts this directory on sys.path).

OpenSSL is asked directly (ctypes on ``_ssl``'s own libssl, independently of ``sockio``)
which BIOs a live connection uses; the sidecar's endpoints are found through ``gc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import gc
import os
import re
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import testkit
from dataplane import Files, Running, free_port, running_sidecar
from kubemtls_sidecar import tlsconn

MODES = ["socket", "memory"]
#: The modules' pytestmark: they read CPython's ``_ssl`` objects (never skips in CI).
CPYTHON_ONLY = pytest.mark.skipif(
    sys.implementation.name != "cpython", reason="reads CPython's _ssl objects"
)
BIO_TYPE_SOCKET = 5 | 0x0400 | 0x0100  # BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR
BIO_TYPE_MEM = 1 | 0x0400
Args = Callable[..., list[str]]  # the sidecar_args fixture
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# sockio caches SSL_CTX pointers by id(context): a context of ours that died could hand
# its id to a later one. Contexts made here live as long as the process.
KEEP: list[ssl.SSLContext] = []


@functools.cache
def lib() -> Any:
    import _ssl

    so = ctypes.CDLL(_ssl.__file__)  # dlsym finds _ssl's own libssl
    for name, res, args in (
        ("SSL_get_rbio", ctypes.c_void_p, [ctypes.c_void_p]),
        ("SSL_get_wbio", ctypes.c_void_p, [ctypes.c_void_p]),
        ("BIO_method_type", ctypes.c_int, [ctypes.c_void_p]),
        ("SSL_get_fd", ctypes.c_int, [ctypes.c_void_p]),
        ("SSL_get_SSL_CTX", ctypes.c_void_p, [ctypes.c_void_p]),
        ("SSL_CTX_get_options", ctypes.c_uint64, [ctypes.c_void_p]),
    ):
        fn = getattr(so, name)
        fn.restype, fn.argtypes = res, args
    return so


def ssl_of(obj: ssl.SSLObject) -> int:
    """A live connection's ``SSL *`` (PySSLSocket: head, socket weakref, ``SSL *``),
    confirmed by OpenSSL to belong to the object's context."""
    word = ctypes.sizeof(ctypes.c_void_p)
    ptr = ctypes.c_void_p.from_address(id(obj._sslobj) + object.__basicsize__ + word).value  # type: ignore[attr-defined]
    ctx = ctypes.c_void_p.from_address(id(obj.context) + object.__basicsize__).value
    assert ptr
    assert ctx
    assert lib().SSL_CTX_get_options(ctx) == int(obj.context.options), "not the SSL_CTX"
    assert lib().SSL_get_SSL_CTX(ptr) == ctx, "not the SSL"
    return int(ptr)


def bios(obj: ssl.SSLObject) -> tuple[int, int, int]:
    """(read BIO type, write BIO type, ``SSL_get_fd``) of a live connection."""
    ptr = ssl_of(obj)
    return (
        lib().BIO_method_type(lib().SSL_get_rbio(ptr)),
        lib().BIO_method_type(lib().SSL_get_wbio(ptr)),
        lib().SSL_get_fd(ptr),
    )


def open_endpoints() -> list[tlsconn.TlsEndpoint]:
    """Every established, not yet closed TLS side on this test's loop (both sidecar ends)."""
    loop = asyncio.get_running_loop()
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, tlsconn.TlsEndpoint)
        and o._loop is loop
        and o.established
        and not o.closed.done()
    ]


def one_endpoint(server_side: bool) -> tlsconn.TlsEndpoint | None:
    """The only open, fused TLS side of that role, or None while there is none."""
    eps = [e for e in open_endpoints() if e.ssl.server_side == server_side]
    assert len(eps) <= 1, eps
    return eps[0] if eps and eps[0].partner is not None else None


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def active(r: Running, direction: str) -> float:
    """The sidecar's active-connections gauge for ``direction`` (0 before first use)."""
    text = r.sidecar.metrics.exposition().decode()
    pattern = rf'^kubemtls_sidecar_active_connections{{direction="{direction}"}} (\S+)$'
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


@contextlib.asynccontextmanager
async def app_server(handle: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


@dataclasses.dataclass
class Mesh:
    r: Running
    inbound: int  # TLS, in front of the app
    outbound: int  # plaintext, to ``inbound`` over mutual TLS


@contextlib.asynccontextmanager
async def mesh(sidecar_args: Args, app_port: int, mode: str) -> AsyncIterator[Mesh]:
    """One sidecar with both directions: app → outbound → (mTLS) → inbound → app_port."""
    inbound, outbound = free_port(), free_port()
    args = sidecar_args(
        extra=[
            "--inbound", f"{inbound}:127.0.0.1:{app_port}",
            "--outbound", f"{outbound}=localhost:{inbound}",
            "--tls-io", mode,
        ]
    )  # fmt: skip
    async with running_sidecar(args) as r:
        yield Mesh(r, inbound, outbound)


@contextlib.asynccontextmanager
async def outbound_to(sidecar_args: Args, up_port: int, mode: str) -> AsyncIterator[Mesh]:
    local = free_port()
    args = sidecar_args(extra=["--outbound", f"{local}=localhost:{up_port}", "--tls-io", mode])
    async with running_sidecar(args) as r:
        yield Mesh(r, 0, local)


def upstream_context(files: Files, client_ca: testkit.TestPKI) -> ssl.SSLContext:
    """An upstream's server context (trusted by the mesh), requiring a client certificate
    from ``client_ca``."""
    d = files.pki.leaf("ehr", "fhir", dns_names=("localhost",)).write(files.root / "upstream")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(d / "tls.crt"), str(d / "tls.key"))
    trust = client_ca.trust_dir(files.root / f"upstream-trust-{id(client_ca)}")
    ctx.load_verify_locations(str(trust / "ca.crt"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    KEEP.append(ctx)
    return ctx


def in_thread(fn: Callable[..., object], *args: object) -> asyncio.Future[object]:
    """Run a blocking peer in a thread (the sidecar runs on this loop)."""
    return asyncio.ensure_future(asyncio.to_thread(fn, *args))


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes):
    writer.write(data)
    assert await asyncio.wait_for(reader.readexactly(len(data)), 10) == data
