"""``kubemtls``: the user's command line.

- ``kubemtls demo`` runs the whole system on this machine against an emulated API server
  (see ``kubemtls_operator.demo``) and exits 0 when every scene passed.
- ``kubemtls inspect FILE`` prints the facts of the certificates in a PEM file (serial,
  identity, validity, thumbprints) — what you need when an EHR vendor asks "which
  certificate did you present?".
"""

from __future__ import annotations

import argparse
import json
import pathlib
import signal
import sys
from typing import Any

from kubemtls_sidecar import certs

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    try:
        from kubemtls_operator.demo import script
    except ImportError as e:  # the demo's libraries are the kubemtls[demo] extra
        print(f"kubemtls demo needs the demo extra: pip install 'kubemtls[demo]' ({e})",
              file=sys.stderr)  # fmt: skip
        return 2
    # Ctrl-C and SIGTERM both end in the demo's cleanup (also when started in the background,
    # where the shell leaves SIGINT ignored).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    options = script.Options(
        use_netns=not args.no_netns, keep_running=args.keep_running, workdir=args.workdir
    )
    result = script.run(options)
    if args.json:
        print(json.dumps(_result_json(result), indent=2))
    return 0 if result.ok and not result.leftovers else 1


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _result_json(result: Any) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "mode": result.mode,
        "seconds": round(result.seconds, 1),
        "leftovers": result.leftovers,
        "scenes": [
            {"name": s.name, "status": s.status, "summary": s.summary, "data": s.data}
            for s in result.scenes
        ],
    }


def _inspect(args: argparse.Namespace) -> int:
    try:
        data = pathlib.Path(args.file).read_bytes()
        chain = certs.load_pem_certificates(data)
    except (OSError, ValueError) as e:
        print(f"kubemtls inspect: {args.file}: {e}", file=sys.stderr)
        return 2
    if not chain:
        print(f"kubemtls inspect: {args.file}: no PEM certificate in it", file=sys.stderr)
        return 2
    for i, cert in enumerate(chain):
        f = certs.facts(cert)
        if i:
            print()
        rows = [
            ("subject", f.subject),
            ("issuer", f.issuer),
            ("serial", f.serial),
            ("identity", f.spiffe_id or "-"),
            ("dns names", ", ".join(f.dns_names) or "-"),
            ("ip addresses", ", ".join(f.ip_addresses) or "-"),
            ("not before", f.not_before.isoformat()),
            ("not after", f.not_after.isoformat()),
            ("ca", "yes" if f.is_ca else "no"),
            ("usage", ", ".join(u for u, on in (("clientAuth", f.client_auth),
                                                ("serverAuth", f.server_auth)) if on) or "-"),
            ("sha256", f.fingerprint_sha256),
            ("x5t#S256", f.x5t_s256),
        ]  # fmt: skip
        for name, value in rows:
            print(f"{name + ':':<14}{value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubemtls", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run the operator, webhook, sidecars and a mock FHIR EHR on this machine",
        description="Run kubemtls end to end on this machine: an emulated API server, the "
        "operator and its webhook, two pods with sidecars (network namespaces when root), and "
        "a mock EHR that speaks FHIR R4 over mutual TLS. Exits 0 when every scene passed.",
    )
    demo.add_argument("--keep-running", action="store_true",
                      help="leave everything up after the scenes, until Ctrl-C")  # fmt: skip
    demo.add_argument(
        "--no-netns",
        action="store_true",
        help="run pods on loopback with remapped ports (the default without root)",
    )
    demo.add_argument("--workdir", type=pathlib.Path,
                      help="keep logs, kubeconfig and pod files here (default: a temp dir, "
                      "removed at the end)")  # fmt: skip
    demo.add_argument("--json", action="store_true", help="also print the results as JSON")
    demo.set_defaults(func=_demo)
    inspect = sub.add_parser("inspect", help="print the facts of the certificates in a PEM file")
    inspect.add_argument("file", help="a PEM file (tls.crt, a chain, ca.crt)")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
