"""The chart speaks the same contract as the code: one source of truth for each name.

Ports and the webhook path come from ``kubemtls_sidecar.contract``; every environment
variable the Deployment sets is a setting of ``kubemtls_operator.config``, and the
operator's own loader accepts the rendered values for every supported choice.
"""

from __future__ import annotations

from typing import Any

import pytest
from chart.chartkit import NAMESPACE, find, render
from kubemtls_operator import config
from kubemtls_sidecar import contract

CHOICES = {
    "default": (),
    "existing-secret": ("ca.mode=existingSecret", "ca.existingSecret=corp-ca"),
    "cert-manager": ("ca.mode=certManager", "ca.certManager.issuerRef.name=corp-pki"),
    "tuned": (
        "sidecar.native=false",
        "certificates.duration=12h",
        "certificates.renewFraction=0.5",
        "servingExtraSANs={10.0.0.7,kubemtls.example.org}",
        "dnsAllowList={*.partner-a.example.org}",
        "logFormat=text",
        "replicaCount=1",
        "peering.enabled=false",
        "signerURL=https://signer.example.org:9444",
    ),
}


def _container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    container: dict[str, Any] = c
    return container


def _literal_env(manifests: list[dict[str, Any]]) -> dict[str, str]:
    env = {e["name"]: e.get("value") for e in _container(manifests)["env"]}
    env["KUBEMTLS_OPERATOR_NAMESPACE"] = NAMESPACE  # the downward API, in a cluster
    return {k: v for k, v in env.items() if v is not None}


def test_env_names_are_operator_settings() -> None:
    names = [e["name"] for e in _container(render())["env"]]
    assert len(names) == len(set(names)), "an env var is set twice"
    known = {contract.OPERATOR_ENV_PREFIX + name for name in config.SETTINGS}
    assert set(names) <= known, f"not operator settings: {sorted(set(names) - known)}"
    # Every setting of COMMON.md's table is set explicitly (only the internal check
    # interval is left to its default).
    assert known - set(names) == {contract.OPERATOR_ENV_PREFIX + "CHECK_INTERVAL"}


@pytest.mark.parametrize("choice", CHOICES)
def test_operator_accepts_the_rendered_settings(choice: str) -> None:
    kube = "1.28.0" if "sidecar.native=false" in CHOICES[choice] else "1.29.0"
    manifests = render(*CHOICES[choice], kube_version=kube)
    cfg = config.load(_literal_env(manifests))
    svc = find(manifests, "Service")
    webhook = find(manifests, "MutatingWebhookConfiguration")
    assert cfg.service == svc["metadata"]["name"]
    assert cfg.webhook_config == webhook["metadata"]["name"]
    assert cfg.webhook_managed is False
    assert cfg.namespace == NAMESPACE
    if "signerURL" not in " ".join(CHOICES[choice]):
        assert cfg.signer_url == f"https://{svc['metadata']['name']}.{NAMESPACE}.svc:9444"
    if choice == "tuned":
        assert cfg.native_sidecar is False
        assert cfg.renew_fraction == 0.5
        assert cfg.serving_ip_addresses == ("10.0.0.7",)
        assert "kubemtls.example.org" in cfg.serving_dns_names
        assert cfg.peering == ""


def test_chart_defaults_equal_operator_defaults() -> None:
    """A setting the chart leaves at its default means the same on both sides."""
    cfg = config.load(_literal_env(render()))
    default = config.Config()
    for attr in (
        "cert_duration", "cert_duration_min", "cert_duration_max", "alert_window",
        "ca_rollover_grace", "trust_domain", "cluster_domain", "token_expiration",
        "sidecar_resources", "native_sidecar", "bind_address", "renew_fraction",
        "sidecar_image", "sidecar_image_pull_policy", "ca_secret", "webhook_config",
    ):  # fmt: skip
        assert getattr(cfg, attr) == getattr(default, attr), attr


def test_ports_and_webhook_path_follow_the_contract() -> None:
    manifests = render()
    cfg = config.load(_literal_env(manifests))
    assert (cfg.webhook_port, cfg.signer_port, cfg.metrics_port, cfg.health_port) == (
        contract.WEBHOOK_PORT,
        contract.SIGNER_PORT,
        contract.OPERATOR_METRICS_PORT,
        contract.OPERATOR_HEALTH_PORT,
    )
    ports = {p["name"]: p["containerPort"] for p in _container(manifests)["ports"]}
    assert ports == {
        "webhook": contract.WEBHOOK_PORT,
        "signer": contract.SIGNER_PORT,
        "metrics": contract.OPERATOR_METRICS_PORT,
        "health": contract.OPERATOR_HEALTH_PORT,
    }
    svc = {p["name"]: p for p in find(manifests, "Service")["spec"]["ports"]}
    assert svc["webhook"]["port"] == 443
    assert svc["webhook"]["targetPort"] == "webhook"
    assert svc["signer"]["port"] == contract.SIGNER_PORT
    (hook,) = find(manifests, "MutatingWebhookConfiguration")["webhooks"]
    service = hook["clientConfig"]["service"]
    assert service["path"] == "/" + contract.WEBHOOK_HANDLER_ID
    assert service["port"] == 443
    assert service["name"] == cfg.service
    assert service["namespace"] == NAMESPACE


def test_webhook_configuration_follows_design() -> None:
    (hook,) = find(render(), "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert "objectSelector" not in hook
    assert hook["sideEffects"] == "None"
    assert hook["matchPolicy"] == "Equivalent"
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert 1 <= hook["timeoutSeconds"] <= 30
    assert "caBundle" not in hook["clientConfig"]  # the operator patches it in at start
    (rule,) = hook["rules"]
    assert rule["resources"] == ["pods"]
    assert rule["operations"] == ["CREATE"]
    (expr,) = hook["namespaceSelector"]["matchExpressions"]
    assert expr["key"] == "kubernetes.io/metadata.name"
    assert expr["operator"] == "NotIn"
    assert set(expr["values"]) == {"kube-system", NAMESPACE}


def test_object_selector_option_uses_the_inject_label() -> None:
    manifests = render(
        "webhook.objectSelector=true", "webhook.failurePolicy=Fail",
        "webhook.excludeNamespaces={monitoring}",
    )  # fmt: skip
    (hook,) = find(manifests, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["objectSelector"] == {"matchLabels": {contract.ANN_INJECT: "true"}}
    assert hook["failurePolicy"] == "Fail"
    values = hook["namespaceSelector"]["matchExpressions"][0]["values"]
    assert set(values) == {"kube-system", NAMESPACE, "monitoring"}


def test_network_policy_admin_port_is_the_sidecar_admin_port() -> None:
    manifests = render("networkPolicy.enabled=true", "networkPolicy.namespaces={ehr}")
    policy = find(manifests, "NetworkPolicy")
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert contract.ADMIN_PORT in ports
    assert policy["spec"]["podSelector"]["matchLabels"] == {contract.ANN_INJECT: "true"}


def test_pod_monitor_scrapes_the_port_the_webhook_names() -> None:
    from kubemtls_operator import annotations, sidecarspec

    spec = annotations.parse(
        {contract.ANN_INJECT: "true", contract.ANN_INBOUND: "8443:8080"},
        namespace="ehr",
        limits=annotations.Limits(),
    )
    sidecar = sidecarspec.sidecar_container(
        spec, [], image="x", pull_policy="IfNotPresent", resources={}, native=True
    )
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    manifests = render("metrics.podMonitor.enabled=true")
    monitor = find(manifests, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert ports[endpoint["port"]] == contract.ADMIN_PORT
    assert endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    # The chart's default NetworkPolicy admits the TLS port that annotation opens.
    policy = find(
        render("networkPolicy.enabled=true", "networkPolicy.namespaces={ehr}"), "NetworkPolicy"
    )
    admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert set(ports.values()) <= admitted
