"""A signing worker process: ``python -m kubemtls_operator.signworker``, run by ``signworkers``.

Serves ``signfront.Front`` (TLS, HTTP, CSR checks, signing) on its own socket of the
signing port's SO_REUSEPORT group, with :class:`Link` as the backend: every decision and
every record is the operator's, asked over the socket pair it inherits (``signwire``).
Exits when the socket pair closes (the operator is gone) or on SIGTERM. Not a command for
users.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import gc
import ipaddress
import itertools
import json
import logging
import signal
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from typing import Any

import uvloop
from aiohttp import web

from kubemtls_operator import signfront, signwire

__all__ = ["Link", "listening_socket", "main"]

logger = logging.getLogger(__name__)

#: How often latencies go to the operator (its /metrics), in one message.
STATS_INTERVAL = 0.5
#: Each worker's accept queue (SockSite listens again: its default would be 128).
BACKLOG = 1024
#: How long a grant is reused without asking (the operator re-checks each one it records).
GRANT_TTL = 10.0
GRANT_CACHE_SIZE = 10_000
#: Longest line the operator may send (a ``ca`` message carries the CRL).
_LINE_LIMIT = 64 * 1024 * 1024


@dataclasses.dataclass
class Link:
    """The backend of this worker's front: the operator, over the socket pair."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    renew_fraction: float
    on_serving: Any = None  # called when the serving certificate's files changed
    _ids: itertools.count[int] = dataclasses.field(default_factory=itertools.count)
    _waiting: dict[int, asyncio.Future[signwire.Message]] = dataclasses.field(default_factory=dict)
    _cas: dict[int, signfront.Published] = dataclasses.field(default_factory=dict)
    _tokens: dict[int, str] = dataclasses.field(default_factory=dict)  # auth calls in flight
    #: token → (monotonic expiry, grant): most requests skip the "auth" round trip.
    _grants: dict[str, tuple[float, signfront.Grant]] = dataclasses.field(default_factory=dict)
    _latencies: list[float] = dataclasses.field(default_factory=list)
    _refusals: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    _flush: asyncio.TimerHandle | None = None
    closed: bool = False

    # --- signfront.Backend ----------------------------------------------------------------------
    async def authorize(self, token: str) -> signfront.Grant:
        """From this worker's cache (the operator checks it again before it records)."""
        now = time.monotonic()
        hit = self._grants.get(token)
        if hit is not None and hit[0] > now:
            return hit[1]
        reply = await self._call({"t": "auth", "token": token})
        grant: signfront.Grant = reply["grant"]  # built by the reader (see run)
        if len(self._grants) >= GRANT_CACHE_SIZE:
            self._grants.clear()
        self._grants[token] = (now + GRANT_TTL, grant)
        return grant

    async def record(self, grant: signfront.Grant, issued: signfront.Issued) -> None:
        token, fields = grant.ticket
        try:
            await self._call(
                {"t": "rec", "token": token, "grant": fields, **signwire.issued_fields(issued)}
            )
        except signfront.Refused:
            self._grants.pop(token, None)  # ask again next time
            raise

    async def trust(self, token: str) -> tuple[str, bytes]:
        reply = await self._call({"t": "trust", "token": token})
        return str(reply["pod"]), str(reply["body"]).encode()

    def refused(self, reason: str) -> None:
        self._refusals[reason] += 1
        self.flush_stats()  # refusals are few, and read at once (alerts, tests): not batched

    def observe(self, seconds: float) -> None:
        self._latencies.append(seconds)
        self._schedule_flush()

    # --- the socket pair ----------------------------------------------------------------------
    def _send(self, msg: signwire.Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(signwire.encode(msg))

    async def _call(self, msg: signwire.Message) -> signwire.Message:
        if self.closed:
            raise signfront.Refused(503, "SignerUnavailable", "the signer is restarting; retry")
        msg["id"] = ident = next(self._ids)
        if msg["t"] == "auth":
            self._tokens[ident] = msg["token"]
        fut: asyncio.Future[signwire.Message] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = fut
        self._send(msg)
        try:
            reply = await fut
        finally:
            self._waiting.pop(ident, None)
            self._tokens.pop(ident, None)
        if "err" in reply:
            raise signwire.refused_of(reply["err"])
        return reply

    def _schedule_flush(self) -> None:
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(STATS_INTERVAL, self.flush_stats)

    def ready(self) -> None:
        """Tell the operator this worker accepts connections."""
        self._send({"t": "ready"})

    def flush_stats(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._latencies or self._refusals:
            self._send({"t": "stats", "lat": self._latencies, "refused": dict(self._refusals)})
            self._latencies, self._refusals = [], collections.Counter()

    async def run(self) -> None:
        """Read the operator's messages until the socket pair closes."""
        try:
            while line := await self.reader.readline():
                msg = signwire.decode(line)
                kind = msg["t"]
                if kind == "r":
                    fut = self._waiting.get(msg["id"])
                    if fut is not None and not fut.done():
                        if "ok" in msg:  # the grant's CA may be replaced by the next line
                            fields = msg["ok"]
                            msg["grant"] = signwire.to_grant(
                                fields, self._cas[fields["gen"]], self._tokens[msg["id"]]
                            )
                        fut.set_result(msg)
                elif kind == "ca":
                    self._grants.clear()  # a new CA or CRL: grants name the CA
                    self._cas[msg["gen"]] = signwire.published_of(msg)
                    for old in [g for g in self._cas if g < msg["gen"] - 4]:
                        del self._cas[old]
                elif kind == "serving" and self.on_serving is not None:
                    self.on_serving()
        finally:
            self.closed = True
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_result(
                        {"err": [503, "SignerUnavailable", "the signer is restarting; retry", ""]}
                    )


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening socket of the signing port's SO_REUSEPORT group (``host`` an IP or name).

    Each worker binds its own: the kernel spreads new connections over the group evenly
    (with one shared socket, whichever worker woke first accepted a whole burst).
    """
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=BACKLOG, reuse_port=True)


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "timestamp": self.formatTime(record),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def _logging(fmt: str, level: int, index_hint: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                f"[%(asctime)s] {index_hint} %(name)-20.20s [%(levelname)-8s] %(message)s"
            )
        )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    ipc = socket.socket(fileno=args.ipc_fd)
    listener = listening_socket(args.host, args.port)
    reader, writer = await asyncio.open_unix_connection(sock=ipc, limit=_LINE_LIMIT)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.certfile, args.keyfile)

    def reload_serving() -> None:
        try:
            context.load_cert_chain(args.certfile, args.keyfile)
        except (OSError, ssl.SSLError) as e:
            logger.error("could not load the new serving certificate: %s", e)

    link = Link(reader, writer, args.renew_fraction, on_serving=reload_serving)
    runner = web.AppRunner(
        signfront.Front(link).app(), handle_signals=False, access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    await web.SockSite(runner, listener, ssl_context=context, backlog=BACKLOG).start()
    gc.collect()
    gc.freeze()  # what start-up made lives as long as the process: out of every collection
    link.ready()
    operator_gone = asyncio.ensure_future(link.run())
    stopping = loop.create_future()

    def stop() -> None:
        if not stopping.done():
            stopping.set_result(None)

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    await asyncio.wait({operator_gone, stopping}, return_when=asyncio.FIRST_COMPLETED)
    await runner.cleanup()
    link.flush_stats()
    operator_gone.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError, ValueError):
        await operator_gone
    writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kubemtls_operator.signworker", description=__doc__)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ipc-fd", type=int, required=True)
    ap.add_argument("--certfile", required=True)
    ap.add_argument("--keyfile", required=True)
    ap.add_argument("--renew-fraction", type=float, required=True)
    ap.add_argument("--log-format", choices=("text", "json"), default="text")
    ap.add_argument("--log-level", type=int, default=logging.INFO)
    args = ap.parse_args(argv)
    _logging(args.log_format, args.log_level, "signworker")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
