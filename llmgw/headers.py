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


def _as_stored() -> tuple[tuple[bytes, bytes], ...] | None:
    """
    The hardening headers as this Twisted's L{Headers} stores them, or
    L{None} if it keeps them in a way this module does not know.

    C{setRawHeaders} checks and canonicalises the name and sanitises the value
    on every call: thirteen times per response, the same constants each time
    (a hundredth of a worker's time under load, more on Twisted 22.4).  The
    stored form differs between versions (22.4 keys by the lowercased name,
    26 by the canonical one), so it is taken from Twisted itself, once.
    """
    probe = Headers()
    for name, value in HARDENING_HEADERS:
        probe.setRawHeaders(name, [value])
    raw = getattr(probe, "_rawHeaders", None)
    if not isinstance(raw, dict) or len(raw) != len(HARDENING_HEADERS):
        return None
    return tuple((name, values[0]) for name, values in raw.items())


_STORED = _as_stored()


def secure(headers: Headers) -> None:
    """Add the hardening headers and drop any banner that names the software."""
    for name in _BANNERS:
        headers.removeHeader(name)
    if _STORED is None:
        for name, value in HARDENING_HEADERS:
            headers.setRawHeaders(name, [value])
        return
    raw = headers._rawHeaders
    for name, value in _STORED:
        raw[name] = [value]  # a list of its own: a handler may add to it later
