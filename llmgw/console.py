"""The operator's console: commands typed at the terminal that runs C{twistd -n llmgw}.

The console exists only when standard input is a terminal as the service
starts; a daemon's or a systemd unit's standard input is C{/dev/null}, so they
get none, and nothing read from a file or pipe can ever stop the gateway.

Why not a C{LineReceiver} on C{StandardIO}:

 - A log line can only be printed without garbling the operator's typing if
   the console knows what has been typed so far, and in canonical mode the
   kernel keeps the partial line to itself.  So the terminal goes into
   non-canonical, no-echo mode and the console echoes for itself.  It is
   cbreak, not raw: C{ISIG} stays on, so Ctrl-C still stops twistd, and
   C{OPOST} stays on, so the C{"\\n"} in every log line still starts a line.
 - C{StandardIO} sets C{O_NONBLOCK} on file descriptors 0 and 1.  On a
   terminal those usually share one open file description with standard error
   and with the operator's shell, so twistd's blocking writes to
   C{sys.stdout} could fail with C{EAGAIN}, and the shell could inherit a
   non-blocking terminal.  The console reads from its own, separately opened
   description of the terminal instead.
 - C{StandardIO} writes when the reactor next turns, while twistd's log
   observer writes at once.  The console writes synchronously through the
   very stream the log uses (L{PromptSafeStream}), so that erasing and
   redrawing the prompt can never be overtaken by a log line.
"""

from __future__ import annotations

import atexit
import codecs
import io
import os
import signal
import sys
import termios
import threading
from collections.abc import Callable
from typing import Any, Protocol, TextIO

from twisted.application.service import IService, Service
from twisted.internet import fdesc
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IReactorTime, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "ConsoleCommands",
    "ConsoleService",
    "PromptSafeStream",
    "console_service",
    "format_stats",
    "format_uptime",
    "prompt_safe_stdout",
]

log = Logger()

PROMPT = "llmgw> "
CLEAR_SCREEN = "\x1b[H\x1b[2J"
ERASE_LINE = "\r\x1b[K"
COMMAND_TIMEOUT = 10.0
HISTORY_SIZE = 100
FOREGROUND_CHECK_INTERVAL = 0.5

HELP = """\
commands:
  clear           clear the screen
  exit, quit      shut the gateway down (Ctrl-D too)
  help            list the commands
  stats           requests per worker and model server, and the clients the limiter tracks
  verbose on|off  switch verbose logging in every worker
"""

_STATS_COLUMNS = (
    ("worker", "worker"),
    ("pid", "pid"),
    ("served", "served"),
    ("in flight", "in_flight"),
    ("refused", "refused"),
    ("upstream errors", "upstream_errors"),
    ("uptime", "uptime"),
)
_SUMMED = ("served", "in_flight", "refused", "upstream_errors")
_REPLICA_COLUMNS = (
    ("upstream", "upstream"),
    ("state", "state"),
    ("in flight", "in_flight"),
    ("served", "served"),
    ("failures", "failures"),
)


class ConsoleCommands(Protocol):
    """What the console asks of the gateway; the parent process implements it."""

    def stats(self) -> Deferred[dict[str, Any]]:
        """
        Fire with C{{"workers": [{"worker": 1, "pid": 123, "served": 10,
        "in_flight": 0, "refused": 2, "upstream_errors": 0, "uptime": 12.5},
        ...], "tracked_clients": 42, "replicas": [{"upstream": "https://a:8000",
        "state": "up", "in_flight": 1, "served": 7, "failures": 0}, ...]}}.
        """

    def set_verbose(self, on: bool) -> Deferred[None]:
        """Switch verbose logging in every worker; fire once they all have."""

    def shutdown(self) -> None:
        """Stop the gateway gracefully."""


def format_uptime(seconds: float) -> str:
    """C{12s}, C{2m03s}, C{1h02m03s}: whole seconds, hours unbounded."""
    hours, rest = divmod(max(int(seconds), 0), 3600)
    minutes, seconds_ = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds_:02d}s"
    if minutes:
        return f"{minutes}m{seconds_:02d}s"
    return f"{seconds_}s"


def format_stats(stats: dict[str, Any]) -> str:
    """One aligned row per worker, a total row, then the limiter's client count."""
    workers = stats.get("workers") or []
    tracked = stats.get("tracked_clients")
    footer = f"tracked clients: {'-' if tracked is None else tracked}\n"
    if not workers:
        return "no workers\n" + footer
    rows = [[label for label, _ in _STATS_COLUMNS]]
    for worker in workers:
        row = []
        for _, key in _STATS_COLUMNS:
            value = worker.get(key)
            if value is None:
                row.append("-")
            elif key == "uptime":
                row.append(format_uptime(value))
            else:
                row.append(str(value))
        rows.append(row)
    totals = {
        key: sum(w.get(key) for w in workers if isinstance(w.get(key), int)) for key in _SUMMED
    }
    rows.append([str(totals[key]) if key in totals else "" for _, key in _STATS_COLUMNS])
    rows[-1][0] = "total"
    replicas = [
        [str(replica.get(key, "-")) for _, key in _REPLICA_COLUMNS]
        for replica in stats.get("replicas") or []
    ]
    table = _aligned(rows)
    if replicas:
        table += _aligned([[label for label, _ in _REPLICA_COLUMNS], *replicas])
    return table + footer


def _aligned(rows: list[list[str]]) -> str:
    """Right-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def terminal_columns(stream: TextIO) -> int:
    """The terminal's width, or 80 when unknown (a new pseudo-terminal says 0)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80
    return columns if columns > 0 else 80


def _escape_complete(sequence: str) -> bool:
    """Whether C{sequence} (starting with ESC) is a whole key: CSI, SS3 or Alt-key."""
    if len(sequence) < 2:
        return False
    if sequence[1] == "[":
        return len(sequence) > 2 and "@" <= sequence[-1] <= "~"
    if sequence[1] == "O":
        return len(sequence) > 2
    return True


class Console:
    """
    The line editor and the command interpreter, with no file descriptor of its
    own: bytes typed go to L{keys}, and everything shown goes to C{out}.

    Every entry point holds one lock, because log lines may come from threads.

    @ivar buffer: what the operator has typed on the current line.
    @ivar closed: no more commands: shutting down, or detached.
    """

    def __init__(
        self,
        commands: ConsoleCommands,
        out: TextIO,
        clock: IReactorTime,
        *,
        prompt: str = PROMPT,
        timeout: float = COMMAND_TIMEOUT,
        columns: Callable[[], int] | None = None,
    ) -> None:
        self.commands = commands
        self.out = out
        self.clock = clock
        self.prompt = prompt
        self.timeout = timeout
        self._columns = columns if columns is not None else lambda: terminal_columns(out)
        self._lock = threading.RLock()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._handlers: dict[str, Callable[[list[str]], str | Deferred[str]]] = {
            "clear": self._clear,
            "exit": self._exit,
            "help": self._help,
            "quit": self._exit,
            "stats": self._stats,
            "verbose": self._verbose,
        }
        self.buffer = ""
        self.closed = False
        self._shown = False
        self._hidden = False
        self._escape = ""
        self._after_cr = False
        self._pending: Deferred[str] | None = None
        self._typeahead = ""
        self._partial_log = ""
        self._history: list[str] = []
        self._recalled = 0
        self._draft = ""

    # Entry points

    def start(self) -> None:
        with self._lock:
            self._show_prompt()

    def keys(self, data: bytes) -> None:
        """What the operator typed, as read from the terminal."""
        with self._lock:
            self._type(self._decoder.decode(data))

    def write_above(self, text: str) -> None:
        """
        Print log output without garbling the input line: erase the prompt,
        print the complete lines, then redraw the prompt and the partial input.
        """
        with self._lock:
            text, self._partial_log = self._partial_log + text, ""
            if not self._shown:
                self._emit(text)
                return
            lines, newline, self._partial_log = text.rpartition("\n")
            if newline:
                self._emit(self._erase() + lines + "\n" + self.prompt + self.buffer)

    def hide(self) -> None:
        """The terminal is someone else's (we are in the background): show no prompt."""
        with self._lock:
            self._hidden = True
            self._shown = False

    def redraw(self) -> None:
        """Show the prompt and input again, after the terminal was someone else's."""
        with self._lock:
            self._hidden = False
            if not self.closed and self._pending is None:
                self._emit(ERASE_LINE + self.prompt + self.buffer)
                self._shown = True

    def stop(self) -> None:
        """Take the prompt off the screen and accept nothing more."""
        with self._lock:
            self.closed = True
            pending, self._pending = self._pending, None
            if pending is not None:
                pending.cancel()
            erase, self._shown = self._erase(), False
            partial, self._partial_log = self._partial_log, ""
            try:
                self._emit(erase + partial)
            except (OSError, ValueError):
                pass  # the terminal is gone, and the prompt with it

    # Output

    def _emit(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def _erase(self) -> str:
        """What takes the prompt and input off the screen, even when they wrap."""
        if not self._shown:
            return ""
        rows = (len(self.prompt) + len(self.buffer) - 1) // max(self._columns(), 1)
        return ERASE_LINE if rows <= 0 else f"\x1b[{rows}A\r\x1b[J"

    def _show_prompt(self) -> None:
        if not (self.closed or self._hidden):
            self._emit(self.prompt + self.buffer)
            self._shown = True

    def _replace_input(self, text: str) -> None:
        erase = self._erase()
        self.buffer = text
        self._emit(erase + self.prompt + text)

    # Keys

    def _type(self, text: str) -> None:
        for index, char in enumerate(text):
            if self.closed:
                return
            if self._pending is not None:
                self._typeahead += text[index:]
                return
            self._key(char)

    def _key(self, char: str) -> None:
        after_cr, self._after_cr = self._after_cr, char == "\r"
        if self._escape:
            self._escape += char
            if _escape_complete(self._escape):
                sequence, self._escape = self._escape, ""
                if sequence[1] in "[O" and sequence[-1] in "AB":
                    self._recall(-1 if sequence[-1] == "A" else 1)
        elif char == "\x1b":
            self._escape = char
        elif char == "\r" or (char == "\n" and not after_cr):
            self._enter()
        elif char in "\x7f\x08":
            self._replace_input(self.buffer[:-1])
        elif char == "\x04":
            if not self.buffer:
                self._emit("\n")
                self._shown = False
                self._run("exit")
        elif char == "\x15":
            self._replace_input("")
        elif char == "\x17":
            kept = self.buffer.rstrip()
            self._replace_input(kept[: kept.rfind(" ") + 1])
        elif char == "\x0c":
            self._emit(CLEAR_SCREEN + self.prompt + self.buffer)
        elif char.isprintable():
            self.buffer += char
            self._emit(char)

    def _recall(self, step: int) -> None:
        index = self._recalled + step
        if not 0 <= index <= len(self._history):
            return
        if self._recalled == len(self._history):
            self._draft = self.buffer
        self._recalled = index
        self._replace_input(self._history[index] if index < len(self._history) else self._draft)

    def _enter(self) -> None:
        line, self.buffer = self.buffer.strip(), ""
        self._emit("\n")
        self._shown = False
        if line and (not self._history or self._history[-1] != line):
            self._history.append(line)
            del self._history[:-HISTORY_SIZE]
        self._recalled, self._draft = len(self._history), ""
        self._run(line)

    # Commands

    def _run(self, line: str) -> None:
        words = line.split()
        if not words:
            self._finish("")
            return
        name, arguments = words[0].lower(), words[1:]
        handler = self._handlers.get(name)
        if handler is None:
            self._finish(f"unknown command {words[0]!r}; type help")
            return
        try:
            result = handler(arguments)
        except Exception:
            log.failure("Console command {command!r} failed", command=line)
            self._finish(f"{name} failed")
            return
        if isinstance(result, Deferred):
            self._wait(name, result)
        else:
            self._finish(result)

    def _wait(self, name: str, result: Deferred[str]) -> None:
        """Show a command's answer when it comes; keep what is typed meanwhile."""

        def failed(failure: Failure) -> str | None:
            if failure.check(TimeoutError):
                return f"{name}: no answer within {self.timeout:g}s"
            if failure.check(CancelledError):
                return None
            log.failure("Console command {command} failed", failure, command=name)
            return f"{name} failed: {failure.getErrorMessage()}"

        def answered(text: str | None) -> None:
            with self._lock:
                if self._pending is result:
                    self._pending = None
                    self._finish(text)

        self._pending = result
        result.addTimeout(self.timeout, self.clock)
        result.addErrback(failed).addCallback(answered)

    def _finish(self, text: str | None) -> None:
        if self.closed:
            return
        if text:
            self._emit(text if text.endswith("\n") else text + "\n")
        self._show_prompt()
        typeahead, self._typeahead = self._typeahead, ""
        self._type(typeahead)

    def _help(self, arguments: list[str]) -> str:
        return HELP

    def _clear(self, arguments: list[str]) -> str:
        if arguments:
            return "usage: clear"
        self._emit(CLEAR_SCREEN)
        return ""

    def _exit(self, arguments: list[str]) -> str:
        if arguments:
            return "usage: exit"
        self._emit("shutting down\n")
        self.commands.shutdown()
        self.closed = True
        return ""

    def _stats(self, arguments: list[str]) -> str | Deferred[str]:
        if arguments:
            return "usage: stats"
        return self.commands.stats().addCallback(format_stats)

    def _verbose(self, arguments: list[str]) -> str | Deferred[str]:
        if len(arguments) != 1 or arguments[0].lower() not in ("on", "off"):
            return "usage: verbose on|off"
        on = arguments[0].lower() == "on"
        state = "on" if on else "off"
        return self.commands.set_verbose(on).addCallback(lambda _: f"verbose logging {state}")


class PromptSafeStream(io.TextIOBase, TextIO):
    """
    A text stream to put in place of C{sys.stdout} before twistd makes its log
    observer: while a console is attached, writes go above the prompt, and
    otherwise (no terminal, daemonized, console stopped) straight through.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._console: Console | None = None
        self._discarding = False

    def attach_console(self, console: Console) -> None:
        self._console = console

    def release_console(self, console: Console) -> None:
        if self._console is console:
            self._console = None

    def discard(self) -> None:
        """
        The terminal has hung up: drop what is written from now on.  Every
        write would fail with C{EIO}, each log line would raise in its
        observer, and output left in the buffer would fail again at exit.
        """
        self._discarding = True

    def write(self, text: str) -> int:
        console = self._console
        if self._discarding:
            return len(text)
        if console is None:
            return self.stream.write(text)
        console.write_above(text)
        return len(text)

    def flush(self) -> None:
        if not (self._discarding or getattr(self.stream, "closed", False)):
            self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]  # read-only, as on sys.stdout
        return getattr(self.stream, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.stream, "errors", None)

    # typing.TextIO (a base, for type checkers) has placeholders for these.
    @property
    def buffer(self) -> Any:
        return self.stream.buffer

    @property
    def line_buffering(self) -> int:
        return self.stream.line_buffering

    @property
    def name(self) -> Any:
        return self.stream.name

    @property
    def mode(self) -> str:
        return self.stream.mode

    def __getattr__(self, name: str) -> Any:
        # reconfigure and the like: whatever else this stdout has.
        if name == "stream" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.stream, name)


def prompt_safe_stdout() -> PromptSafeStream:
    """
    Put a L{PromptSafeStream} in place of C{sys.stdout} (once) and return it.
    Call it in C{makeService}, before twistd creates its log observer on
    C{sys.stdout}, and hand the result to L{console_service}.
    """
    stdout = sys.stdout
    if not isinstance(stdout, PromptSafeStream):
        sys.stdout = stdout = PromptSafeStream(stdout)
    return stdout


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


def _terminal_present(fd: int) -> bool:
    """
    Whether C{fd}'s terminal is still there.  Once it hangs up (its pty master
    closed, its ssh session or its window gone) the kernel turns every open
    descriptor of it into one whose reads give end-of-file and whose other
    operations fail with C{EIO}, and only then sends C{SIGHUP}: so a terminal
    whose mode can still be read has not hung up.
    """
    try:
        termios.tcgetattr(fd)
    except (OSError, termios.error):
        return False
    return True


def _stream_present(stream: TextIO) -> bool:
    """Whether C{stream} is a terminal that has not hung up (see L{_terminal_present})."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return False
    return _terminal_present(fd)


def _in_foreground(fd: int) -> bool:
    """A background job would be stopped by SIGTTIN/SIGTTOU for using its terminal."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        # Not our controlling terminal, so job control does not apply.
        return True


def _set_mode(fd: int, mode: list[Any]) -> None:
    """C{tcsetattr}, with SIGTTOU ignored so that a job sent to the background is not stopped."""
    try:
        previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    except ValueError:  # not the main thread
        termios.tcsetattr(fd, termios.TCSANOW, mode)
        return
    try:
        termios.tcsetattr(fd, termios.TCSANOW, mode)
    finally:
        signal.signal(signal.SIGTTOU, signal.SIG_DFL if previous is None else previous)


def _cbreak(mode: list[Any]) -> list[Any]:
    """Key by key and without echo, but with signals and output processing left alone."""
    cbreak = list(mode)
    cbreak[3] = mode[3] & ~(termios.ICANON | termios.ECHO)
    cbreak[6] = list(mode[6])
    cbreak[6][termios.VMIN] = 1
    cbreak[6][termios.VTIME] = 0
    return cbreak


def _open_for_reading(fd: int) -> int:
    """A descriptor of our own for the terminal, so O_NONBLOCK stays ours."""
    try:
        return os.open(os.ttyname(fd), os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        # Shares fd's flags, so stays blocking; it is read only when readable.
        return os.dup(fd)


@implementer(IReadDescriptor)
class _TerminalReader:
    def __init__(
        self, fd: int, received: Callable[[bytes], None], lost: Callable[[Failure], None]
    ) -> None:
        self.fd = fd
        self.received = received
        self.lost = lost

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "console"

    def doRead(self) -> Any:
        return fdesc.readFromFD(self.fd, self.received)

    def connectionLost(self, reason: Failure) -> None:
        self.lost(reason)


class ConsoleService(Service):
    """
    Attaches a L{Console} to the terminal on start, when standard input and
    output are one and this process is in its foreground; detaches and restores the
    terminal on stop, and at exit should stop never come.

    The gateway stops for a command from the operator (C{exit}, Ctrl-D) and
    when the terminal hangs up: a gateway started by hand in a terminal that
    is then closed (a tab, an ssh session that drops) must not live on
    without its operator, holding its port.  The hang-up shows as a read that
    gives end-of-file or C{EIO}, and as SIGHUP from the kernel or the shell, in
    either order; both stop the gateway gracefully, once.  A SIGHUP while the
    terminal is still there is someone's C{kill -HUP}, and goes on to the
    handler the console found (the key reload); without a console (a daemon,
    systemd) this service never touches SIGHUP.

    Sent to the background (Ctrl-Z, C{bg}), the gateway serves on: SIGTTIN
    is ignored, so reading the terminal fails instead of stopping the
    process, and the console takes the terminal back when C{fg} returns it.
    C{fg} sends SIGCONT only to a stopped job, so a background console also
    looks every half second.
    """

    name = "console"

    def __init__(
        self,
        commands: ConsoleCommands,
        reactor: Any = None,
        stdin_fd: int = 0,
        stdout: TextIO | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.commands = commands
        self.reactor = reactor
        self.stdin_fd = stdin_fd
        # Captured now: by startService, twistd has replaced sys.stdout.
        self.stdout = sys.stdout if stdout is None else stdout
        self.console: Console | None = None
        self._reader: _TerminalReader | None = None
        self._read_fd: int | None = None
        self._saved_mode: list[Any] | None = None
        self._cbreak_mode: list[Any] | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._foreground_check: Any = None
        self.hung_up = False
        self._hang_up_trigger: Any = None

    @property
    def attached(self) -> bool:
        return self.console is not None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if not os.isatty(self.stdin_fd):
            return
        if not _isatty(self.stdout):
            # Prompts and echo would go into the log, and the operator would type blind.
            log.info("No console: standard output is not a terminal")
            return
        if not _in_foreground(self.stdin_fd):
            log.info("No console: this process is not in its terminal's foreground")
            return
        try:
            self._attach()
        except Exception:
            self._detach()
            log.failure("No console: the terminal could not be set up")

    def stopService(self) -> Any:
        self._detach()
        return super().stopService()  # type: ignore[no-untyped-call]

    def _attach(self) -> None:
        fd = self.stdin_fd
        self._saved_mode = termios.tcgetattr(fd)
        atexit.register(self._restore_terminal)
        self._cbreak_mode = _cbreak(self._saved_mode)
        _set_mode(fd, self._cbreak_mode)
        self._read_fd = _open_for_reading(fd)
        stream = self.stdout
        out = stream.stream if isinstance(stream, PromptSafeStream) else stream
        console = self.console = Console(self.commands, out, self.reactor)
        if isinstance(stream, PromptSafeStream):
            stream.attach_console(console)
        self._handle(signal.SIGTTIN, signal.SIG_IGN)
        self._handle(signal.SIGCONT, self._continued)
        self._handle(signal.SIGHUP, self._hangup_signal)
        self._listen()
        console.start()

    def _listen(self) -> None:
        assert self.console is not None and self._read_fd is not None
        self._reader = _TerminalReader(self._read_fd, self.console.keys, self._terminal_lost)
        self.reactor.addReader(self._reader)

    def _handle(self, signum: int, handler: Any) -> None:
        try:
            self._previous_handlers[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread: no job control niceties
            pass

    def _detach(self) -> None:
        reader, self._reader = self._reader, None
        console, self.console = self.console, None
        self._cancel_foreground_check()
        try:
            if reader is not None:
                self.reactor.removeReader(reader)
            if console is not None:
                try:
                    console.stop()
                finally:
                    if isinstance(self.stdout, PromptSafeStream):
                        self.stdout.release_console(console)
        finally:
            read_fd, self._read_fd = self._read_fd, None
            if read_fd is not None:
                os.close(read_fd)
            while self._previous_handlers:
                signum, previous = self._previous_handlers.popitem()
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)
            self._restore_terminal()

    def _restore_terminal(self) -> None:
        saved, self._saved_mode = self._saved_mode, None
        if saved is None:
            return
        atexit.unregister(self._restore_terminal)
        try:
            _set_mode(self.stdin_fd, saved)
        except (OSError, termios.error):
            pass  # hung up: there is no terminal left to restore

    def _terminal_lost(self, reason: Failure) -> None:
        """
        A read gave end-of-file or failed: the terminal hung up, unless this
        is a background job's read, which fails with C{EIO} too.
        """
        # The reactor has already forgotten the reader.
        self._reader = None
        if self.console is None:
            return
        if _terminal_present(self.stdin_fd) and not _in_foreground(self.stdin_fd):
            self._resume()
            return
        self._hang_up()

    def _hangup_signal(self, signum: int, frame: Any) -> None:
        """SIGHUP: a hang-up if the terminal is gone, else a C{kill -HUP} for the key reload."""
        if not _terminal_present(self.stdin_fd):
            self.reactor.callFromThread(self._hang_up)
            return
        previous = self._previous_handlers.get(signal.SIGHUP)
        if callable(previous):
            previous(signum, frame)

    def _hang_up(self) -> None:
        """The terminal is gone: stop the gateway gracefully, as C{exit} would, once."""
        if self.console is None or self.hung_up:
            return  # detached already: stopping, or stopped
        self.hung_up = True
        self._detach()
        if isinstance(self.stdout, PromptSafeStream) and not _stream_present(self.stdout):
            self.stdout.discard()
        # The shell and the kernel may each send SIGHUP after the hang-up, and
        # the services that handle it restore the default (which kills) as
        # they stop: ignore it now and again once the services have stopped,
        # so that neither ends the drain.
        self._ignore_hang_ups()
        self._hang_up_trigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", self._ignore_hang_ups
        )
        log.info("The console's terminal hung up; shutting down")
        try:
            self.commands.shutdown()
        except ReactorNotRunning:
            pass  # a stop was already under way

    def _ignore_hang_ups(self) -> None:
        try:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass

    def _cancel_foreground_check(self) -> None:
        check, self._foreground_check = self._foreground_check, None
        if check is not None and check.active():
            check.cancel()

    def _continued(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._resume)

    def _resume(self) -> None:
        """
        Take the terminal back after Ctrl-Z and C{fg}, whose shell has reset
        the terminal mode; in the background, look again shortly.
        """
        self._cancel_foreground_check()
        if self.console is None or self._cbreak_mode is None:
            return
        if not _terminal_present(self.stdin_fd):
            self._hang_up()
            return
        if not _in_foreground(self.stdin_fd):
            self.console.hide()
            self._foreground_check = self.reactor.callLater(FOREGROUND_CHECK_INTERVAL, self._resume)
            return
        try:
            _set_mode(self.stdin_fd, self._cbreak_mode)
        except (OSError, termios.error):
            return
        if self._reader is None:
            self._listen()
        self.console.redraw()


def console_service(
    commands: ConsoleCommands,
    reactor: Any = None,
    stdin_fd: int = 0,
    stdout: TextIO | None = None,
) -> IService:
    """
    The operator's console as a service: it attaches to the terminal on
    C{startService} only if C{stdin_fd} is a terminal then.  Pass the
    L{prompt_safe_stdout} stream as C{stdout} so that log lines keep clear of
    the prompt.
    """
    return ConsoleService(commands, reactor, stdin_fd, stdout)
