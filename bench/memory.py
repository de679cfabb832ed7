"""
What one open stream costs a gateway worker in memory, and where it goes.

    PYTHONPATH=. python bench/memory.py [--streams 1000] [--tracemalloc] [--gc default]

Runs one worker's site (L{llmgw.service.build_site}, as C{twistd llmgw}
builds it, with C{--rate-limit 0}) in this process, in front of bench/sse.c
serving HTTPS on loopback, and holds C{--streams} streams open through it
with bench/sse.c's client, in another process: each gets its first event at
once and its second a minute later.  Once all are open it reads the
process's RSS, the objects the garbage collector tracks by type and, with
C{--tracemalloc}, the Python allocations by line, and prints each as the
difference from the same figures read when idle (after a warm-up of a few
streams, as a worker that has served some), divided by the streams open.
Then it collects the garbage and reads them again: what that frees was
cycles waiting for a collection.

C{--gc default} keeps CPython's collector thresholds; by default the
process settles its heap as a worker does (L{llmgw.heap.settle}).
C{--tracemalloc} costs memory of its own: read RSS from a run without it.
Needs gcc and OpenSSL's headers (for bench/sse.c), like C{make bench}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import protocol, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.task import deferLater, react

from llmgw import heap
from llmgw.devtls import write_demo_files
from llmgw.keys import KeyRing
from llmgw.options import Config
from llmgw.service import build_site

HERE = Path(__file__).resolve().parent


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def object_counts() -> Counter[str]:
    return Counter(type(thing).__qualname__ for thing in gc.get_objects())


class Reading:
    """The figures compared: RSS, tracked objects by type, Python allocations."""

    def __init__(self, traced: bool) -> None:
        self.rss_kb = rss_kb()
        self.objects = object_counts()
        self.snapshot = tracemalloc.take_snapshot() if traced else None
        self.traced_bytes = tracemalloc.get_traced_memory()[0] if traced else 0


def report(title: str, idle: Reading, now: Reading, streams: int, top: int) -> dict[str, Any]:
    per_stream = (now.rss_kb - idle.rss_kb) * 1024 / streams
    print(f"\n== {title}: {streams} open streams")
    print(f"RSS {idle.rss_kb / 1024:.1f} -> {now.rss_kb / 1024:.1f} MB: {per_stream:,.0f} B/stream")
    result: dict[str, Any] = {"rss_bytes_per_stream": per_stream}
    objects = now.objects - idle.objects
    print(f"tracked objects: {sum(objects.values()) / streams:.1f}/stream")
    for name, number in objects.most_common(top):
        print(f"  {number / streams:8.2f}  {name}")
    result["objects_per_stream"] = sum(objects.values()) / streams
    if now.snapshot is not None and idle.snapshot is not None:
        traced = (now.traced_bytes - idle.traced_bytes) / streams
        print(f"Python allocations (tracemalloc): {traced:,.0f} B/stream; by line:")
        for stat in now.snapshot.compare_to(idle.snapshot, "lineno")[:top]:
            frame = stat.traceback[0]
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            print(f"  {stat.size_diff / streams:8.0f} B {stat.count_diff / streams:6.2f}x  {where}")
        result["traced_bytes_per_stream"] = traced
    return result


def load(sse: str, port: int, streams: int, ramp: float, hold: float) -> subprocess.Popen[str]:
    """bench/sse.c's client: C{streams} streams, each held open for C{hold} seconds."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "stream": True,
        "bench_chunks": 2,
        "bench_interval_ms": hold * 1000,
    }
    argv = [
        sse,
        "load",
        "--port",
        str(port),
        "--conns",
        str(streams),
        "--streams",
        "1",
        "--chunks",
        "2",
        "--interval-ms",
        f"{hold * 1000:g}",
        "--ramp",
        f"{ramp:g}",
        "--deadline",
        f"{ramp + hold + 30:g}",
        "--body",
        json.dumps(body, separators=(",", ":")),
    ]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pump_factory(reactor: Any, port: int, cafile: str) -> tuple[Any, Callable[[], int]]:
    """bench/pump.py's byte pump, the floor: and how many of its streams are open."""
    sys.path.insert(0, str(HERE))
    import pump

    with open(cafile, "rb") as f:
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
    creator = ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust)
    upstream = wrapClientTLS(creator, HostnameEndpoint(reactor, "127.0.0.1", port))
    streams: set[Any] = set()

    class CountedClientSide(pump.ClientSide):
        def connected_upstream(self, upstream: Any) -> None:
            streams.add(self)
            super().connected_upstream(upstream)

        def connectionLost(self, reason: Any = None) -> None:
            streams.discard(self)
            super().connectionLost()

    factory = protocol.Factory.forProtocol(lambda: CountedClientSide(upstream))
    factory.noisy = False
    return factory, lambda: len(streams)


async def measure(reactor: Any, args: argparse.Namespace, workdir: Path) -> None:
    sse = str(workdir / "sse")
    compile_sse = ["gcc", "-O2", "-o", sse, str(HERE / "sse.c"), "-lssl", "-lcrypto"]
    subprocess.run(compile_sse, check=True)
    tls = write_demo_files(workdir / "tls")
    source_port = 20000 + os.getpid() % 20000
    source = subprocess.Popen(
        [sse, "serve", str(source_port), str(tls.cert), str(tls.key), "2", "60000"]
    )
    try:
        await deferLater(reactor, 0.5, lambda: None)
        config = Config(aihost="127.0.0.1", aihostport=source_port, aica=str(tls.ca), rate_limit=0)
        if args.system == "pump":
            factory, open_streams = pump_factory(reactor, source_port, str(tls.ca))
        else:
            site = build_site(config, reactor, None, KeyRing(None, None), colour=False)
            factory = site

            def open_streams() -> int:
                return int(site.resource.counters.in_flight)

        port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=4096)
        gateway_port = port.getHost().port

        async def hold(streams: int, seconds: float, ramp: float) -> subprocess.Popen[str]:
            client = load(sse, gateway_port, streams, ramp, seconds)
            began = time.monotonic()
            while open_streams() < streams:
                if client.poll() is not None or time.monotonic() - began > ramp + 60:
                    raise RuntimeError(f"streams did not open: {client.communicate()}")
                await deferLater(reactor, 0.2, lambda: None)
            return client

        async def idle() -> None:
            while open_streams():
                await deferLater(reactor, 0.2, lambda: None)

        warm = await hold(20, 0.5, 0.2)
        warm.communicate()
        await idle()
        if args.gc == "settled":
            heap.settle()
        if args.tracemalloc:
            tracemalloc.start()
        before = Reading(args.tracemalloc)
        client = await hold(args.streams, 60.0, args.ramp)
        await deferLater(reactor, 2.0, lambda: None)  # every first event relayed
        opened = open_streams()
        results = {"system": args.system, "streams": opened, "gc": args.gc}
        results["open"] = report("open", before, Reading(args.tracemalloc), opened, args.top)
        gc.collect()
        after_collect = Reading(args.tracemalloc)
        results["collected"] = report("open, after gc.collect()", before, after_collect, opened, 8)
        client.kill()
        client.communicate()
        print(json.dumps(results))
    finally:
        source.kill()
        source.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds to open them over")
    parser.add_argument("--system", choices=("gateway", "pump"), default="gateway")
    parser.add_argument("--gc", choices=("settled", "default"), default="settled")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as workdir:
        react(lambda reactor: Deferred.fromCoroutine(measure(reactor, args, Path(workdir))))


if __name__ == "__main__":
    main()
