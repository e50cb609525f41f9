"""Signing API benchmark: throughput and latency, a 1,000-pod burst, RSS with many MTLSCerts.

Three processes on this machine: the emulated API server, ``kubemtls-operator`` (as it
runs in a cluster, talking HTTP to the emulator), and this client. The client plays the
sidecars: bound tokens from TokenRequest, a CSR, ``POST /v1/certificates`` over HTTPS
trusting the namespace's ``ca.crt``.

1. throughput: ``--clients`` concurrent sidecars (keep-alive) for ``--seconds``;
2. burst: ``--pods`` opted-in pods created at once, each "sidecar" asks as soon as its pod
   exists; time until every MTLSCert is ``Issued``;
3. RSS: ``--rss-certs`` opted-in pods → the operator creates their MTLSCerts; the
   operator's VmRSS once all exist (each also has a status, as after issuance).

Load generators for 1. (``--generator``; the output says which one ran and what it cost,
``loadgen_cpu_ms_per_cert``):
- ``wrk`` (the default when ``wrk`` is on PATH; Debian package ``wrk``): compiled, one
  thread, ``--clients`` kept-alive TLS connections, a Lua script cycling through one
  pre-generated (token, CSR) pair per client pod; pacing (``--rate``) by one shared
  schedule in ``delay()``; percentiles from wrk's histogram (latency from each request's
  write, so TLS handshakes are not in it). Warm-up and measurement are two wrk processes, so
  the measured one opens all ``--clients`` TLS connections at once: its first request waits
  ``WRK_HOLD`` (1 s) for those handshakes, and the hold is not counted in the rate (before
  2026-11-26 08:30 it was: requests queued behind 64 handshakes, which alone put a paced
  p99 at 60-180 ms in some runs). It does not verify the signer's certificate
  (loopback). On the 2-core VM (2026-11-26, load ~3) it cost 0.2-0.5 ms CPU per
  certificate against the Python client's 0.6-0.7, and the closed loop got 285-363 certs/s
  against 136-199. Caveat: while the signer is slow to finish its TLS handshakes (an
  overloaded machine, load 6+), wrk 4.1 spins on its connections (EPOLLOUT stays armed
  during the handshake) and costs more than the Python client.
- ``python``: aiohttp in this process, one kept-alive session per client pod, the same
  connections for warm-up and measurement (steady state: no handshakes measured); it
  verifies the signer's certificate. The run with a fresh token per request (``--token-miss``)
  always uses it (each token is used exactly once).

The emulated API server runs with CPython's cyclic garbage collector off (``--emulator-gc
off``, the default; see ``EMULATOR_NO_GC``). It stands in for kube-apiserver, whose Go
collector runs beside its handlers; CPython's stops the emulator's loop, and every status
write in flight, so every signing request, waited for it. ``--emulator-gc settled``
(``EMULATOR_SETTLED``, the default in session 6) still left 3-17 ms young collections three
times a second; ``--emulator-gc default`` is CPython's own (full collections of 120-265 ms).
``--no-closed`` skips the closed loop (paced/miss runs only).

    .venv/bin/python bench/signing_bench.py [--seconds 10] [--clients 64] [--pods 1000]
        [--rss-certs 10000] [--generator auto|wrk|python] [--emulator-gc off|settled|default]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import pathlib
import random
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import aiohttp
import wrkkit  # bench/wrkkit.py (this directory is on sys.path when run as a script)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = pathlib.Path(__file__).resolve().parent.parent
PY = sys.executable
NS = "bench"
CERTS = "/apis/kubemtls.io/v1alpha1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def csr_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (load-independent cost, unlike wall-clock rates); of one
    of its threads with ``tid`` (the main thread, ``tid=pid``: the operator's event loop)."""
    stat = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    fields = pathlib.Path(stat).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The operator's child processes: its signing workers (``--signing-workers``)."""
    out: list[int] = []
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_cpu_seconds(pid: int) -> float:
    """:func:`cpu_seconds` of a process and its children (the operator and its workers)."""
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in children(pid))


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


#: The emulator with its heap kept out of CPython's full collections (``--emulator-gc
#: settled``): once a second, a young collection, then ``gc.freeze()``. The emulator stands
#: in for kube-apiserver, but its store grows by every write (~200k objects after the
#: loops), and each full collection of it stopped its loop for 120-265 ms every 5-8 s
#: (gc.callbacks, 2026-11-26): every status write in flight, so every signing request,
#: waited for it. Paced 200/s, p99: 288 and 530 ms without, 199 and 87 ms with.
EMULATOR_SETTLED = """
import gc, runpy, threading, time

def settle():
    while True:
        time.sleep(1.0)
        gc.collect(1)
        gc.freeze()

threading.Thread(target=settle, daemon=True).start()
runpy.run_module("kubemtls_operator.emu", run_name="__main__", alter_sys=True)
"""

#: The emulator with CPython's cyclic collector off (``--emulator-gc off``, the default since
#: 2026-11-26, session 7). Measured with gc.callbacks in a paced 500/s run, 1 signing worker:
#: under ``settled`` its young collections (generation 1, every ~0.3 s) took 3-9 ms of CPU and
#: 3-17 ms of wall time each, 60-70 of them per 20 s; p99 over 4 runs: 25.0-86.8 ms, against
#: 31.0-44.9 ms (5 runs) with the collector off. What it no longer frees (reference cycles)
#: stays bounded over a run: RSS 48 → 119 MiB, flat after ~12 s (its stores are bounded).
EMULATOR_NO_GC = """
import gc, runpy
gc.disable()
runpy.run_module("kubemtls_operator.emu", run_name="__main__", alter_sys=True)
"""


class Cluster:
    def __init__(
        self,
        tmp: pathlib.Path,
        check_interval: float,
        emulator_gc: str = "off",
        signing_workers: int = 0,
    ) -> None:
        self.tmp = tmp
        self.signing_workers = signing_workers
        self.check_interval = check_interval
        self.emulator_gc = emulator_gc
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url = ""
        self.signer = ""
        self.health = ""
        self.operator_pid = 0
        self.emulator_pid = 0

    def start(self) -> None:
        ready, kc = self.tmp / "emu.url", self.tmp / "kubeconfig"
        crd = REPO / "charts" / "kubemtls" / "crds" / "mtlscerts.yaml"
        self.procs.append(
            subprocess.Popen(
                [
                    PY,
                    *self._emulator_cmd(),
                    "--port",
                    "0",
                    "--kubeconfig",
                    str(kc),
                    "--crd",
                    str(crd),
                    "--ready-file",
                    str(ready),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(self.tmp / "emu.log", "wb"),  # noqa: SIM115
            )
        )
        self.emulator_pid = self.procs[0].pid
        deadline = time.time() + 30
        while not (ready.exists() and ready.read_text().strip()):
            if time.time() > deadline:
                raise SystemExit("the emulator did not start")
            time.sleep(0.05)
        self.url = ready.read_text().strip().splitlines()[0]
        ports = {
            n: free_port() for n in ("SIGNER_PORT", "WEBHOOK_PORT", "METRICS_PORT", "HEALTH_PORT")
        }
        env = dict(os.environ, KUBECONFIG=str(kc))
        settings = {
            "NAMESPACE": "kubemtls",
            "BIND_ADDRESS": "127.0.0.1",
            "CHECK_INTERVAL": f"{self.check_interval}s",
            "SIGNING_WORKERS": str(self.signing_workers),
            "SIGNER_URL": f"https://127.0.0.1:{ports['SIGNER_PORT']}",
            **{k: str(v) for k, v in ports.items()},
        }
        env.update({f"KUBEMTLS_OPERATOR_{k}": v for k, v in settings.items()})
        op = subprocess.Popen(
            [PY, *(os.environ.get("BENCH_OPERATOR_CMD", "-m kubemtls_operator").split())],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "operator.log", "wb"),  # noqa: SIM115
        )
        self.procs.append(op)
        self.operator_pid = op.pid
        self.signer = f"https://127.0.0.1:{ports['SIGNER_PORT']}"
        self.health = f"http://127.0.0.1:{ports['HEALTH_PORT']}/healthz"
        self.metrics = f"http://127.0.0.1:{ports['METRICS_PORT']}/metrics"

    def _emulator_cmd(self) -> list[str]:
        if "BENCH_EMULATOR_CMD" in os.environ:
            return os.environ["BENCH_EMULATOR_CMD"].split()
        if self.emulator_gc == "settled":
            return ["-c", EMULATOR_SETTLED]
        if self.emulator_gc == "off":
            return ["-c", EMULATOR_NO_GC]
        return ["-m", "kubemtls_operator.emu"]

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


async def wait_healthy(s: aiohttp.ClientSession, url: str) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            async with s.get(url) as r:
                health = await r.json()
                workers = health.get("signingWorkers", "0/0").split("/")
                if health.get("ca") == "ok" and workers[0] == workers[1]:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("the operator did not become healthy")


async def api(s: aiohttp.ClientSession, base: str, method: str, path: str, body: Any = None) -> Any:
    for attempt in range(20):
        async with s.request(method, base + path, json=body) as r:
            data = await r.json(content_type=None)
            if r.status < 400:
                return data
            if r.status == 409 or attempt == 19:
                raise RuntimeError(f"{method} {path}: {r.status} {data}")
        await asyncio.sleep(0.05 * (attempt + 1))
    return None


def pod_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {"kubemtls.io/inject": "true"}},
        "spec": {
            "serviceAccountName": "app",
            "containers": [
                {"name": "app", "image": "app:1"},
                {"name": "kubemtls-sidecar", "image": "k:0"},
            ],
        },
    }


async def create_pod_and_token(s: aiohttp.ClientSession, base: str, name: str) -> str:
    await api(s, base, "POST", f"/api/v1/namespaces/{NS}/pods", pod_body(name))
    return await mint_token(s, base, name)


async def mint_token(s: aiohttp.ClientSession, base: str, name: str) -> str:
    """A new bound token for pod ``name`` (TokenRequest), as kubelet refreshes them."""
    tr = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": ["kubemtls"],
            "expirationSeconds": 3600,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": name},
        },
    }
    data = await api(s, base, "POST", f"/api/v1/namespaces/{NS}/serviceaccounts/app/token", tr)
    return str(data["status"]["token"])


async def trust_ctx(s: aiohttp.ClientSession, base: str) -> ssl.SSLContext:
    deadline = time.time() + 30
    # The namespace's trust ConfigMap appears with its first opted-in pod; before any pod
    # exists (a burst run first), the CA Secret's ca.crt is the same bundle.
    sources = (
        f"{base}/api/v1/namespaces/{NS}/configmaps/kubemtls-trust",
        f"{base}/api/v1/namespaces/kubemtls/secrets/kubemtls-ca",
    )
    while time.time() < deadline:
        for url in sources:
            async with s.get(url) as r:
                if r.status != 200:
                    continue
                data = (await r.json()).get("data") or {}
                if "ca.crt" not in data:
                    continue
                pem = data["ca.crt"] if "configmaps" in url else base64.b64decode(data["ca.crt"])
                return ssl.create_default_context(
                    cadata=pem if isinstance(pem, str) else pem.decode()
                )
        await asyncio.sleep(0.1)
    raise SystemExit("no trust bundle: neither the trust ConfigMap nor the CA Secret's ca.crt")


def profilers(
    cl: Cluster, out: pathlib.Path | None, seconds: float, tag: str
) -> list[subprocess.Popen[bytes]]:
    """py-spy on the operator and the emulator for the measured window (``--profile DIR``)."""
    if out is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    spy = pathlib.Path(PY).with_name("py-spy")
    return [
        subprocess.Popen(
            [
                *(str(spy), "record", "--pid", str(pid), "-r", "200", "--format", "raw"),
                *("--nonblocking", "-d", str(max(1, int(seconds)))),
                *("-o", str(out / f"{who}-{tag}.txt")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for who, pid in (
            ("operator", cl.operator_pid),
            ("emulator", cl.emulator_pid),
            *((f"worker{i}", c) for i, c in enumerate(children(cl.operator_pid))),
        )
    ]


_WRK_SCRIPT = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } kmt_timespec;
int clock_gettime(int clk, kmt_timespec *tp);
]]
local ts = ffi.new("kmt_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local reqs, n, i = {}, 0, 0
local gap = %(gap_ms)s
local hold = %(hold_ms)s
local next_at = nil

function init(args)
  for line in io.lines(%(pairs)s) do
    local token, body = line:match("^(%%S+)	(.*)$")
    n = n + 1
    reqs[n] = wrk.format("POST", "/v1/certificates", {
      ["Authorization"] = "Bearer " .. token,
      ["Content-Type"] = "application/json",
    }, body)
  end
end

-- Round robin over the pods: with as many pods as connections, about one request per pod
-- is in flight, as with one sidecar per pod.
function request()
  i = i %% n + 1
  return reqs[i]
end

-- Paced: one shared schedule, a slot every ``gap`` ms, taken by the next free connection;
-- slots missed while all connections were busy are sent at once (as the Python client).
-- The first slot comes ``hold`` ms after the start: every connection's TLS handshake is
-- done by then, so no measured request waits behind them (wrk times from the write).
if gap > 0 or hold > 0 then
  function delay()
    local now = now_ms()
    if next_at == nil then next_at = now + hold end
    local d = next_at - now
    next_at = next_at + gap
    if d < 0 then return 0 end
    return d
  end
end
"""
_WRK_SCRIPT += wrkkit.DONE_LUA


def _rusage_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


#: The measured wrk run's first request comes this long after its connections open.
WRK_HOLD = 1.0


def run_wrk(
    cl: Cluster,
    tokens: list[str],
    csrs: list[bytes],
    seconds: float,
    rate: float,
    workdir: pathlib.Path,
    hold: float = 0.0,
) -> tuple[int, float, dict[Any, int], float, float, float]:
    """One wrk run: (certs issued, seconds, errors, p50 s, p99 s, wrk CPU seconds).

    ``hold``: seconds from the start (the connections' TLS handshakes) to the first request;
    not counted in the seconds returned.
    """
    pairs = workdir / "pairs.tsv"
    pairs.write_text("".join(f"{t}\t{c.decode()}\n" for t, c in zip(tokens, csrs, strict=True)))
    script = workdir / "signing.lua"
    gap = 1000.0 / rate if rate > 0 else 0.0
    script.write_text(
        _WRK_SCRIPT
        % {"gap_ms": repr(gap), "hold_ms": repr(hold * 1000), "pairs": json.dumps(str(pairs))}
    )
    url = cl.signer + "/v1/certificates"
    cmd = ["wrk", "-t1", f"-c{len(tokens)}", "--timeout", "10s", "-s", str(script)]
    gen0 = _rusage_children()
    out = subprocess.run(
        [*cmd, f"-d{max(1, round(seconds + hold))}s", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    gen = _rusage_children() - gen0
    r = wrkkit.result(out)
    errors: dict[Any, int] = {
        k: v for k, v in (("socket", r.socket_errors), ("non-2xx", r.non_2xx)) if v
    }
    return r.requests - r.non_2xx, r.seconds - hold, errors, r.p50, r.p99, gen


async def throughput(
    cl: Cluster,
    s: aiohttp.ClientSession,
    clients: int,
    seconds: float,
    rate: float = 0.0,
    profile: pathlib.Path | None = None,
    fresh_tokens: int = 0,
    generator: str = "python",
) -> dict[str, Any]:
    """Closed loop (each client asks again at once) or, with ``rate``, paced in total.

    ``fresh_tokens``: each client also gets that many new tokens for its pod and uses each
    for one request only (every TokenReview a cache miss); it stops when they run out
    (always the Python generator).
    """
    if fresh_tokens:
        generator = "python"
    tag = "miss" if fresh_tokens else str(int(rate))
    tokens = await asyncio.gather(
        *(create_pod_and_token(s, cl.url, f"tp{tag}-{i}") for i in range(clients))
    )
    sem = asyncio.Semaphore(64)

    async def pool(i: int) -> list[str]:
        async def one() -> str:
            async with sem:
                return await mint_token(s, cl.url, f"tp{tag}-{i}")

        return list(await asyncio.gather(*(one() for _ in range(fresh_tokens))))

    pools = await asyncio.gather(*(pool(i) for i in range(clients)))
    measuring = False
    ctx = await trust_ctx(s, cl.url)
    csrs = [json.dumps({"csr": csr_pem()}).encode() for _ in range(clients)]
    lat: list[float] = []
    errors: dict[int, int] = {}

    # One kept-alive connection per client for warm-up and measurement alike (a sidecar
    # keeps its session): the measured window holds no TLS handshakes.
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1))
        for _ in range(clients)
    ]

    async def client(i: int, stop_at: float) -> None:
        cs = sessions[i]
        headers = {"Authorization": f"Bearer {tokens[i]}", "Content-Type": "application/json"}
        gap = clients / rate if rate > 0 else 0.0
        next_at = time.perf_counter() + random.random() * gap
        while time.perf_counter() < stop_at:
            if measuring and fresh_tokens:
                if not pools[i]:
                    return
                headers["Authorization"] = f"Bearer {pools[i].pop()}"
            if gap:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += gap
            t = time.perf_counter()
            async with cs.post(cl.signer + "/v1/certificates", data=csrs[i], headers=headers) as r:
                await r.read()
                if r.status == 200:
                    lat.append(time.perf_counter() - t)
                else:
                    errors[r.status] = errors.get(r.status, 0) + 1

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="signing-bench-"))
    # warm up (TLS handshakes, token reviews), then measure
    if generator == "wrk":
        run_wrk(cl, tokens, csrs, 1.0, rate, workdir)
    else:
        await asyncio.gather(*(client(i, time.perf_counter() + 1.0) for i in range(clients)))
    lat.clear()
    measuring = True
    spies = profilers(
        cl, profile, seconds, "miss" if fresh_tokens else "closed" if not rate else tag
    )
    hist0 = await signing_histogram(s, cl.metrics)
    cpu0, emu0 = cpu_seconds(cl.operator_pid), cpu_seconds(cl.emulator_pid)
    workers0 = {c: cpu_seconds(c) for c in children(cl.operator_pid)}
    loop0 = cpu_seconds(cl.operator_pid, cl.operator_pid)
    own0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if generator == "wrk":
        issued, elapsed, errors, p50, p99, gen_cpu = run_wrk(
            cl, tokens, csrs, seconds, rate, workdir, hold=WRK_HOLD
        )
    else:
        await asyncio.gather(*(client(i, t0 + seconds) for i in range(clients)))
        elapsed = time.perf_counter() - t0
        own1 = resource.getrusage(resource.RUSAGE_SELF)
        gen_cpu = own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime
        q = statistics.quantiles(lat, n=100) if len(lat) > 100 else [float("nan")] * 99
        issued, p50, p99 = len(lat), q[49], q[98]
    shutil.rmtree(workdir, ignore_errors=True)
    for cs in sessions:
        await cs.close()
    await asyncio.sleep(1.0)  # let the status writes of the last ones land (counted too)
    cpu = cpu_seconds(cl.operator_pid) - cpu0
    workers = sum(cpu_seconds(c) - workers0.get(c, 0.0) for c in children(cl.operator_pid))
    loop_cpu = cpu_seconds(cl.operator_pid, cl.operator_pid) - loop0
    emu = cpu_seconds(cl.emulator_pid) - emu0
    hist1 = await signing_histogram(s, cl.metrics)
    hist = [(le, c1 - c0) for (le, c0), (_, c1) in zip(hist0, hist1, strict=True)]
    for spy in spies:
        spy.wait()
    return {
        "generator": generator,
        "emulator_gc": cl.emulator_gc,
        "clients": clients,
        "offered_rate": rate or "closed loop",
        "token_reviews": "every request (cache miss)" if fresh_tokens else "cached",
        "seconds": round(elapsed, 2),
        "issued": issued,
        "certs_per_s": round(issued / elapsed, 1),
        "p50_ms": round(p50 * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        # inside the operator, from its own histogram (handler start → answer; bucketed)
        "operator_p50_ms": bucket_quantile(hist, 0.50),
        "operator_p99_ms": bucket_quantile(hist, 0.99),
        "signing_workers": cl.signing_workers,
        # the operator's process and its signing workers' (--signing-workers)
        "operator_cpu_ms_per_cert": round((cpu + workers) / max(issued, 1) * 1000, 2),
        "operator_main_cpu_ms_per_cert": round(cpu / max(issued, 1) * 1000, 2),
        "workers_cpu_ms_per_cert": round(workers / max(issued, 1) * 1000, 2),
        # its event loop thread alone: the one that saturates (other threads: libuv, kopf)
        "operator_loop_cpu_ms_per_cert": round(loop_cpu / max(issued, 1) * 1000, 2),
        "emulator_cpu_ms_per_cert": round(emu / max(issued, 1) * 1000, 2),
        "loadgen_cpu_ms_per_cert": round(gen_cpu / max(issued, 1) * 1000, 2),
        "load_avg_1m": os.getloadavg()[0],
        "errors": errors,
    }


async def signing_histogram(s: aiohttp.ClientSession, url: str) -> list[tuple[float, float]]:
    """The operator's ``kubemtls_signing_duration_seconds`` buckets: (le, cumulative count)."""
    async with s.get(url) as r:
        text = await r.text()
    prefix = 'kubemtls_signing_duration_seconds_bucket{le="'
    return [
        (float(line[len(prefix) :].split('"', 1)[0]), float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith(prefix)
    ]


def bucket_quantile(hist: list[tuple[float, float]], q: float) -> float | None:
    """``histogram_quantile`` as Prometheus computes it (linear within the bucket), in ms."""
    if not hist or hist[-1][1] <= 0:
        return None
    bounds, cumulative = [le for le, _ in hist], [c for _, c in hist]
    rank = q * cumulative[-1]
    for i, count in enumerate(cumulative):
        if count >= rank:
            if bounds[i] == float("inf"):
                return round(bounds[i - 1] * 1000, 1)
            lo, below = (bounds[i - 1], cumulative[i - 1]) if i else (0.0, 0.0)
            frac = (rank - below) / (count - below) if count > below else 1.0
            return round((lo + (bounds[i] - lo) * frac) * 1000, 1)
    return None


async def burst(cl: Cluster, s: aiohttp.ClientSession, pods: int) -> dict[str, Any]:
    ctx = await trust_ctx(s, cl.url)
    csr = json.dumps({"csr": csr_pem()}).encode()
    sem = asyncio.Semaphore(128)
    conn = aiohttp.TCPConnector(ssl=ctx, limit=128)
    refused: dict[str, int] = {}
    async with aiohttp.ClientSession(connector=conn) as signer:

        async def sidecar(i: int) -> None:
            async with sem:
                token = await create_pod_and_token(s, cl.url, f"burst-{i}")
            for _ in range(50):
                async with (
                    sem,
                    signer.post(
                        cl.signer + "/v1/certificates",
                        data=csr,
                        headers={
                            "Authorization": f"Bearer {token}",
                            "Content-Type": "application/json",
                        },
                    ) as r,
                ):
                    body = await r.json(content_type=None)
                    if r.status == 200:
                        return
                    refused[body.get("reason", str(r.status))] = (
                        refused.get(body.get("reason", ""), 0) + 1
                    )
                await asyncio.sleep(0.2 + random.random() * 0.2)

        t0 = time.perf_counter()
        await asyncio.gather(*(sidecar(i) for i in range(pods)))
        t_signed = time.perf_counter() - t0
        while True:
            items = (await api(s, cl.url, "GET", f"{CERTS}/namespaces/{NS}/mtlscerts"))["items"]
            issued = sum(
                1
                for i in items
                if i["metadata"]["name"].startswith("burst-")
                and (i.get("status") or {}).get("phase") == "Issued"
            )
            if issued >= pods or time.perf_counter() - t0 > 300:
                break
            await asyncio.sleep(0.2)
    return {
        "pods": pods,
        "all_signed_s": round(t_signed, 2),
        "all_issued_s": round(time.perf_counter() - t0, 2),
        "issued": issued,
        "refusals_retried": refused,
    }


async def rss(cl: Cluster, s: aiohttp.ClientSession, n: int) -> dict[str, Any]:
    before = rss_mib(cl.operator_pid)
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with sem:
            await api(s, cl.url, "POST", f"/api/v1/namespaces/{NS}/pods", pod_body(f"rss-{i}"))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    while True:
        items = (await api(s, cl.url, "GET", f"{CERTS}/namespaces/{NS}/mtlscerts"))["items"]
        count = sum(
            1
            for i in items
            if i["metadata"]["name"].startswith("rss-") and (i.get("status") or {}).get("phase")
        )
        if count >= n or time.perf_counter() - t0 > 900:
            break
        await asyncio.sleep(1.0)
    await asyncio.sleep(cl.check_interval + 2)  # one sweep after the burst (it trims the heap)
    return {
        "mtlscerts": count + 0,
        "total_mtlscerts": len(items),
        "seconds": round(time.perf_counter() - t0, 1),
        "rss_before_mib": round(before, 1),
        "rss_after_mib": round(rss_mib(cl.operator_pid), 1),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cl = Cluster(pathlib.Path(tmp), args.check_interval, args.emulator_gc, args.signing_workers)
        cl.start()
        try:
            conn = aiohttp.TCPConnector(limit=128)
            async with aiohttp.ClientSession(connector=conn) as s:
                await wait_healthy(s, cl.health)
                out: dict[str, Any] = {"rss_idle_mib": round(rss_mib(cl.operator_pid), 1)}
                if args.seconds > 0:
                    if not args.no_closed:
                        out["throughput"] = await throughput(
                            cl,
                            s,
                            args.clients,
                            args.seconds,
                            profile=args.profile,
                            generator=args.generator,
                        )
                        print(json.dumps(out["throughput"]), flush=True)
                    if args.token_miss:
                        per_client = max(1, int(args.seconds * args.token_miss / args.clients))
                        out["token_miss"] = await throughput(
                            cl,
                            s,
                            args.clients,
                            args.seconds,
                            profile=args.profile,
                            fresh_tokens=per_client,
                        )
                        print(json.dumps(out["token_miss"]), flush=True)
                    if args.rate > 0:
                        out["paced"] = await throughput(
                            cl,
                            s,
                            args.clients,
                            args.seconds,
                            args.rate,
                            profile=args.profile,
                            generator=args.generator,
                        )
                        print(json.dumps(out["paced"]), flush=True)
                if args.pods > 0:
                    out["burst"] = await burst(cl, s, args.pods)
                    print(json.dumps(out["burst"]), flush=True)
                if args.rss_certs > 0:
                    out["rss"] = await rss(cl, s, args.rss_certs)
                    print(json.dumps(out["rss"]), flush=True)
                return out
        finally:
            cl.stop()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rate", type=float, default=200.0, help="also a paced run (certs/s)")
    ap.add_argument(
        "--no-closed", action="store_true", help="skip the closed loop (paced/miss runs only)"
    )
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--rss-certs", type=int, default=10000)
    ap.add_argument(
        "--token-miss",
        type=float,
        default=0.0,
        metavar="RATE",
        help="also a closed loop in which every request brings a new token (TokenReview cache "
        "miss); RATE bounds the tokens minted beforehand (RATE x seconds in all), e.g. 400",
    )
    ap.add_argument(
        "--profile", type=pathlib.Path, help="py-spy raw profiles of each measured run into DIR"
    )
    ap.add_argument("--check-interval", type=float, default=10.0, help="the operator's sweep")
    ap.add_argument(
        "--signing-workers",
        type=int,
        default=0,
        help="the operator's SIGNING_WORKERS (worker processes serving the signing API)",
    )
    ap.add_argument(
        "--emulator-gc",
        choices=("off", "settled", "default"),
        default="off",
        help="the emulated API server's cyclic garbage collector: off (EMULATOR_NO_GC), its "
        "heap frozen once a second (settled, session 6; EMULATOR_SETTLED), or CPython's "
        "default (before 2026-11-26)",
    )
    ap.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator of the closed and paced loops: wrk if installed (auto), or "
        "aiohttp in this process (see above)",
    )
    args = ap.parse_args()
    if args.generator == "auto":
        args.generator = "wrk" if shutil.which("wrk") else "python"
    elif args.generator == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--generator wrk: wrk is not installed (apt-get install wrk)")
    out = asyncio.run(main_async(args))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
