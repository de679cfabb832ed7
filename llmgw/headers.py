"""The hardening headers every response carries, errors included.

They are Helmet 8's defaults, with the two values OWASP's REST guidance asks a
JSON API to tighten (C{Content-Security-Policy} and C{X-Frame-Options}), plus
C{Cache-Control: no-store} because completions are private.  They are applied
in exactly one place, L{secure}, which the gateway's request class calls just
before the first byte of any response goes out, so no code path can forget.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

HARDENING_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Content-Security-Policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"Cross-Origin-Opener-Policy", b"same-origin"),
    (b"Cross-Origin-Resource-Policy", b"same-origin"),
    (b"Origin-Agent-Cluster", b"?1"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Strict-Transport-Security", b"max-age=31536000; includeSubDomains"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-DNS-Prefetch-Control", b"off"),
    (b"X-Download-Options", b"noopen"),
    (b"X-Frame-Options", b"DENY"),
    (b"X-Permitted-Cross-Domain-Policies", b"none"),
    (b"X-XSS-Protection", b"0"),
    (b"Cache-Control", b"no-store"),
)

_BANNERS = (b"Server", b"X-Powered-By")


def secure(headers: Headers) -> None:
    """Add the hardening headers and drop any banner that names the software."""
    for name in _BANNERS:
        headers.removeHeader(name)
    for name, value in HARDENING_HEADERS:
        headers.setRawHeaders(name, [value])
