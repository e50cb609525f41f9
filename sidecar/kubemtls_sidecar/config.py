"""The sidecar's settings: flags and ``KUBEMTLS_*`` environment → one frozen ``Config``.

This is the only module that reads ``os.environ`` (STYLE.md convention 10). The flags
themselves (help, defaults, environment names) are in ``flags``; this module turns their
raw strings into typed values. ``parse()`` validates everything that can be checked
without a socket and raises ``ConfigError`` with one line that names the flag and says
why; the caller prints it and exits 2. It binds nothing and loads no key.
``wait_ready()`` reads only what ``--wait-ready`` needs, so the postStart hook works
whatever else is (or is not yet) in place.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pathlib
from collections.abc import Mapping, Sequence

from kubemtls_sidecar import contract, errors, flags

__all__ = ["Config", "Inbound", "Outbound", "WaitReady", "parse", "wait_ready"]


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
    tls_io: str = "socket"  # tlsconn/sockio: the data phase on the socket, or memory BIOs


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
    args = flags.build_parser().parse_args(argv)
    raw = flags.raw_values(args, env)

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
        tls_io=s("tls_io"),
    )
    if not install:
        _check_files(cfg)
        _check_ports(cfg)
    return cfg


@dataclasses.dataclass(frozen=True)
class WaitReady:
    """``--wait-ready``: where to poll ``/readyz`` and for how long."""

    host: str
    port: int
    timeout: float


def wait_ready(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> WaitReady | None:
    """The ``--wait-ready`` settings, or None when it was not asked for.

    Reads --wait-ready, --wait-ready-timeout, --admin-port and --admin-address only: the
    hook runs with the sidecar's whole environment and must not fail on the rest.

    Raises:
        ConfigError: one of those four is wrong.
        SystemExit: argparse's own usage errors and --help (exit 2 / 0).
    """
    env = os.environ if env is None else env
    args = flags.build_parser().parse_args(argv)
    if not _bool("--wait-ready", flags.lookup("--wait-ready", args, env) or ""):
        return None
    port = _port("--admin-port", flags.lookup("--admin-port", args, env) or "")
    address = flags.lookup("--admin-address", args, env) or ""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)  # noqa: S104
    timeout = _number("--wait-ready-timeout", flags.lookup("--wait-ready-timeout", args, env) or "")
    return WaitReady(host=host, port=port, timeout=timeout)


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
