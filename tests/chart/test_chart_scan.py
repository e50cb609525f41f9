"""Static security scan of the rendered chart and the Dockerfile with checkov.

checkov (PyPI) pulls in about 290 MB of dependencies and pins some of ours, so it is not
in the dev extra: ``scripts/bootstrap.sh dev`` (so the test command, and CI) installs a
pinned checkov into its own venv, ``.tools/checkov``. Without it this test skips; the
hardening it covers is also asserted directly by test_chart_render.py and
test_chart_rbac.py. Every finding it may report must be
explained in docs/security.md; anything else fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from chart.chartkit import render
from testkit import REPO

# Accepted findings, each explained under "Scan findings" in docs/security.md.
EXPLAINED = {
    "CKV_K8S_11",  # no CPU limit on the operator (throttling delays admission)
    "CKV_K8S_15",  # pullPolicy IfNotPresent (immutable tags; image.digest to pin)
    "CKV_K8S_38",  # the operator mounts its token: it talks to the API server
    "CKV_K8S_43",  # image by tag unless image.digest is set
    "CKV_K8S_155",  # the ClusterRole may patch one webhook configuration (its caBundle)
    "CKV2_K8S_6",  # no NetworkPolicy on the operator pods themselves
}


def _checkov() -> str:
    local = REPO / ".tools" / "checkov" / "bin" / "checkov"
    found = str(local) if local.exists() else shutil.which("checkov")
    if found is None:
        # Only where scripts/bootstrap.sh has not run; the test command runs it first,
        # so in CI checkov is always there and this test always runs.
        pytest.skip("checkov not installed (see this module's docstring)")
    return found


@pytest.fixture(scope="module")
def findings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Failed check ids by checkov framework, for the rendered chart and the Dockerfile.

    One checkov run for both (it takes about 10 s to start).
    """
    checkov = _checkov()
    manifests = render(
        "metrics.prometheusRule.enabled=true",
        "metrics.serviceMonitor.enabled=true",
        "metrics.podMonitor.enabled=true",
        "networkPolicy.enabled=true",
        "networkPolicy.namespaces={ehr}",
    )
    chart = tmp_path_factory.mktemp("scan") / "chart.yaml"
    chart.write_text(yaml.safe_dump_all(manifests))
    targets = ["-f", str(chart), "-f", str(REPO / "Dockerfile")]
    options = ["--framework", "kubernetes", "dockerfile", "--quiet", "--compact"]
    proc = subprocess.run(
        [checkov, *targets, *options, "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.stdout.strip(), proc.stderr
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    found = {
        r["check_type"]: {c["check_id"] for c in r["results"]["failed_checks"]} for r in reports
    }
    scanned = {r["check_type"] for r in reports if r["summary"]["passed"]}
    assert scanned == {"kubernetes", "dockerfile"}, f"checkov scanned only {scanned}"
    return found


def test_explained_findings_are_documented() -> None:
    security = (REPO / "docs" / "security.md").read_text()
    missing = [check for check in EXPLAINED if check not in security]
    assert not missing, f"docs/security.md does not explain {missing}"


@pytest.mark.slow
def test_rendered_chart_has_only_explained_findings(findings: dict[str, set[str]]) -> None:
    unexplained = findings["kubernetes"] - EXPLAINED
    assert not unexplained, f"new checkov findings: {sorted(unexplained)}"


@pytest.mark.slow
def test_dockerfile_has_no_findings(findings: dict[str, set[str]]) -> None:
    assert findings["dockerfile"] == set()
