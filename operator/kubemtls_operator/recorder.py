"""Records issued certificates in their MTLSCert's status before the signer answers.

A certificate must never be in a pod's hands without its serial in the API: revocation
reads the serial from the MTLSCert's status, so a serial lost to a crash between signing
and recording could never be revoked. :meth:`Recorder.record` queues the issuance and
returns a future that resolves once a status write containing it has landed; the signing
API awaits it (bounded) before it hands the certificate out. Workers coalesce per
MTLSCert (the newest certificate wins, ``rotations`` counts every one), write with a
resourceVersion precondition, and retry until the write lands. If the pod's MTLSCert does
not exist yet (the sidecar asked before the pod handler ran), it is created.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
from collections.abc import Callable
from typing import Any

from kubemtls_operator import config, errors, kube, metrics, revocation, status, workload

__all__ = ["Issuance", "Recorder"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Issuance:
    """One signed certificate, as the MTLSCert's status records it."""

    pod: workload.PodFacts
    serial: str
    issuer: str
    fingerprint: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    renewal_time: datetime.datetime

    def status_fields(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "issuer": self.issuer,
            "fingerprintSHA256": self.fingerprint,
            "notBefore": revocation.format_time(self.not_before),
            "notAfter": revocation.format_time(self.not_after),
            "renewalTime": revocation.format_time(self.renewal_time),
            "lastError": "",
        }

    def view(self) -> status.CertView:
        """What :meth:`status_fields` says, as read back (whole seconds), without parsing it."""
        return status.CertView(
            self.serial,
            self.issuer,
            self.not_before.replace(microsecond=0),
            self.not_after.replace(microsecond=0),
            self.renewal_time.replace(microsecond=0),
        )


Key = tuple[str, str]


@dataclasses.dataclass
class Recorder:
    client: kube.Client
    cfg: config.Config
    #: Extra facts for the status evaluation: ``(ns, name) → kwargs`` of status.evaluate.
    context: Callable[[Issuance], dict[str, Any]] = lambda _: {}
    #: Concurrent status writes. Each waits a round trip to the API server, so this bounds
    #: the recording rate to ``workers / write latency``: 8 workers at ~40 ms under load were
    #: ~200 writes/s, and every signing request queued behind them (bench/signing_bench.py).
    workers: int = 32
    settle: float = 0.0
    latest: dict[Key, Issuance] = dataclasses.field(default_factory=dict)
    _pending: dict[Key, tuple[Issuance, int]] = dataclasses.field(default_factory=dict)
    _waiters: dict[Key, list[asyncio.Future[None]]] = dataclasses.field(default_factory=dict)
    _queue: asyncio.Queue[Key] = dataclasses.field(default_factory=asyncio.Queue)
    _tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    _idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def record(self, issued: Issuance) -> asyncio.Future[None]:
        """Queue ``issued`` for its MTLSCert; the future resolves once the write landed."""
        key = (issued.pod.namespace, issued.pod.name)
        self.latest[key] = issued
        prev = self._pending.get(key)
        self._pending[key] = (issued, (prev[1] if prev else 0) + 1)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(done)
        self._idle.clear()
        if prev is None:
            if self.settle > 0:
                asyncio.get_running_loop().call_later(self.settle, self._queue.put_nowait, key)
            else:
                self._queue.put_nowait(key)
        return done

    def pending(self, key: Key) -> bool:
        return key in self._pending

    def start(self) -> None:
        self._idle.set()
        self._tasks = [
            asyncio.create_task(self._work(), name=f"recorder-{i}") for i in range(self.workers)
        ]

    async def stop(self, flush_seconds: float = 5.0) -> None:
        """Flush what is queued (up to ``timeout``), then stop the workers."""
        if self._pending:
            try:
                await asyncio.wait_for(self._idle.wait(), flush_seconds)
            except TimeoutError:
                logger.warning("%d MTLSCert status writes not flushed at stop", len(self._pending))
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            delay = 0.2
            while key in self._pending:
                issued, count = self._pending.pop(key)
                waiters = self._waiters.pop(key, [])
                try:
                    await self._write(issued, count)
                except errors.APIError as e:
                    prev = self._pending.get(key)
                    # Put it back (merged with anything newer) and retry after a pause.
                    newest = prev[0] if prev else issued
                    self._pending[key] = (newest, count + (prev[1] if prev else 0))
                    self._waiters[key] = waiters + self._waiters.get(key, [])
                    logger.warning("recording %s/%s failed (%s); retrying", *key, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                else:
                    for w in waiters:
                        if not w.done():
                            w.set_result(None)
            if not self._pending:
                self._idle.set()

    async def _write(self, issued: Issuance, count: int) -> None:
        pod = issued.pod
        fields = issued.status_fields()

        def compute(obj: dict[str, Any]) -> dict[str, Any]:
            old = obj.get("status") or {}
            now = datetime.datetime.now(datetime.UTC)
            ev = status.evaluate(
                issued.view(),
                now=now,
                alert_window=self.cfg.alert_window,
                injected=status.condition(old.get("conditions"), "Injected"),
                **self.context(issued),
            )
            return {
                **fields,
                "phase": ev.phase,
                "rotations": int(old.get("rotations") or 0) + count,
                "conditions": status.merge_conditions(old.get("conditions"), ev.conditions, now),
            }

        await self.client.update_mtlscert_status(
            pod.namespace, pod.name, compute, create=lambda: workload.mtlscert_body(pod, self.cfg)
        )
        metrics.CERT_EXPIRY.labels(pod.namespace, pod.name).set(issued.not_after.timestamp())
        metrics.CERT_NOT_BEFORE.labels(pod.namespace, pod.name).set(issued.not_before.timestamp())
        metrics.CERT_RENEWAL.labels(pod.namespace, pod.name).set(issued.renewal_time.timestamp())
