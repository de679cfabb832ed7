"""
The garbage collector of a serving process: start-up's objects frozen, the
young collected less often.

A worker starts with a few hundred thousand long-lived objects (Twisted,
the OpenSSL bindings, the site) and then makes short-lived ones for every
request: Deferreds, headers, records.  With CPython's defaults a collection
of the young runs every 700 allocations, and every older collection walks
all of start-up's objects again, though they never become garbage.  Freezing
them once start-up is done takes them out of every later collection; a
higher threshold for the young makes collections rarer, each a little
longer.  Requests' garbage is almost all freed by
reference counting at once; only cycles wait for a collection.
"""

from __future__ import annotations

import gc

#: Allocations between collections of the young, and of each older generation.
THRESHOLDS = (20_000, 20, 20)


def settle() -> None:
    """Collect what start-up left, freeze the rest, and collect less often from now on."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
