"""An OpenSSL context setting Python's ``ssl`` module does not expose: no auto-chain.

When the certificate file holds only the leaf, OpenSSL completes the chain it sends from
the context's trust store (``SSL_MODE_NO_AUTO_CHAIN`` unset): every handshake then runs a
chain build (``X509_verify_cert``, ~1 M instructions) to append our own trust anchor, and
the peer decodes one more certificate (``d2i_X509``, ~1.5 M instructions in OpenSSL 3.0),
about a quarter of a full mTLS handshake's CPU on each side. A peer must already hold the
anchor to trust us, so sending it is useless (RFC 8446 §4.4.2: a certificate specifying a
trust anchor MAY be omitted). HAProxy does not send it in the benchmark (its peer decodes
one certificate per handshake); Go's crypto/tls and BoringSSL have no auto-chain at all.

``omit_trust_anchor`` sets the mode only when the store holds nothing but self-signed
certificates, so auto-chain could only ever have appended an anchor. A bundle holding an
intermediate keeps OpenSSL's behaviour (the intermediate may be needed by the peer).

Python has no API for ``SSL_CTX_set_mode``; the ``SSL_CTX *`` is the first field of
CPython's ``PySSLContext`` (unchanged from 3.7 to 3.13; sslkeylog reads it the same way),
and the call goes through the very libssl ``_ssl`` is linked with. The pointer is checked
first (OpenSSL must report the options and verify mode Python reports for the same
context); if anything does not match, nothing is changed and the handshake stays as
before, only slower.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import ssl
import sys

__all__ = ["omit_trust_anchor"]

logger = logging.getLogger(__name__)

_SSL_CTRL_MODE = 33
_SSL_MODE_NO_AUTO_CHAIN = 0x8


@functools.cache
def _libssl() -> ctypes.CDLL | None:
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


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: ctypes.CDLL) -> int | None:
    """The context's ``SSL_CTX *``, or None unless OpenSSL confirms it is this context."""
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
    lib = _libssl()
    if lib is None:
        return False
    ptr = _ssl_ctx_pointer(ctx, lib)
    if ptr is None:
        logger.debug("SSL_CTX pointer check failed; keeping OpenSSL's auto-chain")
        return False
    mode = lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_MODE, _SSL_MODE_NO_AUTO_CHAIN, None)
    return bool(mode & _SSL_MODE_NO_AUTO_CHAIN)
