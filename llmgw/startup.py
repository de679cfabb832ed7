"""Start-up that cannot go on: one line that names the flag to fix, and exit status 1.

Shared by the gateway (L{llmgw.service}) and the stand-in model server
(L{llmgw.mock}), which refuse a port they cannot bind the same way; it sits
below both, so that neither reaches into the other.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import NoReturn, TextIO

from twisted.internet.error import CannotListenError
from twisted.logger import Logger

log = Logger()


class StartupFailure(SystemExit, Exception):
    """
    Start-up cannot go on, for a reason the operator fixes with a flag.

    A L{SystemExit} with status 1, so that neither twistd nor Python prints a
    traceback on the way out; an L{Exception} too, so that a daemonizing
    twistd still reports it, message and all, to the command that started it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 1


def refuse_to_start(message: str) -> NoReturn:
    """
    Tell the operator why, in one line on the real standard error (twistd has
    turned C{sys.stderr} into log events by now), and end start-up.  A daemon's
    standard error is C{/dev/null}: its log file gets the line instead, and
    twistd passes the message on to the command that started it.
    """
    stderr = sys.__stderr__
    if stderr is None or _is_dev_null(stderr):
        log.error("{line}", line=message)
    else:
        stderr.write(message + "\n")
        stderr.flush()
    raise StartupFailure(message)


def _is_dev_null(stream: TextIO) -> bool:
    try:
        return os.path.samestat(os.fstat(stream.fileno()), os.stat(os.devnull))
    except (OSError, ValueError):
        return True


def cannot_listen_message(
    error: CannotListenError, port_flag: str = "--bindport", ip_flag: str = "--bindip"
) -> str:
    """
    C{--bindport 42069: address already in use}: what went wrong, named by
    the flag that fixes it, the port's for a busy or privileged port and the
    address's for an address this host does not have.
    """
    code = getattr(error.socketError, "errno", None)
    text = socket_error_text(error)
    if code == errno.EADDRNOTAVAIL:
        return f"{ip_flag} {error.interface}: {text}"
    if code in (errno.EADDRINUSE, errno.EACCES):
        return f"{port_flag} {error.port}: {text}"
    return f"{ip_flag} {error.interface} {port_flag} {error.port}: {text}"


def socket_error_text(error: CannotListenError) -> str:
    """The socket error's own words, as the middle of a sentence (C{address already in use})."""
    reason = error.socketError
    code = getattr(reason, "errno", None)
    text = os.strerror(code) if isinstance(code, int) else str(reason)
    return text[:1].lower() + text[1:]
