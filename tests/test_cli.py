"""
Tests for L{llmgw.cli}: the C{llmgw} console script, run as a real process.

Each test starts Python with the same two lines the console script wrapper
runs (import L{llmgw.cli.main}, exit with what it returns), so what is checked
is exactly what a user sees: the bytes on stdout and stderr, and the status.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
from twisted.trial.unittest import SynchronousTestCase

from llmgw.options import Options

ROOT = Path(__file__).resolve().parent.parent

CONSOLE_SCRIPT = "import sys; from llmgw.cli import main; sys.exit(main())"


@attrs.frozen
class Finished:
    """What a finished C{llmgw} process printed, and how it exited."""

    status: int
    stdout: str
    stderr: str


def run_llmgw(*argv: str, metadata: Path | None = None) -> Finished:
    """
    Run C{llmgw argv...} from this tree, 80 columns wide.

    @param metadata: a directory to search for package metadata before any
        other, so a test can decide which version is installed.
    """
    path = [str(ROOT)] if metadata is None else [str(metadata), str(ROOT)]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "COLUMNS": "80"}
    finished = subprocess.run(
        [sys.executable, "-c", CONSOLE_SCRIPT, *argv],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Finished(finished.returncode, finished.stdout, finished.stderr)


class HelpTests(SynchronousTestCase):
    def test_help(self) -> None:
        """C{llmgw --help} names the command as C{llmgw}, lists the options, and exits 0."""
        options = Options()
        expected = options.getSynopsis() + "\n" + options.getUsage(width=80) + "\n"
        finished = run_llmgw("--help")
        self.assertEqual(finished, Finished(0, expected, ""))
        self.assertEqual(finished.stdout.splitlines()[:2], ["Usage: llmgw [options]", "Options:"])


class VersionTests(SynchronousTestCase):
    def test_version_from_package_metadata(self) -> None:
        """C{llmgw --version} prints the version in llmgw's package metadata, and exits 0."""
        metadata = Path(self.mktemp())
        info = metadata / "llmgw-9.8.7.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llmgw\nVersion: 9.8.7\n")
        self.assertEqual(
            run_llmgw("--version", metadata=metadata), Finished(0, "llmgw 9.8.7\n", "")
        )

    def test_installed_version_is_pyproject_version(self) -> None:
        try:
            importlib.metadata.version("llmgw")
        except importlib.metadata.PackageNotFoundError:
            raise self.skipTest("llmgw is not installed, so it has no package metadata") from None
        if not (ROOT / "pyproject.toml").exists():
            raise self.skipTest("run from an installed copy of the tests, without the source tree")
        with (ROOT / "pyproject.toml").open("rb") as pyproject:
            version = tomllib.load(pyproject)["project"]["version"]
        self.assertEqual(run_llmgw("--version"), Finished(0, f"llmgw {version}\n", ""))


class UsageErrorTests(SynchronousTestCase):
    """A bad flag: one line naming it, a pointer to --help, status 1, nothing on stdout."""

    def check_refused(self, argv: list[str], message: str) -> None:
        self.assertEqual(
            run_llmgw(*argv),
            Finished(1, "", f"{message}\nRun llmgw --help for the list of options.\n"),
        )

    def test_bad_port(self) -> None:
        self.check_refused(
            ["--bindport", "70000"], "--bindport: 70000 is not a TCP port; use 1 to 65535"
        )

    def test_bad_field(self) -> None:
        # The refused --bindport after it keeps a gateway that took "foo" from
        # starting: the test then fails at once, and binds nothing.
        self.check_refused(
            ["--allow-field", "foo", "--bindport", "0"],
            "--allow-field: 'foo' is not a field that can be allowed; use chat_template, "
            "chat_template_kwargs or logits_processors",
        )

    def test_unknown_flag(self) -> None:
        self.check_refused(["--bind-port", "8080"], "option --bind-port not recognized")
