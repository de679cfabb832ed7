"""Tests for L{llmgw.clients}."""

from __future__ import annotations

from ipaddress import IPv4Network, ip_network

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmgw.clients import _TRUST_CACHE_SIZE, ClientAddressPolicy

PROXY = "192.0.2.1"
CLIENT = "203.0.113.9"
TRUSTING = ClientAddressPolicy(
    trusted_proxies=(ip_network("192.0.2.0/24"), ip_network("2001:db8:ffff::/48"))
)

# What a client can put in a header: raw bytes, and runs of the characters that
# mean something in these headers, so that open quotes and escapes are common.
# Line breaks would end the header on the wire.
MEANINGFUL = rb'" \ , ; = for= [ ] : % _x unknown 198.51.100.1 192.0.2.2 2001:db8::1 ::ffff:'
header_bytes = st.one_of(
    st.binary(max_size=100),
    st.lists(st.sampled_from([b" ", *MEANINGFUL.split()]), max_size=20).map(b"".join),
).filter(lambda value: b"\r" not in value and b"\n" not in value)


def headers(**fields: str | list[str]) -> Headers:
    """Headers from keyword arguments: C{x_forwarded_for=...}, C{forwarded=...}."""
    result = Headers()
    for name, value in fields.items():
        lines = [value] if isinstance(value, str) else value
        result.setRawHeaders(name.replace("_", "-").encode(), [line.encode() for line in lines])
    return result


class PeerKeyTests(SynchronousTestCase):
    policy = ClientAddressPolicy()

    def test_ipv4(self) -> None:
        self.assertEqual(self.policy.client_key(CLIENT, Headers()), CLIENT)

    def test_ipv4_mapped(self) -> None:
        self.assertEqual(self.policy.client_key("::ffff:203.0.113.9", Headers()), CLIENT)

    def test_ipv6_grouped_by_prefix(self) -> None:
        key = self.policy.client_key("2001:db8:0:ff12:3456::1", Headers())
        self.assertEqual(key, "2001:db8:0:ff00::/56")
        self.assertEqual(self.policy.client_key("2001:db8:0:ffab::2", Headers()), key)
        self.assertEqual(
            self.policy.client_key("2001:db8:0:fe00::1", Headers()), "2001:db8:0:fe00::/56"
        )

    def test_ipv6_prefix_is_configurable(self) -> None:
        host = "2001:db8:0:ff12:3456::1"
        self.assertEqual(
            ClientAddressPolicy(ipv6_prefix=64).client_key(host, Headers()),
            "2001:db8:0:ff12::/64",
        )
        self.assertEqual(
            ClientAddressPolicy(ipv6_prefix=128).client_key(host, Headers()),
            "2001:db8:0:ff12:3456::1/128",
        )
        self.assertEqual(ClientAddressPolicy(ipv6_prefix=0).client_key(host, Headers()), "::/0")

    def test_rejects_impossible_prefix(self) -> None:
        self.assertRaises(ValueError, ClientAddressPolicy, (), 129)
        self.assertRaises(ValueError, ClientAddressPolicy, (), -1)

    def test_ipv6_zone_is_dropped(self) -> None:
        self.assertEqual(self.policy.client_key("fe80::1%eth0", Headers()), "fe80::/56")

    def test_not_an_address(self) -> None:
        """A UNIX socket's peers have no address: they all share one key."""
        self.assertEqual(self.policy.client_key("/run/llmgw.sock", Headers()), "/run/llmgw.sock")
        self.assertEqual(self.policy.client_key("a:b:c", Headers()), "a:b:c")

    def test_forwarding_headers_ignored_without_trusted_proxies(self) -> None:
        spoofed = headers(x_forwarded_for="198.51.100.1", forwarded="for=198.51.100.2")
        self.assertEqual(self.policy.client_key(CLIENT, spoofed), CLIENT)


class TrustedProxyTests(SynchronousTestCase):
    def key(self, peer: str = PROXY, **fields: str | list[str]) -> str:
        return TRUSTING.client_key(peer, headers(**fields))

    def test_untrusted_peer_headers_ignored(self) -> None:
        self.assertEqual(self.key("198.51.100.7", x_forwarded_for=CLIENT), "198.51.100.7")
        self.assertEqual(self.key("198.51.100.7", forwarded=f"for={CLIENT}"), "198.51.100.7")
        self.assertEqual(self.key("2001:db8:1::1", x_forwarded_for=CLIENT), "2001:db8:1::/56")

    def test_trusted_peer_believed(self) -> None:
        self.assertEqual(self.key(x_forwarded_for=CLIENT), CLIENT)
        self.assertEqual(self.key(forwarded=f"for={CLIENT}"), CLIENT)

    def test_trusted_ipv6_and_mapped_peers(self) -> None:
        self.assertEqual(self.key("2001:db8:ffff::1", x_forwarded_for=CLIENT), CLIENT)
        self.assertEqual(self.key("::ffff:192.0.2.1", x_forwarded_for=CLIENT), CLIENT)

    def test_trusted_peer_without_headers(self) -> None:
        self.assertEqual(self.key(), PROXY)

    def test_chain_of_trusted_proxies(self) -> None:
        self.assertEqual(self.key(x_forwarded_for=f"{CLIENT}, 192.0.2.2, 192.0.2.3"), CLIENT)
        self.assertEqual(self.key(x_forwarded_for=[CLIENT, "192.0.2.2", "192.0.2.3"]), CLIENT)
        self.assertEqual(
            self.key(forwarded=f'for={CLIENT};proto=https, for="[2001:db8:ffff::5]:8443"'),
            CLIENT,
        )

    def test_client_cannot_prepend_itself_away(self) -> None:
        """Whatever the client claims sits left of what the first proxy saw."""
        self.assertEqual(self.key(x_forwarded_for=f"198.51.100.1, {CLIENT}, 192.0.2.2"), CLIENT)
        self.assertEqual(self.key(x_forwarded_for=["198.51.100.1", CLIENT]), CLIENT)
        self.assertEqual(self.key(forwarded=f"for=198.51.100.1, for={CLIENT}"), CLIENT)

    def test_only_trusted_hops(self) -> None:
        """A request made by the proxies themselves is keyed by the left-most one."""
        self.assertEqual(self.key(x_forwarded_for="192.0.2.5, 192.0.2.2"), "192.0.2.5")

    def test_ports_and_brackets(self) -> None:
        self.assertEqual(self.key(x_forwarded_for=f"{CLIENT}:4711"), CLIENT)
        self.assertEqual(self.key(x_forwarded_for="[2001:db8::1]:443"), "2001:db8::/56")
        self.assertEqual(self.key(x_forwarded_for="2001:db8:1:2::1"), "2001:db8:1::/56")
        self.assertEqual(self.key(forwarded='for="[2001:db8:cafe::17]:4711"'), "2001:db8:cafe::/56")
        self.assertEqual(self.key(forwarded=f'for="{CLIENT}:4711"'), CLIENT)

    def test_forwarded_syntax(self) -> None:
        self.assertEqual(self.key(forwarded=f"by=192.0.2.1;For={CLIENT};proto=http"), CLIENT)
        self.assertEqual(self.key(forwarded=f'for = "{CLIENT}" ; host=example.com'), CLIENT)
        self.assertEqual(self.key(forwarded=f"for=198.51.100.1,for={CLIENT}"), CLIENT)

    def test_forwarded_quoted_separators_are_data(self) -> None:
        self.assertEqual(self.key(forwarded=f'for={CLIENT};ext="x, for=198.51.100.1"'), CLIENT)
        self.assertEqual(self.key(forwarded=f'for={CLIENT};ext="x\\"; for=198.51.100.1"'), CLIENT)

    def test_forwarded_quoted_pairs(self) -> None:
        self.assertEqual(self.key(forwarded='for="203.0.113.\\9"'), CLIENT)

    def test_mapped_hop(self) -> None:
        self.assertEqual(self.key(x_forwarded_for=f"::ffff:{CLIENT}"), CLIENT)

    def test_empty_elements_ignored(self) -> None:
        self.assertEqual(self.key(x_forwarded_for=f"{CLIENT}, , "), CLIENT)
        self.assertEqual(self.key(forwarded=f"for={CLIENT},,"), CLIENT)

    def test_unknown_hop_is_keyed_by_the_proxy_that_wrote_it(self) -> None:
        self.assertEqual(self.key(forwarded="for=unknown"), PROXY)
        self.assertEqual(self.key(forwarded=f"for={CLIENT}, for=_hidden"), PROXY)
        self.assertEqual(self.key(forwarded=f"for={CLIENT}, proto=https"), PROXY)
        self.assertEqual(self.key(x_forwarded_for=f"{CLIENT}, garbage, 192.0.2.2"), "192.0.2.2")
        self.assertEqual(self.key(x_forwarded_for="999.1.2.3"), PROXY)
        self.assertEqual(self.key(x_forwarded_for="[2001:db8::1"), PROXY)
        self.assertEqual(self.key(x_forwarded_for="[2001:db8::1]x"), PROXY)

    def test_overlong_hop_is_garbage(self) -> None:
        """Longer than any real address: it is neither parsed nor cached."""
        self.assertEqual(self.key(x_forwarded_for="2001:db8::1%" + "a" * 50), PROXY)
        self.assertEqual(self.key(x_forwarded_for="1.2.3.4%eth0"), PROXY)

    def test_headers_that_agree(self) -> None:
        self.assertEqual(self.key(x_forwarded_for=CLIENT, forwarded=f"for={CLIENT}"), CLIENT)

    def test_headers_that_disagree(self) -> None:
        """One of them is the client's own: neither is believed."""
        self.assertEqual(self.key(x_forwarded_for=CLIENT, forwarded="for=198.51.100.1"), PROXY)

    @given(st.text(max_size=60), header_bytes, header_bytes)
    def test_garbage_never_raises(self, peer: str, forwarded_for: bytes, forwarded: bytes) -> None:
        fields = Headers()
        fields.setRawHeaders(b"x-forwarded-for", [forwarded_for])
        fields.setRawHeaders(b"forwarded", [forwarded])
        for policy in (ClientAddressPolicy(), TRUSTING):
            self.assertIsInstance(policy.client_key(peer, fields), str)
            self.assertIsInstance(policy.client_key(PROXY, fields), str)

    @given(header_bytes, header_bytes)
    def test_untrusted_peer_cannot_choose_its_key(
        self, forwarded_for: bytes, forwarded: bytes
    ) -> None:
        fields = Headers()
        fields.setRawHeaders(b"x-forwarded-for", [forwarded_for])
        fields.setRawHeaders(b"forwarded", [forwarded])
        self.assertEqual(TRUSTING.client_key(CLIENT, fields), CLIENT)

    @given(header_bytes, st.booleans())
    def test_client_cannot_hide_behind_a_trusted_proxy(self, claim: bytes, same_line: bool) -> None:
        """
        Whatever a client sends, once a trusted proxy appends the address it saw,
        that address is the key: a quote left open cannot swallow the proxy's hop.
        """
        for name, appended in (
            (b"x-forwarded-for", CLIENT.encode()),
            (b"forwarded", b"for=" + CLIENT.encode()),
            (b"forwarded", b'for="[2001:db8::1]:80"'),
        ):
            fields = Headers()
            if same_line:
                fields.setRawHeaders(name, [claim + b", " + appended])
            else:
                fields.setRawHeaders(name, [claim, appended])
            expected = CLIENT if b"[" not in appended else "2001:db8::/56"
            self.assertEqual(TRUSTING.client_key(PROXY, fields), expected)


class CountingNetwork(IPv4Network):
    """A network that counts how often it is asked whether it holds an address."""

    asked = 0

    def __contains__(self, other: object) -> bool:
        self.asked += 1
        return super().__contains__(other)


class TrustCacheTests(SynchronousTestCase):
    """Whether an address is a trusted proxy is worked out once, not per request."""

    def test_each_address_checked_once(self) -> None:
        network = CountingNetwork("192.0.2.0/24")
        policy = ClientAddressPolicy(trusted_proxies=(network,))
        for _ in range(3):
            self.assertEqual(policy.client_key(PROXY, headers(x_forwarded_for=CLIENT)), CLIENT)
            self.assertTrue(policy.trusts_peer(PROXY))
            self.assertFalse(policy.trusts_peer(CLIENT))
        self.assertEqual(network.asked, 2)

    def test_bounded(self) -> None:
        policy = ClientAddressPolicy(trusted_proxies=(ip_network("127.0.0.0/8"),))
        for n in range(_TRUST_CACHE_SIZE + 10):
            host = f"127.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
            self.assertTrue(policy.trusts_peer(host))
            self.assertFalse(policy.trusts_peer(f"198.51.{n >> 8 & 255}.{n & 255}"))
        self.assertLessEqual(len(policy._trusted), _TRUST_CACHE_SIZE)

    def test_not_part_of_the_value(self) -> None:
        """Two policies with the same settings are equal, whatever each has seen."""
        used = ClientAddressPolicy(trusted_proxies=(ip_network("192.0.2.0/24"),))
        used.trusts_peer(PROXY)
        fresh = ClientAddressPolicy(trusted_proxies=(ip_network("192.0.2.0/24"),))
        self.assertEqual((used, hash(used)), (fresh, hash(fresh)))
        self.assertNotIn("_trusted", repr(used))
