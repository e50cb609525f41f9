"""Idle memory of one sidecar process: RSS, PSS and USS from ``/proc/PID/smaps_rollup``.

One sidecar runs per pod, so its idle footprint is what a cluster pays most. Cases:
``file`` (``--cert-dir``, the material on disk) and ``signer`` (``--signer``: a small
in-process signing API issues the certificate, so the sidecar has generated its key and
loaded the signer client), each with uvloop and with the stdlib loop. Each sidecar has one
``--inbound`` and one ``--outbound`` port, is waited on until ``/readyz`` is 200, serves one
mTLS connection and one ``/metrics`` scrape (what a running pod has done), then settles.

RSS counts every resident page, shared library pages included; PSS divides shared pages
by the number of processes that map them; USS (Private_Clean + Private_Dirty) is what the
process alone costs, i.e. what one more pod adds on a node whose image pages are already
cached (the container memory limit counts the process's anonymous pages plus the page cache
it touched).

    .venv/bin/python bench/sidecar_memory.py [--settle 3] [--protocol tcp|http]

It also prints what each import adds to a fresh interpreter (USS and RSS, in the order the
sidecar loads them), which is where the idle footprint comes from, and what validating new
material now costs: the resident sidecar never imports ``cryptography`` (~10 MiB RSS); a
reload or a key starts the short-lived ``vet`` child (``kubemtls_sidecar.vetted``), and the
last table is its wall time and CPU (parent and child) per question.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import socket
import ssl
import sys
import tempfile

from aiohttp import web
from kubemtls_operator import pki
from kubemtls_sidecar import certs

REPO = pathlib.Path(__file__).resolve().parent.parent
SPIFFE_NS, SPIFFE_SA = "bench", "app"
DAY = datetime.timedelta(hours=24)
NO_UVLOOP = "import sys; sys.modules['uvloop'] = None; from kubemtls_sidecar import __main__ as m; "
NO_UVLOOP += "sys.exit(m.main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def smaps(pid: int) -> dict[str, float]:
    """smaps_rollup in MiB: rss, pss, uss (private), shared, anon."""
    kb: dict[str, int] = {}
    for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        kb[key] = int(rest.split()[0])
    mib = 1024.0
    return {
        "rss": kb["Rss"] / mib,
        "pss": kb["Pss"] / mib,
        "uss": (kb["Private_Clean"] + kb["Private_Dirty"]) / mib,
        "shared": (kb["Shared_Clean"] + kb["Shared_Dirty"]) / mib,
        "anon": kb["Anonymous"] / mib,
    }


def leaf_files(ca: pki.CA, where: pathlib.Path, name: str) -> pathlib.Path:
    key = pki.generate_key("ecdsa-p256")
    ident = pki.LeafIdentity(
        certs.spiffe_id("cluster.local", SPIFFE_NS, SPIFFE_SA), name, SPIFFE_NS, ("localhost",), ()
    )
    cert = pki.issue_leaf(ca, key.public_key(), ident, now=now(), lifetime=DAY)
    where.mkdir(parents=True, exist_ok=True)
    (where / "tls.crt").write_bytes(pki.chain_pem(cert, ca))
    (where / "tls.key").write_bytes(pki.key_pem(key))
    return where


async def start_signer(ca: pki.CA, tmp: pathlib.Path) -> tuple[str, web.AppRunner]:
    """A minimal signing API (DESIGN.md) issuing from ``ca`` over HTTPS on 127.0.0.1."""

    def crl() -> str:
        return pki.crl_pem(pki.build_crl(ca, [], now=now(), number=1)).decode()

    def stamp(t: datetime.datetime) -> str:
        return t.strftime("%Y-%m-%dT%H:%M:%SZ")

    async def sign(request: web.Request) -> web.Response:
        body = await request.json()
        ident = pki.LeafIdentity(
            certs.spiffe_id("cluster.local", SPIFFE_NS, SPIFFE_SA),
            "app-0",
            SPIFFE_NS,
            ("localhost",),
            (),
        )
        leaf = pki.issue_leaf(
            ca, pki.load_csr(body["csr"].encode()), ident, now=now(), lifetime=DAY
        )
        return web.json_response(
            {
                "certificateChain": pki.chain_pem(leaf, ca).decode(),
                "trustBundle": pki.trust_bundle([ca.anchor]).decode(),
                "crl": crl(),
                "notAfter": stamp(leaf.not_valid_after_utc),
                "renewAt": stamp(now() + datetime.timedelta(hours=12)),
            }
        )

    async def trust(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "trustBundle": pki.trust_bundle([ca.anchor]).decode(),
                "crl": crl(),
                "renewAt": stamp(now() + datetime.timedelta(hours=12)),
                "rekey": False,
            }
        )

    cert, key = pki.issue_serving_cert(
        ca, dns_names=["signer"], ip_addresses=["127.0.0.1"], now=now()
    )
    (tmp / "signer.crt").write_bytes(pki.cert_pem(cert))
    (tmp / "signer.key").write_bytes(pki.key_pem(key))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "signer.crt", tmp / "signer.key")
    app = web.Application()
    app.router.add_post("/v1/certificates", sign)
    app.router.add_get("/v1/trust", trust)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    return f"https://127.0.0.1:{port}", runner


async def http_get(port: int, path: str) -> int:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0


async def echo_server() -> tuple[asyncio.Server, int]:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def measure(
    mode: str, loop: str, protocol: str, settle: float, ca: pki.CA, tmp: pathlib.Path, signer: str
) -> dict[str, object]:
    case = tmp / f"{mode}-{loop}"
    trust = case / "trust"
    trust.mkdir(parents=True)
    (trust / "ca.crt").write_bytes(pki.trust_bundle([ca.anchor]))
    (trust / "crl.pem").write_bytes(pki.crl_pem(pki.build_crl(ca, [], now=now(), number=1)))
    app, app_port = await echo_server()
    inbound, admin = free_port(), free_port()
    args = [
        "--trust-dir", str(trust), "--inbound", f"{inbound}:127.0.0.1:{app_port}",
        "--outbound", f"{free_port()}=localhost:{inbound}", "--admin-port", str(admin),
        "--admin-address", "127.0.0.1", "--listen-address", "127.0.0.1",
        "--protocol", protocol, "--log-level", "warning",
    ]  # fmt: skip
    if mode == "file":
        args += ["--cert-dir", str(leaf_files(ca, case / "certs", "app-0"))]
    else:
        (case / "token").write_text("bench-token")
        args += ["--signer", signer, "--token-file", str(case / "token")]
    head = [sys.executable, "-m", "kubemtls_sidecar"]
    if loop == "asyncio":
        head = [sys.executable, "-c", NO_UVLOOP]
    proc = await asyncio.create_subprocess_exec(*head, *args, cwd=tmp)
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while await http_get(admin, "/readyz") != 200:
            if proc.returncode is not None or asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{mode}/{loop}: the sidecar did not become ready")
            await asyncio.sleep(0.05)
        client = leaf_files(ca, case / "client", "client-0")
        ctx = ssl.create_default_context(cafile=str(trust / "ca.crt"))
        ctx.load_cert_chain(client / "tls.crt", client / "tls.key")
        r, w = await asyncio.open_connection(
            "127.0.0.1", inbound, ssl=ctx, server_hostname="localhost"
        )
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" if protocol == "http" else b"ping")
        await w.drain()
        if protocol == "tcp":
            await r.readexactly(4)
        w.close()
        await http_get(admin, "/metrics")
        await asyncio.sleep(settle)
        figures = smaps(proc.pid)
    finally:
        proc.terminate()
        await proc.wait()
        app.close()
    return {
        "mode": mode,
        "loop": loop,
        "protocol": protocol,
        **{k: round(v, 1) for k, v in figures.items()},
    }


#: Imported one after the other in a fresh interpreter; each row is what that step adds.
IMPORT_STEPS = (
    "asyncio",  # with ssl, so OpenSSL's libraries and their initialisation
    "argparse,dataclasses,ipaddress,pathlib,json,logging",
    "h11",
    "kubemtls_sidecar.promtext",  # prometheus-client's metrics + registry, no exposition
    "uvloop",
    "kubemtls_sidecar.app",
    "kubemtls_sidecar.identity",  # --signer only
    "kubemtls_sidecar.httpmode",  # --protocol http only
    "cryptography.x509,cryptography.hazmat.primitives.serialization",  # the vet child only
)
_IMPORT_PROBE = """
import importlib, json, sys
def mem():
    kb = {}
    for line in open('/proc/self/smaps_rollup').read().splitlines()[1:]:
        k, _, v = line.partition(':')
        kb[k] = int(v.split()[0])
    return (kb['Private_Clean'] + kb['Private_Dirty']) / 1024, kb['Rss'] / 1024
rows, prev = [], mem()
rows.append(('python', prev[0], prev[1]))
for step in sys.argv[1:]:
    for name in step.split(','):
        importlib.import_module(name)
    now = mem()
    rows.append((step, now[0] - prev[0], now[1] - prev[1]))
    prev = now
print(json.dumps(rows))
"""


def import_costs() -> list[tuple[str, float, float]]:
    """(step, +USS MiB, +RSS MiB) for ``IMPORT_STEPS`` in a fresh interpreter."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, *IMPORT_STEPS],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    return [tuple(r) for r in json.loads(out)]  # type: ignore[misc]


async def reload_cost(ca: pki.CA, rounds: int = 5) -> list[dict[str, object]]:
    """Wall seconds and CPU seconds (this process, the children) per vetting question."""
    import resource
    import time

    from kubemtls_sidecar import vetted

    leaf_dir = leaf_files(ca, pathlib.Path(tempfile.mkdtemp(prefix="kmt-vet-")), "app-0")
    crl = pki.crl_pem(pki.build_crl(ca, [], now=now(), number=1))
    trust = pki.trust_bundle([ca.anchor])
    chain, key = (leaf_dir / "tls.crt").read_bytes(), (leaf_dir / "tls.key").read_bytes()
    cases = {
        "certificate (file reload)": {
            "chain_pem": chain, "key_pem": key, "current_trust_pem": trust,
        },
        "trust + CRL (file reload)": {"trust_pem": trust, "crl_pem": crl, "our_chain_pem": chain},
        "trust + CRL + certificate (start)": {
            "trust_pem": trust, "crl_pem": crl, "chain_pem": chain, "key_pem": key,
        },
    }  # fmt: skip
    rows = []
    for name, req in [*cases.items(), ("key + CSR (signer mode)", None)]:
        wall = cpu_self = cpu_child = 0.0
        for _ in range(rounds):
            s0, c0 = (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN),
            )
            t0 = time.perf_counter()
            if req is None:
                answer = await vetted.call("keygen", {"key_type": "ecdsa-p256"})
            else:
                text = {k: v.decode("latin-1") for k, v in req.items()}
                answer = await vetted.call("material", text)
            wall += time.perf_counter() - t0
            s1, c1 = (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN),
            )
            cpu_self += s1.ru_utime + s1.ru_stime - s0.ru_utime - s0.ru_stime
            cpu_child += c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
            assert "error" not in json.dumps(answer), answer
        rows.append(
            {
                "case": name,
                "wall_ms": round(1000 * wall / rounds, 1),
                "cpu_parent_ms": round(1000 * cpu_self / rounds, 1),
                "cpu_child_ms": round(1000 * cpu_child / rounds, 1),
            }
        )
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settle", type=float, default=3.0, help="seconds idle before measuring")
    ap.add_argument("--protocol", choices=("tcp", "http"), default="tcp")
    ap.add_argument("--out", type=pathlib.Path, help="also write the JSON here")
    opts = ap.parse_args()
    ca = pki.bootstrap_ca(now=now(), common_name="bench root")
    with tempfile.TemporaryDirectory(prefix="kmt-mem-") as d:
        tmp = pathlib.Path(d)
        signer, runner = await start_signer(ca, tmp)
        try:
            rows = []
            for mode in ("file", "signer"):
                for loop in ("uvloop", "asyncio"):
                    rows.append(
                        await measure(mode, loop, opts.protocol, opts.settle, ca, tmp, signer)
                    )
        finally:
            await runner.cleanup()
    print(f"{'mode':<8}{'loop':<9}{'RSS':>7}{'PSS':>7}{'USS':>7}{'shared':>8}{'anon':>7}  (MiB)")
    for r in rows:
        print(
            f"{r['mode']:<8}{r['loop']:<9}{r['rss']:>7}{r['pss']:>7}{r['uss']:>7}"
            f"{r['shared']:>8}{r['anon']:>7}"
        )
    costs = import_costs()
    print(f"\n{'import step':<66}{'+USS':>6}{'+RSS':>6}  (MiB)")
    for step, uss, rss in costs:
        print(f"{step:<66}{uss:>6.1f}{rss:>6.1f}")
    vetting = await reload_cost(ca)
    print(f"\n{'vetting one question (mean of 5)':<40}{'wall':>8}{'CPU':>8}{'child CPU':>11}  (ms)")
    for v in vetting:
        print(f"{v['case']:<40}{v['wall_ms']:>8}{v['cpu_parent_ms']:>8}{v['cpu_child_ms']:>11}")
    doc = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "rows": rows,
        "imports": [{"step": s, "uss": round(u, 2), "rss": round(r, 2)} for s, u, r in costs],
        "vetting": vetting,
    }
    print(json.dumps(doc))
    if opts.out:
        opts.out.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
