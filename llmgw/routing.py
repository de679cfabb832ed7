"""Which model server a request goes to: pure decisions over the replicas' state.

Each worker keeps one L{Router}.  Two things feed it: the parent's active
health checks (L{Router.set_health}, with the models each replica lists), and
the worker's own failures to connect (L{Router.eject}).  It chooses among the
replicas that are up and serve the request's model by the power of two random
choices on requests in flight, which spreads load nearly as well as scanning
for the least loaded replica but never sends a burst of requests to the one
replica that looked idle a moment ago.

Nothing here does I/O; the clock and the random source are passed in, so that
tests can drive both.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

#: What each worker counts per replica; the parent sums them.
COUNTS = ("in_flight", "served", "failures")


@attrs.define(eq=False)
class Replica:
    """
    One model server, as one worker sees it.

    @ivar name: its origin, C{https://host:port}; never holds credentials, so it
        is safe in logs, the console and metrics.
    @ivar up: the parent's verdict from its health checks; a replica is up until
        a check says otherwise, so that a worker serves before the first check.
    @ivar checked: whether any verdict has arrived (C{/readyz} waits for one).
    @ivar models: what its C{GET /v1/models} listed (the entries as sent), or
        L{None} while no check has read it.
    @ivar ejected_until: clock time until which this worker avoids it, after it
        could not connect to it.
    """

    name: str
    up: bool = True
    checked: bool = False
    models: tuple[dict[str, Any], ...] | None = None
    ejected_until: float = 0.0
    in_flight: int = 0
    served: int = 0
    """Requests that ended on it, whatever their outcome."""
    failures: int = 0
    """Requests it failed: could not be reached, answered 503, broke or timed out."""

    @property
    def origin(self) -> bytes:
        return self.name.encode()

    def lists(self, model: str) -> bool:
        return self.models is not None and any(entry.get("id") == model for entry in self.models)


class Lease:
    """
    A request's hold on a replica, counted in its C{in_flight} until released.

    Releasing is idempotent, so that every way a request can end (a reply, an
    error, a cancellation, several of them in turn) may release it without the
    count drifting.
    """

    __slots__ = ("_released", "replica")

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._released = False
        replica.in_flight += 1

    def release(self, failed: bool = False) -> None:
        """The request ended; C{failed} if the replica is why it failed."""
        if not self._released:
            self._released = True
            self.replica.in_flight -= 1
            self.replica.served += 1
            if failed:
                self.replica.failures += 1


class Router:
    """
    The replicas of one worker, and the choice of one for each request.

    @ivar replicas: in the order they were configured.
    """

    def __init__(
        self,
        names: Sequence[str],
        clock: IReactorTime,
        fail_timeout: float,
        rng: random.Random | None = None,
    ) -> None:
        if not names:
            raise ValueError("a router needs at least one replica")
        self.replicas = tuple(Replica(name) for name in names)
        self._by_name = {replica.name: replica for replica in self.replicas}
        self.clock = clock
        self.fail_timeout = fail_timeout
        self.rng = rng if rng is not None else random.Random()
        self.served_models: frozenset[str] = frozenset()
        """Every model id some replica lists: kept as lists arrive, not per request."""

    def available(self, replica: Replica) -> bool:
        """Up by the parent's checks, and not ejected by this worker."""
        return replica.up and self.clock.seconds() >= replica.ejected_until

    def choose(self, model: str | None, tried: Collection[Replica] = ()) -> Replica | None:
        """
        The replica for a request for C{model}, other than those in C{tried}.

        The candidates are the available replicas that list the model; if none
        of them lists it, or no list is known, any available replica, and the
        model server answers for an unknown model in its own words.  When no
        replica is available the checks may be wrong, so every untried replica
        is a candidate.  L{None} once every replica has been tried.
        """
        untried = [replica for replica in self.replicas if replica not in tried]
        if not untried:
            return None
        healthy = [replica for replica in untried if self.available(replica)]
        serving = [replica for replica in healthy if model is not None and replica.lists(model)]
        candidates = serving or healthy or untried
        if len(candidates) == 1:
            return candidates[0]
        first, second = self.rng.sample(candidates, 2)
        if first.in_flight == second.in_flight:
            return self.rng.choice((first, second))
        return first if first.in_flight < second.in_flight else second

    def lease(self, replica: Replica) -> Lease:
        """Count a request in flight on C{replica} until the lease is released."""
        return Lease(replica)

    def eject(self, replica: Replica, why: str) -> None:
        """
        This worker could not connect to C{replica}: avoid it for a while.
        A lone model server has no other to prefer, so it is never avoided.
        """
        if len(self.replicas) == 1:
            return
        if self.clock.seconds() >= replica.ejected_until:
            log.warn(
                "Avoiding {replica} for {seconds:g}s: {why}",
                replica=replica.name,
                seconds=self.fail_timeout,
                why=why,
            )
        replica.ejected_until = self.clock.seconds() + self.fail_timeout

    def set_health(self, name: str, up: bool, models: tuple[dict[str, Any], ...] | None) -> None:
        """
        The parent's latest verdict on replica C{name}.

        A replica reported up is no longer avoided, even if this worker ejected
        it: the parent has just reached it.  Names this router does not know
        are ignored (a parent and a worker with different configurations).
        """
        replica = self._by_name.get(name)
        if replica is None:
            return
        replica.up = up
        replica.checked = True
        if models is not None:
            replica.models = models
            self.served_models = frozenset(
                str(entry.get("id"))
                for known in self.replicas
                if known.models is not None
                for entry in known.models
            )
        if up:
            replica.ejected_until = 0.0

    def counts(self) -> list[dict[str, Any]]:
        """Each replica's counts, for the console's C{stats} (summed over workers)."""
        return [
            {"upstream": replica.name, **{count: getattr(replica, count) for count in COUNTS}}
            for replica in self.replicas
        ]

    def model_listing(self) -> list[dict[str, Any]] | None:
        """
        The union of the available replicas' model lists, each id once, or
        L{None} when no available replica's list is known yet.
        """
        seen: set[Any] = set()
        listing: list[dict[str, Any]] = []
        known = False
        for replica in self.replicas:
            if not self.available(replica) or replica.models is None:
                continue
            known = True
            for entry in replica.models:
                if entry.get("id") not in seen:
                    seen.add(entry.get("id"))
                    listing.append(entry)
        return listing if known else None
