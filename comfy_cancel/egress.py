"""Where a runner may connect: the guard between a customer's ``endpoint_url`` and the
operator's network.

A runner's endpoint is chosen by a customer, but the runner and cancel workers connect
to it from inside the operator's network, next to Redis, the database and the cloud's
metadata service. So a runner may reach only globally routable addresses, unless the
operator lists a network in ``COMFY_CANCEL_RUNNER_ALLOWED_NETWORKS`` (GPU servers on a
private network, or ``127.0.0.0/8`` for the embedded stack).

The address is checked twice: when a runner is registered (:meth:`EgressPolicy.check_url`,
a clear refusal for the customer) and when a worker connects
(:meth:`EgressPolicy.connect`): the name is resolved once, every address is checked, and
the socket is opened to the checked address itself, so a name that resolves elsewhere
later (DNS rebinding) cannot lead a worker anywhere the policy forbids.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from comfy_cancel.redact import redact_url


class EgressSettings(Protocol):
    """What the policy reads from the settings (config.Settings has it)."""

    runner_allowed_networks: str

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_NETWORKS_SETTING = "COMFY_CANCEL_RUNNER_ALLOWED_NETWORKS"
SCHEMES = frozenset({"http", "https"})

# Names that mean an address whatever DNS says: RFC 6761's localhost, and the clouds'
# metadata services (all at the link-local 169.254.169.254 or its IPv6 twin).
_LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
_METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
_METADATA_NAMES = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data",
    "instance-data.ec2.internal", "metadata.azure.com", "metadata.platformequinix.com",
})
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class EgressDenied(ValueError):
    """The URL or address is not one a runner may reach; the message says why and what
    the operator can do."""


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """``"10.0.0.0/8, fd00::/8"`` as networks; a ValueError names a bad entry."""
    networks = []
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not a network in CIDR notation ({exc})") from None
    return tuple(networks)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4, IPv4-compatible):
    the packet ends at that IPv4 address, so it is the one to judge."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(ip.packed[-4:])
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.packed[:12] == bytes(12) and int(ip) > 1:  # ::a.b.c.d (deprecated form)
        return ipaddress.IPv4Address(ip.packed[-4:])
    return None


def non_public_kind(ip: IPAddress) -> str | None:
    """What kind of non-public address ``ip`` is ("loopback", "private", ...), or None
    when it is globally routable."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return non_public_kind(inner)
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("shared (carrier-grade NAT)", isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("not globally routable", not ip.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)


def _fixed_addresses(host: str) -> tuple[IPAddress, ...] | None:
    """The addresses a name stands for whatever DNS answers, or None for other names."""
    if host == "localhost" or host.endswith(".localhost"):
        return _LOOPBACK
    if host in _METADATA_NAMES:
        return _METADATA
    return None


@dataclass(frozen=True)
class EgressPolicy:
    """Globally routable addresses, plus the ``allowed`` networks."""

    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def of(cls, settings: EgressSettings) -> EgressPolicy:
        return cls(parse_networks(settings.runner_allowed_networks))

    def is_allowed(self, ip: IPAddress) -> bool:
        judged = ip
        if isinstance(ip, ipaddress.IPv6Address):
            judged = _embedded_ipv4(ip) or ip
        if any(judged in net or ip in net for net in self.allowed):
            return True
        return non_public_kind(ip) is None

    def _check(self, host: str, addresses: Iterable[IPAddress]) -> None:
        for ip in addresses:
            if not self.is_allowed(ip):
                shown = "" if str(ip) == host else f" ({ip})"
                raise EgressDenied(
                    f"{host} is {_article(non_public_kind(ip))} address{shown}; " + _POLICY_HINT
                )

    def check_url(self, url: str) -> None:
        """Refuse a runner URL that is not http(s) or whose host is not one a runner may
        reach. A name that does not resolve here is let through: it is checked again on
        every connection."""
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise EgressDenied(f"{redact_url(url)} is not an http(s) URL")
        host = _normalized_host(parts.hostname)
        if not host:
            raise EgressDenied(f"{redact_url(url)} names no host")
        fixed = _fixed_addresses(host)
        if fixed is not None and not any(self.is_allowed(ip) for ip in fixed):
            self._check(host, fixed)  # refused even where the name does not resolve
        literal = _literal(host)
        if literal is not None:
            self._check(host, [literal])
            return
        try:
            resolved = _resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
        except OSError:
            return
        for ip, _ in resolved:
            if not self.is_allowed(ip):
                # No address and no kind: a customer learns nothing about internal DNS.
                raise EgressDenied(f"{host} resolves to an address that is not public; "
                                   + _POLICY_HINT)

    def resolve(self, host: str, port: int) -> list[tuple[IPAddress, tuple[object, ...]]]:
        """The checked addresses of ``host`` (with their socket addresses) to connect to.
        Raises :class:`EgressDenied` when any address of the name is not allowed: a name
        mixing public and internal addresses is a rebinding trick, not a real server."""
        host = _normalized_host(host)
        resolved = _resolve(host, port)
        self._check(host, [ip for ip, _ in resolved])
        return resolved

    def connect(self, host: str, port: int, timeout: float | None) -> socket.socket:
        """A TCP connection to ``host`` at an address this policy allows. Raises
        :class:`EgressDenied` (never connected) or OSError (connecting failed)."""
        last: OSError | None = None
        for ip, sockaddr in self.resolve(host, port):
            sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                                 socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            return sock
        raise last or OSError(f"{host} has no address")


_POLICY_HINT = (
    "runners may reach only public addresses unless the operator allows the network in "
    f"{ALLOWED_NETWORKS_SETTING}"
)


def _article(kind: str | None) -> str:
    kind = kind or "non-public"
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _normalized_host(host: str | None) -> str:
    return (host or "").strip().rstrip(".").lower()


def _literal(host: str) -> IPAddress | None:
    """``host`` as an address when it is one in any form the resolver accepts
    (``2130706433``, ``0x7f.1``, ``::ffff:127.0.0.1``), without asking DNS."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return None
    return ipaddress.ip_address(str(infos[0][4][0]).split("%", 1)[0]) if infos else None


def _resolve(host: str, port: int) -> list[tuple[IPAddress, tuple[object, ...]]]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as exc:
        raise OSError(f"{host!r} is not a valid host name") from exc
    found: list[tuple[IPAddress, tuple[object, ...]]] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        found.append((ip, tuple(sockaddr)))
    if not found:
        raise OSError(f"{host} has no address")
    return found
