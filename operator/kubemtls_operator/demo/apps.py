"""The programs that run as the demo pods' application containers, and the demo's probe.

``fhir-client`` is the app of the ``ehr-client`` pod: a SMART on FHIR client (``fhirclient``)
that reads ``Patient/123`` from ``$FHIR_BASE_URL`` (the sidecar's plain outbound port) over
and over. Not one line of it knows about TLS: the sidecar does all of that. Each request is
printed as one JSON line on stdout, which is how the demo counts requests and failures.

``hello`` is the app of the ``peer-api`` pod: a tiny HTTP server on 127.0.0.1 that answers
with the client identity the sidecar forwarded (X-Forwarded-Client-Cert in http mode).

``get`` is one request, printed as a JSON line: the demo runs it inside a pod's network
namespace to show what happens without the sidecar (a direct HTTPS request to the EHR with
no client certificate), and as the job that uses a file-based identity.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from typing import Any

__all__ = ["main"]


def _line(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def fhir_client(base_url: str, interval: float) -> int:
    """Read Patient/123 forever through fhirclient; one JSON line per request."""
    from fhirclient import client
    from fhirclient.models import patient

    seen: dict[str, str] = {}

    def remember(response: Any, *_: Any, **__: Any) -> None:
        seen["identity"] = response.headers.get("X-Client-Identity", "")
        seen["serial"] = response.headers.get("X-Client-Serial", "")

    smart = client.FHIRClient(settings={"app_id": "kubemtls-demo", "api_base": base_url})
    smart.server.session.hooks["response"].append(remember)
    ready = False
    while True:
        started = time.monotonic()
        try:
            if not ready:
                smart.prepare()  # reads /metadata (CapabilityStatement), as SMART apps do
                ready = True
            record = patient.Patient.read("123", smart.server)
            name = record.name[0]
            _line(
                ok=True,
                patient=f"{' '.join(name.given)} {name.family}",
                identity=seen.get("identity", ""),
                serial=seen.get("serial", ""),
                ms=round((time.monotonic() - started) * 1000, 1),
                t=time.time(),
            )
        except Exception as e:
            _line(ok=False, error=f"{type(e).__name__}: {e}"[:300], t=time.time())
        finally:
            # A new connection per request, so every request is a new mTLS handshake.
            smart.server.session.close()
        time.sleep(interval)


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(
            {"service": "peer-api", "client": self.headers.get("X-Forwarded-Client-Cert", "")}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write("peer-api: " + (format % args) + "\n")


def hello(port: int) -> int:
    """Serve the peer API on 127.0.0.1 only (the sidecar is its only way in)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Hello)
    server.serve_forever()
    return 0


def get(url: str, ca_file: str | None) -> int:
    """One GET, printed as a JSON line: the status and identity, or the error and TLS alert.

    Over https with no client certificate this is "the app without its sidecar".
    """
    ctx = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=10) as rsp:  # noqa: S310
            rsp.read()
            _line(ok=True, status=rsp.status, identity=rsp.headers.get("X-Client-Identity", ""))
            return 0
    except urllib.error.HTTPError as e:
        _line(ok=False, status=e.code, error=str(e)[:300])
    except (ssl.SSLError, OSError) as e:
        cause = getattr(e, "reason", e)
        reason = getattr(cause, "reason", None)
        _line(ok=False, error=str(e)[:300], reason=str(reason) if reason else "")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubemtls_operator.demo.apps")
    sub = parser.add_subparsers(dest="app", required=True)
    c = sub.add_parser("fhir-client", help="the ehr-client pod's SMART on FHIR app")
    c.add_argument("--base-url", default=os.environ.get("FHIR_BASE_URL", ""))
    c.add_argument("--interval", type=float, default=float(os.environ.get("INTERVAL", "0.2")))
    h = sub.add_parser("hello", help="the peer-api pod's HTTP app")
    h.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    g = sub.add_parser("get", help="one GET (https: without a client certificate)")
    g.add_argument("url")
    g.add_argument("--ca-file", help="the server's CA (https)")
    args = parser.parse_args(argv)
    if args.app == "fhir-client":
        return fhir_client(args.base_url, args.interval)
    if args.app == "hello":
        return hello(args.port)
    return get(args.url, args.ca_file)


if __name__ == "__main__":
    sys.exit(main())
