"""The webhook's JSON Patch, built by podpatch instead of diffed by kopf.

Two properties, on the golden pods and on generated ones: applied to the admitted pod, the
operations give exactly the pod ``injection.inject_sidecar`` makes; and every operation
adds something new (a key that was not there, an item inserted into a list), except, in
transparent mode only, the handler of an app probe that the injection points at the sidecar.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonpatch
import jsonpointer
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubemtls_operator import injection, podpatch, sidecarspec
from kubemtls_sidecar import contract
from operatorkit import GOLDEN_CASES, golden_pod
from operatorkit import INJECTION as SETTINGS
from operatorkit import INJECTION_LEGACY as LEGACY

CASES = {**GOLDEN_CASES, "transparent-probes-legacy": LEGACY}
OUR_CONTAINERS = {contract.SIDECAR_CONTAINER_NAME, contract.INIT_CONTAINER_NAME}
OUR_VOLUMES = {
    contract.VOLUME_TOKEN,
    contract.VOLUME_TRUST,
    contract.VOLUME_TMP,
    contract.VOLUME_UPSTREAM_CA,
}
PROBE_HANDLER = re.compile(
    r"/spec/(containers|initContainers)/(\d+)/(livenessProbe|readinessProbe|startupProbe)"
    r"/(httpGet|tcpSocket)"
)


def load(case: str) -> dict[str, Any]:
    return golden_pod(case.removesuffix("-legacy"))


def injected(pod: dict[str, Any], spec: Any, settings: injection.InjectionSettings) -> Any:
    after = copy.deepcopy(pod)
    injection.inject_sidecar(after, spec, settings)
    return after


def check(pod: dict[str, Any], settings: injection.InjectionSettings) -> list[dict[str, Any]]:
    """Both properties for one pod; returns the operations."""
    decision = injection.decide(pod, settings)
    assert decision.action == "inject", decision
    assert decision.spec is not None
    before = copy.deepcopy(pod)
    ops = podpatch.operations(pod, decision.spec, settings)
    assert pod == before, "operations() changed the pod it was given"
    after = jsonpatch.apply_patch(pod, ops)
    assert after == injected(pod, decision.spec, settings)
    rewrites = sidecarspec.probe_rewrites(pod["spec"], decision.spec)
    touched = _only_adds(pod, ops, transparent=decision.spec.mode == "transparent")
    assert touched == {(r.list_key, r.index, r.field) for r in rewrites}
    assert _without_ours(after, pod, rewrites) == pod
    return ops


def _only_adds(
    pod: dict[str, Any], ops: list[dict[str, Any]], *, transparent: bool
) -> set[tuple[str, int, str]]:
    """Apply ``ops`` one by one, checking each adds; return the probes whose handler changed."""
    doc = copy.deepcopy(pod)
    probes: set[tuple[str, int, str]] = set()
    for op in ops:
        pointer = jsonpointer.JsonPointer(op["path"])
        parent = jsonpointer.JsonPointer.from_parts(pointer.parts[:-1]).resolve(doc)
        last = pointer.parts[-1]
        probe = PROBE_HANDLER.fullmatch(op["path"])
        if probe:
            assert transparent, op
            probes.add((probe[1], int(probe[2]), probe[3]))
            if op["op"] == "add":
                assert last not in parent, op
            else:
                assert op["op"] in ("remove", "replace"), op
                assert last in parent, op
        else:
            assert op["op"] == "add", op
            if isinstance(parent, list):
                assert last == "-" or 0 <= int(last) <= len(parent), op
            else:
                assert parent.get(last) is None, f"{op['path']} overwrites a value"
        doc = jsonpatch.apply_patch(doc, [op])
    return probes


def _without_ours(
    after: dict[str, Any], pod: dict[str, Any], rewrites: list[sidecarspec.ProbeRewrite]
) -> dict[str, Any]:
    """``after`` with everything the injection adds taken out again."""
    out = copy.deepcopy(after)
    spec, was = out["spec"], pod["spec"]
    for key, ours in (
        ("initContainers", OUR_CONTAINERS),
        ("containers", OUR_CONTAINERS),
        ("volumes", OUR_VOLUMES),
    ):
        if key in spec:
            spec[key] = [x for x in spec[key] or [] if x["name"] not in ours]
            if not spec[key] and not was.get(key):
                if key in was:
                    spec[key] = was[key]
                else:
                    del spec[key]
    for r in rewrites:
        spec[r.list_key][r.index][r.field] = copy.deepcopy(was[r.list_key][r.index][r.field])
    meta, was_meta = out["metadata"], pod.get("metadata") or {}
    del meta["annotations"][contract.ANN_INJECTED]
    if not meta["annotations"] and not was_meta.get("annotations"):
        if "annotations" in was_meta:
            meta["annotations"] = was_meta["annotations"]
        else:
            del meta["annotations"]
    return out


@pytest.mark.parametrize("case", CASES)
def test_golden_pods(case: str) -> None:
    check(load(case), CASES[case])


def test_lists_that_exist_get_inserts_by_index() -> None:
    ops = check(load("existing-init-volumes"), SETTINGS)
    paths = [op["path"] for op in ops]
    assert paths == [
        "/metadata/annotations/kubemtls.io~1injected",
        "/spec/initContainers/0",
        "/spec/volumes/2",
        "/spec/volumes/3",
        "/spec/volumes/4",
        "/spec/volumes/5",
    ]


def test_probe_changes_come_before_any_insertion() -> None:
    """Probe paths use the admitted indices, which later insertions shift."""
    for layout in (SETTINGS, LEGACY):
        ops = check(load("transparent-probes"), layout)
        kinds = ["probe" if PROBE_HANDLER.fullmatch(op["path"]) else "other" for op in ops[1:]]
        assert kinds == sorted(kinds, key=lambda k: k != "probe")
        assert "probe" in kinds


def test_a_label_opted_in_pod_without_annotations_gets_the_map() -> None:
    pod = load("job")
    del pod["metadata"]["annotations"]
    pod["metadata"]["labels"]["kubemtls.io/inject"] = "true"
    ops = check(pod, SETTINGS)
    assert ops[0] == {
        "op": "add",
        "path": "/metadata/annotations",
        "value": {"kubemtls.io/injected": "true"},
    }
    pod["metadata"]["annotations"] = None
    assert check(pod, SETTINGS)[0] == ops[0]


def test_null_lists_are_replaced_not_indexed() -> None:
    pod = load("deployment-explicit")
    pod["spec"]["initContainers"] = None
    pod["spec"]["volumes"] = None
    ops = check(pod, SETTINGS)
    assert [op["path"] for op in ops[1:]] == ["/spec/initContainers", "/spec/volumes"]


def test_an_injected_pod_gets_no_operations() -> None:
    pod = load("job")
    spec = injection.decide(pod, SETTINGS).spec
    assert spec is not None
    once = injected(pod, spec, SETTINGS)
    assert podpatch.operations(once, spec, SETTINGS) == []


@pytest.mark.parametrize(
    ("key", "token"),
    [("kubemtls.io/injected", "kubemtls.io~1injected"), ("a~b/c", "a~0b~1c"), ("~1", "~01")],
)
def test_keys_are_escaped_as_rfc_6901_says(key: str, token: str) -> None:
    assert podpatch.escape(key) == token
    assert jsonpointer.JsonPointer("/" + token).parts == [key]


# --- generated pods ---------------------------------------------------------------------------
_PROBES = st.sampled_from(
    [
        None,
        {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5},
        {
            "httpGet": {
                "path": "/ready",
                "port": "http",
                "httpHeaders": [{"name": "X", "value": "1"}],
            }
        },
        {"httpGet": {"path": "/other", "port": 9000}},
        {"httpGet": {"path": "/ext", "port": 8080, "host": "example.org"}},
        {"tcpSocket": {"port": 8080}, "initialDelaySeconds": 3},
        {"exec": {"command": ["/bin/true"]}},
    ]
)


@st.composite
def _containers(draw: Any, prefix: str, native: bool = False) -> list[dict[str, Any]]:
    result = []
    for i in range(draw(st.integers(0 if prefix == "init" else 1, 3))):
        c: dict[str, Any] = {
            "name": f"{prefix}-{i}",
            "image": f"registry.example.org/{prefix}:{i}",
            "ports": [{"name": "http", "containerPort": 8080}],
        }
        if native and draw(st.booleans()):
            c["restartPolicy"] = "Always"
        for field in ("livenessProbe", "readinessProbe", "startupProbe"):
            probe = draw(_PROBES)
            if probe is not None:
                c[field] = copy.deepcopy(probe)
        result.append(c)
    return result


@st.composite
def _pods(draw: Any) -> dict[str, Any]:
    transparent = draw(st.booleans())
    annotations = {
        "kubemtls.io/inbound": "8080" if transparent else "8443:8080",
        "kubemtls.io/outbound": "80=fhir.ehr.example.org:443"
        if transparent
        else "15001=fhir.ehr.example.org:443",
    }
    if transparent:
        annotations["kubemtls.io/mode"] = "transparent"
    if draw(st.booleans()):
        annotations["kubemtls.io/upstream-ca"] = "ehr-ca"
    meta: dict[str, Any] = {"generateName": "app-", "namespace": "apps", "labels": {"app": "a"}}
    if draw(st.booleans()):
        annotations["kubemtls.io/inject"] = "true"
    else:
        meta["labels"]["kubemtls.io/inject"] = "true"
    meta["annotations"] = annotations
    spec: dict[str, Any] = {"containers": draw(_containers("app"))}
    init = draw(st.sampled_from(["absent", "null", "list"]))
    if init == "null":
        spec["initContainers"] = None
    elif init == "list":
        spec["initContainers"] = draw(_containers("init", native=True))
    volumes = draw(st.sampled_from(["absent", "null", "list"]))
    if volumes == "null":
        spec["volumes"] = None
    elif volumes == "list":
        n = draw(st.integers(0, 3))
        spec["volumes"] = [{"name": f"data-{i}", "emptyDir": {}} for i in range(n)]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=_pods(), native=st.booleans())
def test_generated_pods(pod: dict[str, Any], native: bool) -> None:
    check(pod, SETTINGS if native else LEGACY)
