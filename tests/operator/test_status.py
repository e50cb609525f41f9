"""MTLSCert phase and conditions (pure): what Expiring and Ready mean for each lifetime."""

from __future__ import annotations

import datetime

import pytest
from kubemtls_operator import status

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
H = datetime.timedelta(hours=1)
D = datetime.timedelta(days=1)
WINDOW = 30 * D


def leaf(life: datetime.timedelta, renew_at: float = 2 / 3) -> status.CertView:
    return status.CertView("ab12", "CN=ca", T0, T0 + life, T0 + life * renew_at)


def ev(
    cert: status.CertView, at: datetime.datetime, **kw: object
) -> tuple[str, dict[str, tuple[str, str]]]:
    e = status.evaluate(cert, now=at, alert_window=WINDOW, **kw)  # type: ignore[arg-type]
    return e.phase, {c.type: (c.status, c.reason) for c in e.conditions}


@pytest.mark.parametrize(
    ("life", "at", "phase", "expiring"),
    [
        (24 * H, 1 * H, "Issued", ("False", "NotExpiring")),  # a healthy 24h leaf: no alarm
        (24 * H, 16.05 * H, "Issued", ("False", "NotExpiring")),  # 3 minutes late: slack
        (24 * H, 18 * H, "Expiring", ("True", "RenewalOverdue")),
        (24 * H, 25 * H, "Expired", ("True", "RenewalOverdue")),
        (90 * D, 10 * D, "Issued", ("False", "NotExpiring")),  # long-lived: 30/7/1 days
        (90 * D, 61 * D, "Expiring", ("True", "ExpiresIn30Days")),
        (90 * D, 84 * D, "Expiring", ("True", "ExpiresIn7Days")),
        (90 * D, 89.5 * D, "Expiring", ("True", "ExpiresIn1Day")),
    ],
)
def test_expiring_depends_on_the_lifetime(
    life: datetime.timedelta, at: datetime.timedelta, phase: str, expiring: tuple[str, str]
) -> None:
    got_phase, conds = ev(leaf(life, renew_at=0.99 if life > WINDOW else 2 / 3), T0 + at)
    assert (got_phase, conds["Expiring"]) == (phase, expiring)
    assert conds["Ready"][0] == ("False" if phase == "Expired" else "True")


def test_ready_is_false_when_revoked_or_expired_whatever_else() -> None:
    phase, conds = ev(leaf(24 * H), T0 + H, revoked=True)
    assert phase == "Revoked"
    assert conds["Ready"] == ("False", "Revoked")
    assert conds["Revoked"][0] == "True"
    phase, conds = ev(leaf(24 * H), T0 + 30 * H, revoked=True)
    assert conds["Ready"][0] == "False"


def test_pending_and_ca_problems() -> None:
    phase, conds = ev(status.CertView(), T0)
    assert phase == "Pending"
    assert conds["Ready"] == ("False", "Pending")
    phase, conds = ev(status.CertView(), T0, ca_error="no Secret")
    assert conds["Ready"] == ("False", "CAUnavailable")
    _, conds = ev(leaf(24 * H), T0 + H, ca_not_after=T0 + 10 * D)
    assert conds["Expiring"] == ("True", "CAExpiring")
    _, conds = ev(leaf(24 * H), T0 + H, issuer_retiring=True)
    assert conds["Expiring"] == ("True", "CARollover")


def test_unchanged_conditions_keep_their_transition_time() -> None:
    first = status.merge_conditions(
        None, status.evaluate(leaf(24 * H), now=T0, alert_window=WINDOW).conditions, T0
    )
    later = T0 + H
    again = status.merge_conditions(
        first, status.evaluate(leaf(24 * H), now=later, alert_window=WINDOW).conditions, later
    )
    assert [c["lastTransitionTime"] for c in again] == [c["lastTransitionTime"] for c in first]
    events = status.transitions(
        first, status.evaluate(leaf(24 * H), now=T0 + 25 * H, alert_window=WINDOW).conditions
    )
    assert {r for _, r, _ in events} == {"Expired", "RenewalOverdue"}
