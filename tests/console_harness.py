"""The console on a real reactor and a real terminal, with stand-in commands.

C{tests/test_console.py} runs this under a pseudo-terminal.  It logs the way
C{twistd -n} does (a text observer on the prompt-safe C{sys.stdout}), logs one
extra line on SIGUSR1 so that the test can interleave a log line with typing,
prints C{SHUTDOWN} when asked to shut down, and, after the reactor has stopped,
whether the terminal's mode and blocking flags are as they were.
"""

from __future__ import annotations

import os
import signal
import sys
import termios
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

from llmgw.console import console_service, prompt_safe_stdout

reactor: Any = _reactor
log = Logger(namespace="harness")

STATS: dict[str, Any] = {
    "workers": [
        {
            "worker": 1,
            "pid": 123,
            "served": 10,
            "in_flight": 0,
            "refused": 2,
            "upstream_errors": 0,
            "uptime": 12.5,
        },
        {
            "worker": 2,
            "pid": 4567,
            "served": 1234,
            "in_flight": 3,
            "refused": 0,
            "upstream_errors": 1,
            "uptime": 3723.9,
        },
    ],
    "tracked_clients": 42,
}


class StandInCommands:
    def stats(self) -> Deferred[dict[str, Any]]:
        return succeed(STATS)

    def set_verbose(self, on: bool) -> Deferred[None]:
        log.info("verbose switched {state}", state="on" if on else "off")
        return succeed(None)

    def shutdown(self) -> None:
        print("SHUTDOWN", flush=True)
        reactor.stop()


def main() -> int:
    stdout = prompt_safe_stdout()
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(stdout, timeFormat=None)], redirectStandardIO=False
    )
    before = termios.tcgetattr(0)
    service = console_service(StandInCommands(), reactor, stdout=stdout)
    signal.signal(
        signal.SIGUSR1,
        lambda signum, frame: reactor.callFromThread(log.info, "a log line from elsewhere"),
    )
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    restored = termios.tcgetattr(0) == before
    print("TERMINAL RESTORED" if restored else "TERMINAL LEFT CHANGED")
    blocking = all(os.get_blocking(fd) for fd in (0, 1, 2))
    print("STDIO BLOCKING" if blocking else "STDIO LEFT NON-BLOCKING", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
