"""Admission latency and throughput of the injection webhook, over HTTPS, 32 at a time.

What kube-apiserver does for each pod CREATE: POST an AdmissionReview v1 to ``/inject`` on
a kept-alive TLS connection and wait for the answer. Here a child process runs the webhook
as the operator does (kopf, our ``admissionserver.WebhookServer``, the ``inject`` handler,
a serving certificate from a throwaway CA) against the emulated API server, and this
process plays the API server with ``--concurrency`` connections. The child runs on its own
interpreter, so the load generator does not share its GIL; it may share its cores (the
machine is shared: say so when quoting figures). Targets: p99 < 10 ms, >= 1,000 reviews/s.

Cases: ``inject`` (a Deployment's pod that opts in: decide, build the sidecar, kopf diffs
the JSON Patch), ``skip`` (a pod that does not opt in), ``deny`` (bad annotations).

    .venv/bin/python bench/admission_bench.py [--seconds 5] [--concurrency 32] [--case inject]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import pathlib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import aiohttp

REPO = pathlib.Path(__file__).resolve().parent.parent
POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "generateName": "billing-api-7d9c8b6f5-",
        "namespace": "billing",
        "labels": {"app": "billing-api", "pod-template-hash": "7d9c8b6f5"},
        "annotations": {
            "kubemtls.io/inject": "true",
            "kubemtls.io/inbound": "8443:8080",
            "kubemtls.io/outbound": "15001=fhir.ehr.example.org:443",
            "kubemtls.io/allowed-peers": "spiffe://cluster.local/ns/ehr/sa/*",
        },
    },
    "spec": {
        "serviceAccountName": "billing-api",
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": "api",
                "image": "registry.example.org/billing-api:2.4.1",
                "ports": [{"name": "http", "containerPort": 8080}],
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
    },
}


def pod_for(case: str) -> dict[str, Any]:
    pod: dict[str, Any] = json.loads(json.dumps(POD))
    if case == "skip":
        del pod["metadata"]["annotations"]["kubemtls.io/inject"]
    elif case == "deny":
        pod["metadata"]["annotations"]["kubemtls.io/inbound"] = "8443:80800"
    return pod


def review(pod: dict[str, Any]) -> bytes:
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": "",
            "namespace": "billing",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
        },
    }
    return json.dumps(body).encode()


# --- the child: the webhook as the operator runs it ------------------------------------------
async def serve(port: int, workdir: pathlib.Path) -> None:
    import kopf
    from kubemtls_operator import admissionserver, config, pki
    from kubemtls_operator.emu import runtime
    from kubemtls_operator.handlers import admission

    now = datetime.datetime.now(datetime.UTC)
    ca = pki.bootstrap_ca(now=now)
    cert, key = pki.issue_serving_cert(
        ca, dns_names=("localhost",), ip_addresses=("127.0.0.1",), now=now
    )
    (workdir / "tls.crt").write_bytes(pki.chain_pem(cert, ca))
    (workdir / "tls.key").write_bytes(pki.key_pem(key))
    (workdir / "ca.crt").write_bytes(pki.cert_pem(ca.anchor))
    cfg = config.load({})
    async with runtime.serve() as api:
        api.write_kubeconfig(workdir / "kubeconfig")
        os.environ["KUBECONFIG"] = str(workdir / "kubeconfig")
        registry = kopf.OperatorRegistry()
        kopf.on.login(registry=registry)(kopf.login_with_kubeconfig)

        @kopf.on.startup(registry=registry)
        def _config(memo: kopf.Memo, **_: Any) -> None:
            memo.config = cfg

        for handler in kopf.get_default_registry()._webhooks.get_all_handlers():
            if handler.fn is admission.pod_inject:
                registry._webhooks.append(handler)
        settings = kopf.OperatorSettings()
        settings.admission.server = admissionserver.WebhookServer(
            addr="127.0.0.1",
            port=port,
            host="127.0.0.1",
            certfile=str(workdir / "tls.crt"),
            pkeyfile=str(workdir / "tls.key"),
        )
        await kopf.operator(registry=registry, settings=settings, clusterwide=True)


# --- the parent: the API server's side -------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(
    url: str, ctx: ssl.SSLContext, body: bytes, seconds: float, conc: int, pid: int
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=conc, ssl=ctx)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> bool:
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as r:
                data = await r.read()
            latencies.append(time.perf_counter() - t0)
            return r.status == 200 and b'"response"' in data

        await asyncio.gather(*(one() for _ in range(conc * 4)))  # warm up, open connections
        latencies.clear()
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                if not await one():
                    errors += 1

        start, cpu0 = time.perf_counter(), cpu_seconds(pid)
        await asyncio.gather(*(worker() for _ in range(conc)))
        elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu0
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return {
        "reviews": len(latencies),
        "errors": errors,
        "reviews_per_s": round(len(latencies) / elapsed),
        "p50_ms": round(q[49] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2),
        # What a review costs the webhook process, whatever else runs on the machine.
        "server_cpu_us_per_review": round(cpu / len(latencies) * 1e6),
        "server_cpu_bound_reviews_per_s": round(len(latencies) / cpu) if cpu else None,
    }


async def wait_ready(
    url: str, ctx: ssl.SSLContext, body: bytes, child: subprocess.Popen[bytes]
) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if child.poll() is not None:
                raise SystemExit("the webhook process exited")
            try:
                async with session.post(url, data=body, ssl=ctx) as r:
                    if r.status == 200:
                        answer: dict[str, Any] = (await r.json())["response"]
                        return answer
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit("the webhook did not answer within 30 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--case", choices=("inject", "skip", "deny"), default="inject")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the child
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, pathlib.Path(args.workdir)))
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--serve", str(port), "--workdir", tmp]
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not (pathlib.Path(tmp) / "ca.crt").exists():
                if child.poll() is not None:
                    raise SystemExit("the webhook process exited")
                time.sleep(0.05)
            time.sleep(0.1)
            ctx = ssl.create_default_context(cafile=str(pathlib.Path(tmp) / "ca.crt"))
            url = f"https://127.0.0.1:{port}/inject"
            body = review(pod_for(args.case))
            first = asyncio.run(wait_ready(url, ctx, body, child))
            patch = json.loads(base64.b64decode(first["patch"])) if "patch" in first else []
            result = asyncio.run(load(url, ctx, body, args.seconds, args.concurrency, child.pid))
        finally:
            child.terminate()
            child.wait(timeout=10)
    result.update(
        case=args.case,
        concurrency=args.concurrency,
        allowed=first["allowed"],
        patch_ops=len(patch),
        review_bytes=len(body),
        cpus=os.cpu_count(),
        targets_met=result["p99_ms"] < 10 and result["reviews_per_s"] >= 1000,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
