"""
Tests for L{llmgw.routing}: the choice of a replica, models, ejection, the
all-down fallback, the merged model listing and the in-flight counts.

Time is a L{Clock} and chance a seeded L{random.Random}, so every decision is
reproducible; the properties replay random sequences of operations against a
small model of the replicas' state kept by the test itself.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from llmgw.routing import Lease, Replica, Router

# Documentation addresses (RFC 5737): nothing here connects anywhere.
ORIGINS = (
    "https://192.0.2.1:8000",
    "https://192.0.2.2:8000",
    "https://192.0.2.3:8000",
    "https://192.0.2.4:8000",
)
FAIL_TIMEOUT = 10.0
DRAWS = 300


def make_router(
    count: int, fail_timeout: float = FAIL_TIMEOUT, seed: int = 0
) -> tuple[Router, Clock]:
    clock = Clock()
    return Router(ORIGINS[:count], clock, fail_timeout, random.Random(seed)), clock


def models(*ids: str) -> tuple[dict[str, Any], ...]:
    """A C{/v1/models} C{data} list, as a model server sends it."""
    return tuple({"id": id, "object": "model", "owned_by": "vllm"} for id in ids)


def tally(
    router: Router, model: str | None = None, tried: tuple[Replica, ...] = ()
) -> Counter[str]:
    """How often each replica is chosen over many draws, with nothing leased."""
    chosen: Counter[str] = Counter()
    for _ in range(DRAWS):
        replica = router.choose(model, tried)
        chosen[replica.name if replica is not None else "none"] += 1
    return chosen


def load(replica: Replica, router: Router, count: int) -> list[Lease]:
    return [router.lease(replica) for _ in range(count)]


@implementer(ILogObserver)
class RoutingEvents(list[LogEvent]):
    """Keeps the events of L{llmgw.routing}'s logger (works on Twisted 22.4 and 26)."""

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == "llmgw.routing":
            self.append(event)


def capture_events(case: SynchronousTestCase) -> RoutingEvents:
    events = RoutingEvents()
    globalLogPublisher.addObserver(events)
    case.addCleanup(globalLogPublisher.removeObserver, events)
    return events


class RouterTests(SynchronousTestCase):
    def test_replicas_in_configured_order(self) -> None:
        router, _ = make_router(3)
        self.assertEqual([replica.name for replica in router.replicas], list(ORIGINS[:3]))
        self.assertEqual(router.replicas[1].origin, b"https://192.0.2.2:8000")

    def test_fresh_replica(self) -> None:
        """Up and unlisted until a check says otherwise, so a worker serves at once."""
        router, _ = make_router(1)
        self.assertEqual(
            attrs.asdict(router.replicas[0]),
            {
                "name": ORIGINS[0],
                "up": True,
                "checked": False,
                "models": None,
                "ejected_until": 0.0,
                "in_flight": 0,
                "served": 0,
                "failures": 0,
            },
        )
        self.assertTrue(router.available(router.replicas[0]))

    def test_needs_a_replica(self) -> None:
        self.assertRaises(ValueError, Router, (), Clock(), FAIL_TIMEOUT)

    def test_default_random_source(self) -> None:
        router = Router(ORIGINS[:2], Clock(), FAIL_TIMEOUT)
        self.assertIsInstance(router.rng, random.Random)
        self.assertIn(router.choose(None), router.replicas)


class ChoiceTests(SynchronousTestCase):
    """Two random choices by requests in flight, ties broken at random."""

    def test_fewer_in_flight_of_two(self) -> None:
        router, _ = make_router(2)
        busy, idle = router.replicas
        load(busy, router, 1)
        self.assertEqual(tally(router), Counter({idle.name: DRAWS}))

    def test_fewer_in_flight_whichever_order(self) -> None:
        router, _ = make_router(2)
        idle, busy = router.replicas
        load(busy, router, 3)
        self.assertEqual(tally(router), Counter({idle.name: DRAWS}))

    def test_two_choices_not_a_scan(self) -> None:
        """
        With in-flight counts 0, 1 and 5, the middle one wins whenever it is
        drawn with the busiest (about a third of draws); the busiest never wins.
        A scan for the least loaded would send everything to the idle one.
        """
        router, _ = make_router(3)
        idle, middle, busiest = router.replicas
        load(middle, router, 1)
        load(busiest, router, 5)
        chosen = tally(router)
        self.assertEqual(set(chosen), {idle.name, middle.name})
        self.assertGreater(chosen[middle.name], DRAWS // 5)
        self.assertGreater(chosen[idle.name], DRAWS // 2)

    def test_tie_broken_at_random(self) -> None:
        router, _ = make_router(2)
        load(router.replicas[0], router, 2)
        load(router.replicas[1], router, 2)
        chosen = tally(router)
        self.assertEqual(set(chosen), {ORIGINS[0], ORIGINS[1]})
        self.assertGreater(min(chosen.values()), DRAWS // 3)

    def test_tie_among_three(self) -> None:
        router, _ = make_router(3)
        chosen = tally(router)
        self.assertEqual(set(chosen), set(ORIGINS[:3]))
        self.assertGreater(min(chosen.values()), DRAWS // 5)

    def test_ties_differ_by_seed(self) -> None:
        """The tie-break comes from the router's random source, not the order."""
        firsts = set()
        for seed in range(20):
            router, _ = make_router(2, seed=seed)
            replica = router.choose(None)
            assert replica is not None
            firsts.add(replica.name)
        self.assertEqual(firsts, {ORIGINS[0], ORIGINS[1]})

    def test_same_seed_same_choices(self) -> None:
        sequences = []
        for _ in range(2):
            router, _ = make_router(4, seed=1234)
            sequences.append([router.choose("m") for _ in range(50)])
        self.assertEqual(
            [r.name if r else None for r in sequences[0]],
            [r.name if r else None for r in sequences[1]],
        )

    def test_single_candidate(self) -> None:
        router, _ = make_router(1)
        load(router.replicas[0], router, 7)
        self.assertEqual(tally(router), Counter({ORIGINS[0]: DRAWS}))

    def test_tried_excluded(self) -> None:
        """A retry goes elsewhere, even to a busier replica."""
        router, _ = make_router(3)
        idle, busy, busier = router.replicas
        load(busy, router, 2)
        load(busier, router, 4)
        self.assertEqual(tally(router, tried=(idle,)), Counter({busy.name: DRAWS}))
        self.assertEqual(tally(router, tried=(idle, busy)), Counter({busier.name: DRAWS}))

    def test_tried_as_a_set(self) -> None:
        router, _ = make_router(2)
        first, second = router.replicas
        self.assertIs(router.choose(None, {first}), second)

    def test_none_when_all_tried(self) -> None:
        router, _ = make_router(3)
        self.assertIsNone(router.choose(None, router.replicas))
        self.assertIsNone(router.choose("m", list(router.replicas)))

    def test_none_when_the_only_one_tried(self) -> None:
        router, _ = make_router(1)
        self.assertIsNone(router.choose(None, router.replicas))

    def test_choosing_does_not_lease(self) -> None:
        router, _ = make_router(2)
        tally(router)
        self.assertEqual([replica.in_flight for replica in router.replicas], [0, 0])


class ModelTests(SynchronousTestCase):
    """A request goes to the available replicas that list its model."""

    def test_only_replicas_listing_the_model(self) -> None:
        router, _ = make_router(3)
        router.set_health(ORIGINS[0], True, models("m1"))
        router.set_health(ORIGINS[1], True, models("m2", "m3"))
        router.set_health(ORIGINS[2], True, models("m1", "m3"))
        self.assertEqual(set(tally(router, "m1")), {ORIGINS[0], ORIGINS[2]})
        self.assertEqual(tally(router, "m2"), Counter({ORIGINS[1]: DRAWS}))
        self.assertEqual(set(tally(router, "m3")), {ORIGINS[1], ORIGINS[2]})

    def test_listing_beats_load(self) -> None:
        router, _ = make_router(2)
        router.set_health(ORIGINS[0], True, models("m"))
        router.set_health(ORIGINS[1], True, models("other"))
        load(router.replicas[0], router, 9)
        self.assertEqual(tally(router, "m"), Counter({ORIGINS[0]: DRAWS}))

    def test_unknown_list_does_not_qualify_when_another_lists_it(self) -> None:
        router, _ = make_router(2)
        router.set_health(ORIGINS[0], True, models("m"))
        self.assertEqual(tally(router, "m"), Counter({ORIGINS[0]: DRAWS}))

    def test_ids_compared_exactly(self) -> None:
        router, _ = make_router(2)
        router.set_health(ORIGINS[0], True, models("org/Model"))
        router.set_health(ORIGINS[1], True, models("org/model"))
        self.assertEqual(tally(router, "org/model"), Counter({ORIGINS[1]: DRAWS}))

    def test_entries_without_id(self) -> None:
        router, _ = make_router(2)
        router.set_health(ORIGINS[0], True, ({"object": "model"},))
        router.set_health(ORIGINS[1], True, models("m"))
        self.assertEqual(tally(router, "m"), Counter({ORIGINS[1]: DRAWS}))

    def test_none_lists_it(self) -> None:
        """The model server answers for an unknown model in its own words."""
        router, _ = make_router(2)
        router.set_health(ORIGINS[0], True, models("m1"))
        router.set_health(ORIGINS[1], True, models("m2"))
        self.assertEqual(set(tally(router, "nope")), {ORIGINS[0], ORIGINS[1]})

    def test_no_list_known(self) -> None:
        router, _ = make_router(2)
        self.assertEqual(set(tally(router, "m")), {ORIGINS[0], ORIGINS[1]})

    def test_no_model_named(self) -> None:
        router, _ = make_router(2)
        router.set_health(ORIGINS[0], True, models("m"))
        self.assertEqual(set(tally(router, None)), {ORIGINS[0], ORIGINS[1]})

    def test_listing_replica_down(self) -> None:
        """Only available replicas' lists count: the model goes to any available one."""
        router, _ = make_router(3)
        router.set_health(ORIGINS[0], False, models("m"))
        router.set_health(ORIGINS[1], True, models("other"))
        self.assertEqual(set(tally(router, "m")), {ORIGINS[1], ORIGINS[2]})

    def test_listing_replica_ejected(self) -> None:
        router, _ = make_router(2)
        router.set_health(ORIGINS[0], True, models("m"))
        router.set_health(ORIGINS[1], True, models("other"))
        router.eject(router.replicas[0], "connection refused")
        self.assertEqual(tally(router, "m"), Counter({ORIGINS[1]: DRAWS}))

    def test_list_kept_when_a_report_has_none(self) -> None:
        """A report without a list (a failed check) keeps the last one read."""
        router, _ = make_router(2)
        router.set_health(ORIGINS[0], True, models("m"))
        router.set_health(ORIGINS[0], False, None)
        router.set_health(ORIGINS[0], True, None)
        self.assertEqual(router.replicas[0].models, models("m"))
        self.assertEqual(tally(router, "m"), Counter({ORIGINS[0]: DRAWS}))

    def test_list_replaced(self) -> None:
        router, _ = make_router(2)
        router.set_health(ORIGINS[0], True, models("m"))
        router.set_health(ORIGINS[0], True, models("n"))
        router.set_health(ORIGINS[1], True, models("m"))
        self.assertEqual(tally(router, "m"), Counter({ORIGINS[1]: DRAWS}))

    def test_lists(self) -> None:
        replica = Replica(ORIGINS[0])
        self.assertFalse(replica.lists("m"))
        replica.models = models("a", "m")
        self.assertTrue(replica.lists("m"))
        self.assertFalse(replica.lists("b"))


class EjectionTests(SynchronousTestCase):
    """A replica this worker could not connect to is avoided for C{fail_timeout}."""

    def test_avoided_for_fail_timeout(self) -> None:
        router, clock = make_router(2)
        clock.advance(100)
        ejected, other = router.replicas
        router.eject(ejected, "connection refused")
        self.assertEqual(ejected.ejected_until, 110.0)
        clock.advance(FAIL_TIMEOUT - 0.25)
        self.assertFalse(router.available(ejected))
        self.assertEqual(tally(router), Counter({other.name: DRAWS}))
        clock.advance(0.25)
        self.assertTrue(router.available(ejected))
        self.assertEqual(set(tally(router)), {ejected.name, other.name})

    def test_other_fail_timeout(self) -> None:
        router, clock = make_router(2, fail_timeout=2.5)
        router.eject(router.replicas[0], "timeout")
        clock.advance(2.25)
        self.assertFalse(router.available(router.replicas[0]))
        clock.advance(0.25)
        self.assertTrue(router.available(router.replicas[0]))

    def test_eject_at_time_zero(self) -> None:
        router, clock = make_router(2)
        router.eject(router.replicas[0], "timeout")
        self.assertFalse(router.available(router.replicas[0]))
        clock.advance(FAIL_TIMEOUT)
        self.assertTrue(router.available(router.replicas[0]))

    def test_another_failure_extends(self) -> None:
        router, clock = make_router(2)
        ejected = router.replicas[0]
        router.eject(ejected, "connection refused")
        clock.advance(5)
        router.eject(ejected, "connection refused")
        clock.advance(FAIL_TIMEOUT - 0.25)
        self.assertFalse(router.available(ejected))
        clock.advance(0.25)
        self.assertTrue(router.available(ejected))

    def test_failures_counted(self) -> None:
        """A request the replica failed counts when its lease ends; ejecting counts nothing."""
        router, _ = make_router(2)
        first, second = router.replicas
        for failed in (True, True, False, True):
            router.lease(first).release(failed=failed)
        lease = router.lease(second)
        lease.release(failed=True)
        lease.release(failed=True)
        router.eject(second, "timeout")
        self.assertEqual((first.failures, second.failures), (3, 1))
        self.assertEqual((first.served, second.served), (4, 1))

    def test_lone_replica_never_ejected(self) -> None:
        """A lone model server has no other to prefer: it is never avoided, nor logged."""
        events = capture_events(self)
        router, _ = make_router(1)
        router.eject(router.replicas[0], "connection refused")
        self.assertTrue(router.available(router.replicas[0]))
        self.assertEqual(events, [])

    def test_reported_up_is_chosen_again(self) -> None:
        """The parent has just reached it: its check outranks this worker's failure."""
        router, clock = make_router(2)
        ejected = router.replicas[0]
        router.eject(ejected, "connection refused")
        clock.advance(1)
        router.set_health(ejected.name, True, None)
        self.assertTrue(router.available(ejected))
        self.assertIn(ejected.name, tally(router))

    def test_reported_down_stays_ejected(self) -> None:
        router, clock = make_router(2)
        ejected = router.replicas[0]
        router.eject(ejected, "connection refused")
        router.set_health(ejected.name, False, None)
        self.assertEqual(ejected.ejected_until, FAIL_TIMEOUT)
        clock.advance(FAIL_TIMEOUT)
        self.assertFalse(router.available(ejected))

    def test_reported_down(self) -> None:
        router, clock = make_router(2)
        down, other = router.replicas
        router.set_health(down.name, False, None)
        clock.advance(3600)
        self.assertFalse(router.available(down))
        self.assertEqual(tally(router), Counter({other.name: DRAWS}))
        router.set_health(down.name, True, None)
        self.assertEqual(set(tally(router)), {down.name, other.name})

    def test_served_models_follow_the_lists(self) -> None:
        """The ids every replica lists, kept up to date as lists arrive."""
        router, _ = make_router(2)
        first, second = router.replicas
        self.assertEqual(router.served_models, frozenset())
        router.set_health(first.name, True, models("llama", "qwen"))
        router.set_health(second.name, True, models("qwen", "mistral"))
        self.assertEqual(router.served_models, {"llama", "qwen", "mistral"})
        router.set_health(first.name, False, None)
        self.assertEqual(router.served_models, {"llama", "qwen", "mistral"})
        router.set_health(first.name, True, models())
        self.assertEqual(router.served_models, {"qwen", "mistral"})

    def test_unknown_name_ignored(self) -> None:
        router, _ = make_router(2)
        router.set_health("https://192.0.2.99:8000", False, models("m"))
        self.assertEqual(
            [(replica.up, replica.models) for replica in router.replicas],
            [(True, None), (True, None)],
        )

    def test_logged_once_per_episode(self) -> None:
        events = capture_events(self)
        router, clock = make_router(2)
        replica = router.replicas[0]
        router.eject(replica, "connection refused")
        clock.advance(3)
        router.eject(replica, "connection refused")
        router.eject(replica, "timeout")
        self.assertEqual(len(events), 1)
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(
            (event["replica"], event["seconds"], event["why"]),
            (ORIGINS[0], FAIL_TIMEOUT, "connection refused"),
        )
        self.assertEqual(
            formatEvent(event), "Avoiding https://192.0.2.1:8000 for 10s: connection refused"
        )

        clock.advance(FAIL_TIMEOUT)
        router.eject(replica, "TLS failure")
        self.assertEqual([e["why"] for e in events], ["connection refused", "TLS failure"])

        router.set_health(replica.name, True, None)
        router.eject(replica, "timeout")
        self.assertEqual(
            [e["why"] for e in events], ["connection refused", "TLS failure", "timeout"]
        )

    def test_each_replica_logged(self) -> None:
        events = capture_events(self)
        router, _ = make_router(2)
        for replica in router.replicas:
            router.eject(replica, "connection refused")
        self.assertEqual([e["replica"] for e in events], list(ORIGINS[:2]))


class AllDownTests(SynchronousTestCase):
    """When no replica is available the checks may be wrong: every untried one is tried."""

    def test_all_reported_down(self) -> None:
        router, _ = make_router(2)
        for name in ORIGINS[:2]:
            router.set_health(name, False, None)
        self.assertEqual(set(tally(router)), {ORIGINS[0], ORIGINS[1]})
        first, second = router.replicas
        self.assertEqual(tally(router, tried=(first,)), Counter({second.name: DRAWS}))
        self.assertIsNone(router.choose(None, (first, second)))

    def test_all_ejected(self) -> None:
        router, _ = make_router(3)
        for replica in router.replicas:
            router.eject(replica, "connection refused")
        self.assertEqual(set(tally(router, "m")), set(ORIGINS[:3]))

    def test_down_and_ejected(self) -> None:
        router, _ = make_router(2)
        router.set_health(ORIGINS[0], False, None)
        router.eject(router.replicas[1], "timeout")
        self.assertEqual(set(tally(router)), {ORIGINS[0], ORIGINS[1]})

    def test_all_down_still_by_load(self) -> None:
        router, _ = make_router(2)
        for name in ORIGINS[:2]:
            router.set_health(name, False, models("m"))
        load(router.replicas[0], router, 1)
        self.assertEqual(tally(router, "m"), Counter({ORIGINS[1]: DRAWS}))

    def test_available_ones_tried(self) -> None:
        """A retry after the only available replica failed goes to the others."""
        router, _ = make_router(3)
        router.set_health(ORIGINS[1], False, None)
        router.set_health(ORIGINS[2], False, None)
        healthy = router.replicas[0]
        self.assertEqual(tally(router), Counter({healthy.name: DRAWS}))
        self.assertEqual(set(tally(router, tried=(healthy,))), {ORIGINS[1], ORIGINS[2]})

    def test_single_replica_down(self) -> None:
        router, _ = make_router(1)
        router.set_health(ORIGINS[0], False, None)
        self.assertIs(router.choose("m"), router.replicas[0])


class ModelListingTests(SynchronousTestCase):
    """The union of the available replicas' lists, for C{GET /v1/models}."""

    def test_none_while_no_list_known(self) -> None:
        router, _ = make_router(2)
        self.assertIsNone(router.model_listing())

    def test_union_in_order_each_id_once(self) -> None:
        router, _ = make_router(3)
        router.set_health(ORIGINS[0], True, models("b", "a"))
        router.set_health(ORIGINS[1], True, models("a", "c", "b"))
        router.set_health(ORIGINS[2], True, models("d"))
        listing = router.model_listing()
        self.assertEqual(listing, list(models("b", "a", "c", "d")))

    def test_first_replicas_entry_kept(self) -> None:
        router, _ = make_router(2)
        router.set_health(ORIGINS[0], True, ({"id": "m", "owned_by": "first"},))
        router.set_health(ORIGINS[1], True, ({"id": "m", "owned_by": "second"},))
        self.assertEqual(router.model_listing(), [{"id": "m", "owned_by": "first"}])

    def test_unknown_lists_skipped(self) -> None:
        router, _ = make_router(2)
        router.set_health(ORIGINS[1], True, models("m"))
        self.assertEqual(router.model_listing(), list(models("m")))

    def test_known_but_empty(self) -> None:
        router, _ = make_router(2)
        router.set_health(ORIGINS[0], True, ())
        self.assertEqual(router.model_listing(), [])

    def test_unavailable_replicas_skipped(self) -> None:
        router, clock = make_router(3)
        router.set_health(ORIGINS[0], True, models("a"))
        router.set_health(ORIGINS[1], False, models("b"))
        router.set_health(ORIGINS[2], True, models("c"))
        router.eject(router.replicas[2], "timeout")
        self.assertEqual(router.model_listing(), list(models("a")))
        clock.advance(FAIL_TIMEOUT)
        self.assertEqual(router.model_listing(), list(models("a", "c")))

    def test_none_when_only_unavailable_lists_known(self) -> None:
        router, _ = make_router(2)
        router.set_health(ORIGINS[0], False, models("a"))
        self.assertIsNone(router.model_listing())

    def test_a_new_list(self) -> None:
        router, _ = make_router(1)
        router.set_health(ORIGINS[0], True, models("a"))
        router.set_health(ORIGINS[0], True, models("b"))
        self.assertEqual(router.model_listing(), list(models("b")))


class LeaseTests(SynchronousTestCase):
    """In flight until released; released once however many ways a request ends."""

    def test_counts(self) -> None:
        router, _ = make_router(2)
        replica = router.replicas[0]
        first, second = router.lease(replica), router.lease(replica)
        self.assertIs(first.replica, replica)
        self.assertEqual((replica.in_flight, replica.served), (2, 0))
        second.release()
        self.assertEqual((replica.in_flight, replica.served), (1, 1))
        first.release()
        self.assertEqual((replica.in_flight, replica.served), (0, 2))
        self.assertEqual((router.replicas[1].in_flight, router.replicas[1].served), (0, 0))

    def test_release_idempotent(self) -> None:
        router, _ = make_router(1)
        replica = router.replicas[0]
        lease, other = router.lease(replica), router.lease(replica)
        for _ in range(3):
            lease.release()
        self.assertEqual((replica.in_flight, replica.served), (1, 1))
        other.release()
        other.release()
        self.assertEqual((replica.in_flight, replica.served), (0, 2))

    def test_lease_without_router(self) -> None:
        replica = Replica(ORIGINS[0])
        Lease(replica).release()
        self.assertEqual((replica.in_flight, replica.served), (0, 1))

    def test_counts_survive_ejection_and_health(self) -> None:
        router, clock = make_router(2)
        replica = router.replicas[0]
        lease = router.lease(replica)
        router.eject(replica, "timeout")
        router.set_health(replica.name, False, models("m"))
        clock.advance(3600)
        self.assertEqual(replica.in_flight, 1)
        lease.release()
        self.assertEqual((replica.in_flight, replica.served), (0, 1))


# Properties: random sequences of operations against a model of the state.

MODEL_IDS = ("m1", "m2")
# Choosing changes nothing but the random state: draw several times per step,
# so that a wrong candidate is seen even when chance favoured a right one.
DRAWS_PER_CHOICE = 4

Operation = tuple[Any, ...]


def operations(replica_count: int, fail_timeout: float) -> st.SearchStrategy[Operation]:
    index = st.integers(0, replica_count - 1)
    seconds = st.one_of(
        st.sampled_from(
            [0.0, 0.25, fail_timeout - 0.25, fail_timeout, fail_timeout + 0.25, 0.1, 0.3]
        ),
        st.floats(0, 2 * fail_timeout, allow_nan=False, allow_infinity=False),
    )
    listing = st.one_of(st.none(), st.lists(st.sampled_from(MODEL_IDS), unique=True))
    return st.one_of(
        st.tuples(
            st.just("choose"),
            st.one_of(st.none(), st.sampled_from((*MODEL_IDS, "unlisted"))),
            st.one_of(st.just(frozenset[int]()), st.frozensets(index)),
        ),
        st.tuples(st.just("release"), st.integers(0, 1000)),
        st.tuples(st.just("eject"), index),
        st.tuples(st.just("health"), index, st.sampled_from([True, True, False]), listing),
        st.tuples(st.just("advance"), seconds),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, float, int, list[Operation]]:
    replica_count = draw(st.integers(1, 4))
    fail_timeout = draw(st.sampled_from([0.5, 1.0, FAIL_TIMEOUT, 2.75]))
    seed = draw(st.integers(0, 2**32 - 1))
    steps = draw(st.lists(operations(replica_count, fail_timeout), min_size=10, max_size=80))
    return replica_count, fail_timeout, seed, steps


@attrs.define
class ModelReplica:
    """What the test believes about one replica, kept apart from the router's own state."""

    up: bool = True
    ids: tuple[str, ...] | None = None
    avoided_until: float | None = None

    def available(self, now: float) -> bool:
        return self.up and (self.avoided_until is None or now >= self.avoided_until)

    def lists(self, model: str | None) -> bool:
        return self.ids is not None and model in self.ids


def listed_ids(router: Router) -> list[str] | None:
    listing = router.model_listing()
    return None if listing is None else [entry["id"] for entry in listing]


def expected_listing(state: list[ModelReplica], now: float) -> list[str] | None:
    """The ids of the available replicas' known lists, in replica order, each once."""
    known = [
        believed.ids for believed in state if believed.available(now) and believed.ids is not None
    ]
    if not known:
        return None
    ids: list[str] = []
    for listed in known:
        ids.extend(id for id in listed if id not in ids)
    return ids


class PropertyTests(SynchronousTestCase):
    @settings(deadline=None, max_examples=200)
    @given(scenarios())
    def test_counts_never_drift(self, scenario: tuple[int, float, int, list[Operation]]) -> None:
        """
        In flight is the number of unreleased leases, and served the number of
        released ones, after every step, whatever order leases end in.
        """
        replica_count, fail_timeout, seed, steps = scenario
        router, clock = make_router(replica_count, fail_timeout, seed)
        leases: list[Lease] = []
        released: set[int] = set()
        for step in steps:
            self.apply(router, clock, step, leases, released)
            for replica in router.replicas:
                mine = [i for i, lease in enumerate(leases) if lease.replica is replica]
                unreleased = [i for i in mine if i not in released]
                self.assertGreaterEqual(replica.in_flight, 0)
                self.assertEqual(replica.in_flight, len(unreleased))
                self.assertEqual(replica.served, len(mine) - len(unreleased))
        for lease in leases:
            lease.release()
        self.assertEqual([replica.in_flight for replica in router.replicas], [0] * replica_count)

    def apply(
        self,
        router: Router,
        clock: Clock,
        step: Operation,
        leases: list[Lease],
        released: set[int],
    ) -> None:
        kind = step[0]
        if kind == "choose":
            tried = [router.replicas[i] for i in step[2]]
            replica = router.choose(step[1], tried)
            if replica is not None:
                leases.append(router.lease(replica))
        elif kind == "release":
            if leases:
                which = step[1] % len(leases)
                leases[which].release()
                released.add(which)
        elif kind == "eject":
            router.eject(router.replicas[step[1]], "connection refused")
        elif kind == "health":
            ids = step[3]
            router.set_health(
                router.replicas[step[1]].name,
                step[2],
                None if ids is None else models(*ids),
            )
        else:
            clock.advance(step[1])

    @settings(deadline=None, max_examples=200)
    @given(scenarios())
    def test_no_unavailable_choice_while_one_qualifies(
        self, scenario: tuple[int, float, int, list[Operation]]
    ) -> None:
        """
        Each choice is an untried replica; an available one whenever an
        untried one is available; one listing the model whenever an untried
        available one lists it; and, of two or more candidates, never the
        unique busiest (the power of two choices).
        """
        replica_count, fail_timeout, seed, steps = scenario
        router, clock = make_router(replica_count, fail_timeout, seed)
        state = [ModelReplica() for _ in router.replicas]
        leases: list[Lease] = []
        released: set[int] = set()
        for step in steps:
            if step[0] == "choose":
                replica = self.check_choice(router, state, step[1], step[2])
                if replica is not None:
                    leases.append(router.lease(replica))
                continue
            if step[0] == "eject" and len(state) > 1:  # a lone replica is never avoided
                state[step[1]].avoided_until = clock.seconds() + fail_timeout
            elif step[0] == "health":
                state[step[1]].up = step[2]
                if step[3] is not None:
                    state[step[1]].ids = tuple(step[3])
                if step[2]:
                    state[step[1]].avoided_until = None
            self.apply(router, clock, step, leases, released)
            self.assertEqual(
                [router.available(replica) for replica in router.replicas],
                [believed.available(clock.seconds()) for believed in state],
            )
            self.assertEqual(listed_ids(router), expected_listing(state, clock.seconds()))
            for model in (None, *MODEL_IDS, "unlisted"):
                self.check_choice(router, state, model, frozenset())

    def check_choice(
        self,
        router: Router,
        state: list[ModelReplica],
        model: str | None,
        tried_indexes: frozenset[int],
    ) -> Replica | None:
        """Choose several times, check each choice against the model, return one."""
        now = router.clock.seconds()
        untried = [i for i in range(len(state)) if i not in tried_indexes]
        available = [i for i in untried if state[i].available(now)]
        serving = [i for i in available if state[i].lists(model)]
        candidates = serving or available or untried
        tried = [router.replicas[i] for i in tried_indexes]
        if not untried:
            self.assertIsNone(router.choose(model, tried))
            return None
        loads = [router.replicas[i].in_flight for i in candidates]
        choices = [router.choose(model, tried) for _ in range(DRAWS_PER_CHOICE)]
        for replica in choices:
            assert replica is not None
            chosen = router.replicas.index(replica)
            self.assertIn(chosen, candidates)
            if available:
                self.assertIn(chosen, available)
            if serving:
                self.assertIn(chosen, serving)
            if len(candidates) > 1 and loads.count(max(loads)) == 1:
                self.assertLess(replica.in_flight, max(loads))
        return choices[0]
