"""How many leaves the PKI core issues per second on one core, and what Python costs.

One leaf is what the signing API does per request once the token is checked: load the
CSR PEM and verify its signature (``pki.load_csr``), build the identity, sign
(``pki.issue_leaf``) and serialise the leaf to PEM. The CA is ECDSA P-256; the CSRs are
ECDSA P-256 and RSA-2048.

The baseline is the unavoidable cryptography measured the same way: one CSR signature
verification (the CSR's own algorithm, over CSR-sized data) plus one CA signature over
TBS-sized data, through ``cryptography``'s lowest-level calls. ``python overhead`` is
the share of a leaf's time spent outside those two operations (parsing, building
extensions, DER/PEM encoding, our checks). Target: >= 2,000 P-256 leaves/s and a Python
overhead below 50%.

The machine may be shared: every figure is the best of ``--repeat`` runs, and the
ratio is what to compare across machines.

    .venv/bin/python bench/pki_bench.py [--seconds 1.5] [--repeat 5] [--cpu N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from kubemtls_operator import pki
from kubemtls_sidecar import certs

LIFETIME = datetime.timedelta(hours=24)


def rate(fn: Callable[[int], None], seconds: float, repeat: int) -> tuple[float, float]:
    """(best, median) operations per second of ``fn(i)`` over ``repeat`` timed runs."""
    rates = []
    for _ in range(repeat):
        n = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for _ in range(50):
                fn(n)
                n += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        rates.append(n / (now - start))
    return max(rates), statistics.median(rates)


def make_csrs(kind: str, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if kind == "ecdsa-p256":
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pod-{i}")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(
            key, hashes.SHA256()
        )
        out.append(csr.public_bytes(serialization.Encoding.PEM))
    return out


def bench(kind: str, ca: pki.CA, seconds: float, repeat: int) -> dict[str, object]:
    csr_pems = make_csrs(kind, 64 if kind == "ecdsa-p256" else 8)
    csrs = [x509.load_pem_x509_csr(p) for p in csr_pems]
    now = datetime.datetime.now(datetime.UTC)

    def identity(i: int) -> pki.LeafIdentity:
        return pki.LeafIdentity(
            spiffe_id=certs.spiffe_id("cluster.local", "ehr", "fhir-client"),
            common_name=f"fhir-client-{i}",
            organizational_unit="ehr",
            dns_names=("fhir-client.ehr.svc",),
        )

    def full(i: int) -> None:
        csr = pki.load_csr(csr_pems[i % len(csr_pems)])
        leaf = pki.issue_leaf(ca, csr, identity(i), now=now, lifetime=LIFETIME)
        leaf.public_bytes(serialization.Encoding.PEM)

    # The baseline's inputs: the real TBS and CSR bytes, so sizes match exactly.
    sample = pki.issue_leaf(ca, csrs[0], identity(0), now=now, lifetime=LIFETIME)
    tbs = sample.tbs_certificate_bytes
    csr_parts = [
        (c.public_key(), c.signature, c.tbs_certrequest_bytes) for c in csrs
    ]
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    ca_key = ca.key
    ecdsa_sha256 = ec.ECDSA(hashes.SHA256())
    pkcs1v15 = padding.PKCS1v15()
    sha256 = hashes.SHA256()

    def verify_csr(i: int) -> None:
        key, sig, data = csr_parts[i % len(csr_parts)]
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, data, ecdsa_sha256)
        else:
            assert isinstance(key, rsa.RSAPublicKey)
            key.verify(sig, data, pkcs1v15, sha256)

    def sign_tbs(_: int) -> None:
        ca_key.sign(tbs, ecdsa_sha256)

    def raw(i: int) -> None:
        verify_csr(i)
        sign_tbs(i)

    stages: dict[str, Callable[[int], None]] = {
        "full leaf (load_csr + issue_leaf + PEM)": full,
        "raw crypto (CSR verify + CA sign)": raw,
        "  raw CA sign only": sign_tbs,
        "  load_csr only": lambda i: pki.load_csr(csr_pems[i % len(csr_pems)]) and None,
        "  issue_leaf only": lambda i: pki.issue_leaf(
            ca, csrs[i % len(csrs)], identity(i), now=now, lifetime=LIFETIME
        ) and None,
    }
    results = {name: rate(fn, seconds, repeat) for name, fn in stages.items()}
    full_best = results["full leaf (load_csr + issue_leaf + PEM)"][0]
    raw_best = results["raw crypto (CSR verify + CA sign)"][0]
    return {
        "csr_key": kind,
        "ca_key": "ecdsa-p256",
        "tbs_bytes": len(tbs),
        "rates_per_s": {k: {"best": round(b), "median": round(m)} for k, (b, m) in results.items()},
        "leaves_per_s": round(full_best),
        "raw_crypto_per_s": round(raw_best),
        "python_overhead": round(1 - full_best / raw_best, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="per timed run (1.5)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per stage (5)")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: one)")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else cpus[-1]
    os.sched_setaffinity(0, {cpu})

    ca = pki.bootstrap_ca(now=datetime.datetime.now(datetime.UTC))
    report = {
        "cpu": cpu,
        "python": sys.version.split()[0],
        "cryptography": __import__("cryptography").__version__,
        "openssl": __import__("ssl").OPENSSL_VERSION,
        "load_avg": os.getloadavg(),
        "runs": [bench(kind, ca, args.seconds, args.repeat) for kind in ("ecdsa-p256", "rsa-2048")],
    }
    for run in report["runs"]:  # type: ignore[attr-defined]
        print(f"\nCSR {run['csr_key']}, CA {run['ca_key']} (TBS {run['tbs_bytes']} bytes)")
        print(f"  {'stage':44} {'best/s':>9} {'median/s':>9}")
        for stage, r in run["rates_per_s"].items():
            print(f"  {stage:44} {r['best']:>9,} {r['median']:>9,}")
        print(
            f"  => {run['leaves_per_s']:,} leaves/s; python overhead "
            f"{run['python_overhead']:.0%} of a leaf's time"
        )
    print()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
