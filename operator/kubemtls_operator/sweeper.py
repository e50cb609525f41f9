"""The periodic check of every MTLSCert: phase, conditions and expiry Events.

One loop for all certificates (every CHECK_INTERVAL), reading the MTLSCert cache
(``certwatch``), not one kopf timer per object: a timer is a task per MTLSCert, and 10,000
of them cost more memory than the whole operator may use. Each MTLSCert is evaluated with
``status.evaluate`` and written only when its phase or a condition changed (so repeated
sweeps, or two replicas sweeping, write nothing new); a change worth a warning posts an
Event on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

from kubemtls_operator import ca, config, errors, kube, memory, naming, recorder, status

__all__ = ["CertRecord", "Sweeper"]

logger = logging.getLogger(__name__)

#: Records evaluated between two yields to the event loop: an unchanged record awaits nothing
#: (``status.evaluate`` alone took 96 µs on the loaded 2-core VM), so a sweep of 10,000 MTLSCerts
#: would otherwise hold the loop, and every signing request, for about a second.
SWEEP_SLICE = 200


@dataclasses.dataclass(frozen=True, slots=True)
class CertRecord:
    """What the MTLSCert cache keeps per object (small: 10,000 of them must fit)."""

    namespace: str
    name: str
    uid: str
    view: status.CertView
    phase: str
    conditions: tuple[tuple[str, str, str], ...]  # (type, status, reason)

    @classmethod
    def from_body(cls, body: Any) -> CertRecord:
        # Runs on every MTLSCert watch event (each status write): no generator, no
        # dataclasses.replace (from_status interns the issuer itself).
        st = body.get("status") or {}
        conds = [
            (c.get("type", ""), c.get("status", ""), c.get("reason", ""))
            for c in st.get("conditions") or ()
        ]
        meta = body["metadata"]
        return cls(
            sys.intern(meta["namespace"]),
            meta["name"],
            meta.get("uid", ""),
            status.CertView.from_status(st),
            sys.intern(st.get("phase", "")),
            _shared(tuple(conds)),
        )


#: Condition tuples seen so far: 10,000 records share the few distinct ones (bounded in
#: entries and in size).
_CONDITIONS: dict[tuple[tuple[str, str, str], ...], tuple[tuple[str, str, str], ...]] = {}
_SHARED_MAX, _SHARED_CHARS = 4096, 512


def _shared(conds: tuple[tuple[str, str, str], ...]) -> tuple[tuple[str, str, str], ...]:
    hit = _CONDITIONS.get(conds)
    if hit is None:
        hit = conds
        small = sum(len(a) + len(b) + len(c) for a, b, c in conds) <= _SHARED_CHARS
        if small and len(_CONDITIONS) < _SHARED_MAX:
            _CONDITIONS[conds] = conds
    return hit


@dataclasses.dataclass
class Sweeper:
    client: kube.Client
    cfg: config.Config
    cas: ca.Manager
    recorder: recorder.Recorder
    records: Callable[[], Iterable[CertRecord]]

    def context(self, view: status.CertView) -> dict[str, Any]:
        """The CA facts ``status.evaluate`` needs for one certificate."""
        auth = self.cas.authority
        if auth is None:
            return {"ca_error": str(self.cas.error or "no CA loaded")}
        retiring = auth.is_retiring_issuer(view.issuer)
        return {
            "revoked": bool(view.serial) and auth.is_revoked(view.serial),
            "ca_error": str(self.cas.error) if self.cas.error else "",
            "ca_not_after": auth.signing.cert.not_valid_after_utc,
            "issuer_retiring": retiring,
        }

    async def sweep_one(self, rec: CertRecord, now: datetime.datetime) -> bool:
        """Re-evaluate one MTLSCert; True when it was written."""
        if self.recorder.pending((rec.namespace, rec.name)):
            return False  # a newer certificate is being recorded: judge that one next time
        ev = status.evaluate(
            rec.view, now=now, alert_window=self.cfg.alert_window, **self.context(rec.view)
        )
        wanted = {(c.type, c.status, c.reason) for c in ev.conditions if c.type != "Injected"}
        have = {c for c in rec.conditions if c[0] != "Injected"}
        if ev.phase == rec.phase and wanted <= have:
            return False
        events: list[tuple[str, str, str]] = []

        def compute(obj: dict[str, Any]) -> dict[str, Any] | None:
            old = obj.get("status") or {}
            if old.get("serial", "") != rec.view.serial:
                return None  # re-issued meanwhile; the next sweep sees the new one
            fresh = status.evaluate(
                status.CertView.from_status(old),
                now=now,
                alert_window=self.cfg.alert_window,
                injected=status.condition(old.get("conditions"), "Injected"),
                **self.context(status.CertView.from_status(old)),
            )
            events[:] = status.transitions(old.get("conditions"), fresh.conditions)
            return {
                "phase": fresh.phase,
                "conditions": status.merge_conditions(old.get("conditions"), fresh.conditions, now),
            }

        obj = await self.client.update_mtlscert_status(rec.namespace, rec.name, compute)
        for type_, reason, message in events:
            if obj is not None:
                ref = {**obj, "apiVersion": naming.CRD_API_VERSION, "kind": "MTLSCert"}
                await self.client.post_event(ref, type_=type_, reason=reason, message=message)
        return True

    async def sweep(self) -> int:
        now = datetime.datetime.now(datetime.UTC)
        written = 0
        for i, rec in enumerate(list(self.records())):
            if i and not i % SWEEP_SLICE:
                await asyncio.sleep(0)  # let signing requests in between slices
            try:
                written += await self.sweep_one(rec, now)
            except errors.APIError as e:
                logger.warning("checking MTLSCert %s/%s failed: %s", rec.namespace, rec.name, e)
        return written

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception:
                logger.exception("the MTLSCert sweep crashed; again in %.1fs", interval)
            memory.trim()  # give the heap of a burst back (glibc keeps it otherwise)
