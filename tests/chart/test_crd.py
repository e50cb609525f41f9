"""The MTLSCert CRD accepts what the operator writes and refuses obviously wrong specs.

The OpenAPI schema is checked with jsonschema (what kubernetes-validate cannot do for a
custom resource), and the CRD's CEL rules (x-kubernetes-validations) are compiled and
evaluated with cel-python, as the API server would. The CRD itself must stay valid for
kopf: a status subresource, status.kopf preserved, the printer columns DESIGN.md names.
"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import celpy.adapter
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubemtls_sidecar import contract
from testkit import CRD_FILE

CRD = yaml.safe_load(CRD_FILE.read_text())
(VERSION,) = CRD["spec"]["versions"]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]

GOOD: dict[str, Any] = {
    "apiVersion": "kubemtls.io/v1alpha1",
    "kind": "MTLSCert",
    "metadata": {"name": "fhir-client-7d9f", "namespace": "ehr"},
    "spec": {
        "podName": "fhir-client-7d9f",
        "podUID": "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0",
        "serviceAccount": "fhir-client",
        "identity": "spiffe://cluster.local/ns/ehr/sa/fhir-client",
        "dnsNames": ["api.ehr.svc", "api.ehr.svc.cluster.local"],
        "duration": "24h",
        "keyType": "ecdsa-p256",
    },
    "status": {
        "phase": "Issued",
        "serial": "5f2a9c",
        "notBefore": "2026-11-25T20:00:00Z",
        "notAfter": "2026-11-26T20:00:00Z",
        "renewalTime": "2026-11-26T12:00:00Z",
        "fingerprintSHA256": "ab" * 32,
        "issuer": "CN=kubemtls root",
        "rotations": 3,
        "revocations": [
            {"serial": "5f2a9b", "reason": "keyCompromise", "time": "2026-11-25T19:00:00Z"}
        ],
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Issued", "message": "ok"},
            {"type": "Injected", "status": "True", "reason": "Injected", "message": ""},
        ],
        "kopf": {"progress": {"anything": {"kopf": "writes"}}},
    },
}


def _with(path: str, value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = obj
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return obj


_DELETE = object()

BAD = {
    "no spec": ("spec", _DELETE),
    "no pod UID": ("spec.podUID", _DELETE),
    "empty pod name": ("spec.podName", ""),
    "identity not SPIFFE": ("spec.identity", "CN=fhir-client"),
    "identity with a path": ("spec.identity", "spiffe://cluster.local/fhir-client"),
    "unknown key type": ("spec.keyType", "dsa-1024"),
    "duration without unit": ("spec.duration", "24"),
    "DNS name with a scheme": ("spec.dnsNames", ["https://api.ehr.svc"]),
    "DNS name in capitals": ("spec.dnsNames", ["API.ehr.svc"]),
    "unknown phase": ("status.phase", "Happy"),
    "unknown condition": ("status.conditions", [{"type": "Sunny", "status": "True"}]),
    "condition status yes": ("status.conditions", [{"type": "Ready", "status": "yes"}]),
    "negative rotations": ("status.rotations", -1),
    "revocation without reason": ("status.revocations", [{"serial": "1", "time": "t"}]),
}


def test_crd_is_valid_kubernetes() -> None:
    for version in ("1.25.0", "1.29.0", "1.37.0"):
        kubernetes_validate.validate(CRD, version, strict=True)


def test_crd_names_and_kopf_needs() -> None:
    assert CRD["metadata"]["name"] == f"{contract.CRD_PLURAL}.{contract.CRD_GROUP}"
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"]) == (contract.CRD_KIND, contract.CRD_PLURAL)
    assert "mtlscert" in names["shortNames"]
    assert CRD["spec"]["scope"] == "Namespaced"
    assert VERSION["name"] == contract.CRD_VERSION
    assert VERSION["subresources"] == {"status": {}}  # kopf patches /status
    kopf = SCHEMA["properties"]["status"]["properties"]["kopf"]
    assert kopf["x-kubernetes-preserve-unknown-fields"] is True
    columns = [(c["name"], c.get("priority", 0)) for c in VERSION["additionalPrinterColumns"]]
    assert columns == [
        ("Pod", 0), ("Identity", 0), ("Ready", 0), ("Expires", 0), ("Renews", 0),
        ("Age", 0), ("Serial", 1), ("Phase", 1),
    ]  # fmt: skip
    types = {c["name"]: c["type"] for c in VERSION["additionalPrinterColumns"]}
    assert types["Expires"] == types["Renews"] == "string"  # a date column says <invalid>


def test_good_mtlscert_passes_the_schema() -> None:
    jsonschema.validate(GOOD, SCHEMA)
    minimal = {
        "spec": {k: GOOD["spec"][k] for k in ("podName", "podUID", "serviceAccount", "identity")}
    }
    jsonschema.validate(minimal, SCHEMA)


@pytest.mark.parametrize("case", BAD)
def test_wrong_mtlscert_fails_the_schema(case: str) -> None:
    path, value = BAD[case]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_with(path, value), SCHEMA)


def _cel_rules(schema: dict[str, Any], path: str = "") -> list[tuple[str, str, str]]:
    """(path, rule, message) of every x-kubernetes-validations entry, depth first."""
    found = [(path, r["rule"], r["message"]) for r in schema.get("x-kubernetes-validations", [])]
    for key, sub in schema.get("properties", {}).items():
        found += _cel_rules(sub, f"{path}.{key}" if path else key)
    return found


def _cel_allows(obj: dict[str, Any], path: str, rule: str) -> bool:
    env = celpy.Environment()
    program = env.program(env.compile(rule))
    node: Any = obj
    for part in filter(None, path.split(".")):
        node = node[part]
    return bool(program.evaluate({"self": celpy.adapter.json_to_cel(node)}))


def test_cel_rules_compile_and_pass_a_good_object() -> None:
    rules = _cel_rules(SCHEMA)
    assert {p for p, _, _ in rules} == {"", "spec"}
    for path, rule, message in rules:
        assert message, rule
        assert _cel_allows(GOOD, path, rule), f"{path}: {rule}"


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (_with("metadata.name", "some-other-pod"), "named after its pod"),
        (_with("spec.serviceAccount", "billing"), "SPIFFE ID of spec.serviceAccount"),
        (_with("spec.identity", "spiffe://cluster.local/ns/ehr/sa/fhir-client-2"), "SPIFFE ID"),
    ],
)
def test_cel_rules_refuse_inconsistent_specs(obj: dict[str, Any], message: str) -> None:
    jsonschema.validate(obj, SCHEMA)  # structurally fine: only a CEL rule catches it
    refused = [m for p, r, m in _cel_rules(SCHEMA) if not _cel_allows(obj, p, r)]
    assert any(message in m for m in refused), refused
