"""The signing API's decisions (DESIGN.md §Signing API): the pod's bound token → its leaf.

:class:`Signer` is the backend of ``signfront.Front`` (the HTTP front: body, CSR, signing,
answers). Authentication is the pod's projected token (TokenReview, audience ``kubemtls``,
cached); the pod comes from the kopf index; the leaf's identity comes from the pod, never
from the CSR. The certificate is handed out only once its serial is recorded in the
MTLSCert's status (so it can always be revoked): with the token cached and the pod indexed,
that write is the hot path's one API call. A write that does not land within
``signfront.RECORD_TIMEOUT`` gets 503 and the sidecar retries.

The Signer lives in the operator's process. The front runs there too (``SIGNING_WORKERS=0``)
or in worker processes that reach the Signer over a socket pair (``signworkers``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import zlib
from collections.abc import Awaitable, Callable

from aiohttp import web

from kubemtls_operator import annotations as podannotations
from kubemtls_operator import (
    ca,
    config,
    metrics,
    pki,
    recorder,
    revocation,
    rollover,
    signfront,
    status,
    tokens,
    workload,
)
from kubemtls_operator.signfront import Grant, Issued, Published

__all__ = ["Signer"]

logger = logging.getLogger(__name__)

Refused = signfront.Refused


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
    _published: tuple[rollover.Authority, Published] | None = None

    def app(self) -> web.Application:
        """The signing API served in this process."""
        return signfront.Front(self).app()

    @property
    def renew_fraction(self) -> float:
        return self.cfg.renew_fraction

    # --- the checks both endpoints make ----------------------------------------------------
    async def _pod(self, token: str) -> workload.PodFacts:
        ident = await self.reviewer.identify(token)
        who = f"{ident.namespace}/{ident.pod_name}"
        pod = await self.lookup_pod(ident.namespace, ident.pod_name)
        if pod is None or pod.deleting:
            raise Refused(403, "PodNotFound", f"pod {who} does not exist (any more)", who)
        if pod.uid != ident.pod_uid:
            raise Refused(
                403,
                "PodUIDMismatch",
                f"the token names pod UID {ident.pod_uid}, but {who} is {pod.uid}",
                who,
            )
        if not pod.opted_in:
            raise Refused(403, "PodNotOptedIn", f'pod {who} has no kubemtls.io/inject: "true"', who)
        if pod.service_account != ident.service_account:
            raise Refused(
                403,
                "ServiceAccountMismatch",
                "the token's service account is not the pod's",
                who,
            )
        return pod

    def published(self) -> Published:
        """The signing CA now, and what answers repeat from it (one object per Authority)."""
        return self._current()[1]

    def _current(self) -> tuple[rollover.Authority, Published]:
        auth = self.cas.authority
        if auth is None or self.cas.error is not None:
            why = str(self.cas.error) if self.cas.error else "the CA has not been loaded yet"
            raise Refused(503, "CAUnavailable", f"no CA can sign right now: {why}")
        cached = self._published
        if cached is None or cached[0] is not auth:  # a new CA or CRL: a new Authority
            cached = self._published = (
                auth,
                Published.of(auth.signing, auth.bundle_pem, auth.crl_pem),
            )
        return cached

    # --- POST /v1/certificates: the backend's part --------------------------------------------
    async def authorize(self, token: str) -> Grant:
        pod = await self._pod(token)
        who = f"{pod.namespace}/{pod.name}"
        identity, lifetime = self._identity(pod, who)
        return Grant(who, pod.namespace, identity, lifetime, self.published(), ticket=pod)

    async def record(self, grant: Grant, issued: Issued) -> None:
        pod: workload.PodFacts = grant.ticket
        # The future is this request's own (the recorder skips one that is done), so a
        # timeout may cancel it: no shield.
        await self.recorder.record(
            recorder.Issuance(
                pod=pod,
                serial=issued.serial,
                issuer=issued.issuer,
                fingerprint=issued.fingerprint,
                not_before=issued.not_before,
                not_after=issued.not_after,
                renewal_time=issued.renewal_time,
            )
        )
        metrics.ISSUED.labels(pod.namespace).inc()
        # Here, in the operator's process, whichever process signed: one line per serial,
        # once it is recorded (a signing worker's busy loop does not format log lines).
        logger.info(
            "issued serial %s to %s (%s), notAfter %s",
            issued.serial,
            grant.pod,
            grant.identity.spiffe_id,
            revocation.format_time(issued.not_after),
        )

    def refused(self, reason: str) -> None:
        metrics.REFUSED.labels(reason).inc()

    def observe(self, seconds: float) -> None:
        metrics.SIGNING_LATENCY.observe(seconds)

    def _identity(
        self, pod: workload.PodFacts, who: str
    ) -> tuple[pki.LeafIdentity, datetime.timedelta]:
        """The leaf's identity and lifetime from the pod (cached: a pod's facts are immutable)."""
        hit = self._identities.get(pod)
        if hit is not None:
            return hit
        try:
            spec = workload.spec_of(pod, self.cfg)
            hit = workload.leaf_identity(pod, spec, self.cfg), workload.lifetime(spec, self.cfg)
        except (podannotations.AnnotationError, ValueError) as e:
            raise Refused(
                403,
                "InvalidAnnotations",
                f"the pod's kubemtls annotations are not valid: {e}",
                who,
            ) from e
        if len(self._identities) > 50_000:
            self._identities.clear()
        self._identities[pod] = hit
        return hit

    # --- GET /v1/trust: the backend's part ------------------------------------------------------
    async def trust(self, token: str) -> tuple[str, bytes]:
        pod = await self._pod(token)
        who = f"{pod.namespace}/{pod.name}"
        auth, pub = self._current()
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
        return who, json.dumps(payload, sort_keys=True).encode()

    @staticmethod
    def _rollover_renewal(
        auth: rollover.Authority, pod: workload.PodFacts, now: datetime.datetime
    ) -> datetime.datetime:
        """When a pod whose leaf chains to the retiring CA renews: spread over 10 minutes."""
        start = auth.state.rollover.activated_at or now
        spread = zlib.crc32(pod.uid.encode()) % 600
        return start + datetime.timedelta(seconds=spread)
