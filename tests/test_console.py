"""Tests for L{llmgw.console}: the line editor, the commands, the log-safe stdout,
attaching to a terminal (and not to anything else), and a real session under a
pseudo-terminal."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import sys
import termios
import typing
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ProcessDone,
    ProcessExitedAlready,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactor
from twisted.logger import textFileLogObserver
from twisted.python.compat import ioType
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

import llmgw
import llmgw.console as console_module
from llmgw.console import (
    Console,
    ConsoleService,
    PromptSafeStream,
    console_service,
    format_stats,
    format_uptime,
    prompt_safe_stdout,
)
from llmgw.mock import Behaviour
from tests.console_harness import STATS
from tests.loopback import Reply, Upstream, chat_body, free_port, inline, request, start_upstream
from tests.test_cluster import alive

reactor: Any = _reactor

HARNESS = Path(__file__).with_name("console_harness.py")

HELP_TEXT = (
    "commands:\n"
    "  clear           clear the screen\n"
    "  exit, quit      shut the gateway down (Ctrl-D too)\n"
    "  help            list the commands\n"
    "  stats           requests per worker and model server, and the clients the limiter tracks\n"
    "  verbose on|off  switch verbose logging in every worker\n"
)

STATS_TABLE = (
    "worker   pid  served  in flight  refused  upstream errors    uptime\n"
    "     1   123      10          0        2                0       12s\n"
    "     2  4567    1234          3        0                1  1h02m03s\n"
    " total          1244          3        2                1\n"
    "tracked clients: 42\n"
)


class RecordingCommands:
    """A L{llmgw.console.ConsoleCommands} that records calls and answers as told."""

    def __init__(self, stats: Deferred[dict[str, Any]] | None = None) -> None:
        self.calls: list[object] = []
        self._stats = stats

    def stats(self) -> Deferred[dict[str, Any]]:
        self.calls.append("stats")
        return succeed(STATS) if self._stats is None else self._stats

    def set_verbose(self, on: bool) -> Deferred[None]:
        self.calls.append(("verbose", on))
        return succeed(None)

    def shutdown(self) -> None:
        self.calls.append("shutdown")


class TerminalOutput(io.StringIO):
    """What the console writes, from a stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def make_console(
    commands: RecordingCommands | None = None, columns: int = 80
) -> tuple[Console, io.StringIO, RecordingCommands, Clock]:
    commands = RecordingCommands() if commands is None else commands
    out = io.StringIO()
    clock = Clock()
    console = Console(commands, out, clock, columns=lambda: columns)
    console.start()
    return console, out, commands, clock


class FormattingTests(SynchronousTestCase):
    def test_uptime(self) -> None:
        cases = {
            0: "0s",
            12.5: "12s",
            59.99: "59s",
            60: "1m00s",
            3599: "59m59s",
            3600: "1h00m00s",
            3723.9: "1h02m03s",
            90000: "25h00m00s",
            -3: "0s",
        }
        self.assertEqual({s: format_uptime(s) for s in cases}, cases)

    def test_stats_table(self) -> None:
        self.assertEqual(format_stats(STATS), STATS_TABLE)

    def test_stats_without_workers_or_limiter(self) -> None:
        self.assertEqual(format_stats({"workers": []}), "no workers\ntracked clients: -\n")

    def test_stats_with_missing_fields(self) -> None:
        table = format_stats({"workers": [{"worker": 1, "served": 3}], "tracked_clients": 0})
        self.assertEqual(
            table,
            "worker  pid  served  in flight  refused  upstream errors  uptime\n"
            "     1    -       3          -        -                -       -\n"
            " total            3          0        0                0\n"
            "tracked clients: 0\n",
        )


class CommandTests(SynchronousTestCase):
    def test_prompt(self) -> None:
        _, out, _, _ = make_console()
        self.assertEqual(out.getvalue(), "llmgw> ")

    def test_help(self) -> None:
        console, out, commands, _ = make_console()
        console.keys(b"help\r")
        self.assertEqual(out.getvalue(), "llmgw> help\n" + HELP_TEXT + "llmgw> ")
        self.assertEqual(commands.calls, [])

    def test_stats(self) -> None:
        console, out, commands, _ = make_console()
        console.keys(b"stats\r")
        self.assertEqual(out.getvalue(), "llmgw> stats\n" + STATS_TABLE + "llmgw> ")
        self.assertEqual(commands.calls, ["stats"])

    def test_stats_usage(self) -> None:
        console, out, commands, _ = make_console()
        console.keys(b"stats now\r")
        self.assertEqual(out.getvalue(), "llmgw> stats now\nusage: stats\nllmgw> ")
        self.assertEqual(commands.calls, [])

    def test_verbose_on_off(self) -> None:
        console, out, commands, _ = make_console()
        console.keys(b"verbose on\rverbose OFF\r")
        self.assertEqual(
            out.getvalue(),
            "llmgw> verbose on\nverbose logging on\n"
            "llmgw> verbose OFF\nverbose logging off\nllmgw> ",
        )
        self.assertEqual(commands.calls, [("verbose", True), ("verbose", False)])

    def test_verbose_bad_argument(self) -> None:
        console, out, commands, _ = make_console()
        console.keys(b"verbose maybe\rverbose\rverbose on off\r")
        usage = "usage: verbose on|off\n"
        self.assertEqual(
            out.getvalue(),
            "llmgw> verbose maybe\n"
            + usage
            + "llmgw> verbose\n"
            + usage
            + "llmgw> verbose on off\n"
            + usage
            + "llmgw> ",
        )
        self.assertEqual(commands.calls, [])

    def test_unknown_command(self) -> None:
        console, out, commands, _ = make_console()
        console.keys(b"foo bar\r")
        self.assertEqual(
            out.getvalue(), "llmgw> foo bar\nunknown command 'foo'; type help\nllmgw> "
        )
        self.assertEqual(commands.calls, [])

    def test_empty_line(self) -> None:
        console, out, _, _ = make_console()
        console.keys(b"   \r")
        self.assertEqual(out.getvalue(), "llmgw>    \nllmgw> ")

    def test_clear(self) -> None:
        console, out, _, _ = make_console()
        console.keys(b"clear\r")
        self.assertEqual(out.getvalue(), "llmgw> clear\n\x1b[H\x1b[2Jllmgw> ")

    def test_exit_and_quit(self) -> None:
        for word in (b"exit", b"quit", b"  QUIT "):
            console, out, commands, _ = make_console()
            console.keys(word + b"\r")
            self.assertEqual(out.getvalue(), "llmgw> " + word.decode() + "\nshutting down\n", word)
            self.assertEqual(commands.calls, ["shutdown"])
            console.keys(b"exit\rhelp\r\x04")
            self.assertEqual(commands.calls, ["shutdown"])
            self.assertTrue(console.closed)

    def test_ctrl_d_on_an_empty_line(self) -> None:
        console, out, commands, _ = make_console()
        console.keys(b"\x04\x04")
        self.assertEqual(out.getvalue(), "llmgw> \nshutting down\n")
        self.assertEqual(commands.calls, ["shutdown"])

    def test_ctrl_d_with_input_is_ignored(self) -> None:
        console, out, commands, _ = make_console()
        console.keys(b"st\x04")
        self.assertEqual(out.getvalue(), "llmgw> st")
        self.assertEqual(commands.calls, [])

    def test_crlf_is_one_line(self) -> None:
        console, out, _, _ = make_console()
        console.keys(b"help\r")
        console.keys(b"\nhelp\n")
        self.assertEqual(out.getvalue(), ("llmgw> help\n" + HELP_TEXT) * 2 + "llmgw> ")

    def test_backspace(self) -> None:
        console, out, commands, _ = make_console()
        console.keys(b"stx\x7fats\r")
        self.assertEqual(
            out.getvalue(), "llmgw> stx\r\x1b[Kllmgw> stats\n" + STATS_TABLE + "llmgw> "
        )
        self.assertEqual(commands.calls, ["stats"])

    def test_kill_line_and_word(self) -> None:
        console, out, _, _ = make_console()
        console.keys(b"verbose on\x17")
        self.assertEqual(console.buffer, "verbose ")
        console.keys(b"\x17")
        self.assertEqual(console.buffer, "")
        console.keys(b"junk\x15")
        self.assertEqual(console.buffer, "")
        self.assertTrue(out.getvalue().endswith("junk\r\x1b[Kllmgw> "))

    def test_history(self) -> None:
        console, out, _, _ = make_console()
        console.keys(b"help\rdraft\x1b[A")
        self.assertEqual(console.buffer, "help")
        self.assertTrue(out.getvalue().endswith("llmgw> draft\r\x1b[Kllmgw> help"))
        console.keys(b"\x1b[A")
        self.assertEqual(console.buffer, "help")
        console.keys(b"\x1b")
        console.keys(b"[B")
        self.assertEqual(console.buffer, "draft")

    def test_other_keys_are_ignored(self) -> None:
        console, out, _, _ = make_console()
        console.keys(b"\x1b[C\x1bOD\x1bx\t\x01he\x1b[3~lp\r")
        self.assertEqual(out.getvalue(), "llmgw> help\n" + HELP_TEXT + "llmgw> ")

    def test_utf8_split_across_reads(self) -> None:
        console, out, _, _ = make_console()
        console.keys(b"caf\xc3")
        console.keys(b"\xa9\r")
        self.assertEqual(out.getvalue(), "llmgw> café\nunknown command 'café'; type help\nllmgw> ")


class BackgroundTests(SynchronousTestCase):
    def test_hidden_console_shows_no_prompt_until_redrawn(self) -> None:
        console, out, _, _ = make_console()
        console.keys(b"sta")
        console.hide()
        console.write_above("one\n")
        console.redraw()
        console.write_above("two\n")
        self.assertEqual(out.getvalue(), "llmgw> staone\n\r\x1b[Kllmgw> sta\r\x1b[Ktwo\nllmgw> sta")

    def test_answer_while_hidden_waits_for_redraw(self) -> None:
        pending: Deferred[dict[str, Any]] = Deferred()
        console, out, _, _ = make_console(RecordingCommands(pending))
        console.keys(b"stats\r")
        console.hide()
        console.redraw()  # a command is pending: still no prompt
        console.hide()
        pending.callback(STATS)
        self.assertEqual(out.getvalue(), "llmgw> stats\n" + STATS_TABLE)
        console.redraw()
        self.assertEqual(out.getvalue(), "llmgw> stats\n" + STATS_TABLE + "\r\x1b[Kllmgw> ")


class PendingCommandTests(SynchronousTestCase):
    def test_typing_waits_for_the_answer(self) -> None:
        pending: Deferred[dict[str, Any]] = Deferred()
        console, out, _, _ = make_console(RecordingCommands(pending))
        console.keys(b"stats\rhelp\r")
        self.assertEqual(out.getvalue(), "llmgw> stats\n")
        console.write_above("a log line\n")
        self.assertEqual(out.getvalue(), "llmgw> stats\na log line\n")
        pending.callback(STATS)
        self.assertEqual(
            out.getvalue(),
            "llmgw> stats\na log line\n" + STATS_TABLE + "llmgw> help\n" + HELP_TEXT + "llmgw> ",
        )

    def test_timeout(self) -> None:
        pending: Deferred[dict[str, Any]] = Deferred()
        console, out, _, clock = make_console(RecordingCommands(pending))
        console.keys(b"stats\r")
        clock.advance(9.9)
        self.assertEqual(out.getvalue(), "llmgw> stats\n")
        clock.advance(0.1)
        self.assertEqual(out.getvalue(), "llmgw> stats\nstats: no answer within 10s\nllmgw> ")

    def test_failure(self) -> None:
        console, out, _, _ = make_console(RecordingCommands(fail(RuntimeError("boom"))))
        console.keys(b"stats\r")
        self.assertEqual(out.getvalue(), "llmgw> stats\nstats failed: boom\nllmgw> ")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop_cancels_quietly(self) -> None:
        cancelled: list[Deferred[dict[str, Any]]] = []
        pending: Deferred[dict[str, Any]] = Deferred(cancelled.append)
        console, out, _, _ = make_console(RecordingCommands(pending))
        console.keys(b"stats\r")
        console.stop()
        self.assertEqual(cancelled, [pending])
        self.assertEqual(out.getvalue(), "llmgw> stats\n")


class LogRedrawTests(SynchronousTestCase):
    def test_log_line_over_partial_input(self) -> None:
        console, out, commands, _ = make_console()
        console.keys(b"sta")
        console.write_above("a log line\n")
        self.assertEqual(out.getvalue(), "llmgw> sta\r\x1b[Ka log line\nllmgw> sta")
        console.keys(b"ts\r")
        self.assertEqual(commands.calls, ["stats"])
        self.assertTrue(out.getvalue().endswith("llmgw> stats\n" + STATS_TABLE + "llmgw> "))

    def test_several_lines_and_a_partial_one(self) -> None:
        console, out, _, _ = make_console()
        console.write_above("one\ntwo\nthr")
        self.assertEqual(out.getvalue(), "llmgw> \r\x1b[Kone\ntwo\nllmgw> ")
        console.write_above("ee\n")
        self.assertEqual(out.getvalue(), "llmgw> \r\x1b[Kone\ntwo\nllmgw> \r\x1b[Kthree\nllmgw> ")

    def test_wrapped_input_is_erased_whole(self) -> None:
        console, out, _, _ = make_console(columns=10)
        console.keys(b"abcdefgh")
        console.write_above("log\n")
        self.assertEqual(out.getvalue(), "llmgw> abcdefgh\x1b[1A\r\x1b[Jlog\nllmgw> abcdefgh")

    def test_stop_erases_the_prompt(self) -> None:
        console, out, commands, _ = make_console()
        console.keys(b"sta")
        console.stop()
        console.write_above("after\n")
        console.keys(b"ts\r")
        self.assertEqual(out.getvalue(), "llmgw> sta\r\x1b[Kafter\n")
        self.assertEqual(commands.calls, [])


class PromptSafeStreamTests(SynchronousTestCase):
    def test_passes_through_without_a_console(self) -> None:
        underlying = io.StringIO()
        stream = PromptSafeStream(underlying)
        self.assertEqual(stream.write("hello\n"), 6)
        stream.flush()
        self.assertEqual(underlying.getvalue(), "hello\n")
        self.assertIs(ioType(stream), str)
        self.assertFalse(stream.isatty())
        self.assertEqual(stream.encoding, "utf-8")
        self.assertTrue(stream.writable())
        self.assertEqual(stream.getvalue(), "hello\n")  # delegated
        self.assertIsInstance(stream, typing.TextIO)

    def test_delegates_a_real_stdout(self) -> None:
        with open(os.devnull, "w") as devnull:
            stream = PromptSafeStream(devnull)
            self.assertEqual(
                (stream.buffer, stream.line_buffering, stream.name, stream.mode, stream.fileno()),
                (devnull.buffer, devnull.line_buffering, os.devnull, "w", devnull.fileno()),
            )
            stream.reconfigure(line_buffering=True)
            self.assertTrue(devnull.line_buffering)

    def test_log_observer_goes_through_the_console(self) -> None:
        underlying = io.StringIO()
        stream = PromptSafeStream(underlying)
        console = Console(RecordingCommands(), underlying, Clock())
        console.start()
        console.keys(b"sta")
        stream.attach_console(console)
        observer = textFileLogObserver(stream, timeFormat=None)
        observer({"log_format": "hello {who}", "log_namespace": "ns", "who": "you"})
        self.assertEqual(underlying.getvalue(), "llmgw> sta\r\x1b[K- [ns#-] hello you\nllmgw> sta")
        stream.release_console(console)
        stream.write("direct\n")
        self.assertTrue(underlying.getvalue().endswith("llmgw> stadirect\n"))

    def test_release_only_by_the_attached_console(self) -> None:
        underlying = io.StringIO()
        stream = PromptSafeStream(underlying)
        console = Console(RecordingCommands(), underlying, Clock())
        stream.attach_console(console)
        console.start()
        stream.release_console(Console(RecordingCommands(), underlying, Clock()))
        stream.write("x\n")
        self.assertEqual(underlying.getvalue(), "llmgw> \r\x1b[Kx\nllmgw> ")

    def test_prompt_safe_stdout_wraps_once(self) -> None:
        original = io.StringIO()
        self.patch(sys, "stdout", original)
        stream = prompt_safe_stdout()
        self.assertIs(sys.stdout, stream)
        self.assertIs(stream.stream, original)
        self.assertIs(prompt_safe_stdout(), stream)


class NoTerminalTests(TestCase):
    def test_pipe_gets_no_console(self) -> None:
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        memory = MemoryReactor()
        commands = RecordingCommands()
        out = io.StringIO()
        service = console_service(commands, memory, read_end, out)
        service.startService()
        self.assertEqual(memory.getReaders(), [])
        self.assertIsInstance(service, ConsoleService)
        assert isinstance(service, ConsoleService)
        self.assertFalse(service.attached)
        os.close(write_end)
        service.stopService()
        self.assertEqual((out.getvalue(), commands.calls), ("", []))

    def test_dev_null_gets_no_console(self) -> None:
        null = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, null)
        memory = MemoryReactor()
        service = ConsoleService(RecordingCommands(), memory, null, io.StringIO())
        service.startService()
        self.assertEqual((memory.getReaders(), service.attached), ([], False))

    @inline
    async def test_eof_on_a_pipe_never_shuts_down(self) -> None:
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        readers = set(reactor.getReaders())
        commands = RecordingCommands()
        service = ConsoleService(commands, reactor, read_end, io.StringIO())
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(set(reactor.getReaders()) - readers, set())
        os.close(write_end)
        for _ in range(3):
            await deferLater(reactor, 0, lambda: None)
        self.assertEqual(commands.calls, [])


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll the real reactor until C{predicate()} holds, failing after C{timeout}."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


def close_quietly(stream: TextIO) -> None:
    """Close a file whose terminal hung up: what is left in its buffer cannot be written."""
    try:
        stream.close()
    except OSError:
        pass


def console_readers() -> list[Any]:
    return [r for r in reactor.getReaders() if r.logPrefix() == "console"]


class TerminalTests(TestCase):
    """The service on a real pseudo-terminal in this process, on the real reactor."""

    timeout = 30

    def setUp(self) -> None:
        self.master, self.slave = os.openpty()
        self.addCleanup(os.close, self.slave)
        self.addCleanup(self.close_master)
        self.before = termios.tcgetattr(self.slave)
        # What the gateway's key reload would be: the handler the console finds.
        self.reloads: list[int] = []
        original = signal.signal(signal.SIGHUP, lambda signum, frame: self.reloads.append(signum))
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        self.handlers = [signal.getsignal(signal.SIGCONT), signal.getsignal(signal.SIGTTIN)]
        self.hangup_handler = signal.getsignal(signal.SIGHUP)
        self.commands = RecordingCommands()
        self.out = TerminalOutput()
        self.service = self.start_service(self.out)

    def start_service(self, out: TextIO) -> ConsoleService:
        service = ConsoleService(self.commands, reactor, self.slave, out)
        service.startService()
        self.addCleanup(service.stopService)
        self.addCleanup(self.forget_hang_up_trigger, service)
        return service

    def forget_hang_up_trigger(self, service: ConsoleService) -> None:
        """The trigger a hang-up leaves for the process's shutdown, which trial never runs."""
        trigger = getattr(service, "_hang_up_trigger", None)
        if trigger is not None:
            reactor.removeSystemEventTrigger(trigger)

    def current_handlers(self) -> list[Any]:
        return [signal.getsignal(signal.SIGCONT), signal.getsignal(signal.SIGTTIN)]

    def close_master(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def test_attaches_in_cbreak_mode_and_restores(self) -> None:
        self.assertTrue(self.service.attached)
        mode = termios.tcgetattr(self.slave)
        self.assertEqual(mode[3] & (termios.ICANON | termios.ECHO), 0)
        self.assertEqual(mode[3] & termios.ISIG, termios.ISIG)
        self.assertEqual(mode[1] & termios.OPOST, termios.OPOST)
        self.assertEqual(len(console_readers()), 1)
        self.assertEqual(signal.getsignal(signal.SIGTTIN), signal.SIG_IGN)
        self.assertTrue(os.get_blocking(self.slave))
        self.assertEqual(self.out.getvalue(), "llmgw> ")
        self.service.stopService()
        self.assertEqual(termios.tcgetattr(self.slave), self.before)
        self.assertEqual(console_readers(), [])
        self.assertEqual(self.current_handlers(), self.handlers)
        self.assertFalse(self.service.attached)
        self.assertEqual(self.out.getvalue(), "llmgw> \r\x1b[K")

    @inline
    async def test_reads_keys(self) -> None:
        os.write(self.master, b"help\r")
        await eventually(lambda: self.out.getvalue().endswith(HELP_TEXT + "llmgw> "), "help")
        self.assertEqual(self.out.getvalue(), "llmgw> help\n" + HELP_TEXT + "llmgw> ")
        # Ctrl-D arrives as a key, not as end-of-file: the terminal is not canonical.
        os.write(self.master, b"\x04")
        await eventually(lambda: self.commands.calls != [], "shutdown")
        self.assertEqual(self.commands.calls, ["shutdown"])

    async def turns(self, count: int = 5) -> None:
        for _ in range(count):
            await deferLater(reactor, 0, lambda: None)

    @inline
    async def test_hang_up_shuts_down(self) -> None:
        """The read gives end-of-file: shut down as C{exit} would, and ignore SIGHUP from now on."""
        self.close_master()
        await eventually(lambda: self.commands.calls != [], "the shutdown")
        self.assertEqual(self.commands.calls, ["shutdown"])
        self.assertTrue(self.service.hung_up)
        self.assertFalse(self.service.attached)
        self.assertEqual(console_readers(), [])
        self.assertEqual(self.current_handlers(), self.handlers)
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_IGN)
        # The shell's and the kernel's SIGHUP that follow a hang-up change nothing.
        os.kill(os.getpid(), signal.SIGHUP)
        await self.turns()
        self.assertEqual((self.commands.calls, self.reloads), (["shutdown"], []))

    @inline
    async def test_sighup_before_the_read_shuts_down_once(self) -> None:
        """The kernel's SIGHUP comes first: it stops alone, and the read after it does not again."""
        [reader] = console_readers()
        reactor.removeReader(reader)
        self.close_master()
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: self.commands.calls != [], "the shutdown")
        reader.connectionLost(Failure(ConnectionDone()))  # the end-of-file, read late
        await self.turns()
        self.assertEqual((self.commands.calls, self.reloads), (["shutdown"], []))
        self.assertFalse(self.service.attached)

    @inline
    async def test_sighup_with_the_terminal_there_is_a_reload(self) -> None:
        """C{kill -HUP} reaches the handler the console found, and the console stays."""
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: self.reloads != [], "the reload")
        self.assertEqual((self.reloads, self.commands.calls), ([signal.SIGHUP], []))
        self.assertTrue(self.service.attached)
        self.service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.hangup_handler)

    def test_hang_up_ignores_sighup_once_the_services_stop(self) -> None:
        """
        The key reload puts SIGHUP back to its default (which kills) as it stops:
        after a hang-up, the shutdown's own trigger ignores it again.
        """
        self.service.stopService()
        memory = MemoryReactor()
        service = ConsoleService(self.commands, memory, self.slave, TerminalOutput())
        service.startService()
        self.addCleanup(service.stopService)
        [reader] = memory.getReaders()
        self.close_master()
        reader.connectionLost(Failure(ConnectionDone()))  # what the reactor does at end-of-file
        self.assertEqual(self.commands.calls, ["shutdown"])
        [(ignore, args, kwargs)] = memory.triggers["before"]["shutdown"]
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # what a stopping KeyReloadService does
        ignore(*args, **kwargs)
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_IGN)

    @inline
    async def test_hang_up_in_the_background(self) -> None:
        """A background job's terminal hangs up: its look for C{fg} finds it gone, and stops."""
        self.patch(console_module, "_in_foreground", lambda fd: False)
        [reader] = console_readers()
        reactor.removeReader(reader)
        reader.connectionLost(Failure(ConnectionLost()))  # the background read's EIO
        self.assertEqual((self.commands.calls, self.service.attached), ([], True))
        self.close_master()
        await eventually(lambda: self.commands.calls != [], "the shutdown")
        self.assertEqual(self.commands.calls, ["shutdown"])
        self.assertFalse(self.service.attached)

    @inline
    async def test_hang_up_silences_the_prompt_safe_stream(self) -> None:
        """Log lines after a hang-up are dropped, not written to a terminal that fails with EIO."""
        self.service.stopService()
        terminal = open(os.dup(self.slave), "w")
        self.addCleanup(close_quietly, terminal)
        stream = PromptSafeStream(terminal)
        service = self.start_service(stream)
        self.assertTrue(service.attached)
        self.close_master()
        await eventually(lambda: self.commands.calls != [], "the shutdown")
        self.assertEqual(stream.write("a log line\n"), 11)
        stream.flush()
        with self.assertRaises(OSError):
            os.write(terminal.fileno(), b"a log line\n")

    @inline
    async def test_continue_restores_cbreak_and_redraws(self) -> None:
        os.write(self.master, b"sta")
        await eventually(lambda: self.out.getvalue() == "llmgw> sta", "echo")
        termios.tcsetattr(self.slave, termios.TCSANOW, self.before)  # as a shell would
        os.kill(os.getpid(), signal.SIGCONT)
        await eventually(lambda: self.out.getvalue().endswith("\r\x1b[Kllmgw> sta"), "redraw")
        mode = termios.tcgetattr(self.slave)
        self.assertEqual(mode[3] & (termios.ICANON | termios.ECHO), 0)

    @inline
    async def test_read_failure_in_the_background_waits_for_fg(self) -> None:
        self.patch(console_module, "_in_foreground", lambda fd: False)
        [reader] = console_readers()
        # What the reactor does when a background read fails with EIO (SIGTTIN ignored).
        reactor.removeReader(reader)
        reader.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(self.service.attached)
        self.assertEqual(console_readers(), [])
        # Log lines in the background are not drawn over the shell's prompt.
        assert self.service.console is not None
        self.service.console.write_above("in the background\n")
        self.assertEqual(self.out.getvalue(), "llmgw> in the background\n")
        # fg sends no SIGCONT to a running job: the console notices by itself.
        termios.tcsetattr(self.slave, termios.TCSANOW, self.before)  # as the shell left it
        self.patch(console_module, "_in_foreground", lambda fd: True)
        await eventually(lambda: len(console_readers()) == 1, "the console to listen again")
        mode = termios.tcgetattr(self.slave)
        self.assertEqual(mode[3] & (termios.ICANON | termios.ECHO), 0)
        os.write(self.master, b"help\r")
        await eventually(lambda: self.out.getvalue().endswith(HELP_TEXT + "llmgw> "), "help")
        self.assertEqual(
            self.out.getvalue(),
            "llmgw> in the background\n\r\x1b[Kllmgw> help\n" + HELP_TEXT + "llmgw> ",
        )

    def test_stop_while_in_the_background(self) -> None:
        def checks() -> list[Any]:
            return [c for c in reactor.getDelayedCalls() if c.func == self.service._resume]

        self.patch(console_module, "_in_foreground", lambda fd: False)
        self.service._resume()  # what SIGCONT leads to after bg
        self.assertEqual(len(checks()), 1)
        self.service.stopService()
        self.assertEqual(checks(), [])

    def test_no_console_in_the_background(self) -> None:
        self.service.stopService()
        self.patch(console_module, "_in_foreground", lambda fd: False)
        out = TerminalOutput()
        service = ConsoleService(self.commands, reactor, self.slave, out)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual((service.attached, console_readers(), out.getvalue()), (False, [], ""))
        self.assertEqual(termios.tcgetattr(self.slave), self.before)

    def test_no_console_when_output_is_not_a_terminal(self) -> None:
        self.service.stopService()
        out = io.StringIO()
        service = ConsoleService(self.commands, reactor, self.slave, PromptSafeStream(out))
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual((service.attached, console_readers(), out.getvalue()), (False, [], ""))
        self.assertEqual(termios.tcgetattr(self.slave), self.before)

    def test_through_a_prompt_safe_stream(self) -> None:
        self.service.stopService()
        out = TerminalOutput()
        stream = PromptSafeStream(out)
        service = ConsoleService(self.commands, reactor, self.slave, stream)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(service.attached)
        stream.write("logged\n")
        service.stopService()
        stream.write("after\n")
        self.assertEqual(out.getvalue(), "llmgw> \r\x1b[Klogged\nllmgw> \r\x1b[Kafter\n")


class TerminalSession(ProcessProtocol):
    """What a process under a pseudo-terminal shows; lets a test wait for text."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[BaseException] = Deferred()
        self.exited = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        assert reason.value is not None
        self.ended.callback(reason.value)

    def text(self) -> str:
        return self.output.decode("utf-8", "replace").replace("\r\n", "\n")

    async def wait_for(self, expected: str, timeout: float = 10.0) -> None:
        deadline = reactor.seconds() + timeout
        while expected not in self.text():
            if self.exited or reactor.seconds() > deadline:
                raise AssertionError(f"no {expected!r} in {self.text()!r}")
            await deferLater(reactor, 0.01, lambda: None)


class PseudoTerminalSessionTests(TestCase):
    """The harness (the console on a real reactor) driven through a real pty."""

    timeout = 60

    def spawn(self) -> tuple[TerminalSession, Any]:
        session = TerminalSession()
        root = str(Path(llmgw.__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path}
        process = reactor.spawnProcess(
            session, sys.executable, [sys.executable, str(HARNESS)], env=env, usePTY=True
        )

        async def reap() -> None:
            if not session.exited:
                try:
                    process.signalProcess("KILL")
                except ProcessExitedAlready:
                    pass
                await session.ended

        self.addCleanup(lambda: Deferred.fromCoroutine(reap()))
        return session, process

    @inline
    async def test_session(self) -> None:
        session, process = self.spawn()
        prompt = "llmgw> "
        transcript = prompt
        await session.wait_for(transcript)
        for typed, answer in [
            ("help", HELP_TEXT),
            ("stats", STATS_TABLE),
            ("verbose on", "- [harness#info] verbose switched on\nverbose logging on\n"),
            ("bogus", "unknown command 'bogus'; type help\n"),
        ]:
            process.write(typed.encode() + b"\r")
            transcript += typed + "\n" + answer + prompt
            await session.wait_for(transcript)
        # A log line while "sta" is half typed: erased, logged, prompt and "sta" redrawn.
        process.write(b"sta")
        transcript += "sta"
        await session.wait_for(transcript)
        process.signalProcess(signal.SIGUSR1)
        transcript += "\r\x1b[K- [harness#info] a log line from elsewhere\n" + prompt + "sta"
        await session.wait_for(transcript)
        process.write(b"ts\r")
        transcript += "ts\n" + STATS_TABLE + prompt
        await session.wait_for(transcript)
        process.write(b"exit\r")
        transcript += "exit\nshutting down\nSHUTDOWN\n"
        await session.wait_for(transcript)
        self.assertIsInstance(await session.ended, ProcessDone)
        self.assertEqual(session.text()[: len(transcript)], transcript)
        self.assertIn("\nTERMINAL RESTORED\nSTDIO BLOCKING\n", session.text())


TWISTD = "from twisted.scripts.twistd import run; run()"


def port_is_free(port: int) -> bool:
    """Whether a listening socket could be bound to 127.0.0.1:C{port} now."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
    return True


class GatewayHangUpTests(TestCase):
    """
    The real gateway in the foreground of a pseudo-terminal whose master is
    then closed, as when a terminal tab is closed or an ssh session drops.
    The gateway is the terminal's session leader, as under C{ssh -t host
    llmgw}: the kernel sends it SIGHUP as the terminal hangs up.
    """

    timeout = 120

    def spawn(self, arguments: list[str]) -> tuple[TerminalSession, Any]:
        session = TerminalSession()
        root = str(Path(llmgw.__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "NO_COLOR": "1"}
        process = reactor.spawnProcess(
            session, sys.executable, [sys.executable, *arguments], env=env, usePTY=True
        )

        def reap() -> Deferred[BaseException] | None:
            for pid in worker_pids(session):
                kill_quietly(pid)
            if session.exited:
                return None
            kill_quietly(process.pid)
            return session.ended

        self.addCleanup(reap)
        return session, process

    def gateway(self, upstream: Upstream, port: int, workers: int) -> list[str]:
        return [
            "llmgw",
            f"--bindport={port}",
            "--aihost=localhost",
            f"--aihostport={upstream.port}",
            f"--aica={upstream.ca_file}",
            f"--workers={workers}",
        ]

    async def started(self, session: TerminalSession, workers: int) -> list[int]:
        await session.wait_for("llmgw> ", timeout=30)
        if workers > 1:
            for number in range(1, workers + 1):
                await session.wait_for(f"worker {number}: GatewaySite starting", timeout=30)
        pids = worker_pids(session)
        self.assertEqual(len(pids), workers if workers > 1 else 0, session.text())
        return pids

    async def in_flight(self, upstream: Upstream, port: int) -> Deferred[Reply]:
        reply = Deferred.fromCoroutine(request(self, port, body=chat_body("in flight")))
        await eventually(lambda: upstream.model.started == 1, "the request to reach the model")
        return reply

    async def stopped(
        self, session: TerminalSession, reply: Deferred[Reply], workers: list[int], port: int
    ) -> None:
        try:
            status = (await reply).status
        except Exception as e:
            # What the gateway printed says why the request in hand was dropped.
            self.fail(f"{e}\n{session.text()}")
        self.assertEqual(status, 200)
        ended = await session.ended
        self.assertIsInstance(ended, ProcessDone, session.text())
        await eventually(lambda: not any(map(alive, workers)), "the workers to exit")
        self.assertTrue(port_is_free(port))

    @inline
    async def test_two_workers(self) -> None:
        """The parent and both workers exit 0, the request in hand finishes, the port is free."""
        upstream = start_upstream(self, defaults=Behaviour(delay=2.0))
        port = free_port()
        session, process = self.spawn(["-m", "llmgw.cli", *self.gateway(upstream, port, 2)[1:]])
        workers = await self.started(session, 2)
        reply = await self.in_flight(upstream, port)
        process.loseConnection()  # closes the pseudo-terminal's master
        await self.stopped(session, reply, workers, port)

    @inline
    async def test_one_worker_and_a_late_sighup(self) -> None:
        """
        C{twistd -n llmgw} with one worker: it stops, and a SIGHUP that comes
        while it drains (as the shell's and the kernel's may) does not kill it.
        """
        upstream = start_upstream(self, defaults=Behaviour(delay=3.0))
        port = free_port()
        logfile = Path(self.mktemp())
        twistd = ["-c", TWISTD, "--nodaemon", "--pidfile=", f"--logfile={logfile}"]
        session, process = self.spawn([*twistd, *self.gateway(upstream, port, 1)])
        await self.started(session, 1)
        reply = await self.in_flight(upstream, port)
        process.loseConnection()

        def log() -> str:
            return logfile.read_text() if logfile.exists() else ""

        # The listener closes as the services stop, the key reload's among them.
        await eventually(lambda: f"(TCP Port {port} Closed)" in log(), "the stop to begin")
        self.assertIn("The console's terminal hung up; shutting down", log())
        os.kill(process.pid, signal.SIGHUP)
        await self.stopped(session, reply, [], port)
        self.assertNotIn("Traceback", log())

    @inline
    async def test_kill_hup_with_the_terminal_there_reloads_keys(self) -> None:
        """C{kill -HUP} while the terminal is open reloads the key files; the console stays."""
        upstream = start_upstream(self)
        port = free_port()
        keys = Path(self.mktemp())
        keys.write_text("sk-old\n")
        arguments = [*self.gateway(upstream, port, 2)[1:], f"--api-keys-file={keys}"]
        session, process = self.spawn(["-m", "llmgw.cli", *arguments])
        workers = await self.started(session, 2)
        new_key = {b"Content-Type": [b"application/json"], b"Authorization": [b"Bearer sk-new"]}
        reply = await request(self, port, body=chat_body(), headers=new_key)
        self.assertEqual(reply.status, 401)
        keys.write_text("sk-new\n")
        os.kill(process.pid, signal.SIGHUP)
        for _ in range(4):  # both workers, whichever takes each connection
            await eventually_async(
                lambda: request(self, port, body=chat_body(), headers=new_key), 200
            )
        process.write(b"help\r")
        await session.wait_for("help\n" + HELP_TEXT + "llmgw> ")
        self.assertTrue(all(map(alive, workers)))
        process.write(b"exit\r")
        self.assertIsInstance(await session.ended, ProcessDone, session.text())
        await eventually(lambda: not any(map(alive, workers)), "the workers to exit")
        self.assertTrue(port_is_free(port))


async def eventually_async(
    ask: Callable[[], Coroutine[Any, Any, Reply]], status: int, timeout: float = 10.0
) -> None:
    """Ask again until the answer has C{status}."""
    deadline = reactor.seconds() + timeout
    while (reply := await ask()).status != status:
        if reactor.seconds() > deadline:
            raise AssertionError(f"still {reply.status}: {reply.body!r}")
        await deferLater(reactor, 0.05, lambda: None)


def worker_pids(session: TerminalSession) -> list[int]:
    """The workers' pids, from the parent's log on the terminal."""
    return [int(pid) for pid in re.findall(r"Started worker \d+ \(pid (\d+)\)", session.text())]


def kill_quietly(pid: int | None) -> None:
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
