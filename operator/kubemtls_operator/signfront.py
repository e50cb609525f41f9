"""The signing API's HTTP front (DESIGN.md §Signing API), wherever its decisions are made.

``POST /v1/certificates`` and ``GET /v1/trust``. The front checks what a request carries
(body size, JSON, the CSR and its signature), signs the leaf with the CA its backend names,
and answers. The backend authenticates the token, finds the pod, decides the leaf's
identity and lifetime, and records (and logs) the serial before the answer:

- in the operator's process, ``signing.Signer`` is the backend and this front is served
  there (``SIGNING_WORKERS=0``, the default);
- with ``SIGNING_WORKERS=N``, N worker processes (``signworker``) each serve this front on
  the same listening socket, and reach the ``Signer`` in the operator's process over a
  socket pair (``signworkers``): the TLS, HTTP, CSR checks and signing (most of a
  certificate's CPU) run beside the operator's event loop, not in it.

Every refusal is JSON ``{"reason": "<CamelCase>", "message": "<sentence>"}``, logged here
with the pod and the reason, and counted through the backend
(``kubemtls_signing_refusals_total{reason}``). Imports stay light (no kopf, no API client):
worker processes import this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import logging
import time
from typing import Any, Protocol

import orjson
from aiohttp import web
from kubemtls_sidecar import certs, errors

from kubemtls_operator import pki, revocation

__all__ = [
    "MAX_BODY",
    "POD_KEY",
    "RECORD_TIMEOUT",
    "Backend",
    "Front",
    "Grant",
    "Issued",
    "Published",
    "Refused",
]

logger = logging.getLogger("kubemtls_operator.signing")

MAX_BODY = 64 * 1024
#: How long a signing request waits for its serial to be recorded in the API.
RECORD_TIMEOUT = 10.0
POD_KEY = web.RequestKey("pod", str)


class Refused(errors.KubemtlsError):
    """A signing API request that is refused: an HTTP status, a CamelCase reason, a sentence."""

    def __init__(self, status: int, reason: str, message: str, pod: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.pod = pod  # namespace/name when known, for the log line


@dataclasses.dataclass(frozen=True, slots=True)
class Published:
    """The signing CA and what every answer repeats from it, encoded once per CA and CRL."""

    signing: pki.CA
    bundle: str
    crl: str
    intermediates: str  # PEM of the signing CA's intermediates (the chain after the leaf)
    issuer: str  # the signing CA's subject, RFC 4514

    @classmethod
    def of(cls, signing: pki.CA, bundle_pem: bytes, crl_pem: bytes) -> Published:
        return cls(
            signing,
            bundle_pem.decode(),
            crl_pem.decode(),
            pki.cert_pem(*signing.intermediates).decode(),
            signing.cert.subject.rfc4514_string(),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """What the backend allows one request: a leaf for this identity, from this CA."""

    pod: str  # namespace/name, for the log
    namespace: str
    identity: pki.LeafIdentity
    lifetime: datetime.timedelta
    published: Published
    ticket: Any = None  # the backend's own handle on the pod


@dataclasses.dataclass(frozen=True, slots=True)
class Issued:
    """A signed leaf, as its MTLSCert's status records it."""

    serial: str  # hex
    issuer: str
    fingerprint: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    renewal_time: datetime.datetime


class Backend(Protocol):
    """Where the signing decisions are made (``signing.Signer``, or a link to it)."""

    @property
    def renew_fraction(self) -> float: ...

    async def authorize(self, token: str) -> Grant:
        """The token's pod, checked, and what it may get. Raises :data:`Refused`."""

    async def record(self, grant: Grant, issued: Issued) -> None:
        """Return once ``issued`` is in the pod's MTLSCert. Raises :data:`Refused`."""

    async def trust(self, token: str) -> tuple[str, bytes]:
        """(namespace/name, the JSON body of ``GET /v1/trust``). Raises :data:`Refused`."""

    def refused(self, reason: str) -> None:
        """Count a refusal."""

    def observe(self, seconds: float) -> None:
        """Count an answered ``POST /v1/certificates`` and its latency."""


def _json(status_: int, payload: dict[str, Any]) -> web.Response:
    return web.Response(status=status_, body=orjson.dumps(payload), content_type="application/json")


def _bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Refused(
            401, "TokenMissing", "send the pod's projected token as 'Authorization: Bearer <token>'"
        )
    return token


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@dataclasses.dataclass
class Front:
    backend: Backend

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._refusals])
        app.router.add_post("/v1/certificates", self.post_certificate)
        app.router.add_get("/v1/trust", self.get_trust)
        return app

    @web.middleware
    async def _refusals(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except Refused as e:
            who = request.get(POD_KEY) or e.pod or "-"
            logger.warning(
                "refused %s %s for pod %s: %s (%s)",
                request.method,
                request.path,
                who,
                e.reason,
                e.message,
            )
            self.backend.refused(e.reason)
            return _json(e.status, {"reason": e.reason, "message": e.message})

    # --- POST /v1/certificates ----------------------------------------------------------------
    async def post_certificate(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        if (request.content_length or 0) > MAX_BODY:
            raise Refused(413, "BodyTooLarge", f"the request body is larger than {MAX_BODY} bytes")
        grant = await self.backend.authorize(_bearer(request))
        request[POD_KEY] = grant.pod
        public_key = _csr_key(await _csr(request))
        body, issued = self._sign(grant, public_key)
        try:
            # asyncio.timeout costs less than wait_for; a timeout cancels only this wait.
            async with asyncio.timeout(RECORD_TIMEOUT):
                await self.backend.record(grant, issued)
        except TimeoutError as e:
            raise Refused(
                503,
                "StatusNotRecorded",
                "the certificate could not be recorded in its MTLSCert in time; retry",
            ) from e
        self.backend.observe(time.perf_counter() - started)
        return _json(200, body)

    def _sign(self, grant: Grant, public_key: pki.PublicKey) -> tuple[dict[str, str], Issued]:
        pub = grant.published
        now = datetime.datetime.now(datetime.UTC)
        try:
            leaf = pki.issue_leaf(
                pub.signing, public_key, grant.identity, now=now, lifetime=grant.lifetime
            )
        except pki.PKIError as e:
            raise Refused(503, "CAUnavailable", f"the CA cannot sign: {e}") from e
        nb, na = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        # From issuance, not the backdated notBefore: with CLOCK_SKEW counted in, a short
        # leaf (the demo's 2m) would get a renewAt in the past.
        renew = pki.renewal_time(max(nb, now), na, fraction=self.backend.renew_fraction)
        body = {
            # pki.chain_pem(leaf, signing CA), with the intermediates encoded once per CA
            "certificateChain": pki.cert_pem(leaf).decode() + pub.intermediates,
            "trustBundle": pub.bundle,
            "crl": pub.crl,
            "notAfter": revocation.format_time(na),
            "renewAt": revocation.format_time(renew),
        }
        issued = Issued(
            serial=f"{leaf.serial_number:x}",
            issuer=pub.issuer,
            fingerprint=certs.fingerprint_sha256(leaf),
            not_before=nb,
            not_after=na,
            renewal_time=renew,
        )
        return body, issued

    # --- GET /v1/trust --------------------------------------------------------------------------
    async def get_trust(self, request: web.Request) -> web.Response:
        pod, body = await self.backend.trust(_bearer(request))
        request[POD_KEY] = pod
        etag = etag_of(body)
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(
            status=200, body=body, content_type="application/json", headers={"ETag": etag}
        )


def _csr_key(csr_pem: str) -> pki.PublicKey:
    try:
        _, public_key = pki.load_csr_key(csr_pem)
    except pki.CSRWeakKey as e:
        raise Refused(400, "WeakKey", str(e)) from e
    except pki.CSRBadSignature as e:
        raise Refused(400, "BadSignature", str(e)) from e
    except pki.CSRInvalid as e:
        raise Refused(400, "InvalidCSR", str(e)) from e
    return public_key


async def _csr(request: web.Request) -> str:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise Refused(
            413, "BodyTooLarge", f"the request body is larger than {MAX_BODY} bytes"
        ) from e
    try:
        data = orjson.loads(raw)
    except ValueError as e:  # orjson.JSONDecodeError is a ValueError
        raise Refused(400, "MalformedJSON", f"the body is not JSON: {e}") from e
    csr = data.get("csr") if isinstance(data, dict) else None
    if not isinstance(csr, str) or not csr:
        raise Refused(400, "MalformedJSON", 'the body must be {"csr": "<PEM>"}')
    return csr
