"""This node as the other nodes see it: the address and interface on its route to the master.

On several machines, torch's collectives must not pick their network by themselves: gloo
binds to whatever this machine's hostname resolves to, which on many systems (a Debian
``127.0.1.1 host`` line, a container's hosts file) is a loopback address the other nodes
cannot reach, and the job hangs. The route to the master answers the question instead: a
UDP socket "connected" to the master sends nothing, but the kernel picks its route and its
local address, which is this node's address as the master sees it; the interface holding
that address is the one gloo (``GLOO_SOCKET_IFNAME``) and nccl (``NCCL_SOCKET_IFNAME``) use.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass

import psutil

from distml.errors import DistmlError

logger = logging.getLogger(__name__)

SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


class NetworkError(DistmlError):
    """This node cannot reach the master, or is misconfigured for a multi-node job."""


@dataclass(frozen=True)
class Route:
    """How this node reaches the master."""

    master: str  # as the user gave it (a name or an address)
    master_ip: str
    own_addr: str  # this node's address on that route
    interface: str  # the interface holding own_addr

    @property
    def master_is_here(self) -> bool:
        return self.master_ip in local_addresses() or is_loopback(self.master_ip)


def is_loopback(addr: str) -> bool:
    return ipaddress.ip_address(addr.split("%")[0]).is_loopback


def resolve(host: str) -> str:
    """The first address ``host`` resolves to on this node (IPv4 first)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise NetworkError(f"{host!r} does not resolve on this node ({e.strerror}); use an "
                           "address, or add the name to /etc/hosts or DNS") from None
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    return infos[0][4][0]


def local_addresses() -> dict[str, str]:
    """Every address of this node -> the interface holding it."""
    return {a.address.split("%")[0]: name for name, addrs in psutil.net_if_addrs().items()
            for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)}


def route_to(master: str, port: int) -> Route:
    """This node's address and interface on its route to ``master`` (nothing is sent)."""
    ip = resolve(master)
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, port))
        except OSError as e:
            raise NetworkError(f"no route from this node to the master {master} ({ip}): "
                               f"{e.strerror}; check its address and this node's network "
                               "(ip route)") from None
        own = s.getsockname()[0]
    interface = local_addresses().get(own)
    if interface is None:  # an address the kernel picked but psutil does not list
        raise NetworkError(f"this node reaches {master} ({ip}) from {own}, which no "
                           "interface holds; set GLOO_SOCKET_IFNAME to the interface to use")
    return Route(master, ip, own, interface)


def hostname_addresses() -> tuple[str, list[str]]:
    """This node's hostname and the addresses it resolves to here."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return name, []
    return name, sorted({i[4][0] for i in infos})


def set_collective_interface(route: Route) -> dict[str, str]:
    """Point gloo and nccl at the route's interface, unless the user chose one; returns
    what was set. Read when the process group is created, so call this before that."""
    chosen = {k: route.interface for k in SOCKET_IFNAME_VARS if not os.environ.get(k)}
    os.environ.update(chosen)
    if chosen:
        logger.info("collectives use %s (%s), the interface on the route to the master %s",
                    route.interface, route.own_addr, route.master)
    return chosen
