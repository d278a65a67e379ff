"""Which addresses an untrusted URL may reach: the classifier and the allow-list, as pure functions.

Only public unicast addresses are fetched by default.  The check is on the IP address a socket is
about to connect to, so every spelling of an address (``127.1``, ``2130706433``, ``0x7f000001``,
``0177.0.0.1``, ``[::ffff:127.0.0.1]``) and every DNS answer is judged by what it resolves to.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field

# An operator-wide allow-list (a proxy, a mirror on the local network), added to the recipe's.
ALLOW_ENV = "DENSEFUSION_ALLOW_NETWORKS"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedAddress(OSError):
    """A connection refused by the guard; an OSError so that urllib reports it as a URLError."""

    marker = "blocked_address"

    def __str__(self) -> str:
        return f"[{self.marker}] {self.args[0]}"


def parse_ip(text: str) -> IPAddress | None:
    """The address a host string denotes without DNS, or None for a name.

    Accepts the legacy IPv4 spellings that ``inet_aton`` (so every resolver) accepts: decimal,
    octal and hex parts, and fewer than four parts.
    """
    host = text.strip().strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, UnicodeError, ValueError):
        return None


def address_kind(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address ("loopback", "private", ...), or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in ipaddress.ip_network("64:ff9b::/96"):  # NAT64
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_kind(embedded)
            return f"{inner} (IPv4 {embedded} inside IPv6)" if inner else None
        if ip in ipaddress.ip_network("fc00::/7"):
            return "unique-local"
    for kind in ("unspecified", "loopback", "link-local", "multicast", "reserved", "private"):
        if getattr(ip, "is_" + kind.replace("-", "_")):
            return kind
    if not ip.is_global:  # shared address space (100.64/10), documentation ranges, ...
        return "not globally routable"
    return None


def host_kind(host: str) -> str | None:
    """``address_kind`` for a host as written in a URL, without DNS: literal addresses in any spelling,
    and the names that always mean this machine.  Other names are judged after resolution."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return "loopback"
    ip = parse_ip(name)
    return address_kind(ip) if ip is not None else None


def parse_allowed(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | tuple[IPAddress, int]:
    """One allow-list entry: a network (``10.0.0.0/8``, ``fd00::/8``, one address) or an endpoint
    (``127.0.0.1:8080``, ``[::1]:8080``).  Raises ValueError with what is expected."""
    text = entry.strip()
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and (host.startswith("[") or host.count(":") == 0):
        ip = parse_ip(host)
        if ip is None or not host.strip("[]"):
            raise ValueError(f"{entry!r}: host:port needs an IP address as the host (names are not resolved)")
        if not 0 < int(port) < 65536:
            raise ValueError(f"{entry!r}: port must be 1-65535")
        return ip, int(port)
    try:
        return ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        raise ValueError(f"{entry!r}: expected a network (10.0.0.0/8), an address, or ip:port") from None


@dataclass(frozen=True)
class AddressPolicy:
    """What the guard lets through: public addresses always; others only when allowed."""

    allow_private: bool = False
    allowed: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for entry in self.allowed:
            parse_allowed(entry)  # fail early, with the entry named

    @classmethod
    def from_environment(cls, allow_private: bool, allowed: list[str] | tuple[str, ...] = ()) -> "AddressPolicy":
        extra = [e for e in os.environ.get(ALLOW_ENV, "").replace(",", " ").split() if e]
        return cls(allow_private, tuple(allowed) + tuple(extra))

    def refusal(self, ip: IPAddress, port: int) -> str | None:
        """Why connecting to ``ip:port`` is refused, or None when it is allowed."""
        kind = address_kind(ip)
        if kind is None or self.allow_private:
            return None
        for entry in map(parse_allowed, self.allowed):
            if isinstance(entry, tuple):
                if entry == (ip, port) or (ip.version == 6 and ip.ipv4_mapped and entry == (ip.ipv4_mapped, port)):
                    return None
            elif ip.version == entry.version and ip in entry:
                return None
        return f"{ip} is {kind}"
