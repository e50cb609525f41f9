"""The sidecar's identity from the operator: get, renew, re-key, follow trust changes.

``SignerSource.run()`` is the whole life of a ``--signer`` identity:
1. generate a key in memory and its CSR (in the short-lived ``vet`` child, which loads
   ``cryptography`` so that this process never does: ``vetted``), send the CSR with the
   pod's token, and hand the certificate and the key to the TLS store. Until then the store holds no
   identity, so ``/readyz`` is false and nothing is served. An unreachable or refusing
   operator is retried with exponential backoff and jitter, for ever.
2. renew at ``renewAt`` with a FRESH key each time. A failed renewal is retried (backoff),
   logged, counted in ``kubemtls_sidecar_renewal_failures_total``; the current
   certificate keeps serving while it is valid (the store turns not-ready once it expires).
3. poll ``GET /v1/trust`` (ETag, so unchanged is a cheap 304) every ``trust_poll_interval``
   seconds (30 by default): a new bundle or CRL goes to the store at once, ``rekey: true``
   (the certificate was revoked) triggers an immediate renewal with a new key, and an
   earlier ``renewAt`` (CA rollover) moves the renewal forward.

Never writes, logs or sends the private key: it comes from the child over a pipe and
goes to the store (and from there to OpenSSL through a memfd); only the CSR leaves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import random

from kubemtls_sidecar import config, der, errors, logs, metrics, signer_client, tlsstore, vetted

__all__ = ["Backoff", "NewKey", "SignerSource", "new_key"]

logger = logging.getLogger(__name__)

_MIN_RENEWAL_GAP = 1.0  # seconds: never renew in a tighter loop than this


@dataclasses.dataclass
class Backoff:
    """Exponential backoff with jitter: ``base * 2**n`` capped at ``cap``, times 0.5-1."""

    base: float = 1.0
    cap: float = 60.0
    attempts: int = 0

    def next_delay(self, remaining: float | None = None) -> float:
        """The next pause; with ``remaining`` seconds of validity, at most a tenth of them.

        An expired certificate retries at least every 10 s: the pod is not serving.
        """
        cap = self.cap
        if remaining is not None:
            cap = min(cap, max(1.0, remaining / 10) if remaining > 0 else 10.0)
        delay = min(cap, self.base * float(1 << min(self.attempts, 30)))
        self.attempts += 1
        jitter: float = random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy
        return delay * jitter

    def reset(self) -> None:
        self.attempts = 0


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclasses.dataclass(frozen=True, repr=False)
class NewKey:
    """A key from the ``vet`` child: its PEM (never logged: no repr), CSR, public key."""

    pem: bytes
    csr: bytes
    spki: bytes
    description: str  # "ecdsa-secp256r1", "rsa-2048": loggable


async def new_key(key_type: str, session: vetted.Session | None = None) -> NewKey:
    """A fresh key and its CSR, made in the ``vet`` child.

    Raises:
        MaterialError: the child failed or refused the key type.
    """
    answer = vetted.check(await vetted.call("keygen", {"key_type": key_type}, session))
    try:
        return NewKey(
            answer["key_pem"].encode("ascii"),
            answer["csr_pem"].encode("ascii"),
            bytes.fromhex(answer["spki"]),
            str(answer["description"]),
        )
    except (KeyError, AttributeError, ValueError):
        raise vetted.MaterialError("the vetting process answered no key", "VetFailed") from None


def _sane_renewal(renew_at: datetime.datetime, not_after: datetime.datetime) -> datetime.datetime:
    """``renewAt``, unless it is already past: then two thirds of the time that is left.

    A renewal time in the past (a very short lifetime measured from a backdated notBefore)
    would otherwise renew in a tight loop.
    """
    now = _utcnow()
    if renew_at > now:
        return renew_at
    left = max((not_after - now).total_seconds(), 0.0)
    return now + datetime.timedelta(seconds=max(left * 2 / 3, _MIN_RENEWAL_GAP))


class SignerSource:
    """Keeps the store supplied with a certificate from the signing API."""

    def __init__(
        self,
        cfg: config.Config,
        store: tlsstore.TlsStore,
        metrics: metrics.Metrics,
        *,
        trust_poll_interval: float | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        if cfg.signer is None:
            raise errors.ConfigError("SignerSource needs --signer")
        self._client = signer_client.SignerClient(cfg.signer, cfg.token_file, cfg.trust_dir)
        self._key_type: str = cfg.key_type
        self._store = store
        self._metrics = metrics
        self._poll = trust_poll_interval or cfg.trust_poll_interval
        self._backoff = backoff or Backoff()
        self._wake = asyncio.Event()
        self._renew_at: datetime.datetime | None = None
        self._not_after: datetime.datetime | None = None
        self._etag: str | None = None
        self._trust_applied: tuple[bytes, bytes] | None = None
        self.serial: str | None = None  # of the certificate held (for tests and logs)

    async def run(self) -> None:
        """Obtain the first certificate, then renew and follow trust changes for ever."""
        await self._obtain("initial")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._renewal_loop())
            tg.create_task(self._trust_loop())

    # --- certificate -------------------------------------------------------------------

    async def _obtain(self, why: str) -> None:
        """Get a certificate for a fresh key; retry until it works.

        One vetting child makes the key and vets the certificate (``vetted.Session``);
        a failed attempt ends it, and the next one starts another only when it needs it.
        """
        self._backoff.reset()
        key: NewKey | None = None
        while True:
            try:
                async with vetted.Session() as vs:
                    if key is None:
                        key = await new_key(self._key_type, vs)
                    issued = await self._client.issue(key.csr)
                    await self._install(issued, key, why, vs)
                self._backoff.reset()
                return
            except vetted.MaterialError as e:  # the vetting child failed
                self._failed(why, e.kind, str(e), None)
            except signer_client.SignerError as e:
                self._failed(why, e.reason, e.message, e.status)
            except ValueError as e:  # the answer's certificates do not parse or match
                self._failed(why, "BadResponse", str(e), 200)
            await asyncio.sleep(self._backoff.next_delay(self._remaining()))

    def _remaining(self) -> float | None:
        """Seconds the certificate held is still valid (None: none held)."""
        if self._not_after is None:
            return None
        return max((self._not_after - _utcnow()).total_seconds(), 0.0)

    def _failed(self, why: str, reason: str, message: str, status: int | None) -> None:
        self._metrics.renewal_failures.inc()
        expired = self._not_after is not None and _utcnow() >= self._not_after
        logs.event(
            logger,
            logging.ERROR if expired else logging.WARNING,
            f"could not get a certificate ({why}) from the signer: {reason}: {message}"
            + (" - the current certificate has EXPIRED, not serving" if expired else ""),
            reason=reason,
            status=status,
            signer=self._client.url,
            not_after=self._not_after.isoformat() if self._not_after else None,
        )

    async def _install(
        self, issued: signer_client.Issued, key: NewKey, why: str, vs: vetted.Session
    ) -> None:
        chain = der.pem_certificates(issued.chain_pem)
        if not chain:
            raise ValueError("no certificate in the signer's chain")
        leaf = der.parse(chain[0])
        if leaf.spki != key.spki:
            raise ValueError("the signed certificate is not for the key we sent")
        trust = (issued.trust_pem, issued.crl_pem)
        if self._trust_applied == trust:
            cert_ok = await self._store.update(
                issued.chain_pem, key.pem, source="signer", session=vs
            )
        else:  # trust first (the chain is checked on it); one vetting child for both
            trust_ok, cert_ok = await self._store.update_all(
                issued.trust_pem,
                issued.crl_pem or None,
                issued.chain_pem,
                key.pem,
                source="signer",
                session=vs,
            )
            if not trust_ok:
                raise ValueError(
                    f"the TLS store refused the trust bundle: {self._store.last_error}"
                )
            self._trusted(trust)
        if not cert_ok:
            raise ValueError(f"the TLS store refused the certificate: {self._store.last_error}")
        facts = der.facts(leaf)
        self._not_after = issued.not_after
        self._renew_at = _sane_renewal(issued.renew_at, issued.not_after)
        if self._renew_at != issued.renew_at:
            logger.warning(
                "the signer's renewAt %s is already past; renewing at %s",
                issued.renew_at.isoformat(),
                self._renew_at.isoformat(),
            )
        self.serial = facts.serial
        logs.event(
            logger,
            logging.INFO,
            f"obtained a certificate from the signer ({why})",
            spiffe_id=facts.spiffe_id,
            serial=facts.serial,
            key=key.description,
            not_after=issued.not_after.isoformat(),
            renew_at=issued.renew_at.isoformat(),
        )

    async def _renewal_loop(self) -> None:
        while True:
            self._wake.clear()
            delay = (self._renew_at - _utcnow()).total_seconds() if self._renew_at else 0.0
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            if self._renew_at is not None and _utcnow() < self._renew_at:
                continue  # woken up to re-plan (an earlier renewAt), not to renew yet
            await self._obtain("renewal" if self._renew_at else "re-key")

    def _rekey_now(self) -> None:
        self._renew_at = None  # the loop treats "no renewal time" as "now"
        self._wake.set()

    # --- trust ---------------------------------------------------------------------------

    async def _apply_trust(self, trust_pem: bytes, crl_pem: bytes) -> None:
        if self._trust_applied == (trust_pem, crl_pem):
            return  # unchanged: no vetting child
        if not await self._store.update_trust(trust_pem, crl_pem or None, source="signer"):
            raise ValueError(f"the TLS store refused the trust bundle: {self._store.last_error}")
        self._trusted((trust_pem, crl_pem))

    def _trusted(self, trust: tuple[bytes, bytes]) -> None:
        self._client.learn_trust(trust[0])
        self._trust_applied = trust

    async def _trust_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            try:
                trust = await self._client.trust(self._etag)
            except signer_client.SignerError as e:
                logs.event(
                    logger,
                    logging.WARNING,
                    f"could not poll the signer's trust bundle: {e.reason}: {e.message}",
                    reason=e.reason,
                    status=e.status,
                )
                continue
            except ValueError as e:
                logger.warning("the signer's trust answer does not parse: %s", e)
                continue
            if trust is None:
                continue  # 304: unchanged
            try:
                await self._apply_trust(trust.trust_pem, trust.crl_pem)
                self._etag = trust.etag  # only once applied: a refused one is fetched again
            except ValueError as e:
                logger.warning("refused the signer's new trust bundle or CRL: %s", e)
            if trust.rekey:
                logs.event(
                    logger,
                    logging.WARNING,
                    "the signer ordered a re-key (certificate revoked): new key and certificate",
                    serial=self.serial,
                )
                self._rekey_now()
            elif trust.renew_at and self._renew_at and self._not_after:
                renew_at = _sane_renewal(trust.renew_at, self._not_after)
                if renew_at < self._renew_at:
                    logger.info("the signer moved the renewal forward to %s", renew_at)
                    self._renew_at = renew_at
                    self._wake.set()
