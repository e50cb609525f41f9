"""The demo's scenes, each an observation with a verdict: nothing passes that was not seen.

Every scene reads its evidence from the outside, as a person would: the app's own output
(one JSON line per request), the EHR's record of each handshake (the identity it verified,
or the TLS alert it sent), the MTLSCert objects and the CRL the operator published.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509
from kubemtls_sidecar import certs, contract

from kubemtls_operator.demo import fileid, kubeapi, report, stage, table

__all__ = ["NAMES", "AppLog", "crl_lists", "play"]

JSON = dict[str, Any]
NAMES = (
    "mtlscerts", "request", "no-sidecar", "peer-api", "file-identity", "renewal", "revocation",
)  # fmt: skip
REVOKE_REASON = "keyCompromise"


def spiffe(sa: str) -> str:
    return certs.spiffe_id("cluster.local", stage.NAMESPACE, sa)


class AppLog:
    """The ehr-client app's JSON lines (one per request), read incrementally."""

    def __init__(self, path: Any) -> None:
        self.path, self.offset = path, 0
        self.lines: list[JSON] = []
        self._partial = ""

    def poll(self) -> list[JSON]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                f.seek(self.offset)
                text = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return self.lines
        text, self._partial = self._partial + text, ""
        parts = text.split("\n")
        self._partial = parts.pop()
        for line in parts:
            if line.startswith("{"):
                self.lines.append(json.loads(line))
        return self.lines

    def wait(self, pred: Callable[[JSON], bool], timeout: float, start: int = 0) -> JSON | None:
        """The first line from index ``start`` on that matches, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.poll()[start:]:
                if pred(line):
                    return line
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def last_ok(self) -> JSON | None:
        return next((x for x in reversed(self.poll()) if x.get("ok")), None)


def crl_lists(crl_pem: bytes, serial_hex: str) -> bool:
    """Whether any CRL in ``crl_pem`` lists this serial."""
    blocks = crl_pem.split(b"-----END X509 CRL-----")
    for block in blocks:
        if b"-----BEGIN X509 CRL-----" not in block:
            continue
        crl = x509.load_pem_x509_crl(block + b"-----END X509 CRL-----\n")
        if crl.get_revoked_certificate_by_serial_number(int(serial_hex, 16)) is not None:
            return True
    return False


def _mtlscert(st: stage.Stage, name: str) -> JSON | None:
    return st.api.get_or_none(kubeapi.mtlscert_path(stage.NAMESPACE, name))


def _revoke(st: stage.Stage, name: str) -> None:
    """``kubectl annotate mtlscert NAME kubemtls.io/revoke=keyCompromise``."""
    patch = {"metadata": {"annotations": {contract.ANN_REVOKE: REVOKE_REASON}}}
    st.api.merge_patch(kubeapi.mtlscert_path(stage.NAMESPACE, name), patch)


def _until(pred: Callable[[], Any], timeout: float, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def _sidecar_said(st: stage.Stage, pod: str, since: float) -> list[str]:
    """Why the pod's sidecar closed app connections since ``since`` (wall clock), counted.

    A request that failed says only "connection closed"; its sidecar's log says why (the
    upstream refused us, was unreachable, or the handshake timed out).
    """
    counts: dict[str, int] = {}
    try:
        text = st.pods[pod].log_of(contract.SIDECAR_CONTAINER_NAME).read_text(errors="replace")
    except (KeyError, OSError):
        return []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
            at = datetime.datetime.fromisoformat(str(doc["time"])).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        if at >= since and doc.get("level") in ("warning", "error"):
            what = f"{doc.get('msg')} ({doc.get('alert') or doc.get('reason') or '?'})"
            counts[what] = counts.get(what, 0) + 1
    return [f"{n}x {what}" for what, n in counts.items()]


def _failures(st: stage.Stage, failed: list[JSON], since: float) -> str:
    if not failed:
        return ""
    said = _sidecar_said(st, "ehr-client", since)
    return f"; the sidecar logged: {'; '.join(said)}" if said else ""


def _short(serial: str) -> str:
    return serial[:10] + "…" if len(serial) > 12 else serial


# --- the scenes --------------------------------------------------------------------------


def scene_mtlscerts(n: report.Narrator, st: stage.Stage, app: AppLog) -> report.Scene:
    def ready() -> bool:
        objs = [_mtlscert(st, p) for p in ("ehr-client", "peer-api")]
        return all(o and (o.get("status") or {}).get("serial") for o in objs)

    ok = _until(ready, 20)
    n.say("kubectl", f"$ kubectl get mtlscerts -n {stage.NAMESPACE}")
    n.block(table.get_mtlscerts(st.api, st.cluster.kubeconfig, stage.NAMESPACE))
    if not ok:
        return report.Scene("mtlscerts", "fail", "ehr-client / peer-api have no issued serial")
    return report.Scene("mtlscerts", "pass", "one MTLSCert per pod, issued by the operator")


def scene_request(n: report.Narrator, st: stage.Stage, app: AppLog) -> report.Scene:
    line = app.wait(lambda x: bool(x.get("ok")), 20)
    if line is None:
        err = next((x.get("error") for x in reversed(app.poll())), "no output")
        refused = [e for e in st.ehr.events if not e.ok][-1:] if st.ehr else []
        seen = (
            f"; the EHR's last refusal: {refused[0].alert or refused[0].detail}" if refused else ""
        )
        return report.Scene("request", "fail", f"the app got no answer from the EHR: {err}{seen}")
    want = spiffe("ehr-client")
    runner = st.pods["ehr-client"]
    port = runner.remap.ports.get(contract.OUTBOUND_CAPTURE_PORT)
    remapped = f" (remapped to :{port})" if port else ""
    status = "pass" if line.get("identity") == want else "fail"
    return report.Scene(
        "request", status,
        f"fhirclient read Patient/123 from http://127.0.0.1:15001/fhir{remapped} → "
        f"\"{line['patient']}\";"
        f" the EHR saw {line.get('identity')} (serial {_short(str(line.get('serial')))})",
        {"identity": line.get("identity"), "serial": line.get("serial")},
    )  # fmt: skip


def scene_no_sidecar(n: report.Narrator, st: stage.Stage, app: AppLog) -> report.Scene:
    assert st.ehr is not None
    host = stage.EHR_HOST if st.net else f"127.0.0.1:{st.ehr.port}"
    url = f"https://{host}/fhir/Patient/123"
    mark = time.monotonic()
    answer = st.in_pod("ehr-client", [
        sys.executable, "-m", "kubemtls_operator.demo.apps", "get", url,
        "--ca-file", str(st.workdir / "ehr" / "partner-ca.crt"),
    ])  # fmt: skip
    refusals = [e for e in st.ehr.events if e.at >= mark and not e.ok]
    alert = refusals[0].alert if refusals else ""
    ok = not answer.get("ok") and alert == "certificate_required"
    seen = str(answer.get("error", ""))
    match = re.search(r"\] (.*?) \(_ssl", seen)  # "[SSL: X] tlsv13 alert ... (_ssl.c:N)"
    seen = match.group(1) if match else seen
    return report.Scene(
        "no-sidecar", "pass" if ok else "fail",
        f"the same pod calling {url} directly (no sidecar, no client cert) → refused: "
        f"the EHR sent TLS alert {alert or '(none)'} (client saw {seen})",
        {"alert": alert, "client": seen},
    )  # fmt: skip


def _xfcc_uri(xfcc: str) -> str:
    match = re.search(r"URI=[^;,]+", xfcc)
    return match.group(0) if match else "(none)"


def scene_peer_api(n: report.Narrator, st: stage.Stage, app: AppLog) -> report.Scene:
    runner = st.pods["peer-api"]
    url = f"https://{runner.ip}:{runner.remap.ports.get(8443, 8443)}/"
    ident = fileid.issue(st)
    answer = fileid.mesh_get(st, ident, url)
    refused = fileid.mesh_get(st, None, url)
    client = str((answer.get("body") or {}).get("client", ""))
    ok = (
        answer.get("status") == 200
        and answer.get("server") == spiffe("peer-api")
        and f"URI={ident.spiffe_id}" in client
        and not refused.get("ok")
        and refused.get("alert") == "certificate_required"
    )
    return report.Scene(
        "peer-api", "pass" if ok else "fail",
        f"a mesh client ({ident.spiffe_id}) → {url} (server {answer.get('server') or '?'}) → "
        f"its app on 127.0.0.1:8080 got X-Forwarded-Client-Cert: …{_xfcc_uri(client)}; "
        f"without a client certificate → alert {refused.get('alert') or refused.get('error')}",
        {"server": answer.get("server"), "xfcc": client, "alert": refused.get("alert"),
         "answer": answer, "refused": refused},
    )  # fmt: skip


def scene_renewal(n: report.Narrator, st: stage.Stage, app: AppLog) -> report.Scene:
    start = len(app.poll())
    first = app.last_ok()
    if first is None:
        return report.Scene("renewal", "skip", "the app has no successful request to start from")
    before = str(first["serial"])
    obj = _mtlscert(st, "ehr-client") or {}
    renews = (obj.get("status") or {}).get("renewalTime", "?")
    n.say("renewal", f"ehr-client's 2m certificate {_short(before)} renews at {renews}; "
          "the app keeps calling the EHR meanwhile")  # fmt: skip
    changed = app.wait(lambda x: bool(x.get("ok")) and x.get("serial") != before, 90, start)
    if changed is None:
        return report.Scene("renewal", "fail", f"serial {_short(before)} was not renewed in 90s")
    time.sleep(1.0)
    window = app.poll()[start:]
    failed = [x for x in window if not x.get("ok")]
    after = str(changed["serial"])
    said = _failures(st, failed, float(first["t"]))
    return report.Scene(
        "renewal", "pass" if not failed else "fail",
        f"serial {_short(before)} → {_short(after)} under traffic: "
        f"{len(window)} requests, {len(failed)} failed{said}",
        {"before": before, "after": after, "requests": len(window), "failed": len(failed),
         "errors": [x.get("error") for x in failed[:3]], "sidecar": said},
    )  # fmt: skip


def scene_revocation(n: report.Narrator, st: stage.Stage, app: AppLog) -> report.Scene:
    assert st.ehr is not None
    start = len(app.poll())
    first = app.last_ok()
    if first is None:
        return report.Scene("revocation", "skip", "the app has no successful request")
    revoked = str(first["serial"])
    st.ehr.refresh_crl()  # the EHR's own schedule starts now: next fetch in EHR_CRL_REFRESH
    n.say(
        "revoke",
        f"$ kubectl annotate mtlscert ehr-client {contract.ANN_REVOKE}="
        f"{REVOKE_REASON}   (serial {_short(revoked)}; the sidecar hears of it from the "
        f"operator within 30s, the EHR fetches its CRL every {stage.EHR_CRL_REFRESH:.0f}s)",
    )
    mark_wall = time.time()
    _revoke(st, "ehr-client")
    changed = app.wait(lambda x: bool(x.get("ok")) and x.get("serial") != revoked, 60, start)
    recorded = _until(lambda: revoked in _revoked_serials(st, "ehr-client"), 10)
    published = _until(lambda: _published(st, revoked), 10)
    if changed is None:
        return report.Scene(
            "revocation",
            "fail",
            f"ehr-client did not re-key within 60s "
            f"(recorded in status: {bool(recorded)}, in the CRL: {published})",
        )
    rekeyed = float(changed["t"]) - mark_wall
    before_ehr = st.ehr.next_crl_fetch() > 0
    st.ehr.refresh_crl()  # now the EHR refuses the revoked serial too
    enforced = crl_lists(st.ehr.crl_pem, revoked)
    time.sleep(1.0)  # and the app goes on with its new certificate
    window = app.poll()[start:]
    failed = [x for x in window if not x.get("ok")]
    said = _failures(st, failed, float(first["t"]))
    ok = not failed and bool(recorded) and enforced and before_ehr
    return report.Scene(
        "revocation", "pass" if ok else "fail",
        f"{_short(revoked)} revoked → the sidecar re-keyed to "
        f"{_short(str(changed['serial']))} after {rekeyed:.1f}s"
        f"{'' if before_ehr else ' (AFTER the EHR fetched the CRL)'}; the EHR's CRL now "
        f"{'lists' if enforced else 'does NOT list'} {_short(revoked)}: "
        f"{len(window)} requests, {len(failed)} failed{said}",
        {"revoked": revoked, "after": changed["serial"], "in_crl": enforced,
         "recorded": bool(recorded), "requests": len(window), "failed": len(failed),
         "rekey_seconds": round(rekeyed, 2), "before_ehr_crl_fetch": before_ehr,
         "errors": [x.get("error") for x in failed[:3]], "sidecar": said},
    )  # fmt: skip


def _published(st: stage.Stage, serial: str) -> bool:
    """Whether the trust ConfigMap's CRL lists this serial yet."""
    trust = st.trust_pem()
    return trust is not None and crl_lists(trust[1], serial)


def _revoked_serials(st: stage.Stage, name: str) -> list[str]:
    obj = _mtlscert(st, name) or {}
    return [str(r.get("serial", "")) for r in (obj.get("status") or {}).get("revocations", [])]


def scene_file_identity(n: report.Narrator, st: stage.Stage, app: AppLog) -> report.Scene:
    assert st.ehr is not None
    serial, get = fileid.start_sidecar(st, fileid.issue(st))
    before = get()
    if not before.get("ok"):
        return report.Scene(
            "file-identity", "fail", f"the file-based identity could not reach the EHR: {before}"
        )
    n.say("revoke", f"batch-export's file-based certificate {_short(serial)} reached the EHR as "
          f"{before.get('identity')}; $ kubectl annotate mtlscert batch-export "
          f"{contract.ANN_REVOKE}={REVOKE_REASON}")  # fmt: skip
    mark = time.monotonic()
    _revoke(st, "batch-export")
    published = _until(lambda: _published(st, serial), 15)
    st.ehr.refresh_crl()
    n.say("crl", f"the operator published the new CRL in {contract.TRUST_CONFIGMAP} "
          f"({'listing' if published else 'NOT listing'} {_short(serial)}); the EHR pulls it "
          f"now (it fetches its CRL every {stage.EHR_CRL_REFRESH:.0f}s, or when told)")  # fmt: skip

    def refused() -> str:
        if get().get("ok"):
            return ""
        alerts = [e.alert for e in st.ehr.events if e.at >= mark and not e.ok] if st.ehr else []
        return alerts[-1] if alerts else ""

    alert = _until(refused, 30, step=0.5) or ""
    ok = alert == "certificate_revoked"
    return report.Scene(
        "file-identity", "pass" if ok else "fail",
        f"the same certificate after revocation → refused: the EHR sent TLS alert "
        f"{alert or '(none within 30s)'} (a file cannot re-key)",
        {"serial": serial, "identity": before.get("identity"), "alert": alert},
    )  # fmt: skip


SCENES = (scene_mtlscerts, scene_request, scene_no_sidecar, scene_peer_api,
          scene_file_identity, scene_renewal, scene_revocation)  # fmt: skip


def play(n: report.Narrator, st: stage.Stage) -> None:
    """Play every scene in order; a scene that raises is a failure, the rest still run."""
    app = AppLog(st.pods["ehr-client"].log_of("app"))
    for fn, name in zip(SCENES, NAMES, strict=True):
        try:
            scene = fn(n, st, app)
        except Exception as e:
            scene = report.Scene(name, "fail", f"{type(e).__name__}: {e}")
        n.scene(scene)


def skip_all(n: report.Narrator, reason: str) -> None:
    for name in NAMES:
        n.scene(report.Scene(name, "skip", reason))
