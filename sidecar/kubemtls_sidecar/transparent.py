"""Transparent mode: the iptables redirection and the original destination.

The init container ``kubemtls-init`` runs ``kubemtls-sidecar --install-redirects`` with
the sidecar's own environment; :func:`redirect_rules` turns that configuration into the
nat rules (the one place they are written) and :func:`install_redirects` loads them with
``iptables-restore --noflush``. Inbound TCP to the app ports goes to the inbound capture
port (15006), outbound TCP to the ports of the ``--outbound`` map goes to the outbound
capture port (15001). Never redirected: the sidecar's own UID (1337, or it would capture
itself), loopback destinations, the admin port, DNS, and the API server.

The rules live in two chains of our own (``KUBEMTLS_INBOUND``, ``KUBEMTLS_OUTBOUND``), so
installing twice is harmless: the chains are flushed and refilled, and the jumps into
them from PREROUTING / OUTPUT are added only when missing. The capture is IPv4 only; IPv6
fails closed (``ipv6_reject_rules``: the same ports are reset, never passed in plaintext).

:func:`original_dst` reads where a redirected connection was going
(``SO_ORIGINAL_DST``, netfilter's ``getsockopt(SOL_IP, 80)`` → ``sockaddr_in``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import socket
import struct
import subprocess
from collections.abc import Callable, Sequence

from kubemtls_sidecar import config, contract, errors

__all__ = [
    "INBOUND_CHAIN",
    "OUTBOUND_CHAIN",
    "SO_ORIGINAL_DST",
    "RedirectPlan",
    "install_redirects",
    "ipv6_reject_rules",
    "original_dst",
    "redirect_rules",
]

logger = logging.getLogger(__name__)

INBOUND_CHAIN = "KUBEMTLS_INBOUND"
OUTBOUND_CHAIN = "KUBEMTLS_OUTBOUND"
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
_SOL_IP = getattr(socket, "SOL_IP", 0)
_DNS_PORT = 53


@dataclasses.dataclass(frozen=True)
class RedirectPlan:
    """Everything the rules depend on (built from the sidecar's config and environment)."""

    inbound_ports: tuple[int, ...]
    outbound_ports: tuple[int, ...]
    inbound_capture_port: int = contract.INBOUND_CAPTURE_PORT
    outbound_capture_port: int = contract.OUTBOUND_CAPTURE_PORT
    admin_port: int = contract.ADMIN_PORT
    uid: int = contract.SIDECAR_UID
    api_server: tuple[str, int] | None = None  # KUBERNETES_SERVICE_HOST / _PORT

    @classmethod
    def from_config(cls, cfg: config.Config) -> RedirectPlan:
        return cls(
            inbound_ports=tuple(sorted({i.app_port for i in cfg.inbound})),
            outbound_ports=tuple(sorted({o.local_port for o in cfg.outbound})),
            inbound_capture_port=cfg.inbound_capture_port,
            outbound_capture_port=cfg.outbound_capture_port,
            admin_port=cfg.admin_port,
            api_server=cfg.api_server,
        )

    def validate(self) -> None:
        """Raises: ConfigError on a plan that would capture the sidecar's own ports."""
        if not self.inbound_ports and not self.outbound_ports:
            raise errors.ConfigError(
                "transparent mode needs --inbound app ports or --outbound entries to redirect"
            )
        reserved = {self.inbound_capture_port, self.outbound_capture_port, self.admin_port}
        for port in (*self.inbound_ports, *self.outbound_ports):
            if not 0 < port < 65536:
                raise errors.ConfigError(f"port {port} is out of range (1-65535)")
            if port in reserved:
                raise errors.ConfigError(
                    f"port {port} is reserved for the sidecar in transparent mode "
                    f"({', '.join(str(p) for p in sorted(reserved))}); it cannot be redirected"
                )
        if port_dup := set(self.outbound_ports) & {_DNS_PORT}:
            raise errors.ConfigError(f"port {port_dup.pop()} (DNS) is never redirected")
        if self.api_server is not None:
            try:
                ipaddress.IPv4Address(self.api_server[0])
            except ValueError as e:
                raise errors.ConfigError(
                    f"KUBERNETES_SERVICE_HOST {self.api_server[0]!r} is not an IPv4 address"
                ) from e


def _jump_rules() -> list[str]:
    return [
        f"-A PREROUTING -p tcp -j {INBOUND_CHAIN}",
        f"-A OUTPUT -p tcp -j {OUTBOUND_CHAIN}",
    ]


def redirect_rules(cfg: config.Config | RedirectPlan) -> list[str]:
    """The nat table rules in ``iptables-restore`` format, ``*nat`` to ``COMMIT``.

    Raises:
        ConfigError: the configuration cannot be redirected (see ``RedirectPlan.validate``).
    """
    if isinstance(cfg, config.Config) and cfg.mode != "transparent":
        raise errors.ConfigError("--install-redirects needs --mode transparent")
    plan = cfg if isinstance(cfg, RedirectPlan) else RedirectPlan.from_config(cfg)
    plan.validate()
    inbound, outbound = INBOUND_CHAIN, OUTBOUND_CHAIN
    rules = [
        "*nat",
        f":{inbound} - [0:0]",
        f":{outbound} - [0:0]",
        f"-F {inbound}",
        f"-F {outbound}",
        # Inbound (PREROUTING): only the app ports; the admin port is never touched.
        f"-A {inbound} -p tcp --dport {plan.admin_port} -j RETURN",
        f"-A {inbound} -d 127.0.0.0/8 -j RETURN",
    ]
    rules += [
        f"-A {inbound} -p tcp --dport {port} -j REDIRECT --to-ports {plan.inbound_capture_port}"
        for port in plan.inbound_ports
    ]
    # Outbound (OUTPUT): the sidecar's own connections first, or it would capture itself.
    rules += [
        f"-A {outbound} -m owner --uid-owner {plan.uid} -j RETURN",
        f"-A {outbound} -d 127.0.0.0/8 -j RETURN",
        f"-A {outbound} -o lo -j RETURN",
        f"-A {outbound} -p tcp --dport {plan.admin_port} -j RETURN",
        f"-A {outbound} -p tcp --dport {_DNS_PORT} -j RETURN",
    ]
    if plan.api_server is not None:
        host, port = plan.api_server
        rules.append(f"-A {outbound} -d {host}/32 -p tcp --dport {port} -j RETURN")
    rules += [
        f"-A {outbound} -p tcp --dport {port} -j REDIRECT --to-ports {plan.outbound_capture_port}"
        for port in plan.outbound_ports
    ]
    rules += _jump_rules()
    rules.append("COMMIT")
    return rules


Runner = Callable[[Sequence[str], str | None], "subprocess.CompletedProcess[str]"]


def _run(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)
    except OSError as e:  # not installed in this image
        return subprocess.CompletedProcess(list(argv), 127, "", f"cannot run {argv[0]}: {e}")


def ipv6_reject_rules(cfg: config.Config | RedirectPlan) -> list[str]:
    """IPv6 fails closed: the filter rules that reject (TCP reset) what IPv4 redirects.

    The capture is IPv4 only; without these an app could reach the EHR over IPv6 in
    plaintext, or a peer could reach the app's port over IPv6 around the sidecar.

    Raises:
        ConfigError: as :func:`redirect_rules`.
    """
    redirect_rules(cfg)  # the same validation
    plan = cfg if isinstance(cfg, RedirectPlan) else RedirectPlan.from_config(cfg)
    inbound, outbound = INBOUND_CHAIN, OUTBOUND_CHAIN
    reject = "-j REJECT --reject-with tcp-reset"
    rules = [
        "*filter",
        f":{inbound} - [0:0]",
        f":{outbound} - [0:0]",
        f"-F {inbound}",
        f"-F {outbound}",
        f"-A {inbound} -i lo -j RETURN",
        *(f"-A {inbound} -p tcp --dport {port} {reject}" for port in plan.inbound_ports),
        f"-A {outbound} -m owner --uid-owner {plan.uid} -j RETURN",
        f"-A {outbound} -o lo -j RETURN",
        *(f"-A {outbound} -p tcp --dport {port} {reject}" for port in plan.outbound_ports),
        f"-A INPUT -p tcp -j {inbound}",
        f"-A OUTPUT -p tcp -j {outbound}",
        "COMMIT",
    ]
    return rules


def _restore(rules: list[str], family: str, run: Runner) -> None:
    """``<family>-restore --noflush``, adding the jumps into our chains only when missing."""
    table = rules[0].lstrip("*")
    text = "\n".join(
        r
        for r in rules
        if not (
            r.startswith(("-A PREROUTING ", "-A INPUT ", "-A OUTPUT "))
            and run([family, "-t", table, "-C", *r.split()[1:]], None).returncode == 0
        )
    )
    done = run([f"{family}-restore", "--noflush"], text + "\n")
    if done.returncode != 0:
        raise errors.KubemtlsError(
            f"{family}-restore refused the rules: {done.stderr.strip() or done.stdout.strip()}"
        )


def install_redirects(cfg: config.Config | RedirectPlan, *, run: Runner = _run) -> None:
    """Install :func:`redirect_rules` (and :func:`ipv6_reject_rules` when the kernel has
    IPv6) with ``iptables-restore --noflush``; installing twice changes nothing.

    Raises:
        ConfigError: the configuration cannot be redirected.
        KubemtlsError: iptables refused the rules (its message is included).
    """
    rules = redirect_rules(cfg)  # validates (and refuses explicit mode) before any iptables
    plan = cfg if isinstance(cfg, RedirectPlan) else RedirectPlan.from_config(cfg)
    _restore(rules, "iptables", run)
    ipv6 = os.path.exists("/proc/net/if_inet6")
    if ipv6:
        _restore(ipv6_reject_rules(plan), "ip6tables", run)
    logger.info(
        "installed transparent redirects: inbound ports %s -> %d, outbound ports %s -> %d%s",
        ",".join(map(str, plan.inbound_ports)) or "none",
        plan.inbound_capture_port,
        ",".join(map(str, plan.outbound_ports)) or "none",
        plan.outbound_capture_port,
        "; the same ports are rejected over IPv6" if ipv6 else "",
    )


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected IPv4 connection was going before the nat REDIRECT.

    Raises:
        OSError: the socket was not redirected by netfilter (or is not IPv4).
    """
    raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port
