"""A TLS connection's data phase on its socket: OpenSSL reads and writes the socket itself.

``tlsconn`` runs every handshake over memory BIOs, so that a refused handshake's alert is
sent before we close (CPython 98078). Once the handshake is done, the memory BIOs only cost:
per record, the event loop reads the ciphertext into a bytes object, ``MemoryBIO.write``
copies it in, ``SSLObject.read`` decrypts; on the way out ``SSLObject.write`` encrypts into
the outgoing BIO, ``MemoryBIO.read`` copies it into another bytes object, the loop writes
that (and takes the GIL for each of its callbacks). ``attach`` points the connection's
``SSL`` at the socket instead (``SSL_set_fd`` on a duplicate of its descriptor; ``tlsconn`` does it
once a connection has carried a few chunks, so one-exchange connections skip it): a readable
socket wakes ``SSLObject.read``, which receives and decrypts in C; ``SSLObject.write``
encrypts and sends in C. No ciphertext ever becomes a Python object. Measured on a 1 KiB
request/response proxy side, 32 connections: -18 % user CPU, -8 % CPU in all
(bench/sidecar_tls_io.py).

The uvloop transport stays as it is, reading paused and its buffer empty: it still owns the
socket's other descriptor, its peer address and its ``write_eof`` (the TCP FIN); ``SocketIO``
stands in for it as the endpoint's ``transport`` (reading, flow control, close).

Python has no API for ``SSL_set_fd`` on an ``SSLObject``; the ``SSL *`` is the second field
of CPython's ``PySSLSocket`` (3.7-3.13), and it is used only once OpenSSL confirms it is
this connection's (its ``SSL_CTX`` is the one Python set, its role the one we asked for).
If anything does not match, ``attach`` returns None and the connection keeps its memory
BIOs: the same bytes, only slower. ``--tls-io memory`` keeps them for every connection.

Writes: ``SSL_write`` on a non-blocking socket either sends all it was given or raises
``SSLWantWriteError`` having kept a partly sent record; OpenSSL then requires the very same
data again (CPython sets ``SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER``, so the same bytes at any
address). What cannot be written waits here, first item first, until the socket is writable;
meanwhile the partner stops reading (``Endpoint.pause_writing``).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import functools
import logging
import os
import ssl
from typing import Any, Protocol

from kubemtls_sidecar import sslknobs

__all__ = ["Owner", "SocketIO", "attach"]

logger = logging.getLogger(__name__)

_SSL_ERROR_WANT_WRITE = 3
# A TCP FIN without close_notify: OpenSSL would call it a fatal error, send a decode_error
# alert down the socket and refuse to write any more, where a proxy must only end that
# direction (the memory-BIO path never shows OpenSSL the FIN). With this option the read
# returns as for close_notify (CPython: b"" or SSLZeroReturnError), and writing goes on.
_SSL_OP_IGNORE_UNEXPECTED_EOF = 1 << 7
# The option is OpenSSL 3.0's: before it, a FIN could not be told from a reset (both
# SSLEOFError), so connections keep their BIOs there. With it, an ``SSLEOFError`` is the
# socket failing: CPython reports every SSL_ERROR_SYSCALL of an ``SSLObject`` (ECONNRESET,
# EPIPE) as ``SSLEOFError``, having no socket to read errno from.
# PySSLSocket: PyObject_HEAD, PyObject *Socket, SSL *ssl (Modules/_ssl.c, 3.7-3.13)
_SSL_OFFSET = object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)


@functools.cache
def _lib() -> Any:
    lib = sslknobs.libssl()
    if lib is None or ssl.OPENSSL_VERSION_INFO < (3, 0):
        return None
    try:
        for name, res, args in (
            ("SSL_get_SSL_CTX", ctypes.c_void_p, [ctypes.c_void_p]),
            ("SSL_is_server", ctypes.c_int, [ctypes.c_void_p]),
            ("SSL_set_fd", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
            ("SSL_set_options", ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_uint64]),
            ("SSL_shutdown", ctypes.c_int, [ctypes.c_void_p]),
            ("SSL_get_error", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
            ("ERR_clear_error", None, []),
        ):
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
    except AttributeError as e:
        logger.debug("libssl lacks a function for socket I/O: %r", e)
        return None
    return lib


_CTX_POINTERS: dict[int, int | None] = {}  # id(SSLContext) -> SSL_CTX * (contexts kept alive)


def _ctx_pointer(ctx: ssl.SSLContext) -> int | None:
    key = id(ctx)
    if key not in _CTX_POINTERS:
        _CTX_POINTERS[key] = sslknobs.ssl_ctx_pointer(ctx)
    return _CTX_POINTERS[key]


def ssl_pointer(sslobj: ssl.SSLObject, server_side: bool) -> int | None:
    """The connection's ``SSL *``, or None unless OpenSSL confirms it is this one.

    ``sslobj.context`` must be a context that lives as long as the process (``tlsconn``'s
    data-phase contexts): its pointer is cached by identity.
    """
    lib = _lib()
    obj = getattr(sslobj, "_sslobj", None)
    if lib is None or obj is None:
        return None
    ptr = ctypes.c_void_p.from_address(id(obj) + _SSL_OFFSET).value
    if not ptr:
        return None
    ctx_ptr = _ctx_pointer(sslobj.context)
    if ctx_ptr is None or lib.SSL_get_SSL_CTX(ptr) != ctx_ptr:
        return None
    if bool(lib.SSL_is_server(ptr)) != server_side:
        return None
    return int(ptr)


class Owner(Protocol):
    """What ``SocketIO`` calls on its endpoint (``tlsconn.TlsEndpoint``)."""

    def _send(self, data: bytes) -> None: ...
    def socket_readable(self) -> None: ...
    def socket_failed(self, exc: Exception) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class SocketIO:
    """The endpoint's transport once its data phase runs on the socket."""

    def __init__(self, owner: Owner, sslobj: Any, raw: Any, fd: int, ptr: int) -> None:
        self._owner: Owner | None = owner  # None once torn down (no cycle left behind)
        self._obj, self._raw, self._fd, self._ptr = sslobj, raw, fd, ptr
        self._loop = asyncio.get_running_loop()
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_size = 0
        self.reading = False
        self._writer = False
        self._eof_queued = False  # close_notify + FIN once the pending data is out
        self._close_queued = False
        self._closed = False

    # --- reading ----------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self.reading and not self._closed:
            self.reading = True
            assert self._owner is not None  # not closed
            self._loop.add_reader(self._fd, self._owner.socket_readable)

    def is_reading(self) -> bool:
        return self.reading

    # --- writing ----------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Encrypt and send plaintext behind any queued data (the owner's ``_send`` while a
        queue is out; otherwise that is ``SSLObject.write`` itself)."""
        if self._pending:
            self._pending.append(data)
            self._pending_size += len(data)
            return
        try:
            self._obj.write(data)
        except ssl.SSLWantWriteError:
            self._queue(data)
        except OSError as e:  # ssl.SSLError included
            self._failed(e)

    def write_failed(self, data: bytes, exc: OSError) -> None:
        """A direct ``SSLObject.write`` of ``data`` (the owner's ``_send``) raised."""
        if isinstance(exc, ssl.SSLWantWriteError):
            self._queue(data)
        else:
            self._failed(exc)

    def send_many(self, chunks: list[bytes]) -> None:
        write = self._obj.write
        for i, data in enumerate(chunks):
            if self._pending:
                self._pending.extend(chunks[i:])
                self._pending_size += sum(map(len, chunks[i:]))
                return
            try:
                write(data)
            except ssl.SSLWantWriteError:
                self._queue(data)
            except OSError as e:
                self._failed(e)
                return

    def _queue(self, data: bytes) -> None:
        self._pending.append(data)  # first: to be retried as it is
        self._pending_size += len(data)
        if self._owner is not None:
            self._owner._send = self.send  # type: ignore[method-assign]  # behind the queue
        self._arm_writer()

    def _arm_writer(self) -> None:
        if not self._writer and not self._closed:
            self._writer = True
            self._loop.add_writer(self._fd, self._writable)
            if self._owner is not None:
                self._owner.pause_writing()

    def _writable(self) -> None:
        write, pending = self._obj.write, self._pending
        while pending:
            data = pending[0]
            try:
                write(data)
            except ssl.SSLWantWriteError:
                return
            except OSError as e:
                self._failed(e)
                return
            pending.popleft()
            self._pending_size -= len(data)
        if self._owner is not None:
            self._owner._send = write  # type: ignore[method-assign]  # straight to SSL_write
        if self._eof_queued and not self._shutdown():
            return  # close_notify still waits for room
        self._writer = False
        self._loop.remove_writer(self._fd)
        if self._close_queued:
            self._teardown()
            self._raw.close()
            return
        if self._owner is not None:
            self._owner.resume_writing()

    def _failed(self, e: OSError) -> None:
        if self._owner is not None:
            self._owner.socket_failed(e)

    def get_write_buffer_size(self) -> int:
        return self._pending_size

    # --- ending -----------------------------------------------------------------------------
    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """close_notify, then TCP FIN (after any pending data); reading goes on."""
        if self._closed or self._eof_queued:
            return
        self._eof_queued = True
        if not self._pending:
            self._shutdown()

    def _shutdown(self) -> bool:
        """Send close_notify (one ``SSL_shutdown``: never reads) and FIN; False: retry."""
        lib = _lib()
        ret = lib.SSL_shutdown(self._ptr)
        if ret < 0:
            err = lib.SSL_get_error(self._ptr, ret)
            lib.ERR_clear_error()
            if err == _SSL_ERROR_WANT_WRITE:
                self._arm_writer()
                return False
            logger.debug("close_notify not sent (SSL_get_error %d)", err)
        self._eof_queued = False
        if self._raw.can_write_eof():
            try:
                self._raw.write_eof()
            except OSError as e:
                logger.debug("half-close failed: %r", e)
        return True

    def close(self) -> None:
        """Close once the pending data (and close_notify) are sent."""
        if self._closed:
            return
        if self._pending or self._eof_queued:
            self._close_queued = True
            return
        self._teardown()
        self._raw.close()

    def abort(self) -> None:
        self._teardown()
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closed or self._close_queued or bool(self._raw.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._raw.get_extra_info(name, default)

    def _teardown(self) -> None:
        """Stop watching and close our descriptor (the transport closes its own)."""
        if self._closed:
            return
        self._closed = True
        if self.reading:
            self.reading = False
            self._loop.remove_reader(self._fd)
        if self._writer:
            self._writer = False
            self._loop.remove_writer(self._fd)
        self._pending.clear()
        self._pending_size = 0
        self._owner = None
        # Point the SSL at no descriptor before closing ours: the number may be reused by
        # another connection at once, and a late write must fail, not land there.
        _lib().SSL_set_fd(self._ptr, -1)
        os.close(self._fd)


def attach(owner: Owner, sslobj: ssl.SSLObject, raw: Any, *, server_side: bool) -> SocketIO | None:
    """Move an established connection's data phase onto its socket (None: it stays on BIOs).

    The caller guarantees its incoming BIO is empty (no partial record would be lost) and
    its outgoing BIO flushed; the transport's own buffer must be empty too.
    """
    if raw.get_write_buffer_size():
        return None
    ptr = ssl_pointer(sslobj, server_side)
    sock = raw.get_extra_info("socket")
    if ptr is None or sock is None:
        logger.debug("SSL or socket not confirmed: the data phase stays on memory BIOs")
        return None
    try:
        fd = os.dup(sock.fileno())
    except OSError as e:  # EMFILE: keep the BIOs
        logger.debug("no descriptor for socket I/O: %r", e)
        return None
    lib = _lib()
    lib.SSL_set_options(ptr, _SSL_OP_IGNORE_UNEXPECTED_EOF)
    if lib.SSL_set_fd(ptr, fd) != 1:
        lib.ERR_clear_error()
        os.close(fd)
        return None
    raw.pause_reading()
    io = SocketIO(owner, getattr(sslobj, "_sslobj", sslobj), raw, fd, ptr)
    io.resume_reading()
    return io
