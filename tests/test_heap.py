"""Tests for L{llmgw.heap}: the serving process's garbage collector."""

from __future__ import annotations

import gc
import weakref

from twisted.trial.unittest import SynchronousTestCase

from llmgw import heap


class SettleTests(SynchronousTestCase):
    def setUp(self) -> None:
        thresholds = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *thresholds)
        self.addCleanup(gc.unfreeze)

    def test_start_up_garbage_collected_then_the_rest_frozen(self) -> None:
        """
        A cycle start-up dropped is collected, not frozen for good; what is
        still alive is out of every later collection.
        """

        class Cycle:
            me: object = None

        garbage = Cycle()
        garbage.me = garbage
        dropped = weakref.ref(garbage)
        del garbage
        kept = Cycle()
        heap.settle()
        self.assertIsNone(dropped())
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertFalse(gc.is_tracked(kept) and kept in gc.get_objects())

    def test_young_collected_less_often(self) -> None:
        heap.settle()
        self.assertEqual(gc.get_threshold(), (20_000, 20, 20))
