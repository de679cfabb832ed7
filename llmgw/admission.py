"""
The limiter's questions from a worker to the parent, on a pipe of their own.

Every request asks the parent's one limiter whether its client may go on, so
the question's cost is paid per request, in the worker and again in the
parent, which shares the machine's cores with the workers.  Over AMP a
question and its answer were two boxes of up to six keys and values, each
framed, named, parsed and dispatched through Deferreds: most of the parent's
time under load, and a quarter of the gateway's CPU per request.  Here each
is one short frame (a 16-bit length, then fields split once), on a pair of
pipes that carry nothing else: file descriptors 4 (parent to worker) and 5
(worker to parent).  The questions a worker asks in one reactor turn leave in
one write, since a transport holds its writes until the reactor next polls;
the parent reads them in one read and answers them all in one write too.
AMP stays for everything else (the console's C{stats} and C{verbose},
metrics, access-log lines, health verdicts).

The pipe is in order, and so is the parent's embedded limiter: corrections a
worker sends after its fallback decided (L{RECORD}, L{RELEASE}) go down the
same pipe, so they are counted before the parent's next decision for it.

Frames, worker to parent (the key comes last, so it may hold spaces)::

    A <number> <deadline> <key>     may <key> go on? (deadline: see below)
    R <at> <key>                    my fallback admitted <key> at <at>: count it
    L <at> <key>                    the admission you recorded at <at> was
                                    decided by my fallback: release it

Parent to worker, C{<number>} being the question's::

    <number> Y <limit> <window> <remaining> <reset> <admitted_at>
    <number> N <limit> <window> <remaining> <reset>
    <number> E                      read after its deadline: nothing counted
    <number> U <retry_after>        the rate store cannot decide, and
                                    --rate-store-fallback closed refuses all
    <number> X <message>            anything else that went wrong

The deadline is the time the worker stops waiting and lets its fallback
decide (L{llmgw.worker.RemoteLimiter}); a question read after it is void, so
a stalled parent does not count requests decided without it.  C{admitted_at}
is the time the parent recorded, which a worker that gave up just before the
answer came sends back in L{RELEASE}.
"""

from __future__ import annotations

from itertools import count

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from twisted.python.failure import Failure

from llmgw.ratelimit import Decision, SlidingWindowLimiter
from llmgw.redisstore import (
    Admission,
    DeadlinePassed,
    RateStoreUnavailable,
    RedisSlidingWindowLimiter,
)

log = Logger()

#: The worker's file descriptors for this pipe: it reads answers from the
#: first and writes questions to the second.
FROM_PARENT_FD = 4
TO_PARENT_FD = 5

ASK = b"A"
RECORD = b"R"
RELEASE = b"L"


class AdmitExpired(Exception):
    """The worker had stopped waiting for this answer: nothing was recorded."""


class ParentError(Exception):
    """The parent answered a question with an error rather than a decision."""


#: What the parent answers: the decision, and the time of the admission it
#: recorded (None when it refused).
Answer = tuple[Decision, "float | None"]


class _Frames(Int16StringReceiver):
    """One end of the pipe: frames of a 16-bit length and the bytes."""

    def _send(self, frame: bytes) -> None:
        self.sendString(frame)  # type: ignore[no-untyped-call]


class AdmissionDesk(_Frames):
    """
    The parent's end of one worker's pipe: it decides each question in the
    order it arrives, by the gateway's one limiter or its rate store.

    @ivar limiter: the embedded limiter, or L{None} with rate limiting off.
    @ivar rate_store: the shared limiter in Redis (C{--rate-store}), or L{None}.
    """

    def __init__(
        self,
        limiter: SlidingWindowLimiter | None,
        rate_store: RedisSlidingWindowLimiter | None = None,
    ) -> None:
        self.limiter = limiter
        self.rate_store = rate_store

    def stringReceived(self, frame: bytes) -> None:
        """
        Decide a question, or count a correction.  A frame that does not
        parse is logged and dropped (a question that does is answered with
        an error), so that one bad frame never closes the pipe: that would
        leave the worker on its fallback until it restarts.
        """
        kind, _, rest = frame.partition(b" ")
        try:
            if kind == ASK:
                number, deadline, key = rest.split(b" ", 2)
                int(number)
                try:
                    who, when = key.decode("utf-8"), float(deadline)
                except ValueError:  # UnicodeDecodeError is one too
                    self._send(number + b" X malformed question")
                    return
                self._answer(number, who, when)
            elif kind in (RECORD, RELEASE):
                at, key = rest.split(b" ", 1)
                correct = self.record_admission if kind == RECORD else self.release_admission
                correct(key.decode("utf-8"), float(at))
            else:
                raise ValueError(kind)
        except ValueError:
            log.error("A worker sent a malformed admission frame: {frame!r}", frame=frame)

    def _answer(self, number: bytes, key: str, deadline: float) -> None:
        try:
            answer = self.admit(key, deadline)
        except Exception:
            self._send_failure(number, Failure())
            return
        if isinstance(answer, Deferred):
            answer.addCallbacks(
                lambda decided: self._send_answer(number, decided),
                lambda failure: self._send_failure(number, failure),
            )
        else:
            self._send_answer(number, answer)

    def admit(self, key: str, deadline: float | None = None) -> Answer | Deferred[Answer]:
        """The answer, at once from the embedded limiter; a Deferred of it from a rate store."""
        if self.limiter is None:
            raise ParentError("rate limiting is off")
        if self.rate_store is not None:
            return self._admit_by_rate_store(key, deadline)
        if deadline is not None and self.limiter.clock.seconds() >= deadline:
            raise AdmitExpired()
        decision = self.limiter.decide(key)
        return decision, self.limiter.newest(key) if decision.allowed else None

    def _admit_by_rate_store(self, key: str, deadline: float | None) -> Deferred[Answer]:
        """
        The shared limiter answers asynchronously, within its own timeout and
        the worker's deadline: a question it could not answer in time is
        void, as for the embedded limiter, and nothing counts for it.
        """
        assert self.rate_store is not None

        def expired(failure: Failure) -> Failure:
            failure.trap(DeadlinePassed)
            return Failure(AdmitExpired())

        def answer(admission: Admission) -> Answer:
            return admission.decision, admission.receipt

        return self.rate_store.decide(key, deadline).addCallbacks(answer, expired)

    def record_admission(self, key: str, at: float) -> None:
        if self.rate_store is not None:
            self.rate_store.record(key, at)
        elif self.limiter is not None:
            self.limiter.record(key, at)

    def release_admission(self, key: str, at: float) -> None:
        if self.rate_store is not None:
            self.rate_store.release(key, at)
        elif self.limiter is not None:
            self.limiter.release(key, at)

    def _send_answer(self, number: bytes, answer: Answer) -> None:
        decision, admitted_at = answer
        if self.transport is None:
            return
        figures = b"%d %d %d %d" % (
            decision.limit,
            decision.window,
            decision.remaining,
            decision.reset,
        )
        if decision.allowed:
            at = b"-" if admitted_at is None else repr(admitted_at).encode()
            self._send(b"%s Y %s %s" % (number, figures, at))
        else:
            self._send(b"%s N %s" % (number, figures))

    def _send_failure(self, number: bytes, failure: Failure) -> None:
        if self.transport is None:
            return
        if failure.check(AdmitExpired):
            self._send(number + b" E")
        elif failure.check(RateStoreUnavailable):
            retry_after = failure.value.retry_after  # type: ignore[union-attr]
            self._send(b"%s U %d" % (number, retry_after))
        else:
            if not failure.check(ParentError):
                log.failure("Deciding a worker's admission", failure)
            message = failure.getErrorMessage().encode("utf-8", "replace")
            self._send(b"%s X %s" % (number, message[:1000]))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.transport = None


def _parse_answer(kind: bytes, rest: bytes) -> Answer | Exception:
    """The parent's answer, from what follows the question's number; raises if it is garbled."""
    if kind == b"Y" or kind == b"N":
        fields = rest.split(b" ")
        limit, window, remaining, reset = map(int, fields[:4])
        decision = Decision(kind == b"Y", limit, window, remaining, reset)
        admitted_at = None if kind == b"N" or fields[4] == b"-" else float(fields[4])
        return decision, admitted_at
    if kind == b"E":
        return AdmitExpired()
    if kind == b"U":
        return RateStoreUnavailable(rest.decode())
    return ParentError(rest.decode("utf-8", "replace"))


class AdmissionQuestions(_Frames):
    """
    A worker's end of the pipe: it numbers its questions and matches each
    answer to its question.

    Answers come in order from the embedded limiter, but not necessarily from
    a rate store, hence the numbers.  When the pipe closes (the parent is
    gone), every waiting question fails with the reason, and later ones fail
    at once.
    """

    def __init__(self) -> None:
        self._numbers = count()
        self._waiting: dict[int, Deferred[Answer]] = {}
        self.lost: Failure | None = None

    def ask(self, key: str, deadline: float) -> Deferred[Answer]:
        """The parent's decision on C{key}; void if the parent reads it after C{deadline}."""
        if self.lost is not None or self.transport is None:
            return fail(self.lost or Failure(ConnectionDone("not connected to the parent")))
        number = next(self._numbers)
        try:
            self._send(b"%s %d %s %s" % (ASK, number, repr(deadline).encode(), key.encode("utf-8")))
        except Exception:  # a key too long for a frame: the caller's fallback decides
            return fail(Failure())
        waiting: Deferred[Answer] = Deferred()
        self._waiting[number] = waiting
        return waiting

    def tell(self, kind: bytes, key: str, at: float) -> None:
        """Send a correction, L{RECORD} or L{RELEASE}; with the parent gone, none is needed."""
        if self.lost is None and self.transport is not None:
            self._send(b"%s %s %s" % (kind, repr(at).encode(), key.encode("utf-8")))

    def stringReceived(self, frame: bytes) -> None:
        number, kind, rest = [*frame.split(b" ", 2), b"", b""][:3]
        waiting = self._waiting.pop(int(number), None) if number.isdigit() else None
        if waiting is None:
            log.error("The parent answered an admission nobody asked: {frame!r}", frame=frame)
            return
        try:
            answer = _parse_answer(kind, rest)
        except (ValueError, IndexError):
            waiting.errback(ParentError(f"malformed answer {frame!r}"))
            return
        if isinstance(answer, Exception):
            waiting.errback(answer)
        else:
            waiting.callback(answer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
        waiting, self._waiting = self._waiting, {}
        for question in waiting.values():
            question.errback(reason)
