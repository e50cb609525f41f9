"""TLS 1.3 KeyUpdate through the sidecar, checked from the peer's side (openssl -msg).

A peer may ask for a KeyUpdate (``update_requested``) at any time; we must answer with one
of our own before our next application data (RFC 8446 §4.6.3). ``TlsEndpoint``'s fast read
path no longer flushes the outgoing BIO after a read, so the answer must leave with our
next write. OpenSSL 3.0 in fact writes it inside that next ``SSL_write``, ahead of the
data; a transport that sent only the data record would leave the peer unable to decrypt.
These tests read the order of records in the peer's ``-msg`` trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import re
import shutil
from collections.abc import AsyncIterator, Callable

import pytest
from dataplane import Files, leaf_args, running_sidecar
from testkit import eventually, free_port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

SENT_KU = ">>> TLS 1.3, Handshake [length 0005], KeyUpdate"
RECV_KU = "<<< TLS 1.3, Handshake [length 0005], KeyUpdate"
TOKEN = re.compile(r"tok-[a-z0-9-]+")

Args = Callable[..., list[str]]  # the sidecar_args fixture
Event = tuple[str, str]  # ("out-ku" | "in-ku", request_update byte) or ("data", token)


class Peer:
    """An interactive ``openssl s_client``/``s_server``: stdin lines in, ``-msg`` trace out.

    Without ``-quiet``/``-ign_eof`` both take command letters (``K``, ``k``) at the start of
    a line. Each stdin read is one command *or* data, so every line waits for its effect in
    the trace before the next is written (two lines in one read would lose the second), and
    data lines start with ``tok-`` (s_client takes any line starting ``k``/``K`` as one).
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc, self.out = proc, ""
        self._pump = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            self.out += chunk.decode(errors="replace")

    def _write(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())

    async def wait_for(self, pred: Callable[[], object], timeout: float = 10) -> None:
        """Until ``pred()``; fails at once if openssl exits first (an alert, say)."""
        await eventually(lambda: pred() or self._pump.done(), timeout=timeout, step=0.005)
        assert pred(), "openssl exited (its output is printed below)"

    async def key_update(self, letter: str) -> None:
        """``K`` (update_requested) or ``k``; returns once the peer wrote the message."""
        n = self.out.count(SENT_KU)
        self._write(letter)
        await self.wait_for(lambda: self.out.count(SENT_KU) > n)

    def send(self, token: str) -> None:
        self._write(token)

    async def received(self, token: str) -> None:
        await self.wait_for(lambda: ("data", token) in self.events())

    def events(self) -> list[Event]:
        """KeyUpdates sent and received (with their request byte) and data tokens, in order."""
        lines = self.out.splitlines()
        found: list[Event] = []
        for i, line in enumerate(lines):
            for mark, kind in ((SENT_KU, "out-ku"), (RECV_KU, "in-ku")):
                if mark in line and i + 1 < len(lines):
                    found.append((kind, lines[i + 1].split()[-1]))  # "18 00 00 01 0X"
            if not line.startswith(("<<<", ">>>", " ")):
                found.extend(("data", t) for t in TOKEN.findall(line))
        return found


@contextlib.asynccontextmanager
async def openssl(*args: str) -> AsyncIterator[Peer]:
    proc = await asyncio.create_subprocess_exec(
        "openssl", *args, "-tls1_3", "-msg",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    peer = Peer(proc)
    try:
        yield peer
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        await peer._pump
        print(peer.out[-6000:])  # shown by pytest when the test fails


@pytest.fixture
async def s_client(
    sidecar_args: Args, echo_port: int, files: Files, tmp_path: pathlib.Path
) -> AsyncIterator[Peer]:
    """s_client (valid client certificate) → inbound sidecar → echo app."""
    port = free_port()
    extra = ["--inbound", f"{port}:127.0.0.1:{echo_port}"]
    client = leaf_args(files.pki.leaf("billing", "api", name="client"), tmp_path)
    async with running_sidecar(sidecar_args(extra=extra)), openssl(
        "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
        "-CAfile", str(files.trust_dir / "ca.crt"), "-verify_return_error", *client,
    ) as peer:  # fmt: skip
        await peer.wait_for(lambda: "Verify return code: 0" in peer.out)
        yield peer


async def test_inbound_answers_update_requested_before_the_echo(s_client: Peer) -> None:
    s_client.send("tok-1")
    await s_client.received("tok-1")
    await s_client.key_update("K")
    s_client.send("tok-2")
    await s_client.received("tok-2")
    await s_client.key_update("k")
    s_client.send("tok-3")
    await s_client.received("tok-3")
    # One answer (update_not_requested) to K, before the next echoed data; none to k.
    assert s_client.events() == [
        ("data", "tok-1"),
        ("out-ku", "01"),
        ("in-ku", "00"),
        ("data", "tok-2"),
        ("out-ku", "00"),
        ("data", "tok-3"),
    ]


async def test_inbound_data_flows_through_many_key_updates(s_client: Peer) -> None:
    for _ in range(12):  # in a row: the sidecar's receiving key moves 12 times
        await s_client.key_update("K")
    s_client.send("tok-burst")
    await s_client.received("tok-burst")
    events = s_client.events()
    assert events.count(("out-ku", "01")) == 12
    assert ("in-ku", "00") in events[: events.index(("data", "tok-burst"))]
    for i in range(10):  # alternating: each request answered before its echo
        await s_client.key_update("K" if i % 2 else "k")
        s_client.send(f"tok-alt-{i}")
        await s_client.received(f"tok-alt-{i}")
    tail = s_client.events()[len(events) :]
    expected: list[Event] = []
    for i in range(10):
        expected += [("out-ku", "01" if i % 2 else "00")]
        expected += [("in-ku", "00")] if i % 2 else []
        expected += [("data", f"tok-alt-{i}")]
    assert tail == expected


@pytest.fixture
async def outbound(
    sidecar_args: Args, files: Files, tmp_path: pathlib.Path
) -> AsyncIterator[tuple[Peer, int]]:
    """(s_server requiring our client certificate, the sidecar's local outbound port)."""
    d = files.pki.leaf("ehr", "fhir", dns_names=("localhost",)).write(tmp_path / "s_server")
    async with openssl(
        "s_server", "-accept", "127.0.0.1:0", "-naccept", "1",
        "-cert", str(d / "tls.crt"), "-key", str(d / "tls.key"),
        "-CAfile", str(files.trust_dir / "ca.crt"), "-Verify", "1", "-verify_return_error",
    ) as peer:  # fmt: skip
        await peer.wait_for(lambda: re.search(r"ACCEPT 127\.0\.0\.1:\d+", peer.out))
        up_port = re.findall(r"ACCEPT 127\.0\.0\.1:(\d+)", peer.out)[0]
        local = free_port()
        extra = ["--outbound", f"{local}=localhost:{up_port}"]
        async with running_sidecar(sidecar_args(extra=extra)):
            yield peer, local


async def _line(reader: asyncio.StreamReader) -> str:
    return (await asyncio.wait_for(reader.readline(), 10)).decode().strip()


async def test_outbound_answers_the_servers_key_update(outbound: tuple[Peer, int]) -> None:
    server, local = outbound
    reader, writer = await asyncio.open_connection("127.0.0.1", local)
    writer.write(b"tok-up-1\n")
    await server.received("tok-up-1")
    server.send("tok-down-1")
    assert await _line(reader) == "tok-down-1"
    await server.key_update("K")
    writer.write(b"tok-up-2\n")  # our next data: the answer must precede it
    await server.received("tok-up-2")
    server.send("tok-down-2")  # the server's new key, read by the sidecar
    assert await _line(reader) == "tok-down-2"
    assert server.events() == [
        ("data", "tok-up-1"),
        ("out-ku", "01"),
        ("in-ku", "00"),
        ("data", "tok-up-2"),
    ]
    writer.close()


async def test_outbound_answer_deferred_past_inbound_data_still_precedes_ours(
    outbound: tuple[Peer, int],
) -> None:
    """After K the server sends only: the sidecar reads (fast path) and writes nothing; the
    answer it owes must still be the first thing the server reads before our next line."""
    server, local = outbound
    reader, writer = await asyncio.open_connection("127.0.0.1", local)
    writer.write(b"tok-up-1\n")
    await server.received("tok-up-1")
    await server.key_update("K")
    for i in range(3):
        server.send(f"tok-down-{i}")
        assert await _line(reader) == f"tok-down-{i}"
    writer.write(b"tok-up-2\n")
    await server.received("tok-up-2")
    writer.write(b"tok-up-3\n")
    await server.received("tok-up-3")
    assert server.events() == [
        ("data", "tok-up-1"),
        ("out-ku", "01"),
        ("in-ku", "00"),
        ("data", "tok-up-2"),
        ("data", "tok-up-3"),
    ]
    writer.close()
