"""The user docs stay true to the code: links resolve, and the reference tables are complete.

metrics.md must list every metric the operator and the sidecar export and every shipped
alert; troubleshooting.md every TLS alert it promises; security.md every resource the
chart's RBAC grants and every accepted scan finding.
"""

from __future__ import annotations

import re
import unicodedata

import pytest
from chart.chartkit import find, render
from kubemtls_operator import metrics as operator_metrics
from kubemtls_sidecar import metrics as sidecar_metrics
from testkit import REPO

DOCS = REPO / "docs"
OURS = ["install.md", "opt-in.md", "ca.md", "revocation.md", "troubleshooting.md",
        "metrics.md", "security.md"]  # fmt: skip
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = unicodedata.normalize("NFKD", heading.strip().lower())
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", OURS)
def test_links_resolve(page: str) -> None:
    text = (DOCS / page).read_text()
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (DOCS / path) if path else DOCS / page
        assert file.exists(), f"{page}: link to missing {target}"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file.read_text()), f"{page}: no heading #{anchor} in {path}"


def test_install_page_has_the_deploy_command() -> None:
    text = (DOCS / "install.md").read_text()
    assert "helm install kubemtls charts/kubemtls -n kubemtls --create-namespace" in text
    for section in ("## Deploy to a cluster", "## Upgrade", "## Uninstall"):
        assert section in text


def test_troubleshooting_maps_every_alert() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z_]+)` \|", text, re.M)}
    assert rows >= {
        "certificate_required", "unknown_ca", "certificate_expired", "bad_certificate",
        "certificate_revoked", "unsupported_certificate", "access_denied",
        "handshake_failure", "protocol_version",
    }  # fmt: skip


def test_metrics_page_lists_every_metric_and_alert() -> None:
    text = (DOCS / "metrics.md").read_text()
    exposition = (
        operator_metrics.render()[0].decode() + sidecar_metrics.Metrics().exposition().decode()
    )
    ours = {
        line.split()[2]
        for line in exposition.splitlines()
        if line.startswith("# TYPE kubemtls_") and not line.split()[2].endswith("_created")
    }
    documented = set(re.findall(r"kubemtls_[a-z_]+", text))
    # "_reload_failures_total" is written as a suffix next to kubemtls_sidecar_reloads_total.
    documented |= {"kubemtls_sidecar" + s for s in re.findall(r"/ `(_[a-z_]+)`", text)}
    assert ours <= documented, f"metrics.md misses {sorted(ours - documented)}"
    rule = find(render("metrics.prometheusRule.enabled=true"), "PrometheusRule")
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            base = re.sub(r"In(30|7|1)d$", "In30d", r["alert"])
            assert base in text or r["alert"] in text, f"metrics.md misses alert {r['alert']}"


def test_security_page_explains_every_rbac_rule() -> None:
    text = (DOCS / "security.md").read_text()
    granted = {
        res
        for m in render()
        if m["kind"] in {"ClusterRole", "Role"}
        for rule in m["rules"]
        for res in rule["resources"]
    }
    for resource in granted:
        assert f"`{resource}`" in text, f"security.md does not explain {resource}"
    for phrase in ("HIPAA", "§164.312(e)(1)", "NET_ADMIN", "restricted", "NetworkPolicy"):
        assert phrase in text
