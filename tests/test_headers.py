"""
Tests for L{llmgw.headers}: the hardening headers, with the values written out
here (not imported), so a changed value in the module fails a test.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmgw import headers as headers_module
from llmgw.headers import HARDENING_HEADERS, secure

EXPECTED: dict[bytes, bytes] = {
    b"content-security-policy": b"default-src 'none'; frame-ancestors 'none'",
    b"cross-origin-opener-policy": b"same-origin",
    b"cross-origin-resource-policy": b"same-origin",
    b"origin-agent-cluster": b"?1",
    b"referrer-policy": b"no-referrer",
    b"strict-transport-security": b"max-age=31536000; includeSubDomains",
    b"x-content-type-options": b"nosniff",
    b"x-dns-prefetch-control": b"off",
    b"x-download-options": b"noopen",
    b"x-frame-options": b"DENY",
    b"x-permitted-cross-domain-policies": b"none",
    b"x-xss-protection": b"0",
    b"cache-control": b"no-store",
}


def as_dict(headers: Headers) -> dict[bytes, list[bytes]]:
    return {name.lower(): list(values) for name, values in headers.getAllRawHeaders()}


class SecureTests(SynchronousTestCase):
    def test_exactly_the_listed_headers(self) -> None:
        headers = Headers()
        secure(headers)
        self.assertEqual(as_dict(headers), {name: [value] for name, value in EXPECTED.items()})

    def test_banners_removed(self) -> None:
        headers = Headers(
            {
                b"Server": [b"TwistedWeb/26.10.0"],
                b"X-Powered-By": [b"Twisted", b"Python"],
            }
        )
        secure(headers)
        self.assertFalse(headers.hasHeader(b"Server"))
        self.assertFalse(headers.hasHeader(b"X-Powered-By"))
        self.assertEqual(as_dict(headers), {name: [value] for name, value in EXPECTED.items()})

    def test_banners_removed_whatever_their_case(self) -> None:
        headers = Headers()
        headers.addRawHeader(b"server", b"TwistedWeb/22.4.0")
        headers.addRawHeader(b"x-powered-by", b"Python")
        secure(headers)
        self.assertIsNone(headers.getRawHeaders(b"SERVER"))
        self.assertIsNone(headers.getRawHeaders(b"X-POWERED-BY"))

    def test_existing_values_replaced(self) -> None:
        """A handler's weaker value (or a duplicate) does not survive."""
        headers = Headers(
            {
                b"Cache-Control": [b"public, max-age=3600"],
                b"X-Frame-Options": [b"SAMEORIGIN", b"ALLOW-FROM https://example.com"],
                b"Referrer-Policy": [b"unsafe-url"],
            }
        )
        secure(headers)
        self.assertEqual(headers.getRawHeaders(b"Cache-Control"), [b"no-store"])
        self.assertEqual(headers.getRawHeaders(b"X-Frame-Options"), [b"DENY"])
        self.assertEqual(headers.getRawHeaders(b"Referrer-Policy"), [b"no-referrer"])

    def test_other_headers_kept(self) -> None:
        headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"Allow": [b"POST"],
                b"Retry-After": [b"3"],
                b"RateLimit": [b'"default";r=0;t=3'],
            }
        )
        secure(headers)
        self.assertEqual(
            as_dict(headers),
            {
                **{name: [value] for name, value in EXPECTED.items()},
                b"content-type": [b"application/json"],
                b"allow": [b"POST"],
                b"retry-after": [b"3"],
                b"ratelimit": [b'"default";r=0;t=3'],
            },
        )

    def test_idempotent(self) -> None:
        headers = Headers({b"Server": [b"x"]})
        secure(headers)
        secure(headers)
        self.assertEqual(as_dict(headers), {name: [value] for name, value in EXPECTED.items()})


class StoredFormTests(SynchronousTestCase):
    """L{secure} writes the stored form directly; it must be what C{setRawHeaders} stores."""

    def test_as_twisted_stores_them(self) -> None:
        """Name for name, value for value, in order, what Twisted's own setter would store."""
        with_setter = Headers({b"Content-Type": [b"application/json"], b"X-Frame-Options": [b"x"]})
        for name, value in HARDENING_HEADERS:
            with_setter.setRawHeaders(name, [value])
        direct = Headers({b"Content-Type": [b"application/json"], b"X-Frame-Options": [b"x"]})
        secure(direct)
        self.assertEqual(list(direct.getAllRawHeaders()), list(with_setter.getAllRawHeaders()))
        self.assertEqual(direct, with_setter)
        self.assertEqual(direct.getRawHeaders(b"x-xss-protection"), [b"0"])
        self.assertEqual(direct.getRawHeaders("Cache-Control"), ["no-store"])

    def test_values_not_shared(self) -> None:
        """A value added to one response's header never shows in the next response's."""
        first, second = Headers(), Headers()
        secure(first)
        first.addRawHeader(b"Cache-Control", b"private")
        secure(second)
        self.assertEqual(second.getRawHeaders(b"Cache-Control"), [b"no-store"])

    def test_unknown_storage_falls_back(self) -> None:
        """A Twisted that stores headers some other way still gets them, through its setter."""
        self.patch(headers_module, "_STORED", None)
        headers = Headers()
        secure(headers)
        self.assertEqual(as_dict(headers), {name: [value] for name, value in EXPECTED.items()})
