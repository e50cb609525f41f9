"""Our own small TLS transport: ``ssl.SSLObject`` over ``ssl.MemoryBIO``, driven by a Protocol.

Why not asyncio's SSL transport: on a failed handshake CPython 3.11 closes the socket
without flushing the alert OpenSSL produced (https://github.com/python/cpython/issues/98078),
so the peer sees "connection reset" instead of ``unknown_ca`` or ``certificate_revoked``.
Here every byte OpenSSL writes to the outgoing BIO is sent before we close, the failure is
classified (``alerts.classify``), and the same ``SSLObject`` carries the data phase:
socket bytes → incoming BIO → ``read()`` → partner; partner → ``write()`` → outgoing BIO →
socket, one ``transport.write`` per received chunk (records are batched, no per-record
syscalls, no task switch per chunk). Once a connection has carried a few chunks
(``_ATTACH_AFTER``), its data phase moves onto the socket itself where it can (``sockio``:
OpenSSL reads and writes the descriptor, no ciphertext passes through Python); the BIO
path stays for ``--tls-io memory``, for short connections, and for one that cannot move.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import typing
from collections.abc import Callable
from typing import Any

from kubemtls_sidecar import alerts, pipe, sockio

__all__ = ["HandshakeError", "TlsEndpoint", "enable_peer_capture"]

logger = logging.getLogger(__name__)

# One read returns one record's plaintext, at most 2**14 bytes (RFC 8446 §5.1): asking
# for more only makes _ssl allocate a bigger bytes object and shrink it on every read.
_READ_SIZE = 16 * 1024
_PRESENTED = "kubemtls_presented"  # attribute set on the SSLObject by the message callback
# Data-phase chunks (received or sent) a connection carries over the BIOs before it moves
# onto its socket (sockio). Moving costs a few system calls (dup, epoll add/remove, close:
# ~1-2 % of a new connection's CPU): a connection that only carries one exchange (a
# request, its response) never pays it; one that goes on moves at its second exchange.
_ATTACH_AFTER = 4


def _first_certificate(msg: bytes) -> bytes | None:
    """The first DER certificate of a TLS Certificate handshake message (1.2 or 1.3)."""
    body = msg[4:]
    if len(body) >= 3 and int.from_bytes(body[:3], "big") == len(body) - 3:
        entries = body[3:]  # TLS 1.2: certificate_list
    elif body:
        ctx_len = body[0]  # TLS 1.3: certificate_request_context, then certificate_list
        entries = body[1 + ctx_len + 3 :]
    else:
        return None
    if len(entries) < 3:
        return None  # an empty list: no certificate presented
    n = int.from_bytes(entries[:3], "big")
    der = entries[3 : 3 + n]
    return der if len(der) == n and n else None


def _on_message(
    conn: object, direction: str, version: int, content_type: int, msg_type: int, data: bytes
) -> None:
    # Handshake (22) Certificate (11) message from the peer: keep its leaf for the log
    # line of a refused handshake (getpeercert() is unavailable once the handshake failed).
    if content_type == 22 and msg_type == 11 and direction == "read":
        with contextlib.suppress(Exception):
            setattr(conn, _PRESENTED, _first_certificate(data))


def enable_peer_capture(ctx: ssl.SSLContext) -> None:
    """Record the certificate a peer presents, during the handshake only.

    Uses the C-level message callback of ``_ssl._SSLContext`` (the ``ssl.SSLContext``
    property wraps it in enum conversions that cost ~5 us per record). It is called for
    every record header too, so ``TlsEndpoint`` moves each connection to a context without
    the callback once its handshake is over (``SSLObject.context``: CPython's setter also
    clears the connection's C-level callback, so the data phase never enters it).
    """
    base = ssl.SSLContext.__mro__[1]  # _ssl._SSLContext
    base._msg_callback.__set__(ctx, _on_message)  # type: ignore[attr-defined]


_QUIET: dict[bool, ssl.SSLContext] = {}


def _quiet_context(server_side: bool) -> ssl.SSLContext:
    """A context without the callback, for the data phase (only its identity matters)."""
    ctx = _QUIET.get(server_side)
    if ctx is None:
        ctx = _QUIET[server_side] = ssl.SSLContext(
            ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT
        )
    return ctx


class HandshakeError(Exception):
    """A refused or failed handshake, with the alert as classified."""

    def __init__(
        self, failure: alerts.Failure, presented: dict[str, str | None] | None = None
    ) -> None:
        super().__init__(failure.reason)
        self.failure = failure
        self.presented = presented or {}  # the peer's claimed identity, for the log


class TlsEndpoint(pipe.Endpoint):
    """A TLS side of a connection (server for inbound, client for outbound)."""

    def __init__(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | bytes | None = None,
        on_connect: Callable[[pipe.Endpoint], None] | None = None,
        socket_io: bool = True,
    ) -> None:
        super().__init__(on_connect)
        # Chunks to go before the data phase moves onto the socket (sockio); < 0: never.
        self._attach_in = _ATTACH_AFTER if socket_io else -1
        self.io: sockio.SocketIO | None = None  # set once it has moved
        self._reset = False  # the socket failed (reset): the partner is aborted, not ended
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        # The C object under ``ssl.SSLObject``: its read/write/pending without the Python
        # wrapper frame (a few hundred instructions per call, several calls per request).
        # A private attribute (CPython 3.7-3.13): without it, the public wrapper does the same.
        self._obj: Any = getattr(self.ssl, "_sslobj", self.ssl)
        self.established = False
        self.handshake: asyncio.Future[None] = self._loop.create_future()
        #: A TLS error after the handshake (TLS 1.3: a server refusing our client
        #: certificate answers after our handshake has completed).
        self.failure: alerts.Failure | None = None

    # --- handshake ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.ssl.server_side:
            self._handshake_step()

    def _handshake_step(self) -> None:
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as e:
            flushed = self._outgoing.read()
            if flushed and self.transport is not None:
                self.transport.write(flushed)  # the alert: close() sends it before FIN
            self._fail(alerts.classify(e, flushed=flushed))
            return
        self._flush()
        self.established = True
        # Leave the context with the handshake-only message callback (see
        # enable_peer_capture); the session, keys and peer certificate stay.
        self.ssl.context = _quiet_context(self.ssl.server_side)
        if not self.handshake.done():
            self.handshake.set_result(None)
        if self._incoming.pending:
            self._read_ssl()  # application data that came with the last flight
            self._attach_in -= 1  # a chunk carried
            if not self._attach_in:
                self._attach_socket()

    def _attach_socket(self) -> None:
        """Run the data phase on the socket if nothing is in flight in the BIOs.

        Called when ``_attach_in`` reaches 0; sets it to 1 to try again at the next chunk
        (bytes in flight), or leaves it to run negative (never: ended, or refused).
        """
        t = self.transport
        if t is None or self.closed.done() or self.read_closed or self.write_closed:
            return
        if self._incoming.pending or self._outgoing.pending or t.get_write_buffer_size():
            self._attach_in = 1  # a partial record, or ciphertext still queued: later
            return
        io = sockio.attach(self, self.ssl, t, server_side=self.ssl.server_side)
        if io is None:
            return
        self.io = io
        self.transport = typing.cast(asyncio.Transport, io)
        # A partner's chunks go straight to SSL_write (io.write_failed on a full socket
        # switches _send to io.send, which queues, until the queue is out).
        self._send = self._obj.write  # type: ignore[method-assign]
        self._send_many = io.send_many  # type: ignore[method-assign]

    def timed_out(self) -> None:
        """The owner's handshake deadline passed: fail the wait with TimeoutError."""
        if not self.handshake.done():
            self.handshake.set_exception(TimeoutError())

    def _fail(self, failure: alerts.Failure) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeError(failure, self.presented()))
            self.handshake.exception()  # retrieved: the owner may have given up waiting
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.Protocol ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        incoming = self._incoming
        incoming.write(data)
        if not self.established:
            self._handshake_step()
            return
        try:
            chunk = self._obj.read(_READ_SIZE)
        except ssl.SSLError as e:
            self._read_failed(e)
            return
        # The common case, one whole record (a shorter read than asked emptied its record:
        # one record per read, no read-ahead) and nothing left: _read_ssl's work, inlined.
        # The outgoing BIO is not checked here: a peer's KeyUpdate (update_requested)
        # queues nothing on read; OpenSSL 3 sends our answer with our next SSL_write,
        # ahead of its data, as RFC 8446 §4.6.3 asks (tests/sidecar/test_keyupdate.py).
        if chunk and len(chunk) < _READ_SIZE and not incoming.pending:
            p = self.partner
            if p is not None:
                self.bytes_in += len(chunk)
                if not p.write_closed:
                    send = p._send  # an instance attribute: LOAD_ATTR is specialized
                    send(chunk)
            else:
                self._deliver(chunk)
        else:
            self._read_ssl(chunk)
        self._attach_in -= 1
        if not self._attach_in:
            self._attach_socket()

    def eof_received(self) -> bool:
        if not self.established:
            self._fail(
                alerts.Failure(
                    None,
                    "none",
                    "eof_in_handshake",
                    "the peer closed the connection during the handshake",
                )
            )
            return False
        # TCP FIN without close_notify: end the direction anyway
        self._deliver_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.io is not None:
            self.io._teardown()
        if not self.handshake.done():
            self._fail(
                alerts.Failure(
                    None,
                    "none",
                    "connection_lost",
                    f"connection lost during the handshake ({exc or 'closed'})",
                )
            )
        super().connection_lost(exc)

    # --- data phase ------------------------------------------------------------------------
    def _read_ssl(self, first: bytes | None = None) -> None:
        """Decrypt what the incoming BIO holds (``first``: what a read already returned)."""
        obj, incoming = self._obj, self._incoming
        chunks: list[bytes] = []
        eof = False
        try:
            while True:
                if first is None:
                    chunk = obj.read(_READ_SIZE)
                else:
                    chunk, first = first, None
                if not chunk:  # close_notify (CPython returns b"" until we send ours)
                    eof = True
                    break
                chunks.append(chunk)
                # Stop when nothing is left rather than on SSLWantReadError (a raise costs
                # more than these checks). A read shorter than asked emptied its record
                # (one record per read: no read-ahead), so obj.pending() (a GIL hand-off)
                # can only be non-zero after a full-size read.
                if not incoming.pending and (len(chunk) < _READ_SIZE or not obj.pending()):
                    break
        except ssl.SSLError as e:
            if not isinstance(e, ssl.SSLWantReadError | ssl.SSLZeroReturnError):
                self._read_failed(e)
                return
            eof = isinstance(e, ssl.SSLZeroReturnError)
        if chunks:
            if len(chunks) > 1:
                self._deliver_many(chunks)
            else:
                self._deliver(chunks[0])
        if self._outgoing.pending:
            self._flush()  # e.g. an alert OpenSSL queued while reading
        if eof:
            self._deliver_eof()

    # --- data phase on the socket (sockio) ---------------------------------------------------
    def socket_readable(self) -> None:
        """The socket has bytes: decrypt a record (OpenSSL reads the socket itself)."""
        try:
            chunk = self._obj.read(_READ_SIZE)
        except OSError as e:  # ssl.SSLError included
            self.socket_failed(e)
            return
        # The common case, as in data_received: one whole record shorter than the maximum.
        # A record still arriving raises SSLWantReadError above (the socket stays readable,
        # level-triggered, until the rest comes).
        if chunk and len(chunk) < _READ_SIZE:
            p = self.partner
            if p is not None:
                self.bytes_in += len(chunk)
                if not p.write_closed:
                    send = p._send
                    send(chunk)
            else:
                self._deliver(chunk)
            return
        self._socket_read_more(chunk)

    def _socket_read_more(self, first: bytes) -> None:
        """A full-size record (more likely follow: read on, up to 16) or close_notify."""
        io, obj = self.io, self._obj
        chunks: list[bytes] = []
        error: OSError | None = None
        chunk = first
        while True:
            if not chunk:  # close_notify (b"" while we have not sent ours)
                error = ssl.SSLZeroReturnError()
                break
            chunks.append(chunk)
            if len(chunk) < _READ_SIZE or len(chunks) >= 16 or io is None or not io.reading:
                break
            try:
                chunk = obj.read(_READ_SIZE)
            except OSError as e:
                error = e
                break
        if chunks:
            if len(chunks) > 1:
                self._deliver_many(chunks)
            else:
                self._deliver(chunks[0])
        if error is not None:
            self.socket_failed(error)

    def socket_failed(self, exc: Exception) -> None:
        """A read or write on the socket raised: wait, end the direction, or fail."""
        if isinstance(exc, ssl.SSLWantReadError | ssl.SSLWantWriteError):
            return  # a record not complete yet (or OpenSSL must write first: it will)
        io = self.io
        if isinstance(exc, ssl.SSLZeroReturnError):
            # close_notify, or a TCP FIN without it (SSL_OP_IGNORE_UNEXPECTED_EOF, sockio):
            # end this direction
            if io is not None:
                io.pause_reading()  # an ended socket stays readable: stop watching it
            self._deliver_eof()
            return
        # SSLEOFError here is the socket failing (sockio: FIN is a zero return)
        if isinstance(exc, ssl.SSLError) and not isinstance(
            exc, ssl.SSLSyscallError | ssl.SSLEOFError
        ):
            self.failure = alerts.classify(exc)  # e.g. the peer's alert, a bad record MAC
            logger.debug("TLS error in the data phase: %s", exc)
        else:
            self._reset = True  # the socket itself failed (ECONNRESET, EPIPE)
            logger.debug("socket error in the data phase: %r", exc)
        self.abort()

    def _clean(self) -> bool:
        return not self._reset

    def _read_failed(self, e: ssl.SSLError) -> None:
        """A read raised: a partial record (wait for more), close_notify, or a TLS error."""
        if isinstance(e, ssl.SSLWantReadError):
            self._flush()
        elif isinstance(e, ssl.SSLZeroReturnError):
            self._flush()
            self._deliver_eof()
        else:
            self.failure = alerts.classify(e)
            logger.debug("TLS error in the data phase: %s", e)
            self._flush()
            self.abort()

    # SSL_write without SSL_MODE_ENABLE_PARTIAL_WRITE (CPython never sets it) writes all
    # of ``data`` or raises, and a memory BIO always has room: no partial writes to resume.
    # What a fused partner calls (pipe.Endpoint._send): the BIO path, as methods (an
    # instance attribute holding a bound method of self would make every endpoint a
    # reference cycle); once on the socket, instance attributes shadow them.
    def _send(self, data: bytes) -> None:
        """Encrypt and send (a fused partner's chunk; it checked ``write_closed``)."""
        self._obj.write(data)
        self.transport.write(self._outgoing.read())  # type: ignore[union-attr]
        self._attach_in -= 1
        if not self._attach_in:
            self._attach_socket()

    def _send_many(self, chunks: list[bytes]) -> None:
        obj = self._obj
        for data in chunks:
            obj.write(data)
        self.transport.write(self._outgoing.read())  # type: ignore[union-attr]
        self._attach_in -= 1
        if not self._attach_in:
            self._attach_socket()

    def write(self, data: bytes) -> None:
        if self.write_closed or self.transport is None or not self.established:
            return
        self._bytes_out += len(data)
        try:
            self._send(data)
        except OSError as e:
            self._send_failed(data, e)

    def _send_failed(self, data: bytes, exc: OSError) -> None:
        io = self.io
        if io is None:
            raise exc  # the BIO path never waits for the socket: a real error
        io.write_failed(data, exc)

    def writelines(self, chunks: list[bytes]) -> None:
        if self.write_closed or self.transport is None or not self.established:
            return
        self._bytes_out += sum(map(len, chunks))
        self._send_many(chunks)

    def write_eof(self) -> None:
        """Send close_notify, then FIN; the peer may still send to us (TLS half-close)."""
        if self.write_closed or self.transport is None:
            return
        self.write_closed = True
        if self.established and self.io is None:
            # unwrap() sends close_notify, then wants the peer's: SSLWantReadError. The
            # incoming BIO holds no complete record here (data_received drains it), so
            # OpenSSL's shutdown read discards nothing.
            with contextlib.suppress(ssl.SSLError):
                self.ssl.unwrap()
            self._flush()
        self._send_fin()  # on the socket: SocketIO.write_eof sends close_notify, then FIN
        self._maybe_close()

    def _flush(self) -> None:
        if self._outgoing.pending and self.transport is not None:
            self.transport.write(self._outgoing.read())

    def presented(self) -> dict[str, str | None]:
        """Who the peer claimed to be in a failed handshake (log fields; empty if unknown)."""
        der = getattr(self.ssl, _PRESENTED, None)
        if not der:
            return {}
        try:
            from kubemtls_sidecar import der as derlib  # pure: no cryptography

            f = derlib.facts(der)
        except Exception:  # a malformed certificate: say nothing rather than fail the log
            return {}
        return {"peer_identity": f.spiffe_id or f.subject, "peer_serial": f.serial}

    def peer_certificate_der(self) -> bytes | None:
        """The peer's leaf certificate (DER), once the handshake is done."""
        if not self.established:
            return None
        return self.ssl.getpeercert(binary_form=True)
