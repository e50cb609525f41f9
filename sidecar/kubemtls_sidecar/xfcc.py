"""The peer-identity headers that HTTP mode gives the app, and the ones it must strip.

Pure: bytes in, header values out. Two formats, because apps expect one or the other:
- Envoy's ``X-Forwarded-Client-Cert`` (XFCC): ``By=<our URI SAN>;Hash=<hex SHA-256 of
  the DER>;Subject="<RFC 4514>";URI=<SPIFFE ID>;DNS=<name>`` (one ``DNS`` pair per name).
  Values holding ``,`` ``;`` ``=`` or ``"`` are double-quoted with ``"`` escaped as ``\\"``;
  ``Subject`` is always quoted, as Envoy does
  (https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_conn_man/headers).
- RFC 9440 ``Client-Cert: :<base64 DER>:`` and ``Client-Cert-Chain`` (a list of the same,
  intermediates only, leaf excluded).

A client could send any of these itself to impersonate someone: :data:`SPOOFABLE` names
the headers the sidecar removes from every request before it adds its own.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from kubemtls_sidecar import der

__all__ = ["SPOOFABLE", "client_cert", "client_cert_chain", "identity_headers", "xfcc"]

#: Lower-case header names that only the sidecar may set.
SPOOFABLE = frozenset({b"x-forwarded-client-cert", b"client-cert", b"client-cert-chain"})

_NEEDS_QUOTES = frozenset(',;="')


def _value(text: str, *, always_quote: bool = False) -> str:
    if always_quote or any(c in _NEEDS_QUOTES for c in text):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def xfcc(peer_der: bytes, *, by: str | None = None) -> str:
    """The XFCC element for the peer certificate ``peer_der`` (``by``: our own URI SAN)."""
    facts = der.facts(peer_der)
    parts = []
    if by:
        parts.append("By=" + _value(by))
    parts.append("Hash=" + hashlib.sha256(peer_der).hexdigest())
    parts.append("Subject=" + _value(facts.subject, always_quote=True))
    parts.extend("URI=" + _value(uri) for uri in facts.uris)
    parts.extend("DNS=" + _value(name) for name in facts.dns_names)
    return ";".join(parts)


def _sf_binary(der: bytes) -> str:
    # RFC 8941 §3.3.5 byte sequence: standard base64 with padding, between colons.
    return ":" + base64.b64encode(der).decode("ascii") + ":"


def client_cert(peer_der: bytes) -> str:
    """RFC 9440 ``Client-Cert`` value."""
    return _sf_binary(peer_der)


def client_cert_chain(intermediates_der: Sequence[bytes]) -> str:
    """RFC 9440 ``Client-Cert-Chain`` value (an RFC 8941 list, leaf excluded)."""
    return ", ".join(_sf_binary(der) for der in intermediates_der)


def identity_headers(
    peer_der: bytes, intermediates_der: Sequence[bytes] = (), *, by: str | None = None
) -> list[tuple[bytes, bytes]]:
    """Every header the sidecar adds for the peer, ready for h11."""
    out = [
        (b"X-Forwarded-Client-Cert", xfcc(peer_der, by=by).encode("utf-8")),
        (b"Client-Cert", client_cert(peer_der).encode("ascii")),
    ]
    if intermediates_der:
        out.append((b"Client-Cert-Chain", client_cert_chain(intermediates_der).encode("ascii")))
    return out
