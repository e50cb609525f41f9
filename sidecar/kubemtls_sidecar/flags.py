"""The sidecar's flag table and its argparse parser: one block, one place to find a flag.

Every flag of DESIGN.md is here (ghostunnel's ``main.go``), each with help text, a shown
default and its environment variable (``contract.env_name``; a repeatable flag's variable
is a comma-joined list). ``raw_values`` merges flags over environment over defaults into
strings; ``config.parse`` turns those into a validated ``Config``. ``lookup`` reads one flag
alone, for ``--wait-ready``, which must start fast and not depend on the rest.
Standard library only: ``--wait-ready`` imports this and nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping

from kubemtls_sidecar import contract, errors

__all__ = ["FLAGS", "Flag", "build_parser", "dest", "lookup", "raw_values"]


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag: its help, the default it shows (the string form env uses), and its kind."""

    name: str
    help: str
    default: str | None = None  # as a string, the form the environment uses
    repeatable: bool = False
    boolean: bool = False
    metavar: str | None = None
    choices: tuple[str, ...] | None = None


#: Every flag, in the order ``--help`` lists them.
FLAGS: tuple[Flag, ...] = (
    Flag(
        "--signer",
        "URL of the operator's signing API: get and renew the certificate "
        "from it (key generated and kept in memory)",
        metavar="URL",
    ),
    Flag(
        "--token-file",
        "projected service-account token sent to the signing API",
        contract.TOKEN_FILE,
        metavar="FILE",
    ),
    Flag(
        "--cert-dir",
        "read tls.crt and tls.key from this directory instead of --signer "
        "(reloaded when they change)",
        metavar="DIR",
    ),
    Flag(
        "--trust-dir",
        "directory with ca.crt (trust bundle) and crl.pem",
        contract.TRUST_DIR,
        metavar="DIR",
    ),
    Flag(
        "--inbound",
        "LISTEN_PORT:APP_HOST:APP_PORT: accept mTLS on LISTEN_PORT, forward "
        "plaintext to APP_HOST:APP_PORT (transparent mode: bare app ports)",
        repeatable=True,
        metavar="MAPPING",
    ),
    Flag(
        "--outbound",
        "LOCAL_PORT=UPSTREAM_HOST:UPSTREAM_PORT: accept plaintext on "
        "127.0.0.1:LOCAL_PORT, originate mTLS to the upstream",
        repeatable=True,
        metavar="MAPPING",
    ),
    Flag(
        "--upstream-ca",
        "CA bundle trusted for outbound upstreams (an EHR's public or "
        "partner CA) instead of the mesh bundle; the mesh CRL never applies to it",
        metavar="FILE",
    ),
    Flag(
        "--allowed-peer",
        "glob matched against the peer's SPIFFE ID (any peer the CA "
        "vouches for when none is given)",
        repeatable=True,
        metavar="GLOB",
    ),
    Flag(
        "--protocol",
        "tcp: a byte stream; http: X-Forwarded-Client-Cert and RFC 8705 checks inbound",
        "tcp",
        choices=("tcp", "http"),
    ),
    Flag(
        "--mode",
        "explicit ports or iptables redirection",
        "explicit",
        choices=("explicit", "transparent"),
    ),
    Flag(
        "--admin-port",
        "port of /healthz /readyz /metrics (0: any free port)",
        str(contract.ADMIN_PORT),
        metavar="PORT",
    ),
    Flag(
        "--admin-address",
        "address the admin server binds (kubelet probes the pod IP)",
        "0.0.0.0",  # noqa: S104 - kubelet and peers reach the pod IP
        metavar="ADDR",
    ),
    Flag(
        "--listen-address",
        "address the inbound TLS listeners bind",
        "0.0.0.0",  # noqa: S104
        metavar="ADDR",
    ),
    Flag(
        "--tls-min-version",
        "oldest TLS version accepted or offered (1.3: refuse TLS 1.2 too)",
        "1.2",
        choices=("1.2", "1.3"),
    ),
    Flag(
        "--resolve",
        "NAME=ADDRESS: dial ADDRESS for an --outbound upstream NAME, still sending and "
        "verifying NAME (like curl --resolve)",
        repeatable=True,
        metavar="NAME=ADDRESS",
    ),
    Flag("--log-format", "json lines or text", "text", choices=("json", "text")),
    Flag(
        "--log-level",
        "debug, info, warning or error",
        "info",
        choices=("debug", "info", "warning", "error"),
    ),
    Flag("--key-type", "key generated for --signer", "ecdsa-p256", choices=contract.KEY_TYPES),
    Flag(
        "--require-bound-token",
        "http protocol: refuse bearer tokens without an RFC 8705 cnf binding",
        "false",
        boolean=True,
    ),
    Flag(
        "--install-redirects",
        "install the transparent-mode iptables rules and exit (the kubemtls-init container)",
        "false",
        boolean=True,
    ),
    Flag(
        "--allow-remote-app",
        "allow an inbound APP_HOST that is not loopback",
        "false",
        boolean=True,
    ),
    Flag(
        "--handshake-timeout",
        "seconds a peer has to complete the TLS handshake",
        "10",
        metavar="SECONDS",
    ),
    Flag(
        "--idle-timeout",
        "close a connection idle this many seconds (0: never)",
        "3600",
        metavar="SECONDS",
    ),
    Flag(
        "--drain-timeout",
        "on SIGTERM, wait this long for open connections",
        "20",
        metavar="SECONDS",
    ),
    Flag(
        "--tls-io",
        "after the handshake: socket (OpenSSL reads and writes the socket) or memory "
        "(through Python's memory BIOs; slower, the fallback)",
        "socket",
        choices=("socket", "memory"),
    ),
    Flag("--max-connections", "refuse connections beyond this many open ones", "4096", metavar="N"),
    Flag(
        "--reload-interval",
        "seconds between checks of --cert-dir/--trust-dir for changes (SIGHUP reloads at once)",
        "2",
        metavar="SECONDS",
    ),
    Flag("--pod-name", "this pod's name (downward API), for logs", metavar="NAME"),
    Flag("--pod-namespace", "this pod's namespace (downward API), for logs", metavar="NS"),
    Flag(
        "--trust-poll-interval",
        "seconds between polls of the signer's /v1/trust (new bundle, CRL, re-key order)",
        "30",
        metavar="SECONDS",
    ),
    Flag(
        "--max-header-bytes",
        "http protocol: largest request head accepted (431 beyond)",
        str(64 * 1024),
        metavar="BYTES",
    ),
    Flag(
        "--inbound-capture-port",
        "transparent mode: where redirected inbound connections arrive",
        str(contract.INBOUND_CAPTURE_PORT),
        metavar="PORT",
    ),
    Flag(
        "--outbound-capture-port",
        "transparent mode: where redirected outbound connections arrive",
        str(contract.OUTBOUND_CAPTURE_PORT),
        metavar="PORT",
    ),
    Flag(
        "--app-probes",
        "transparent mode: the app's httpGet/tcpSocket probes that the webhook rewrote to "
        "the admin port (JSON by path; set by the webhook)",
        metavar="JSON",
    ),
    Flag(
        "--wait-ready",
        "poll this sidecar's /readyz on 127.0.0.1:--admin-port until it answers 200, then "
        "exit 0 (the postStart hook when the sidecar is not native); reads no setting but "
        "--admin-port, --admin-address and --wait-ready-timeout",
        "false",
        boolean=True,
    ),
    Flag(
        "--wait-ready-timeout",
        "--wait-ready gives up after this many seconds (exit 1)",
        "120",
        metavar="SECONDS",
    ),
)


def _formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's formatter, given the width: by default it asks ``shutil``, whose import
    (with bz2 and lzma) would stay in every sidecar's memory (~0.4 MiB) for one --help."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        try:
            columns = os.get_terminal_size().columns  # of stdout
        except (ValueError, OSError):
            columns = 80
    return argparse.HelpFormatter(prog, width=columns - 2)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser; defaults are applied after parsing so env can fill in."""
    p = argparse.ArgumentParser(
        prog="kubemtls-sidecar",
        formatter_class=_formatter,
        description="Per-pod mutual TLS proxy: inbound mTLS to the app, outbound mTLS to "
        "peers and EHR systems. Every flag can also be set by its KUBEMTLS_* variable.",
    )
    for f in FLAGS:
        env = contract.env_name(f.name)
        shown = f.default if f.default is not None else "none"
        extra = f" (repeatable; env {env}, comma-joined)" if f.repeatable else f" (env {env})"
        text = f"{f.help} [default: {shown}]{extra}"
        if f.boolean:
            p.add_argument(f.name, action="store_const", const="true", default=None, help=text)
        elif f.repeatable:
            p.add_argument(f.name, action="append", default=None, metavar=f.metavar, help=text)
        else:
            p.add_argument(f.name, default=None, metavar=f.metavar, choices=f.choices, help=text)
    return p


def dest(flag: str) -> str:
    """``--admin-port`` → ``admin_port`` (the argparse attribute and ``raw_values`` key)."""
    return flag.lstrip("-").replace("-", "_")


def raw_values(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, object]:
    """Every flag's value by ``dest``: the flag, else its non-empty variable, else the default.

    Repeatable flags give a list (comma-split); the others a string or None.

    Raises:
        ConfigError: a value outside a flag's choices.
    """
    out: dict[str, object] = {}
    for f in FLAGS:
        value = getattr(args, dest(f.name))
        env_value = env.get(contract.env_name(f.name))
        if f.repeatable:
            if value is None:
                value = [v.strip() for v in (env_value or "").split(",") if v.strip()]
            else:
                value = [v.strip() for item in value for v in item.split(",") if v.strip()]
        else:
            if value is None:
                value = env_value if env_value not in (None, "") else f.default
            if f.choices and value is not None and value not in f.choices:
                raise errors.ConfigError(
                    f"{f.name} {value!r}: must be one of {', '.join(f.choices)}"
                )
        out[dest(f.name)] = value
    return out


def lookup(name: str, args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    """One single-valued flag's raw string, without reading or checking any other flag."""
    flag = next(f for f in FLAGS if f.name == name)
    given = getattr(args, dest(name))
    if given is not None:
        return str(given)
    env_value = env.get(contract.env_name(name))
    return env_value if env_value else flag.default
