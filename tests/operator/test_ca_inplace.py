"""A CA replaced in place (cert-manager rewrites tls.crt/tls.key): a rollover, not an outage.

Real kopf against the emulated API: the old CA stays in the Secret's ``ca.crt`` and in
every trust ConfigMap (with its CRL) while a leaf it signed lives, that leaf still passes
``openssl verify`` against the published bundle, new leaves come from the new CA, and the
old CA retires once its leaves are renewed — across a restart, and when no replica held
the old key (in the CA expiry metric as ``previous`` meanwhile). The same key with a new
certificate needs none of it. An expired ``prev.crt`` is pruned from the Secret at once.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from kubemtls_operator import pki, revocation, rollover
from kubemtls_sidecar import certs, contract
from operatorkit import NAMESPACE, Api, OperatorHandle, _until, make_csr, openssl_verify, sign
from operatorkit import trust as trust_api
from testkit import utcnow

SECRET = f"/api/v1/namespaces/{NAMESPACE}/secrets/kubemtls-ca"
STATE = f"/api/v1/namespaces/{NAMESPACE}/configmaps/{contract.STATE_CONFIGMAP}"
EVENTS = f"/api/v1/namespaces/{NAMESPACE}/events"


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _pem(data: dict[str, Any], key: str) -> str:
    import base64

    return base64.b64decode(data[key]).decode()


def _anchors(pem: str) -> set[str]:
    return {certs.fingerprint_sha256(c) for c in x509.load_pem_x509_certificates(pem.encode())}


def _issuer(chain: str) -> x509.Name:
    return x509.load_pem_x509_certificates(chain.encode())[0].issuer


def _roots(label: str) -> tuple[pki.CA, pki.CA, str, str]:
    """Two roots, ``<label> old root`` and ``<label> new root``, and their fingerprints."""
    old = pki.bootstrap_ca(now=utcnow(), common_name=f"{label} old root")
    new = pki.bootstrap_ca(now=utcnow(), common_name=f"{label} new root")
    return old, new, certs.fingerprint_sha256(old.cert), certs.fingerprint_sha256(new.cert)


async def _put_ca(api: Api, ca: pki.CA) -> None:
    data = {"tls.crt": _b64(pki.cert_pem(ca.cert)), "tls.key": _b64(pki.key_pem(ca.key))}
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kubemtls-ca"}, "data": data}
    await api.post(f"/api/v1/namespaces/{NAMESPACE}/secrets", body)


async def _replace_in_place(api: Api, cert: x509.Certificate, key: Any = None) -> None:
    """What cert-manager does on renewal: tls.crt (and tls.key) rewritten, nothing else."""
    data = {"tls.crt": _b64(pki.cert_pem(cert))}
    if key is not None:
        data["tls.key"] = _b64(pki.key_pem(key))
    await api.patch(SECRET, {"data": data})


async def _recorded(api: Api, ca: pki.CA) -> Any:
    cm = await api.get_or_none(STATE)
    if cm is None:
        return None
    ro = json.loads(cm["data"]["state.json"])["rollover"]
    return ro.get("signingFingerprint") == certs.fingerprint_sha256(ca.cert)


async def _issued_leaf(api: Api, handle: Any, pod: str) -> tuple[str, str]:
    """A leaf for ``pod`` (chain PEM) once its MTLSCert records it; and the pod's token."""
    await api.create_pod(pod)
    token = await api.token_for(pod)
    bundle = (await _until(lambda: api.trust()))["data"]["ca.crt"]
    code, body = await sign(handle, bundle, token, {"csr": make_csr()[1]})
    assert code == 200, body
    return body["certificateChain"], token


async def _signing_with(
    api: Api, start_operator: Any, ca: pki.CA, pod: str
) -> tuple[OperatorHandle, str, str]:
    """An operator started on a Secret holding ``ca``, once it has recorded ``ca`` as its
    signer and signed a leaf for ``pod``: the operator, the leaf's chain PEM, the token."""
    await _put_ca(api, ca)
    handle = await start_operator()
    chain, token = await _issued_leaf(api, handle, pod)
    await _until(lambda: _recorded(api, ca))
    return handle, chain, token


async def _published(api: Api) -> tuple[set[str], dict[str, Any], int]:
    """The trust bundle's anchors, the CA Secret's data, and how many CRLs are published."""
    secret, trust = (await api.get(SECRET))["data"], (await api.trust())["data"]
    return _anchors(trust["ca.crt"]), secret, trust["crl.pem"].count("BEGIN X509 CRL")


async def _verified(api: Api, tmp: pathlib.Path, chain: str) -> dict[str, str]:
    """The published trust ConfigMap's data, once ``chain`` passed ``openssl verify``
    against its bundle, CRLs included."""
    trust: dict[str, str] = (await api.trust())["data"]
    done = openssl_verify(tmp, trust["ca.crt"], chain, trust["crl.pem"])
    assert done.returncode == 0, done.stdout + done.stderr
    return trust


async def _reasons(api: Api) -> dict[str, str]:
    return {e["reason"]: e["message"] for e in (await api.get(EVENTS))["items"]}


async def test_a_ca_replaced_in_place_stays_trusted_until_its_leaves_are_renewed(
    api: Api, start_operator: Any, tmp_path: pathlib.Path
) -> None:
    old, new, fp_old, fp_new = _roots("in-place")
    first, chain, token = await _signing_with(api, start_operator, old, "app-0")
    await _until(lambda: _phase(api, "app-0", "Issued"))

    await _replace_in_place(api, new.cert, new.key)

    async def both_trusted() -> bool:
        anchors, secret, crls = await _published(api)
        return (
            anchors == {fp_old, fp_new}
            and _anchors(_pem(secret, "ca.crt")) == {fp_old, fp_new}
            and "prev.key" in secret
            and crls == 2
        )

    await _until(both_trusted)
    # The old CA's leaf still verifies against what peers are given, CRLs included.
    trust_now = await _verified(api, tmp_path, chain)
    message = (await _reasons(api))["CAReplaced"]
    assert "signed before it was published" in message
    assert "30 s" in message
    assert "in-place old root" in message
    # The MTLSCert shows the rollover; the pod is told to renew soon.
    cond = await _until(lambda: _condition(api, "app-0", "Expiring", "CARollover"))
    assert "being retired" in cond["message"]
    code, answer, _ = await trust_api(first, trust_now["ca.crt"], token)
    assert code == 200
    renew_at = revocation.parse_time(answer["renewAt"])
    assert renew_at is not None
    assert renew_at <= utcnow() + datetime.timedelta(minutes=10)

    # A restart in between converges: the old CA is still kept.
    await first.stop()
    second = await start_operator()
    assert _anchors((await api.trust())["data"]["ca.crt"]) == {fp_old, fp_new}
    assert "prev.crt" in (await api.get(SECRET))["data"]
    # New (renewed) leaves come from the new CA and verify against the bundle.
    bundle = (await api.trust())["data"]["ca.crt"]
    code, body = await sign(second, bundle, token, {"csr": make_csr()[1]})
    assert code == 200
    assert _issuer(body["certificateChain"]) == new.cert.subject
    done = openssl_verify(tmp_path, bundle, body["certificateChain"])
    assert done.returncode == 0, done.stdout + done.stderr

    # app-0 was the old CA's only live leaf: once it is renewed, the old CA retires.
    async def retired() -> bool:
        anchors, secret, crls = await _published(api)
        return anchors == {fp_new} and "prev.crt" not in secret and crls == 1

    await _until(retired, timeout=15)
    assert "CARetired" in await _reasons(api)


async def test_a_replacement_while_no_replica_ran_keeps_the_old_ca_without_its_key(
    api: Api, start_operator: Any, tmp_path: pathlib.Path
) -> None:
    _, new, _, fp_new = _roots("keyless")
    # 20 days left: inside the 30-day alert window, so the retiring CA must be warned about.
    old = pki.bootstrap_ca(
        now=utcnow(), common_name="keyless old root", lifetime=datetime.timedelta(days=20)
    )
    fp_old = certs.fingerprint_sha256(old.cert)
    first, chain, _ = await _signing_with(api, start_operator, old, "app-1")
    await first.stop()
    await _replace_in_place(api, new.cert, new.key)  # the old key is gone for good
    await start_operator()

    async def kept() -> bool:
        anchors, secret, _ = await _published(api)
        return anchors == {fp_old, fp_new} and "prev.crt" in secret and "prev.key" not in secret

    await _until(kept)
    # Its last CRL (signed while the key was held) is carried over, so CRL checking holds.
    await _verified(api, tmp_path, chain)
    message = (await _reasons(api))["CAPreviousKeyUnavailable"]
    assert "can no longer be revoked" in message
    assert "goes stale at" in message

    async def retiring_warned() -> Any:
        events = (await api.get(EVENTS))["items"]
        return [
            e["message"]
            for e in events
            if e["reason"] == "CAExpiring" and "retiring CA (prev.crt)" in e["message"]
        ]

    (warning,) = await _until(retiring_warned)
    assert "CN=keyless old root" in warning
    assert "within 30 days" in warning


async def test_the_same_key_with_a_new_certificate_needs_no_rollover(
    api: Api, start_operator: Any, tmp_path: pathlib.Path
) -> None:
    old = pki.bootstrap_ca(now=utcnow(), common_name="same-key root")
    now = utcnow()
    renewed = (  # cert-manager rotationPolicy: Never — same key and subject, new certificate
        x509.CertificateBuilder()
        .subject_name(old.cert.subject)
        .issuer_name(old.cert.subject)
        .public_key(old.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=400))
    )
    for ext in old.cert.extensions:
        renewed = renewed.add_extension(ext.value, ext.critical)
    cert = renewed.sign(old.key, hashes.SHA256())
    _, chain, _ = await _signing_with(api, start_operator, old, "app-2")
    await _replace_in_place(api, cert)

    async def renewed_only() -> Any:
        trust = await api.trust()
        reasons = await _reasons(api)
        return "CARenewed" in reasons and _anchors(trust["data"]["ca.crt"]) == {
            certs.fingerprint_sha256(cert)
        }

    await _until(renewed_only)
    secret = await api.get(SECRET)
    assert "prev.crt" not in secret["data"]
    assert "CAReplaced" not in await _reasons(api)
    await _verified(api, tmp_path, chain)


async def test_the_retiring_ca_without_its_key_is_in_the_expiry_metric_until_it_retires(
    api: Api, start_operator: Any
) -> None:
    old, new, fp_old, fp_new = _roots("metric")
    first, _, token = await _signing_with(api, start_operator, old, "app-3")
    await first.stop()
    await _replace_in_place(api, new.cert, new.key)  # the old key is gone for good
    second = await start_operator()
    old_dn, new_dn = old.cert.subject.rfc4514_string(), new.cert.subject.rfc4514_string()

    async def expiries() -> dict[tuple[str, str], float]:
        return await _ca_expiries(second)

    async def previous_shown() -> Any:
        shown = await expiries()
        anchors, _, _ = await _published(api)
        return ("previous", old_dn) in shown and anchors == {fp_old, fp_new} and shown

    shown = await _until(previous_shown)
    assert "prev.key" not in (await api.get(SECRET))["data"]
    assert shown[("previous", old_dn)] == old.cert.not_valid_after_utc.timestamp()
    assert shown[("signing", new_dn)] == new.cert.not_valid_after_utc.timestamp()
    # Its only leaf renewed under the new CA: the old CA retires and leaves the gauge.
    bundle = (await api.trust())["data"]["ca.crt"]
    assert (await sign(second, bundle, token, {"csr": make_csr()[1]}))[0] == 200

    async def retired() -> bool:
        return "prev.crt" not in (await api.get(SECRET))["data"]

    await _until(retired, timeout=15)
    await _until(lambda: _without_previous(second))
    assert "CARetired" in await _reasons(api)


async def test_an_expired_prev_ca_is_pruned_from_the_secret_and_the_bundle(
    api: Api, start_operator: Any
) -> None:
    now = utcnow()
    current = pki.bootstrap_ca(now=now, common_name="pruning current root")
    gone = pki.bootstrap_ca(  # expired a minute ago
        now=now - datetime.timedelta(days=2),
        common_name="pruning expired root",
        lifetime=datetime.timedelta(days=2, seconds=-60),
    )
    data = {
        "tls.crt": _b64(pki.cert_pem(current.cert)),
        "tls.key": _b64(pki.key_pem(current.key)),
        "prev.crt": _b64(pki.cert_pem(gone.cert)),
        "prev.key": _b64(pki.key_pem(gone.key)),
        "ca.crt": _b64(pki.cert_pem(current.cert, gone.cert)),
    }
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kubemtls-ca"}, "data": data}
    await api.post(f"/api/v1/namespaces/{NAMESPACE}/secrets", body)
    handle = await start_operator()
    await api.create_pod("app-4")  # its namespace gets the published bundle
    fp_current = certs.fingerprint_sha256(current.cert)

    async def pruned() -> bool:
        if await api.trust() is None:
            return False
        anchors, secret, crls = await _published(api)
        return (
            anchors == {fp_current}
            and "prev.crt" not in secret
            and "prev.key" not in secret
            and _anchors(_pem(secret, "ca.crt")) == {fp_current}
            and crls == 1
        )

    await _until(pruned)
    event = next(
        e for e in (await api.get(EVENTS))["items"] if "pruned the expired CA" in e["message"]
    )
    assert (event["type"], event["reason"]) == ("Normal", "CARetired")
    assert "pruning expired root" in event["message"]
    assert await _without_previous(handle)


def test_an_expired_prev_crt_without_its_key_is_planned_for_pruning() -> None:
    now = utcnow()
    current = pki.bootstrap_ca(now=now, common_name="plan current root")
    gone = pki.bootstrap_ca(
        now=now - datetime.timedelta(days=2),
        common_name="plan expired root",
        lifetime=datetime.timedelta(days=1),
    )
    data = {
        "tls.crt": pki.cert_pem(current.cert),
        "tls.key": pki.key_pem(current.key),
        "prev.crt": pki.cert_pem(gone.cert),
    }
    auth = rollover.from_secret(data, revocation.State(), now=now)
    assert (auth.retiring, auth.expired) == ((), (gone.cert,))
    assert auth.bundle_pem == pki.trust_bundle([current.cert])
    live = frozenset({gone.cert.subject.rfc4514_string()})  # its leaves are dead all the same
    step = rollover.plan(auth, now=now, grace=datetime.timedelta(hours=1), live_issuers=live)
    assert (step.action, step.detail) == ("prune", gone.cert.subject.rfc4514_string())


async def _ca_expiries(handle: OperatorHandle) -> dict[tuple[str, str], float]:
    """``kubemtls_ca_expiry_timestamp_seconds`` as scraped: (role, subject) → value."""
    import aiohttp
    from prometheus_client import parser

    async with aiohttp.ClientSession() as s, s.get(handle.metrics_url) as r:
        text = await r.text()
    return {
        (m.labels["role"], m.labels["subject"]): m.value
        for family in parser.text_string_to_metric_families(text)
        if family.name == "kubemtls_ca_expiry_timestamp_seconds"
        for m in family.samples
    }


async def _without_previous(handle: OperatorHandle) -> bool:
    shown = await _ca_expiries(handle)
    return bool(shown) and all(role != "previous" for role, _ in shown)


def test_a_renewed_intermediate_with_the_same_name_retires_by_time_not_by_issuer_name() -> None:
    """cert-manager keeps the subject: old and new leaves share the issuer DN."""
    now = utcnow()
    root = pki.bootstrap_ca(now=now, common_name="corp root")
    old = pki.issue_intermediate_ca(
        root, now=now, common_name="kubemtls", lifetime=datetime.timedelta(days=90)
    )
    new = pki.issue_intermediate_ca(
        root, now=now, common_name="kubemtls", lifetime=datetime.timedelta(days=90)
    )
    recorded = revocation.Rollover(
        signing_fingerprint=certs.fingerprint_sha256(old.cert),
        signing_pem=pki.cert_pem(old.cert, *old.chain).decode(),
    )
    replaced = rollover.Authority(new, None, None, revocation.State(rollover=recorded))
    live = frozenset({"CN=kubemtls,O=kubemtls"})
    grace, life = datetime.timedelta(hours=1), datetime.timedelta(hours=720)
    step = rollover.plan(replaced, now=now, grace=grace, live_issuers=live, max_leaf_life=life)
    assert step.action == "replace"
    retiring = rollover.Authority(
        new,
        None,
        old,
        revocation.State(rollover=revocation.Rollover(activated_at=now)),
    )
    assert not retiring.is_retiring_issuer(new.cert.subject.rfc4514_string())
    # The root, then the intermediates (each signs leaves and CRLs: docs/revocation.md).
    assert retiring.bundle_pem == pki.trust_bundle([root.cert, new.cert, old.cert])
    assert rollover.plan(retiring, now=now, grace=grace, live_issuers=live).action == "none"
    later = now + life
    assert rollover.plan(retiring, now=later, grace=grace, live_issuers=live).action == "retire"


async def _phase(api: Api, name: str, phase: str) -> Any:
    cert = await api.mtlscert(name)
    return cert if cert and (cert.get("status") or {}).get("phase") == phase else None


async def _condition(api: Api, name: str, type_: str, reason: str) -> Any:
    cert = await api.mtlscert(name)
    for c in ((cert or {}).get("status") or {}).get("conditions") or ():
        if c["type"] == type_ and c["reason"] == reason:
            return c
    return None
