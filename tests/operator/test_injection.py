"""Decide, then patch: the webhook's pure core on realistic pods, with golden patches.

Golden patches live in ``tests/operator/data/<case>.patch.json`` next to the input pod
``<case>.pod.yaml``. Regenerate them with ``KUBEMTLS_UPDATE_GOLDEN=1 pytest
tests/operator/test_injection.py`` and review the diff.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import types
from typing import Any

import jsonpatch
import kopf
import kubernetes_validate
import pytest
import testkit_podsecurity
from kubemtls_operator import config, injection, podpatch
from operatorkit import GOLDEN as DATA
from operatorkit import GOLDEN_CASES as CASES
from operatorkit import INJECTION as SETTINGS
from operatorkit import INJECTION_LEGACY as LEGACY
from operatorkit import golden_pod as load

UPDATE = os.environ.get("KUBEMTLS_UPDATE_GOLDEN") == "1"
EXPLICIT = [c for c in CASES if c != "transparent-probes"]
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def injected(pod: dict[str, Any], settings: injection.InjectionSettings) -> dict[str, Any]:
    decision = injection.decide(pod, settings)
    assert decision.action == "inject", decision
    assert decision.spec is not None
    after = copy.deepcopy(pod)
    injection.inject_sidecar(after, decision.spec, settings)
    return after


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("case", CASES)
def test_patch_matches_golden_file(case: str) -> None:
    """The golden file is the JSON Patch the webhook sends (podpatch's operations)."""
    pod = load(case)
    after = injected(pod, CASES[case])
    decision = injection.decide(pod, CASES[case])
    assert decision.spec is not None
    ops = podpatch.operations(pod, decision.spec, CASES[case])
    golden = DATA / f"{case}.patch.json"
    if UPDATE:
        golden.write_text(json.dumps(ops, indent=2, sort_keys=True) + "\n")
    assert ops == json.loads(golden.read_text())
    assert jsonpatch.apply_patch(pod, ops) == after
    # A generic diff of the same change (what kopf's patch.fns would send) agrees.
    assert jsonpatch.apply_patch(pod, jsonpatch.make_patch(pod, after).patch) == after


@pytest.mark.parametrize("case", CASES)
def test_kopf_patch_fns_give_the_same_patch(case: str) -> None:
    """The handler's path: kopf runs the function on a copy and diffs it."""
    pod = load(case)
    spec = injection.decide(pod, CASES[case]).spec
    assert spec is not None
    patch = kopf.Patch()
    patch.fns.append(functools.partial(injection.inject_sidecar, spec=spec, settings=CASES[case]))
    ops = patch.as_json_patch(kopf.Body(pod))  # type: ignore[arg-type]
    assert jsonpatch.apply_patch(pod, ops) == injected(pod, CASES[case])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_patched_pod_is_a_valid_pod(case: str, version: str) -> None:
    after = injected(load(case), CASES[case])
    # kubernetes-validate crashes on a pod without a name (TESTING.md §4b2).
    after["metadata"].setdefault("name", after["metadata"].get("generateName", "p") + "x1y2z")
    kubernetes_validate.validate(after, version, strict=True)


@pytest.mark.parametrize("case", EXPLICIT)
def test_explicit_mode_keeps_the_pod_restricted(case: str) -> None:
    pod = load(case)
    assert testkit_podsecurity.violations(pod) == []
    assert testkit_podsecurity.violations(injected(pod, CASES[case])) == []


def test_transparent_mode_is_not_restricted_nor_baseline() -> None:
    pod = load("transparent-probes")
    assert testkit_podsecurity.violations(pod) == []
    after = injected(pod, SETTINGS)
    found = testkit_podsecurity.violations(after)
    assert "initContainer kubemtls-init: runAsNonRoot must be true (pod or container)" in found
    assert "initContainer kubemtls-init: runAsUser must not be 0" in found
    assert any("kubemtls-init: only NET_BIND_SERVICE may be added" in f for f in found)
    assert all("kubemtls-init" in f for f in found)
    assert any("NET_ADMIN" in f for f in testkit_podsecurity.baseline_violations(after))


def test_docs_say_which_mode_passes_restricted() -> None:
    import testkit

    docs = (testkit.REPO / "docs" / "annotations.md").read_text()
    assert "restricted" in docs
    assert "Transparent mode does not pass" in docs


@pytest.mark.parametrize(
    ("mutate", "rule"),
    [
        (lambda p: p["spec"].update(hostNetwork=True), "hostNetwork must not be true"),
        (lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
         "hostPath volumes are forbidden"),
        (lambda p: p["spec"]["containers"][0]["securityContext"].update(privileged=True),
         "privileged must not be true"),
        (lambda p: p["spec"]["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
         "allowPrivilegeEscalation must be false"),
        (lambda p: p["spec"]["securityContext"].pop("runAsNonRoot"), "runAsNonRoot must be true"),
        (lambda p: p["spec"]["securityContext"].pop("seccompProfile"),
         "seccompProfile must be RuntimeDefault"),
        (lambda p: p["spec"]["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
         "capabilities must drop ALL"),
        (lambda p: p["spec"]["containers"][0]["ports"].append({"containerPort": 1, "hostPort": 1}),
         "hostPort 1 is forbidden"),
        (lambda p: p["spec"]["securityContext"].update(sysctls=[{"name": "kernel.msgmax"}]),
         "sysctl kernel.msgmax"),
        (lambda p: p["spec"]["containers"][0]["securityContext"].update(procMount="Unmasked"),
         "procMount must be Default"),
        (lambda p: p["spec"]["containers"][0]["securityContext"].update(
            appArmorProfile={"type": "Unconfined"}), "appArmorProfile Unconfined"),
    ],
)  # fmt: skip
def test_podsecurity_checker_catches_each_rule(mutate: Any, rule: str) -> None:
    pod = load("existing-init-volumes")
    mutate(pod)
    assert any(rule in v for v in testkit_podsecurity.violations(pod)), rule


def test_native_sidecar_is_the_first_init_container() -> None:
    after = injected(load("existing-init-volumes"), SETTINGS)
    names = [c["name"] for c in after["spec"]["initContainers"]]
    assert names == ["kubemtls-sidecar", "migrate"]
    sidecar = after["spec"]["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["command"] == ["kubemtls-sidecar"]
    assert "args" not in sidecar
    assert sidecar["startupProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": 15020,
        "scheme": "HTTP",
    }
    assert (
        sidecar["startupProbe"]["failureThreshold"] * sidecar["startupProbe"]["periodSeconds"] >= 60
    )
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "kubemtls-admin", "containerPort": 15020, "protocol": "TCP"} in sidecar["ports"]
    assert {"name": "mtls-9443", "containerPort": 9443, "protocol": "TCP"} in sidecar["ports"]
    assert sidecar["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1337,
        "runAsGroup": 1337,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert sidecar["resources"] == SETTINGS.sidecar_resources
    assert after["metadata"]["annotations"]["kubemtls.io/injected"] == "true"


def test_sidecar_env_follows_the_contract() -> None:
    after = injected(load("existing-init-volumes"), SETTINGS)
    env = env_of(after["spec"]["initContainers"][0])
    assert env == {
        "KUBEMTLS_MODE": "explicit",
        "KUBEMTLS_INBOUND": "9443:127.0.0.1:9090",
        "KUBEMTLS_OUTBOUND": "15001=fhir.partner.example.org:443,15002=claims-db.claims.svc:5432",
        "KUBEMTLS_SIGNER": "https://kubemtls.kubemtls.svc:9444",
        "KUBEMTLS_TOKEN_FILE": "/var/run/secrets/kubemtls/token",
        "KUBEMTLS_TRUST_DIR": "/var/run/kubemtls/trust",
        "KUBEMTLS_ADMIN_PORT": "15020",
        "KUBEMTLS_PROTOCOL": "http",
        "KUBEMTLS_KEY_TYPE": "rsa-2048",
        "KUBEMTLS_REQUIRE_BOUND_TOKEN": "true",
        "KUBEMTLS_UPSTREAM_CA": "/var/run/kubemtls/upstream-ca/ca.crt",
        "KUBEMTLS_LOG_FORMAT": "json",
        "KUBEMTLS_POD_NAME": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
        "KUBEMTLS_POD_NAMESPACE": {
            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}
        },
    }


def test_volumes_are_added_and_mounted_by_the_sidecar_only() -> None:
    pod = load("existing-init-volumes")
    after = injected(pod, SETTINGS)
    volumes = {v["name"]: v for v in after["spec"]["volumes"]}
    assert list(volumes)[:2] == ["config", "scratch"]
    assert volumes["kubemtls-token"]["projected"]["sources"] == [
        {
            "serviceAccountToken": {
                "audience": "kubemtls",
                "expirationSeconds": 3600,
                "path": "token",
            }
        }
    ]
    assert volumes["kubemtls-trust"] == {
        "name": "kubemtls-trust",
        "configMap": {"name": "kubemtls-trust"},
    }
    assert volumes["kubemtls-upstream-ca"]["configMap"]["name"] == "ehr-public-ca"
    assert volumes["kubemtls-tmp"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m for m in after["spec"]["initContainers"][0]["volumeMounts"]}
    token_mount = {
        "name": "kubemtls-token",
        "mountPath": "/var/run/secrets/kubemtls",
        "readOnly": True,
    }
    assert mounts["kubemtls-token"] == token_mount
    assert mounts["kubemtls-trust"]["mountPath"] == "/var/run/kubemtls/trust"
    assert mounts["kubemtls-upstream-ca"]["mountPath"] == "/var/run/kubemtls/upstream-ca"
    # The app's containers are exactly as they were: no volume, no key, no privilege.
    assert after["spec"]["containers"] == pod["spec"]["containers"]
    assert after["spec"]["initContainers"][1:] == pod["spec"]["initContainers"]
    assert after["spec"]["securityContext"] == pod["spec"]["securityContext"]


def test_token_expiration_comes_from_settings() -> None:
    after = injected(load("job"), dataclasses.replace(SETTINGS, token_expiration=7200))
    token = next(v for v in after["spec"]["volumes"] if v["name"] == "kubemtls-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"] == 7200


def test_job_pod_keeps_restart_policy_never_with_a_native_sidecar() -> None:
    pod = load("job")
    after = injected(pod, SETTINGS)
    assert after["spec"]["restartPolicy"] == "Never"
    assert after["spec"]["initContainers"][0]["restartPolicy"] == "Always"
    assert after["spec"]["containers"] == pod["spec"]["containers"]


def test_legacy_layout_puts_the_sidecar_first_with_a_post_start_wait() -> None:
    pod = load("legacy-explicit")
    after = injected(pod, LEGACY)
    first = after["spec"]["containers"][0]
    assert first["name"] == "kubemtls-sidecar"
    assert "restartPolicy" not in first
    assert first["lifecycle"]["postStart"]["exec"]["command"] == [
        "kubemtls-sidecar",
        "--wait-ready",
    ]
    assert after["spec"]["containers"][1:] == pod["spec"]["containers"]
    assert "initContainers" not in after["spec"]


def test_transparent_mode_adds_init_before_sidecar_and_rewrites_probes() -> None:
    pod = load("transparent-probes")
    after = injected(pod, SETTINGS)
    init, sidecar = after["spec"]["initContainers"]
    assert (init["name"], sidecar["name"]) == ("kubemtls-init", "kubemtls-sidecar")
    assert init["command"] == ["kubemtls-sidecar"]
    assert init["args"] == ["--install-redirects"]
    assert init["securityContext"]["runAsUser"] == 0
    assert init["securityContext"]["runAsNonRoot"] is False
    assert init["securityContext"]["allowPrivilegeEscalation"] is False
    assert init["securityContext"]["capabilities"] == {
        "add": ["NET_ADMIN", "NET_RAW"],
        "drop": ["ALL"],
    }
    assert "restartPolicy" not in init
    assert init["env"] == sidecar["env"]
    web = after["spec"]["containers"][0]
    assert web["readinessProbe"] == {
        "httpGet": {"path": "/app-health/web/readyz", "port": 15020, "scheme": "HTTP"},
        "periodSeconds": 5,
        "timeoutSeconds": 2,
    }
    assert web["livenessProbe"] == {
        "httpGet": {"path": "/app-health/web/livez", "port": 15020, "scheme": "HTTP"},
        "initialDelaySeconds": 10,
    }
    # Port 9000 is not intercepted, and an exec probe never goes through the network.
    assert web["startupProbe"] == pod["spec"]["containers"][0]["startupProbe"]
    assert after["spec"]["containers"][1] == pod["spec"]["containers"][1]
    probes = json.loads(env_of(sidecar)["KUBEMTLS_APP_PROBES"])
    assert probes == {
        "/app-health/web/readyz": {
            "httpGet": {
                "path": "/ready",
                "port": 8080,
                "scheme": "HTTP",
                "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}],
            },
            "timeoutSeconds": 2,
        },
        "/app-health/web/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
    }
    assert env_of(sidecar)["KUBEMTLS_INBOUND"] == "8080"
    assert env_of(sidecar)["KUBEMTLS_OUTBOUND"] == "80=fhir.ehr.example.org:443"


def test_injection_is_idempotent() -> None:
    for case, settings in CASES.items():
        once = injected(load(case), settings)
        twice = copy.deepcopy(once)
        decision = injection.decide(twice, settings)
        assert decision.action == "skip"
        assert decision.reason == "sidecar_already_exists"
        assert decision.spec is None
        injection.inject_sidecar(twice, injected_spec(case), settings)
        assert twice == once


def injected_spec(case: str) -> Any:
    decision = injection.decide(load(case), CASES[case])
    return decision.spec


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p["metadata"]["annotations"].pop("kubemtls.io/inject"), "not_opted_in"),
        (lambda p: p["metadata"]["annotations"].update({"kubemtls.io/inject": "false"}),
         "opted_out"),
        (lambda p: p["metadata"]["annotations"].update({"kubemtls.io/injected": "true"}),
         "already_injected"),
        (lambda p: p["spec"]["containers"].append({"name": "kubemtls-sidecar", "image": "x"}),
         "sidecar_already_exists"),
        (lambda p: p["spec"].update(initContainers=[{"name": "kubemtls-sidecar", "image": "x"}]),
         "sidecar_already_exists"),
    ],
)  # fmt: skip
def test_pods_left_alone(mutate: Any, reason: str) -> None:
    pod = load("deployment-explicit")
    mutate(pod)
    decision = injection.decide(pod, SETTINGS)
    assert (decision.action, decision.reason) == ("skip", reason)
    assert decision.message == injection.REASONS[reason]


def test_label_opt_in_and_annotation_opt_out() -> None:
    pod = load("job")
    assert injection.decide(pod, SETTINGS).action == "inject"
    pod["metadata"]["annotations"]["kubemtls.io/inject"] = "false"
    assert injection.decide(pod, SETTINGS).reason == "opted_out"
    pod = load("job")
    pod["metadata"]["labels"]["kubemtls.io/inject"] = "enabled"
    decision = injection.decide(pod, SETTINGS)
    assert decision.action == "deny"
    assert 'kubemtls.io/inject: "enabled" — must be "true" or "false"' in decision.message


@pytest.mark.parametrize(
    "pod",
    [
        "a string",
        ["a", "list"],
        {},
        {"metadata": {}, "spec": {}},
        {"metadata": {}, "spec": {"containers": []}},
        {"metadata": {}, "spec": {"containers": "web"}},
        {"metadata": {"annotations": ["x"]}, "spec": {"containers": [{"name": "a"}]}},
        {"metadata": {}, "spec": {"containers": [{"name": "a"}], "volumes": {"a": 1}}},
        {"metadata": "x", "spec": {"containers": [{"name": "a"}]}},
    ],
)
def test_malformed_pods_are_denied_with_400(pod: object) -> None:
    decision = injection.decide(pod, SETTINGS)
    assert (decision.action, decision.reason, decision.status_code) == ("deny", "not_a_pod", 400)


def test_invalid_annotations_are_denied_with_422() -> None:
    pod = load("deployment-explicit")
    pod["metadata"]["annotations"]["kubemtls.io/inbound"] = "8443:80800"
    decision = injection.decide(pod, SETTINGS)
    assert (decision.action, decision.reason, decision.status_code) == (
        "deny",
        "invalid_annotations",
        422,
    )
    assert "port 80800 is out of range (1-65535)" in decision.message


def test_host_network_pod_is_denied() -> None:
    pod = load("deployment-explicit")
    pod["spec"]["hostNetwork"] = True
    decision = injection.decide(pod, SETTINGS)
    assert (decision.action, decision.reason) == ("deny", "host_network")
    assert "hostNetwork" in decision.message


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda p: p["spec"]["volumes"].append({"name": "kubemtls-token", "emptyDir": {}}),
         "a volume named kubemtls-token"),
        (lambda p: p["spec"]["volumes"].append({"name": "kubemtls-upstream-ca", "emptyDir": {}}),
         "a volume named kubemtls-upstream-ca"),
        (lambda p: p["spec"]["initContainers"].append({"name": "kubemtls-init", "image": "x"}),
         "a container named kubemtls-init"),
    ],
)  # fmt: skip
def test_our_names_already_in_use_are_denied(mutate: Any, fragment: str) -> None:
    pod = load("existing-init-volumes")
    mutate(pod)
    decision = injection.decide(pod, SETTINGS)
    assert (decision.action, decision.reason) == ("deny", "name_taken")
    assert fragment in decision.message


def test_grpc_probe_on_an_intercepted_port_is_denied() -> None:
    pod = load("transparent-probes")
    pod["spec"]["containers"][0]["livenessProbe"] = {"grpc": {"port": 8080}}
    decision = injection.decide(pod, SETTINGS)
    assert (decision.action, decision.reason) == ("deny", "unsupported_probe")
    assert "web/livenessProbe" in decision.message
    pod["spec"]["containers"][0]["livenessProbe"] = {"grpc": {"port": 9000}}
    assert injection.decide(pod, SETTINGS).action == "inject"


def test_settings_from_the_operator_config() -> None:
    cfg = config.load(
        {
            "KUBEMTLS_OPERATOR_SIDECAR_IMAGE": "registry.local/kubemtls:dev",
            "KUBEMTLS_OPERATOR_NATIVE_SIDECAR": "false",
            "KUBEMTLS_OPERATOR_DNS_ALLOW_LIST": "*.partner.example.org",
            "KUBEMTLS_OPERATOR_CERT_DURATION_MAX": "48h",
            "KUBEMTLS_OPERATOR_TOKEN_EXPIRATION": "1200",
        }
    )
    settings = injection.InjectionSettings.from_config(cfg)
    assert settings.sidecar_image == "registry.local/kubemtls:dev"
    assert settings.native_sidecar is False
    assert settings.dns_allow_list == ("*.partner.example.org",)
    assert settings.cert_duration_max == datetime.timedelta(hours=48)
    assert settings.cert_duration_min == datetime.timedelta(minutes=10)
    assert settings.token_expiration == 1200
    assert settings.signer_url == "https://kubemtls.kubemtls.svc:9444"
    assert settings.sidecar_resources == cfg.sidecar_resources


def test_settings_from_a_config_without_a_minimum() -> None:
    cfg = types.SimpleNamespace(
        sidecar_image="i",
        sidecar_image_pull_policy="Always",
        sidecar_resources=None,
        native_sidecar=True,
        signer_url="https://s:9444",
        trust_domain="td.example",
        cluster_domain="c.local",
        cert_duration_max="72h",
        dns_allow_list="a.example.org, b.example.org",
        token_expiration="900",
    )
    settings = injection.InjectionSettings.from_config(cfg)
    assert settings.cert_duration_min == datetime.timedelta(minutes=10)
    assert settings.cert_duration_max == datetime.timedelta(hours=72)
    assert settings.dns_allow_list == ("a.example.org", "b.example.org")
    assert settings.limits.trust_domain == "td.example"
    after = injected(load("job"), settings)
    assert "resources" not in after["spec"]["initContainers"][0]


def test_settings_are_built_once_per_config_object() -> None:
    cfg = config.load({})
    first = injection.InjectionSettings.of(cfg)
    assert injection.InjectionSettings.of(cfg) is first
    other = config.load({"KUBEMTLS_OPERATOR_SIDECAR_IMAGE": "registry.local/kubemtls:dev"})
    assert injection.InjectionSettings.of(other).sidecar_image == "registry.local/kubemtls:dev"
    assert injection.InjectionSettings.of(cfg) == first


def test_remembered_annotations_still_depend_on_the_namespace() -> None:
    """decide() parses a template's annotations once; the namespace is part of what it keys."""
    pod = load("job")
    pod["metadata"]["annotations"]["kubemtls.io/dns-names"] = "api.payments.svc"
    for _ in range(2):
        pod["metadata"]["namespace"] = "payments"
        assert injection.decide(pod, SETTINGS).action == "inject"
        pod["metadata"]["namespace"] = "claims"
        decision = injection.decide(pod, SETTINGS)
        assert (decision.action, decision.reason) == ("deny", "invalid_annotations")
        assert 'is a name of namespace "payments"' in decision.message
    # Annotations that are not kubemtls.io/ ones (a rollout hash) do not change the result.
    pod["metadata"]["annotations"]["checksum/config"] = "abc123"
    assert injection.decide(pod, SETTINGS).message == decision.message


def test_legacy_transparent_layout_keeps_init_then_app_order() -> None:
    pod = load("transparent-probes")
    after = injected(pod, LEGACY)
    assert [c["name"] for c in after["spec"]["initContainers"]] == ["kubemtls-init"]
    assert [c["name"] for c in after["spec"]["containers"]] == [
        "kubemtls-sidecar",
        "web",
        "log-shipper",
    ]
    after["metadata"]["name"] = "portal-x1y2z"
    kubernetes_validate.validate(after, VERSIONS[0], strict=True)


def test_docs_show_the_message_the_webhook_gives() -> None:
    import testkit

    pod = load("deployment-explicit")
    pod["metadata"]["annotations"].update(
        {"kubemtls.io/inbound": "8443:80800", "kubemtls.io/inbund": "8443:8080"}
    )
    message = injection.decide(pod, SETTINGS).message
    docs = (testkit.REPO / "docs" / "annotations.md").read_text()
    assert "denied the request: " + message in docs


@pytest.mark.parametrize("case", CASES)
def test_the_sidecar_accepts_the_configuration_the_webhook_writes(
    case: str, tmp_path: pathlib.Path
) -> None:
    """The contract across packages: the sidecar's own parser reads our env as we mean it."""
    from kubemtls_sidecar import appprobes
    from kubemtls_sidecar import config as sidecar_config

    after = injected(load(case), CASES[case])
    ours = [c for k in ("initContainers", "containers") for c in after["spec"].get(k, [])]
    sidecar = next(c for c in ours if c["name"] == "kubemtls-sidecar")
    env = {e["name"]: e.get("value", "pod-or-namespace") for e in sidecar["env"]}
    # Only the mounted paths move to this test's directory; every other value is ours.
    (tmp_path / "token").write_text("token")
    (tmp_path / "ca.crt").write_text("ca")
    env.update(KUBEMTLS_TOKEN_FILE=str(tmp_path / "token"), KUBEMTLS_TRUST_DIR=str(tmp_path))
    if "KUBEMTLS_UPSTREAM_CA" in env:
        env["KUBEMTLS_UPSTREAM_CA"] = str(tmp_path / "ca.crt")
    cfg = sidecar_config.parse([], env)
    spec = injection.decide(load(case), CASES[case]).spec
    assert spec is not None
    assert cfg.mode == spec.mode
    assert [(i.listen_port, i.app_host, i.app_port) for i in cfg.inbound] == [
        (e.listen, "127.0.0.1", e.app) for e in spec.inbound
    ]
    assert [(o.local_port, o.upstream_host, o.upstream_port) for o in cfg.outbound] == [
        (r.local_port, r.host, r.port) for r in spec.outbound
    ]
    assert cfg.allowed_peers == spec.allowed_peers
    assert cfg.signer == SETTINGS.signer_url
    assert cfg.admin_port == 15020
    assert len(appprobes.parse(cfg.app_probes)) == (2 if case == "transparent-probes" else 0)
    init = next((c for c in ours if c["name"] == "kubemtls-init"), None)
    if init is not None:
        init_env = {e["name"]: e.get("value", "x") for e in init["env"]}
        assert sidecar_config.parse(init["args"], init_env).install_redirects is True
