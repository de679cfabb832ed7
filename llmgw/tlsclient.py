"""
The gateway's TLS client to the model servers: Twisted's verified TLS, with sessions resumed.

Each new connection to a model server (a stream, or a request the pool had no idle connection
for) used to pay a full handshake: a key exchange, the server's signature, and the check of its
certificate chain and host name, several hundred microseconds to milliseconds of a worker's CPU.
A resumed session skips the certificate and the signature: the server proves it still holds the
keys of a session this client verified when it was made.  So each origin's
L{SessionResumingCreator} keeps the newest session of a connection to that origin that finished
its handshake and presented that origin's identity, and offers it on the next connection (TLS 1.3
tickets and TLS 1.2 session ids or tickets alike: pyOpenSSL's C{get_session}/C{set_session}, in
every version we support).  A server that will not resume simply does a full handshake.

Verification stays Twisted's own: every connection is made by the creator that
C{BrowserLikePolicyForHTTPS} built for the origin (C{optionsForClientTLS}: the trust root, and
the host name checked with service_identity), and a session is only ever offered again to the
origin it was verified for, since there is one creator, and one OpenSSL context, per origin.

Idle connections and their buffers: Twisted's C{CertificateOptions} sets
C{SSL_MODE_RELEASE_BUFFERS} on every context it makes (Twisted 22.4 and 26 alike), so an idle
connection does not keep OpenSSL's 16 KB read and write buffers; nothing need be added here
(pyOpenSSL 24 and later refuse to change a context once a connection uses it, and Twisted makes
its client context on the first connection).
"""

from __future__ import annotations

from collections import deque

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

#: Seconds after a connection was opened before its session is offered to later connections.
#: A TLS 1.3 server sends its session tickets after the handshake, so a session taken as soon
#: as the handshake is done cannot be resumed; by the time a connection is this old it has
#: long finished its handshake and read its tickets on any healthy network.
SESSION_MATURITY = 0.5

#: Seconds a session, and the sessions resumed from it, are offered after the full handshake
#: that verified the server's certificate chain.  A busy gateway would otherwise resume one
#: chain of sessions for ever (each resumed TLS 1.3 handshake brings new tickets), and never
#: check the chain, its trust root or its expiry again (RFC 8446, section 4.6.1, asks a limit).
MAX_SESSION_LINEAGE = 3600.0

#: Connections opened closer together than this are not all kept to take a session from: one
#: in each such interval is enough, and it bounds what a burst of new connections keeps.
_CANDIDATE_SPACING = SESSION_MATURITY / 16


@implementer(IOpenSSLClientConnectionCreator)
class SessionResumingCreator:
    """
    Twisted's TLS client for one origin, offering each new connection the newest verified
    session of an earlier one.

    Sessions are taken lazily, when the next connection is made: the connections opened at
    least L{SESSION_MATURITY} ago are looked at, newest first, and the first that finished its
    handshake and presents this origin's identity gives its session.  Nothing is done per
    byte, and nothing when no new connection is needed.
    """

    def __init__(
        self,
        creator: IOpenSSLClientConnectionCreator,
        hostname: str,
        clock: IReactorTime,
    ) -> None:
        """
        @param creator: Twisted's creator for the origin, which makes and verifies every
            connection (e.g. C{BrowserLikePolicyForHTTPS().creatorForNetloc(host, port)}).
        @param hostname: the origin's host name or IP address, in ASCII (IDNA) form, as
            C{creator} checks it.
        @param clock: tells how old a connection is.
        """
        self._creator = creator
        self._hostname = hostname
        self._host_is_ip = isIPAddress(hostname) or isIPv6Address(hostname)
        self._clock = clock
        self._session: SSL.Session | None = None
        #: When the full handshake that verified the kept session's lineage was made.
        self._session_verified_at = 0.0
        #: (opened at, connection, when its session's lineage was verified)
        self._candidates: deque[tuple[float, SSL.Connection, float]] = deque()
        self._verified_certificate: bytes | None = None

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection: SSL.Connection = self._creator.clientConnectionForTLS(tlsProtocol)
        now = self._clock.seconds()
        self._take_newest_session(now)
        verified_at = now
        if self._session is not None and now - self._session_verified_at < MAX_SESSION_LINEAGE:
            try:
                connection.set_session(self._session)
                verified_at = self._session_verified_at
            except (ValueError, SSL.Error):
                # Refused (made under another context, or OpenSSL would not take it): a
                # full handshake, then, and never this session again.
                self._session = None
        if not self._candidates or now - self._candidates[-1][0] >= _CANDIDATE_SPACING:
            # If the server declines to resume, this connection's session is newer than
            # verified_at says: erring on the side of checking again sooner.
            self._candidates.append((now, connection, verified_at))
        return connection

    def _take_newest_session(self, now: float) -> None:
        """Take the session of the newest connection old enough to have all of it, if any."""
        matured: list[tuple[float, SSL.Connection, float]] = []
        while self._candidates and now - self._candidates[0][0] >= SESSION_MATURITY:
            matured.append(self._candidates.popleft())
        for _, connection, verified_at in reversed(matured):
            if connection.get_peer_finished() is None:
                continue  # it never finished its handshake: refused, or still stuck
            session = connection.get_session()
            if session is not None and self._presents_identity(connection):
                self._session = session
                self._session_verified_at = verified_at
                return

    def _presents_identity(self, connection: SSL.Connection) -> bool:
        """
        Whether the connection's server certificate is valid for this origin's host.

        Twisted checked it during the handshake and refused the connection otherwise; but on
        Twisted 22.4 the host name is checked only once OpenSSL has finished the handshake, so
        a refused connection still holds a complete session.  OpenSSL does not resume it (the
        connection was aborted), and Twisted 22.4 would check the host again on a resumed
        handshake, but a session is kept only if this check, here, says it is the origin's.
        It is made once for each certificate the server presents.
        """
        certificate = connection.get_peer_certificate()
        if certificate is None or certificate.has_expired():
            return False
        digest = certificate.digest("sha256")
        if digest == self._verified_certificate:
            return True
        try:
            if self._host_is_ip:
                verify_ip_address(connection, self._hostname)
            else:
                verify_hostname(connection, self._hostname)
        except (VerificationError, CertificateError):
            return False
        self._verified_certificate = digest
        return True
