"""RFC 8705 certificate-bound access tokens, checked against the TLS peer.

A bearer token is replayable by whoever holds it. RFC 8705 §3 binds a JWT to the client
certificate: its ``cnf`` claim holds ``x5t#S256``, the base64url SHA-256 of the
certificate's DER, and a resource server must refuse the token over any other
certificate. The sidecar terminated the TLS session, so it is the one place that knows
the peer certificate; it checks the binding before the app sees the request.

Pure: header values and a thumbprint in, a verdict out. No signature check (the app or
its authorization server verifies the token itself); only the binding is checked here.
Non-bearer ``Authorization`` schemes pass untouched.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["Refusal", "check", "www_authenticate"]


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a request's token is refused (the ``error_description`` sent back)."""

    description: str


def _b64url_json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True))


def _claims(token: str) -> dict[str, Any] | None:
    """A JWS compact token's payload, or None when the token is not a JWT at all.

    Raises:
        ValueError: it looks like a JWT (a JSON header) but the payload is unreadable.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None  # opaque (or encrypted) token: nothing we can read
    try:
        header = _b64url_json(parts[0])
    except (ValueError, binascii.Error, UnicodeError):
        return None
    if not isinstance(header, dict):
        return None
    try:
        payload = _b64url_json(parts[1])
    except (ValueError, binascii.Error, UnicodeError) as e:
        raise ValueError("the JWT payload is not base64url JSON") from e
    if not isinstance(payload, dict):
        raise ValueError("the JWT payload is not a JSON object")
    return payload


def _check_one(token: str, peer_x5t_s256: str, require_bound: bool) -> Refusal | None:
    try:
        claims = _claims(token)
    except ValueError as e:
        return Refusal(f"malformed token: {e}")
    cnf = claims.get("cnf") if claims is not None else None
    if cnf is None:
        if require_bound:
            return Refusal("the token is not bound to a certificate (no cnf claim, RFC 8705)")
        return None
    if not isinstance(cnf, dict):
        return Refusal("malformed token: cnf is not a JSON object")
    bound = cnf.get("x5t#S256")
    if bound is None:
        if require_bound:
            return Refusal("the token has no x5t#S256 certificate binding (RFC 8705)")
        return None
    if not isinstance(bound, str) or not bound:
        return Refusal("malformed token: cnf.x5t#S256 is not a string")
    if not hmac.compare_digest(bound.rstrip("=").encode(), peer_x5t_s256.encode()):
        return Refusal("the token is bound to another certificate (cnf.x5t#S256 mismatch)")
    return None


def check(
    authorization: Sequence[bytes], peer_x5t_s256: str, *, require_bound: bool = False
) -> Refusal | None:
    """Check every ``Authorization`` value of a request; ``None`` means let it through.

    ``peer_x5t_s256`` is ``certs.x5t_s256(peer_cert)``. With ``require_bound`` a bearer
    token must carry ``cnf.x5t#S256``.
    """
    bearers = []
    for raw in authorization:
        scheme, _, rest = raw.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer":
            bearers.append(rest.strip())
    if not bearers:
        return None
    if len(authorization) > 1:
        return Refusal("more than one Authorization header with a bearer token")
    if not bearers[0]:
        return Refusal("empty bearer token")
    return _check_one(bearers[0], peer_x5t_s256, require_bound)


def www_authenticate(refusal: Refusal) -> bytes:
    """The ``WWW-Authenticate`` value of a 401 (RFC 6750 §3)."""
    desc = refusal.description.replace("\\", "").replace('"', "'")
    return f'Bearer error="invalid_token", error_description="{desc}"'.encode("latin-1")
