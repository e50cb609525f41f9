"""The CA lifecycle: load or bootstrap the CA Secret, roll it over, keep CRLs fresh.

Durable state lives in the API, never in a replica's memory: the CA Secret (``tls.*``,
``next.*``, ``prev.*``, ``ca.crt``) and the ``kubemtls-state`` ConfigMap (revocations, CRL
numbers, rollover phase and timestamps). Every write is a create with a deterministic
name (409 → someone else won, re-read) or a patch with a resourceVersion precondition
(409 → re-read and decide again), so two replicas, or a restart mid-way, converge.

:class:`Manager` keeps the last good :class:`rollover.Authority` for the signing API; when
the CA is missing or invalid it keeps ``error`` instead (signing answers 503), posts an
event, and retries with backoff. Decisions are in ``rollover`` and ``revocation`` (pure);
the reads and writes of the Secret and the state are in ``castore``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import logging
from collections.abc import Awaitable, Callable

from cryptography import x509
from kubemtls_sidecar import certs

from kubemtls_operator import (
    castore,
    config,
    errors,
    inplace,
    kube,
    metrics,
    naming,
    pki,
    revocation,
    rollover,
)

__all__ = ["Manager"]

logger = logging.getLogger(__name__)

MAX_CONFLICT_RETRIES = 8


@dataclasses.dataclass
class Manager:
    """The CA as this replica last read it, and the one place that changes it."""

    client: kube.Client
    cfg: config.Config
    #: Issuer DNs of live certificates (from the MTLSCert cache, certwatch), for retiring an old CA.
    live_issuers: Callable[[], frozenset[str]] = lambda: frozenset()
    #: Called with the new authority whenever the bundle or the CRLs change.
    on_change: Callable[[rollover.Authority], Awaitable[None]] | None = None
    authority: rollover.Authority | None = None
    error: errors.CAUnavailable | None = None
    _lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    _published: tuple[bytes, bytes] = (b"", b"")
    _reported: str = ""
    _alerted: set[str] = dataclasses.field(default_factory=set)
    _store: castore.Store = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self._store = castore.Store(self.client, self.cfg)

    # --- the one entry point: read, take the due step, keep CRLs fresh, publish ----------
    async def reconcile(self) -> rollover.Authority:
        """Bring the CA and state up to date; returns the authority now in force.

        Raises:
            errors.CAUnavailable: the CA cannot be used (``self.error`` is set too).
            errors.APIError: the API failed; the previous authority stays in force.
        """
        async with self._lock:
            try:
                auth = await self._reconcile_locked()
            except errors.CAUnavailable as e:
                self.error = e
                if self._reported != str(e):
                    self._reported = str(e)
                    logger.error("%s", e)
                    await self._store.event("Warning", e.reason, str(e))
                metrics.CA_AVAILABLE.set(0)
                raise
            self.error = None
            self._reported = ""
            self.authority = auth
            metrics.observe_authority(auth)
        await self._publish(auth)
        await self._alert_expiry(auth)
        return auth

    async def _alert_expiry(self, auth: rollover.Authority) -> None:
        """Warning events from ALERT_WINDOW before a trusted CA expires: at 30, 7 and 1 day.

        Every CA in the bundle counts, the retiring one too (also when its key is gone):
        peers reject its leaves from that moment, whatever the operator does.
        """
        now = castore.now()
        retiring = {certs.fingerprint_sha256(c) for c in auth.retiring[:1]}
        trusted = [ca.cert for ca in auth.cas] + list(auth.keyless)
        for cert in trusted:
            left = cert.not_valid_after_utc - now
            if left > self.cfg.alert_window:
                continue
            step = next(
                (d for d in (1, 7) if left <= datetime.timedelta(days=d)),
                int(self.cfg.alert_window.total_seconds() // 86400),
            )
            fingerprint = certs.fingerprint_sha256(cert)
            key = f"{fingerprint}/{step}"
            if key in self._alerted:
                continue
            self._alerted.add(key)
            advice = (
                "it is the retiring CA (prev.crt): its pods renew under the signing CA and it "
                "leaves the bundles once no live certificate chains to it; a leaf it signed "
                "that is still in use then is refused by every peer"
                if fingerprint in retiring
                else "put its successor into the CA Secret as next.crt/next.key"
            )
            await self._store.event(
                "Warning",
                naming.Reason.CA_EXPIRING,
                f"the CA {cert.subject.rfc4514_string()} expires at "
                f"{revocation.format_time(cert.not_valid_after_utc)} (within {step} days); "
                f"{advice}",
            )

    async def _reconcile_locked(self) -> rollover.Authority:
        for _ in range(MAX_CONFLICT_RETRIES):
            auth, secret_rv, state_rv = await self._store.load()
            try:
                changed = await self._step(auth, secret_rv, state_rv)
                if not changed:
                    changed = await self._refresh_crls(auth, state_rv)
            except errors.Conflict:
                continue  # another replica (or person) wrote first: read again and re-decide
            if not changed:
                return auth
        raise errors.APIError("the CA state kept changing under us; will retry", delay=2.0)

    async def _step(self, auth: rollover.Authority, secret_rv: str, state_rv: str) -> bool:
        now = castore.now()
        step = rollover.plan(
            auth,
            now=now,
            grace=self.cfg.ca_rollover_grace,
            live_issuers=self.live_issuers(),
            max_leaf_life=self.cfg.cert_duration_max,
        )
        if step.action in ("replace", "renewed"):
            await self._replaced(auth, step, secret_rv, state_rv)
            return True
        ro = inplace.normalized(auth, now)
        if step.action == "generate":
            nxt = pki.bootstrap_ca(now=now, common_name=f"kubemtls root CA {now:%Y%m%d%H%M%S}")
            await self._store.patch_secret(
                secret_rv,
                {
                    naming.KEY_NEXT_CERT: pki.cert_pem(nxt.cert),
                    naming.KEY_NEXT_KEY: pki.key_pem(nxt.key),
                },
            )
            await self._store.event(
                "Normal",
                naming.Reason.CA_NEXT_PUBLISHED,
                f"generated the next CA {nxt.cert.subject.rfc4514_string()}: "
                "the current one is in its last fifth of life",
            )
            return True
        if step.action == "publish":
            # Bundles first (every namespace), then the publication time: an unpublished CA
            # never reaches "activate", whatever happens between the two writes.
            await self._publish(auth, force=True)
            await self._store.patch_secret(secret_rv, {naming.KEY_BUNDLE: auth.bundle_pem})
            new = dataclasses.replace(
                ro,
                phase=revocation.PHASE_NEXT_PUBLISHED,
                next_fingerprint=step.detail,
                published_at=now,
                activated_at=None,
            )
            await self._store.write_state(dataclasses.replace(auth.state, rollover=new), state_rv)
            await self._store.event(
                "Normal",
                naming.Reason.CA_NEXT_PUBLISHED,
                f"published the next CA ({step.detail}) in every trust bundle; "
                f"it signs from {revocation.format_time(now + self.cfg.ca_rollover_grace)}",
            )
            return True
        if step.action == "activate":
            assert auth.next is not None
            old, nxt = auth.signing, auth.next
            await self._store.patch_secret(
                secret_rv,
                {
                    naming.KEY_CERT: pki.cert_pem(nxt.cert, *nxt.chain),
                    naming.KEY_KEY: pki.key_pem(nxt.key),
                    naming.KEY_PREV_CERT: pki.cert_pem(old.cert, *old.chain),
                    naming.KEY_PREV_KEY: pki.key_pem(old.key),
                    naming.KEY_NEXT_CERT: None,
                    naming.KEY_NEXT_KEY: None,
                },
            )
            new = dataclasses.replace(
                inplace.stamp(ro, nxt),
                phase=revocation.PHASE_RETIRING,
                activated_at=now,
                retiring_fingerprint=certs.fingerprint_sha256(old.cert),
            )
            await self._store.write_state(dataclasses.replace(auth.state, rollover=new), state_rv)
            await self._store.event(
                "Normal",
                naming.Reason.CA_ACTIVATED,
                f"the CA {nxt.cert.subject.rfc4514_string()} signs now; "
                f"{old.cert.subject.rfc4514_string()} stays trusted until its "
                "certificates are replaced",
            )
            return True
        if (
            step.action == "retire"
            and not auth.ambiguous  # retires by time: its name is the signing CA's too
            and step.detail in await self._store.live_issuers()
        ):
            return False  # the MTLSCert cache was not filled yet (just started): not yet
        if step.action in ("retire", "prune"):
            await self._retire(auth, step, ro, secret_rv, state_rv)
            return True
        if ro != auth.state.rollover:  # first sight of this signing CA: remember it
            await self._store.write_state(dataclasses.replace(auth.state, rollover=ro), state_rv)
            return True
        return False

    async def _retire(
        self,
        auth: rollover.Authority,
        step: rollover.Step,
        ro: revocation.Rollover,
        secret_rv: str,
        state_rv: str,
    ) -> None:
        """Drop ``prev.*`` from the Secret and the bundle: retired, or pruned once expired."""
        remaining = rollover.trust_bundle((auth.signing, auth.next))
        await self._store.patch_secret(
            secret_rv,
            {naming.KEY_PREV_CERT: None, naming.KEY_PREV_KEY: None, naming.KEY_BUNDLE: remaining},
        )
        if step.action == "retire" or ro.phase == revocation.PHASE_RETIRING:
            ro = inplace.stamp(revocation.Rollover(phase=revocation.PHASE_STABLE), auth.signing)
        # else: an expired prev.crt left over while a next CA is under way: keep its record
        await self._store.write_state(dataclasses.replace(auth.state, rollover=ro), state_rv)
        if step.action == "retire":
            message = f"retired the CA {step.detail}: no live certificate chains to it"
        else:
            expired_at = min(c.not_valid_after_utc for c in auth.expired)
            message = (
                f"pruned the expired CA {step.detail} (prev.crt, expired at "
                f"{revocation.format_time(expired_at)}) from the CA Secret and every trust "
                "bundle: past its notAfter it validates nothing"
            )
        await self._store.event("Normal", naming.Reason.CA_RETIRED, message)

    async def _replaced(
        self, auth: rollover.Authority, step: rollover.Step, secret_rv: str, state_rv: str
    ) -> None:
        """``tls.crt``/``tls.key`` were replaced in place: make it a rollover (``inplace``)."""
        old = rollover.recorded_signing(auth.state)
        writes = inplace.apply(
            auth,
            step,
            old_key=self._key_of(step.detail, old[0], auth),
            now=castore.now(),
            where=f"{self.cfg.namespace}/{self.cfg.ca_secret}",
        )
        if writes.secret:
            await self._store.patch_secret(secret_rv, writes.secret)
        await self._store.write_state(writes.state, state_rv)
        for type_, reason, message in writes.events:
            logger.warning("%s: %s", reason, message)
            await self._store.event(type_, reason, message)

    def _key_of(
        self, fingerprint: str, cert: x509.Certificate, auth: rollover.Authority
    ) -> pki.PrivateKey | None:
        """The replaced CA's key, if this replica still holds it (or it is unchanged)."""
        mem = self.authority
        if mem is not None and mem.signing_fingerprint == fingerprint:
            return mem.signing.key
        if rollover.same_key(cert, auth.signing.cert):
            return auth.signing.key
        return None

    async def _refresh_crls(self, auth: rollover.Authority, state_rv: str) -> bool:
        now = castore.now()
        if not revocation.needs_crl(auth.state, auth.cas, now, auth.keyless):
            return False
        state = revocation.sign_crls(auth.state, auth.cas, now, auth.keyless)
        await self._store.write_state(state, state_rv)
        logger.info("signed CRL number %d for %d CA(s)", state.crl_number, len(auth.cas))
        return True

    # --- revocation -------------------------------------------------------------------------
    async def revoke(self, entry: revocation.Revocation) -> rollover.Authority:
        """Record ``entry`` in the state (idempotent), re-sign the CRLs, publish.

        Raises:
            errors.CAUnavailable: no usable CA.
            errors.APIError: the API failed (kopf retries; nothing is half-done that a retry
                would duplicate).
        """
        async with self._lock:
            for _ in range(MAX_CONFLICT_RETRIES):
                auth, _, state_rv = await self._store.load()
                state = revocation.add(auth.state, entry)
                if revocation.needs_crl(state, auth.cas, castore.now(), auth.keyless):
                    state = revocation.sign_crls(state, auth.cas, castore.now(), auth.keyless)
                if state == auth.state:
                    break
                try:
                    await self._store.write_state(state, state_rv)
                except errors.Conflict:
                    continue
                break
            else:
                raise errors.APIError("the CA state kept changing; will retry", delay=1.0)
            auth, _, _ = await self._store.load()
            self.authority = auth
            metrics.observe_authority(auth)
        await self._publish(auth)
        return auth

    # --- publishing and events -----------------------------------------------------------------
    async def _publish(self, auth: rollover.Authority, *, force: bool = False) -> None:
        key = (auth.bundle_pem, auth.crl_pem)
        if self.on_change is None or (key == self._published and not force):
            return
        await self.on_change(auth)
        self._published = key
        if not self.cfg.webhook_managed:
            await self._patch_webhook_bundle(auth)

    async def _patch_webhook_bundle(self, auth: rollover.Authority) -> None:
        b64 = base64.b64encode(auth.bundle_pem).decode()
        try:
            await self.client.patch_webhook_ca_bundle(self.cfg.webhook_config, b64)
        except errors.APIError as e:
            logger.warning("could not set caBundle on %s: %s", self.cfg.webhook_config, e)

    # --- the loop ---------------------------------------------------------------------------------
    async def run(self, interval: float) -> None:
        """Reconcile every ``interval`` seconds; on failure back off (up to 5 minutes)."""
        delay = interval
        while True:
            try:
                await self.reconcile()
                delay = interval
            except (errors.CAUnavailable, errors.APIError) as e:
                delay = min(max(delay * 2, 1.0), 300.0, max(interval * 8, 1.0))
                logger.debug("CA reconcile failed (%s); again in %.1fs", e, delay)
            except Exception:
                logger.exception("CA reconcile crashed; again in %.1fs", delay)
            await asyncio.sleep(delay)
