"""Inbound HTTP mode: an HTTP/1.1-aware pump between the TLS peer and the app.

In ``--protocol http`` the sidecar parses each request (h11) on its way to the app so it
can (1) remove identity headers a client sent itself (``xfcc.SPOOFABLE``), (2) add the
verified peer's identity (XFCC and RFC 9440 ``Client-Cert``), and (3) refuse bearer
tokens bound to another certificate (RFC 8705, ``tokenbinding``) with a 401.

One downstream connection is tied to one upstream connection, as in TCP mode. Requests
are handled one at a time (a pipelined request is parsed only once the previous answer
has ended), bodies are streamed event by event (never buffered whole), chunked request
bodies and trailers are re-framed by h11, a request head larger than the limit gets a 431,
and the app's answers go down as raw bytes (h11 parses them only to find where each ends).
``Connection: upgrade`` (WebSocket) is passed to the app; if the app answers 101 both
sides become a raw byte tunnel. ``CONNECT`` is refused (405): this is not a forward proxy.

This module decides nothing about TLS: its caller hands it the peer's certificate (DER)
and both stream pairs after the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import typing

import h11

from kubemtls_sidecar import certs, config, logs, metrics, pipe, tokenbinding, xfcc

if typing.TYPE_CHECKING:
    from kubemtls_sidecar import inbound, tlsconn

__all__ = ["DEFAULT_MAX_HEADER_BYTES", "HttpForwarder", "HttpSettings", "Peer", "forward"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
_READ_SIZE = 64 * 1024


@dataclasses.dataclass(frozen=True)
class HttpSettings:
    """What HTTP mode enforces (from ``--max-header-bytes`` and ``--require-bound-token``)."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    require_bound_token: bool = False
    idle_timeout: float = 0  # seconds without a byte from the peer between requests; 0 never

    @classmethod
    def from_config(cls, cfg: config.Config) -> HttpSettings:
        return cls(cfg.max_header_bytes, cfg.require_bound_token, cfg.idle_timeout)


@dataclasses.dataclass(frozen=True)
class Peer:
    """The verified TLS peer: its leaf DER, any intermediates it sent, and a log name."""

    der: bytes
    intermediates: tuple[bytes, ...] = ()
    name: str = "?"  # the SPIFFE ID (or subject) for log lines

    @property
    def x5t_s256(self) -> str:
        return certs.x5t_s256(self.der)


class Reader(typing.Protocol):
    """What the forwarder reads from: ``pipe.Endpoint`` or ``asyncio.StreamReader``."""

    async def read(self, n: int = -1) -> bytes: ...


class Writer(typing.Protocol):
    """What the forwarder writes to: ``pipe.Endpoint`` or ``asyncio.StreamWriter``."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def write_eof(self) -> None: ...


class _Closed(Exception):
    """The other side closed (or broke) the connection."""


class _Out:
    """h11 events for one writer, coalesced: one write (and drain) per batch, not per event."""

    __slots__ = ("buf", "conn", "writer")

    def __init__(self, conn: h11.Connection, writer: Writer) -> None:
        self.conn, self.writer, self.buf = conn, writer, bytearray()

    def add(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.buf += data

    async def flush(self) -> None:
        if self.buf:
            self.writer.write(bytes(self.buf))
            self.buf.clear()
            await self.writer.drain()


async def _next_event(conn: h11.Connection, reader: Reader, out: _Out | None = None) -> object:
    """The next event of ``conn``, reading as needed (flushing ``out`` before waiting)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        if out is not None:
            await out.flush()
        try:
            data = await reader.read(_READ_SIZE)
        except (ConnectionError, OSError) as e:
            raise _Closed(str(e)) from e
        conn.receive_data(data)


async def _send(conn: h11.Connection, writer: Writer, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        writer.write(data)
        await writer.drain()


class HttpForwarder:
    """Forward HTTP/1.1 between a TLS peer (downstream) and the app (upstream)."""

    def __init__(self, peer: Peer, settings: HttpSettings, *, by: str | None = None) -> None:
        self._peer = peer
        self._settings = settings
        self._identity = xfcc.identity_headers(peer.der, peer.intermediates, by=by)
        self._x5t = peer.x5t_s256
        # The last Authorization values and their verdict (the peer is fixed per connection).
        self._verdict: tuple[tuple[bytes, ...] | None, tokenbinding.Refusal | None] = (None, None)

    async def run(
        self, down_reader: Reader, down_writer: Writer, up_reader: Reader, up_writer: Writer
    ) -> None:
        """Serve requests until either side closes; never raises for I/O failures."""
        down = self._downstream_parser(b"", closed=False)
        up = h11.Connection(h11.CLIENT)
        with contextlib.suppress(_Closed, ConnectionError, OSError):
            streams = (down_reader, down_writer, up_reader, up_writer)
            while await self._one_exchange(down, up, *streams):
                # The response went down as raw bytes, not through ``down``: the next
                # request gets a fresh parser with what is left (pipelined requests).
                down = self._downstream_parser(*down.trailing_data)
                up.start_next_cycle()

    def _downstream_parser(self, pending: bytes, closed: bool) -> h11.Connection:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._settings.max_header_bytes)
        if pending:
            conn.receive_data(pending)
        if closed:
            conn.receive_data(b"")
        return conn

    async def refuse_unreachable(self, down_writer: Writer) -> None:
        """Answer 502 to the first request when the app cannot be reached."""
        down = h11.Connection(h11.SERVER)
        await self._refuse(down, down_writer, 502, "the app is not reachable")

    async def _one_exchange(
        self,
        down: h11.Connection,
        up: h11.Connection,
        down_reader: Reader,
        down_writer: Writer,
        up_reader: Reader,
        up_writer: Writer,
    ) -> bool:
        """One request and its response; True when both connections may be reused."""
        try:
            async with asyncio.timeout(self._settings.idle_timeout or None):
                event = await _next_event(down, down_reader)
        except h11.RemoteProtocolError as e:
            await self._refuse(down, down_writer, e.error_status_hint, f"bad request: {e}")
            return False
        except TimeoutError:
            return False  # idle keep-alive connection
        if not isinstance(event, h11.Request):
            return False  # ConnectionClosed (or PAUSED after a refused upgrade)
        request = self._prepare(event)
        if isinstance(request, tuple):
            status, message, extra = request
            await self._refuse(down, down_writer, status, message, extra)
            return False
        up_out = _Out(up, up_writer)
        try:
            up_out.add(request)
        except h11.LocalProtocolError as e:  # e.g. HTTP/1.0 without Host
            await self._refuse(down, down_writer, 400, f"cannot forward this request: {e}")
            return False
        try:
            first = down.next_event()  # no I/O: is the whole request here already?
        except h11.RemoteProtocolError as e:
            await self._refuse(down, down_writer, e.error_status_hint, f"bad request: {e}")
            return False
        if isinstance(first, h11.EndOfMessage):  # the common case (GET): one write, no task
            up_out.add(first)
            await up_out.flush()
            await self._pump_response(down, up, up_reader, down_writer)
        else:
            await up_out.flush()
            streams = (down_reader, down_writer, up_reader, up_writer)
            await self._exchange_bodies(down, up, *streams, first=first)
        if up.our_state is h11.SWITCHED_PROTOCOL:
            await _tunnel(down.trailing_data[0], down_reader, down_writer, up_reader, up_writer)
            return False
        reusable = down.their_state is h11.DONE
        return reusable and all(state is h11.DONE for state in up.states.values())

    def _prepare(
        self, event: h11.Request
    ) -> h11.Request | tuple[int, str, list[tuple[bytes, bytes]]]:
        """The request to send upstream, or (status, message, headers) to refuse it with."""
        if event.method == b"CONNECT":
            return 405, "CONNECT is not supported by the kubemtls sidecar", []
        # h11 bounds only a head that arrives in pieces; bound a whole one here too.
        size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
        if size > self._settings.max_header_bytes:
            return 431, f"the request head exceeds {self._settings.max_header_bytes} bytes", []
        headers = [(n, v) for n, v in event.headers if n not in xfcc.SPOOFABLE]
        auth = [v for n, v in event.headers if n == b"authorization"]
        key = tuple(auth)
        if key == self._verdict[0]:  # a keep-alive client resends the same token
            refusal = self._verdict[1]
        else:
            refusal = tokenbinding.check(
                auth, self._x5t, require_bound=self._settings.require_bound_token
            )
            self._verdict = (key, refusal)
        if refusal is not None:
            logger.warning(
                "refused a request from %s: %s (401 invalid_token)",
                self._peer.name,
                refusal.description,
            )
            extra = [(b"WWW-Authenticate", tokenbinding.www_authenticate(refusal))]
            return 401, refusal.description, extra
        return h11.Request(
            method=event.method, target=event.target, headers=headers + self._identity
        )

    async def _exchange_bodies(
        self,
        down: h11.Connection,
        up: h11.Connection,
        down_reader: Reader,
        down_writer: Writer,
        up_reader: Reader,
        up_writer: Writer,
        *,
        first: object = h11.NEED_DATA,
    ) -> None:
        """Stream the request body up and the response down, concurrently.

        Concurrently, so that ``Expect: 100-continue`` and early responses (an app that
        answers 413 before reading the body) work as they would without the sidecar.
        """
        request_task = asyncio.create_task(
            self._pump_request(down, up, down_reader, up_writer, first)
        )
        response_task = asyncio.create_task(self._pump_response(down, up, up_reader, down_writer))
        pending: set[asyncio.Task[None]] = {request_task, response_task}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # re-raise _Closed and the like
                early = response_task in done and request_task in pending
                if early and down.their_state is not h11.DONE:
                    return  # an early response: the connection is closed, not reused
        finally:
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, _Closed, ConnectionError, OSError):
                    await task

    async def _pump_request(
        self,
        down: h11.Connection,
        up: h11.Connection,
        down_reader: Reader,
        up_writer: Writer,
        first: object,
    ) -> None:
        event, out = first, _Out(up, up_writer)
        while True:
            if event is h11.NEED_DATA:
                try:
                    event = await _next_event(down, down_reader, out)
                except h11.RemoteProtocolError as e:
                    logger.info("bad request body from %s: %s", self._peer.name, e)
                    raise _Closed(str(e)) from e
            if isinstance(event, h11.Data):
                out.add(event)
                event = h11.NEED_DATA
            elif isinstance(event, h11.EndOfMessage):
                out.add(event)
                await out.flush()
                return
            else:  # ConnectionClosed mid-body
                raise _Closed("the client closed mid-request")

    async def _pump_response(
        self, down: h11.Connection, up: h11.Connection, up_reader: Reader, down_writer: Writer
    ) -> None:
        """Pass the app's answer down as it arrives, raw; h11 parses it only for framing.

        The answer is not rewritten, so it is not re-serialised either: h11 tells where
        it ends (and whether the connections may be reused); the bytes go down unchanged.
        """
        sent = False
        while True:
            try:
                event = up.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await up_reader.read(_READ_SIZE)
                    except (ConnectionError, OSError) as e:
                        raise _Closed(str(e)) from e
                    if data:
                        down_writer.write(data)
                        sent = True
                        await down_writer.drain()
                    up.receive_data(data)
                    continue
            except (h11.RemoteProtocolError, _Closed) as e:
                if not sent:
                    await self._refuse(down, down_writer, 502, f"the app's answer is broken: {e}")
                raise _Closed(str(e)) from e
            if isinstance(event, h11.EndOfMessage) or (
                isinstance(event, h11.InformationalResponse) and event.status_code == 101
            ):
                return
            if isinstance(event, h11.ConnectionClosed):
                if not sent:
                    await self._refuse(down, down_writer, 502, "the app closed the connection")
                raise _Closed("the app closed the connection")

    async def _refuse(
        self,
        down: h11.Connection,
        down_writer: Writer,
        status: int,
        message: str,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer ``status`` and close, if no response has started yet."""
        if down.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = (message + "\n").encode("utf-8", "replace")
        headers = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
            *(extra or []),
        ]
        with contextlib.suppress(h11.LocalProtocolError, ConnectionError, OSError):
            await _send(down, down_writer, h11.Response(status_code=status, headers=headers))
            await _send(down, down_writer, h11.Data(data=body))
            await _send(down, down_writer, h11.EndOfMessage())


async def _copy(initial: bytes, reader: Reader, writer: Writer) -> None:
    try:
        if initial:
            writer.write(initial)
            await writer.drain()
        while data := await reader.read(_READ_SIZE):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except (ConnectionError, OSError, NotImplementedError):  # NotImplemented: TLS streams
        return


async def _tunnel(
    pending: bytes,
    down_reader: Reader,
    down_writer: Writer,
    up_reader: Reader,
    up_writer: Writer,
) -> None:
    """After a 101: raw bytes both ways (the app's side went down raw already; ``pending``
    is what the client sent after its upgrade request)."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_copy(pending, down_reader, up_writer))
        tg.create_task(_copy(b"", up_reader, down_writer))


async def forward(
    downstream: tlsconn.TlsEndpoint,
    peer: inbound.Peer,
    app_host: str,
    app_port: int,
    cfg: config.Config,
    m: metrics.Metrics,
) -> None:
    """``--protocol http``: the ``inbound.Forwarder`` that speaks HTTP/1.1 to the app."""
    name = peer.facts.spiffe_id or peer.facts.subject
    loop = asyncio.get_running_loop()
    try:
        _, upstream = await loop.create_connection(pipe.PlainEndpoint, app_host, app_port)
    except OSError as e:
        m.connections.labels("inbound", "app_unreachable").inc()
        logs.event(
            logger,
            logging.WARNING,
            "app unreachable; answering 502",
            direction="inbound",
            peer_identity=name,
            app=f"{app_host}:{app_port}",
            reason=e.strerror or str(e),
        )
        fwd = HttpForwarder(Peer(peer.der, name=name), HttpSettings.from_config(cfg))
        await fwd.refuse_unreachable(downstream)
        downstream.close()
        return
    assert isinstance(upstream, pipe.PlainEndpoint)
    m.connections.labels("inbound", "ok").inc()
    active = m.active.labels("inbound")
    active.inc()
    try:
        fwd = HttpForwarder(Peer(peer.der, name=name), HttpSettings.from_config(cfg))
        with m.flow("inbound", downstream):
            await fwd.run(downstream, downstream, upstream, upstream)
    finally:
        active.dec()
        downstream.write_eof()
        downstream.close()
        upstream.close()
