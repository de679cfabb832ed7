"""The C{llmgw} command: the gateway in the foreground, like C{twistd -n llmgw}."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run C{twistd --nodaemon llmgw} with this command's arguments."""
    from twisted.scripts.twistd import run

    arguments = sys.argv[1:] if argv is None else argv
    sys.argv = ["llmgw", "--nodaemon", "--pidfile=", "llmgw", *arguments]
    run()


if __name__ == "__main__":
    main()
