#!/usr/bin/env python3
"""
`make bench`: the gateway against a direct connection and the bare floors.

    .venv/bin/python bench/run.py                      # what `make bench` runs
    .venv/bin/python bench/run.py --update BENCHMARKS.md   # and rewrite its table
    .venv/bin/python bench/run.py --quick              # a smoke run of a minute or two

Everything runs on 127.0.0.1 with real, fast stand-ins, and is torn down on exit:

- nginx (Debian's) answers POST /v1/chat/completions over HTTPS with a canned
  vLLM-shaped reply; wrk (Debian's) is the load generator, with bench/post.lua;
- bench/sse.c, compiled here, is the paced SSE source (HTTPS) and the stream
  client: every event carries the time it was sent, so the client measures
  per-event delivery latency, lost events and stalls;
- the systems under test: the upstream direct, the gateway (`--workers 2`, client
  keys, an upstream key, a trusted proxy, the cross-worker limiter with a limit
  too high to trip, `--metrics-bind` on a loopback port and `--access-log` in
  the workdir; twistd's log gets the text access line of every request, as it
  always does), the same gateway with `--rate-limit 0`, the same gateway
  without `--metrics-bind` and `--access-log` (issue 11), the same gateway
  with `--rate-store` on a private redis-server on a Unix socket (issue 12:
  skipped, with a message, without redis-server or txredisapi), the same
  gateway in front of two nginx replicas (`--upstream`, twice: skipped, with a
  message, when the gateway has no `--upstream`), and the floor
  (bench/floor.py, a bare Twisted + treq forwarder);
- for streams, the upstream direct, the pump (bench/pump.py, a bare Twisted TLS
  byte pump, no HTTP: the floor of CPU per relayed event and per stream
  opened), and the gateway (with metrics and the access log), in three tests:
  (i) 500 connections running streams of 64 events 20 ms apart, (ii) 5,000
  open streams, and (iii) 500 streams at 16 and at 256 events each, 50 ms
  apart, which tell a relay's CPU per relayed chunk from its CPU per stream
  opened (issue 13).

The request/response runs are interleaved round by round, rotating the order, so
that drift of the machine hits every system alike; each figure is the median of
the rounds.  Each stream test runs direct first, to show that the source and the
client stay clean at that size, then through the pump, then the gateway.  The
report's Targets table leads with issue 13's targets, then the earlier issues'
that still apply.  Missing tools (nginx, wrk, gcc, libssl-dev) are installed
with apt-get when running as root, and named otherwise.
"""

# The report is built from long Markdown table rows, with typographic signs in them.
# ruff: noqa: E501, RUF001

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
POST_LUA = HERE / "post.lua"
SSE_C = HERE / "sse.c"
LIMITER_PY = HERE / "limiter.py"
FLOOR_PY = HERE / "floor.py"
PUMP_PY = HERE / "pump.py"

MODEL = "TheBloke/Mistral-7B-Instruct-v0.2-AWQ"
CHAT_BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello there, how are you today?"},
        ],
        "temperature": 0.7,
        "max_tokens": 64,
    },
    separators=(",", ":"),
)
CANNED_REPLY = json.dumps(
    {
        "id": "chatcmpl-5f1c2e9a7b6d4c3a9e8f7a6b5c4d3e2f",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! I am doing well, thank you for asking. How can I help?",
                    "tool_calls": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 31, "total_tokens": 49, "completion_tokens": 18},
        "prompt_logprobs": None,
    },
    separators=(",", ":"),
)
MODELS_REPLY = json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "vllm"}]},
    separators=(",", ":"),
)
CLIENT_KEY = "sk-bench-client-0123456789abcdef"
FORWARDED_FOR = "127.0.0.2"  # the client behind the trusted proxy; loopback, never contacted

#: Issue 13's targets, which lead the report's Targets table.
TARGET_FLOOR_RATIO = 1.5  # throughput at 50 connections, limiter on, ÷ the floor's
TARGET_CHUNK_CPU_RATIO = 1.05  # CPU per relayed chunk ÷ the pump's
TARGET_STREAM_CPU_RATIO = 2.5  # CPU per stream opened ÷ the pump's
TARGET_RSS_PER_STREAM_KB = 48.0  # (ii): RSS per open stream
#: The targets of earlier issues that issue 13 did not replace.
TARGET_REPLICAS_RATIO = 1.0  # issue 10: two replicas serve at least what one does
TARGET_OBSERVABILITY_RATIO = 0.95  # issue 11: metrics and the access log cost at most 5 %
TARGET_ADDED_P99_MS = 1.0  # issue 7, like the rest below
TARGET_STREAM_P99_MS = 20.0
TARGET_CPU_PER_CHUNK_US = 25.0
TARGET_IDLE_RSS_MB = 40.0
TARGET_LIMITER_BYTES = 300.0
#: (iii): the same streams at two lengths, so that what a relay spends per
#: chunk and per stream opened can be told apart (issue 13).
SPLIT_CHUNKS = (16, 256)
#: (iii) opens its streams at this rate: at 500 a second the gateway, which
#: spends about 2 ms of CPU opening one, would saturate during the ramp.
SPLIT_OPENINGS_PER_S = 250.0
FILE_LIMIT = 20000

NEEDED = {  # what -> Debian package
    "nginx": "nginx",
    "wrk": "wrk",
    "gcc": "gcc",
    "/usr/include/openssl/ssl.h": "libssl-dev",
}


def say(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tools


def _have(what: str) -> bool:
    if what.startswith("/"):
        return os.path.exists(what)
    return shutil.which(what) is not None or os.path.exists(f"/usr/sbin/{what}")


def ensure_tools() -> None:
    missing = sorted({package for what, package in NEEDED.items() if not _have(what)})
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say(f"bench: installing {' '.join(missing)} from Debian's packages")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        if subprocess.run(command, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
            subprocess.run(command, env=env, stdout=subprocess.DEVNULL)
        missing = sorted({package for what, package in NEEDED.items() if not _have(what)})
    if missing:
        sys.exit(f"bench: needs {' '.join(missing)}: apt-get install {' '.join(missing)}")


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def raise_file_limit() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FILE_LIMIT
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ----------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Every process the bench starts, each in its own session, all killed on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Any:
        log = open(self.workdir / f"{name}.log", "ab")
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=self.workdir,
        )
        log.close()
        process.name = name  # type: ignore[attr-defined]
        self.running.append(process)
        return process

    def stop(self, process: Any, grace: float = 8.0) -> None:
        if process.poll() is None:
            for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(process.pid, signum)
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Whatever is left of its session (a worker whose parent went first).
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.running)):
            self.stop(process, grace=3.0)

    def log_tail(self, process: Any, lines: int = 30) -> str:
        path = self.workdir / f"{process.name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_for_port(port: int, process: Any, processes: Processes, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.name} exited ({process.returncode}):\n{processes.log_tail(process)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{process.name} did not listen on {port} within {seconds:.0f}s")


# ---------------------------------------------------------------- /proc accounting

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """C{root} and every process below it."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(_stat_fields(int(entry))[1])
            except (OSError, IndexError, ValueError):
                continue
    tree = [root]
    for pid in tree:
        tree.extend(child for child, parent in parents.items() if parent == pid)
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def exact_cpu_seconds(pids: list[int]) -> float:
    """
    Like L{cpu_seconds}, to the nanosecond: the time on a CPU of every thread
    of C{pids}, from C{/proc/PID/task/TID/schedstat}.

    C{/proc/PID/stat} counts in clock ticks (10 ms), and each reading rounds
    down: for the relays' CPU over a short run, such as (iii)'s 500 streams of
    16 chunks, that is an error of up to a tick per process, several percent of
    the figure.  A thread that ends between two readings takes its time with
    it (see L{exact_or_ticks}).  Without schedstat (a kernel without
    C{CONFIG_SCHED_INFO}), ticks it is.
    """
    if not os.path.exists("/proc/self/schedstat"):
        return cpu_seconds(pids)
    total = 0
    for pid in pids:
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for thread in threads:
            try:
                with open(f"/proc/{pid}/task/{thread}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def exact_or_ticks(exact: float, ticks: float, processes: int) -> float:
    """
    The CPU a measurement took: the C{exact} figure (L{exact_cpu_seconds}),
    unless the C{ticks} one (L{cpu_seconds}) exceeds it by more than a tick
    per process, the most rounding can account for: a thread ended in
    between, and its time is in the ticks alone.
    """
    return ticks if ticks - exact > processes / CLOCK_TICKS else exact


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


class ForeignLoad:
    """
    CPU used during a measurement by processes that are not the bench's own.

    The bench shares a two-core machine: anything else running (a test suite,
    a build) takes CPU from the systems under test and skews their figures, so
    each measurement says how much of it there was.
    """

    def __init__(self, processes: Processes) -> None:
        self.processes = processes

    def __enter__(self) -> ForeignLoad:
        self.started = time.monotonic()
        self.busy = machine_busy_seconds()
        self.ours = self._ours()
        return self

    def _ours(self) -> float:
        pids = [pid for p in self.processes.running for pid in process_tree(p.pid)]
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        return cpu_seconds(pids) + children.ru_utime + children.ru_stime + me.ru_utime + me.ru_stime

    def __exit__(self, *exc: object) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        busy = machine_busy_seconds() - self.busy
        ours = self._ours() - self.ours
        self.cores = max(busy - ours, 0.0) / elapsed


def wait_for_quiet(processes: Processes, limit: float = 0.15, patience: float = 120.0) -> float:
    """Wait (a while) for other work on the machine to finish; return its load then."""
    deadline = time.monotonic() + patience
    told = False
    while True:
        with ForeignLoad(processes) as load:
            time.sleep(1.0)
        if load.cores <= limit or time.monotonic() > deadline:
            return load.cores
        if not told:
            say(
                f"bench: other processes use {load.cores:.2f} cores; waiting up to {patience:.0f} s"
            )
            told = True


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """The peak of the summed RSS of some processes, sampled in a thread."""

    def __init__(self, pids: list[int], every: float = 0.2) -> None:
        self.pids = pids
        self.every = every
        self.peak = 0
        self.peak_each: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            each = [rss_kb(pid) for pid in self.pids]
            if sum(each) > self.peak:
                self.peak, self.peak_each = sum(each), each
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------- the systems


class System:
    """A thing wrk can be pointed at, with the processes whose CPU it costs."""

    def __init__(self, key: str, label: str, url: str, process: Any, headers: bool) -> None:
        self.key = key
        self.label = label
        self.url = url
        self.process = process
        self.pids: list[int] = []
        self.headers = headers  # sends the client key and X-Forwarded-For

    def refresh_pids(self) -> None:
        self.pids = process_tree(self.process.pid)


def write_nginx_conf(workdir: Path, port: int, tls: Path, name: str = "nginx") -> Path:
    """The canned upstream; C{name} keeps the files of each instance apart."""
    conf = workdir / f"{name}.conf"
    temp = workdir / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"""{user}daemon off;
worker_processes 1;
worker_rlimit_nofile {FILE_LIMIT};
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log warn;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {tls}/server.pem;
        ssl_certificate_key {tls}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 '{CANNED_REPLY}';
        }}
        location = /v1/models {{
            default_type application/json;
            return 200 '{MODELS_REPLY}';
        }}
        location / {{ return 404; }}
    }}
}}
"""
    )
    return conf


def gateway_argv(
    python: str,
    workdir: Path,
    name: str,
    port: int,
    upstream: int | list[str],
    rate_limit: int,
    extra: list[str] | None = None,
) -> list[str]:
    """
    The gateway under test; C{upstream} is the one upstream's port on 127.0.0.1
    (C{--aihost}), or a list of replica URLs (C{--upstream}, each); C{extra},
    flags some systems add (metrics and the JSON access log, a rate store).

    twistd's own log (C{--logfile}) gets the text access line of every request,
    whatever the flags: the gateway has no switch for it.
    """
    if isinstance(upstream, int):
        upstream_args = ["--aihost", "127.0.0.1", "--aihostport", str(upstream)]
    else:
        upstream_args = [arg for url in upstream for arg in ("--upstream", url)]
    twistd = str(Path(python).with_name("twistd"))
    keys = workdir / "client-keys"
    keys.write_text(f"# bench client\n{CLIENT_KEY}\n")
    aikey = workdir / "upstream-key"
    aikey.write_text("sk-bench-upstream\n")
    return [
        twistd,
        "-n",
        "--pidfile=",
        "--logfile",
        str(workdir / f"{name}.access.log"),
        "llmgw",
        "--bindip",
        "127.0.0.1",
        "--bindport",
        str(port),
        *upstream_args,
        "--aica",
        str(workdir / "tls" / "ca.pem"),
        "--workers",
        "2",
        "--grace",
        "2",
        "--rate-limit",
        str(rate_limit),
        "--api-keys-file",
        str(keys),
        "--aikey-file",
        str(aikey),
        "--trusted-proxy",
        "127.0.0.1/32",
        *(extra or []),
    ]


def gateway_workers(system: System) -> list[int]:
    return [pid for pid in system.pids if pid != system.process.pid]


def wait_for_log(system: System, needle: str, count: int, what: str, seconds: float = 30.0) -> None:
    """Wait for C{count} lines with C{needle} in a gateway's twistd log."""
    deadline = time.monotonic() + seconds
    log = Path(system.process.args[system.process.args.index("--logfile") + 1])
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if text.count(needle) >= count:
            return
        if system.process.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"{system.label}: {what}:\n{text[-2000:]}")


def wait_for_workers(system: System, count: int = 2, seconds: float = 30.0) -> None:
    """The parent listens before its workers have adopted the socket: wait for them."""
    wait_for_log(system, " serving", count, "workers did not start", seconds)
    system.refresh_pids()


def wait_for_floor_workers(
    process: Any, processes: Processes, count: int = 2, seconds: float = 30.0
) -> None:
    """bench/floor.py and bench/pump.py print "serving" once each worker's reactor runs."""
    deadline = time.monotonic() + seconds
    log = processes.workdir / f"{process.name}.log"
    while time.monotonic() < deadline:
        if log.exists() and log.read_text(errors="replace").count("serving") >= count:
            return
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{process.name}: workers did not start:\n{processes.log_tail(process)}")


def check_reply(system: System, tls: Path, expect_gateway: bool) -> None:
    """One real request first: a bench of a broken path would measure error pages."""
    url = system.url.split("//", 1)[1]
    hostport = url.split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    if system.url.startswith("https"):
        context = ssl.create_default_context(cafile=str(tls / "ca.pem"))
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, int(port), context=context, timeout=10
        )
    else:
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Content-Type": "application/json"}
    if system.headers:
        headers.update({"Authorization": f"Bearer {CLIENT_KEY}", "X-Forwarded-For": FORWARDED_FOR})
    connection.request("POST", "/v1/chat/completions", CHAT_BODY, headers)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    if response.status != 200 or json.loads(body) != json.loads(CANNED_REPLY):
        raise RuntimeError(f"{system.label}: {response.status} {body[:300]!r}")
    if expect_gateway:
        for name in ("X-Frame-Options", "Content-Security-Policy", "Cache-Control"):
            if response.getheader(name) is None:
                raise RuntimeError(f"{system.label}: no {name} header")
        limit = flag_value(system, "--rate-limit")
        if limit not in (None, "0") and response.getheader("RateLimit") is None:
            raise RuntimeError(f"{system.label}: no RateLimit header")
        # A system said to have metrics, or the Redis limiter, must really have
        # them: a silent fallback would measure the wrong thing.
        bind = flag_value(system, "--metrics-bind")
        if bind is not None and "# TYPE llmgw_requests_total counter" not in scrape_metrics(bind):
            raise RuntimeError(f"{system.label}: /metrics on {bind} has no llmgw_requests_total")
        store = flag_value(system, "--rate-store")
        if store is not None and int(redis_command(redis_socket(store), "DBSIZE")) < 1:
            raise RuntimeError(f"{system.label}: the request left no key in {store}")


def flag_value(system: System, flag: str) -> str | None:
    """The value C{system}'s process was given for C{flag}, if any."""
    args = list(system.process.args)
    return args[args.index(flag) + 1] if flag in args else None


def scrape_metrics(bind: str) -> str:
    """The text of C{GET /metrics} on a gateway's C{--metrics-bind} (127.0.0.1:PORT)."""
    host, port = bind.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    body = response.read().decode("utf-8", "replace")
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"/metrics on {bind}: {response.status} {body[:300]!r}")
    return body


def requests_counted(metrics: str) -> int:
    """The sum of C{llmgw_requests_total} over its labels, from a scrape."""
    return sum(
        int(float(m.group(1)))
        for m in re.finditer(r"^llmgw_requests_total(?:\{[^}]*\})? (\S+)$", metrics, re.M)
    )


# --------------------------------------------------------------------------- redis


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


def redis_socket(store: str) -> Path:
    """The socket of a C{unix:///path/redis.sock[?db=N]} rate store."""
    return Path(store.removeprefix("unix://").split("?", 1)[0])


def redis_command(path: Path, *words: str, timeout: float = 5.0) -> bytes:
    """
    One command to the bench's redis-server on its Unix socket, and the reply's
    payload (a status, an integer or a bulk string).  Just enough RESP for the
    bench to look at what the gateway (which talks through txredisapi) did.
    """
    request = f"*{len(words)}\r\n" + "".join(f"${len(w.encode())}\r\n{w}\r\n" for w in words)
    with socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(timeout)
        connection.connect(str(path))
        connection.sendall(request.encode())
        reply = b""

        def more() -> bytes:
            chunk = connection.recv(65536)
            if not chunk:
                raise OSError("redis-server closed the connection")
            return chunk

        while b"\r\n" not in reply:
            reply += more()
        head, rest = reply.split(b"\r\n", 1)
        if head.startswith(b"-"):
            raise OSError(f"redis-server: {head[1:].decode(errors='replace')}")
        if not head.startswith(b"$"):
            return head[1:]
        size = int(head[1:])
        while len(rest) < size + 2:
            rest += more()
        return rest[:size]


def redis_script_calls(path: Path) -> int:
    """How many scripts (the limiter's decisions) this redis-server has run."""
    info = redis_command(path, "INFO", "commandstats").decode()
    return sum(
        int(m.group(1)) for m in re.finditer(r"^cmdstat_eval(?:sha)?:calls=(\d+)", info, re.M)
    )


def start_redis(processes: Processes, workdir: Path, binary: str) -> tuple[Any, Path]:
    """A private redis-server on a Unix socket in the workdir: no TCP port, no files kept."""
    path = workdir / "redis.sock"
    argv = [binary, "--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
    process = processes.start("redis-server", argv)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{processes.log_tail(process)}")
        try:
            if redis_command(path, "PING") == b"PONG":
                return process, path
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("redis-server did not answer on its socket within 30s")


# ----------------------------------------------------------------------------- wrk


def run_wrk(
    system: System, conns: int, seconds: float, processes: Processes | None = None
) -> dict[str, Any]:
    env = dict(os.environ, BENCH_BODY=CHAT_BODY)
    if system.headers:
        env.update(BENCH_KEY=CLIENT_KEY, BENCH_XFF=FORWARDED_FOR)
    argv = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(POST_LUA),
        system.url,
    ]
    workers = gateway_workers(system) if system.key.startswith("gateway") else []
    cpu_before = cpu_seconds(system.pids)
    parent_before = cpu_seconds([system.process.pid])
    serving = workers or [pid for pid in system.pids if pid != system.process.pid]
    each_before = [cpu_seconds([pid]) for pid in serving]
    with ForeignLoad(processes or Processes(Path("."))) as foreign:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
    cpu = cpu_seconds(system.pids) - cpu_before
    parent_cpu = cpu_seconds([system.process.pid]) - parent_before
    each = [cpu_seconds([pid]) - before for pid, before in zip(serving, each_before, strict=True)]
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed on {system.label}: {done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(lines[-1][6:])
    seconds_run = result["duration_us"] / 1e6
    requests = max(result["requests"], 1)
    result["rps"] = result["requests"] / seconds_run
    result["errors"] = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
    result["cpu_us_per_request"] = cpu / requests * 1e6
    result["parent_cpu_us_per_request"] = parent_cpu / requests * 1e6 if workers else None
    result["cpu_cores"] = cpu / seconds_run
    result["foreign_cores"] = foreign.cores
    # How evenly the kernel spread wrk's connections over the workers: the
    # busiest worker's share of the workers' CPU (0.5 is even, 1.0 is one).
    result["busiest_worker_share"] = (
        max(each) / sum(each) if len(each) > 1 and sum(each) > 0 else None
    )
    return result


# -------------------------------------------------------------------------- streams


def build_sse(workdir: Path) -> str:
    binary = workdir / "sse"
    command = ["gcc", "-O2", "-o", str(binary), str(SSE_C), "-lssl", "-lcrypto"]
    subprocess.run(command, check=True)
    return str(binary)


def stream_body(chunks: int, interval_ms: float) -> str:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "stream": True,
            "max_tokens": chunks,
            "bench_chunks": chunks,
            "bench_interval_ms": interval_ms,
        },
        separators=(",", ":"),
    )


def run_streams(
    sse: str,
    port: int,
    *,
    tls: bool,
    conns: int,
    streams: int,
    chunks: int,
    interval_ms: float,
    ramp: float,
) -> dict[str, Any]:
    duration = ramp + streams * (chunks - 1) * interval_ms / 1000
    deadline = duration + 30
    argv = [
        sse,
        "load",
        "--port",
        str(port),
        "--conns",
        str(conns),
        "--streams",
        str(streams),
        "--chunks",
        str(chunks),
        "--interval-ms",
        f"{interval_ms:g}",
        "--ramp",
        f"{ramp:g}",
        "--deadline",
        f"{deadline:g}",
        "--body",
        stream_body(chunks, interval_ms),
    ]
    if tls:
        argv.append("--tls")
    else:
        argv += [
            "--header",
            f"Authorization: Bearer {CLIENT_KEY}",
            "--header",
            f"X-Forwarded-For: {FORWARDED_FOR}",
        ]
    started = time.monotonic()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=deadline + 30)
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"stream client failed: {done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if done.stderr.strip():
        result["client_said"] = done.stderr.strip().splitlines()[:3]
    result["wall"] = time.monotonic() - started
    client_cpu = (usage_after.ru_utime - usage_before.ru_utime) + (
        usage_after.ru_stime - usage_before.ru_stime
    )
    result["client_cpu_us_per_event"] = client_cpu / max(result["events"], 1) * 1e6
    return result


# ------------------------------------------------------------------------- the run


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def versions(python: str) -> dict[str, str]:
    def output(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        except OSError:
            return "?"
        return (done.stdout + done.stderr).strip()

    probe = (
        "import sys, platform, twisted, treq, OpenSSL; from OpenSSL import SSL;"
        "print(platform.python_implementation(), sys.version.split()[0], twisted.__version__,"
        " treq.__version__, OpenSSL.__version__,"
        " SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode())"
    )
    impl, pyver, twisted, treq, pyopenssl, *openssl = output([python, "-c", probe]).split()
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    debian = (
        Path("/etc/debian_version").read_text().strip()
        if Path("/etc/debian_version").exists()
        else "?"
    )
    nginx = output([nginx_binary(), "-v"]).split("/")[-1]
    wrk = output(["wrk", "-v"]).split()[1] if output(["wrk", "-v"]).startswith("wrk") else "?"
    return {
        "machine": f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**30} GiB",
        "os": f"Debian {debian}, Linux {platform.release()}",
        "gateway": f"{impl} {pyver}, Twisted {twisted}, treq {treq}, pyOpenSSL {pyopenssl}, {' '.join(openssl)}",
        "tools": f"nginx {nginx}, wrk {wrk}, {output(['gcc', '-dumpfullversion'])} gcc",
    }


def run_limiter_bench(python: str, gateway_path: str) -> dict[str, Any]:
    """bench/limiter.py, as it is, and its figures."""
    done = subprocess.run(
        [python, str(LIMITER_PY)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=gateway_path or str(ROOT)),
    )
    text = done.stdout
    figures: dict[str, Any] = {"raw": text}
    match = re.search(r"decide, 1,000,000 distinct clients\s+([\d,]+) /s", text)
    figures["decisions_per_s"] = float(match.group(1).replace(",", "")) if match else None
    match = re.search(r"decide, one client with \d+ counted, 1 per second\s+([\d,]+) /s", text)
    figures["decisions_per_s_busy"] = float(match.group(1).replace(",", "")) if match else None
    match = re.search(r"bytes per client\s+([\d.]+)", text)
    figures["bytes_per_client"] = float(match.group(1)) if match else None
    return figures


@contextmanager
def bench_processes(workdir: Path) -> Iterator[Processes]:
    processes = Processes(workdir)

    def on_signal(signum: int, frame: object) -> None:
        raise SystemExit(f"bench: stopped by signal {signum}")

    previous = {
        s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    try:
        yield processes
    finally:
        processes.stop_all()
        for s, handler in previous.items():
            signal.signal(s, handler)


def start_gateway(
    processes: Processes,
    args: argparse.Namespace,
    workdir: Path,
    name: str,
    label: str,
    upstream: int | list[str],
    rate_limit: int,
    path: str | None = None,
    extra: list[str] | None = None,
) -> System:
    port = free_port()
    env = dict(os.environ)
    path = args.gateway_path if path is None else path
    if path:
        env["PYTHONPATH"] = path
    argv = gateway_argv(args.gateway_python, workdir, name, port, upstream, rate_limit, extra)
    process = processes.start(name, argv, env)
    system = System(name, label, f"http://127.0.0.1:{port}/v1/chat/completions", process, True)
    wait_for_port(port, process, processes)
    wait_for_workers(system)
    if "--rate-store" in argv:
        # Decisions made before the connection would be the fallback's.
        wait_for_log(
            system, "Sharing the rate limit through", 1, "did not connect to its --rate-store"
        )
    return system


@functools.cache
def gateway_help(python: str, gateway_path: str) -> str:
    """This gateway's C{twistd llmgw --help}: which flags it has."""
    env = dict(os.environ)
    if gateway_path:
        env["PYTHONPATH"] = gateway_path
    twistd = str(Path(python).with_name("twistd"))
    done = subprocess.run(
        [twistd, "llmgw", "--help"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    return done.stdout


def gateway_has(python: str, gateway_path: str, *flags: str) -> bool:
    """Whether this gateway takes every one of C{flags} (C{--name}, with a value)."""
    text = gateway_help(python, gateway_path)
    return all(re.search(rf"{re.escape(flag)}=", text) is not None for flag in flags)


def gateway_has_replicas(python: str, gateway_path: str) -> bool:
    """Whether this gateway takes C{--upstream} (issue 10), from its C{--help}."""
    return gateway_has(python, gateway_path, "--upstream")


OBSERVABILITY_FLAGS = ("--metrics-bind", "--access-log")


def observability(python: str, gateway_path: str, workdir: Path, name: str) -> list[str]:
    """
    Metrics and the JSON access log (issue 11), as an operator runs them: the
    parent's C{/metrics} listener on a loopback port of its own, and the
    access log in the workdir (the main gateway's is C{access.log}); nothing
    for a gateway without these flags (an older tree given to C{--compare}).
    """
    if not gateway_has(python, gateway_path, *OBSERVABILITY_FLAGS):
        return []
    log = workdir / ("access.log" if name == "gateway" else f"{name}-access.log")
    return ["--metrics-bind", f"127.0.0.1:{free_port()}", "--access-log", str(log)]


def redis_missing(python: str, gateway_path: str) -> str | None:
    """Why the Redis limiter cannot run here, or L{None} when it can."""
    if not gateway_has(python, gateway_path, "--rate-store"):
        return "the gateway has no --rate-store yet (issue 12)"
    if redis_server_binary() is None:
        return "redis-server is not installed (apt-get install redis-server)"
    env = dict(os.environ)
    if gateway_path:
        env["PYTHONPATH"] = gateway_path
    probe = subprocess.run(
        [python, "-c", "import txredisapi"], env=env, capture_output=True, timeout=60, cwd=ROOT
    )
    if probe.returncode != 0:
        return f"txredisapi is not installed for {python} (pip install 'llmgw[redis]')"
    return None


def http_section(
    processes: Processes, args: argparse.Namespace, workdir: Path, results: dict[str, Any]
) -> None:
    tls = workdir / "tls"
    nginx_port = free_port()
    conf = write_nginx_conf(workdir, nginx_port, tls)
    nginx = processes.start("nginx", [nginx_binary(), "-p", str(workdir), "-c", str(conf)])
    wait_for_port(nginx_port, nginx, processes)
    direct = System(
        "direct",
        "direct (nginx, HTTPS)",
        f"https://127.0.0.1:{nginx_port}/v1/chat/completions",
        nginx,
        False,
    )
    direct.refresh_pids()

    python, path = args.gateway_python, args.gateway_path

    def observed(name: str) -> list[str]:
        return observability(python, path, workdir, name)

    gateway = start_gateway(
        processes,
        args,
        workdir,
        "gateway",
        "gateway",
        nginx_port,
        100_000_000,
        extra=observed("gateway"),
    )
    nolimit = start_gateway(
        processes,
        args,
        workdir,
        "gateway-nolimit",
        "gateway, limiter off",
        nginx_port,
        0,
        extra=observed("gateway-nolimit"),
    )

    # Issue 11: the same gateway without --metrics-bind and --access-log (the
    # workers count all the same; only the listener and the file go).
    observability_off: list[System] = []
    if gateway_has(python, path, *OBSERVABILITY_FLAGS):
        observability_off.append(
            start_gateway(
                processes,
                args,
                workdir,
                "gateway-observability-off",
                "gateway, metrics and access log off",
                nginx_port,
                100_000_000,
            )
        )
    else:
        results["observability_skipped"] = (
            "the gateway has no --metrics-bind / --access-log yet (issue 11), "
            "so the metrics and access log off round did not run"
        )
        say(f"bench: {results['observability_skipped']}")

    # Issue 12: the same gateway deciding in a private redis-server.
    redis: list[System] = []
    redis_server = None
    missing = redis_missing(python, path) if args.redis else "not asked for (--no-redis)"
    if missing is None:
        redis_server, redis_path = start_redis(processes, workdir, redis_server_binary() or "")
        redis.append(
            start_gateway(
                processes,
                args,
                workdir,
                "gateway-redis",
                "gateway, Redis limiter",
                nginx_port,
                100_000_000,
                extra=[*observed("gateway-redis"), "--rate-store", f"unix://{redis_path}"],
            )
        )
    else:
        results["redis_skipped"] = f"the Redis limiter round did not run: {missing}"
        say(f"bench: {results['redis_skipped']}")

    # Two replicas: two more nginx instances, the same canned upstream as the
    # one above, named by the host name their certificate is issued for.
    replicas: list[System] = []
    replica_servers = []
    if args.replicas and gateway_has_replicas(args.gateway_python, args.gateway_path):
        urls = []
        for n in (1, 2):
            port = free_port()
            conf = write_nginx_conf(workdir, port, tls, f"nginx-replica-{n}")
            server = processes.start(
                f"nginx-replica-{n}", [nginx_binary(), "-p", str(workdir), "-c", str(conf)]
            )
            wait_for_port(port, server, processes)
            replica_servers.append(server)
            urls.append(f"https://localhost:{port}")
        replicas.append(
            start_gateway(
                processes,
                args,
                workdir,
                "gateway-replicas",
                "gateway, two replicas",
                urls,
                100_000_000,
                extra=observed("gateway-replicas"),
            )
        )
    elif args.replicas:
        results["replicas_skipped"] = (
            "the gateway has no --upstream yet (issue 10), so the two-replica round did not run"
        )
        say(f"bench: {results['replicas_skipped']}")
    else:
        results["replicas_skipped"] = "the two-replica round was not asked for (--no-replicas)"

    compared = [
        start_gateway(
            processes,
            args,
            workdir,
            f"gateway-compare-{n}",
            f"gateway from {tree}",
            nginx_port,
            100_000_000,
            str(tree),
            extra=observability(python, str(tree), workdir, f"gateway-compare-{n}"),
        )
        for n, tree in enumerate(args.compare, 1)
    ]

    floor_port = free_port()
    floor = processes.start(
        "floor",
        [
            args.gateway_python,
            str(args.floor),
            str(floor_port),
            f"https://127.0.0.1:{nginx_port}/v1/chat/completions",
            str(tls / "ca.pem"),
            "2",
        ],
    )
    wait_for_port(floor_port, floor, processes)
    wait_for_floor_workers(floor, processes)
    floor_system = System(
        "floor",
        "floor (floor.py)",
        f"http://127.0.0.1:{floor_port}/v1/chat/completions",
        floor,
        False,
    )
    time.sleep(1.0)  # let every worker finish importing before idle RSS is read
    for system in (
        gateway,
        nolimit,
        *observability_off,
        *redis,
        *replicas,
        floor_system,
        *compared,
    ):
        system.refresh_pids()

    idle = {
        "gateway_workers_kb": [rss_kb(pid) for pid in gateway_workers(gateway)],
        "gateway_parent_kb": rss_kb(gateway.process.pid),
        "floor_workers_kb": [rss_kb(pid) for pid in floor_system.pids if pid != floor.pid],
    }
    results["idle_rss"] = idle

    systems = [
        direct,
        gateway,
        nolimit,
        *observability_off,
        *redis,
        *replicas,
        floor_system,
        *compared,
    ]
    for system in systems:
        check_reply(system, tls, expect_gateway=system.key.startswith("gateway"))
    say("bench: warming up")
    for system in systems:
        run_wrk(system, 50, args.warmup, processes)
        system.refresh_pids()

    runs: dict[str, dict[int, list[dict[str, Any]]]] = {s.key: {1: [], 50: []} for s in systems}
    if redis:
        redis_calls_before = redis_script_calls(redis_path)
    for round_number in range(args.rounds):
        order = systems[round_number % len(systems) :] + systems[: round_number % len(systems)]
        for system in order:
            for conns in (1, 50):
                seconds = args.seconds_1 if conns == 1 else args.seconds_50
                result = run_wrk(system, conns, seconds, processes)
                runs[system.key][conns].append(result)
                say(
                    f"bench: round {round_number + 1} {system.label:<36} c={conns:<3}"
                    f" {result['rps']:>9,.0f} req/s  p50 {result['p50_us'] / 1000:.3f} ms"
                    f"  p99 {result['p99_us'] / 1000:.3f} ms  errors {result['errors']}"
                    f"  busiest worker {result['busiest_worker_share'] or 0:.0%}"
                    f"  (others on the machine: {result['foreign_cores']:.2f} cores)"
                )
    results["http"] = {
        "labels": {s.key: s.label for s in systems},
        "runs": runs,
    }
    results["gateway_after_rss_kb"] = [rss_kb(pid) for pid in gateway_workers(gateway)]
    time.sleep(1.5)  # workers send their counts and access lines at least once a second
    bind, access_log = flag_value(gateway, "--metrics-bind"), flag_value(gateway, "--access-log")
    if bind is not None and access_log is not None:
        with open(access_log, "rb") as lines:
            results["observability"] = {
                "requests_counted": requests_counted(scrape_metrics(bind)),
                "access_log_lines": sum(1 for _ in lines),
                "access_log_bytes": os.path.getsize(access_log),
            }
    if redis:
        measured = sum(r["requests"] for conns in (1, 50) for r in runs["gateway-redis"][conns])
        log = Path(redis[0].process.args[redis[0].process.args.index("--logfile") + 1])
        results["redis"] = {
            "script_calls": redis_script_calls(redis_path) - redis_calls_before,
            "requests": measured,
            "fell_back": "cannot be reached" in log.read_text(errors="replace"),
        }
    for system in (
        *compared,
        floor_system,
        *replicas,
        *redis,
        *observability_off,
        nolimit,
        gateway,
    ):
        processes.stop(system.process)
    for server in (*replica_servers, *([redis_server] if redis_server else []), nginx):
        processes.stop(server)


def start_pump(
    processes: Processes, args: argparse.Namespace, workdir: Path, name: str, upstream: int
) -> System:
    """The stream floor, two workers, in front of the source on 127.0.0.1."""
    port = free_port()
    argv = [
        args.gateway_python,
        str(args.pump),
        str(port),
        "127.0.0.1",
        str(upstream),
        str(workdir / "tls" / "ca.pem"),
        "2",
    ]
    process = processes.start(name, argv)
    wait_for_port(port, process, processes)
    wait_for_floor_workers(process, processes)
    return System(
        name, "pump (pump.py)", f"http://127.0.0.1:{port}/v1/chat/completions", process, False
    )


def relay_port(system: System) -> int:
    """The port a relay (pump or gateway) listens on, from its URL."""
    return int(system.url.rsplit(":", 1)[1].split("/", 1)[0])


def measure_direct(
    sse: str, source_port: int, source_pids: list[int], shape: dict[str, Any], processes: Processes
) -> dict[str, Any]:
    """One stream test straight to the source: it shows the source and the client stay clean."""
    source_cpu = cpu_seconds(source_pids)
    with ForeignLoad(processes) as foreign:
        direct = run_streams(sse, source_port, tls=True, **shape)
    direct["foreign_cores"] = foreign.cores
    direct["source_cpu_us_per_event"] = (
        (cpu_seconds(source_pids) - source_cpu) / max(direct["events"], 1) * 1e6
    )
    return direct


def measure_relay(
    system: System, sse: str, shape: dict[str, Any], processes: Processes, idle_kb: int
) -> dict[str, Any]:
    """One stream test through a relay (pump or gateway), with its CPU and memory."""
    cpu_before = exact_cpu_seconds(system.pids), cpu_seconds(system.pids)
    parent_before = exact_cpu_seconds([system.process.pid])
    with RssSampler(system.pids) as sampler, ForeignLoad(processes) as foreign:
        via = run_streams(sse, relay_port(system), tls=False, **shape)
    via["foreign_cores"] = foreign.cores
    cpu = exact_or_ticks(
        exact_cpu_seconds(system.pids) - cpu_before[0],
        cpu_seconds(system.pids) - cpu_before[1],
        len(system.pids),
    )
    via["cpu_s"] = cpu
    via["cpu_us_per_event"] = cpu / max(via["events"], 1) * 1e6
    via["cpu_us_per_stream"] = cpu / max(via["streams_ok"], 1) * 1e6
    via["parent_cpu_us_per_event"] = (
        (exact_cpu_seconds([system.process.pid]) - parent_before) / max(via["events"], 1) * 1e6
    )
    via["cpu_cores"] = cpu / via["wall"]
    via["idle_rss_kb"] = idle_kb
    via["peak_rss_kb"] = sampler.peak
    via["peak_rss_each_kb"] = sampler.peak_each
    via["rss_per_stream_kb"] = (sampler.peak - idle_kb) / max(via["peak_open"], 1)
    return via


def streams_section(
    processes: Processes, args: argparse.Namespace, workdir: Path, results: dict[str, Any]
) -> None:
    sse = build_sse(workdir)
    tls = workdir / "tls"
    source_port = free_port()
    source = processes.start(
        "sse-source",
        [
            sse,
            "serve",
            str(source_port),
            str(tls / "server.pem"),
            str(tls / "server.key"),
            "64",
            "20",
        ],
    )
    wait_for_port(source_port, source, processes)
    source_pids = [source.pid]
    out: dict[str, Any] = {}
    tests = [
        (
            "i",
            dict(
                conns=args.rate_streams,
                streams=args.rate_rounds,
                chunks=64,
                interval_ms=20.0,
                ramp=1.0,
            ),
        ),
        (
            "ii",
            dict(
                conns=args.open_streams,
                streams=1,
                chunks=args.open_chunks,
                interval_ms=1000.0,
                ramp=args.open_ramp,
            ),
        ),
    ]
    for name, shape in tests:
        if name not in args.stream_tests.split(","):
            continue
        # Both relays start fresh and idle while direct runs; idle RSS is read then.
        gateway = start_gateway(
            processes,
            args,
            workdir,
            f"gateway-sse-{name}",
            "gateway",
            source_port,
            100_000_000,
            extra=observability(
                args.gateway_python, args.gateway_path, workdir, f"gateway-sse-{name}"
            ),
        )
        pump = start_pump(processes, args, workdir, f"pump-sse-{name}", source_port)
        time.sleep(0.5)
        idle: dict[str, int] = {}
        for relay in (gateway, pump):
            relay.refresh_pids()
            idle[relay.key] = sum(rss_kb(pid) for pid in relay.pids)
        idle_each = [rss_kb(pid) for pid in gateway.pids]
        say(f"bench: streams ({name}) direct: {shape}")
        direct = measure_direct(sse, source_port, source_pids, shape, processes)
        say(f"bench: streams ({name}) direct: {summary_line(direct)}")
        say(f"bench: streams ({name}) through the pump")
        via_pump = measure_relay(pump, sse, shape, processes, idle[pump.key])
        say(f"bench: streams ({name}) pump: {summary_line(via_pump)}")
        processes.stop(pump.process)
        say(f"bench: streams ({name}) through the gateway")
        via = measure_relay(gateway, sse, shape, processes, idle[gateway.key])
        via["idle_rss_each_kb"] = idle_each
        say(f"bench: streams ({name}) gateway: {summary_line(via)}")
        out[name] = {"shape": shape, "direct": direct, "pump": via_pump, "gateway": via}
        processes.stop(gateway.process)
    if "iii" in args.stream_tests.split(","):
        out["iii"] = split_test(processes, args, workdir, sse, source_port, source_pids)
    processes.stop(source)
    results["streams"] = out


def split_stream_cpu(
    cpu_short_s: float, cpu_long_s: float, streams: int, short_chunks: int, long_chunks: int
) -> tuple[float, float]:
    """
    A relay's CPU per relayed chunk and per stream opened, in µs, from two
    runs of the same C{streams} that differ only in chunks per stream.

    The longer run costs the shorter one's CPU plus the extra chunks, so the
    difference is per chunk alone; what the shorter run spent beyond its
    chunks is the cost of opening (and closing) its streams.
    """
    per_chunk = (cpu_long_s - cpu_short_s) / (streams * (long_chunks - short_chunks))
    per_stream = cpu_short_s / streams - short_chunks * per_chunk
    return per_chunk * 1e6, per_stream * 1e6


def split_ramp(streams: int) -> float:
    """Seconds over which (iii) opens C{streams}, at L{SPLIT_OPENINGS_PER_S}."""
    return streams / SPLIT_OPENINGS_PER_S


def split_test(
    processes: Processes,
    args: argparse.Namespace,
    workdir: Path,
    sse: str,
    source_port: int,
    source_pids: list[int],
) -> dict[str, Any]:
    """
    (iii): CPU per relayed chunk and per stream opened, told apart (issue 13).

    The same streams, one per connection, run at L{SPLIT_CHUNKS} chunks each
    through the pump and the gateway, each started fresh for this test and
    warmed up with a few streams (so that first-use costs do not land on the
    short run's streams); the runs of each length go direct, pump, gateway
    in turn, so that drift between the short and the long runs hits both
    relays alike.
    """
    short, long = SPLIT_CHUNKS
    streams, interval = args.split_streams, args.split_interval_ms
    gateway = start_gateway(
        processes,
        args,
        workdir,
        "gateway-sse-iii",
        "gateway",
        source_port,
        100_000_000,
        extra=observability(args.gateway_python, args.gateway_path, workdir, "gateway-sse-iii"),
    )
    pump = start_pump(processes, args, workdir, "pump-sse-iii", source_port)
    time.sleep(0.5)
    idle: dict[str, int] = {}
    for relay in (gateway, pump):
        relay.refresh_pids()
        idle[relay.key] = sum(rss_kb(pid) for pid in relay.pids)
    for relay in (pump, gateway):
        run_streams(
            sse,
            relay_port(relay),
            tls=False,
            conns=20,
            streams=1,
            chunks=4,
            interval_ms=20.0,
            ramp=0.2,
        )
    runs = []
    for chunks in SPLIT_CHUNKS:
        shape: dict[str, Any] = dict(
            conns=streams, streams=1, chunks=chunks, interval_ms=interval, ramp=split_ramp(streams)
        )
        run: dict[str, Any] = {"chunks": chunks, "shape": shape}
        say(f"bench: streams (iii) {chunks} chunks: direct, pump, gateway: {shape}")
        run["direct"] = measure_direct(sse, source_port, source_pids, shape, processes)
        run["pump"] = measure_relay(pump, sse, shape, processes, idle[pump.key])
        run["gateway"] = measure_relay(gateway, sse, shape, processes, idle[gateway.key])
        for path in ("direct", "pump", "gateway"):
            say(f"bench: streams (iii) {chunks} chunks {path}: {summary_line(run[path])}")
        runs.append(run)
    processes.stop(pump.process)
    processes.stop(gateway.process)
    split = {}
    for path in ("pump", "gateway"):
        per_chunk, per_stream = split_stream_cpu(
            runs[0][path]["cpu_s"], runs[1][path]["cpu_s"], streams, short, long
        )
        split[path] = {"cpu_us_per_chunk": per_chunk, "cpu_us_per_stream": per_stream}
        say(f"bench: streams (iii) {path}: {per_chunk:.1f} µs/chunk, {per_stream:,.0f} µs/stream")
    return {
        "shape": {"conns": streams, "chunks": list(SPLIT_CHUNKS), "interval_ms": interval},
        "runs": runs,
        "split": split,
    }


def summary_line(r: dict[str, Any]) -> str:
    return (
        f"{r['streams_ok']}/{r['streams_expected']} ok, lost {r['lost']}, stalls {r['stalls']},"
        f" latency p50 {r['lat_p50_ms']:.2f} p99 {r['lat_p99_ms']:.2f} max {r['lat_max_ms']:.1f} ms"
    )


# --------------------------------------------------------------------------- report


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{digits}f}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


Target = tuple[str, str, str, bool | None]
PerRound = Callable[[str, str, int, Callable[[dict[str, Any], dict[str, Any]], float]], float]


def observability_report(
    results: dict[str, Any],
    med: dict[tuple[str, int], dict[str, Any]],
    per_round: PerRound,
    add: Callable[[str], None],
) -> Target:
    """Issue 11: the gateway with metrics and the access log on ÷ the same with them off."""
    name = "throughput at 50 connections, metrics + access log on ÷ off"
    goal = f"≥ {TARGET_OBSERVABILITY_RATIO:.2f}×"
    if ("gateway-observability-off", 50) not in med:
        add(f"- Metrics and access log: not measured: {results.get('observability_skipped')}")
        return (name, "not run", goal, None)
    on, off = med[("gateway", 50)], med[("gateway-observability-off", 50)]
    ratio = per_round("gateway", "gateway-observability-off", 50, lambda a, b: a["rps"] / b["rps"])
    each = [a["rps"] / b["rps"] for a, b in zip(on["runs"], off["runs"], strict=True)]
    added50 = per_round(
        "gateway", "gateway-observability-off", 1, lambda a, b: (a["p50_us"] - b["p50_us"]) / 1000
    )
    added99 = per_round(
        "gateway", "gateway-observability-off", 1, lambda a, b: (a["p99_us"] - b["p99_us"]) / 1000
    )
    seen = results.get("observability")
    written = (
        f"; in all, the gateway's /metrics counted {seen['requests_counted']:,} requests and its "
        f"access log has {seen['access_log_lines']:,} lines ({seen['access_log_bytes'] / 2**20:.1f} MB)"
        if seen
        else ""
    )
    add(
        f"- Metrics + access log on ÷ off at c=50: **{ratio:.2f}×** throughput (median of the per-round "
        f"ratios, {min(each):.2f}–{max(each):.2f}; medians {fmt(on['rps'], 0)} vs {fmt(off['rps'], 0)} req/s; "
        f"CPU {fmt(on['cpu'], 0)} vs {fmt(off['cpu'], 0)} µs/req, parent {fmt(on['parent'], 0)} vs "
        f"{fmt(off['parent'], 0)}); at c=1 they add {added50:+.3f} / {added99:+.3f} ms to p50 / p99{written}"
    )
    results.setdefault("derived", {}).update(
        observability_ratio=ratio,
        observability_added_p50_ms=added50,
        observability_added_p99_ms=added99,
    )
    return (name, f"{ratio:.2f}×", goal, ratio >= TARGET_OBSERVABILITY_RATIO)


def redis_report(
    results: dict[str, Any],
    med: dict[tuple[str, int], dict[str, Any]],
    per_round: PerRound,
    add: Callable[[str], None],
) -> Target:
    """Issue 12: the Redis limiter next to the embedded one, in the same rounds."""
    name = "Redis limiter ÷ embedded, throughput at 50 connections"
    goal = "reported, every decision in Redis"
    if ("gateway-redis", 50) not in med:
        add(f"- Redis limiter: not measured: {results.get('redis_skipped')}")
        return (name, "not run", goal, None)
    red, emb = med[("gateway-redis", 50)], med[("gateway", 50)]
    ratio = per_round("gateway-redis", "gateway", 50, lambda r, g: r["rps"] / g["rps"])
    each = [r["rps"] / g["rps"] for r, g in zip(red["runs"], emb["runs"], strict=True)]

    def added(key: str, field: str) -> float:
        return per_round(key, "direct", 1, lambda a, d: (a[field] - d[field]) / 1000)

    red50, red99 = added("gateway-redis", "p50_us"), added("gateway-redis", "p99_us")
    emb50, emb99 = added("gateway", "p50_us"), added("gateway", "p99_us")
    calls = results.get("redis", {})
    in_redis = (
        calls.get("script_calls", 0) >= calls.get("requests", 1)
        and not calls.get("fell_back")
        and red["errors"] == 0
    )
    add(
        f"- Redis limiter (`--rate-store unix://…/redis.sock`, a private redis-server) next to the embedded "
        f"one: c=1 added latency over direct p50 **{red50:+.3f} ms** vs {emb50:+.3f}, p99 **{red99:+.3f} ms** "
        f"vs {emb99:+.3f}; c=50 **{fmt(red['rps'], 0)}** vs {fmt(emb['rps'], 0)} req/s, "
        f"**{ratio:.2f}×** (median of the per-round ratios, {min(each):.2f}–{max(each):.2f}); CPU "
        f"{fmt(red['cpu'], 0)} vs {fmt(emb['cpu'], 0)} µs/req (gateway processes, not redis-server); "
        f"redis-server ran {calls.get('script_calls', 0):,} scripts for {calls.get('requests', 0):,} "
        f"requests measured{'; the fallback decided for a while (see its log)' if calls.get('fell_back') else ''}"
    )
    results.setdefault("derived", {}).update(
        redis_ratio=ratio,
        redis_added_p50_ms=red50,
        redis_added_p99_ms=red99,
    )
    return (
        name,
        f"{ratio:.2f}× (c=1 added {red50:+.3f} / {red99:+.3f} ms)",
        goal,
        in_redis,
    )


def stream_row(
    title: str, path: str, r: dict[str, Any], d: dict[str, Any], rss_per_stream: bool = True
) -> str:
    """
    One row of the streams table: C{r} through C{path}, C{d} the direct run
    of the same test; without C{rss_per_stream} for (iii), whose relays
    have run other streams since their idle RSS was read.
    """
    relay = path != "direct"
    added = (
        f"{r['lat_p50_ms'] - d['lat_p50_ms']:+.2f} / {r['lat_p99_ms'] - d['lat_p99_ms']:+.2f}"
        if relay
        else ""
    )
    cpu = fmt(r.get("cpu_us_per_event"), 1) if relay else ""
    per_stream = fmt(r.get("cpu_us_per_stream"), 0) if relay else ""
    rss = fmt(r.get("rss_per_stream_kb"), 1) if relay and rss_per_stream else ""
    return (
        f"| {title} | {path} | {r['streams_ok']:,} / {r['streams_expected']:,} | "
        f"{r['events']:,} / {r['events_expected']:,} | {r['lost']} | {r['stalls']} | "
        f"{r['max_gap_ms']:.1f} | {r['lat_p50_ms']:.2f} / {r['lat_p90_ms']:.2f} / "
        f"{r['lat_p99_ms']:.2f} / {r['lat_max_ms']:.1f} | {added} | {cpu} | {per_stream} | {rss} |"
    )


def split_line(test: dict[str, Any]) -> str:
    """What (iii) found: each relay's CPU per chunk and per stream opened, and the ratios."""
    shape, split = test["shape"], test["split"]
    short, long = shape["chunks"]
    streams = shape["conns"]
    g, p = split["gateway"], split["pump"]

    def times(what: str) -> str:
        return f"{g[what] / p[what]:.2f}×" if p[what] > 0 else "n/a"

    busy = ", ".join(
        f"{run['chunks']} chunks: pump {run['pump']['cpu_cores']:.2f}, gateway "
        f"{run['gateway']['cpu_cores']:.2f}"
        for run in test["runs"]
    )
    foreign = max(
        run[path]["foreign_cores"] for run in test["runs"] for path in ("pump", "gateway")
    )
    return (
        f"- (iii) CPU per relayed chunk = (CPU at {long} chunks − CPU at {short}) / ({streams:,} × "
        f"{long - short}), CPU per stream opened = CPU at {short} / {streams:,} − {short} × per chunk: "
        f"pump {p['cpu_us_per_chunk']:,.1f} µs per chunk, {p['cpu_us_per_stream']:,.0f} µs per stream; "
        f"gateway {g['cpu_us_per_chunk']:,.1f} and {g['cpu_us_per_stream']:,.0f} µs: "
        f"**{times('cpu_us_per_chunk')}** and **{times('cpu_us_per_stream')}** the pump's; "
        f"cores busy ({busy}); other processes at most {foreign:.2f} cores"
    )


def relay_cpu_ratio(
    name: str, what: str, gateway_us: float | None, pump_us: float | None, goal: float
) -> Target:
    """A row comparing the gateway's CPU for C{what} with the pump's, by ratio."""
    goal_text = f"≤ {goal:.2f}× the pump's"
    if gateway_us is None or pump_us is None:
        return (name, "not run", goal_text, None)
    if pump_us <= 0:
        # A difference of two runs that drift can come out at or below zero.
        return (
            name,
            f"n/a (pump {pump_us:,.1f} µs {what}: the runs drifted)",
            goal_text,
            None,
        )
    ratio = gateway_us / pump_us
    return (
        name,
        f"{ratio:.2f}× ({gateway_us:,.1f} vs {pump_us:,.1f} µs {what})",
        goal_text,
        ratio <= goal,
    )


def issue13_targets(derived: dict[str, Any], streams: dict[str, Any]) -> list[Target]:
    """
    Issue 13's targets, in its order, from the figures of one run: the
    request rounds' medians (C{derived}) and the stream tests (C{streams});
    a target whose part of the bench did not run says so, with no verdict.
    """
    rows: list[Target] = []
    name = "throughput at 50 connections, gateway (limiter on) ÷ floor"
    goal = f"≥ {TARGET_FLOOR_RATIO:.2f}×"
    ratio = derived.get("ratio")
    if ratio is None:
        rows.append((name, "not run", goal, None))
    else:
        rows.append(
            (
                name,
                f"{ratio:.2f}× (rounds {derived['ratio_low']:.2f}–{derived['ratio_high']:.2f})",
                goal,
                ratio >= TARGET_FLOOR_RATIO,
            )
        )
    name = "added p50 at 1 connection, over direct"
    goal = "≤ the floor's"
    added, floor_added = derived.get("added_p50_ms"), derived.get("floor_added_p50_ms")
    if added is None or floor_added is None:
        rows.append((name, "not run", goal, None))
    else:
        rows.append(
            (name, f"{added:+.3f} ms (floor {floor_added:+.3f} ms)", goal, added <= floor_added)
        )

    split = streams.get("iii", {}).get("split", {})
    gateway, pump = split.get("gateway", {}), split.get("pump", {})
    rows.append(
        relay_cpu_ratio(
            "(iii) CPU per relayed chunk, gateway ÷ pump",
            "per chunk",
            gateway.get("cpu_us_per_chunk"),
            pump.get("cpu_us_per_chunk"),
            TARGET_CHUNK_CPU_RATIO,
        )
    )
    rows.append(
        relay_cpu_ratio(
            "(iii) CPU per stream opened, gateway ÷ pump",
            "per stream",
            gateway.get("cpu_us_per_stream"),
            pump.get("cpu_us_per_stream"),
            TARGET_STREAM_CPU_RATIO,
        )
    )

    rate = streams.get("i")
    goal = "0 stalls, 0 lost"
    if rate is None:
        rows.append(("(i) 500 × 64 events @ 20 ms: stalls and lost events", "not run", goal, None))
    else:
        shape, g, p = rate["shape"], rate["gateway"], rate["pump"]

        def fared(r: dict[str, Any]) -> str:
            failed = f", {r['streams_failed']:,} streams failed" if r["streams_failed"] else ""
            return f"{r['stalls']:,} stalls, {r['lost']:,} lost{failed}"

        rows.append(
            (
                f"(i) {shape['conns']:,} × {shape['chunks']} events @ {shape['interval_ms']:g} ms: "
                "stalls and lost events",
                f"gateway {fared(g)} (the pump in the same run: {fared(p)})",
                goal,
                g["stalls"] == 0 and g["lost"] == 0 and g["streams_failed"] == 0,
            )
        )

    opened = streams.get("ii")
    name = "(ii) RSS per open stream"
    goal = f"≤ {TARGET_RSS_PER_STREAM_KB:g} KB"
    if opened is None:
        rows.append((name, "not run", goal, None))
    else:
        g, p = opened["gateway"], opened["pump"]
        rows.append(
            (
                f"(ii) {g['peak_open']:,} open streams: RSS per open stream",
                f"{g['rss_per_stream_kb']:.1f} KB (pump {p['rss_per_stream_kb']:.1f} KB)",
                goal,
                g["rss_per_stream_kb"] <= TARGET_RSS_PER_STREAM_KB,
            )
        )
    return rows


def targets_table(rows: list[tuple[str, Target]]) -> list[str]:
    """The Targets table: each row with the issue that set it."""
    lines = ["| issue | target | measured | goal | |", "|---|---|---:|---:|---|"]
    for issue, (name, measured, goal, ok) in rows:
        lines.append(f"| {issue} | {name} | {measured} | {goal} | {verdict(ok)} |")
    return lines


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines: list[str] = []
    add = lines.append
    v = results["versions"]
    add(f"Measured {results['date']} with `{results['command']}` ({results['seconds']:.0f} s).")
    add("")
    add(f"- Machine: {v['machine']}; {v['os']}; file limit {results['file_limit']}")
    add(f"- Gateway: {v['gateway']}")
    add(f"- Stand-ins: {v['tools']}; bench/sse.c for streams")
    add("")
    # Earlier issues' targets that still apply, after issue 13's (see the end).
    earlier: list[tuple[str, Target]] = []

    http = results.get("http")
    if http:
        runs, labels = http["runs"], http["labels"]
        add(
            f"### Requests (wrk, one thread, POST /v1/chat/completions; median of {args.rounds} interleaved rounds of "
            f"{args.seconds_1:g} s at 1 connection and {args.seconds_50:g} s at 50)"
        )
        add("")
        add(
            "| system | conns | req/s (median) | req/s (range) | p50 ms | p99 ms | CPU µs/req (all its processes) | of which parent | busiest worker | errors |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        med: dict[tuple[str, int], dict[str, Any]] = {}
        for conns in (1, 50):
            for key in runs:
                rs = runs[key][str(conns)] if str(conns) in runs[key] else runs[key][conns]
                shares = [r["busiest_worker_share"] for r in rs if r.get("busiest_worker_share")]
                m = {
                    "rps": median([r["rps"] for r in rs]),
                    "low": min(r["rps"] for r in rs),
                    "high": max(r["rps"] for r in rs),
                    "p50": median([r["p50_us"] / 1000 for r in rs]),
                    "p99": median([r["p99_us"] / 1000 for r in rs]),
                    "cpu": median([r["cpu_us_per_request"] for r in rs]),
                    "parent": median([r["parent_cpu_us_per_request"] for r in rs])
                    if rs[0]["parent_cpu_us_per_request"] is not None
                    else None,
                    "busiest": median(shares) if shares and conns > 1 else None,
                    "errors": sum(r["errors"] for r in rs),
                    "runs": rs,
                }
                med[(key, conns)] = m
                busiest = f"{m['busiest']:.0%}" if m["busiest"] else ""
                add(
                    f"| {labels[key]} | {conns} | {fmt(m['rps'], 0)} | {fmt(m['low'], 0)}–{fmt(m['high'], 0)} | "
                    f"{fmt(m['p50'], 3)} | {fmt(m['p99'], 3)} | {fmt(m['cpu'], 0)} | {fmt(m['parent'], 0)} | "
                    f"{busiest} | {m['errors']} |"
                )
        add("")

        def per_round(
            a: str, b: str, conns: int, f: Callable[[dict[str, Any], dict[str, Any]], float]
        ) -> float:
            """The median over rounds of f(a's run, b's run): each pair ran minutes apart at most."""
            return median(
                [
                    f(x, y)
                    for x, y in zip(med[(a, conns)]["runs"], med[(b, conns)]["runs"], strict=True)
                ]
            )

        ratio = per_round("gateway", "floor", 50, lambda g, f: g["rps"] / f["rps"])
        each_ratio = [
            g["rps"] / f["rps"]
            for g, f in zip(med[("gateway", 50)]["runs"], med[("floor", 50)]["runs"], strict=True)
        ]
        added50 = per_round("gateway", "direct", 1, lambda g, d: (g["p50_us"] - d["p50_us"]) / 1000)
        added99 = per_round("gateway", "direct", 1, lambda g, d: (g["p99_us"] - d["p99_us"]) / 1000)
        floor_added50 = per_round(
            "floor", "direct", 1, lambda g, d: (g["p50_us"] - d["p50_us"]) / 1000
        )
        floor_added99 = per_round(
            "floor", "direct", 1, lambda g, d: (g["p99_us"] - d["p99_us"]) / 1000
        )
        on, off = med[("gateway", 50)], med[("gateway-nolimit", 50)]
        share_cpu = per_round(
            "gateway",
            "gateway-nolimit",
            50,
            lambda a, b: 1 - b["cpu_us_per_request"] / a["cpu_us_per_request"],
        )
        share_rps = per_round(
            "gateway", "gateway-nolimit", 50, lambda a, b: 1 - a["rps"] / b["rps"]
        )
        limiter_added50 = per_round(
            "gateway", "gateway-nolimit", 1, lambda a, b: (a["p50_us"] - b["p50_us"]) / 1000
        )
        add(
            f"- Gateway ÷ floor at 50 connections: **{ratio:.2f}×** (median of the per-round ratios, "
            f"{min(each_ratio):.2f}–{max(each_ratio):.2f}; medians {fmt(on['rps'], 0)} vs "
            f"{fmt(med[('floor', 50)]['rps'], 0)} req/s)"
        )
        add(
            f"- Added latency over direct at 1 connection: p50 **{added50:+.3f} ms**, p99 **{added99:+.3f} ms** "
            f"(the floor adds {floor_added50:+.3f} / {floor_added99:+.3f} ms)"
        )
        add(
            f"- The cross-worker limiter's share of request cost at 50 connections: {share_cpu:.0%} of the "
            f"gateway's CPU per request ({fmt(on['cpu'], 0)} vs {fmt(off['cpu'], 0)} µs with `--rate-limit 0`), "
            f"{share_rps:.0%} of its throughput; at 1 connection it adds {limiter_added50:+.3f} ms to p50"
        )
        results["derived"] = {
            "ratio": ratio,
            "ratio_low": min(each_ratio),
            "ratio_high": max(each_ratio),
            "added_p50_ms": added50,
            "added_p99_ms": added99,
            "floor_added_p50_ms": floor_added50,
            "floor_added_p99_ms": floor_added99,
            "limiter_share_cpu": share_cpu,
            "limiter_share_rps": share_rps,
            "limiter_added_p50_ms": limiter_added50,
        }
        if ("gateway-replicas", 50) in med:
            replicas_ratio = per_round(
                "gateway-replicas", "gateway", 50, lambda r, g: r["rps"] / g["rps"]
            )
            each_round = [
                r["rps"] / g["rps"]
                for r, g in zip(
                    med[("gateway-replicas", 50)]["runs"], med[("gateway", 50)]["runs"], strict=True
                )
            ]
            replicas_added50 = per_round(
                "gateway-replicas", "gateway", 1, lambda r, g: (r["p50_us"] - g["p50_us"]) / 1000
            )
            replicas_added99 = per_round(
                "gateway-replicas", "gateway", 1, lambda r, g: (r["p99_us"] - g["p99_us"]) / 1000
            )
            add(
                f"- Two replicas ÷ one upstream at 50 connections: **{replicas_ratio:.2f}×** throughput "
                f"(median of the per-round ratios, {min(each_round):.2f}–{max(each_round):.2f}; medians "
                f"{fmt(med[('gateway-replicas', 50)]['rps'], 0)} vs {fmt(on['rps'], 0)} req/s); at 1 connection "
                f"two replicas add {replicas_added50:+.3f} / {replicas_added99:+.3f} ms to p50 / p99"
            )
            results["derived"]["replicas_ratio"] = replicas_ratio
            results["derived"]["replicas_added_p50_ms"] = replicas_added50
            results["derived"]["replicas_added_p99_ms"] = replicas_added99
            replicas_target: Target = (
                "throughput at 50 connections, two replicas ÷ one upstream",
                f"{replicas_ratio:.2f}×",
                f"≥ {TARGET_REPLICAS_RATIO:.2f}×",
                replicas_ratio >= TARGET_REPLICAS_RATIO,
            )
        else:
            add(f"- Two replicas: not measured: {results.get('replicas_skipped', 'not run')}")
            replicas_target = (
                "throughput at 50 connections, two replicas ÷ one upstream",
                "not run",
                f"≥ {TARGET_REPLICAS_RATIO:.2f}×",
                None,
            )
        observability_target = observability_report(results, med, per_round, add)
        redis_target = redis_report(results, med, per_round, add)
        add("")
        earlier += [
            (
                "7",
                (
                    "added latency at 1 connection, p99",
                    f"{added99:.3f} ms",
                    f"≤ {TARGET_ADDED_P99_MS} ms",
                    added99 <= TARGET_ADDED_P99_MS,
                ),
            ),
            ("10", replicas_target),
            ("11", observability_target),
            ("12", redis_target),
        ]

    streams = results.get("streams")
    if streams:
        add(
            "### Streams (paced SSE source over HTTPS; each test, and each length of (iii), direct first, then the pump, then the gateway)"
        )
        add("")
        add(
            "| test | path | streams ok / run | events | lost | stalls | max gap ms | latency p50 / p90 / p99 / max ms | added p50 / p99 ms | CPU µs/event | CPU µs/stream | RSS KB/open stream |"
        )
        add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        names = {
            "i": "(i) {conns} × {chunks} events, {interval_ms:g} ms apart",
            "ii": "(ii) {conns} open × {chunks} events, {interval_ms:g} ms apart",
            "iii": "(iii) {conns} × {chunks} events, {interval_ms:g} ms apart",
        }
        for name, test in streams.items():
            # (iii) is two runs, one per length; (i) and (ii) are one each.
            for run in test["runs"] if name == "iii" else [test]:
                title = names[name].format(**run["shape"])
                d = run["direct"]
                for path in ("direct", "pump", "gateway"):
                    if run.get(path) is not None:
                        add(stream_row(title, path, run[path], d, name != "iii"))
            if name == "iii":
                continue
            d, g = test["direct"], test["gateway"]
            add99 = g["lat_p99_ms"] - d["lat_p99_ms"]
            failed = g["streams_failed"]
            if name == "i":
                earlier += [
                    (
                        "7",
                        (
                            "(i) added per-event latency, p99",
                            f"{add99:.2f} ms",
                            f"≤ {TARGET_STREAM_P99_MS:g} ms",
                            add99 <= TARGET_STREAM_P99_MS,
                        ),
                    ),
                    (
                        "7",
                        (
                            "(i) gateway CPU per event",
                            f"{g['cpu_us_per_event']:.1f} µs",
                            f"≤ {TARGET_CPU_PER_CHUNK_US:g} µs",
                            g["cpu_us_per_event"] <= TARGET_CPU_PER_CHUNK_US,
                        ),
                    ),
                ]
            else:
                earlier += [
                    (
                        "7",
                        (
                            "(ii) failed streams / lost events",
                            f"{failed} / {g['lost']}",
                            "0 / 0",
                            failed == 0 and g["lost"] == 0,
                        ),
                    ),
                    ("7", ("(ii) stalls", str(g["stalls"]), "0", g["stalls"] == 0)),
                ]
        add("")
        for name, test in streams.items():
            if name == "iii":
                add(split_line(test))
                continue
            d, g = test["direct"], test["gateway"]
            add(
                f"- ({name}) gateway: {g['cpu_cores']:.2f} cores busy "
                f"(parent {g['parent_cpu_us_per_event']:.1f} µs/event), peak {g['peak_open']:,} open streams, "
                f"RSS {g['idle_rss_kb'] / 1024:.1f} → {g['peak_rss_kb'] / 1024:.1f} MB "
                f"(per process {', '.join(f'{k / 1024:.1f}' for k in g['peak_rss_each_kb'])} MB); "
                f"load generator {d['client_cpu_us_per_event']:.1f} / {g['client_cpu_us_per_event']:.1f} µs/event "
                f"(direct / gateway), source {d['source_cpu_us_per_event']:.1f} µs/event; other processes "
                f"{d['foreign_cores']:.2f} / {g['foreign_cores']:.2f} cores"
            )
            p = test.get("pump")
            if p:
                add(
                    f"- ({name}) pump: {p['cpu_cores']:.2f} cores busy, RSS {p['idle_rss_kb'] / 1024:.1f} → "
                    f"{p['peak_rss_kb'] / 1024:.1f} MB; the gateway costs "
                    f"**{g['cpu_us_per_event'] / p['cpu_us_per_event']:.1f}×** the pump's CPU per event "
                    f"({g['cpu_us_per_event']:.1f} vs {p['cpu_us_per_event']:.1f} µs) and "
                    f"{g['cpu_us_per_stream'] / p['cpu_us_per_stream']:.1f}× its CPU per stream "
                    f"({fmt(g['cpu_us_per_stream'], 0)} vs {fmt(p['cpu_us_per_stream'], 0)} µs); "
                    f"other processes {p['foreign_cores']:.2f} cores"
                )
        add("")

    idle = results.get("idle_rss")
    limiter = results.get("limiter")
    add("### Memory and the limiter")
    add("")
    if idle:
        workers = idle["gateway_workers_kb"]
        add(
            f"- Idle RSS per gateway worker: {', '.join(f'{k / 1024:.1f}' for k in workers)} MB "
            f"(parent {idle['gateway_parent_kb'] / 1024:.1f} MB; floor workers "
            f"{', '.join(f'{k / 1024:.1f}' for k in idle['floor_workers_kb'])} MB); after the request runs "
            f"{', '.join(f'{k / 1024:.1f}' for k in results.get('gateway_after_rss_kb', []))} MB"
        )
        worst = max(workers) / 1024
        earlier.append(
            (
                "7",
                (
                    "idle RSS per worker",
                    f"{worst:.1f} MB",
                    f"≤ {TARGET_IDLE_RSS_MB:g} MB",
                    worst <= TARGET_IDLE_RSS_MB,
                ),
            )
        )
    if limiter:
        add(
            f"- Limiter (bench/limiter.py, in-process `decide`): {fmt(limiter['decisions_per_s'], 0)} decisions/s "
            f"over 1,000,000 distinct clients, {fmt(limiter['decisions_per_s_busy'], 0)}/s for one client with "
            f"1,000 counted; {fmt(limiter['bytes_per_client'], 1)} bytes per tracked client after 1,000,000 "
            f"distinct clients (key string included)"
        )
        b = limiter["bytes_per_client"]
        earlier.append(
            (
                "7",
                (
                    "limiter bytes per tracked client",
                    f"{fmt(b, 1)} B",
                    f"≤ {TARGET_LIMITER_BYTES:g} B",
                    None if b is None else b <= TARGET_LIMITER_BYTES,
                ),
            )
        )
    add("")
    add("### Targets")
    add("")
    add(
        "Issue 13's first, each from this run; then the targets of earlier issues that "
        "issue 13 did not replace."
    )
    add("")
    issue13 = issue13_targets(results.get("derived", {}), streams or {})
    lines += targets_table([("13", row) for row in issue13] + earlier)
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def update_file(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--floor", type=Path, default=FLOOR_PY, help="the request floor to run")
    p.add_argument("--pump", type=Path, default=PUMP_PY, help="the stream floor to run")
    p.add_argument(
        "--replicas",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the gateway in front of two nginx replicas too (needs --upstream, issue 10)",
    )
    p.add_argument(
        "--redis",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the gateway with --rate-store on a private redis-server too (issue 12; "
        "skipped, with a message, without redis-server or txredisapi)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: one short round, small stream tests, no limiter bench; "
        "its figures are not for BENCHMARKS.md",
    )
    p.add_argument(
        "--gateway-python",
        default=sys.executable,
        help="interpreter to run the gateway with (twistd beside it)",
    )
    p.add_argument(
        "--gateway-path", default="", help="PYTHONPATH for the gateway (another copy of llmgw)"
    )
    p.add_argument("--only", default="http,streams,limiter", help="sections to run")
    p.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="also run the gateway from this source tree (a patched copy), interleaved",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds-1", type=float, default=3.0)
    p.add_argument("--seconds-50", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rate-streams", type=int, default=500)
    p.add_argument(
        "--rate-rounds", type=int, default=6, help="streams run back to back per connection in (i)"
    )
    p.add_argument("--open-streams", type=int, default=5000)
    p.add_argument(
        "--open-chunks", type=int, default=20, help="events per stream in (ii), 1 s apart"
    )
    p.add_argument(
        "--open-ramp",
        type=float,
        default=10.0,
        help="seconds over which (ii) opens its streams (500/s: the source and client stay clean)",
    )
    p.add_argument(
        "--split-streams",
        type=int,
        default=500,
        help="streams in (iii), one per connection, run at 16 and at 256 chunks each",
    )
    p.add_argument(
        "--split-interval-ms",
        type=float,
        default=50.0,
        help="ms between the chunks of (iii)'s streams (50: 10,000 chunks/s for 500 streams; "
        "at 20 ms both relays fall behind on two cores, as (i) shows)",
    )
    p.add_argument("--stream-tests", default="i,ii,iii", help="which stream tests to run")
    p.add_argument(
        "--update", type=Path, help="rewrite the table between the bench markers of this file"
    )
    p.add_argument("--json", type=Path, help="write every raw figure here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.seconds_1 = args.seconds_50 = 2.0
        args.warmup = 1.0
        args.rate_streams, args.rate_rounds = 100, 1
        args.open_streams, args.open_chunks, args.open_ramp = 300, 5, 1.0
        args.split_streams, args.split_interval_ms = 100, 10.0
        args.only = ",".join(s for s in args.only.split(",") if s != "limiter")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = set(args.only.split(","))
    if "http" in sections and not args.floor.exists():
        sys.exit(f"bench: the floor is not at {args.floor} (see --floor)")
    if "streams" in sections and not args.pump.exists():
        sys.exit(f"bench: the pump is not at {args.pump} (see --pump)")
    ensure_tools()
    file_limit = raise_file_limit()
    if file_limit < args.open_streams * 2 + 1000:
        say(f"bench: the file limit is {file_limit}; (ii) may fail for want of descriptors")
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(
            ["bench/run.py", *(argv if argv is not None else sys.argv[1:])]
        ).strip(),
        "file_limit": file_limit,
        "versions": versions(args.gateway_python),
    }
    with tempfile.TemporaryDirectory(prefix="llmgw-bench-") as tmp:
        workdir = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "llmgw.devtls", str(workdir / "tls")],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        try:
            with bench_processes(workdir) as processes:
                results["foreign_at_start"] = wait_for_quiet(processes)
                if "http" in sections:
                    http_section(processes, args, workdir, results)
                if "streams" in sections:
                    streams_section(processes, args, workdir, results)
        except Exception:
            for log in sorted(workdir.glob("*.log")):
                if log.stat().st_size and not log.name.endswith("access.log"):
                    say(f"--- {log.name} (last lines)")
                    say("\n".join(log.read_text(errors="replace").splitlines()[-15:]))
            raise
    if "limiter" in sections:
        say("bench: bench/limiter.py (about a minute)")
        results["limiter"] = run_limiter_bench(args.gateway_python, args.gateway_path)
    results["seconds"] = time.monotonic() - started
    table = report(results, args)
    print(table)
    if args.update:
        update_file(args.update, table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
