"""The sidecar's settings: flags and ``KUBEMTLS_*`` environment → one frozen ``Config``.

This is the only module that reads ``os.environ`` (STYLE.md convention 10). Every flag of
DESIGN.md is here, in one block (ghostunnel's ``main.go``), each with help text, a shown
default and its environment variable (``contract.env_name``; a repeatable flag's variable
is a comma-joined list). ``parse()`` validates everything that can be checked without a
socket and raises ``ConfigError`` with one line that names the flag and says why; the
caller prints it and exits 2. It binds nothing and loads no key.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import pathlib
from collections.abc import Mapping, Sequence

from kubemtls_sidecar import contract, errors

__all__ = ["Config", "Inbound", "Outbound", "build_parser", "parse"]


@dataclasses.dataclass(frozen=True)
class Inbound:
    """One inbound mapping; ``listen_port`` is None for a transparent-mode app port."""

    listen_port: int | None
    app_host: str
    app_port: int


@dataclasses.dataclass(frozen=True)
class Outbound:
    """One outbound mapping: plain ``127.0.0.1:local_port`` → mTLS to ``host:port``."""

    local_port: int
    upstream_host: str
    upstream_port: int


@dataclasses.dataclass(frozen=True)
class Config:
    signer: str | None
    token_file: pathlib.Path
    cert_dir: pathlib.Path | None
    trust_dir: pathlib.Path
    inbound: tuple[Inbound, ...]
    outbound: tuple[Outbound, ...]
    upstream_ca: pathlib.Path | None
    allowed_peers: tuple[str, ...]
    protocol: str
    mode: str
    admin_port: int
    admin_address: str
    listen_address: str
    log_format: str
    log_level: str
    key_type: str
    require_bound_token: bool
    install_redirects: bool
    allow_remote_app: bool
    handshake_timeout: float
    idle_timeout: float
    drain_timeout: float
    max_connections: int
    reload_interval: float
    tls_min_version: str
    resolve: tuple[tuple[str, str], ...]  # (name, address): dial address, verify name
    pod_name: str | None
    pod_namespace: str | None
    api_server: tuple[str, int] | None  # KUBERNETES_SERVICE_HOST/_PORT (never redirected)
    # identity.py, httpmode.py, transparent.py (defaults so older callers still build one)
    trust_poll_interval: float = 30.0
    max_header_bytes: int = 64 * 1024
    inbound_capture_port: int = contract.INBOUND_CAPTURE_PORT
    outbound_capture_port: int = contract.OUTBOUND_CAPTURE_PORT
    app_probes: str | None = None  # JSON from the webhook (appprobes.parse validates it)


@dataclasses.dataclass(frozen=True)
class _Flag:
    name: str
    help: str
    default: str | None = None  # as a string, the form the environment uses
    repeatable: bool = False
    boolean: bool = False
    metavar: str | None = None
    choices: tuple[str, ...] | None = None


_FLAGS: tuple[_Flag, ...] = (
    _Flag(
        "--signer",
        "URL of the operator's signing API: get and renew the certificate "
        "from it (key generated and kept in memory)",
        metavar="URL",
    ),
    _Flag(
        "--token-file",
        "projected service-account token sent to the signing API",
        contract.TOKEN_FILE,
        metavar="FILE",
    ),
    _Flag(
        "--cert-dir",
        "read tls.crt and tls.key from this directory instead of --signer "
        "(reloaded when they change)",
        metavar="DIR",
    ),
    _Flag(
        "--trust-dir",
        "directory with ca.crt (trust bundle) and crl.pem",
        contract.TRUST_DIR,
        metavar="DIR",
    ),
    _Flag(
        "--inbound",
        "LISTEN_PORT:APP_HOST:APP_PORT: accept mTLS on LISTEN_PORT, forward "
        "plaintext to APP_HOST:APP_PORT (transparent mode: bare app ports)",
        repeatable=True,
        metavar="MAPPING",
    ),
    _Flag(
        "--outbound",
        "LOCAL_PORT=UPSTREAM_HOST:UPSTREAM_PORT: accept plaintext on "
        "127.0.0.1:LOCAL_PORT, originate mTLS to the upstream",
        repeatable=True,
        metavar="MAPPING",
    ),
    _Flag(
        "--upstream-ca",
        "CA bundle trusted for outbound upstreams (an EHR's public or "
        "partner CA) instead of the mesh bundle; the mesh CRL never applies to it",
        metavar="FILE",
    ),
    _Flag(
        "--allowed-peer",
        "glob matched against the peer's SPIFFE ID (any peer the CA "
        "vouches for when none is given)",
        repeatable=True,
        metavar="GLOB",
    ),
    _Flag(
        "--protocol",
        "tcp: a byte stream; http: X-Forwarded-Client-Cert and RFC 8705 checks inbound",
        "tcp",
        choices=("tcp", "http"),
    ),
    _Flag(
        "--mode",
        "explicit ports or iptables redirection",
        "explicit",
        choices=("explicit", "transparent"),
    ),
    _Flag(
        "--admin-port",
        "port of /healthz /readyz /metrics (0: any free port)",
        str(contract.ADMIN_PORT),
        metavar="PORT",
    ),
    _Flag(
        "--admin-address",
        "address the admin server binds (kubelet probes the pod IP)",
        "0.0.0.0",  # noqa: S104 - kubelet and peers reach the pod IP
        metavar="ADDR",
    ),
    _Flag(
        "--listen-address",
        "address the inbound TLS listeners bind",
        "0.0.0.0",  # noqa: S104
        metavar="ADDR",
    ),
    _Flag(
        "--tls-min-version",
        "oldest TLS version accepted or offered (1.3: refuse TLS 1.2 too)",
        "1.2",
        choices=("1.2", "1.3"),
    ),
    _Flag(
        "--resolve",
        "NAME=ADDRESS: dial ADDRESS for an --outbound upstream NAME, still sending and "
        "verifying NAME (like curl --resolve)",
        repeatable=True,
        metavar="NAME=ADDRESS",
    ),
    _Flag("--log-format", "json lines or text", "text", choices=("json", "text")),
    _Flag(
        "--log-level",
        "debug, info, warning or error",
        "info",
        choices=("debug", "info", "warning", "error"),
    ),
    _Flag("--key-type", "key generated for --signer", "ecdsa-p256", choices=contract.KEY_TYPES),
    _Flag(
        "--require-bound-token",
        "http protocol: refuse bearer tokens without an RFC 8705 cnf binding",
        "false",
        boolean=True,
    ),
    _Flag(
        "--install-redirects",
        "install the transparent-mode iptables rules and exit (the kubemtls-init container)",
        "false",
        boolean=True,
    ),
    _Flag(
        "--allow-remote-app",
        "allow an inbound APP_HOST that is not loopback",
        "false",
        boolean=True,
    ),
    _Flag(
        "--handshake-timeout",
        "seconds a peer has to complete the TLS handshake",
        "10",
        metavar="SECONDS",
    ),
    _Flag(
        "--idle-timeout",
        "close a connection idle this many seconds (0: never)",
        "3600",
        metavar="SECONDS",
    ),
    _Flag(
        "--drain-timeout",
        "on SIGTERM, wait this long for open connections",
        "20",
        metavar="SECONDS",
    ),
    _Flag(
        "--max-connections", "refuse connections beyond this many open ones", "4096", metavar="N"
    ),
    _Flag(
        "--reload-interval",
        "seconds between checks of --cert-dir/--trust-dir for changes (SIGHUP reloads at once)",
        "2",
        metavar="SECONDS",
    ),
    _Flag("--pod-name", "this pod's name (downward API), for logs", metavar="NAME"),
    _Flag("--pod-namespace", "this pod's namespace (downward API), for logs", metavar="NS"),
    _Flag(
        "--trust-poll-interval",
        "seconds between polls of the signer's /v1/trust (new bundle, CRL, re-key order)",
        "30",
        metavar="SECONDS",
    ),
    _Flag(
        "--max-header-bytes",
        "http protocol: largest request head accepted (431 beyond)",
        str(64 * 1024),
        metavar="BYTES",
    ),
    _Flag(
        "--inbound-capture-port",
        "transparent mode: where redirected inbound connections arrive",
        str(contract.INBOUND_CAPTURE_PORT),
        metavar="PORT",
    ),
    _Flag(
        "--outbound-capture-port",
        "transparent mode: where redirected outbound connections arrive",
        str(contract.OUTBOUND_CAPTURE_PORT),
        metavar="PORT",
    ),
    _Flag(
        "--app-probes",
        "transparent mode: the app's httpGet/tcpSocket probes that the webhook rewrote to "
        "the admin port (JSON by path; set by the webhook)",
        metavar="JSON",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser; defaults are applied after parsing so env can fill in."""
    p = argparse.ArgumentParser(
        prog="kubemtls-sidecar",
        description="Per-pod mutual TLS proxy: inbound mTLS to the app, outbound mTLS to "
        "peers and EHR systems. Every flag can also be set by its KUBEMTLS_* variable.",
    )
    for f in _FLAGS:
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


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _raw_values(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in _FLAGS:
        value = getattr(args, _dest(f.name))
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
        out[_dest(f.name)] = value
    return out


def _port(flag: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise errors.ConfigError(f"{flag} {text!r}: a port must be a number from 1 to 65535")
    return int(text)


def _number(flag: str, text: str, *, minimum: float = 0) -> float:
    try:
        value = float(text)
    except ValueError:
        raise errors.ConfigError(f"{flag} {text!r}: not a number") from None
    if value < minimum:
        raise errors.ConfigError(f"{flag} {text!r}: must be at least {minimum:g}")
    return value


def _bool(flag: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise errors.ConfigError(f"{flag} {text!r}: use true or false")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_inbound(text: str, *, mode: str, allow_remote_app: bool) -> Inbound:
    """``8443:127.0.0.1:8080`` (explicit) or ``8080`` (transparent).

    Raises:
        ConfigError: not of that form, or a non-loopback app without --allow-remote-app.
    """
    if mode == "transparent":
        return Inbound(None, "127.0.0.1", _port("--inbound", text))
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[1]:
        raise errors.ConfigError(
            f"--inbound {text!r}: expected LISTEN_PORT:APP_HOST:APP_PORT, e.g. 8443:127.0.0.1:8080"
        )
    host = parts[1].strip("[]")
    if not allow_remote_app and not _is_loopback(host):
        raise errors.ConfigError(
            f"--inbound {text!r}: app host {host!r} is not loopback; the plaintext leg would "
            "cross the network (add --allow-remote-app to accept that)"
        )
    return Inbound(_port("--inbound", parts[0]), host, _port("--inbound", parts[2]))


def parse_outbound(text: str) -> Outbound:
    """``15001=fhir.ehr.example.org:443``.

    Raises:
        ConfigError: not of that form.
    """
    local, sep, upstream = text.partition("=")
    host, colon, port = upstream.rpartition(":")
    if not sep or not colon or not host:
        raise errors.ConfigError(
            f"--outbound {text!r}: expected LOCAL_PORT=UPSTREAM_HOST:UPSTREAM_PORT, "
            "e.g. 15001=fhir.ehr.example.org:443"
        )
    return Outbound(_port("--outbound", local), host.strip("[]"), _port("--outbound", port))


def _readable_file(flag: str, path: pathlib.Path) -> None:
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except OSError as e:
        raise errors.ConfigError(f"{flag}: cannot read {path}: {e.strerror or e}") from None


def parse(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Flags and environment → a validated ``Config``.

    Raises:
        ConfigError: a flag or file is wrong (one line: which and why).
        SystemExit: argparse's own usage errors and --help (exit 2 / 0).
    """
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    raw = _raw_values(args, env)

    def s(name: str) -> str:
        value = raw[name]
        assert isinstance(value, str)
        return value

    def opt(name: str) -> str | None:
        value = raw[name]
        return value if isinstance(value, str) and value else None

    def items(name: str) -> list[str]:
        value = raw[name]
        assert isinstance(value, list)
        return [str(v) for v in value]

    mode = s("mode")
    allow_remote = _bool("--allow-remote-app", s("allow_remote_app"))
    signer, cert_dir = opt("signer"), opt("cert_dir")
    install = _bool("--install-redirects", s("install_redirects"))
    if not install:
        if signer and cert_dir:
            raise errors.ConfigError("--signer and --cert-dir: give one source, not both")
        if not signer and not cert_dir:
            raise errors.ConfigError("no certificate source: give --signer URL or --cert-dir DIR")
    inbound = tuple(
        parse_inbound(t, mode=mode, allow_remote_app=allow_remote) for t in items("inbound")
    )
    outbound = tuple(parse_outbound(t) for t in items("outbound"))
    cfg = Config(
        signer=signer,
        token_file=pathlib.Path(s("token_file")),
        cert_dir=pathlib.Path(cert_dir) if cert_dir else None,
        trust_dir=pathlib.Path(s("trust_dir")),
        inbound=inbound,
        outbound=outbound,
        upstream_ca=pathlib.Path(u) if (u := opt("upstream_ca")) else None,
        allowed_peers=tuple(items("allowed_peer")),
        protocol=s("protocol"),
        mode=mode,
        admin_port=0 if s("admin_port") == "0" else _port("--admin-port", s("admin_port")),
        admin_address=s("admin_address"),
        listen_address=s("listen_address"),
        log_format=s("log_format"),
        log_level=s("log_level"),
        key_type=s("key_type"),
        require_bound_token=_bool("--require-bound-token", s("require_bound_token")),
        install_redirects=install,
        allow_remote_app=allow_remote,
        handshake_timeout=_number("--handshake-timeout", s("handshake_timeout"), minimum=0.1),
        idle_timeout=_number("--idle-timeout", s("idle_timeout")),
        drain_timeout=_number("--drain-timeout", s("drain_timeout")),
        max_connections=int(_number("--max-connections", s("max_connections"), minimum=1)),
        reload_interval=_number("--reload-interval", s("reload_interval"), minimum=0.1),
        tls_min_version=s("tls_min_version"),
        resolve=tuple(_resolve(t) for t in items("resolve")),
        pod_name=opt("pod_name"),
        pod_namespace=opt("pod_namespace"),
        api_server=_api_server(env),
        trust_poll_interval=_number("--trust-poll-interval", s("trust_poll_interval"), minimum=0.1),
        max_header_bytes=int(_number("--max-header-bytes", s("max_header_bytes"), minimum=1024)),
        inbound_capture_port=_port("--inbound-capture-port", s("inbound_capture_port")),
        outbound_capture_port=_port("--outbound-capture-port", s("outbound_capture_port")),
        app_probes=opt("app_probes"),
    )
    if not install:
        _check_files(cfg)
        _check_ports(cfg)
    return cfg


def _resolve(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    if not sep or not name or not address:
        raise errors.ConfigError(f"--resolve {text!r}: expected NAME=ADDRESS")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise errors.ConfigError(f"--resolve {text!r}: {address!r} is not an IP address") from None
    return name, address


def _api_server(env: Mapping[str, str]) -> tuple[str, int] | None:
    host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
    port = env.get("KUBERNETES_SERVICE_PORT", "443").strip()
    if not host:
        return None
    return host, _port("KUBERNETES_SERVICE_PORT", port)


def _check_files(cfg: Config) -> None:
    if cfg.cert_dir is not None:
        _readable_file("--cert-dir", cfg.cert_dir / "tls.crt")
        _readable_file("--cert-dir", cfg.cert_dir / "tls.key")
    else:
        _readable_file("--token-file", cfg.token_file)
    _readable_file("--trust-dir", cfg.trust_dir / contract.TRUST_CA_FILE)
    if cfg.upstream_ca is not None:
        _readable_file("--upstream-ca", cfg.upstream_ca)


def _check_ports(cfg: Config) -> None:
    seen: dict[int, str] = {cfg.admin_port: "--admin-port"} if cfg.admin_port else {}
    ports: list[tuple[int, str]] = []
    for i in cfg.inbound:
        if i.listen_port is not None:
            ports.append((i.listen_port, "--inbound"))
    if cfg.mode == "transparent":
        ports.append((cfg.inbound_capture_port, "transparent inbound capture"))
        ports.append((cfg.outbound_capture_port, "transparent outbound capture"))
    else:
        ports.extend((o.local_port, "--outbound") for o in cfg.outbound)
    for port, flag in ports:
        if port in seen:
            raise errors.ConfigError(f"{flag}: port {port} is already used by {seen[port]}")
        seen[port] = flag
