"""
Tests for L{llmgw.keys}: key files, C{Authorization} parsing, the client key
check, and reloading, including a reload that must keep the old keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from llmgw.keys import KeyRing, bearer_token

UPSTREAM = b"sk-upstream-Secret-0123"
CLIENT_A = b"sk-client-Alpha-4567"
CLIENT_B = b"sk-client-Bravo-89ab"


class BearerTokenTests(SynchronousTestCase):
    def test_cases(self) -> None:
        cases: list[tuple[bytes | None, bytes | None]] = [
            (None, None),
            (b"", None),
            (b"Bearer", None),
            (b"Bearer ", None),
            (b"Bearer    ", None),
            (b"Bearer sk-x", b"sk-x"),
            (b"bearer sk-x", b"sk-x"),
            (b"BEARER sk-x", b"sk-x"),
            (b"  Bearer sk-x  ", b"sk-x"),
            (b"Bearer   sk-x", b"sk-x"),
            (b"Basic dXNlcjpwYXNz", None),
            (b"Token sk-x", None),
            (b"Bearersk-x", None),
            (b"sk-x", None),
            (b"Bearer sk-x=", b"sk-x="),
        ]
        for header, token in cases:
            self.assertEqual(bearer_token(header), token, header)


@implementer(ILogObserver)
class EventList(list[LogEvent]):
    """An observer that keeps every event it sees."""

    def __call__(self, event: LogEvent) -> None:
        self.append(event)


def capture_events(case: SynchronousTestCase) -> list[LogEvent]:
    events = EventList()
    globalLogPublisher.addObserver(events)
    case.addCleanup(globalLogPublisher.removeObserver, events)
    return events


def event_text(events: list[LogEvent]) -> str:
    """Everything the events say, formatted and raw, for secret scanning."""
    return "\n".join(f"{formatEvent(event)!s} {event!r}" for event in events)


class KeyRingTests(SynchronousTestCase):
    def write(self, content: bytes, path: str | None = None) -> str:
        target = Path(self.mktemp() if path is None else path)
        target.write_bytes(content)
        return str(target)

    def ring(self, aikey: bytes | None, clients: bytes | None) -> tuple[KeyRing, str, str]:
        aikey_file = self.write(aikey) if aikey is not None else None
        clients_file = self.write(clients) if clients is not None else None
        keys = KeyRing(aikey_file, clients_file)
        return keys, aikey_file or "", clients_file or ""

    def test_no_files(self) -> None:
        keys = KeyRing(None, None)
        self.assertIsNone(keys.upstream_authorization)
        self.assertFalse(keys.requires_client_key)
        self.assertFalse(keys.accepts(CLIENT_A))
        self.assertFalse(keys.accepts(None))

    def test_upstream_authorization(self) -> None:
        keys, _, _ = self.ring(b"# upstream key\n" + UPSTREAM + b"\n", None)
        self.assertEqual(keys.upstream_authorization, b"Bearer " + UPSTREAM)
        self.assertFalse(keys.requires_client_key)

    def test_accepts(self) -> None:
        keys, _, _ = self.ring(None, CLIENT_A + b"\n# retired\n" + CLIENT_B + b"\n")
        self.assertTrue(keys.requires_client_key)
        self.assertTrue(keys.accepts(CLIENT_A))
        self.assertTrue(keys.accepts(CLIENT_B))
        self.assertFalse(keys.accepts(b"sk-client-Charlie"))
        self.assertFalse(keys.accepts(CLIENT_A[:-1]))
        self.assertFalse(keys.accepts(CLIENT_A + b"x"))
        self.assertFalse(keys.accepts(CLIENT_A.upper()))
        self.assertFalse(keys.accepts(b""))
        self.assertFalse(keys.accepts(None))

    def test_accepts_token_from_header(self) -> None:
        keys, _, _ = self.ring(None, CLIENT_A + b"\n")
        self.assertTrue(keys.accepts(bearer_token(b"Bearer " + CLIENT_A)))
        self.assertFalse(keys.accepts(bearer_token(b"Basic " + CLIENT_A)))

    def test_upstream_key_is_not_a_client_key(self) -> None:
        keys, _, _ = self.ring(UPSTREAM, CLIENT_A)
        self.assertFalse(keys.accepts(UPSTREAM))
        self.assertTrue(keys.accepts(CLIENT_A))

    def test_commented_key_not_accepted(self) -> None:
        keys, _, _ = self.ring(None, CLIENT_A + b"\n#" + CLIENT_B + b"\n")
        self.assertFalse(keys.accepts(CLIENT_B))
        self.assertFalse(keys.accepts(b"#" + CLIENT_B))

    def test_keys_not_kept_in_clear(self) -> None:
        keys, _, _ = self.ring(None, CLIENT_A + b"\n")
        state: dict[str, Any] = vars(keys)
        for value in state.values():
            self.assertNotIn(CLIENT_A, repr(value).encode())

    def test_missing_file_at_start(self) -> None:
        self.assertRaises(OSError, KeyRing, None, self.mktemp())
        self.assertRaises(OSError, KeyRing, self.mktemp(), None)

    def test_empty_upstream_file_at_start(self) -> None:
        self.assertRaises(ValueError, KeyRing, self.write(b"# none\n"), None)

    def test_reload_picks_up_changes(self) -> None:
        events = capture_events(self)
        keys, aikey_file, clients_file = self.ring(UPSTREAM, CLIENT_A)
        self.write(b"sk-upstream-rotated\n", aikey_file)
        self.write(CLIENT_B + b"\nsk-client-Charlie\n", clients_file)
        keys.reload()
        self.assertEqual(keys.upstream_authorization, b"Bearer sk-upstream-rotated")
        self.assertFalse(keys.accepts(CLIENT_A))
        self.assertTrue(keys.accepts(CLIENT_B))
        self.assertTrue(keys.accepts(b"sk-client-Charlie"))
        reloaded = [e for e in events if e.get("log_namespace") == "llmgw.keys"]
        self.assertEqual(len(reloaded), 1)
        self.assertEqual(reloaded[0]["count"], 2)
        self.assertEqual(formatEvent(reloaded[0]), "Reloaded keys (2 client keys)")

    def check_old_keys_kept(self, keys: KeyRing) -> None:
        self.assertEqual(keys.upstream_authorization, b"Bearer " + UPSTREAM)
        self.assertTrue(keys.accepts(CLIENT_A))
        self.assertFalse(keys.accepts(CLIENT_B))

    def test_reload_keeps_old_keys_when_clients_file_gone(self) -> None:
        events = capture_events(self)
        keys, aikey_file, clients_file = self.ring(UPSTREAM, CLIENT_A)
        self.write(b"sk-upstream-rotated\n", aikey_file)
        os.remove(clients_file)
        keys.reload()
        self.check_old_keys_kept(keys)
        failed = [e for e in events if e.get("log_namespace") == "llmgw.keys"]
        self.assertEqual(len(failed), 1)
        self.assertIn("Keeping the old keys", formatEvent(failed[0]))
        self.assertIn(clients_file, formatEvent(failed[0]))

    def test_reload_keeps_old_keys_when_clients_file_is_a_directory(self) -> None:
        keys, _, clients_file = self.ring(UPSTREAM, CLIENT_A)
        os.remove(clients_file)
        os.mkdir(clients_file)
        keys.reload()
        self.check_old_keys_kept(keys)

    def test_reload_keeps_old_keys_when_upstream_file_gone(self) -> None:
        keys, aikey_file, clients_file = self.ring(UPSTREAM, CLIENT_A)
        self.write(CLIENT_B + b"\n", clients_file)
        os.remove(aikey_file)
        keys.reload()
        self.check_old_keys_kept(keys)

    def test_reload_keeps_old_keys_when_upstream_file_empty(self) -> None:
        events = capture_events(self)
        keys, aikey_file, clients_file = self.ring(UPSTREAM, CLIENT_A)
        self.write(CLIENT_B + b"\n", clients_file)
        self.write(b"", aikey_file)
        keys.reload()
        self.check_old_keys_kept(keys)
        failed = [e for e in events if e.get("log_namespace") == "llmgw.keys"]
        self.assertEqual(len(failed), 1)
        self.assertIn("holds no key", formatEvent(failed[0]))

    def test_reload_logs_no_key(self) -> None:
        events = capture_events(self)
        keys, aikey_file, clients_file = self.ring(UPSTREAM, CLIENT_A)
        keys.reload()
        self.write(b"sk-upstream-rotated\n", aikey_file)
        self.write(CLIENT_B + b"\n", clients_file)
        keys.reload()
        os.remove(clients_file)
        keys.reload()
        self.assertEqual(len([e for e in events if e.get("log_namespace") == "llmgw.keys"]), 3)
        text = event_text(events)
        for secret in (UPSTREAM, CLIENT_A, CLIENT_B, b"sk-upstream-rotated"):
            self.assertNotIn(secret.decode(), text)

    def test_client_identity(self) -> None:
        keys, _, _ = self.ring(None, CLIENT_A + b"\n" + CLIENT_B + b"\n")
        identity = keys.client_identity(CLIENT_A)
        self.assertEqual(identity, keys.client_identity(CLIENT_A))
        self.assertNotEqual(identity, keys.client_identity(CLIENT_B))
        self.assertTrue(identity.startswith("key:"))
        self.assertEqual(len(identity), len("key:") + 32)
        int(identity[len("key:") :], 16)
        for key in (CLIENT_A, CLIENT_B, b"sk-client-Charlie"):
            identity = keys.client_identity(key)
            self.assertNotIn(key.decode(), identity)
            self.assertNotIn(key.decode()[3:], identity)
            self.assertNotIn(key.hex(), identity)

    def test_client_identity_same_across_rings(self) -> None:
        """Workers with their own rings must count one key as one client."""
        first, _, _ = self.ring(None, CLIENT_A)
        second, _, _ = self.ring(None, CLIENT_A)
        self.assertEqual(first.client_identity(CLIENT_A), second.client_identity(CLIENT_A))


class EmptiedClientKeysTests(SynchronousTestCase):
    def test_reload_keeps_old_keys_when_clients_file_emptied(self) -> None:
        clients = Path(self.mktemp())
        clients.write_bytes(CLIENT_A + b"\n")
        keys = KeyRing(None, str(clients))
        clients.write_bytes(b"")
        keys.reload()
        self.assertTrue(keys.accepts(CLIENT_A))
