"""What keeps 10,000 MTLSCerts small and each watch event cheap, without changing results.

Shared record parts (bounded), kopf's diff base without the status it drops, and the
emulator's copy-once merge patch (RFC 7386) behaving as a deep-copying one did.
"""

from __future__ import annotations

import copy
from typing import Any

import kopf
from kubemtls_operator import kopfsettings, sweeper, workload
from kubemtls_operator.emu import patching


def _pod(name: str, **anns: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ehr",
            "uid": f"uid-{name}",
            "annotations": {"kubemtls.io/inject": "true", **anns},
        },
        "spec": {"serviceAccountName": "app", "containers": [{"name": "app"}]},
    }


def test_pods_of_one_workload_share_their_annotations_but_not_big_odd_ones() -> None:
    a = workload.facts(_pod("a", **{"kubemtls.io/inbound": "8443:8080"}))
    b = workload.facts(_pod("b", **{"kubemtls.io/inbound": "8443:8080"}))
    assert a.annotations == b.annotations
    assert a.annotations is b.annotations
    assert a.namespace is b.namespace
    big = {"kubemtls.io/dns-names": "x" * 2000}
    c, d = workload.facts(_pod("c", **big)), workload.facts(_pod("d", **big))
    assert c.annotations == d.annotations
    assert c.annotations is not d.annotations


def _cert(name: str, reason: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ehr", "uid": f"uid-{name}"},
        "status": {
            "phase": "Issued",
            "serial": f"{abs(hash(name)):x}",
            "issuer": "CN=kubemtls root",
            "notAfter": "2030-01-01T00:00:00Z",
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Issued", "message": name},
                {"type": "Expiring", "status": "False", "reason": reason, "message": ""},
            ],
        },
    }


def test_cert_records_share_equal_conditions_and_stay_equal_to_unshared_ones() -> None:
    one = sweeper.CertRecord.from_body(_cert("one", "NotExpiring"))
    two = sweeper.CertRecord.from_body(_cert("two", "NotExpiring"))
    assert one.conditions is two.conditions
    assert one.view.issuer is two.view.issuer
    odd = sweeper.CertRecord.from_body(_cert("odd", "R" * 600))
    again = sweeper.CertRecord.from_body(_cert("odd", "R" * 600))
    assert odd == again
    assert odd.conditions is not again.conditions
    assert one.conditions == (("Ready", "True", "Issued"), ("Expiring", "False", "NotExpiring"))


def test_the_diff_base_is_kopfs_own_without_copying_the_status() -> None:
    body = kopf.Body(
        {
            "apiVersion": "kubemtls.io/v1alpha1",
            "kind": "MTLSCert",
            "metadata": {
                "name": "p",
                "namespace": "ehr",
                "labels": {"app": "x"},
                "annotations": {"kubemtls.io/revoke": "keyCompromise", "other": "1"},
            },
            "spec": {"podName": "p", "dnsNames": ["a.ehr.svc"]},
            "status": _cert("p", "NotExpiring")["status"],
        }
    )
    ours, kopfs = kopfsettings.StatuslessDiffBase(), kopf.AnnotationsDiffBaseStorage()
    assert ours.build(body=body) == kopfs.build(body=body)
    assert "status" not in ours.build(body=body)
    fields = ["status.phase"]
    assert ours.build(body=body, extra_fields=fields) == kopfs.build(body=body, extra_fields=fields)
    settings = kopf.OperatorSettings()
    kopfsettings.apply(settings)
    assert isinstance(settings.persistence.diffbase_storage, kopfsettings.StatuslessDiffBase)


def _deep_merge_patch(target: Any, patch: Any) -> Any:  # the former, deep-copying one
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = _deep_merge_patch(result.get(k), v)
    return result


def test_the_emulators_merge_patch_matches_rfc7386_and_shares_nothing() -> None:
    target: dict[str, Any] = {
        "a": {"b": [1, {"c": 2}], "d": "x"},
        "e": 1,
        "status": {"conditions": [{"type": "Ready"}], "serial": "1"},
    }
    cases = [
        {"a": {"d": None, "f": {"g": [3]}}, "e": None, "h": True},
        {"status": {"serial": "2", "conditions": [{"type": "Ready", "status": "True"}]}},
        {"a": None},
        {},
    ]
    for patch in cases:
        want = _deep_merge_patch(target, patch)
        got = patching.merge_patch(target, patch)
        assert got == want
        assert list(got) == list(want)
        got.setdefault("a", {}).setdefault("b", [None]).append("mutated")
        for key in got.get("status", {}):
            got["status"][key] = "mutated"
        assert target["a"]["b"] == [1, {"c": 2}]
        assert target["status"]["serial"] == "1"
        assert "mutated" not in str(patch)
    assert patching.merge_patch("not a dict", {"x": 1}) == {"x": 1}
    assert patching.merge_patch({"x": 1}, [1, 2]) == [1, 2]
    data = {"k": [{"v": 1.5, "n": None, "t": True}], "s": "x"}
    clone = patching.jcopy(data)
    assert clone == data
    assert clone["k"] is not data["k"]
    assert clone["k"][0] is not data["k"][0]
