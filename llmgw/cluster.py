"""One worker per core: the parent binds, spawns, supervises and drains; workers serve.

The parent binds the listening socket (in C{privilegedStartService}, so a low
port works with twistd's C{--uid}) and never accepts on it: each worker is a
fresh Python process, started with C{spawnProcess}, that finds the socket on
its file descriptor 3 and adopts it into its own reactor, so the kernel spreads
connections between them.

Each worker talks to the parent over AMP on its stdin and stdout, and asks it
about the limit on a pipe of its own (file descriptors 4 and 5, see
L{llmgw.admission}).  The parent owns the one sliding-window limiter, so the
limit holds for the whole gateway rather than once per worker, and answers
the console's C{stats} and C{verbose} by asking every worker.  A worker's
stderr is its log: the parent logs each line tagged with the worker's number.
A worker whose stdin closes has lost its parent, however the parent died, and
drains and exits.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sys
from typing import Any, ClassVar

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, ProcessDone
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from llmgw.admission import FROM_PARENT_FD, TO_PARENT_FD, AdmissionDesk
from llmgw.health import HealthChecker, Models, encode_models, state_name
from llmgw.keys import KeyRing
from llmgw.logs import AccessLogFile
from llmgw.metrics import MetricsTotals
from llmgw.options import Config
from llmgw.ratelimit import SlidingWindowLimiter
from llmgw.redisstore import RedisSlidingWindowLimiter
from llmgw.routing import COUNTS

log = Logger()

#: A worker that dies sooner than this after starting counts as crashing, and
#: its restarts back off exponentially up to L{MAX_BACKOFF} seconds.
STABLE_SECONDS = 10.0
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 10.0

#: How long the parent waits past --grace for workers to exit before SIGKILL.
KILL_MARGIN = 5.0


class MetricsDelta(amp.Command):
    """
    Worker → parent: my counts since my last delta, and my gauges now
    (L{llmgw.metrics.WorkerMetrics.take_delta}, as JSON).

    Sent every L{llmgw.metrics.SEND_INTERVAL} seconds while anything changed,
    before each L{WorkerStats} answer, and once more as the worker drains.
    """

    arguments: ClassVar = [(b"delta", amp.Unicode())]
    response: ClassVar = []


class WorkerStats(amp.Command):
    """Parent → worker: the console's C{stats} row for this worker."""

    arguments: ClassVar = []
    response: ClassVar = [
        (b"served", amp.Integer()),
        (b"in_flight", amp.Integer()),
        (b"refused", amp.Integer()),
        (b"upstream_errors", amp.Integer()),
        (b"uptime", amp.Float()),
        (b"replicas", amp.Unicode()),
    ]


class ReplicaState(amp.Command):
    """Parent → worker: the health checks' latest verdict on one C{--upstream} replica."""

    arguments: ClassVar = [
        (b"upstream", amp.Unicode()),
        (b"up", amp.Boolean()),
        (b"models", amp.Unicode()),
    ]
    response: ClassVar = []


class AccessLogLines(amp.Command):
    """
    Worker → parent: C{--access-log} lines (each ending with a newline) for
    the parent to append to the one file.  Unanswered: a worker sends a
    batch per reactor turn and has nothing to do with a reply.
    """

    arguments: ClassVar = [(b"lines", amp.Unicode())]
    response: ClassVar = []
    requiresAnswer = False


#: The most text one L{AccessLogLines} carries: an AMP value holds at most
#: 65,535 bytes, and the lines are ASCII (JSON escapes the rest).
ACCESS_LOG_CHUNK = 60_000


def access_log_chunks(lines: str) -> list[str]:
    """Split a batch of lines, at line ends, into pieces that fit one L{AccessLogLines}."""
    if len(lines) <= ACCESS_LOG_CHUNK:
        return [lines]
    chunks = []
    start = 0
    while start < len(lines):
        end = lines.rfind("\n", start, start + ACCESS_LOG_CHUNK) + 1
        if end <= start:  # one line longer than a chunk: its own piece, cut short
            end = lines.find("\n", start) + 1 or len(lines)
            chunks.append(lines[start : start + ACCESS_LOG_CHUNK - 1] + "\n")
        else:
            chunks.append(lines[start:end])
        start = end
    return chunks


class SetVerbose(amp.Command):
    """Parent → worker: the console's C{verbose on|off}."""

    arguments: ClassVar = [(b"on", amp.Boolean())]
    response: ClassVar = []


def config_to_json(config: Config) -> str:
    """The worker's copy of the configuration, for its command line (no secrets in it)."""
    values = attrs.asdict(config)
    values["trusted_proxies"] = [str(network) for network in config.trusted_proxies]
    values["allowed_fields"] = sorted(config.allowed_fields)
    return json.dumps(values)


def config_from_json(text: str) -> Config:
    values = json.loads(text)
    values["trusted_proxies"] = tuple(
        ipaddress.ip_network(network) for network in values["trusted_proxies"]
    )
    values["allowed_fields"] = frozenset(values["allowed_fields"])
    values["upstreams"] = tuple(values["upstreams"])
    return Config(**values)


def bind_listening_socket(config: Config, backlog: int = 1024) -> socket.socket:
    """
    The one listening socket every worker shares.  A failure raises what
    C{listenTCP} raises, L{CannotListenError}, so that start-up reports it
    alike with one worker or many.
    """
    family = socket.AF_INET6 if ":" in config.bindip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.bindip, config.bindport))
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise CannotListenError(config.bindip, config.bindport, error) from error
    sock.setblocking(False)
    return sock


class _ChildPipe:
    """A transport for writing to one of the worker's input pipes (its stdin for AMP)."""

    def __init__(self, process: Any, fd: int) -> None:
        self.process = process
        self.fd = fd

    def write(self, data: bytes) -> None:
        # An answer can come (from Redis) after the worker closed its end.
        if self.fd in self.process.pipes:
            self.process.writeToChild(self.fd, data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.process.writeToChild(self.fd, b"".join(data))

    def loseConnection(self) -> None:
        self.process.closeChildFD(self.fd)

    def getPeer(self) -> str:
        return "worker"

    def getHost(self) -> str:
        return "parent"


class QuietAMP(amp.AMP):
    """AMP without its connect and disconnect log lines: a worker's pipe is no news."""

    def makeConnection(self, transport: Any) -> None:
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class ParentSide(QuietAMP):
    """
    What the parent answers a worker over AMP: where its metrics and access-log
    lines go.  Its limiter's questions have a pipe of their own
    (L{llmgw.admission}).

    @ivar access_log: the C{--access-log} file the worker's lines go to, if any.
    """

    access_log: AccessLogFile | None = None

    def __init__(self, metrics: MetricsTotals | None = None, source: object = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.metrics = metrics
        self.source = source if source is not None else self

    @AccessLogLines.responder
    def access_log_lines(self, lines: str) -> dict[str, Any]:
        if self.access_log is not None:
            self.access_log.write(lines)
        return {}

    @MetricsDelta.responder
    def metrics_delta(self, delta: str) -> dict[str, Any]:
        if self.metrics is not None:
            self.metrics.apply_json(self.source, delta)
        return {}


class WorkerProcess(ProcessProtocol):
    """The parent's handle on one worker: its AMP channel and its log lines."""

    def __init__(self, supervisor: Supervisor, number: int) -> None:
        self.supervisor = supervisor
        self.number = number
        self.amp = ParentSide(supervisor.metrics, self)
        self.amp.access_log = supervisor.access_log
        self.admissions = AdmissionDesk(supervisor.limiter, supervisor.rate_store)
        self.started = supervisor.reactor.seconds()
        self.ended: Deferred[None] = Deferred()
        self._log_buffer = b""
        self.pid: int | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.amp.makeConnection(_ChildPipe(self.transport, 0))
        self.admissions.makeConnection(_ChildPipe(self.transport, FROM_PARENT_FD))  # type: ignore[no-untyped-call]
        for upstream, up, models in self.supervisor.replica_states():
            self.tell_replica_state(upstream, up, models)

    def tell_replica_state(self, upstream: str, up: bool, models: Models | None) -> None:
        """Pass on a health verdict; a worker that is gone will get them all when it respawns."""
        d = self.amp.callRemote(  # type: ignore[no-untyped-call]
            ReplicaState, upstream=upstream, up=up, models=encode_models(models)
        )
        d.addErrback(lambda _: None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == TO_PARENT_FD:
            self.admissions.dataReceived(data)  # type: ignore[no-untyped-call]
            return
        if childFD == 1:
            self.amp.dataReceived(data)  # type: ignore[no-untyped-call]
            return
        lines = (self._log_buffer + data).split(b"\n")
        self._log_buffer = lines.pop()
        if lines:
            # One event for all the lines of one read: a worker batches its
            # lines per reactor turn, and an event each is what made the
            # parent the bottleneck under load.
            tag = b"\nworker %d: " % (self.number,)
            text = tag[1:] + tag.join(lines)
            log.info("{lines}", lines=text.decode("utf-8", "replace"), worker=self.number)

    def processEnded(self, reason: Failure) -> None:
        self.amp.connectionLost(reason)
        self.admissions.connectionLost(reason)
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)

    def signal(self, name: str) -> None:
        try:
            assert self.transport is not None
            self.transport.signalProcess(name)
        except Exception:
            pass


class Supervisor(Service):
    """
    The parent process: binds once, keeps C{workers} workers alive, drains on stop.

    @ivar limiter: the gateway-wide limiter every worker consults, or L{None}.
    @ivar access_log: the C{--access-log} file every worker's lines go to
        (opened before this service starts), or L{None}.
    @ivar metrics: the totals of every worker's counts, the dead ones' included.
    @ivar keys: the parent's own key files, which its health checks send the
        upstream key from, or L{None}; reloaded on SIGHUP with the workers'.
    """

    def __init__(self, config: Config, reactor: Any, colour: bool) -> None:
        self.config = config
        self.reactor = reactor
        self.colour = colour
        self.limiter = (
            SlidingWindowLimiter(config.rate_limit, config.rate_window, reactor)
            if config.rate_limit
            else None
        )
        self.workers: dict[int, WorkerProcess] = {}
        self.metrics = MetricsTotals()
        self.rate_store: RedisSlidingWindowLimiter | None = None
        self.health: HealthChecker | None = None
        self.keys: KeyRing | None = None
        self.access_log: AccessLogFile | None = None
        self.socket: socket.socket | None = None
        self._backoff: dict[int, float] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._stopping = False

    def privilegedStartService(self) -> None:
        self.socket = bind_listening_socket(self.config)
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        signal.signal(signal.SIGHUP, self._forward_hangup)
        for number in range(1, self.config.workers + 1):
            self.spawn(number)

    def _forward_hangup(self, signum: int, frame: object) -> None:
        """
        SIGHUP reloads key files (every worker reads its own, and so does the
        parent, for its health checks) and reopens the access log.
        """
        self.reactor.callFromThread(self._signal_all, "HUP")
        if self.keys is not None:
            self.reactor.callFromThread(self.keys.reload)
        if self.access_log is not None:
            self.reactor.callFromThread(self.access_log.reopen)

    def _signal_all(self, name: str) -> None:
        for worker in list(self.workers.values()):
            worker.signal(name)

    def spawn(self, number: int) -> None:
        assert self.socket is not None
        self._restarts.pop(number, None)
        worker = WorkerProcess(self, number)
        self.workers[number] = worker
        arguments = [
            sys.executable,
            "-m",
            "llmgw.worker",
            config_to_json(self.config),
            str(number),
            "colour" if self.colour else "plain",
        ]
        self.reactor.spawnProcess(
            worker,
            sys.executable,
            arguments,
            env=os.environ.copy(),
            childFDs={
                0: "w",
                1: "r",
                2: "r",
                3: self.socket.fileno(),
                FROM_PARENT_FD: "w",
                TO_PARENT_FD: "r",
            },
        )
        log.info("Started worker {worker} (pid {pid})", worker=number, pid=worker.pid)

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        self.metrics.source_ended(worker, restarting=not self._stopping)
        if self._stopping:
            return
        ran = self.reactor.seconds() - worker.started
        why = "exited cleanly" if reason.check(ProcessDone) else reason.getErrorMessage()
        backoff = self._backoff.get(worker.number, 0.0)
        backoff = (
            0.0 if ran >= STABLE_SECONDS else min(max(backoff * 2, FIRST_BACKOFF), MAX_BACKOFF)
        )
        self._backoff[worker.number] = backoff
        log.warn(
            "Worker {worker} (pid {pid}) {why} after {ran:.1f}s; restarting in {backoff:.1f}s",
            worker=worker.number,
            pid=worker.pid,
            why=why,
            ran=ran,
            backoff=backoff,
        )
        self._restarts[worker.number] = self.reactor.callLater(backoff, self.spawn, worker.number)

    def stopService(self) -> Deferred[None]:
        """Stop the socket listening, ask every worker to drain, wait for them, close it."""
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        for restart in self._restarts.values():
            if restart.active():
                restart.cancel()
        self._restarts.clear()
        self._stop_listening()
        workers = list(self.workers.values())
        log.info("Stopping {count} workers", count=len(workers))
        for worker in workers:
            worker.signal("TERM")
        killer = self.reactor.callLater(self.config.grace + KILL_MARGIN, self._signal_all, "KILL")

        def all_ended(_: object) -> None:
            if killer.active():
                killer.cancel()
            if self.socket is not None:
                self.socket.close()
                self.socket = None

        d: Deferred[Any] = defer.gatherResults([w.ended for w in workers])
        return d.addCallback(all_ended)

    def replica_states(self) -> list[tuple[str, bool, Models | None]]:
        """The health checks' verdicts so far (none without C{--upstream})."""
        return [] if self.health is None else self.health.states()

    def replica_state_changed(self, upstream: str, up: bool, models: Models | None) -> None:
        """A health check changed its verdict: tell every worker now."""
        for worker in list(self.workers.values()):
            worker.tell_replica_state(upstream, up, models)

    def _stop_listening(self) -> None:
        """
        Stop the shared socket listening, for every process that holds it.

        The kernel completes handshakes into a listening socket's queue as
        long as any process holds it, so closing descriptors one worker at a
        time leaves a socket that takes connections nobody will accept, and
        resets them when the last holder closes it.  On Linux, C{SHUT_RD} on
        a listening socket stops it listening for every descriptor of it at
        once: a new connection is refused, which a load balancer retries
        elsewhere, and the connections the workers hold are untouched.  The
        workers see their port close (L{llmgw.worker.SharedListeningSocket}).
        """
        if self.socket is None:
            return
        try:
            self.socket.shutdown(socket.SHUT_RD)
        except OSError as e:
            # Not Linux: each worker still stops accepting when it drains.
            log.info("The listening socket cannot be shut down here ({why})", why=e)

    async def stats(self) -> dict[str, Any]:
        """
        Every worker's counts, the replicas' totals, and the limiter's tracked clients.

        The served, refused and upstream-error figures are the metrics'
        (L{llmgw.metrics.ConsoleCounts}): each worker sends its delta just
        before it answers, so they are current; and the workers that have
        ended keep theirs in an C{ended} row, so the total is the metrics' total.
        """
        rows: list[dict[str, Any]] = []
        replicas: dict[str, dict[str, Any]] = {}
        for number, worker in sorted(self.workers.items()):
            try:
                answer = await worker.amp.callRemote(WorkerStats)  # type: ignore[no-untyped-call]
            except Exception:
                continue
            for row in json.loads(answer.pop("replicas")):
                total = replicas.setdefault(row["upstream"], dict.fromkeys(COUNTS, 0))
                for count in COUNTS:
                    total[count] += row[count]
            counts = attrs.asdict(self.metrics.console_counts(worker))
            rows.append({"worker": number, "pid": worker.pid, **answer, **counts})
        ended = self.metrics.ended
        if ended.served or ended.refused or ended.upstream_errors:
            rows.append({"worker": "ended", "pid": None, **attrs.asdict(ended)})
        replica_rows = [
            {"upstream": name, "state": state_name(self.health, name), **counts}
            for name, counts in replicas.items()
        ]
        tracked = 0 if self.limiter is None else len(self.limiter)
        return {"workers": rows, "tracked_clients": tracked, "replicas": replica_rows}

    async def set_verbose(self, on: bool) -> None:
        for worker in list(self.workers.values()):
            await worker.amp.callRemote(SetVerbose, on=on)  # type: ignore[no-untyped-call]
