"""Network namespaces for the demo's pods: one bridge on the host, one namespace per pod.

This is the CNI bridge model in miniature. The host gets a bridge with the subnet's first
address (the "host IP": the operator's signing API and the mock EHR listen there); each pod
gets a network namespace with an ``eth0`` end of a veth pair plugged into the bridge, its
own address, a default route to the host, and ``/etc/netns/<ns>/hosts`` so the EHR's name
resolves inside it (``ip netns exec`` bind-mounts that file over ``/etc/hosts``).

The bridge gets a fixed MAC address, as Docker and the CNI bridge plugin give theirs. Left to
itself, a Linux bridge takes the lowest MAC of its ports, so a pod added later (the demo adds
batch-export half-way) can change the MAC behind the host IP. Pods that cached the old one in
their ARP table then send into the void: every connection to the EHR and the signing API
times out until their neighbour entry expires, 15 to 50 s later.

Everything created here is recorded and removed by ``destroy()``, also after a failure
half-way. It needs root (``ip`` and ``/etc/netns``); the demo falls back to loopback without.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import pathlib
import shutil
import signal
import subprocess

__all__ = ["Network", "PodNet", "available", "bridge_mac", "leftovers"]

PREFIX = "kubemtls-"
ETC_NETNS = pathlib.Path("/etc/netns")


def available() -> str | None:
    """None if network namespaces can be used here, else the reason why not."""
    if os.geteuid() != 0:
        return "not running as root"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    # Root in a container may still lack CAP_SYS_ADMIN / CAP_NET_ADMIN: try it in a
    # throwaway namespace, which touches nothing on the host.
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "ip", "link", "add", "kmtprobe0", "type", "veth",
         "peer", "name", "kmtprobe1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"cannot create network namespaces here ({probe.stderr.strip()[:80]})"
    if not os.access(ETC_NETNS if ETC_NETNS.is_dir() else ETC_NETNS.parent, os.W_OK):
        return f"{ETC_NETNS} is not writable"
    return None


def leftovers(run_id: str = "") -> list[str]:
    """Namespaces, links and /etc/netns entries this demo (or run) left behind."""
    prefix = PREFIX + run_id
    found = [n for n in _netns_names() if n.startswith(prefix)]
    if ETC_NETNS.is_dir():
        found += [str(p) for p in ETC_NETNS.iterdir() if p.name.startswith(prefix)]
    links = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=False)
    for link in json.loads(links.stdout or "[]"):
        name = str(link.get("ifname", ""))
        if name.startswith("kmt" + run_id):
            found.append(name)
    return found


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, check=False)
    return [str(n["name"]) for n in json.loads(out.stdout or "[]")]


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclasses.dataclass(frozen=True)
class PodNet:
    """One pod's network: its namespace name and address."""

    netns: str
    ip: str

    def exec_prefix(self) -> list[str]:
        """The command prefix that runs a program inside this pod's network namespace."""
        return ["ip", "netns", "exec", self.netns]


class Network:
    """The bridge and the pods' namespaces of one demo run."""

    def __init__(self, run_id: str, hosts: dict[str, str] | None = None) -> None:
        self.run_id = run_id
        self.bridge = f"kmt{run_id}"
        self.subnet = _free_subnet()
        self.host_ip = str(self.subnet.network_address + 1)
        self.hosts = dict(hosts or {})  # extra /etc/hosts names -> the host IP
        self.pods: dict[str, PodNet] = {}
        self._created_links: list[str] = []
        self._created_netns: list[str] = []

    def create(self) -> None:
        _ip("link", "add", self.bridge, "address", bridge_mac(self.run_id), "type", "bridge")
        self._created_links.append(self.bridge)
        _ip("addr", "add", f"{self.host_ip}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_pod(self, pod: str) -> PodNet:
        """Create the pod's namespace, veth pair, address, route and hosts file."""
        index = len(self.pods)
        netns = f"{PREFIX}{self.run_id}-{pod}"
        veth = f"kmt{self.run_id}v{index}"
        address = str(self.subnet.network_address + 10 + index)
        _ip("netns", "add", netns)
        self._created_netns.append(netns)
        etc = ETC_NETNS / netns
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", f"{address} {pod}"]
        lines += [f"{self.host_ip} {name}" for name in self.hosts]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        self._created_links.append(veth)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "default", "via", self.host_ip)
        self.pods[pod] = PodNet(netns, address)
        return self.pods[pod]

    def destroy(self) -> list[str]:
        """Remove everything this network created; return what could not be removed."""
        problems: list[str] = []
        for netns in reversed(self._created_netns):
            _kill_netns_pids(netns)
            proc = subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
            if proc.returncode != 0 and netns in _netns_names():
                problems.append(f"netns {netns}")
            shutil.rmtree(ETC_NETNS / netns, ignore_errors=True)
        for link in reversed(self._created_links):
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        self._created_netns.clear()
        self._created_links.clear()
        return problems


def bridge_mac(run_id: str) -> str:
    """A locally administered unicast MAC for this run's bridge (02:6b:6d: is "kmt")."""
    tail = hashlib.sha256(run_id.encode()).digest()[:3]
    return ":".join(f"{b:02x}" for b in (0x02, 0x6B, 0x6D, *tail))


def _kill_netns_pids(netns: str) -> None:
    out = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
    )
    for pid in out.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.231.0.0/16 that no route on this host overlaps."""
    out = subprocess.run(["ip", "-j", "route"], capture_output=True, text=True, check=False)
    used = []
    for route in json.loads(out.stdout or "[]"):
        dst = str(route.get("dst", ""))
        if dst and dst != "default":
            used.append(ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False))
    for third in range(10, 250):
        candidate = ipaddress.IPv4Network(f"10.231.{third}.0/24")
        if not any(candidate.overlaps(u) for u in used if u.version == 4):
            return candidate
    raise RuntimeError("no free 10.231.x.0/24 subnet for the demo's pods")
