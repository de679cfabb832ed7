"""Tests for L{llmgw.record}: request ids, attempt ids, token counts, route labels."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llmgw.record import RequestIds, RequestRecord, attempt_request_id, route_label


class RequestIdsTests(SynchronousTestCase):
    def test_new_ids_are_unique_and_short(self) -> None:
        ids = RequestIds()
        made = [ids.new() for _ in range(1000)]
        self.assertEqual(len(set(made)), 1000)
        for made_id in made:
            self.assertRegex(made_id, r"\A[0-9a-f]{20}\Z")

    def test_each_process_its_own_prefix(self) -> None:
        self.assertNotEqual(RequestIds().new(), RequestIds().new())

    def test_counter_after_the_prefix(self) -> None:
        ids = RequestIds("abc")
        self.assertEqual([ids.new(), ids.new()], ["abc00000001", "abc00000002"])

    def test_trusted_id_kept(self) -> None:
        ids = RequestIds("p")
        for incoming in (b"a", b"A-z_0.9:x", b"9" * 128):
            self.assertEqual(ids.choose(incoming, trusted=True), incoming.decode())

    def test_untrusted_id_replaced(self) -> None:
        ids = RequestIds("p")
        self.assertEqual(ids.choose(b"abc", trusted=False), "p00000001")

    def test_malformed_id_replaced(self) -> None:
        ids = RequestIds("p")
        for incoming in (b"", b"9" * 129, b"a b", b"a\nb", b"a/b", b"caf\xc3\xa9", b"a\x00"):
            self.assertRegex(ids.choose(incoming, trusted=True), r"\Ap[0-9a-f]{8}\Z")

    def test_none_replaced(self) -> None:
        self.assertEqual(RequestIds("p").choose(None, trusted=True), "p00000001")


class AttemptIdTests(SynchronousTestCase):
    def test_first_is_the_request_id(self) -> None:
        self.assertEqual(attempt_request_id("abc", 1), "abc")

    def test_others_numbered(self) -> None:
        self.assertEqual([attempt_request_id("abc", n) for n in (2, 3)], ["abc-2", "abc-3"])


class TakeUsageTests(SynchronousTestCase):
    def record(self) -> RequestRecord:
        return RequestRecord("id", 0.0, "127.0.0.1", "POST", "/v1/chat/completions")

    def test_counts_taken(self) -> None:
        record = self.record()
        record.take_usage({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12})
        self.assertEqual((record.prompt_tokens, record.completion_tokens), (5, 7))

    def test_nonsense_ignored(self) -> None:
        record = self.record()
        nonsense: list[object] = [None, [], "5", {"prompt_tokens": "5", "completion_tokens": True}]
        for usage in nonsense:
            record.take_usage(usage)
        record.take_usage({"prompt_tokens": 1.5, "completion_tokens": None})
        self.assertEqual((record.prompt_tokens, record.completion_tokens), (None, None))


class RouteLabelTests(SynchronousTestCase):
    def test_known_and_other(self) -> None:
        self.assertEqual(route_label(b"/v1/models"), "/v1/models")
        self.assertEqual(route_label(b"/v1/engines"), "other")
        self.assertEqual(route_label(b"-"), "other")
