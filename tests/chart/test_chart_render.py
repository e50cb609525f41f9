"""The chart renders valid Kubernetes objects for every supported choice of values.

Every rendered manifest is validated with kubernetes-validate (strict: unknown fields fail)
for the oldest and newest Kubernetes versions each option supports. Kinds it has no schema
for (cert-manager, Prometheus Operator, kopf peering) get structural checks here.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from chart import chartkit
from chart.chartkit import find, kinds, render, render_error, run_helm

NEWEST: str = kubernetes_validate.latest_version()  # the newest schema it ships

# (values, kube versions to validate against). The default needs 1.29 (native sidecars).
OPTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ("1.29.0", NEWEST)),
    "existing-secret": (("ca.mode=existingSecret", "ca.existingSecret=corp-ca"), ("1.29.0",)),
    "cert-manager": (
        ("ca.mode=certManager", "ca.certManager.issuerRef.name=corp-pki"),
        ("1.29.0",),
    ),
    "object-selector-fail": (
        ("webhook.objectSelector=true", "webhook.failurePolicy=Fail"),
        ("1.29.0",),
    ),
    "monitoring": (
        (
            "metrics.prometheusRule.enabled=true",
            "metrics.serviceMonitor.enabled=true",
            "metrics.podMonitor.enabled=true",
        ),
        ("1.29.0",),
    ),
    "network-policy": (
        ("networkPolicy.enabled=true", "networkPolicy.namespaces={ehr,billing}"),
        ("1.29.0", NEWEST),
    ),
    "legacy-sidecar": (("sidecar.native=false",), ("1.25.0", "1.28.0", NEWEST)),
    "one-replica": (("replicaCount=1", "peering.enabled=false"), ("1.29.0",)),
    "no-serviceaccount": (
        ("serviceAccount.create=false", "serviceAccount.name=platform-sa"),
        ("1.29.0",),
    ),
    "everything": (
        (
            "ca.mode=certManager",
            "ca.certManager.issuerRef.name=corp-pki",
            "ca.certManager.issuerRef.kind=Issuer",
            "webhook.objectSelector=true",
            "webhook.failurePolicy=Fail",
            "webhook.excludeNamespaces={monitoring}",
            "metrics.prometheusRule.enabled=true",
            "metrics.serviceMonitor.enabled=true",
            "metrics.podMonitor.enabled=true",
            "metrics.prometheusRule.alertLabels.team=platform",
            "networkPolicy.enabled=true",
            "networkPolicy.namespaces={ehr}",
            "networkPolicy.adminFrom[0].namespaceSelector.matchLabels.name=monitoring",
            "replicaCount=3",
            "priorityClassName=system-cluster-critical",
            "image.digest=sha256:" + "a" * 64,
            "dnsAllowList={*.partner-a.example.org}",
            "servingExtraSANs={10.0.0.7,kubemtls.example.org}",
        ),
        ("1.29.0", NEWEST),
    ),
}
NO_SCHEMA = {
    "Certificate", "ServiceMonitor", "PodMonitor", "PrometheusRule", "ClusterKopfPeering",
}  # fmt: skip


def test_helm_lint_strict() -> None:
    proc = run_helm("lint", "--strict", str(chartkit.CHART))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_helm(
        "lint", "--strict", str(chartkit.CHART), "--set", "ca.mode=existingSecret",
        "--set", "ca.existingSecret=corp-ca",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("option", OPTIONS)
def test_rendered_manifests_are_valid_kubernetes(option: str) -> None:
    sets, versions = OPTIONS[option]
    for version in versions:
        manifests = render(*sets, kube_version=version)
        for m in manifests:
            if m["kind"] in NO_SCHEMA:
                continue
            try:
                kubernetes_validate.validate(m, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = "/".join(str(p) for p in e.path)
                pytest.fail(f"{option} @ {version}: {m['kind']} {where}: {e.message}")


def test_default_renders_the_expected_objects() -> None:
    assert kinds(render()) == sorted(
        [
            "ClusterKopfPeering",
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",  # mtlscerts
            "CustomResourceDefinition",  # clusterkopfpeerings
            "CustomResourceDefinition",  # kopfpeerings
            "Deployment",
            "MutatingWebhookConfiguration",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
        ]
    )


def test_one_replica_has_no_pdb_and_no_peering() -> None:
    manifests = render("replicaCount=1", "peering.enabled=false")
    assert "PodDisruptionBudget" not in kinds(manifests)
    assert "ClusterKopfPeering" not in kinds(manifests)
    env = _env(find(manifests, "Deployment"))
    assert env["KUBEMTLS_OPERATOR_PEERING"] == ""


def test_deployment_is_hardened() -> None:
    dep = find(render(), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] != 0
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    # The operator's serving key lives in /tmp: in memory, never on the node's disk.
    assert {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}} in pod["volumes"]
    assert c["resources"]["requests"]
    assert c["resources"]["limits"]["memory"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert (
        anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"]
        == (dep["spec"]["selector"]["matchLabels"])
    )
    assert c["image"] == "ghcr.io/kubemtls/kubemtls-operator:0.1.0"


def test_peering_is_set_with_two_replicas() -> None:
    manifests = render()
    peering = find(manifests, "ClusterKopfPeering")
    assert peering["apiVersion"] == "kopf.dev/v1"
    assert (
        _env(find(manifests, "Deployment"))["KUBEMTLS_OPERATOR_PEERING"]
        == (peering["metadata"]["name"])
    )
    crds = {m["metadata"]["name"] for m in manifests if m["kind"] == "CustomResourceDefinition"}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crds


def test_settings_follow_the_values() -> None:
    manifests = render(
        "ca.mode=existingSecret",
        "ca.existingSecret=corp-ca",
        "sidecar.native=false",
        "sidecar.image.tag=9.9.9",
        "trustDomain=health.example.org",
        "dnsAllowList={*.partner-a.example.org,fhir.partner-b.example.org}",
        "certificates.renewFraction=0.5",
        kube_version="1.28.0",
    )
    env = _env(find(manifests, "Deployment"))
    assert env["KUBEMTLS_OPERATOR_CA_SECRET"] == "corp-ca"
    assert env["KUBEMTLS_OPERATOR_CA_BOOTSTRAP"] == "false"
    assert env["KUBEMTLS_OPERATOR_NATIVE_SIDECAR"] == "false"
    assert env["KUBEMTLS_OPERATOR_SIDECAR_IMAGE"] == "ghcr.io/kubemtls/kubemtls:9.9.9"
    assert env["KUBEMTLS_OPERATOR_TRUST_DOMAIN"] == "health.example.org"
    assert env["KUBEMTLS_OPERATOR_DNS_ALLOW_LIST"] == (
        "*.partner-a.example.org,fhir.partner-b.example.org"
    )
    assert env["KUBEMTLS_OPERATOR_RENEW_FRACTION"] == "0.5"
    assert json.loads(env["KUBEMTLS_OPERATOR_SIDECAR_RESOURCES"] or "") == {
        "requests": {"cpu": "20m", "memory": "32Mi"},
        "limits": {"memory": "128Mi"},
    }
    assert "Certificate" not in kinds(manifests)


def test_bootstrap_mode_is_the_default() -> None:
    env = _env(find(render(), "Deployment"))
    assert env["KUBEMTLS_OPERATOR_CA_BOOTSTRAP"] == "true"
    assert env["KUBEMTLS_OPERATOR_CA_SECRET"] == "kubemtls-ca"
    assert env["KUBEMTLS_OPERATOR_WEBHOOK_MANAGED"] == "false"
    assert env["KUBEMTLS_OPERATOR_SIGNER_URL"] == "https://kubemtls.kubemtls.svc:9444"
    assert env["KUBEMTLS_OPERATOR_SIDECAR_IMAGE"] == "ghcr.io/kubemtls/kubemtls:0.1.0"
    assert env["KUBEMTLS_OPERATOR_NAMESPACE"] is None  # from the downward API
    dep = find(render(), "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    ns = next(e for e in c["env"] if e["name"] == "KUBEMTLS_OPERATOR_NAMESPACE")
    assert ns["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_cert_manager_mode_renders_a_ca_certificate() -> None:
    manifests = render(
        "ca.mode=certManager",
        "ca.certManager.issuerRef.name=corp-pki",
        "ca.certManager.issuerRef.kind=Issuer",
    )
    cert = find(manifests, "Certificate")
    assert cert["apiVersion"] == "cert-manager.io/v1"
    spec = cert["spec"]
    assert spec["isCA"] is True
    assert spec["issuerRef"] == {"name": "corp-pki", "kind": "Issuer", "group": "cert-manager.io"}
    assert "cert sign" in spec["usages"]
    assert "crl sign" in spec["usages"]
    env = _env(find(manifests, "Deployment"))
    assert env["KUBEMTLS_OPERATOR_CA_SECRET"] == spec["secretName"]
    assert env["KUBEMTLS_OPERATOR_CA_BOOTSTRAP"] == "false"
    assert cert["metadata"]["namespace"] == chartkit.NAMESPACE


def test_service_monitor_scrapes_the_metrics_port() -> None:
    manifests = render("metrics.serviceMonitor.enabled=true")
    sm = find(manifests, "ServiceMonitor")
    svc = find(manifests, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["port"] == "metrics"


def test_network_policy_admits_only_tls_and_admin_ports() -> None:
    manifests = render(
        "networkPolicy.enabled=true", "networkPolicy.namespaces={ehr,billing}",
        "networkPolicy.tlsPorts={8443,9443}",
    )  # fmt: skip
    policies = [m for m in manifests if m["kind"] == "NetworkPolicy"]
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["billing", "ehr"]
    for p in policies:
        assert p["spec"]["policyTypes"] == ["Ingress"]
        assert p["spec"]["podSelector"] == {"matchLabels": {"kubemtls.io/inject": "true"}}
        ports = sorted(port["port"] for rule in p["spec"]["ingress"] for port in rule["ports"])
        assert ports == [8443, 9443, 15020]


def test_values_schema_rejects_a_typo() -> None:
    err = render_error("replicaCont=3")
    assert "replicaCont" in err
    assert "additional properties" in err
    assert "nestedTypo" in render_error("webhook.nestedTypo=true")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("webhook.failurePolicy=Sometimes",), "failurePolicy"),
        (("ca.mode=selfsigned",), "mode"),
        (("sidecar.tokenExpirationSeconds=300",), "tokenExpirationSeconds"),
        (("certificates.duration=one day",), "duration"),
        (("replicaCount=0",), "replicaCount"),
    ],
)
def test_values_schema_rejects_bad_values(sets: tuple[str, ...], message: str) -> None:
    assert message in render_error(*sets)


@pytest.mark.parametrize(
    ("sets", "kube_version", "message"),
    [
        (("replicaCount=3", "peering.enabled=false"), "1.29.0", "peering.enabled=true"),
        (("webhook.failurePolicy=Fail",), "1.29.0", "webhook.objectSelector=true"),
        (("ca.mode=existingSecret",), "1.29.0", "needs ca.existingSecret"),
        (("ca.existingSecret=corp-ca",), "1.29.0", "set ca.mode=existingSecret"),
        (("ca.mode=certManager",), "1.29.0", "issuerRef.name"),
        ((), "1.28.0", "sidecar.native=false"),
        (("networkPolicy.enabled=true",), "1.29.0", "networkPolicy.namespaces"),
        (("serviceAccount.create=false",), "1.29.0", "serviceAccount.name"),
    ],
)
def test_contradictory_values_fail_with_advice(
    sets: tuple[str, ...], kube_version: str, message: str
) -> None:
    assert message in render_error(*sets, kube_version=kube_version)


def test_kube_version_floor_is_enforced() -> None:
    err = render_error("sidecar.native=false", kube_version="1.24.0")
    assert "kubeVersion" in err or "incompatible" in err


def test_notes_warn_first_then_say_how_to_opt_in() -> None:
    # helm's own default Kubernetes version (1.35 for helm 4.1) satisfies sidecar.native.
    proc = run_helm(
        "install", "kubemtls", str(chartkit.CHART), "-n", "kubemtls", "--dry-run=client"
    )
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    lines = [line for line in notes.splitlines() if line.strip()]
    assert lines[0].startswith("WARNING: ca.mode=bootstrap")
    success = next(i for i, line in enumerate(lines) if "is installed in namespace" in line)
    assert all(not line.startswith("WARNING") for line in lines[success:])
    assert 'kubemtls.io/inject: "true"' in notes
    assert "kubectl get mtlscerts" in notes


def test_values_file_documents_every_key() -> None:
    """Every key in values.yaml has a `# --` comment, and values.schema.json covers it."""
    import yaml

    text = (chartkit.CHART / "values.yaml").read_text()
    assert not _undocumented_keys(text.splitlines())
    schema = json.loads((chartkit.CHART / "values.schema.json").read_text())
    _assert_schema_covers(yaml.safe_load(text), schema, "")


# Blocks whose content is a Kubernetes object given as an example, documented as a whole.
FREE_FORM = {"resources", "podSelector"}


def _undocumented_keys(lines: list[str]) -> list[str]:
    """Keys with no comment block starting `# --` right above them.

    A block opener (`image:`) needs none when its children are documented; keys inside a
    free-form example (`resources:`) need none.
    """
    missing: list[str] = []
    ancestors: list[tuple[int, str]] = []  # (indent, key)
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "- ")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        key, _, rest = stripped.partition(":")
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        inside_example = any(k in FREE_FORM for _, k in ancestors)
        ancestors.append((indent, key))
        if inside_example or (not rest.strip() and key not in FREE_FORM):
            continue
        j = i - 1
        while (
            j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --")
        ):
            j -= 1
        if j < 0 or not lines[j].strip().startswith("# --"):
            missing.append(key)
    return missing


def _assert_schema_covers(values: Any, schema: dict[str, Any], path: str) -> None:
    if isinstance(values, dict) and "properties" in schema:
        assert schema.get("additionalProperties") is False, f"{path or '/'} allows unknown keys"
        for key, value in values.items():
            assert key in schema["properties"], f"{path}.{key} is not in values.schema.json"
            _assert_schema_covers(value, schema["properties"][key], f"{path}.{key}")


def _env(deployment: dict[str, Any]) -> dict[str, str | None]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in c["env"]}


@pytest.mark.parametrize("option", ["default", "everything"])
def test_every_object_is_labelled_and_placed(option: str) -> None:
    sets, versions = OPTIONS[option]
    for m in render(*sets, kube_version=versions[0]):
        labels = m["metadata"].get("labels", {})
        if m["kind"] == "CustomResourceDefinition":
            continue  # crds/ is not templated (Helm installs it as is)
        assert labels["app.kubernetes.io/part-of"] == "kubemtls", m["kind"]
        assert labels["app.kubernetes.io/instance"] == chartkit.RELEASE, m["kind"]
        cluster_scoped = {
            "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration",
            "ClusterKopfPeering",
        }  # fmt: skip
        if m["kind"] in cluster_scoped:
            assert "namespace" not in m["metadata"], m["kind"]
        elif m["kind"] != "NetworkPolicy":  # those go to the protected namespaces
            assert m["metadata"]["namespace"] == chartkit.NAMESPACE, m["kind"]
