"""The port lists of ``kubemtls.io/inbound`` and ``kubemtls.io/outbound``, and their conflicts.

Split from :mod:`kubemtls_operator.annotations` (which re-exports these types) because
ports are their own small grammar: two modes, two spellings, and one rule that no port is
used twice inside the pod. Pure: no Kubernetes, no I/O.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from kubemtls_sidecar import contract

__all__ = [
    "InboundPort",
    "OutboundRoute",
    "Problem",
    "check_port_conflicts",
    "parse_inbound",
    "parse_outbound",
    "port_warnings",
]

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*"
)
_EX_IN = '"8443:8080" (TLS listen port : app port)'
_EX_IN_T = '"8080,9090" (the app ports to intercept)'
_EX_OUT = '"15001=fhir.ehr.example.org:443" (local plain port = upstream host:port)'
_EX_OUT_T = '"80=fhir.ehr.example.org:443" (the port the app calls = upstream host:port)'


@dataclasses.dataclass(frozen=True)
class Problem:
    """One wrong annotation value: what is wrong and how to write it."""

    key: str
    value: str
    what: str
    example: str | None
    hint: str | None = None

    @property
    def text(self) -> str:
        """``kubemtls.io/inbound: "8443:80800" — port 80800 is ...; write it as "8443:8080" ...``"""
        text = f'{self.key}: "{self.value}" — {self.what}'
        if self.example:
            text += f"; write it as {self.example}"
        if self.hint:
            text += f"; {self.hint}"
        return text


@dataclasses.dataclass(frozen=True)
class InboundPort:
    """Explicit mode: TLS ``listen`` port to app ``app`` port. Transparent: ``listen`` is None."""

    app: int
    listen: int | None = None

    @property
    def env(self) -> str:
        """The sidecar's ``--inbound`` spelling: ``8443:127.0.0.1:8080``, or ``8080``."""
        return str(self.app) if self.listen is None else f"{self.listen}:127.0.0.1:{self.app}"


@dataclasses.dataclass(frozen=True)
class OutboundRoute:
    """Plain traffic to ``local_port`` leaves as mTLS to ``host``:``port``."""

    local_port: int
    host: str
    port: int

    @property
    def env(self) -> str:
        """The sidecar's ``--outbound`` spelling: ``15001=fhir.ehr.example.org:443``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.local_port}={host}:{self.port}"


def _port(text: str, what: str) -> tuple[int | None, str | None]:
    """(port, None) or (None, reason)."""
    if not text:
        return None, f"the {what} is missing"
    if not text.isdigit():
        return None, f'{what} "{text}" is not a number (named ports are not supported)'
    port = int(text)
    if not 1 <= port <= 65535:
        return None, f"{what} {port} is out of range (1-65535)"
    return port, None


def parse_inbound(
    problems: list[Problem], value: str, transparent: bool
) -> tuple[InboundPort, ...]:
    """``"8443:8080,9443:9090"`` (explicit) or ``"8080,9090"`` (transparent)."""
    key, example = contract.ANN_INBOUND, _EX_IN_T if transparent else _EX_IN
    ports: list[InboundPort] = []
    for item in (i.strip() for i in value.split(",")) if value else ():
        parts = item.split(":")
        if not item:
            problems.append(Problem(key, value, "has an empty entry (a stray comma?)", example))
        elif transparent and len(parts) != 1:
            problems.append(
                Problem(
                    key,
                    value,
                    f'"{item}": in transparent mode list only the app ports to '
                    "intercept (the sidecar listens on 15006)",
                    example,
                )
            )
        elif transparent:
            app, reason = _port(item, "port")
            if reason:
                problems.append(Problem(key, value, reason, example))
            elif app is not None:
                ports.append(InboundPort(app=app))
        elif len(parts) != 2:
            what = (
                f'"{item}" has no TLS listen port'
                if len(parts) == 1
                else f'"{item}" is not LISTEN:APP'
            )
            problems.append(Problem(key, value, what, example))
        else:
            listen, reason_l = _port(parts[0].strip(), "TLS listen port")
            app, reason_a = _port(parts[1].strip(), "app port")
            for reason in (reason_l, reason_a):
                if reason:
                    problems.append(Problem(key, value, reason, example))
            if listen is not None and app is not None:
                if listen == app:
                    problems.append(
                        Problem(
                            key,
                            value,
                            f"the TLS listen port equals the app port {app}: the "
                            "sidecar and the app cannot both listen on it",
                            example,
                        )
                    )
                else:
                    ports.append(InboundPort(app=app, listen=listen))
    return tuple(ports)


def parse_outbound(
    problems: list[Problem], value: str, transparent: bool
) -> tuple[OutboundRoute, ...]:
    """``"15001=fhir.ehr.example.org:443"`` (comma list), in both modes."""
    key, example = contract.ANN_OUTBOUND, _EX_OUT_T if transparent else _EX_OUT
    routes: list[OutboundRoute] = []
    for item in (i.strip() for i in value.split(",")) if value else ():
        local_text, eq, target = item.partition("=")
        if not item:
            problems.append(Problem(key, value, "has an empty entry (a stray comma?)", example))
            continue
        if not eq:
            problems.append(
                Problem(key, value, f'"{item}" has no "=" (LOCAL_PORT=HOST:PORT)', example)
            )
            continue
        local, reason = _port(local_text.strip(), "local port")
        if reason:
            problems.append(Problem(key, value, reason, example))
        host, port, reason = _target(target.strip())
        if reason:
            problems.append(Problem(key, value, reason, example))
        if local is not None and host is not None and port is not None:
            routes.append(OutboundRoute(local, host, port))
    return tuple(routes)


def _target(target: str) -> tuple[str | None, int | None, str | None]:
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, colon, port_text = target.rpartition(":")
        if not colon:
            host, port_text = target, ""
    if not host:
        return None, None, f'the upstream host is missing in "{target}"'
    if not port_text:
        return None, None, f'the upstream "{target}" has no port'
    port, reason = _port(port_text, "upstream port")
    if reason:
        return None, None, reason
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host.lower()):
            return None, None, f'"{host}" is not a valid host name or IP address'
    return host, port, None


def check_port_conflicts(
    problems: list[Problem],
    inbound: tuple[InboundPort, ...],
    outbound: tuple[OutboundRoute, ...],
    transparent: bool,
    *,
    inbound_text: str,
    outbound_text: str,
) -> None:
    """No port used twice in the pod: sidecar listeners, reserved ports, app ports."""
    reserved = {contract.ADMIN_PORT: "the sidecar's admin port"}
    if transparent:
        reserved[contract.OUTBOUND_CAPTURE_PORT] = "the sidecar's outbound capture port"
        reserved[contract.INBOUND_CAPTURE_PORT] = "the sidecar's inbound capture port"
    seen: dict[int, str] = {}
    ex_in, ex_out = (_EX_IN_T, _EX_OUT_T) if transparent else (_EX_IN, _EX_OUT)

    def claim(port: int, what: str, key: str, text: str, example: str) -> None:
        if port in reserved:
            what = f"port {port} is reserved for {reserved[port]}"
        elif port in seen:
            what = f"port {port} is used twice (as {seen[port]} and as {what})"
        else:
            seen[port] = what
            return
        problems.append(Problem(key, text, what, example))

    if transparent:
        for entry in inbound:
            claim(entry.app, "an intercepted app port", contract.ANN_INBOUND, inbound_text, ex_in)
        routes: set[tuple[int, str]] = set()
        for route in outbound:
            if route.local_port in reserved:
                claim(
                    route.local_port,
                    "an outbound port",
                    contract.ANN_OUTBOUND,
                    outbound_text,
                    ex_out,
                )
            elif (route.local_port, route.host) in routes:
                problems.append(
                    Problem(
                        contract.ANN_OUTBOUND,
                        outbound_text,
                        f"{route.local_port}={route.host} is listed twice",
                        ex_out,
                    )
                )
            routes.add((route.local_port, route.host))
        return
    for entry in inbound:
        assert entry.listen is not None  # explicit mode
        claim(entry.listen, "an inbound TLS listen port", contract.ANN_INBOUND, inbound_text, ex_in)
    for route in outbound:
        claim(
            route.local_port, "an outbound local port", contract.ANN_OUTBOUND, outbound_text, ex_out
        )
    for entry in inbound:
        taken = reserved.get(entry.app) or seen.get(entry.app)
        if taken:
            problems.append(
                Problem(
                    contract.ANN_INBOUND,
                    inbound_text,
                    f"app port {entry.app} is also {taken}: the app and the "
                    "sidecar cannot both listen on it",
                    ex_in,
                )
            )


def port_warnings(
    inbound: tuple[InboundPort, ...], outbound: tuple[OutboundRoute, ...], transparent: bool
) -> list[str]:
    """Likely mistakes that are not errors."""
    warnings: list[str] = []
    low = sorted(
        {e.listen for e in inbound if e.listen is not None and e.listen < 1024}
        | ({r.local_port for r in outbound if r.local_port < 1024} if not transparent else set())
    )
    if low:
        warnings.append(
            f"the sidecar runs as non-root, so it can listen on port(s) {low} only where the "
            "node allows unprivileged low ports (net.ipv4.ip_unprivileged_port_start); "
            "prefer ports above 1023"
        )
    if not inbound and not outbound:
        warnings.append(
            "neither kubemtls.io/inbound nor kubemtls.io/outbound lists a port: the sidecar "
            "gets a certificate but carries no traffic"
        )
    return warnings
