"""The vetting child: ``python -m kubemtls_sidecar.vet session`` (JSON lines in and out).

The one place the sidecar's own process tree loads ``cryptography``: a short-lived child
that the resident sidecar starts (``vetted.call``) when new material arrives, so the
long-running process stays ~10 MiB smaller. It reuses the pure functions of ``certs``,
``crl`` and ``keys`` unchanged.

Each request names its ``command``. ``material`` (``chain_pem``, ``key_pem``,
``trust_pem``, ``crl_pem``, ``known_crl_pem``, ``current_trust_pem``, ``our_chain_pem``;
each may be null) answers ``{"trust": …, "cert": …}``: for a new trust bundle the CRLs
to keep (the newest number per trusted CA whose signature verifies, see ``crl.merge``)
and whether our certificate still chains to it; for a new certificate whether its key
matches, its chain reaches the trust bundle and it is inside its validity. A refusal is
``{"error": reason, "type": name}``. ``keygen`` (``key_type``) answers a fresh PKCS#8
key, its CSR, the public key (SPKI, hex) and a loggable description. Nothing is logged;
the key goes to stdout only.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sys
from typing import Any

from cryptography import exceptions, x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kubemtls_sidecar import certs, crl, errors, keys

__all__ = ["answer", "keygen", "main", "material", "verify_chain"]


class MaterialError(ValueError):
    """Material refused here; the answer names it (``vetted.MaterialError`` in the parent).

    Not ``vetted``'s own class: importing ``vetted`` would load asyncio into every child.
    """


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_key(pem: bytes) -> keys.PrivateKey:
    """An unencrypted ECDSA or RSA PEM key.

    Raises:
        MaterialError: not such a key.
    """
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise MaterialError(f"private key is not an unencrypted PEM key ({e})") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise MaterialError("private key must be ECDSA or RSA")
    return loaded


def verify_chain(
    chain: list[x509.Certificate], trust: tuple[x509.Certificate, ...], now: datetime.datetime
) -> None:
    """Check validity dates and that ``chain`` (leaf first) reaches a trusted certificate.

    Raises:
        MaterialError: expired, not yet valid, or not chaining to ``trust``.
    """
    leaf = chain[0]
    if now < leaf.not_valid_before_utc:
        raise MaterialError(f"certificate is not valid before {leaf.not_valid_before_utc}")
    if now >= leaf.not_valid_after_utc:
        raise MaterialError(f"certificate expired at {leaf.not_valid_after_utc}")
    for i, cert in enumerate(chain):
        if cert in trust:
            return
        for anchor in trust:
            with contextlib.suppress(ValueError, TypeError, exceptions.InvalidSignature):
                cert.verify_directly_issued_by(anchor)
                return
        if i + 1 >= len(chain):
            break
        try:
            cert.verify_directly_issued_by(chain[i + 1])
        except (ValueError, TypeError, exceptions.InvalidSignature):
            raise MaterialError(f"chain is broken after {cert.subject.rfc4514_string()}") from None
    raise MaterialError("certificate does not chain to the trust bundle")


def _bytes(req: dict[str, Any], name: str) -> bytes | None:
    value = req.get(name)
    return value.encode("latin-1") if value else None


def _refusal(e: Exception) -> dict[str, str]:
    return {"error": str(e) or type(e).__name__, "type": type(e).__name__}


def _crl_json(crls: crl.CrlSet) -> dict[str, Any]:
    return {
        "entries": [
            {
                "issuer": crl.issuer_label(c.issuer),
                "last_update": c.last_update_utc.isoformat(),
                "next_update": c.next_update_utc.isoformat() if c.next_update_utc else None,
                "revoked": [r.serial_number for r in c],
                "pem": c.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            }
            for c in crls.by_issuer.values()
        ],
        "missing": [crl.issuer_label(n) for n in crls.missing],
    }


def _trust(req: dict[str, Any], now: datetime.datetime) -> tuple[dict[str, Any], Any]:
    """The ``trust`` part of the answer, and the CAs (None when refused)."""
    trust_pem = _bytes(req, "trust_pem")
    assert trust_pem is not None
    try:
        cas = tuple(certs.load_pem_certificates(trust_pem))
        if not cas:
            raise MaterialError("trust bundle holds no certificate")
        crl_pem, known_pem = _bytes(req, "crl_pem"), _bytes(req, "known_crl_pem")
        new = (crl.load_crls(known_pem) if known_pem else []) + (
            crl.load_crls(crl_pem) if crl_pem else []
        )  # known first: on an equal number the new one wins, as crl.merge does
        crls = crl.merge(cas, {}, new) if (crl_pem or known_pem) else None
    except (MaterialError, ValueError) as e:
        return _refusal(e), None
    warning = None
    ours = _bytes(req, "our_chain_pem")
    if ours:
        try:
            verify_chain(certs.load_pem_certificates(ours), cas, now)
        except (MaterialError, ValueError) as e:
            warning = str(e)
    return {"crls": _crl_json(crls) if crls else None, "chain_warning": warning}, cas


def material(req: dict[str, Any], now: datetime.datetime | None = None) -> dict[str, Any]:
    """Vet a new trust bundle and/or a new certificate and key (see the module docstring)."""
    now = now or datetime.datetime.now(datetime.UTC)
    answer: dict[str, Any] = {"trust": None, "cert": None}
    cas: tuple[x509.Certificate, ...] = ()
    if req.get("trust_pem"):
        answer["trust"], new_cas = _trust(req, now)
        cas = new_cas or ()
    elif req.get("current_trust_pem"):
        with contextlib.suppress(ValueError):
            cas = tuple(certs.load_pem_certificates(_bytes(req, "current_trust_pem") or b""))
    chain_pem, key_pem = _bytes(req, "chain_pem"), _bytes(req, "key_pem")
    if chain_pem is not None and key_pem is not None:
        try:
            key = load_key(key_pem)
            chain = certs.load_pem_certificates(chain_pem)
            if not chain:
                raise MaterialError("no certificate in the chain PEM")
            if chain[0].public_key().public_bytes(*_SPKI) != key.public_key().public_bytes(*_SPKI):
                raise MaterialError("private key does not match the certificate")
            verify_chain(chain, cas, now)
            answer["cert"] = {"ok": True}
        except (MaterialError, ValueError) as e:
            answer["cert"] = _refusal(e)
    return answer


def keygen(req: dict[str, Any]) -> dict[str, Any]:
    """A fresh key of ``key_type``, its CSR, its SPKI (hex) and its description."""
    try:
        key = keys.generate_key(str(req.get("key_type")))
    except errors.ConfigError as e:
        return _refusal(e)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {
        "key_pem": pem.decode("ascii"),
        "csr_pem": keys.build_csr(key).decode("ascii"),
        "spki": key.public_key().public_bytes(*_SPKI).hex(),
        "description": keys.describe(key),
    }


def answer(req: dict[str, Any]) -> dict[str, Any]:
    """One request (``{"command": ..., ...}``) answered."""
    command = req.get("command")
    if command == "material":
        return material(req)
    if command == "keygen":
        return keygen(req)
    return {"error": f"unknown command {command!r}", "type": "VetFailed"}


def main(argv: list[str] | None = None) -> int:
    """``session``: answer each JSON line on stdin with one on stdout, until EOF."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["session"]:
        print("usage: python -m kubemtls_sidecar.vet session", file=sys.stderr)
        return 2
    for line in sys.stdin.buffer:
        sys.stdout.write(json.dumps(answer(json.loads(line))) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
