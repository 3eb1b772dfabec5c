"""Which addresses direct ingestion may connect to.

Direct ingestion makes the server open connections to hosts its users name,
so a user could aim it at the server's own services or a cloud metadata
endpoint. By default every address is allowed except loopback, link-local
(which includes 169.254.169.254, the usual cloud metadata address),
unspecified, multicast and reserved ones, the known metadata names and
addresses, and the addresses of this host's own interfaces (a user must not
reach services that listen on them, such as the embedded PostgreSQL or the
server itself, through the host's LAN address). HALTLESS_POLL_ALLOW (comma-separated CIDRs) replaces that: only
addresses inside those networks are allowed. The check runs when a source is
created or changed, and again before every connection (a name may resolve
differently later).
"""
from __future__ import annotations

import ipaddress
import socket
import time

from ..core.errors import TargetRefused

METADATA = {
    ipaddress.ip_address("169.254.169.254"),   # AWS, GCP, Azure, OpenStack, ...
    ipaddress.ip_address("169.254.170.2"),     # AWS ECS task metadata
    ipaddress.ip_address("fd00:ec2::254"),     # AWS IPv6
    ipaddress.ip_address("100.100.100.200"),   # Alibaba Cloud
}
METADATA_NAMES = {"metadata.google.internal", "metadata", "instance-data"}


def own_addresses() -> set:
    """The addresses of this host's interfaces."""
    import psutil
    out = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    out.add(ipaddress.ip_address(a.address.split("%")[0]))
                except ValueError:
                    pass
    return out


def check_host_name(host: str) -> None:
    """A host name's syntax (DNS labels of 1-63 characters, 253 in all), so a
    bad one is refused by name instead of failing in the resolver."""
    name = host.rstrip(".")
    if not name or len(name) > 253 or "\x00" in name:
        raise TargetRefused(f"{host[:80]!r} is not a valid host name (1-253 characters)")
    for label in name.split("."):
        if not label:
            raise TargetRefused(f"{host[:80]!r} is not a valid host name: it has an empty label "
                                "(two dots in a row, or a leading dot)")
        if len(label) > 63:
            raise TargetRefused(f"{host[:80]!r} is not a valid host name: the label "
                                f"{label[:20]!r}... is {len(label)} characters long; DNS allows 63")


NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _nat64(a: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    return ipaddress.IPv4Address(int(a) & 0xFFFFFFFF) if a in NAT64 else None


class AddressPolicy:
    OWN_TTL = 60.0  # seconds the host's interface addresses are cached

    def __init__(self, allow: tuple | list | None = None) -> None:
        self.allow = list(allow) if allow is not None else None
        self._own: tuple[float, set] = (0.0, set())

    def _is_own(self, ip) -> bool:
        until, own = self._own
        if time.monotonic() > until:
            own = own_addresses()
            self._own = (time.monotonic() + self.OWN_TTL, own)
        return ip in own

    def check_ip(self, ip: ipaddress._BaseAddress, host: str) -> None:
        if self.allow is not None:
            if not any(ip in net for net in self.allow if net.version == ip.version):
                raise TargetRefused(
                    f"{host} ({ip}) is outside HALTLESS_POLL_ALLOW "
                    f"({', '.join(map(str, self.allow))}); add its network there to allow it")
            return
        why = None
        if ip in METADATA:
            why = "a cloud metadata address"
        elif ip.is_loopback:
            why = "a loopback address"
        elif ip.is_link_local:
            why = "a link-local address"
        elif ip.is_unspecified or ip.is_multicast or ip.is_reserved:
            why = "not a unicast device address"
        elif self._is_own(ip):
            why = "an address of this server's own host"
        if why:
            raise TargetRefused(
                f"{host} ({ip}) is {why}; direct ingestion refuses it by default. "
                "Set HALTLESS_POLL_ALLOW to the networks the pollers may reach to allow it")

    def check(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` and check every address; returns the addresses."""
        if host.lower().rstrip(".") in METADATA_NAMES and self.allow is None:
            raise TargetRefused(f"{host} is a cloud metadata name; direct ingestion refuses it")
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
            addrs = [ip]
        except ValueError:
            check_host_name(host)
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise TargetRefused(f"cannot resolve {host!r}: {exc.strerror}") from None
            except (UnicodeError, ValueError) as exc:  # IDNA: a label the codec refuses
                raise TargetRefused(f"{host[:80]!r} is not a valid host name ({exc})") from None
            addrs = []
            for info in infos:
                a = ipaddress.ip_address(info[4][0].split("%")[0])
                if a not in addrs:
                    addrs.append(a)
        for a in addrs:
            # IPv6 forms that carry an IPv4 address (mapped ::ffff:a.b.c.d,
            # 6to4 2002:AABB:CCDD::, Teredo's client address, NAT64
            # 64:ff9b::a.b.c.d) are checked as that address too:
            # 2002:7f00:1:: reaches 127.0.0.1 through a 6to4 relay.
            if isinstance(a, ipaddress.IPv6Address):
                for inner in (a.ipv4_mapped, a.sixtofour, a.teredo and a.teredo[1],
                              _nat64(a)):
                    if inner is not None:
                        self.check_ip(inner, host)
            self.check_ip(a, host)
        return [str(a) for a in addrs]
