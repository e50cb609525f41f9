"""Helpers for the sidecar data-plane tests (imported as ``dataplane``; conftest puts
this directory on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import pathlib
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubemtls_operator import pki
from kubemtls_sidecar import app, config
from testkit import REPO, Leaf, TestPKI, free_port, utcnow

SIDECAR = [sys.executable, "-m", "kubemtls_sidecar"]
ENV_PATH = str(REPO / ".venv" / "bin")


def raw_leaf(
    issuer: pki.CA | None,
    *,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
    spiffe: str = "spiffe://cluster.local/ns/default/sa/raw",
) -> Leaf:
    """A leaf built without ``pki``'s guards (``issuer=None``: self-signed)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raw")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(spiffe),
                    x509.DNSName("localhost"),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
    )
    signer = issuer.key if issuer else key
    cert = builder.sign(signer, hashes.SHA256())
    chain = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Leaf(cert, key, chain, key_pem)  # type: ignore[arg-type]


@dataclasses.dataclass
class Files:
    """A server identity and trust directory for one sidecar."""

    root: pathlib.Path
    cert_dir: pathlib.Path
    trust_dir: pathlib.Path
    pki: TestPKI


@pytest.fixture
def files(tmp_path: pathlib.Path, test_pki: TestPKI) -> Files:
    cert_dir = test_pki.leaf("app", "server", name="server-pod").write(tmp_path / "certs")
    trust_dir = test_pki.trust_dir(tmp_path / "trust")
    return Files(tmp_path, cert_dir, trust_dir, test_pki)


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A plaintext echo app on 127.0.0.1 (half-close aware)."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.write_eof()
            await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()


@dataclasses.dataclass
class Running:
    sidecar: app.Sidecar
    cfg: config.Config
    stop: asyncio.Event
    task: asyncio.Task[int]


@contextlib.asynccontextmanager
async def running_sidecar(argv: Sequence[str]) -> AsyncIterator[Running]:
    """An in-process sidecar on this loop; stopped (drained) on exit."""
    cfg = config.parse(list(argv), env={})
    s = app.Sidecar(cfg)
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(app.serve(s, stop))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not s.bound:
        if task.done():
            task.result()
        assert loop.time() < deadline, "sidecar did not start"
        await asyncio.sleep(0.01)
    try:
        yield Running(s, cfg, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
def sidecar_args(files: Files) -> Callable[..., list[str]]:
    """Flags for a sidecar on free ports: ``(inbound=..., outbound=..., extra=[...])``."""

    def make(*, extra: Sequence[str] = (), cert_dir: pathlib.Path | None = None) -> list[str]:
        return [
            "--cert-dir", str(cert_dir or files.cert_dir),
            "--trust-dir", str(files.trust_dir),
            "--admin-port", str(free_port()),
            "--admin-address", "127.0.0.1",
            "--listen-address", "127.0.0.1",
            "--drain-timeout", "2",
            *extra,
        ]  # fmt: skip

    return make


def client_context(leaf: Leaf | None, trust: pathlib.Path, tmp: pathlib.Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(trust / "ca.crt"))
    if leaf is not None:
        d = leaf.write(tmp / f"client-{leaf.cert.serial_number}")
        ctx.load_cert_chain(str(d / "tls.crt"), str(d / "tls.key"))
    return ctx


async def s_client(
    port: int, *args: str, data: bytes = b"ping\n", wait: float = 5, until: str | None = None
) -> str:
    """Run ``openssl s_client`` against 127.0.0.1:port; its stdout+stderr.

    Reads until the server closes, or until ``until`` appears in the output.
    """
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
        "-quiet", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(data)
    out = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await proc.stdout.read(4096):
                out += chunk
                if until is not None and until.encode() in out:
                    break
    except TimeoutError:
        out += b"\n[s_client timed out]"
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    return out.decode(errors="replace")


def blocking_exchange(ctx: ssl.SSLContext, port: int, payload: bytes) -> tuple[bytes, dict]:
    """Send ``payload``, half-close (TCP FIN), read until EOF; returns (reply, peercert)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        peer = s.getpeercert()
        s.sendall(payload)
        socket.socket.shutdown(s, socket.SHUT_WR)  # FIN, keeping the TLS state
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except ssl.SSLZeroReturnError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks), peer


def leaf_args(leaf: Leaf, where: pathlib.Path) -> list[str]:
    d = leaf.write(where / f"leaf-{leaf.cert.serial_number}")
    return ["-cert", str(d / "tls.crt"), "-key", str(d / "tls.key")]


def log_fields(caplog: pytest.LogCaptureFixture, msg: str) -> list[dict[str, object]]:
    """The structured fields of every captured record whose message is ``msg``."""
    return [
        dict(getattr(r, "fields", {}))
        for r in caplog.records
        if r.getMessage() == msg and r.levelno >= logging.INFO
    ]


@pytest.fixture
def now() -> datetime.datetime:
    return utcnow()


# --- a sidecar as its own process: what it loads -----------------------------------------


def cryptography_mapped(pid: int) -> list[str]:
    """Files of ``cryptography`` mapped into process ``pid`` (its Rust core, if loaded)."""
    maps = pathlib.Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines() if "cryptography" in line})


async def admin_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of ``GET path`` on an admin port; (0, "") while nothing listens."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0, ""
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode(errors="replace").partition("\r\n\r\n")
    return (int(head.split()[1]) if head.startswith("HTTP/") else 0), body


@contextlib.asynccontextmanager
async def sidecar_process(
    args: Sequence[str], admin: int
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m kubemtls_sidecar ARGS --admin-port ADMIN``, ready; SIGTERM, exit 0 at the end."""
    proc = await asyncio.create_subprocess_exec(
        *SIDECAR, *args, "--admin-port", str(admin), "--admin-address", "127.0.0.1",
        cwd=REPO, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while (await admin_get(admin, "/readyz"))[0] != 200:
            assert proc.returncode is None, "the sidecar exited"
            assert asyncio.get_running_loop().time() < deadline, "the sidecar never got ready"
            await asyncio.sleep(0.05)
        yield proc
    finally:
        await stop_sidecar(proc)


async def stop_sidecar(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM a sidecar process (stderr piped); it must exit 0 within 15 s, else SIGKILL.

    Its stderr is printed (pytest shows it when the test fails).
    """
    if proc.returncode is None:
        proc.terminate()
    try:
        code = await asyncio.wait_for(proc.wait(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
        assert proc.stderr is not None
        print((await proc.stderr.read()).decode())
    assert code == 0
