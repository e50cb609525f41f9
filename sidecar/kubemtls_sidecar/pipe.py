"""The byte pump: two connection endpoints fused back to back, with half-close.

This is the hot path. Endpoints are asyncio Protocols that hand each chunk they receive
straight to their partner (no task wake-up per chunk, no StreamReader copy); flow control
is the transports' own: when one side's send buffer fills, the other side stops reading
(ghostunnel ``proxy.go`` ``fuse``/``copyData``, in callback form). At EOF a side
half-closes its partner (``write_eof``); a connection closes when both directions have
ended, when either side errors (RST/EPIPE are routine and logged at debug), or when
nothing moved for ``idle_timeout``.

Per chunk, a fused side counts what it received (``bytes_in``) and calls its partner's
``_send``: for a plain side that *is* its transport's ``write`` (no Python frame), for a
TLS side the encrypt-and-send (on the socket: ``SSLObject.write`` itself, no Python frame
either; the rare ``SSLWantWriteError`` goes to the partner's ``_send_failed``). What a side
sent while fused is its partner's ``bytes_in`` over that time (``bytes_out`` adds it), so
each chunk is counted once.

An endpoint that is not fused works as a small stream (``read``/``write``/``drain``/
``write_eof``/``close``) for code that must look at the bytes (``httpmode``).

Bulk transfers move 100-256 KiB chunks (the loop's read size, and their ciphertext), each
allocated and freed within one callback. glibc's default heap policy returns a freed top of
the heap above ~2x the largest chunk seen to the kernel, so depending on where the chunks
land, every chunk can fault its pages in again: ~70 page faults per read, twice the CPU per
byte, in some connections and not others. ``steady_allocator`` fixes the thresholds.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import typing
from collections.abc import Callable

__all__ = ["Endpoint", "PlainEndpoint", "fuse", "steady_allocator"]

logger = logging.getLogger(__name__)

_BUFFER_LIMIT = 1 << 20  # unfused read buffer before pausing the socket

# glibc mallopt parameters (malloc.h) and the values steady_allocator sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 1 << 20  # above any chunk of the data path: those come from the heap
_TRIM_THRESHOLD = 4 << 20  # free heap top kept (only after traffic; idle RSS unchanged)


def steady_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds so data-path chunks reuse heap pages.

    By default glibc raises both thresholds dynamically (trim at 2x the largest freed
    mmapped chunk); a bulk chunk pattern that leaves more than that free at the top of the
    heap is trimmed and faulted back in on every read (bench/RESULTS.md: bulk down). With
    fixed thresholds the pages stay mapped; at most ``_TRIM_THRESHOLD`` more RSS after a
    burst. False (and nothing changed) where there is no glibc ``mallopt`` (musl, macOS).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # Setting either threshold turns glibc's dynamic adjustment off: set both.
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


class Endpoint(asyncio.Protocol):
    """One side of a proxied connection (plain TCP here; TLS in ``tlsconn``)."""

    def __init__(self, on_connect: Callable[[Endpoint], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.partner: Endpoint | None = None
        self.read_closed = False  # the peer ended its direction (EOF / close_notify)
        self.write_closed = False  # we ended ours
        self.bytes_in = 0  # plaintext received from this side's peer
        self._bytes_out = 0  # plaintext written towards it through ``write``/``writelines``
        self._out_base = 0  # the partner's bytes_in when fused (see ``bytes_out``)
        self._on_connect = on_connect
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._rbuf = bytearray()
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._reading_paused = False
        self.peername: tuple[str, int] | None = None

    #: What a fused partner calls with plaintext for our peer, once it checked
    #: ``write_closed``; counted by the caller (its ``bytes_in``). Plain: the transport's
    #: ``write`` (set in ``connection_made``); TLS: a method.
    _send: Callable[[bytes], None]
    _send_many: Callable[[list[bytes]], None]  # the same for several chunks (vectored)

    def _send_failed(self, data: bytes, exc: OSError) -> None:
        """``_send(data)`` raised (only a TLS side on its socket does: ``tlsconn``)."""
        raise exc

    @property
    def bytes_out(self) -> int:
        """Plaintext written towards this side's peer (a fused partner's chunks included)."""
        p = self.partner
        if p is None:
            return self._bytes_out
        return self._bytes_out + p.bytes_in - self._out_base

    @bytes_out.setter
    def bytes_out(self, value: int) -> None:
        p = self.partner
        self._bytes_out = value if p is None else value - (p.bytes_in - self._out_base)

    # --- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self.transport = typing.cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peername = (str(peer[0]), int(peer[1])) if peer else None
        if self._on_connect is not None:
            self._on_connect(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.resume_reading()
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not isinstance(exc, ConnectionResetError | BrokenPipeError):
            logger.debug("connection lost: %r", exc)
        self.read_closed = self.write_closed = True
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake_reader()
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(ConnectionResetError("connection lost"))
        self._drain_waiters = []
        p = self.partner
        if p is not None and p.transport is not None and not p.closed.done():
            if exc is not None or not self._clean():
                p.abort()
            elif not p.write_closed:
                p.write_eof()

    def _clean(self) -> bool:
        return True

    # --- what a partner (or a stream user) calls ------------------------------------------
    def write(self, data: bytes) -> None:
        """Send plaintext towards this side's peer."""
        if self.write_closed or self.transport is None:
            return
        self._bytes_out += len(data)
        self.transport.write(data)

    def writelines(self, chunks: list[bytes]) -> None:
        """Send several chunks at once (a vectored write: no join copy)."""
        if self.write_closed or self.transport is None:
            return
        self._bytes_out += sum(map(len, chunks))
        self.transport.writelines(chunks)

    def write_eof(self) -> None:
        """End our direction (TCP FIN), keeping the other open."""
        if self.write_closed or self.transport is None:
            return
        self.write_closed = True
        self._send_fin()
        self._maybe_close()

    def _send_fin(self) -> None:
        """TCP FIN. A peer already gone (ENOTCONN, EPIPE) ends the connection instead of
        raising into the connection's task (the selector loop's ``write_eof`` raises)."""
        t = self.transport
        if t is None or not t.can_write_eof():
            return
        try:
            t.write_eof()
        except OSError as e:
            logger.debug("half-close failed, aborting: %r", e)
            t.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def release(self) -> None:
        """Abort unless already closed or closing (a pending alert or FIN still goes out)."""
        t = self.transport
        if t is not None and not self.closed.done() and not t.is_closing():
            t.abort()

    # --- stream use (when not fused) ------------------------------------------------------
    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (any amount if -1); b"" at EOF."""
        while not self._rbuf and not self.read_closed:
            self._read_waiter = self._loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        if n < 0 or n >= len(self._rbuf):
            data = bytes(self._rbuf)
            self._rbuf.clear()
        else:
            data = bytes(self._rbuf[:n])
            del self._rbuf[:n]
        if self._reading_paused and len(self._rbuf) < _BUFFER_LIMIT and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def drain(self) -> None:
        """Wait until the send buffer is below the high-water mark."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        if self._write_paused:
            w = self._loop.create_future()
            self._drain_waiters.append(w)
            await w

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the read buffer (a peeked request head, capture.py)."""
        self._rbuf[:0] = data

    # --- delivery of received plaintext ---------------------------------------------------
    def _deliver(self, data: bytes) -> None:
        self.bytes_in += len(data)
        p = self.partner
        if p is not None:
            if not p.write_closed:
                try:
                    p._send(data)
                except OSError as e:  # a TLS partner on its socket (free when nothing raises)
                    p._send_failed(data, e)
            return
        self._rbuf += data
        self._wake_reader()
        if len(self._rbuf) >= _BUFFER_LIMIT and self.transport and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _deliver_many(self, chunks: list[bytes]) -> None:
        p = self.partner
        if p is not None:
            self.bytes_in += sum(map(len, chunks))
            if not p.write_closed:
                p._send_many(chunks)
        else:
            self._deliver(b"".join(chunks))

    def _deliver_eof(self) -> None:
        if self.read_closed:
            return
        self.read_closed = True
        if self.partner is not None:
            self.partner.write_eof()
        self._wake_reader()
        self._maybe_close()

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _maybe_close(self) -> None:
        if self.read_closed and self.write_closed and self.transport is not None:
            self.transport.close()


class PlainEndpoint(Endpoint):
    """A plaintext TCP side (the app, or the local client of an outbound port)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = typing.cast(asyncio.Transport, transport)
        self._send, self._send_many = t.write, t.writelines  # no Python frame per chunk
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        p = self.partner
        if p is not None:  # the fused hot path of _deliver, inlined (once per chunk)
            self.bytes_in += len(data)
            if not p.write_closed:
                try:
                    p._send(data)
                except OSError as e:
                    p._send_failed(data, e)
        else:
            self._deliver(data)

    def eof_received(self) -> bool:
        self._deliver_eof()
        return True  # keep our direction open (half-close)


async def fuse(a: Endpoint, b: Endpoint, *, idle_timeout: float = 0) -> None:
    """Pump bytes both ways between ``a`` and ``b`` until both directions end."""
    a._out_base, b._out_base = b.bytes_in, a.bytes_in
    a.partner, b.partner = b, a
    for src, dst in ((a, b), (b, a)):
        if src._rbuf:
            data = bytes(src._rbuf)
            src._rbuf.clear()
            dst.write(data)
        if src.read_closed and not src.closed.done():
            dst.write_eof()
        if src._reading_paused and src.transport is not None:
            src._reading_paused = False
            src.transport.resume_reading()
        if src.closed.done() and not dst.closed.done():
            dst.close() if dst.write_closed else dst.write_eof()
    loop = asyncio.get_running_loop()
    timer: asyncio.TimerHandle | None = None
    last = -1

    def check() -> None:
        nonlocal timer, last
        moved = a.bytes_in + b.bytes_in
        if moved == last:
            logger.debug("closing idle connection after %ss", idle_timeout)
            a.abort()
            b.abort()
            return
        last = moved
        timer = loop.call_later(idle_timeout, check)

    if idle_timeout > 0:
        timer = loop.call_later(idle_timeout, check)
    # One future for "both closed" (cheaper than gather over two shields); cancelling
    # the wait (a drain cut) leaves the sides' own ``closed`` futures untouched.
    both: asyncio.Future[None] = loop.create_future()

    def on_closed(_: object) -> None:
        if a.closed.done() and b.closed.done() and not both.done():
            both.set_result(None)

    a.closed.add_done_callback(on_closed)
    b.closed.add_done_callback(on_closed)
    try:
        await both
    finally:
        a.closed.remove_done_callback(on_closed)
        b.closed.remove_done_callback(on_closed)
        if timer is not None:
            timer.cancel()
        out_a, out_b = a.bytes_out, b.bytes_out
        a.partner = b.partner = None
        a._bytes_out, b._bytes_out = out_a, out_b
