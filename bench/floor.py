"""
The request floor: the least a Twisted + treq forwarder can do per request.

    python bench/floor.py PORT UPSTREAM_URL CAFILE WORKERS

No validation, limiter, keys or hardening headers: parse the JSON body, forward
it over a pooled, verified HTTPS connection, write the reply back.  WORKERS
processes adopt one listening socket, as the gateway's workers do, so the two
are compared at the same shape.  The bench's ratio "gateway ÷ floor" says how
much of the gateway's cost is its own rather than the stack's.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys

import treq
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.web import resource, server
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IResponse

#: The environment variable that tells a worker which descriptor is the socket.
WORKER_FD = "FLOOR_FD"
PR_SET_PDEATHSIG = 1


class ForwardChat(resource.Resource):
    """POST a request's JSON body to the upstream and answer with its reply."""

    isLeaf = True

    def __init__(self, http: treq.client.HTTPClient, upstream: str) -> None:
        super().__init__()
        self.http = http
        self.upstream = upstream

    def render_POST(self, request: server.Request) -> object:
        assert request.content is not None
        body = json.loads(request.content.read())
        forwarded = self.http.post(
            self.upstream,
            data=json.dumps(body).encode(),
            headers={b"content-type": [b"application/json"]},
        )

        def read(response: IResponse) -> Deferred[tuple[int, bytes]]:
            return treq.content(response).addCallback(lambda content: (response.code, content))

        def reply(result: tuple[int, bytes]) -> None:
            code, content = result
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json")
            request.write(content)
            request.finish()

        forwarded.addCallback(read)
        forwarded.addCallback(reply)
        return server.NOT_DONE_YET


def serve(fd: int, upstream: str, cafile: str) -> None:
    """One worker: adopt the parent's listening socket and forward until killed."""
    with open(cafile, "rb") as f:
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = 200
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trust), pool=pool)
    site = server.Site(ForwardChat(treq.client.HTTPClient(agent), upstream))
    site.log = lambda request: None  # no access log: the floor does no work it need not
    reactor.adoptStreamPort(fd, socket.AF_INET, site)
    # The bench reads idle memory, and starts its load, once every worker says this.
    reactor.callWhenRunning(print, "serving", flush=True)
    reactor.run()


def supervise(port: int, workers: int) -> None:
    """Bind 127.0.0.1:PORT, start WORKERS copies of this script on it, wait for them."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    listener.set_inheritable(True)
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            os.environ[WORKER_FD] = str(listener.fileno())
            os.execv(sys.executable, [sys.executable, *sys.argv])
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)


def main() -> None:
    port, upstream, cafile, workers = sys.argv[1:5]
    if WORKER_FD in os.environ:
        # A worker never outlives its parent: the bench kills the parent's session.
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        serve(int(os.environ[WORKER_FD]), upstream, cafile)
    else:
        supervise(int(port), int(workers))


if __name__ == "__main__":
    main()
