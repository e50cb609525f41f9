"""The emulated API server's CPU per request on the signing benchmark's hot paths.

Every certificate the operator signs costs the emulator (``python -m kubemtls_operator.emu``,
started through ``server.main()``) one MTLSCert status merge patch with a resourceVersion
precondition and one watch event on the operator's MTLSCert watch; the signing API's token
checks add TokenReviews and pod GETs. This script starts the emulator as its own process,
creates a namespace and ``--objects`` MTLSCerts, keeps one cluster-wide watch on mtlscerts
open (reading every event), and drives, with aiohttp from this process:

- ``patch-seq``: ``--requests`` status merge patches one after another (each with the
  object's current ``metadata.resourceVersion``, as the operator's recorder writes them);
- ``patch-conc``: as many from ``--concurrency`` workers at once (each on its own objects,
  so no 409s);
- ``get``: GETs of one MTLSCert, ``--concurrency`` at once;
- ``tokenreview``: TokenReviews of a known token, ``--concurrency`` at once.

A patch phase ends once the watch has seen every event. Reported: the emulator's CPU ms per
request (``/proc/PID/stat`` utime+stime over the phase; robust on a shared machine, unlike the
requests/s also printed), and with ``--callgrind`` its instructions per request (valgrind,
instrumented only during each phase: deterministic, so A/B comparable while others use the
cores; ~50x slower, so use ``--requests 300``). ``--variants TREE:LOOP,...`` picks what runs,
interleaved per ``--repeat``: TREE is ``.`` (this checkout) or another checkout's root (its
``operator/`` put first on PYTHONPATH, e.g. ``git archive HEAD operator sidecar | tar -x -C
/tmp/ref``), LOOP is ``uvloop``/``asyncio`` (passed as ``--loop``) or ``default`` (no flag:
for trees from before the flag).

    .venv/bin/python bench/emulator_bench.py [--requests 2000] [--concurrency 32]
        [--objects 64] [--repeat 3] [--variants .:uvloop,.:asyncio] [--callgrind]
        [--emulator-gc settled|default] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import aiohttp
import signing_bench  # the same settled emulator (bench/ is this script's sys.path[0])

REPO = pathlib.Path(__file__).resolve().parent.parent
CRD = REPO / "charts" / "kubemtls" / "crds" / "mtlscerts.yaml"
NS = "bench"
BASE = f"/apis/kubemtls.io/v1alpha1/namespaces/{NS}/mtlscerts"
TICK = os.sysconf("SC_CLK_TCK")
TOKEN = "bench-token"  # noqa: S105 - a fake token the emulator is given

_MAIN = "import sys; from kubemtls_operator.emu import server; sys.exit(server.main())"
#: As bench/signing_bench.py ran the emulator by default in session 6 (``--emulator-gc
#: settled``, the same code; it now runs it with the collector off): once a second a young
#: collection, then ``gc.freeze()``, so that full collections of its growing heap do not land
#: at random in a measured phase (under callgrind one of them is ~100k instructions per
#: request of a 300-request phase).
_SETTLED = signing_bench.EMULATOR_SETTLED


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` (all its threads)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK  # utime, stime


def mtlscert(i: int) -> dict[str, Any]:
    name = f"pod-{i:04d}"
    return {
        "apiVersion": "kubemtls.io/v1alpha1",
        "kind": "MTLSCert",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"app.kubernetes.io/managed-by": "kubemtls-operator"},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": name,
                    "uid": f"00000000-0000-0000-0000-{i:012d}",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "podName": name,
            "podUID": f"00000000-0000-0000-0000-{i:012d}",
            "serviceAccount": "app",
            "identity": f"spiffe://cluster.local/ns/{NS}/sa/app",
            "dnsNames": [f"{name}.{NS}.pod.cluster.local", f"app.{NS}.svc"],
            "duration": "24h",
            "keyType": "ecdsa-p256",
        },
    }


def status(n: int) -> dict[str, Any]:
    """A status like the recorder's (recorder.Recorder._write)."""
    stamp = "2026-11-26T08:00:00Z"
    return {
        "serial": hashlib.sha1(b"%d" % n).hexdigest(),  # noqa: S324 - a stand-in serial
        "issuer": "CN=kubemtls root CA",
        "fingerprintSHA256": hashlib.sha256(b"%d" % n).hexdigest(),
        "notBefore": stamp,
        "notAfter": "2026-11-27T08:00:00Z",
        "renewalTime": "2026-11-27T00:00:00Z",
        "lastError": "",
        "phase": "Issued",
        "rotations": n,
        "conditions": [
            {
                "type": t,
                "status": s,
                "reason": r,
                "message": f"{t} {n}",
                "lastTransitionTime": stamp,
            }
            for t, s, r in (
                ("Ready", "True", "Issued"),
                ("Expiring", "False", "Valid"),
                ("Injected", "True", "Injected"),
            )
        ],
    }


class Emulator:
    def __init__(
        self, tree: str, loop: str, tmp: pathlib.Path, callgrind: bool, gc: str = "settled"
    ) -> None:
        self.tree, self.loop, self.tmp, self.callgrind = tree, loop, tmp, callgrind
        ready = tmp / "emu.url"
        tokens = tmp / "tokens.json"
        tokens.write_text(
            json.dumps(
                {
                    TOKEN: {
                        "namespace": NS,
                        "serviceAccount": "app",
                        "podName": "pod-0000",
                        "podUID": "00000000-0000-0000-0000-000000000000",
                        "audiences": ["kubemtls"],
                    }
                }
            )
        )
        env = dict(os.environ)
        if tree != ".":
            root = pathlib.Path(tree).resolve()
            env["PYTHONPATH"] = os.pathsep.join(
                [str(root / "operator"), str(root / "sidecar"), env.get("PYTHONPATH", "")]
            )
        main = _SETTLED if gc == "settled" else _MAIN
        cmd = [sys.executable, "-c", main, "--port", "0", "--crd", str(CRD)]
        cmd += ["--tokens", str(tokens), "--ready-file", str(ready)]
        if loop != "default":
            cmd += ["--loop", loop]
        if callgrind:
            out = f"--callgrind-out-file={tmp}/cg.%p"
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", out, *cmd]
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "emu.log", "wb"),  # noqa: SIM115
        )
        deadline = time.time() + (600 if callgrind else 30)
        while not (ready.exists() and ready.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(
                    f"the emulator did not start: {(tmp / 'emu.log').read_text()[-2000:]}"
                )
            time.sleep(0.05)
        self.url = ready.read_text().strip().splitlines()[0]

    def cpu(self) -> tuple[float, float]:
        return cpu_times(self.proc.pid)

    def control(self, *flags: str) -> None:
        subprocess.run(
            ["callgrind_control", *flags, str(self.proc.pid)], check=True, capture_output=True
        )

    def instructions(self, keep: pathlib.Path | None = None) -> int:
        """Dump callgrind's counters (zeroing them); the instructions since the last zero.
        ``keep``: copy the dump there (for ``callgrind_annotate``)."""
        before = set(self.tmp.glob("cg.*"))
        self.control("-d")
        deadline = time.time() + 60
        while not (dumps := set(self.tmp.glob("cg.*")) - before):
            if time.time() > deadline:
                raise SystemExit("callgrind wrote no dump")
            time.sleep(0.1)
        time.sleep(0.2)
        dump = dumps.pop()
        if keep is not None:
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dump, keep)
        for line in dump.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
        raise SystemExit("no totals in the callgrind dump")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Bench:
    def __init__(self, emu: Emulator, session: aiohttp.ClientSession, args: Any) -> None:
        self.emu, self.s, self.args = emu, session, args
        self.rv: dict[str, str] = {}
        self.events = 0
        self.seen = asyncio.Event()
        self.want = 0
        self.n = 0
        self.label = ""

    async def call(self, method: str, path: str, body: Any = None, ctype: str = "") -> Any:
        headers = {"Content-Type": ctype or "application/json"} if body is not None else {}
        data = json.dumps(body).encode() if body is not None else None
        async with self.s.request(method, self.emu.url + path, data=data, headers=headers) as r:
            raw = await r.read()
            if r.status >= 400:
                raise SystemExit(f"{method} {path}: {r.status} {raw[:300]!r}")
            return json.loads(raw)

    async def setup(self) -> None:
        await self.call("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})
        await self.call(
            "POST",
            f"/api/v1/namespaces/{NS}/pods",
            {
                "metadata": {
                    "name": "pod-0000",
                    "namespace": NS,
                    "uid": "00000000-0000-0000-0000-000000000000",
                },
                "spec": {"serviceAccountName": "app", "containers": [{"name": "a", "image": "x"}]},
            },
        )
        for i in range(self.args.objects):
            obj = await self.call("POST", BASE, mtlscert(i))
            self.rv[obj["metadata"]["name"]] = obj["metadata"]["resourceVersion"]

    async def watch(self) -> None:
        listed = await self.call("GET", "/apis/kubemtls.io/v1alpha1/mtlscerts")
        params = {"watch": "true", "resourceVersion": listed["metadata"]["resourceVersion"]}
        params |= {"allowWatchBookmarks": "true", "timeoutSeconds": "3600"}
        url = self.emu.url + "/apis/kubemtls.io/v1alpha1/mtlscerts"
        timeout = aiohttp.ClientTimeout(total=None)
        async with self.s.get(url, params=params, timeout=timeout) as rsp:
            rest = b""
            async for chunk in rsp.content.iter_any():
                *lines, rest = (rest + chunk).split(b"\n")
                for line in lines:
                    if line:
                        json.loads(line)
                        self.events += 1
                if self.events >= self.want:
                    self.seen.set()

    async def patch(self, name: str) -> None:
        self.n += 1
        body = {"metadata": {"resourceVersion": self.rv[name]}, "status": status(self.n)}
        obj = await self.call(
            "PATCH", f"{BASE}/{name}/status", body, "application/merge-patch+json"
        )
        self.rv[name] = obj["metadata"]["resourceVersion"]

    async def phase(self, kind: str, requests: int, measure: bool = True) -> dict[str, float]:
        names = sorted(self.rv)
        conc = 1 if kind == "patch-seq" else self.args.concurrency
        if kind.startswith("patch"):
            self.want = self.events + requests
            self.seen.clear()

        async def worker(w: int) -> None:
            mine = names[w::conc] or names
            for i in range(w, requests, conc):
                if kind.startswith("patch"):
                    await self.patch(mine[(i // conc) % len(mine)])
                elif kind == "get":
                    await self.call("GET", f"{BASE}/{names[0]}")
                else:
                    review = {
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenReview",
                        "spec": {"token": TOKEN, "audiences": ["kubemtls"]},
                    }
                    out = await self.call(
                        "POST", "/apis/authentication.k8s.io/v1/tokenreviews", review
                    )
                    assert out["status"].get("authenticated"), out

        if self.emu.callgrind and measure:
            self.emu.control("-i", "on")
            self.emu.control("-z")
        cpu0, t0 = self.emu.cpu(), time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(conc)))
        if kind.startswith("patch"):
            await asyncio.wait_for(self.seen.wait(), 600 if self.emu.callgrind else 30)
        wall, (user, system) = time.perf_counter() - t0, self.emu.cpu()
        user, system = user - cpu0[0], system - cpu0[1]
        out = {
            "cpu_ms_per_req": (user + system) / requests * 1000,
            "sys_share": system / max(user + system, 1e-9),
            "req_per_s": requests / wall,
        }
        if self.emu.callgrind and measure:
            keep = self.args.keep and pathlib.Path(self.args.keep) / f"{self.label}.{kind}.cg"
            out["kinstr_per_req"] = self.emu.instructions(keep or None) / requests / 1000
            self.emu.control("-i", "off")
        return out


async def run_variant(tree: str, loop: str, args: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="emubench-") as tmp:
        emu = Emulator(tree, loop, pathlib.Path(tmp), args.callgrind, args.emulator_gc)
        try:
            conn = aiohttp.TCPConnector(limit=args.concurrency + 4)
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
                b = Bench(emu, s, args)
                b.label = f"{pathlib.Path(tree).name or 'cur'}-{loop}-{time.strftime('%H%M%S')}"
                await b.setup()
                watcher = asyncio.create_task(b.watch())
                await asyncio.sleep(0.2)
                await b.phase("patch-conc", min(args.requests, 500), measure=False)  # warm-up
                out = {
                    kind: await b.phase(kind, args.requests)
                    for kind in ("patch-seq", "patch-conc", "get", "tokenreview")
                }
                watcher.cancel()
                return out
        finally:
            emu.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per phase")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--objects", type=int, default=64, help="MTLSCerts patched round-robin")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", default=".:uvloop,.:asyncio", help="TREE:LOOP,...")
    ap.add_argument(
        "--emulator-gc",
        choices=("settled", "default"),
        default="settled",
        help="settled: as signing_bench.py runs it (young collection + gc.freeze() each second)",
    )
    ap.add_argument("--callgrind", action="store_true", help="also count instructions (valgrind)")
    ap.add_argument("--keep", help="with --callgrind: keep each phase's dump in this directory")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    variants = [tuple(v.rsplit(":", 1)) for v in args.variants.split(",") if v]
    runs: dict[str, list[dict[str, Any]]] = {f"{t}:{lp}": [] for t, lp in variants}
    for r in range(args.repeat):
        for tree, loop in variants:
            res = asyncio.run(run_variant(tree, loop, args))
            runs[f"{tree}:{loop}"].append(res)
            cells = "  ".join(f"{k} {v['cpu_ms_per_req']:.3f}" for k, v in res.items())
            print(f"run {r + 1} {tree}:{loop:8} cpu ms/req: {cells}", flush=True)
            if args.callgrind:
                cells = "  ".join(f"{k} {v['kinstr_per_req']:.0f}" for k, v in res.items())
                print(f"run {r + 1} {tree}:{loop:8} kinstr/req: {cells}", flush=True)
    kinds = ("patch-seq", "patch-conc", "get", "tokenreview")
    measures = ["cpu_ms_per_req"] + (["kinstr_per_req"] if args.callgrind else [])
    summary: dict[str, Any] = {name: {} for name in runs}
    for measure in measures:
        print(f"\nemulator {measure} (median of runs; min-max)")
        print(f"{'variant':40} " + " ".join(f"{k:>22}" for k in kinds))
        for name, rs in runs.items():
            row = summary[name]
            for k in kinds:
                xs = [x[k][measure] for x in rs]
                row.setdefault(
                    k,
                    {
                        "req_per_s": [round(x[k]["req_per_s"]) for x in rs],
                        "sys_share": [round(x[k]["sys_share"], 2) for x in rs],
                    },
                )
                row[k][measure] = {
                    "median": round(statistics.median(xs), 4),
                    "min": round(min(xs), 4),
                    "max": round(max(xs), 4),
                    "runs": [round(x, 4) for x in xs],
                }
            fmt = (
                "{:>8.3f} ({:.3f}-{:.3f})"
                if measure == "cpu_ms_per_req"
                else "{:>8.0f} ({:.0f}-{:.0f})"
            )
            cells = " ".join(
                f"{fmt.format(*(row[k][measure][m] for m in ('median', 'min', 'max'))):>22}"
                for k in kinds
            )
            print(f"{name:40} {cells}")
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "objects": args.objects,
        "emulator_gc": args.emulator_gc,
        "variants": summary,
    }
    print(json.dumps(result))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
