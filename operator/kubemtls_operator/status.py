"""An MTLSCert's phase and conditions, computed from its certificate's facts and the time.

Pure (no kopf, no I/O): :func:`evaluate` takes what is known about the pod's current
certificate, the CA and ``now``, and returns the phase and the four conditions (Ready,
Expiring, Revoked, Injected). :func:`merge_conditions` keeps ``lastTransitionTime`` when a
condition did not change, and :func:`transitions` says which changes deserve an Event.

``Expiring`` depends on the lifetime (DESIGN.md §Custom resource): a short leaf (24h) is
Expiring only when its renewal is overdue; anything living longer than the alert window
gets the 30/7/1-day warnings. ``Ready`` is False when expired or revoked, whatever else.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kubemtls_operator import naming, revocation

__all__ = [
    "CertView",
    "Condition",
    "Evaluation",
    "evaluate",
    "merge_conditions",
    "transitions",
]

R = naming.Reason
DAY = datetime.timedelta(days=1)
MAX_RENEWAL_SLACK = datetime.timedelta(minutes=5)


@dataclasses.dataclass(frozen=True, slots=True)
class CertView:
    """What the MTLSCert's status says about the pod's current certificate."""

    serial: str = ""
    issuer: str = ""
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    renewal_time: datetime.datetime | None = None

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> CertView:
        s = status or {}
        parse = revocation.parse_time
        return cls(
            s.get("serial") or "",
            # Interned: the MTLSCert cache (certwatch) keeps one view per object, and they share
            # a few issuers (10,000 copies of one subject otherwise).
            sys.intern(s.get("issuer") or ""),
            parse(s.get("notBefore")),
            parse(s.get("notAfter")),
            parse(s.get("renewalTime")),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str

    def to_json(self, now: datetime.datetime | str) -> dict[str, str]:
        """As the API stores it; ``now`` as a time, or already formatted."""
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": now if isinstance(now, str) else revocation.format_time(now),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Evaluation:
    phase: str
    conditions: tuple[Condition, ...]


def _expiring(
    cert: CertView,
    now: datetime.datetime,
    alert_window: datetime.timedelta,
    ca_not_after: datetime.datetime | None,
    issuer_retiring: bool,
) -> Condition:
    assert cert.not_after is not None
    left = cert.not_after - now
    life = cert.not_after - (cert.not_before or now)
    if life > alert_window:
        for limit, reason in ((DAY, "ExpiresIn1Day"), (7 * DAY, "ExpiresIn7Days")):
            if left <= limit:
                return Condition("Expiring", "True", reason, f"expires at {cert.not_after}")
        if left <= alert_window:
            return Condition("Expiring", "True", "ExpiresIn30Days", f"expires at {cert.not_after}")
    elif cert.renewal_time is not None:
        slack = min(MAX_RENEWAL_SLACK, (cert.not_after - cert.renewal_time) * 0.1)
        if now > cert.renewal_time + slack:
            return Condition(
                "Expiring",
                "True",
                R.RENEWAL_OVERDUE,
                f"renewal was due at {cert.renewal_time} and has not happened; "
                f"the certificate expires at {cert.not_after}",
            )
    if issuer_retiring:
        return Condition(
            "Expiring",
            "True",
            "CARollover",
            f"issued by {cert.issuer}, which is being retired; the sidecar renews to the new CA",
        )
    if ca_not_after is not None and ca_not_after - now <= alert_window:
        return Condition(
            "Expiring", "True", R.CA_EXPIRING, f"the signing CA expires at {ca_not_after}"
        )
    return Condition("Expiring", "False", R.NOT_EXPIRING, "")


def evaluate(
    cert: CertView,
    *,
    now: datetime.datetime,
    alert_window: datetime.timedelta,
    revoked: bool = False,
    injected: Condition | None = None,
    ca_error: str = "",
    ca_not_after: datetime.datetime | None = None,
    issuer_retiring: bool = False,
) -> Evaluation:
    """The phase and conditions of one MTLSCert at ``now``."""
    conds: list[Condition] = []
    if not cert.serial or cert.not_after is None:
        phase = "Pending"
        if ca_error:
            conds.append(Condition("Ready", "False", "CAUnavailable", ca_error))
        else:
            conds.append(
                Condition(
                    "Ready",
                    "False",
                    R.PENDING,
                    "waiting for the sidecar to ask for its certificate",
                )
            )
        conds.append(Condition("Expiring", "False", R.NOT_EXPIRING, ""))
        conds.append(Condition("Revoked", "False", R.NOT_REVOKED, ""))
    else:
        expiring = _expiring(cert, now, alert_window, ca_not_after, issuer_retiring)
        if revoked:
            phase = "Revoked"
            ready = Condition(
                "Ready", "False", R.REVOKED, f"serial {cert.serial} is revoked; the sidecar re-keys"
            )
        elif now >= cert.not_after:
            phase = "Expired"
            ready = Condition("Ready", "False", R.EXPIRED, f"expired at {cert.not_after}")
        else:
            phase = "Expiring" if expiring.status == "True" else "Issued"
            ready = Condition(
                "Ready", "True", R.ISSUED, f"serial {cert.serial}, valid until {cert.not_after}"
            )
        conds.append(ready)
        conds.append(expiring)
        conds.append(
            Condition("Revoked", "True", R.REVOKED, f"serial {cert.serial} is in the CRL")
            if revoked
            else Condition("Revoked", "False", R.NOT_REVOKED, "")
        )
    conds.append(injected or Condition("Injected", "Unknown", "Unknown", ""))
    return Evaluation(phase, tuple(conds))


def merge_conditions(
    old: Sequence[Mapping[str, Any]] | None, new: Iterable[Condition], now: datetime.datetime
) -> list[dict[str, str]]:
    """``new`` as JSON, keeping each unchanged condition's lastTransitionTime."""
    by_type = {c.get("type"): c for c in old or ()}
    out = []
    stamp = revocation.format_time(now)
    for cond in new:
        prev = by_type.get(cond.type)
        item = cond.to_json(stamp)
        if (
            prev is not None
            and prev.get("status") == cond.status
            and prev.get("lastTransitionTime")
        ):
            item["lastTransitionTime"] = str(prev["lastTransitionTime"])
        out.append(item)
    return out


def condition(conds: Sequence[Mapping[str, Any]] | None, type_: str) -> Condition | None:
    for c in conds or ():
        if c.get("type") == type_:
            return Condition(
                type_, c.get("status", "Unknown"), c.get("reason", ""), c.get("message", "")
            )
    return None


def transitions(
    old: Sequence[Mapping[str, Any]] | None, new: Iterable[Condition]
) -> list[tuple[str, str, str]]:
    """Events to post: ``(type, reason, message)`` for each warning-worthy change."""
    events = []
    for cond in new:
        prev = condition(old, cond.type)
        changed = prev is None or (prev.status, prev.reason) != (cond.status, cond.reason)
        if not changed:
            continue
        if (cond.type == "Expiring" and cond.status == "True") or (
            cond.type == "Ready" and cond.reason in (R.EXPIRED, "CAUnavailable")
        ):
            events.append(("Warning", cond.reason, cond.message))
    return events
