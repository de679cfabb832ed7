"""Active health checks of the C{--upstream} replicas, run by the parent alone.

Every C{--health-interval} seconds each replica is asked for C{GET /v1/models}
under a short deadline, with the upstream key.  A replica is down after
L{FAILURES_TO_DOWN} failures in a row, and up again after one success; the
models it lists are learned on the way, so that requests for a model go to the
replicas that serve it.  Each change is logged once and handed to
C{on_change}, which tells every worker (or, with one process, its router).

A lone C{--aihost} upstream is never checked: nothing but client requests and
C{/readyz} reaches it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llmgw.errors import ApiError
from llmgw.keys import KeyRing
from llmgw.upstream import ReplicaUnreachable, UpstreamClient

log = Logger()

#: Failed checks in a row that make a replica down.
FAILURES_TO_DOWN = 2

#: Longest wait for one check's reply, in seconds (and never more than the interval).
CHECK_DEADLINE = 2.0

Models = tuple[dict[str, Any], ...]
OnChange = Callable[[str, bool, Models | None], None]


@attrs.define
class ReplicaHealth:
    """What the parent knows of one replica."""

    name: str
    up: bool | None = None
    """L{None} until the first verdict."""
    failures_in_row: int = 0
    models: Models | None = None


def parse_model_listing(status: int, document: Any) -> Models:
    """
    The entries of a C{/v1/models} reply, each with a string C{id}.

    @raise ValueError: the reply is not a 200 with OpenAI's list shape.
    """
    if status != 200:
        raise ValueError(f"/v1/models answered {status}")
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("id"), str) for entry in data
    ):
        raise ValueError("/v1/models did not answer a list of models")
    return tuple(data)


class HealthChecker(Service):
    """
    Checks each replica on a timer and reports every change of its state.

    @ivar replicas: by name, in the order they were configured.
    """

    def __init__(
        self,
        names: Sequence[str],
        upstream: UpstreamClient,
        keys: KeyRing,
        clock: IReactorTime,
        interval: float,
        on_change: OnChange,
    ) -> None:
        self.replicas = {name: ReplicaHealth(name) for name in names}
        self.upstream = upstream
        self.keys = keys
        self.clock = clock
        self.interval = interval
        self.deadline = min(CHECK_DEADLINE, interval)
        self.on_change = on_change
        self._loop = LoopingCall(self.check_all)
        self._loop.clock = clock
        self._checks: dict[str, Deferred[None]] = {}

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop.running:
            self._loop.stop()
        for check in list(self._checks.values()):
            check.cancel()
        return self.upstream.pool.closeCachedConnections()  # type: ignore[no-untyped-call]

    def check_all(self) -> None:
        """Start a check of every replica whose previous check has finished."""
        for replica in self.replicas.values():
            if replica.name not in self._checks:
                check = Deferred.fromCoroutine(self.check(replica))
                if not check.called:
                    self._checks[replica.name] = check

    async def check(self, replica: ReplicaHealth) -> None:
        try:
            models = await self._fetch_models(replica.name)
        except CancelledError:
            return  # stopped
        except Exception as e:
            self._failed(replica, _reason(e))
        else:
            self._succeeded(replica, models)
        finally:
            self._checks.pop(replica.name, None)

    async def _fetch_models(self, name: str) -> Models:
        response = await self.upstream.send(
            b"GET",
            b"/v1/models",
            None,
            self.keys.upstream_authorization,
            self.deadline,
            name.encode(),
        )
        status, _, document = await self.upstream.read_json(response, self.deadline)
        return parse_model_listing(status, document)

    def _succeeded(self, replica: ReplicaHealth, models: Models) -> None:
        replica.failures_in_row = 0
        if replica.up is not True:
            log.info(
                "Upstream {upstream} is up, serving {models}",
                upstream=replica.name,
                models=", ".join(str(entry["id"]) for entry in models) or "no models",
            )
        elif _ids(models) == _ids(replica.models):
            return  # the same models (vLLM stamps each listing with the time it was asked)
        replica.up = True
        replica.models = models
        self.on_change(replica.name, True, models)

    def _failed(self, replica: ReplicaHealth, why: str) -> None:
        replica.failures_in_row += 1
        if replica.failures_in_row < FAILURES_TO_DOWN or replica.up is False:
            return
        replica.up = False
        log.warn("Upstream {upstream} is down: {why}", upstream=replica.name, why=why)
        self.on_change(replica.name, False, replica.models)

    def states(self) -> list[tuple[str, bool, Models | None]]:
        """Every verdict reached so far, for a worker that has just started."""
        return [
            (replica.name, replica.up, replica.models)
            for replica in self.replicas.values()
            if replica.up is not None
        ]


def state_name(checker: HealthChecker | None, name: str) -> str:
    """C{up}, C{down} or C{unchecked}; C{-} for a lone C{--aihost}, which is never checked."""
    if checker is None:
        return "-"
    up = checker.replicas[name].up if name in checker.replicas else None
    return "unchecked" if up is None else "up" if up else "down"


def _ids(models: Models | None) -> list[Any] | None:
    return None if models is None else [entry.get("id") for entry in models]


def _reason(error: Exception) -> str:
    if isinstance(error, ReplicaUnreachable):
        return error.error.message
    if isinstance(error, ApiError):
        return error.message
    return str(error) or type(error).__name__


def encode_models(models: Models | None) -> str:
    """A model list for AMP: JSON text, C{null} when unknown."""
    return json.dumps(models)


def decode_models(text: str) -> Models | None:
    value = json.loads(text)
    return None if value is None else tuple(value)
