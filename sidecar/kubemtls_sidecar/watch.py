"""Certificates and trust from files: load at start, reload when they change.

Mounted Secrets and ConfigMaps send no file-system events a container can rely on;
kubelet swaps a ``..data`` symlink, and a file can also be rewritten in place. So, like
kopf's ``_kits/webhooks.py``, we poll: every ``--reload-interval`` seconds we read the
files, compare SHA-256 digests with the last ones loaded, and feed the store on a change.
SIGHUP calls the same ``reload()`` (one path, two triggers: ghostunnel ``signals.go``).
Only digests stay here, never key bytes. A read that straddles a swap (new cert, old key)
is read again until two reads agree. Comparing digests first matters: validating changed
material starts a ``vet`` child (``tlsstore``), which unchanged files never do.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import pathlib

from kubemtls_sidecar import config, contract, errors, logs, metrics, tlsstore, vetted

__all__ = ["FileSource"]

logger = logging.getLogger(__name__)


def _read(path: pathlib.Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class FileSource:
    """``--cert-dir`` (tls.crt, tls.key) and ``--trust-dir`` (ca.crt, crl.pem) → the store."""

    def __init__(
        self,
        cfg: config.Config,
        store: tlsstore.TlsStore,
        m: metrics.Metrics,
        *,
        watch_cert: bool = True,
    ) -> None:
        self.cfg, self.store, self.metrics = cfg, store, m
        self.watch_cert = watch_cert and cfg.cert_dir is not None
        self._trust_digest: bytes | None = None
        self._cert_digest: bytes | None = None
        self._lock = asyncio.Lock()  # a SIGHUP during a poll's reload waits for it
        self._pending: set[asyncio.Task[None]] = set()

    def _paths(self) -> list[pathlib.Path]:
        t = self.cfg.trust_dir
        paths = [t / contract.TRUST_CA_FILE, t / contract.TRUST_CRL_FILE]
        if self.watch_cert and self.cfg.cert_dir is not None:
            paths += [self.cfg.cert_dir / "tls.crt", self.cfg.cert_dir / "tls.key"]
        return paths

    def _snapshot(self) -> list[bytes | None]:
        """The files' contents, read until two consecutive reads agree (max 5 tries)."""
        previous = [_read(p) for p in self._paths()]
        for _ in range(5):
            current = [_read(p) for p in self._paths()]
            if current == previous:
                break
            previous = current
        return previous

    async def load(self) -> None:
        """First load, before any listener binds.

        Raises:
            ConfigError: a file is missing or its material is invalid.
        """
        async with self._lock:
            if not await self._reload(initial=True):
                raise errors.ConfigError(self._error)

    async def reload(self, trigger: str = "poll") -> None:
        """Re-read the files and swap in whatever changed and is valid."""
        logger.debug("checking files (%s)", trigger)
        async with self._lock:
            await self._reload(initial=False, trigger=trigger)

    def reload_soon(self, trigger: str) -> None:
        """``reload`` from a signal handler (a task; errors logged, never raised)."""
        task = asyncio.get_running_loop().create_task(self._guarded(trigger))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _guarded(self, trigger: str) -> None:
        try:
            await self.reload(trigger)
        except Exception:  # a reload must never stop serving
            logger.exception("reload failed")

    _error = ""

    async def _reload(self, *, initial: bool, trigger: str = "start") -> bool:
        # One vetting child (started only if something changed) for trust and certificate.
        async with vetted.Session() as vs:
            return await self._reload_with(vs, initial=initial, trigger=trigger)

    async def _reload_with(self, vs: vetted.Session, *, initial: bool, trigger: str) -> bool:
        files = self._snapshot()
        ca, crl_pem = files[0], files[1]
        trust_digest = _digest(files[:2])
        ok = True
        if trust_digest != self._trust_digest:
            self._trust_digest = trust_digest  # retried only when the files change again
            if ca is None:
                self._error = (
                    f"--trust-dir: {self.cfg.trust_dir / contract.TRUST_CA_FILE} is missing"
                )
                logs.event(
                    logger,
                    logging.ERROR,
                    "trust bundle missing; keeping the old",
                    trigger=trigger,
                    reason=self._error,
                )
                ok = False
            else:
                if crl_pem is None:
                    logs.event(
                        logger,
                        logging.WARNING,
                        "no crl.pem in the trust directory: revocation is not enforced",
                        trigger=trigger,
                        path=str(self.cfg.trust_dir / contract.TRUST_CRL_FILE),
                    )
                if not await self.store.update_trust(
                    ca, crl_pem, source=f"file ({trigger})", session=vs
                ):
                    self._error = f"--trust-dir {self.cfg.trust_dir}: {self.store.last_error}"
                    ok = False
        if self.watch_cert and (ok or not initial):
            chain, key = files[2], files[3]
            cert_digest = _digest(files[2:])
            if cert_digest != self._cert_digest:
                assert self.cfg.cert_dir is not None
                if chain is None or key is None:
                    self._error = f"--cert-dir {self.cfg.cert_dir}: tls.crt or tls.key is missing"
                    logs.event(
                        logger,
                        logging.ERROR,
                        "certificate files missing; keeping the old",
                        trigger=trigger,
                        reason=self._error,
                    )
                    self.metrics.reload_failures.labels("cert", "FileNotFoundError").inc()
                    ok = False
                elif await self.store.update(chain, key, source=f"file ({trigger})", session=vs):
                    self._cert_digest = cert_digest
                else:
                    self._error = f"--cert-dir {self.cfg.cert_dir}: {self.store.last_error}"
                    self._cert_digest = cert_digest  # do not retry the same broken files
                    ok = False
        return ok

    async def run(self) -> None:
        """Poll forever; also re-evaluates CRL freshness."""
        while True:
            await asyncio.sleep(self.cfg.reload_interval)
            try:
                await self.reload("poll")
                self.store.refresh()
            except Exception:  # a reload must never stop serving
                logger.exception("reload failed")


def _digest(parts: list[bytes | None]) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(b"\x00" if p is None else b"\x01" + hashlib.sha256(p).digest())
    return h.digest()
