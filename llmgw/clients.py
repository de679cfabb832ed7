"""
Who a client is, for the rate limiter.

The key must be something a client cannot change at will, or it could dodge
its limit by changing it: so forwarding headers are believed only from proxies
the operator trusts, and IPv6 clients, who are usually handed a whole prefix,
are counted by that prefix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import attrs
from twisted.web.http_headers import Headers

__all__ = ["ClientAddressPolicy"]

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

# An IPv6 address ending in dotted IPv4, with a zone named as long as an interface can be.
_LONGEST_ADDRESS = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255%") + 15
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_SPECIAL = re.compile(r'[\\",;]')

#: Addresses whose trust L{ClientAddressPolicy} remembers; past it, it starts afresh.
_TRUST_CACHE_SIZE = 4096


def _valid_prefix(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 128:
        raise ValueError(f"ipv6_prefix must be between 0 and 128, not {value!r}")


@attrs.frozen
class ClientAddressPolicy:
    """
    How to turn a request's peer and headers into the key the limiter counts by.

    With trusted proxies, the client is the right-most address in the
    forwarding chain (the peer appended last) that is not a trusted proxy.
    Each hop in that chain was written by the proxy to its right, so a hop that
    is not an address (C{unknown}, an obfuscated C{_identifier}, garbage) was
    written by a trusted proxy that could not or would not name its peer: the
    walk stops there and the client is that trusted proxy, which keeps every
    such client under one limit instead of letting anyone mint fresh keys.

    If a request carries both C{X-Forwarded-For} and C{Forwarded} and they name
    different clients, one of them came from the client unchanged, and nothing
    says which: the key is then the peer, so such requests share one limit.
    """

    trusted_proxies: tuple[Network, ...] = ()
    ipv6_prefix: int = attrs.field(default=56, validator=_valid_prefix)
    _trusted: dict[Address, bool] = attrs.field(
        factory=dict, init=False, eq=False, repr=False, hash=False
    )
    """Whether each address seen lately is a trusted proxy (see L{_trusts})."""

    def client_key(self, peer_host: str, headers: Headers) -> str:
        """
        The limiter's key: a dotted IPv4 address (IPv4-mapped IPv6 included),
        an IPv6 network such as C{2001:db8:0:ff00::/56}, or, for a peer that is
        not an IP address at all (a UNIX socket), C{peer_host} unchanged.
        """
        if not self.trusted_proxies:
            return self._peer_key(peer_host)
        peer = _parse_address(peer_host)
        if peer is None or not self._trusts(peer):
            return self._peer_key(peer_host)
        clients = set()
        forwarded_for = headers.getRawHeaders(b"x-forwarded-for")
        if forwarded_for is not None:
            clients.add(self._rightmost_client(_x_forwarded_for_nodes(forwarded_for), peer))
        forwarded = headers.getRawHeaders(b"forwarded")
        if forwarded is not None:
            clients.add(self._rightmost_client(_forwarded_for_nodes(forwarded), peer))
        client = clients.pop() if len(clients) == 1 else peer
        return _address_key(client, self.ipv6_prefix)

    def trusts_peer(self, peer_host: str) -> bool:
        """Whether C{peer_host} is a C{--trusted-proxy}, whose headers are believed."""
        if not self.trusted_proxies:
            return False
        peer = _parse_address(peer_host)
        return peer is not None and self._trusts(peer)

    def _peer_key(self, peer_host: str) -> str:
        if ":" not in peer_host:
            # A transport reports IPv4 peers in canonical dotted form already.
            return peer_host
        return _host_key(peer_host, self.ipv6_prefix)

    def _trusts(self, address: Address) -> bool:
        """
        Whether C{address} is in a C{--trusted-proxy} network.

        Asked for the peer and each forwarding hop of every request, and the
        answer for an address never changes (the networks are fixed), so it
        is remembered: the same few proxies ask again and again.
        """
        trusted = self._trusted.get(address)
        if trusted is None:
            trusted = any(address in network for network in self.trusted_proxies)
            if len(self._trusted) >= _TRUST_CACHE_SIZE:
                self._trusted.clear()
            self._trusted[address] = trusted
        return trusted

    def _rightmost_client(self, hops: list[str], peer: Address) -> Address:
        client = peer
        for hop in reversed(hops):
            address = _parse_node(hop)
            if address is None:
                return client
            client = address
            if not self._trusts(address):
                return client
        return client


@lru_cache(maxsize=4096)
def _parse_address(text: str) -> Address | None:
    """An IP address, IPv4-mapped IPv6 seen as the IPv4 it carries; None if not one."""
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@lru_cache(maxsize=4096)
def _address_key(address: Address, ipv6_prefix: int) -> str:
    if isinstance(address, IPv4Address):
        return str(address)
    host_bits = 128 - ipv6_prefix
    return f"{IPv6Address(int(address) >> host_bits << host_bits)}/{ipv6_prefix}"


def _host_key(host: str, ipv6_prefix: int) -> str:
    address = _parse_address(host)
    return host if address is None else _address_key(address, ipv6_prefix)


def _parse_node(node: str) -> Address | None:
    """
    An address from a forwarding hop, which may carry a port: C{192.0.2.1},
    C{192.0.2.1:8080}, C{2001:db8::1}, C{[2001:db8::1]} or C{[2001:db8::1]:8080}.
    """
    node = node.strip()
    if node.startswith("["):
        host, bracket, port = node[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return None
    elif node.count(":") == 1:
        host = node.partition(":")[0]
    else:
        host = node
    if len(host) > _LONGEST_ADDRESS:
        return None  # Not worth a parse, nor a place in its cache.
    return _parse_address(host)


def _x_forwarded_for_nodes(lines: Sequence[bytes]) -> list[str]:
    # RFC 9110 section 5.6.1: empty list elements are ignored.
    return [node for line in lines for node in line.decode("latin-1").split(",") if node.strip()]


def _forwarded_for_nodes(lines: Sequence[bytes]) -> list[str]:
    """
    The C{for=} node of each element of RFC 7239 C{Forwarded} fields, in order;
    an element without one is a hop whose sender is unknown, so it yields C{unknown}.
    Each field line is parsed on its own, so that a quote a client leaves open
    cannot reach into the line a proxy added.
    """
    nodes = []
    for line in lines:
        for element in _split_unquoted(line.decode("latin-1"), ","):
            if not element.strip():
                continue
            node = "unknown"
            for pair in _split_unquoted(element, ";"):
                name, _, token = pair.partition("=")
                if name.strip().lower() == "for":
                    node = _unquote(token.strip())
            nodes.append(node)
    return nodes


def _split_unquoted(text: str, separator: str) -> list[str]:
    """
    Split at C{separator}s outside quoted-strings, where commas and semicolons
    are data.  If a quote is left open, the rest is split as if it held none:
    otherwise a client could end its value inside a quote and so swallow what
    a proxy appends to it.
    """
    if '"' not in text:
        return text.split(separator)
    parts = []
    start = 0
    quoted = False
    escaped = -1
    for match in _SPECIAL.finditer(text):
        index = match.start()
        if index == escaped:
            continue
        char = match.group()
        if quoted:
            if char == "\\":
                escaped = index + 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == separator:
            parts.append(text[start:index])
            start = index + 1
    tail = text[start:]
    parts.extend(tail.split(separator) if quoted else [tail])
    return parts


def _unquote(token: str) -> str:
    if len(token) >= 2 and token[0] == '"' and token[-1] == '"':
        return _QUOTED_PAIR.sub(r"\1", token[1:-1])
    return token
