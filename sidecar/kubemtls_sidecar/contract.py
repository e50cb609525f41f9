"""The names that the webhook, the sidecar, the operator, the chart and the demo share.

DESIGN.md's "Public interface" is the source of these values: users type them. This
module is the only place in the code that spells them; everything else imports it.
It must stay free of I/O and of any import beyond the standard library, because the
sidecar image and the operator both load it.
"""

from __future__ import annotations

__all__ = [
    "ADMIN_PORT",
    "ANNOTATION_PREFIX",
    "ANN_ALLOWED_PEERS",
    "ANN_CERT_DURATION",
    "ANN_DNS_NAMES",
    "ANN_INBOUND",
    "ANN_INJECT",
    "ANN_INJECTED",
    "ANN_KEY_TYPE",
    "ANN_MODE",
    "ANN_OUTBOUND",
    "ANN_PROTOCOL",
    "ANN_REQUIRE_BOUND_TOKEN",
    "ANN_REVOKE",
    "ANN_UPSTREAM_CA",
    "APP_HEALTH_PREFIX",
    "CRD_GROUP",
    "CRD_KIND",
    "CRD_PLURAL",
    "CRD_VERSION",
    "INBOUND_CAPTURE_PORT",
    "INIT_CONTAINER_NAME",
    "KEY_TYPES",
    "OPERATOR_ENV_PREFIX",
    "OPERATOR_HEALTH_PORT",
    "OPERATOR_METRICS_PORT",
    "OUTBOUND_CAPTURE_PORT",
    "SIDECAR_COMMAND",
    "SIDECAR_CONTAINER_NAME",
    "SIDECAR_ENV_PREFIX",
    "SIDECAR_GID",
    "SIDECAR_UID",
    "SIGNER_PORT",
    "STATE_CONFIGMAP",
    "TOKEN_AUDIENCE",
    "TOKEN_DIR",
    "TOKEN_FILE",
    "TRUST_CA_FILE",
    "TRUST_CONFIGMAP",
    "TRUST_CRL_FILE",
    "TRUST_DIR",
    "UPSTREAM_CA_DIR",
    "UPSTREAM_CA_FILE",
    "USER_ANNOTATIONS",
    "VOLUME_TMP",
    "VOLUME_TOKEN",
    "VOLUME_TRUST",
    "VOLUME_UPSTREAM_CA",
    "WEBHOOK_HANDLER_ID",
    "WEBHOOK_PORT",
    "env_name",
]

# --- Pod annotations (what users write) ------------------------------------------------
ANNOTATION_PREFIX = "kubemtls.io/"
ANN_INJECT = "kubemtls.io/inject"
ANN_INBOUND = "kubemtls.io/inbound"
ANN_OUTBOUND = "kubemtls.io/outbound"
ANN_MODE = "kubemtls.io/mode"
ANN_ALLOWED_PEERS = "kubemtls.io/allowed-peers"
ANN_PROTOCOL = "kubemtls.io/protocol"
ANN_CERT_DURATION = "kubemtls.io/cert-duration"
ANN_DNS_NAMES = "kubemtls.io/dns-names"
ANN_KEY_TYPE = "kubemtls.io/key-type"
ANN_UPSTREAM_CA = "kubemtls.io/upstream-ca"
ANN_REQUIRE_BOUND_TOKEN = "kubemtls.io/require-bound-token"
#: Every key a user may write on a pod; any other ``kubemtls.io/`` key is a likely typo.
USER_ANNOTATIONS = frozenset(
    {
        ANN_INJECT,
        ANN_INBOUND,
        ANN_OUTBOUND,
        ANN_MODE,
        ANN_ALLOWED_PEERS,
        ANN_PROTOCOL,
        ANN_CERT_DURATION,
        ANN_DNS_NAMES,
        ANN_KEY_TYPE,
        ANN_UPSTREAM_CA,
        ANN_REQUIRE_BOUND_TOKEN,
    }
)
# Written by the system, not users.
ANN_INJECTED = "kubemtls.io/injected"
# On an MTLSCert: `kubectl annotate mtlscert NAME kubemtls.io/revoke=keyCompromise`.
ANN_REVOKE = "kubemtls.io/revoke"

KEY_TYPES = ("ecdsa-p256", "rsa-2048", "rsa-3072")

# --- The custom resource ----------------------------------------------------------------
CRD_GROUP = "kubemtls.io"
CRD_VERSION = "v1alpha1"
CRD_PLURAL = "mtlscerts"
CRD_KIND = "MTLSCert"

# --- ConfigMaps -------------------------------------------------------------------------
TRUST_CONFIGMAP = "kubemtls-trust"  # per namespace: ca.crt, crl.pem
STATE_CONFIGMAP = "kubemtls-state"  # operator namespace: revocations, CRL numbers, rollover

# --- Ports ------------------------------------------------------------------------------
ADMIN_PORT = 15020  # sidecar /healthz /readyz /metrics, always reserved
OUTBOUND_CAPTURE_PORT = 15001  # transparent mode only
INBOUND_CAPTURE_PORT = 15006  # transparent mode only
WEBHOOK_PORT = 9443  # operator, Service port 443
SIGNER_PORT = 9444  # operator signing API
OPERATOR_METRICS_PORT = 9090
OPERATOR_HEALTH_PORT = 8080
WEBHOOK_HANDLER_ID = "inject"  # kopf serves the handler at /inject

# --- Containers, volumes, files ---------------------------------------------------------
SIDECAR_CONTAINER_NAME = "kubemtls-sidecar"
SIDECAR_COMMAND = ("kubemtls-sidecar",)
INIT_CONTAINER_NAME = "kubemtls-init"
SIDECAR_UID = 1337
SIDECAR_GID = 1337
VOLUME_TOKEN = "kubemtls-token"
VOLUME_TRUST = "kubemtls-trust"
TOKEN_DIR = "/var/run/secrets/kubemtls"
TOKEN_FILE = TOKEN_DIR + "/token"
TRUST_DIR = "/var/run/kubemtls/trust"
TOKEN_AUDIENCE = "kubemtls"
TRUST_CA_FILE = "ca.crt"
TRUST_CRL_FILE = "crl.pem"
# kubemtls.io/upstream-ca: the named ConfigMap (key ca.crt) is mounted here, sidecar only.
VOLUME_UPSTREAM_CA = "kubemtls-upstream-ca"
UPSTREAM_CA_DIR = "/var/run/kubemtls/upstream-ca"
UPSTREAM_CA_FILE = UPSTREAM_CA_DIR + "/ca.crt"
# A small in-memory emptyDir: the sidecar's /tmp (its root filesystem is read-only) and
# kubemtls-init's /run (iptables' xtables.lock).
VOLUME_TMP = "kubemtls-tmp"
# Transparent mode: kubelet's httpGet/tcpSocket probes of intercepted app ports are
# rewritten to GET <ADMIN_PORT><APP_HEALTH_PREFIX><container>/<livez|readyz|startupz>;
# the originals are in the sidecar's --app-probes (KUBEMTLS_APP_PROBES, JSON by path).
APP_HEALTH_PREFIX = "/app-health/"

# --- Settings ---------------------------------------------------------------------------
SIDECAR_ENV_PREFIX = "KUBEMTLS_"
OPERATOR_ENV_PREFIX = "KUBEMTLS_OPERATOR_"


def env_name(flag: str) -> str:
    """A sidecar flag's environment variable (``--allowed-peer`` → ``KUBEMTLS_ALLOWED_PEER``)."""
    return SIDECAR_ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")
