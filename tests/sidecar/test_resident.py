"""The long-running sidecar never loads ``cryptography`` (issue 5: idle RSS ≤ 30 MiB).

``cryptography`` is ~10 MiB of resident memory; validating new material and making keys
happens in the short-lived ``vet`` child instead (``vetted``). These tests start the real
sidecar as its own process and read ``/proc/PID/maps``: no ``cryptography`` after start,
after a certificate swap (SIGHUP), after a refused broken swap, after serving a
connection and a refused handshake (the refusal log reads the peer's certificate with
``der``). Signer mode: ``test_identity.py::test_signer_mode_never_loads_cryptography``.

The same run is started with ``PYTHONPROFILEIMPORTTIME`` (``-X importtime``): pure-Python
modules leave no trace in the maps, so its stderr lists every module the sidecar imported
over that life, and none of ``LEFT_OUT`` may be among them (prometheus-client's HTTP
exposition stack, which ``promtext`` avoids; shutil and _strptime, ~0.5 MiB together).
"""

from __future__ import annotations

import asyncio
import signal
import ssl

import pytest
from cryptography.hazmat.primitives import serialization
from dataplane import (
    Files,
    admin_get,
    client_context,
    cryptography_mapped,
    sidecar_process,
)
from kubemtls_operator import pki
from kubemtls_sidecar import der, promtext, vetted
from testkit import TestPKI, eventually, free_port, utcnow

#: Modules the long-running sidecar does without (issue 5: idle RSS).
LEFT_OUT = (*promtext.HTTP_STACK, "shutil", "_strptime")


def imported(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines ("import time: self | cumulative | name")."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


async def test_file_mode_never_loads_cryptography(
    files: Files, echo_port: int, other_pki: TestPKI, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # the sidecar lists what it imports
    port, admin = free_port(), free_port()
    args = [
        "--cert-dir", str(files.cert_dir), "--trust-dir", str(files.trust_dir),
        "--inbound", f"{port}:127.0.0.1:{echo_port}", "--listen-address", "127.0.0.1",
        "--reload-interval", "3600",
    ]  # fmt: skip
    async with sidecar_process(args, admin) as proc:
        assert cryptography_mapped(proc.pid) == []

        async def serial() -> str:
            _, body = await admin_get(admin, "/metrics")
            line = next(
                x for x in body.splitlines() if x.startswith("kubemtls_sidecar_certificate_info{")
            )
            return line.split('serial="')[1].split('"')[0]

        async def serial_is(want: str) -> bool:
            return await serial() == want

        # A new certificate, validated in a child: served, and still nothing mapped.
        new = files.pki.leaf("app", "server", name="swapped")
        new.write(files.cert_dir)
        proc.send_signal(signal.SIGHUP)
        want = f"{new.cert.serial_number:x}"
        await eventually(lambda: serial_is(want), timeout=20)  # the swap is served

        # A broken one (the key of another certificate) is refused, the swap kept.
        (files.cert_dir / "tls.key").write_bytes(files.pki.leaf().key_pem)
        proc.send_signal(signal.SIGHUP)

        async def refused() -> bool:
            _, body = await admin_get(admin, "/metrics")
            return 'kubemtls_sidecar_reload_failures_total{kind="cert"' in body

        await eventually(refused, timeout=20)  # the broken certificate is refused
        assert await serial() == want

        # A connection served, and one refused (unknown CA: the log reads its certificate).
        ctx = client_context(files.pki.leaf("billing", "api"), files.trust_dir, tmp_path)
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        w.close()
        stranger = client_context(other_pki.leaf("x", "y"), files.trust_dir, tmp_path)
        try:
            r, w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=stranger, server_hostname="localhost"
            )
            w.write(b"ping")
            await r.read()
            w.close()
        except (ssl.SSLError, ConnectionError):
            pass
        assert cryptography_mapped(proc.pid) == []
    loaded = imported(capsys.readouterr().out)  # stop_sidecar printed the sidecar's stderr
    assert {"kubemtls_sidecar.promtext", "prometheus_client.values", "h11"} <= loaded
    assert sorted(loaded.intersection(LEFT_OUT)) == []


# --- the vetting child, asked as the sidecar asks it --------------------------------------


def _text(**parts: bytes | None) -> dict[str, str | None]:
    return {k: v.decode("latin-1") if v else None for k, v in parts.items()}


async def test_the_vetting_child_keeps_the_newest_crl_and_refuses_with_reasons(
    test_pki: TestPKI, other_pki: TestPKI
) -> None:
    now = utcnow()
    ca = test_pki.ca
    trust = pki.trust_bundle([ca.anchor])
    leaf = test_pki.leaf()
    revoked = pki.RevokedEntry(leaf.cert.serial_number, "keyCompromise", now)
    newer = pki.crl_pem(pki.build_crl(ca, [revoked], now=now, number=7))
    older = pki.crl_pem(pki.build_crl(ca, [], now=now, number=3))
    forged = pki.crl_pem(pki.build_crl(other_pki.ca, [], now=now, number=99))
    async with vetted.Session() as vs:  # one child answers every question below
        first = await vs.ask("material", _text(trust_pem=trust, crl_pem=newer))
        state = vetted.CrlState.from_json(vetted.check(first["trust"])["crls"])
        assert state.revoked(der.parse(leaf.cert.public_bytes(serialization.Encoding.DER)))
        assert state.fresh(now)
        # an older CRL (and a forged one) never replace the newer one already known
        again = await vs.ask(
            "material", _text(trust_pem=trust, crl_pem=older + forged, known_crl_pem=state.pem())
        )
        assert vetted.CrlState.from_json(again["trust"]["crls"]).pem() == state.pem()
        # a certificate checked against the current trust: good, wrong key, foreign CA
        good = await vs.ask(
            "material",
            _text(chain_pem=leaf.chain_pem, key_pem=leaf.key_pem, current_trust_pem=trust),
        )
        assert good["cert"] == {"ok": True}
        wrong = await vs.ask(
            "material",
            _text(
                chain_pem=leaf.chain_pem, key_pem=test_pki.leaf().key_pem, current_trust_pem=trust
            ),
        )
        assert wrong["cert"]["type"] == "MaterialError"
        assert "does not match" in wrong["cert"]["error"]
        stranger = other_pki.leaf()
        foreign = await vs.ask(
            "material",
            _text(chain_pem=stranger.chain_pem, key_pem=stranger.key_pem, current_trust_pem=trust),
        )
        assert "does not chain" in foreign["cert"]["error"]
        empty = await vs.ask("material", _text(trust_pem=b"no certificates here"))
        with pytest.raises(vetted.MaterialError, match="no PEM certificate"):
            vetted.check(empty["trust"])
        key = await vs.ask("keygen", {"key_type": "rsa-2048"})
        assert key["description"] == "rsa-2048"
        assert "PRIVATE KEY" in key["key_pem"]
        with pytest.raises(vetted.MaterialError, match="unknown command") as info:
            vetted.check(await vs.ask("nonsense", {}))
        assert info.value.kind == "VetFailed"
