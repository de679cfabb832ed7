"""The C{llmgw} command: the gateway in the foreground, like C{twistd -n llmgw}."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """
    Run C{twistd --nodaemon llmgw} with this command's arguments.

    C{sys.argv[0]} becomes C{llmgw}: that is how L{llmgw.options.Options}
    knows to say C{Usage: llmgw [options]} rather than twistd's synopsis.
    """
    from twisted.scripts.twistd import run

    from llmgw.options import COMMAND

    arguments = sys.argv[1:] if argv is None else argv
    sys.argv = [COMMAND, "--nodaemon", "--pidfile=", COMMAND, *arguments]
    run()


if __name__ == "__main__":
    main()
