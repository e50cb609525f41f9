"""The signing API served by worker processes (``SIGNING_WORKERS=2``), end to end.

Real kopf (in this process, in a thread), the emulated API, and real
``python -m kubemtls_operator.signworker`` processes: children of this test process, found
through ``/proc/self/task/*/children``. What a sidecar sees must not change with workers:
the same answers, refusals and metrics as in process, every serial recorded before the
answer, and a worker's cached grant never outliving the pod or the CA it names.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import pathlib
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from kubemtls_operator import pki
from kubemtls_sidecar import certs, contract
from operatorkit import (
    NAMESPACE,
    Api,
    OperatorHandle,
    _issued,
    _until,
    bad_body,
    client_context,
    make_csr,
    openssl_verify,
    ready_pod,
    sign,
)
from prometheus_client.parser import text_string_to_metric_families
from testkit import utcnow

WORKERS = 2
MTLSCERT = "/apis/kubemtls.io/v1alpha1/namespaces/default/mtlscerts"


# --- helpers ---------------------------------------------------------------------------------
async def _metrics(handle: OperatorHandle) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the operator's /metrics: (name, sorted labels) → value."""
    async with aiohttp.ClientSession() as s, s.get(handle.metrics_url) as r:
        text = await r.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict[Any, float], metric: str, /, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


async def _gauge(handle: OperatorHandle) -> float:
    return _value(await _metrics(handle), "kubemtls_signing_workers")


def _refusals(samples: dict[Any, float]) -> dict[str, float]:
    return {
        dict(labels)["reason"]: v
        for (name, labels), v in samples.items()
        if name == "kubemtls_signing_refusals_total"
    }


def _worker_pids() -> set[int]:
    """This process's children that are signing workers (zombies have no cmdline: left out)."""
    pids = set()
    for children in pathlib.Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if b"kubemtls_operator.signworker" in cmdline:
                pids.add(int(pid))
    return pids


def _alive(pid: int) -> bool:
    return pathlib.Path(f"/proc/{pid}").exists()


def _exited(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (its sockets closed), reaped or not."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


async def _running(handle: OperatorHandle, before: set[int], n: int = WORKERS) -> set[int]:
    """The workers started since ``before``, once ``n`` run and the gauge counts ``n``
    listening (a worker counts once its socket listens)."""

    async def up() -> set[int] | None:
        pids = _worker_pids() - before
        return pids if len(pids) == n and await _gauge(handle) == n else None

    found: set[int] = await _until(up, timeout=15)
    return found


def _leaf(body: dict[str, Any]) -> x509.Certificate:
    return x509.load_pem_x509_certificates(body["certificateChain"].encode())[0]


def _serial(body: dict[str, Any]) -> str:
    return f"{_leaf(body).serial_number:x}"


@dataclasses.dataclass
class Conn:
    """One keep-alive HTTPS connection to the signing API.

    A TCP connection belongs to the worker process that accepted it, so every request on
    it reaches the same worker, and with it the grant that worker cached for the token.
    ``one_connection`` says it stayed one (aiohttp counts the connections it opened).
    """

    handle: OperatorHandle
    token: str
    session: aiohttp.ClientSession
    opened: list[int]

    async def sign(self) -> tuple[int, Any]:
        url = self.handle.signer_url + "/v1/certificates"
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.session.post(url, json={"csr": make_csr()[1]}, headers=headers) as r:
            return r.status, await r.json(content_type=None)

    async def trust(self, etag: str = "") -> tuple[int, Any, str]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if etag:
            headers["If-None-Match"] = etag
        async with self.session.get(self.handle.signer_url + "/v1/trust", headers=headers) as r:
            body = await r.json(content_type=None) if r.status == 200 else None
            return r.status, body, r.headers.get("ETag", "")

    @property
    def one_connection(self) -> bool:
        return self.opened == [1]


@pytest.fixture
async def conns() -> AsyncIterator[Any]:
    sessions: list[aiohttp.ClientSession] = []

    def conn(handle: OperatorHandle, ca_pem: str, token: str) -> Conn:
        opened = [0]

        async def on_open(*_: Any) -> None:
            opened[0] += 1

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(on_open)
        ctx: ssl.SSLContext = client_context(ca_pem)
        s = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, ssl=ctx), trace_configs=[trace]
        )
        sessions.append(s)
        return Conn(handle, token, s, opened)

    yield conn
    for s in sessions:
        await s.close()


@pytest.fixture
async def workers(start_operator: Any) -> OperatorHandle:
    """An operator signing through two worker processes, both running."""
    before = _worker_pids()
    handle: OperatorHandle = await start_operator(signing_workers=WORKERS)
    await _running(handle, before)
    return handle


# --- a certificate through a worker ----------------------------------------------------------
async def test_a_certificate_signed_by_a_worker_is_recorded_first_and_counted(
    api: Api, workers: OperatorHandle, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    token, ca_pem = await ready_pod(
        api,
        "web-1",
        annotations={contract.ANN_INJECT: "true", contract.ANN_DNS_NAMES: "web.default.svc"},
    )
    before = await _metrics(workers)
    _, csr = make_csr(common_name="admin", dns=("evil.example.com",))
    status, body = await sign(workers, ca_pem, token, {"csr": csr})
    assert status == 200, body
    # The serial is in the API BEFORE the answer (read at once): the worker waited for the
    # operator's record, as the in-process signer does.
    st = (await api.mtlscert("web-1"))["status"]
    f = certs.facts(_leaf(body))
    assert (st["serial"], st["phase"], st["fingerprintSHA256"]) == (
        f.serial,
        "Issued",
        f.fingerprint_sha256,
    )
    assert st["notAfter"] == body["notAfter"]
    done = openssl_verify(tmp_path, body["trustBundle"], body["certificateChain"], body["crl"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f.spiffe_id == "spiffe://cluster.local/ns/default/sa/app"
    assert f.dns_names == ("web.default.svc",)  # the identity is the operator's, not the CSR's
    # One audit line per serial, from the operator's process (not the worker's), once recorded.
    lines = [r.getMessage() for r in caplog.records if r.name == "kubemtls_operator.signing"]
    assert [m for m in lines if m.startswith(f"issued serial {st['serial']} to default/web-1 ")]
    # Counted in the operator's one /metrics: the workers gauge and the issued counter at
    # once (the operator records), the latency once a worker's batch arrives (every 0.5 s).
    after = await _metrics(workers)
    assert _value(after, "kubemtls_signing_workers") == float(WORKERS)
    issued = "kubemtls_certificates_issued_total"
    assert (
        _value(after, issued, namespace="default")
        == _value(before, issued, namespace="default") + 1
    )
    count = "kubemtls_signing_duration_seconds_count"

    async def observed() -> bool:
        return _value(await _metrics(workers), count) == _value(before, count) + 1

    await _until(observed, timeout=2.0)


async def test_a_token_of_pod_a_never_yields_a_certificate_for_pod_b(
    api: Api, workers: OperatorHandle, conns: Any
) -> None:
    token_a, ca_pem = await ready_pod(api, "pod-a")
    await api.create_pod("pod-b", service_account="other")
    conn = conns(workers, ca_pem, token_a)
    for _ in range(2):  # the second from the worker's cached grant
        status, body = await conn.sign()
        assert status == 200, body
        leaf = _leaf(body)
        assert certs.facts(leaf).spiffe_id == "spiffe://cluster.local/ns/default/sa/app"
        assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "pod-a"
    assert conn.one_connection
    await _until(lambda: _issued(api, "pod-a"))
    b = await api.mtlscert("pod-b")
    assert not (b.get("status") or {}).get("serial")


# --- refusals --------------------------------------------------------------------------------


REFUSALS = {
    "malformed-json": (400, "MalformedJSON"),
    "no-csr-field": (400, "MalformedJSON"),
    "not-pem": (400, "InvalidCSR"),
    "bad-signature": (400, "BadSignature"),
    "weak-rsa": (400, "WeakKey"),
    "dsa": (400, "WeakKey"),
    "no-token": (401, "TokenMissing"),
    "unknown-token": (401, "TokenInvalid"),
    "other-audience": (401, "TokenInvalid"),
    "oversized": (413, "BodyTooLarge"),
    "not-opted-in": (403, "PodNotOptedIn"),
    "deleted-pod": (403, "PodNotFound"),
    "deleted-pod-uncached": (401, "TokenInvalid"),
    "recreated-pod": (403, "PodUIDMismatch"),
}


async def test_every_refusal_is_the_documented_answer_and_counted_once(
    api: Api, workers: OperatorHandle, conns: Any
) -> None:
    """test_signing's table, through workers. One operator for all cases (each has its own
    pod); the cached-grant cases use one connection, so the worker that cached the grant
    is the one asked again, and only the operator's re-check at record time refuses."""
    _, ca_pem = await ready_pod(api, "first")
    before = _refusals(await _metrics(workers))
    got: dict[str, tuple[int, str]] = {}
    messages: dict[str, str] = {}
    for case in REFUSALS:
        pod = f"p-{case}"
        await api.create_pod(pod, annotations={} if case == "not-opted-in" else None)
        token = await api.token_for(pod)
        body, raw = bad_body(case, make_csr()[1])
        if case == "no-token":
            token = ""
        elif case == "unknown-token":
            token = "not-a-token"
        elif case == "other-audience":
            token = await api.token_for(pod, audience="https://kubernetes.default.svc")
        elif case == "deleted-pod-uncached":  # the API server invalidates the bound token
            await api.delete(f"/api/v1/namespaces/default/pods/{pod}")
        elif case in ("deleted-pod", "recreated-pod"):
            conn = conns(workers, ca_pem, token)
            assert (await conn.sign())[0] == 200  # the worker caches the grant
            await api.delete(f"/api/v1/namespaces/default/pods/{pod}")
            if case == "deleted-pod":
                # Until the operator's watch delivers the deletion, the pod is still there
                # for it (as in process). It forgets the pod's certificate gauges then.
                async def forgotten(pod: str = pod) -> bool:
                    expiry = "kubemtls_certificate_expiry_timestamp_seconds"
                    labels = {"name": pod, "namespace": "default"}
                    return _value(await _metrics(workers), expiry, **labels) == 0.0

                await _until(forgotten)
            if case == "recreated-pod":
                uid = (await api.create_pod(pod))["metadata"]["uid"]

                async def indexed(pod: str = pod, uid: str = uid) -> bool:
                    cert = await api.mtlscert(pod)
                    return bool(cert and cert["spec"]["podUID"] == uid)

                await _until(indexed)
        if case in ("deleted-pod", "recreated-pod"):
            code, answer = await conn.sign()  # the same worker, the cached grant
            assert conn.one_connection
        else:
            code, answer = await sign(workers, ca_pem, token, body, raw=raw)
        got[case] = (code, answer.get("reason"))
        messages[case] = answer.get("message")
    assert got == REFUSALS
    assert all(messages.values()), messages
    want: dict[str, int] = {}
    for _, reason in REFUSALS.values():
        want[reason] = want.get(reason, 0) + 1

    async def counted() -> dict[str, float] | None:
        now = _refusals(await _metrics(workers))
        delta = {r: now[r] - before.get(r, 0.0) for r in now if now[r] != before.get(r, 0.0)}
        return delta if delta == want else None

    await _until(counted, timeout=5)


# --- trust, revocation and the cached grant ------------------------------------------------------
def _crl_serials(pem: str) -> set[int]:
    out: set[int] = set()
    for block in pem.split("-----END X509 CRL-----")[:-1]:
        crl = x509.load_pem_x509_crl((block + "-----END X509 CRL-----\n").encode())
        out |= {r.serial_number for r in crl}
    return out


async def test_trust_and_a_revocation_through_a_worker(
    api: Api, workers: OperatorHandle, conns: Any
) -> None:
    token, ca_pem = await ready_pod(api, "billing-0")
    conn = conns(workers, ca_pem, token)
    code, first = await conn.sign()
    assert code == 200, first
    serial = _serial(first)
    code, tb, etag = await conn.trust()
    assert code == 200
    assert etag
    assert tb["rekey"] is False
    assert tb["trustBundle"] == first["trustBundle"]
    assert (await conn.trust(etag))[0] == 304

    await _until(lambda: _issued(api, "billing-0"))
    await api.patch(
        f"{MTLSCERT}/billing-0",
        {"metadata": {"annotations": {contract.ANN_REVOKE: "keyCompromise"}}},
    )

    async def rekey() -> Any:
        code, tb, new_etag = await conn.trust(etag)
        return (tb, new_etag) if code == 200 and tb["rekey"] else None

    tb, new_etag = await _until(rekey)
    assert new_etag != etag
    assert int(serial, 16) in _crl_serials(tb["crl"])
    # The same connection, so the same worker, which cached a grant for this token before
    # the new CRL. A new CRL is a new generation of the same signing CA: the grant still
    # allows the same leaf, so the operator records it. A 503 GrantChanged is allowed once
    # (the documented answer when the grant changed under a worker; the worker then drops
    # its cached grant), but never twice: the retry asks the operator afresh.
    code, second = await conn.sign()
    if code == 503 and second.get("reason") == "GrantChanged":
        code, second = await conn.sign()
    assert code == 200, second
    assert _serial(second) != serial
    assert int(serial, 16) in _crl_serials(second["crl"])
    assert conn.one_connection
    code, tb, _ = await conn.trust()
    assert tb["rekey"] is False
    cert = await _until(lambda: _issued(api, "billing-0"))
    assert cert["status"]["serial"] == _serial(second)


async def test_a_changed_pod_identity_is_never_signed_from_a_cached_grant(
    api: Api, workers: OperatorHandle, conns: Any
) -> None:
    old, new = "web.default.svc", "api.default.svc"
    token, ca_pem = await ready_pod(
        api, "dns-0", annotations={contract.ANN_INJECT: "true", contract.ANN_DNS_NAMES: old}
    )
    conn = conns(workers, ca_pem, token)
    code, body = await conn.sign()
    assert code == 200, body
    assert certs.facts(_leaf(body)).dns_names == (old,)  # and the worker cached the grant
    await api.patch(
        "/api/v1/namespaces/default/pods/dns-0",
        {"metadata": {"annotations": {contract.ANN_DNS_NAMES: new}}},
    )
    answers: list[tuple[int, Any]] = []

    async def renamed() -> bool:
        code, body = await conn.sign()
        answers.append(
            (code, certs.facts(_leaf(body)).dns_names if code == 200 else body.get("reason"))
        )
        return answers[-1] == (200, (new,))

    await _until(renamed)
    # The old name until the operator's index has the change; then the worker's cached
    # grant (old name) is refused once when the operator re-checks it, and the worker asks
    # again. Nothing is ever issued for a name the pod no longer has.
    assert conn.one_connection
    assert answers[-2:] == [(503, "GrantChanged"), (200, (new,))], answers
    assert set(answers[:-2]) <= {(200, (old,))}, answers


# --- a CA replaced while workers hold grants ----------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_a_ca_replaced_in_place_is_used_by_the_workers_at_once(
    api: Api, start_operator: Any, conns: Any, tmp_path: pathlib.Path
) -> None:
    old = pki.bootstrap_ca(now=utcnow(), common_name="workers old root")
    new = pki.bootstrap_ca(now=utcnow(), common_name="workers new root")
    secret = f"/api/v1/namespaces/{NAMESPACE}/secrets/kubemtls-ca"
    data = {"tls.crt": _b64(pki.cert_pem(old.cert)), "tls.key": _b64(pki.key_pem(old.key))}
    await api.post(
        f"/api/v1/namespaces/{NAMESPACE}/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kubemtls-ca"}, "data": data},
    )
    before = _worker_pids()
    handle = await start_operator(signing_workers=WORKERS)
    await _running(handle, before)
    token, ca_pem = await ready_pod(api, "app-0")
    conn = conns(handle, ca_pem, token)
    code, body = await conn.sign()
    assert code == 200, body
    assert _leaf(body).issuer == old.cert.subject  # and the worker cached the grant
    refused_before = _refusals(await _metrics(handle)).get("GrantChanged", 0.0)

    # Hold the trust ConfigMaps' writes: the operator signs with the new CA at once but
    # pushes it to the workers only after publishing it, so the worker's cached grant
    # (old CA) is stale for that long. The operator's re-check at record time must catch it.
    await api.post(
        "/_emu/latency",
        {"pattern": f"^PATCH .*/configmaps/{contract.TRUST_CONFIGMAP}$", "seconds": 1.5},
    )
    await api.patch(
        secret,
        {"data": {"tls.crt": _b64(pki.cert_pem(new.cert)), "tls.key": _b64(pki.key_pem(new.key))}},
    )
    answers: list[tuple[int, str]] = []

    async def from_new_ca() -> Any:
        code, body = await conn.sign()
        if code == 200:
            issuer = _leaf(body).issuer
            answers.append((code, "new" if issuer == new.cert.subject else "old"))
            return body if issuer == new.cert.subject else None
        answers.append((code, body.get("reason")))
        return None

    body = await _until(from_new_ca, timeout=15)
    await api.post(
        "/_emu/latency", {"pattern": f"^PATCH .*/configmaps/{contract.TRUST_CONFIGMAP}$"}
    )
    # Leaves from the old CA until the operator switched, then exactly one refusal (the
    # stale cached grant: the leaf it signed is never handed out), then the new CA.
    assert conn.one_connection
    assert answers[-1] == (200, "new")
    assert answers.count((503, "GrantChanged")) == 1, answers
    assert set(answers[:-1]) <= {(200, "old"), (503, "GrantChanged")}, answers
    assert answers.index((503, "GrantChanged")) == len(answers) - 2, answers
    refused = _refusals(await _metrics(handle)).get("GrantChanged", 0.0)
    assert refused == refused_before + 1
    # The answer's bundle holds both CAs (the old one's leaves still live): it verifies.
    done = openssl_verify(tmp_path, body["trustBundle"], body["certificateChain"], body["crl"])
    assert done.returncode == 0, done.stdout + done.stderr
    # What the operator recorded is the new leaf.
    cert = await _until(lambda: _issued(api, "app-0"))
    assert cert["status"]["serial"] == _serial(body)
    # Both workers serve the serving certificate re-issued by the new CA: a client that
    # trusts only the new CA connects. (8 new connections, spread by the kernel's
    # SO_REUSEPORT hash: all 8 miss one worker with probability 1/128.)
    new_only = pki.cert_pem(new.cert).decode()
    for _ in range(8):
        code, answer = await sign(handle, new_only, token, {"csr": make_csr()[1]})
        assert code == 200, answer


# --- worker processes: restart, stop ------------------------------------------------------------
async def test_a_killed_worker_is_started_again_and_stop_leaves_no_worker(
    api: Api, start_operator: Any
) -> None:
    before = _worker_pids()
    handle = await start_operator(signing_workers=WORKERS)
    pids = await _running(handle, before)
    token, ca_pem = await ready_pod(api, "k-0")
    assert (await sign(handle, ca_pem, token, {"csr": make_csr()[1]}))[0] == 200

    victim, survivor = sorted(pids)
    os.kill(victim, signal.SIGKILL)

    # Each worker listens on its own socket of the port's SO_REUSEPORT group: a connection
    # the kernel queued on the victim's socket before that socket closed is reset (as any
    # in-flight request of a dying worker fails; sidecars retry). So wait for the victim's
    # exit, then the survivor alone accepts, and every new connection is answered.
    async def gone() -> bool:
        return _exited(victim)

    await _until(gone)

    async def noticed() -> bool:  # the operator saw the exit (it restarts after 1 s)
        return await _gauge(handle) == WORKERS - 1

    await _until(noticed)
    for _ in range(3):
        code, body = await sign(handle, ca_pem, token, {"csr": make_csr()[1]})
        assert code == 200, body
    now = await _running(handle, before)  # started again (after a 1 s backoff)
    assert survivor in now
    assert victim not in now
    assert not _alive(victim)  # reaped, not a zombie
    for _ in range(3):
        code, body = await sign(handle, ca_pem, token, {"csr": make_csr()[1]})
        assert code == 200, body

    await handle.stop()
    left = [p for p in pids | now if _alive(p)]
    assert not left, f"workers left behind: {left}"
    assert not _worker_pids() - before


# --- the setting ---------------------------------------------------------------------------------
async def test_a_bad_worker_count_stops_the_operator_with_one_line() -> None:
    """The flag and the variable (config.load's table is in test_config)."""
    variable = "KUBEMTLS_OPERATOR_SIGNING_WORKERS"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBEMTLS_OPERATOR_")}
    runs = [
        (["--signing-workers", "-1"], env),
        ([], {**env, variable: "65"}),
        ([], {**env, variable: "x"}),
    ]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kubemtls_operator",
            *args,
            env=env_,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for args, env_ in runs
    ]
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2, (out, err)
        assert err.count(b"\n") == 1, err
        assert variable.encode() in err
