"""
Tests for L{llmgw.tlsclient}: sessions resumed to the same origin only, and verification intact.

The servers here run Python's C{ssl} module, as uvicorn (and so vLLM) does, over memory BIOs in a
Twisted protocol on 127.0.0.1: its C{session_reused} says, for each handshake, whether the client
resumed a session, which pyOpenSSL's public API cannot tell.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import lib as openssl
from service_identity import VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import BrowserLikePolicyForHTTPS

from llmgw.devtls import CertificateAuthority, issue_server_certificate, make_ca
from llmgw.tlsclient import MAX_SESSION_LINEAGE, SESSION_MATURITY, SessionResumingCreator
from tests.loopback import inline, port_of, reactor


def server_context(
    test: TestCase,
    ca: CertificateAuthority,
    hostnames: tuple[str, ...] = ("localhost",),
    tls12: bool = False,
) -> ssl.SSLContext:
    """A server context with a certificate from C{ca}, resuming sessions as Python's does."""
    cert_pem, key_pem = issue_server_certificate(ca, hostnames, ips=())
    path = Path(test.mktemp())
    path.write_bytes(cert_pem + key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(path)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


class PythonTLSServer(Protocol):
    """Answers each C{ping} with C{pong} over TLS, and notes whether its handshake resumed."""

    factory: PythonTLSServerFactory
    transport: Any

    def connectionMade(self) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = self.factory.context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.handshaken = False

    def dataReceived(self, data: bytes) -> None:
        self.incoming.write(data)
        said = b"ping"
        try:
            if not self.handshaken:
                self.tls.do_handshake()
                self.handshaken = True
                self.factory.resumed.append(self.tls.session_reused)
            while said == b"ping":
                said = self.tls.read(4)
                if said == b"ping":
                    self.tls.write(b"pong")
            if not said:
                self.tls.unwrap()  # the client's close_notify read: answer it
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            said = b""
        self.transport.write(self.outgoing.read())
        if not said:  # the client said goodbye, or failed the handshake
            self.transport.loseConnection()


class PythonTLSServerFactory(Factory):
    """
    @ivar context: what new connections are served with (a test may swap it).
    @ivar resumed: for each completed handshake, in order, whether it resumed a session.
    """

    protocol = PythonTLSServer  # type: ignore[assignment]
    noisy = False

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.resumed: list[bool] = []


def serve(test: TestCase, server: PythonTLSServerFactory) -> int:
    """Listen on 127.0.0.1 for the test's length; the port."""
    port = reactor.listenTCP(0, server, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return port_of(port)


class Ping(Protocol):
    """Says C{ping}, and hangs up once C{pong} comes back."""

    transport: Any

    def __init__(self) -> None:
        self.ponged = False
        self.reason: Failure | None = None
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        self.ponged = data == b"pong"
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reason = reason
        self.ended.callback(None)


async def ping(endpoint: Any) -> Failure | None:
    """
    One connection through C{endpoint}, C{ping} and C{pong}; L{None} if that worked, or why
    the connection ended without it.
    """
    protocol = Ping()
    await endpoint.connect(Factory.forProtocol(lambda: protocol))
    await protocol.ended
    reason = protocol.reason
    assert reason is not None
    return None if protocol.ponged and reason.check(ConnectionDone) else reason


def policy(ca: CertificateAuthority) -> BrowserLikePolicyForHTTPS:
    """The gateway's policy, trusting C{ca} alone."""
    return BrowserLikePolicyForHTTPS(trustRootFromCertificates([Certificate.loadPEM(ca.cert_pem)]))


def resuming_creator(ca: CertificateAuthority, port: int, clock: Clock) -> SessionResumingCreator:
    """A creator for C{https://localhost:port}, as the gateway makes it."""
    return SessionResumingCreator(
        policy(ca).creatorForNetloc(b"localhost", port), "localhost", clock
    )


def tls_endpoint(creator: SessionResumingCreator, port: int) -> Any:
    return wrapClientTLS(creator, HostnameEndpoint(reactor, "localhost", port))


def origin(
    test: TestCase, **context: Any
) -> tuple[CertificateAuthority, PythonTLSServerFactory, Clock, Any]:
    """
    A server (TLS 1.3 unless C{tls12=True}; C{context} goes to L{server_context}), and an
    endpoint to it through a resuming creator on a fake clock.
    """
    ca = make_ca()
    server = PythonTLSServerFactory(server_context(test, ca, **context))
    port = serve(test, server)
    clock = Clock()
    return ca, server, clock, tls_endpoint(resuming_creator(ca, port, clock), port)


class ResumptionTests(TestCase):
    async def _resumes(self, tls12: bool) -> None:
        _ca, server, clock, endpoint = origin(self, tls12=tls12)
        self.assertIsNone(await ping(endpoint))
        clock.advance(SESSION_MATURITY)
        self.assertIsNone(await ping(endpoint))
        self.assertIsNone(await ping(endpoint))
        self.assertEqual(server.resumed, [False, True, True])

    @inline
    async def test_tls13_ticket_resumed(self) -> None:
        """The second and later connections to the origin resume the first one's session."""
        await self._resumes(tls12=False)

    @inline
    async def test_tls12_session_resumed(self) -> None:
        await self._resumes(tls12=True)

    @inline
    async def test_offered_once_old_enough(self) -> None:
        """
        A connection's session is offered only once it is old enough to hold its TLS 1.3
        tickets (sent after the handshake): one taken at once cannot be resumed.
        """
        _ca, server, clock, endpoint = origin(self)
        self.assertIsNone(await ping(endpoint))
        clock.advance(SESSION_MATURITY / 2)
        self.assertIsNone(await ping(endpoint))
        clock.advance(SESSION_MATURITY / 2)
        self.assertIsNone(await ping(endpoint))
        self.assertEqual(server.resumed, [False, False, True])

    @inline
    async def test_newest_session_offered(self) -> None:
        """
        A server that has forgotten an old session (here: a new context, so new ticket keys)
        resumes the newer one that the client takes from its latest connection.
        """
        ca, server, clock, endpoint = origin(self)
        self.assertIsNone(await ping(endpoint))
        clock.advance(SESSION_MATURITY)
        server.context = server_context(self, ca)
        self.assertIsNone(await ping(endpoint))  # the old session is refused: a full handshake
        clock.advance(SESSION_MATURITY)
        self.assertIsNone(await ping(endpoint))
        self.assertEqual(server.resumed, [False, False, True])

    @inline
    async def test_lineage_verified_again_after_an_hour(self) -> None:
        """
        Sessions resumed from sessions keep being offered for MAX_SESSION_LINEAGE after the
        full handshake that verified the chain; then a full handshake checks it again, and
        its session starts a new lineage.
        """
        _ca, server, clock, endpoint = origin(self)
        self.assertIsNone(await ping(endpoint))
        for _ in range(3):
            clock.advance(MAX_SESSION_LINEAGE / 3 - 1)
            self.assertIsNone(await ping(endpoint))
        clock.advance(3)  # an hour after the full handshake
        self.assertIsNone(await ping(endpoint))
        clock.advance(SESSION_MATURITY)
        self.assertIsNone(await ping(endpoint))
        self.assertEqual(server.resumed, [False, True, True, True, False, True])


class VerificationTests(TestCase):
    def assertRefused(self, reason: Failure | None) -> None:
        """The connection failed its handshake (which Twisted also logs)."""
        self.assertIsNotNone(reason)
        assert reason is not None
        self.assertTrue(reason.check(SSL.Error, VerificationError), reason)
        self.flushLoggedErrors(SSL.Error, VerificationError)

    async def _wrong_host_refused(self, tls12: bool) -> None:
        _ca, server, clock, endpoint = origin(self, hostnames=("wrong.example",), tls12=tls12)
        self.assertRefused(await ping(endpoint))
        clock.advance(SESSION_MATURITY)
        self.assertRefused(await ping(endpoint))
        self.assertNotIn(True, server.resumed)

    @inline
    async def test_wrong_host_refused_and_its_session_never_offered(self) -> None:
        """
        A server whose certificate is for another host is refused every time, and the
        refused connection's session is never offered again.
        """
        await self._wrong_host_refused(tls12=False)

    @inline
    async def test_wrong_host_tls12_session_never_offered(self) -> None:
        """
        On Twisted 22.4, OpenSSL finishes a TLS 1.2 handshake (the server's included) before
        Twisted checks the host name, so the refused connection holds a complete session.
        """
        await self._wrong_host_refused(tls12=True)

    @inline
    async def test_server_that_cannot_resume_is_verified_again(self) -> None:
        """
        A session is offered again, but a server that does not take it (here: new ticket keys,
        and a certificate for another host) gets a full handshake, checked as ever.
        """
        ca, server, clock, endpoint = origin(self)
        self.assertIsNone(await ping(endpoint))
        clock.advance(SESSION_MATURITY)
        self.assertIsNone(await ping(endpoint))
        self.assertEqual(server.resumed, [False, True])
        server.context = server_context(self, ca, hostnames=("wrong.example",))
        self.assertRefused(await ping(endpoint))
        self.assertNotIn(True, server.resumed[2:])

    @inline
    async def test_untrusted_server_refused(self) -> None:
        ca = make_ca()
        server = PythonTLSServerFactory(server_context(self, make_ca()))
        port = serve(self, server)
        clock = Clock()
        endpoint = tls_endpoint(resuming_creator(ca, port, clock), port)
        self.assertRefused(await ping(endpoint))
        clock.advance(SESSION_MATURITY)
        self.assertRefused(await ping(endpoint))
        self.assertEqual(server.resumed, [])


class ReleaseBuffersTests(TestCase):
    def test_idle_connections_release_buffers(self) -> None:
        """
        Connections are made under a context with C{SSL_MODE_RELEASE_BUFFERS}, so an idle one
        does not hold OpenSSL's read and write buffers.  Twisted's C{CertificateOptions} sets it
        (22.4 and 26 alike); this guards that the creator keeps it.  pyOpenSSL cannot read a
        context's mode, and from 24 on refuses to change one in use, so OpenSSL is asked
        directly: adding no mode returns the current ones.
        """
        creator = resuming_creator(make_ca(), 443, Clock())
        factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol))
        connection = creator.clientConnectionForTLS(factory.buildProtocol(None))
        context = connection.get_context()
        mode = openssl.SSL_CTX_set_mode(context._context, 0)
        self.assertEqual(mode & SSL.MODE_RELEASE_BUFFERS, SSL.MODE_RELEASE_BUFFERS)
