#!/usr/bin/env python3
"""
Where a gateway worker's time goes, under the same load as `make bench`.

    .venv/bin/pip install py-spy            # a bench tool, not a dependency
    .venv/bin/python bench/profile.py http  # wrk, 50 connections, non-streamed
    .venv/bin/python bench/profile.py stream  # 500 paced streams, as test (i)
    .venv/bin/python bench/profile.py stream --conns 200 --chunks 256 --interval-ms 50
                                            # unsaturated long streams, as test (iii)

Starts the stand-ins and the gateway exactly as bench/run.py does, samples one
worker and the parent with py-spy while the load runs, and prints the
functions that take the most time (own time, and time including callees),
as shares of all samples.  `--rate-limit 0` or other gateway flags can be
compared with `--gateway-flag`.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        sys.exit("profile: needs py-spy (.venv/bin/pip install py-spy)")
    return found


def record(pid: int, seconds: float, out: Path, rate: int) -> subprocess.Popen[bytes]:
    argv = [py_spy(), "record", "-p", str(pid), "-d", f"{seconds:g}", "-r", str(rate)]
    argv += ["-f", "raw", "-o", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


#: py-spy's own idle detection misses these: a reactor waiting in epoll, and
#: an idle thread of the reactor's pool waiting for work.
IDLE_LEAVES = ("EPollReactor.doPoll (epollreactor.py:227)",)
IDLE_THREAD = "ThreadWorker.__init__.<locals>.work"


#: Where a sample's own time was, by the file of its innermost frame: the first
#: layer whose patterns match it wins; the rest is "other".
LAYERS = (
    ("llmgw's own code", ("llmgw/",)),
    ("send and recv system calls", ("untilConcludes", "tcp.py:278)", "writeToFD", "readFromFD")),
    ("TLS (pyOpenSSL and Twisted's TLS)", ("OpenSSL/", "protocols/tls.py", "_newtls.py")),
    ("Twisted's HTTP client", ("web/_newclient.py", "web/client.py", "treq/")),
    ("Twisted's HTTP server", ("web/http.py", "web/server.py")),
    ("headers", ("http_headers.py",)),
    ("Deferreds and coroutines", ("internet/defer.py",)),
    ("JSON", ("json/",)),
    ("frames (IntNStringReceiver, LineReceiver) and pipes", ("basic.py", "process.py", "stdio")),
    (
        "the reactor, its logging context, timers",
        ("base.py", "epollreactor.py", "posixbase.py", "log.py", "context.py", "abstract.py"),
    ),
)


def by_layer(path: Path) -> None:
    """Print the busy samples' own time by L{LAYERS}."""
    shares: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.split(";")[-1]
        short = leaf.split(" (")[0] + " (" + leaf.split(" (")[-1].split("/")[-1]
        if short in IDLE_LEAVES or (IDLE_THREAD in stack and ("wait" in leaf or "get" in leaf)):
            continue
        total += int(count)
        layer = next((name for name, marks in LAYERS if any(m in leaf for m in marks)), "other")
        shares[layer] += int(count)
    print("-- own time by layer")
    for layer, n in shares.most_common():
        print(f"{n / max(total, 1):6.1%}  {layer}")


def summarise(path: Path, title: str, top: int, focus: list[str] = ()) -> None:  # type: ignore[assignment]
    total = idle = 0
    own: collections.Counter[str] = collections.Counter()
    focused: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].split("/")[-1] for f in stack.split(";")
        ]
        leaf = frames[-1]
        if leaf in IDLE_LEAVES or (IDLE_THREAD in stack and ("wait" in leaf or "get" in leaf)):
            idle += n
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        for text in focus:
            if any(text in frame for frame in frames):
                focused[text] += n
    print(f"\n== {title}: {total} busy samples ({idle} idle samples left out)")
    print("-- own time")
    for frame, n in own.most_common(top):
        print(f"{n / total:6.1%}  {frame}")
    print("-- including callees")
    for frame, n in inclusive.most_common(top + 15):
        print(f"{n / total:6.1%}  {frame}")
    if focus:
        print("-- focus (stacks through a function whose name contains the text)")
        for text in focus:
            n = focused[text]
            print(f"{n / max(total, 1):6.1%}  {text}")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("load", choices=("http", "stream"))
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--conns", type=int, help="connections (http: 50; stream: 500)")
    p.add_argument("--chunks", type=int, default=64, help="events a stream (stream)")
    p.add_argument("--interval-ms", type=float, default=20.0, help="between events (stream)")
    p.add_argument("--rate", type=int, default=200)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--rate-limit", type=int, default=100_000_000)
    p.add_argument("--keep", type=Path, help="copy py-spy's raw stacks into this folder")
    p.add_argument(
        "--focus",
        action="append",
        default=[],
        help="also report the share of stacks through this function",
    )
    p.add_argument("--layers", action="store_true", help="also report own time by layer")
    args = p.parse_args()
    run.ensure_tools()
    run.raise_file_limit()
    ns = run.parse_args([])
    # This tree's code, not the copy installed in the venv (run.py's default).
    ns.gateway_path = str(run.ROOT)
    with tempfile.TemporaryDirectory(prefix="llmgw-profile-") as tmp:
        workdir = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "llmgw.devtls", str(workdir / "tls")],
            check=True,
            cwd=run.ROOT,
            stdout=subprocess.DEVNULL,
        )
        with run.bench_processes(workdir) as processes:
            if args.load == "http":
                upstream = run.free_port()
                conf = run.write_nginx_conf(workdir, upstream, workdir / "tls")
                nginx = processes.start(
                    "nginx", [run.nginx_binary(), "-p", str(workdir), "-c", str(conf)]
                )
                run.wait_for_port(upstream, nginx, processes)
            else:
                sse = run.build_sse(workdir)
                upstream = run.free_port()
                tls = workdir / "tls"
                source = processes.start(
                    "sse-source",
                    [
                        sse,
                        "serve",
                        str(upstream),
                        str(tls / "server.pem"),
                        str(tls / "server.key"),
                        str(args.chunks),
                        f"{args.interval_ms:g}",
                    ],
                )
                run.wait_for_port(upstream, source, processes)
            gateway = run.start_gateway(
                processes,
                ns,
                workdir,
                "gateway",
                "gateway",
                upstream,
                args.rate_limit,
                extra=run.observability(ns.gateway_python, ns.gateway_path, workdir, "gateway"),
            )
            time.sleep(0.5)
            gateway.refresh_pids()
            worker = run.gateway_workers(gateway)[0]
            load_result: dict[str, object] = {}

            def load() -> None:
                if args.load == "http":
                    load_result.update(
                        run.run_wrk(gateway, args.conns or 50, args.seconds + 2, processes)
                    )
                else:
                    port = int(gateway.url.rsplit(":", 1)[1].split("/", 1)[0])
                    one_stream = args.chunks * args.interval_ms / 1000
                    rounds = max(1, int(args.seconds / one_stream) + 2)
                    load_result.update(
                        run.run_streams(
                            sse,
                            port,
                            tls=False,
                            conns=args.conns or 500,
                            streams=rounds,
                            chunks=args.chunks,
                            interval_ms=args.interval_ms,
                            ramp=1.0,
                        )
                    )

            thread = threading.Thread(target=load)
            thread.start()
            time.sleep(1.5)
            spies = [
                record(worker, args.seconds, workdir / "worker.raw", args.rate),
                record(gateway.process.pid, args.seconds, workdir / "parent.raw", args.rate),
            ]
            for spy in spies:
                spy.wait()
            thread.join()
            keys = (
                "rps",
                "p50_us",
                "p99_us",
                "cpu_us_per_request",
                "lost",
                "stalls",
                "lat_p50_ms",
                "lat_p99_ms",
            )
            print({k: load_result[k] for k in keys if k in load_result})
            summarise(workdir / "worker.raw", f"worker {worker}", args.top, args.focus)
            if args.layers:
                by_layer(workdir / "worker.raw")
            summarise(workdir / "parent.raw", f"parent {gateway.process.pid}", args.top, args.focus)
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                for name in ("worker.raw", "parent.raw"):
                    shutil.copy(workdir / name, args.keep / f"{args.load}-{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
