"""The messages between the operator and its signing workers (``signworkers``, ``signworker``).

One JSON object per line over a Unix socket pair; ``t`` names the kind. Pure encoding and
decoding here, no I/O. A worker asks, the operator answers with the same ``id``:

- ``{"t": "auth", "id", "token"}`` → ``{"t": "r", "id", "ok": GRANT}`` or ``"err": ERR``;
- ``{"t": "rec", "id", "token", "grant": GRANT, ISSUED}`` → ``{"t": "r", "id"}`` or
  ``"err": ERR``. The operator checks the token again and that GRANT (what the worker signed
  for, maybe from its cache) is still what the token gets, before it records;
- ``{"t": "trust", "id", "token"}`` → ``{"t": "r", "id", "pod", "body"}`` or ``"err": ERR``;
- ``{"t": "stats", "lat": [seconds...], "refused": {reason: n}}``: metrics; no answer;
- ``{"t": "ready"}``: the worker listens; no answer.

The operator also sends, unasked:

- ``{"t": "ca", "gen", "cert", "key", "bundle", "crl", "intermediates", "issuer"}``: the
  signing CA of generation ``gen``, always before the first answer that names ``gen``;
- ``{"t": "serving"}``: the serving certificate's files were replaced; load them again.

ERR is ``[status, reason, message, pod]`` (``signfront.Refused``). The CA key crosses the
socket pair (private to the operator's pod, like the process's memory) and nothing else:
it is never logged.
"""

from __future__ import annotations

import datetime
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from kubemtls_sidecar import certs

from kubemtls_operator import keys, pki, signfront

__all__ = [
    "ca_message",
    "decode",
    "encode",
    "err",
    "grant_fields",
    "issued_fields",
    "published_of",
    "refused_of",
    "same_grant",
    "to_grant",
    "to_issued",
]

Message = dict[str, Any]


def encode(msg: Message) -> bytes:
    return orjson.dumps(msg) + b"\n"


def decode(line: bytes) -> Message:
    msg = orjson.loads(line)
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ValueError("not a signing-worker message")
    return msg


def err(e: signfront.Refused) -> list[Any]:
    return [e.status, e.reason, e.message, e.pod]


def refused_of(fields: list[Any]) -> signfront.Refused:
    status, reason, message, pod = fields
    return signfront.Refused(int(status), str(reason), str(message), str(pod))


# --- the CA --------------------------------------------------------------------------------
def ca_message(gen: int, pub: signfront.Published) -> Message:
    ca = pub.signing
    return {
        "t": "ca",
        "gen": gen,
        "cert": pki.cert_pem(ca.cert, *ca.chain).decode(),
        "key": pki.key_pem(ca.key).decode(),
        "bundle": pub.bundle,
        "crl": pub.crl,
        "intermediates": pub.intermediates,
        "issuer": pub.issuer,
    }


def published_of(msg: Message) -> signfront.Published:
    """The CA of a ``ca`` message (already checked by the operator: not again)."""
    chain = certs.load_pem_certificates(msg["cert"].encode())
    key = serialization.load_pem_private_key(msg["key"].encode(), password=None)
    if not isinstance(key, keys.PrivateKey):
        raise ValueError("the CA key of a ca message is not an EC or RSA key")
    return signfront.Published(
        pki.CA(cert=chain[0], key=key, chain=tuple(chain[1:])),
        msg["bundle"],
        msg["crl"],
        msg["intermediates"],
        msg["issuer"],
    )


# --- grants and issuances ------------------------------------------------------------------
def grant_fields(grant: signfront.Grant, gen: int) -> Message:
    ident = grant.identity
    return {
        "pod": grant.pod,
        "ns": grant.namespace,
        "spiffe": ident.spiffe_id,
        "cn": ident.common_name,
        "ou": ident.organizational_unit,
        "dns": list(ident.dns_names),
        "ip": list(ident.ip_addresses),
        "life": grant.lifetime.total_seconds(),
        "ca": f"{grant.published.signing.cert.serial_number:x}",
        "gen": gen,
    }


def same_grant(a: Message, b: Message) -> bool:
    """Whether a leaf signed for grant ``a`` is what grant ``b`` allows: the same identity,
    lifetime and signing CA (a new CRL alone changes the generation, not the leaf)."""
    return {k: v for k, v in a.items() if k != "gen"} == {k: v for k, v in b.items() if k != "gen"}


def to_grant(fields: Message, published: signfront.Published, token: str) -> signfront.Grant:
    """A grant as the worker holds it: its ticket is the token (``record`` sends it back)."""
    return signfront.Grant(
        pod=fields["pod"],
        namespace=fields["ns"],
        identity=pki.LeafIdentity(
            spiffe_id=fields["spiffe"],
            common_name=fields["cn"],
            organizational_unit=fields["ou"],
            dns_names=tuple(fields["dns"]),
            ip_addresses=tuple(fields["ip"]),
        ),
        lifetime=datetime.timedelta(seconds=fields["life"]),
        published=published,
        ticket=(token, fields),
    )


def issued_fields(issued: signfront.Issued) -> Message:
    return {
        "serial": issued.serial,
        "issuer": issued.issuer,
        "fp": issued.fingerprint,
        "nb": issued.not_before.timestamp(),
        "na": issued.not_after.timestamp(),
        "renew": issued.renewal_time.timestamp(),
    }


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


def to_issued(msg: Message) -> signfront.Issued:
    return signfront.Issued(
        serial=str(msg["serial"]),
        issuer=str(msg["issuer"]),
        fingerprint=str(msg["fp"]),
        not_before=_utc(msg["nb"]),
        not_after=_utc(msg["na"]),
        renewal_time=_utc(msg["renew"]),
    )
