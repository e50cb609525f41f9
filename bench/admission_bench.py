"""Admission latency and throughput of the injection webhook, over HTTPS, 32 at a time.

What kube-apiserver does for each pod CREATE: POST an AdmissionReview v1 to ``/inject`` on
a kept-alive TLS connection and wait for the answer. Here a child process runs the webhook
as the operator does (kopf with its text logging at INFO, our
``admissionserver.WebhookServer``, the ``inject`` handler, a serving certificate from a
throwaway CA) against the emulated API server, and a load generator plays the API server
with ``--concurrency`` connections. Targets: p99 < 10 ms, >= 1,000 reviews/s.

Load generators (``--generator``; the output says which one ran):
- ``wrk`` (the default when ``wrk`` is on PATH; Debian package ``wrk``): compiled, one
  thread, a Lua script for the POST body and the percentiles. It costs a fraction of what
  the webhook does per review, so on 2 cores it leaves the webhook its core.
- ``python``: aiohttp in this process, about as much CPU per request as the webhook
  itself; on a 2-core machine the two compete and the figures are lower.
Whatever runs beside it, ``server_cpu_us_per_review`` (the webhook process's user+system
CPU over the run / reviews) is what to compare between versions on a shared machine;
``loadgen_cpu_us_per_review`` says what the generator cost. Both include the 32 TLS
handshakes of the run's connections.

Cases: ``inject`` (a Deployment's pod that opts in: decide, build the sidecar and its JSON
Patch), ``skip`` (a pod that does not opt in), ``deny`` (bad annotations).

    .venv/bin/python bench/admission_bench.py [--seconds 5] [--concurrency 32] [--case inject]
        [--generator auto|wrk|python] [--loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import logging
import os
import pathlib
import resource
import shutil
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
import wrkkit  # bench/wrkkit.py (this directory is on sys.path when run as a script)

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
    # As kubemtls-operator does (its __main__): kopf's text format, INFO (stderr: /dev/null).
    kopf.configure(verbose=False, log_format=kopf.LogFormat.FULL)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # as kubemtls-operator
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
    """The Python generator: aiohttp in this process, ``conc`` workers in a closed loop."""
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

        start, cpu0, own0 = time.perf_counter(), cpu_seconds(pid), _rusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(worker() for _ in range(conc)))
        elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu0
        own = _rusage(resource.RUSAGE_SELF) - own0
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return _figures(len(latencies), errors, elapsed, q[49], q[98], latencies[-1], cpu, own)


_WRK_SCRIPT = """
local f = assert(io.open(%(body)s, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
"""
_WRK_SCRIPT += wrkkit.DONE_LUA


def load_wrk(
    url: str, body: bytes, seconds: float, conc: int, pid: int, workdir: pathlib.Path
) -> dict[str, Any]:
    """The compiled generator: ``wrk`` (one thread, ``conc`` kept-alive TLS connections).

    wrk does not verify the server's certificate (loopback, our own throwaway CA).
    """
    (workdir / "review.json").write_bytes(body)
    script = workdir / "review.lua"
    script.write_text(_WRK_SCRIPT % {"body": json.dumps(str(workdir / "review.json"))})
    cmd = ["wrk", "-t1", f"-c{conc}", "--timeout", "5s", "-s", str(script), url]
    subprocess.run([*cmd[:-1], "-d1s", url], check=True, capture_output=True)  # warm up
    cpu0, gen0 = cpu_seconds(pid), _rusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [*cmd[:-1], f"-d{max(1, round(seconds))}s", url], check=True, capture_output=True, text=True
    ).stdout
    cpu, gen = cpu_seconds(pid) - cpu0, _rusage(resource.RUSAGE_CHILDREN) - gen0
    r = wrkkit.result(out)
    return _figures(
        r.requests, r.socket_errors + r.non_2xx, r.seconds, r.p50, r.p99, r.max, cpu, gen
    )


def _rusage(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _figures(
    n: int, errors: int, elapsed: float, p50: float, p99: float, top: float, cpu: float, gen: float
) -> dict[str, Any]:
    return {
        "reviews": n,
        "errors": errors,
        "reviews_per_s": round(n / elapsed),
        "p50_ms": round(p50 * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "max_ms": round(top * 1000, 2),
        # What a review costs the webhook process, whatever else runs on the machine.
        "server_cpu_us_per_review": round(cpu / n * 1e6),
        "server_cpu_bound_reviews_per_s": round(n / cpu) if cpu else None,
        "loadgen_cpu_us_per_review": round(gen / n * 1e6),
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
    ap.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator: wrk if installed (auto), or aiohttp in this process",
    )
    ap.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="uvloop",
        help="the webhook's event loop (kubemtls-operator runs kopf on uvloop)",
    )
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the child
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(serve(args.serve, pathlib.Path(args.workdir)))
        else:
            asyncio.run(serve(args.serve, pathlib.Path(args.workdir)))
        return
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--serve", str(port), "--workdir", tmp]
        cmd += ["--loop", args.loop]
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
            if generator == "wrk":
                result = load_wrk(
                    url, body, args.seconds, args.concurrency, child.pid, pathlib.Path(tmp)
                )
            else:
                result = asyncio.run(
                    load(url, ctx, body, args.seconds, args.concurrency, child.pid)
                )
        finally:
            child.terminate()
            child.wait(timeout=10)
    result.update(
        case=args.case,
        concurrency=args.concurrency,
        generator=generator,
        loop=args.loop,
        allowed=first["allowed"],
        patch_ops=len(patch),
        review_bytes=len(body),
        cpus=os.cpu_count(),
        targets_met=result["p99_ms"] < 10 and result["reviews_per_s"] >= 1000,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
