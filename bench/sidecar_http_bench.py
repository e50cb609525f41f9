#!/usr/bin/env python3
"""HTTP mode vs TCP mode of the sidecar's inbound side, and HAProxy in the same roles.

    .venv/bin/python bench/sidecar_http_bench.py              # ~1 min
    .venv/bin/python bench/sidecar_http_bench.py --seconds 3  # quicker

``../shared/bench/peers.py`` cannot drive HTTP mode: its workloads are raw byte
streams, which an HTTP-parsing proxy rightly refuses. So this script measures the
server-side proxy alone, on loopback:

    loadgen (TLS client, client cert) ==mTLS==> [server-side proxy] --plain--> backend

for: kubemtls ``--protocol tcp``, kubemtls ``--protocol http`` (h11 parsing, XFCC and
Client-Cert added, RFC 8705 check), HAProxy ``mode tcp`` and HAProxy ``mode http`` with
an XFCC-like header set from the client certificate. Workload: 16 persistent
connections, closed loop, GET with a bound bearer token → 1 KiB answer. Reported:
requests/s, p50/p99 latency, and the proxy's CPU microseconds per request (utime+stime
of its process from /proc, over the measured window). One worker/thread per proxy, TLS
1.3 with TLS_AES_128_GCM_SHA256 for everyone. Quote ratios within one run only: the
machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import pathlib
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "operator"), str(REPO / "sidecar")]

from cryptography import x509  # noqa: E402
from kubemtls_operator import pki  # noqa: E402
from kubemtls_sidecar import certs  # noqa: E402

CONNS = 16
BODY = b"x" * 1024
OPENSSL_CONF = """openssl_conf = init
[init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = sys
[sys]
MinProtocol = TLSv1.3
Ciphersuites = TLS_AES_128_GCM_SHA256
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def material(d: pathlib.Path) -> str:
    """PKI files in ``d``; returns the client certificate's x5t#S256."""
    now = datetime.datetime.now(datetime.UTC)
    ca = pki.bootstrap_ca(now=now, common_name="bench root")

    def leaf(name: str, ns: str) -> tuple[bytes, bytes, x509.Certificate]:
        key = pki.generate_key("ecdsa-p256")
        ident = pki.LeafIdentity(
            certs.spiffe_id("cluster.local", ns, name), name, ns, ("localhost",), ("127.0.0.1",)
        )
        cert = pki.issue_leaf(ca, key.public_key(), ident, now=now, lifetime=datetime.timedelta(1))
        return pki.chain_pem(cert, ca), pki.key_pem(key), cert

    x5t = ""
    for role, ns in (("server", "ehr"), ("client", "clinic")):
        chain, key, cert = leaf(role, ns)
        (d / role).mkdir()
        (d / role / "tls.crt").write_bytes(chain)
        (d / role / "tls.key").write_bytes(key)
        (d / f"{role}.pem").write_bytes(chain + key)
        if role == "client":
            x5t = certs.x5t_s256(cert)
    (d / "trust").mkdir()
    (d / "trust" / "ca.crt").write_bytes(pki.trust_bundle([ca.anchor]))
    crl = pki.build_crl(ca, [], now=now, number=1)
    (d / "trust" / "crl.pem").write_bytes(pki.crl_pem(crl))
    (d / "openssl.cnf").write_text(OPENSSL_CONF)
    return x5t


# --- backend: a minimal keep-alive HTTP/1.1 server, in its own process -------------------

BACKEND = r"""
import asyncio, sys
BODY = b"x" * 1024
RESP = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1024\r\n\r\n" + BODY
async def handle(r, w):
    buf = b""
    try:
        while True:
            data = await r.read(65536)
            if not data:
                break
            buf += data
            while b"\r\n\r\n" in buf:
                _, buf = buf.split(b"\r\n\r\n", 1)
                w.write(RESP)
            await w.drain()
    except ConnectionError:
        pass
    w.close()
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await s.serve_forever()
asyncio.run(main())
"""


# --- load generator ----------------------------------------------------------------------


def bound_token(x5t: str) -> str:
    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'RS256'})}.{b64({'sub': 'bench', 'cnf': {'x5t#S256': x5t}})}.c2ln"


async def one_conn(
    port: int, ctx: ssl.SSLContext, request: bytes, stop_at: float, lat: list[float]
) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    loop = asyncio.get_running_loop()
    n = 0
    try:
        while loop.time() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head[:200])
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            n += 1
    finally:
        writer.close()
    return n


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(port: int, pid: int, ctx: ssl.SSLContext, request: bytes, secs: float) -> dict:
    loop = asyncio.get_running_loop()
    warm: list[float] = []
    await asyncio.gather(
        *(one_conn(port, ctx, request, loop.time() + 0.5, warm) for _ in range(CONNS))
    )
    lat: list[float] = []
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    counts = await asyncio.gather(
        *(one_conn(port, ctx, request, loop.time() + secs, lat) for _ in range(CONNS))
    )
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    total = sum(counts)
    lat.sort()
    return {
        "req_per_s": round(total / elapsed),
        "p50_us": round(statistics.median(lat) * 1e6),
        "p99_us": round(lat[int(len(lat) * 0.99)] * 1e6),
        "cpu_us_per_req": round(cpu / total * 1e6, 1),
        "rss_mib": round(rss_mib(pid), 1),
    }


# --- the proxies -------------------------------------------------------------------------


# The sidecar on the standard asyncio loop (``--loop asyncio``), whatever __main__ prefers.
PLAIN_LOOP = (
    "import asyncio, sys; from kubemtls_sidecar import app, config, logs; "
    "cfg = config.parse(sys.argv[1:]); logs.setup(cfg.log_format, cfg.log_level); "
    "sys.exit(asyncio.run(app.run(cfg)))"
)


def sidecar_cmd(d: pathlib.Path, port: int, backend: int, protocol: str, loop: str) -> list[str]:
    launch = ["-m", "kubemtls_sidecar"] if loop == "default" else ["-c", PLAIN_LOOP]
    return [
        str(REPO / ".venv" / "bin" / "python"), *launch,
        "--cert-dir", str(d / "server"), "--trust-dir", str(d / "trust"),
        "--inbound", f"{port}:127.0.0.1:{backend}", "--listen-address", "127.0.0.1",
        "--admin-port", str(free_port()), "--admin-address", "127.0.0.1",
        "--protocol", protocol, "--log-level", "warning",
    ]  # fmt: skip


def haproxy_cfg(d: pathlib.Path, port: int, backend: int, mode: str) -> pathlib.Path:
    xfcc = (
        "    http-request del-header X-Forwarded-Client-Cert\n"
        "    http-request del-header Client-Cert\n"
        '    http-request set-header X-Forwarded-Client-Cert "Hash=%[ssl_c_der,sha2(256),hex]'
        ';Subject=\\"%[ssl_c_s_dn]\\""\n'
        "    http-request set-header Client-Cert :%[ssl_c_der,base64]:\n"
        if mode == "http"
        else ""
    )
    cfg = d / f"haproxy-{mode}.cfg"
    ca = d / "trust" / "ca.crt"
    cfg.write_text(
        f"""global
    nbthread 1
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256
    ssl-default-bind-options ssl-min-ver TLSv1.3
    tune.ssl.default-dh-param 2048
defaults
    mode {mode}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    {"option http-keep-alive" if mode == "http" else ""}
frontend fe
    bind 127.0.0.1:{port} ssl crt {d / "server.pem"} ca-file {ca} verify required
{xfcc}    default_backend be
backend be
    server app 127.0.0.1:{backend}
"""
    )
    return cfg


async def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited: {proc.returncode}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("proxy did not listen")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=pathlib.Path)
    ap.add_argument(
        "--loop",
        choices=("default", "asyncio"),
        default="default",
        help="default: as kubemtls-sidecar starts (uvloop if installed); asyncio: stdlib loop",
    )
    args = ap.parse_args()
    d = pathlib.Path(tempfile.mkdtemp(prefix="kmt-httpbench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        x5t = material(d)
        backend = free_port()
        procs.append(subprocess.Popen([sys.executable, "-c", BACKEND, str(backend)]))
        ctx = ssl.create_default_context(cafile=str(d / "trust" / "ca.crt"))
        ctx.load_cert_chain(d / "client" / "tls.crt", d / "client" / "tls.key")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        token = bound_token(x5t)
        request = (
            f"GET /fhir/Patient/1 HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        env = {**os.environ, "OPENSSL_CONF": str(d / "openssl.cnf"), "PYTHONPATH": ""}
        peers: dict[str, list[str]] = {}
        for protocol in ("tcp", "http"):
            peers[f"kubemtls {protocol}"] = ["sidecar", protocol]
        if shutil.which("haproxy"):
            for mode in ("tcp", "http"):
                peers[f"haproxy {mode}"] = ["haproxy", mode]
        results: dict[str, list[dict]] = {name: [] for name in peers}
        for _ in range(args.rounds):
            for name, (kind, mode) in peers.items():
                port = free_port()
                if kind == "sidecar":
                    cmd = sidecar_cmd(d, port, backend, mode, args.loop)
                else:
                    cmd = ["haproxy", "-db", "-f", str(haproxy_cfg(d, port, backend, mode))]
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
                try:
                    await wait_port(port, proc)
                    idle = rss_mib(proc.pid)
                    r = await measure(port, proc.pid, ctx, request, args.seconds)
                    r["rss_idle_mib"] = round(idle, 1)
                    results[name].append(r)
                finally:
                    proc.terminate()
                    proc.wait(timeout=10)
        print(f"{'proxy':<15} {'req/s':>8} {'p50 µs':>8} {'p99 µs':>8} {'CPU µs/req':>11} "
              f"{'RSS idle/load MiB':>18}")  # fmt: skip
        summary = {}
        for name, runs in results.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            summary[name] = med
            print(f"{name:<15} {med['req_per_s']:>8.0f} {med['p50_us']:>8.0f} "
                  f"{med['p99_us']:>8.0f} {med['cpu_us_per_req']:>11.1f} "
                  f"{med['rss_idle_mib']:>8.1f}/{med['rss_mib']:<8.1f}")  # fmt: skip
        if args.out:
            args.out.write_text(json.dumps({"runs": results, "median": summary}, indent=2))
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
