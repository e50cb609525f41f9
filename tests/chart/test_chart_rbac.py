"""The operator's RBAC is least privilege (docs/security.md explains each rule).

Checked for every CA mode, since the Secret rules depend on it: no `*`, no cluster-wide
Secret access, Secrets only by name (plus create, in the release namespace, in bootstrap
mode), the webhook configuration patched only by name, kopf peering by name.
"""

from __future__ import annotations

from typing import Any

import pytest
from chart import chartkit
from chart.chartkit import find, render

MODES = {
    "bootstrap": (),
    "existingSecret": ("ca.mode=existingSecret", "ca.existingSecret=corp-ca"),
    "certManager": ("ca.mode=certManager", "ca.certManager.issuerRef.name=corp-pki"),
}
Rule = dict[str, Any]


def _rules(manifests: list[dict[str, Any]], kind: str) -> list[Rule]:
    return [r for m in manifests if m["kind"] == kind for r in m["rules"]]


def _grants(rules: list[Rule], group: str, resource: str) -> list[Rule]:
    return [r for r in rules if group in r["apiGroups"] and resource in r["resources"]]


@pytest.mark.parametrize("mode", MODES)
def test_no_wildcards_anywhere(mode: str) -> None:
    manifests = render(*MODES[mode])
    for kind in ("ClusterRole", "Role"):
        for rule in _rules(manifests, kind):
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{kind} rule {rule} uses * in {field}"
            assert not rule.get("nonResourceURLs"), rule


@pytest.mark.parametrize("mode", MODES)
def test_secrets_only_by_name_in_the_release_namespace(mode: str) -> None:
    manifests = render(*MODES[mode])
    assert not _grants(_rules(manifests, "ClusterRole"), "", "secrets"), "cluster-wide secrets"
    role = find(manifests, "Role")
    assert role["metadata"]["namespace"] == chartkit.NAMESPACE
    ca_secret = _env(manifests)["KUBEMTLS_OPERATOR_CA_SECRET"]
    for rule in _grants(role["rules"], "", "secrets"):
        if rule.get("resourceNames"):
            assert rule["resourceNames"] == [ca_secret]
        else:  # create cannot be limited by name: only in bootstrap mode, only create
            assert rule["verbs"] == ["create"], rule
            assert mode == "bootstrap", rule
    named = [r for r in _grants(role["rules"], "", "secrets") if r.get("resourceNames")]
    assert {"get", "patch", "update"} <= {v for r in named for v in r["verbs"]}


def test_webhook_configuration_patched_only_by_name() -> None:
    manifests = render()
    rules = _grants(
        _rules(manifests, "ClusterRole"),
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
    )
    name = find(manifests, "MutatingWebhookConfiguration")["metadata"]["name"]
    assert rules == [
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": [name],
            "verbs": ["get", "patch"],
        }
    ]
    assert _env(manifests)["KUBEMTLS_OPERATOR_WEBHOOK_CONFIG"] == name
    all_resources = {res for r in _rules(manifests, "ClusterRole") for res in r["resources"]}
    assert "validatingwebhookconfigurations" not in all_resources


def test_operator_rights_match_what_it_does() -> None:
    cluster = _rules(render(), "ClusterRole")

    def verbs(group: str, resource: str, named: bool | None = None) -> set[str]:
        return {
            v
            for r in _grants(cluster, group, resource)
            if named is None or bool(r.get("resourceNames")) == named
            for v in r["verbs"]
        }

    assert verbs("", "pods") == {"get", "list", "watch", "patch"}
    assert verbs("kubemtls.io", "mtlscerts") == {
        "get", "list", "watch", "create", "patch", "update", "delete",
    }  # fmt: skip
    assert verbs("kubemtls.io", "mtlscerts/status") == {"get", "patch", "update"}
    assert verbs("", "configmaps", named=True) == {"get", "list", "watch", "patch", "update"}
    assert verbs("", "configmaps", named=False) == {"create"}
    assert verbs("", "events") == {"create", "patch"}
    assert verbs("authentication.k8s.io", "tokenreviews") == {"create"}
    assert verbs("", "namespaces") == {"list", "watch"}
    assert verbs("kopf.dev", "clusterkopfpeerings", named=True) == {"get", "patch"}
    # Nothing the operator does not need: no pod creation, no exec, no Secrets.
    granted = {res for r in cluster for res in r["resources"]}
    assert not granted & {"secrets", "pods/exec", "serviceaccounts/token", "nodes"}
    for r in _grants(cluster, "", "configmaps"):
        if r.get("resourceNames"):
            assert r["resourceNames"] == ["kubemtls-trust"]


def test_state_configmap_is_namespaced_and_named() -> None:
    role = find(render(), "Role")
    (rule,) = _grants(role["rules"], "", "configmaps")
    assert rule["resourceNames"] == ["kubemtls-state"]


def test_no_peering_rights_without_peering() -> None:
    rules = _rules(render("replicaCount=1", "peering.enabled=false"), "ClusterRole")
    assert not _grants(rules, "kopf.dev", "clusterkopfpeerings")


def test_bindings_name_the_operator_service_account() -> None:
    manifests = render("serviceAccount.create=false", "serviceAccount.name=platform-sa")
    dep = find(manifests, "Deployment")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "platform-sa"
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        (subject,) = find(manifests, kind)["subjects"]
        assert subject == {
            "kind": "ServiceAccount",
            "name": "platform-sa",
            "namespace": chartkit.NAMESPACE,
        }
    assert "ServiceAccount" not in chartkit.kinds(manifests)


def _env(manifests: list[dict[str, Any]]) -> dict[str, str]:
    (c,) = find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in c["env"]}
