"""The signing API (DESIGN.md §Signing API): CSR + the pod's bound token → its certificate.

``POST /v1/certificates`` and ``GET /v1/trust`` over HTTPS. Authentication is the pod's
projected token (TokenReview, audience ``kubemtls``, cached); the pod comes from the kopf
index; the leaf's identity comes from the pod, never from the CSR. The certificate is
handed out only once its serial is recorded in the MTLSCert's status (so it can always be
revoked): with the token cached and the pod indexed, that write is the hot path's one API
call. A write that does not land within ``RECORD_TIMEOUT`` gets 503 and the sidecar retries.

Every refusal is JSON ``{"reason": "<CamelCase>", "message": "<sentence>"}``, logged with
the pod and the reason, and counted in ``kubemtls_signing_refusals_total{reason}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from kubemtls_sidecar import certs

from kubemtls_operator import annotations as podannotations
from kubemtls_operator import (
    ca,
    config,
    errors,
    metrics,
    pki,
    recorder,
    revocation,
    rollover,
    status,
    tokens,
    workload,
)

__all__ = ["MAX_BODY", "Signer"]

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
#: How long a signing request waits for its serial to be recorded in the API.
RECORD_TIMEOUT = 10.0
POD_KEY = web.RequestKey("pod", str)

Refused = errors.SigningRefused


def _json(
    status_: int, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status_,
        body=orjson.dumps(payload),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def _refusals(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except Refused as e:
        who = request.get(POD_KEY, "-")
        logger.warning(
            "refused %s %s for pod %s: %s (%s)",
            request.method,
            request.path,
            who,
            e.reason,
            e.message,
        )
        metrics.REFUSED.labels(e.reason).inc()
        return _json(e.status, {"reason": e.reason, "message": e.message})


@dataclasses.dataclass(frozen=True, slots=True)
class _Published:
    """What every answer repeats for one :class:`rollover.Authority`, encoded once."""

    authority: rollover.Authority
    bundle: str
    crl: str
    intermediates: str  # PEM of the signing CA's intermediates (the chain after the leaf)
    issuer: str  # the signing CA's subject, RFC 4514

    @classmethod
    def of(cls, auth: rollover.Authority) -> _Published:
        return cls(
            auth,
            auth.bundle_pem.decode(),
            auth.crl_pem.decode(),
            pki.cert_pem(*auth.signing.intermediates).decode(),
            auth.signing.cert.subject.rfc4514_string(),
        )


@dataclasses.dataclass
class Signer:
    cfg: config.Config
    cas: ca.Manager
    reviewer: tokens.Reviewer
    recorder: recorder.Recorder
    #: (namespace, name) → the pod's facts, from the kopf index (or the API on a miss).
    lookup_pod: Callable[[str, str], Awaitable[workload.PodFacts | None]]
    #: (namespace, name) → what the MTLSCert's status says (``certwatch.Cache``).
    cert_status: Callable[[str, str], status.CertView | None]
    _identities: dict[workload.PodFacts, tuple[pki.LeafIdentity, datetime.timedelta]] = (
        dataclasses.field(default_factory=dict)
    )
    _published: _Published | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[_refusals])
        app.router.add_post("/v1/certificates", self.post_certificate)
        app.router.add_get("/v1/trust", self.get_trust)
        return app

    # --- the checks both endpoints make ----------------------------------------------------
    async def _pod(self, request: web.Request) -> workload.PodFacts:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused(
                401,
                "TokenMissing",
                "send the pod's projected token as 'Authorization: Bearer <token>'",
            )
        ident = await self.reviewer.identify(token.strip())
        request[POD_KEY] = f"{ident.namespace}/{ident.pod_name}"
        pod = await self.lookup_pod(ident.namespace, ident.pod_name)
        if pod is None or pod.deleting:
            raise Refused(
                403,
                "PodNotFound",
                f"pod {ident.namespace}/{ident.pod_name} does not exist (any more)",
            )
        if pod.uid != ident.pod_uid:
            raise Refused(
                403,
                "PodUIDMismatch",
                f"the token names pod UID {ident.pod_uid}, but "
                f"{ident.namespace}/{ident.pod_name} is {pod.uid}",
            )
        if not pod.opted_in:
            raise Refused(
                403,
                "PodNotOptedIn",
                f'pod {ident.namespace}/{ident.pod_name} has no kubemtls.io/inject: "true"',
            )
        if pod.service_account != ident.service_account:
            raise Refused(
                403, "ServiceAccountMismatch", "the token's service account is not the pod's"
            )
        return pod

    def _authority(self) -> _Published:
        auth = self.cas.authority
        if auth is None or self.cas.error is not None:
            why = str(self.cas.error) if self.cas.error else "the CA has not been loaded yet"
            raise Refused(503, "CAUnavailable", f"no CA can sign right now: {why}")
        pub = self._published
        if pub is None or pub.authority is not auth:  # a new CA or CRL: a new Authority
            pub = self._published = _Published.of(auth)
        return pub

    # --- POST /v1/certificates ----------------------------------------------------------------
    async def post_certificate(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        if (request.content_length or 0) > MAX_BODY:
            raise Refused(413, "BodyTooLarge", f"the request body is larger than {MAX_BODY} bytes")
        pod = await self._pod(request)
        csr_pem = await self._csr(request)
        identity, lifetime = self._identity(pod)
        try:
            _, public_key = pki.load_csr_key(csr_pem)
        except pki.CSRWeakKey as e:
            raise Refused(400, "WeakKey", str(e)) from e
        except pki.CSRBadSignature as e:
            raise Refused(400, "BadSignature", str(e)) from e
        except pki.CSRInvalid as e:
            raise Refused(400, "InvalidCSR", str(e)) from e
        pub = self._authority()
        now = datetime.datetime.now(datetime.UTC)
        try:
            leaf = pki.issue_leaf(
                pub.authority.signing, public_key, identity, now=now, lifetime=lifetime
            )
        except pki.PKIError as e:
            raise Refused(503, "CAUnavailable", f"the CA cannot sign: {e}") from e
        nb, na = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        # From issuance, not the backdated notBefore: with CLOCK_SKEW counted in, a short
        # leaf (the demo's 2m) would get a renewAt in the past.
        renew = pki.renewal_time(max(nb, now), na, fraction=self.cfg.renew_fraction)
        body = {
            # pki.chain_pem(leaf, signing CA), with the intermediates encoded once per CA
            "certificateChain": pki.cert_pem(leaf).decode() + pub.intermediates,
            "trustBundle": pub.bundle,
            "crl": pub.crl,
            "notAfter": revocation.format_time(na),
            "renewAt": revocation.format_time(renew),
        }
        serial = f"{leaf.serial_number:x}"
        recorded = self.recorder.record(
            recorder.Issuance(
                pod=pod,
                serial=serial,
                issuer=pub.issuer,
                fingerprint=certs.fingerprint_sha256(leaf),
                not_before=nb,
                not_after=na,
                renewal_time=renew,
            )
        )
        try:
            # The future is this request's own (the recorder skips one that is done), so a
            # timeout may cancel it: no shield, and asyncio.timeout costs less than wait_for.
            async with asyncio.timeout(RECORD_TIMEOUT):
                await recorded
        except TimeoutError as e:
            raise Refused(
                503,
                "StatusNotRecorded",
                "the certificate could not be recorded in its MTLSCert in time; retry",
            ) from e
        metrics.ISSUED.labels(pod.namespace).inc()
        metrics.SIGNING_LATENCY.observe(time.perf_counter() - started)
        logger.info(
            "issued serial %s to %s/%s (%s), notAfter %s",
            serial,
            pod.namespace,
            pod.name,
            identity.spiffe_id,
            body["notAfter"],
        )
        return _json(200, body)

    def _identity(self, pod: workload.PodFacts) -> tuple[pki.LeafIdentity, datetime.timedelta]:
        """The leaf's identity and lifetime from the pod (cached: a pod's facts are immutable)."""
        hit = self._identities.get(pod)
        if hit is not None:
            return hit
        try:
            spec = workload.spec_of(pod, self.cfg)
            hit = workload.leaf_identity(pod, spec, self.cfg), workload.lifetime(spec, self.cfg)
        except (podannotations.AnnotationError, ValueError) as e:
            raise Refused(
                403, "InvalidAnnotations", f"the pod's kubemtls annotations are not valid: {e}"
            ) from e
        if len(self._identities) > 50_000:
            self._identities.clear()
        self._identities[pod] = hit
        return hit

    async def _csr(self, request: web.Request) -> str:
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

    # --- GET /v1/trust --------------------------------------------------------------------------
    async def get_trust(self, request: web.Request) -> web.Response:
        pod = await self._pod(request)
        pub = self._authority()
        auth = pub.authority
        now = datetime.datetime.now(datetime.UTC)
        key = (pod.namespace, pod.name)
        latest = self.recorder.latest.get(key)
        view = (
            status.CertView(
                latest.serial,
                latest.issuer,
                latest.not_before,
                latest.not_after,
                latest.renewal_time,
            )
            if latest is not None
            else self.cert_status(pod.namespace, pod.name)
        )
        rekey = bool(view and view.serial and auth.is_revoked(view.serial))
        renew_at = now
        if view is not None and view.renewal_time is not None and not rekey:
            renew_at = view.renewal_time
            if auth.is_retiring_issuer(view.issuer):
                renew_at = min(renew_at, self._rollover_renewal(auth, pod, now))
        payload = {
            "trustBundle": pub.bundle,
            "crl": pub.crl,
            "renewAt": revocation.format_time(renew_at),
            "rekey": rekey,
        }
        body = json.dumps(payload, sort_keys=True).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(
            status=200, body=body, content_type="application/json", headers={"ETag": etag}
        )

    @staticmethod
    def _rollover_renewal(
        auth: rollover.Authority, pod: workload.PodFacts, now: datetime.datetime
    ) -> datetime.datetime:
        """When a pod whose leaf chains to the retiring CA renews: spread over 10 minutes."""
        start = auth.state.rollover.activated_at or now
        spread = zlib.crc32(pod.uid.encode()) % 600
        return start + datetime.timedelta(seconds=spread)
