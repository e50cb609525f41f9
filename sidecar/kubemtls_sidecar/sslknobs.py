"""Two OpenSSL context settings Python's ``ssl`` module does not expose.

**No auto-chain.** When the certificate file holds only the leaf, OpenSSL completes the
chain it sends from the context's trust store (``SSL_MODE_NO_AUTO_CHAIN`` unset): every
handshake then runs a chain build (``X509_verify_cert``, ~1 M instructions) to append our
own trust anchor, and the peer decodes one more certificate (``d2i_X509``, ~1.5 M
instructions in OpenSSL 3.0), about a quarter of a full mTLS handshake's CPU on each side.
A peer must already hold the anchor to trust us, so sending it is useless (RFC 8446
§4.4.2: a certificate specifying a trust anchor MAY be omitted). HAProxy does not send it
in the benchmark (its peer decodes one certificate per handshake); Go's crypto/tls and
BoringSSL have no auto-chain at all. ``omit_trust_anchor`` sets the mode only when the
store holds nothing but self-signed certificates, so auto-chain could only ever have
appended an anchor. A bundle holding an intermediate keeps OpenSSL's behaviour (the
intermediate may be needed by the peer).

**Record buffers: measured, not applied.** CPython sets ``SSL_MODE_RELEASE_BUFFERS`` on
every context (``_ssl.c``, "for lower memory usage"): OpenSSL frees its record read buffer
(~17 KiB) once an ``SSL_read`` has emptied it and its write buffer (~17 KiB) after every
``SSL_write``, and mallocs them again for the next record. ``keep_record_buffers`` clears
the mode (a connection copies it from its context at ``SSL_new``, so it survives the move
to ``tlsconn``'s data-phase context). It saves 1.2-1.8 k of ~37-39 k instructions per
1 KiB request/response on each side (bench/sidecar_instructions.py, rr), yet CPU time per
request did not follow: interleaved runs at 32 connections (``--cpu``) gave each side
~+10 % user time, the harness A/B (18 rounds) a +3.5 % median (likely cache: with the mode
every connection reuses the one buffer just freed, still hot; kept buffers are two per
connection, cold after the other processes ran). And each open connection holds more
memory: +11 KiB after 1 KiB messages (50 KiB instead of 39), +32 KiB after 16 KiB ones
(115 instead of 83; bench/sidecar_conn_memory.py). HAProxy sets the mode itself
(``ssl_sock_prepare_ctx``). So the sidecar keeps CPython's default
(tests/sidecar/test_record_buffers.py); to measure it again, call ``keep_record_buffers``
next to ``omit_trust_anchor`` in ``tlsstore.build_contexts``.

``libssl`` and ``ssl_ctx_pointer`` are shared with ``sockio`` (the data phase on the socket).

Python has no API for ``SSL_CTX_set_mode``; the ``SSL_CTX *`` is the first field of
CPython's ``PySSLContext`` (unchanged from 3.7 to 3.13; sslkeylog reads it the same way),
and the call goes through the very libssl ``_ssl`` is linked with. The pointer is checked
first (OpenSSL must report the options and verify mode Python reports for the same
context); if anything does not match, nothing is changed (a debug line says so) and the
connections behave as before, only slower.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import ssl
import sys

__all__ = ["keep_record_buffers", "libssl", "omit_trust_anchor", "ssl_ctx_pointer"]

logger = logging.getLogger(__name__)

_SSL_CTRL_MODE = 33  # SSL_CTX_set_mode
_SSL_CTRL_CLEAR_MODE = 78  # SSL_CTX_clear_mode
_SSL_MODE_NO_AUTO_CHAIN = 0x8
_SSL_MODE_RELEASE_BUFFERS = 0x10


@functools.cache
def libssl() -> ctypes.CDLL | None:
    """``_ssl``'s own libssl through ctypes (None: not CPython 3.7-3.13, or unreachable)."""
    if sys.implementation.name != "cpython" or not (3, 7) <= sys.version_info[:2] <= (3, 13):
        return None
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)  # dlsym searches _ssl's own libssl/libcrypto
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
        lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError, ImportError) as e:
        logger.debug("libssl not reachable through ctypes: %r", e)
        return None
    return lib


def ssl_ctx_pointer(ctx: ssl.SSLContext) -> int | None:
    """The context's ``SSL_CTX *``, or None unless OpenSSL confirms it is this context."""
    lib = libssl()
    if lib is None:
        return None
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        return None
    if lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        return None
    if lib.SSL_CTX_get_verify_mode(ptr) != _openssl_verify_mode(ctx):
        return None
    return int(ptr)


def _openssl_verify_mode(ctx: ssl.SSLContext) -> int:
    # SSL_VERIFY_PEER 1, SSL_VERIFY_FAIL_IF_NO_PEER_CERT 2 (as _ssl.c sets them)
    if ctx.verify_mode == ssl.CERT_NONE:
        return 0
    if ctx.verify_mode == ssl.CERT_OPTIONAL:
        return 1
    return 3


def _ctrl(ctx: ssl.SSLContext, cmd: int, larg: int, what: str) -> int | None:
    """``SSL_CTX_ctrl`` on the checked pointer: the mode after the call, or None."""
    ptr = ssl_ctx_pointer(ctx)
    if ptr is None:
        logger.debug("SSL_CTX pointer check failed; %s", what)
        return None
    lib = libssl()
    assert lib is not None  # ssl_ctx_pointer had it
    return int(lib.SSL_CTX_ctrl(ptr, cmd, larg, None))


def _anchors_only(ctx: ssl.SSLContext) -> bool:
    cas = ctx.get_ca_certs()
    return bool(cas) and all(c.get("subject") == c.get("issuer") for c in cas)


def omit_trust_anchor(ctx: ssl.SSLContext) -> bool:
    """Present only the configured chain when auto-chain could add nothing but an anchor.

    Call after the certificate and the trust store are loaded. Returns True if the mode
    was set (False: OpenSSL's default kept, e.g. an intermediate in the trust store).
    """
    if not _anchors_only(ctx):
        return False
    m = _ctrl(ctx, _SSL_CTRL_MODE, _SSL_MODE_NO_AUTO_CHAIN, "keeping OpenSSL's auto-chain")
    return m is not None and bool(m & _SSL_MODE_NO_AUTO_CHAIN)


def keep_record_buffers(ctx: ssl.SSLContext) -> bool:
    """Keep each connection's record buffers while it is open (clear RELEASE_BUFFERS).

    Call before the context makes connections (their mode is copied from it). Returns
    True if the buffers are kept (False: CPython's mode left as it was).
    """
    m = _ctrl(ctx, _SSL_CTRL_CLEAR_MODE, _SSL_MODE_RELEASE_BUFFERS, "record buffers still released")
    return m is not None and not m & _SSL_MODE_RELEASE_BUFFERS
