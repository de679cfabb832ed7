"""
Tests for `llmgw.mock`, the stand-in model server.

Most tests drive the real twisted.web channel over a `StringTransport` with a `Clock`, which
shows exactly which bytes have gone out at which moment; `StubTreq` checks replies as a client
sees them; a few tests use real loopback sockets, with TLS from `llmgw.devtls`.
"""

# twisted.web, trial and treq are not fully annotated, even on Twisted 26.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import treq
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseFailed
from twisted.web.iweb import IResponse
from twisted.web.server import Site

from llmgw import devtls
from llmgw.mock import (
    DEFAULT_MODEL,
    GARBAGE,
    Behaviour,
    MockModel,
    MockOptions,
    MockService,
    error_body,
    make_resource,
    makeService,
    split_evenly,
)
from llmgw.startup import StartupFailure
from tests.test_service import TWISTD, run_to_exit

NOW = 1_700_000_000
TEXT = "The quick brown fox jumps over the lazy dog"
FIRST_ID = "chatcmpl-" + "0" * 31 + "1"


def chat(text: str = TEXT, **fields: object) -> dict[str, Any]:
    """A request body with a system prompt, an earlier exchange, and the user's last words."""
    return {
        "model": "my-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "an earlier question"},
            {"role": "assistant", "content": "an earlier answer"},
            {"role": "user", "content": text},
        ],
        **fields,
    }


def usage_of(text: str = TEXT) -> dict[str, int]:
    prompt = len(f"Be brief. an earlier question an earlier answer {text}".split())
    completion = len(text.split())
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }


def chunk(choices: list[dict[str, Any]], **extra: object) -> dict[str, Any]:
    return {
        "id": FIRST_ID,
        "object": "chat.completion.chunk",
        "created": NOW,
        "model": "my-model",
        "choices": choices,
        **extra,
    }


def delta(content: str, role: bool = False) -> dict[str, Any]:
    d = {"role": "assistant", "content": content} if role else {"content": content}
    return chunk([{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}])


FINISH = chunk(
    [
        {
            "index": 0,
            "delta": {"content": ""},
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }
    ]
)


def events(body: bytes) -> list[Any]:
    """The SSE ``data:`` payloads, JSON-decoded, with ``[DONE]`` kept as the string."""
    assert body.endswith(b"\n\n") or body == b"", body
    out: list[Any] = []
    for block in body.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: "), block
        data = block[len(b"data: ") :]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def whole_stream(text: str = TEXT, chunks: int = 8, usage: bool = False) -> list[Any]:
    expected = [delta("", role=True)]
    expected += [delta(piece) for piece in split_evenly(text, chunks)]
    expected.append(FINISH)
    if usage:
        expected.append(chunk([], usage=usage_of(text)))
    return [*expected, "[DONE]"]


def completion_reply(text: str = TEXT) -> dict[str, Any]:
    return {
        "id": FIRST_ID,
        "object": "chat.completion",
        "created": NOW,
        "model": "my-model",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning_content": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {**usage_of(text), "prompt_tokens_details": None},
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


class RecordingTransport(StringTransport):
    """Tells an abort from a clean close."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Connection:
    """
    One client connection to the mock's real HTTP channel, held in memory.

    The model gets its own `Clock`; the `Site` gets another and no idle timeout, so that the
    model's clock shows only the generation's own timers.
    """

    def __init__(self, model: MockModel) -> None:
        site = Site(make_resource(model), timeout=None, reactor=Clock())
        self.protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = RecordingTransport()
        self.protocol.makeConnection(self.transport)

    def post(self, body: object, path: bytes = b"/v1/chat/completions") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        head = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n" % (path, len(data))
        self.protocol.dataReceived(head + b"Content-Type: application/json\r\n\r\n" + data)

    def disconnect(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def response(self) -> tuple[bytes, dict[bytes, bytes], bytes, bool]:
        """Status line, headers, body so far (de-chunked), and whether the body is complete."""
        raw = self.transport.value()
        head, separator, rest = raw.partition(b"\r\n\r\n")
        assert separator, raw
        status, *lines = head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b": ")
            headers[name.lower()] = value
        if headers.get(b"transfer-encoding") != b"chunked":
            complete = len(rest) == int(headers[b"content-length"])
            return status, headers, rest, complete
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                return status, headers, body, rest == b"\r\n"
            body += rest[:size]
            assert rest[size : size + 2] == b"\r\n"
            rest = rest[size + 2 :]
        return status, headers, body, False


class Harness:
    def __init__(self, defaults: Behaviour | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.model = MockModel(self.clock, defaults or Behaviour())

    def connect(self) -> Connection:
        return Connection(self.model)

    def counters(self) -> dict[str, int]:
        return self.model.stats()


def counters(
    started: int = 0, completed: int = 0, cancelled: int = 0, aborted: int = 0
) -> dict[str, int]:
    active = started - completed - cancelled - aborted
    return {
        "started": started,
        "completed": completed,
        "cancelled": cancelled,
        "aborted": aborted,
        "active": active,
    }


class StubClientTests(unittest.TestCase):
    """Whole replies, as a treq client sees them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.model = MockModel(self.clock, Behaviour(interval=0.25))
        self.stub: Any = StubTreq(make_resource(self.model))  # its methods are set per instance

    def request(self, method: str, path: str, body: object = None) -> IResponse:
        url = "http://mock.invalid" + path
        if body is None:
            d = self.stub.request(method, url)
        else:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            d = self.stub.request(method, url, data=data)
        self.stub.flush()
        response: IResponse = self.successResultOf(d)
        return response

    def content(self, response: IResponse) -> bytes:
        d = self.stub.content(response)
        while not d.called and self.clock.getDelayedCalls():
            self.clock.advance(0.25)
            self.stub.flush()
        body: bytes = self.successResultOf(d)
        return body

    def assertJsonReply(self, response: IResponse, status: int, expected: object) -> None:
        body = self.content(response)
        self.assertEqual(response.code, status)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(json.loads(body), expected)

    def test_completion_echoes_the_last_user_message(self) -> None:
        response = self.request("POST", "/v1/chat/completions", chat())
        self.assertJsonReply(response, 200, completion_reply())
        self.assertEqual(self.model.stats(), counters(started=1, completed=1))

    def test_text_parts_are_concatenated(self) -> None:
        parts = [
            {"type": "text", "text": "look "},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "at this"},
        ]
        body = {"model": "my-model", "messages": [{"role": "user", "content": parts}]}
        reply = json.loads(self.content(self.request("POST", "/v1/chat/completions", body)))
        self.assertEqual(reply["choices"][0]["message"]["content"], "look at this")
        self.assertEqual(
            reply["usage"],
            {
                "prompt_tokens": 3,
                "total_tokens": 6,
                "completion_tokens": 3,
                "prompt_tokens_details": None,
            },
        )

    def test_without_a_user_message_the_reply_is_empty(self) -> None:
        body = {"messages": [{"role": "system", "content": "hello"}]}
        reply = json.loads(self.content(self.request("POST", "/v1/chat/completions", body)))
        self.assertEqual(reply["choices"][0]["message"]["content"], "")
        self.assertEqual(reply["model"], DEFAULT_MODEL)

    def test_bad_requests_get_openai_shaped_400s(self) -> None:
        cases: list[tuple[bytes | dict[str, Any], str]] = [
            (b"{not json", "request body is not valid JSON: "),
            (b"\xff\xfe", "request body is not valid JSON: "),
            (b"[1, 2]", "request body must be a JSON object"),
            ({"model": "m"}, "messages must be a list of objects"),
            ({"messages": ["hi"]}, "messages must be a list of objects"),
            (chat(mock=[]), "mock must be an object, not []"),
            (chat(mock={"chunks": 0}), "mock.chunks must be an integer >= 1, not 0"),
            (chat(mock={"chunks": True}), "mock.chunks must be an integer >= 1, not True"),
            (chat(mock={"delay": -1}), "mock.delay must be a finite number of seconds >= 0"),
            (chat(mock={"interval": "1"}), "mock.interval must be a number of seconds, not '1'"),
            (chat(mock={"fault": "fire"}), "mock.fault must be one of none, hang, reset, garbage"),
            (chat(mock={"speed": 1}), "mock has unknown fields ['speed']"),
        ]
        for body, message in cases:
            response = self.request("POST", "/v1/chat/completions", body)
            reply = json.loads(self.content(response))
            self.assertEqual(response.code, 400, body)
            self.assertTrue(reply["error"]["message"].startswith(message), (body, reply))
            self.assertEqual(
                reply,
                {
                    "error": {
                        **reply["error"],
                        "type": "BadRequestError",
                        "param": None,
                        "code": 400,
                    }
                },
            )
        self.assertEqual(self.model.stats(), counters())

    def test_error_body_shape(self) -> None:
        self.assertEqual(
            json.loads(error_body(500, "it broke")),
            {
                "error": {
                    "message": "it broke",
                    "type": "InternalServerError",
                    "param": None,
                    "code": 500,
                }
            },
        )

    def test_models(self) -> None:
        model = MockModel(self.clock, served_model="org/small")
        stub: Any = StubTreq(make_resource(model))
        response = self.successResultOf(stub.get("http://mock.invalid/v1/models"))
        body = json.loads(self.successResultOf(stub.content(response)))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual([m["id"] for m in body["data"]], ["org/small"])
        entry = body["data"][0]
        self.assertEqual(body["object"], "list")
        self.assertEqual(
            {k: entry[k] for k in ("object", "created", "owned_by", "root", "parent")},
            {
                "object": "model",
                "created": NOW,
                "owned_by": "vllm",
                "root": "org/small",
                "parent": None,
            },
        )

    def test_default_model_name(self) -> None:
        body = json.loads(self.content(self.request("GET", "/v1/models")))
        self.assertEqual(body["data"][0]["id"], "TheBloke/Mistral-7B-Instruct-v0.2-AWQ")

    def test_stats(self) -> None:
        self.content(self.request("POST", "/v1/chat/completions", chat()))
        hanging = self.stub.post(
            "http://mock.invalid/v1/chat/completions",
            json.dumps(chat(mock={"fault": "hang"})).encode(),
        )
        self.assertNoResult(hanging)
        response = self.request("GET", "/mock/stats")
        self.assertJsonReply(response, 200, counters(started=2, completed=1))

    def test_unknown_paths_and_methods(self) -> None:
        response = self.request("GET", "/v2/whatever")
        self.assertJsonReply(
            response,
            404,
            {
                "error": {
                    "message": "no such path: /v2/whatever",
                    "type": "NotFoundError",
                    "param": None,
                    "code": 404,
                }
            },
        )
        response = self.request("GET", "/v1/chat/completions")
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"HEAD, POST"])
        self.assertJsonReply(
            response,
            405,
            {
                "error": {
                    "message": "GET is not allowed here",
                    "type": "MethodNotAllowedError",
                    "param": None,
                    "code": 405,
                }
            },
        )

    def test_stream(self) -> None:
        response = self.request("POST", "/v1/chat/completions", chat(stream=True))
        body = self.content(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"]
        )
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-cache"])
        self.assertEqual(events(body), whole_stream())
        self.assertEqual(self.model.stats(), counters(started=1, completed=1))

    def test_stream_with_usage(self) -> None:
        body = chat(stream=True, stream_options={"include_usage": True})
        self.assertEqual(
            events(self.content(self.request("POST", "/v1/chat/completions", body))),
            whole_stream(usage=True),
        )

    def test_stream_usage_needs_true(self) -> None:
        body = chat(stream=True, stream_options={"include_usage": 1})
        self.assertEqual(
            events(self.content(self.request("POST", "/v1/chat/completions", body))), whole_stream()
        )

    def test_chunks_override(self) -> None:
        body = chat(stream=True, mock={"chunks": 3})
        self.assertEqual(
            events(self.content(self.request("POST", "/v1/chat/completions", body))),
            whole_stream(chunks=3),
        )

    def test_garbage(self) -> None:
        for stream in (False, True):
            body = chat(stream=stream, mock={"fault": "garbage"})
            response = self.request("POST", "/v1/chat/completions", body)
            self.assertEqual(self.content(response), GARBAGE)
            self.assertEqual(response.code, 200)
            self.assertEqual(
                response.headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"]
            )
        self.assertEqual(self.model.stats(), counters(started=2, completed=2))

    def test_500(self) -> None:
        for stream in (False, True):
            response = self.request(
                "POST", "/v1/chat/completions", chat(stream=stream, mock={"fault": "500"})
            )
            self.assertJsonReply(
                response,
                500,
                {
                    "error": {
                        "message": "mock fault: internal server error",
                        "type": "InternalServerError",
                        "param": None,
                        "code": 500,
                    }
                },
            )


class SplitTests(unittest.TestCase):
    def test_split_evenly(self) -> None:
        self.assertEqual(split_evenly("abcdefgh", 3), ["ab", "cde", "fgh"])
        self.assertEqual(split_evenly("ab", 4), ["", "a", "", "b"])
        self.assertEqual(split_evenly("", 2), ["", ""])
        self.assertEqual(split_evenly("abc", 1), ["abc"])


class PacingTests(unittest.TestCase):
    """What has gone out at each moment, byte for byte."""

    def start(
        self, body: dict[str, Any], defaults: Behaviour | None = None
    ) -> tuple[Harness, Connection]:
        harness = Harness(defaults)
        connection = harness.connect()
        connection.post(body)
        return harness, connection

    def sent(self, connection: Connection) -> tuple[list[Any], bool]:
        status, _, body, complete = connection.response()
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        return events(body), complete

    def test_chunks_are_paced(self) -> None:
        harness, connection = self.start(chat(stream=True, mock={"chunks": 3, "interval": 1.0}))
        expected = whole_stream(chunks=3)
        self.assertEqual(self.sent(connection), (expected[:1], False))
        harness.clock.advance(0)
        self.assertEqual(self.sent(connection), (expected[:1], False))
        harness.clock.advance(0.999)
        self.assertEqual(self.sent(connection), (expected[:1], False))
        harness.clock.advance(0.001)
        self.assertEqual(self.sent(connection), (expected[:2], False))
        harness.clock.advance(1)
        self.assertEqual(self.sent(connection), (expected[:3], False))
        harness.clock.advance(1)
        self.assertEqual(self.sent(connection), (expected, True))
        self.assertEqual(harness.clock.getDelayedCalls(), [])
        self.assertEqual(harness.counters(), counters(started=1, completed=1))

    def test_server_defaults_pace_the_stream(self) -> None:
        harness, connection = self.start(chat(stream=True), Behaviour(chunks=2, interval=5))
        harness.clock.advance(5)
        self.assertEqual(self.sent(connection), (whole_stream(chunks=2)[:2], False))
        harness.clock.advance(5)
        self.assertEqual(self.sent(connection), (whole_stream(chunks=2), True))

    def test_zero_interval_still_yields_between_chunks(self) -> None:
        harness, connection = self.start(chat(stream=True, mock={"chunks": 2, "interval": 0}))
        self.assertEqual(self.sent(connection), (whole_stream(chunks=2)[:1], False))
        harness.clock.advance(0)
        harness.clock.advance(0)
        self.assertEqual(self.sent(connection), (whole_stream(chunks=2), True))

    def test_delay_holds_the_status_line(self) -> None:
        for fault in ("none", "slow-first-byte"):
            for stream in (False, True):
                body = chat(stream=stream, mock={"delay": 2, "interval": 0, "fault": fault})
                harness, connection = self.start(body)
                harness.clock.advance(1.999)
                self.assertEqual(connection.transport.value(), b"")
                harness.clock.advance(0.001)
                status, _, _, _ = connection.response()
                self.assertEqual(status, b"HTTP/1.1 200 OK")

    def test_delayed_completion_is_whole(self) -> None:
        harness, connection = self.start(chat(mock={"delay": 1}))
        harness.clock.advance(1)
        status, headers, body, complete = connection.response()
        self.assertEqual((status, complete), (b"HTTP/1.1 200 OK", True))
        self.assertEqual(headers[b"content-length"], b"%d" % (len(body),))
        self.assertEqual(json.loads(body), completion_reply())

    def test_hang(self) -> None:
        harness, connection = self.start(chat(stream=True, mock={"fault": "hang"}))
        harness.clock.advance(10_000)
        self.assertEqual(connection.transport.value(), b"")
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual(harness.counters(), counters(started=1))

    def test_reset_without_stream_sends_nothing(self) -> None:
        harness, connection = self.start(chat(mock={"fault": "reset", "delay": 1}))
        self.assertFalse(connection.transport.aborted)
        harness.clock.advance(1)
        self.assertTrue(connection.transport.aborted)
        self.assertEqual(connection.transport.value(), b"")
        connection.disconnect()
        self.assertEqual(harness.counters(), counters(started=1, aborted=1))

    def test_reset_stream_after_half_the_chunks(self) -> None:
        harness, connection = self.start(chat(stream=True, mock={"fault": "reset", "interval": 1}))
        harness.clock.pump([1] * 4)
        self.assertFalse(connection.transport.aborted)
        self.assertEqual(self.sent(connection), (whole_stream()[:5], False))
        harness.clock.advance(1)
        self.assertTrue(connection.transport.aborted)
        self.assertEqual(self.sent(connection), (whole_stream()[:5], False))
        self.assertEqual(harness.clock.getDelayedCalls(), [])
        connection.disconnect()
        self.assertEqual(harness.counters(), counters(started=1, aborted=1))


class CancellationTests(unittest.TestCase):
    """A client that goes away stops its generation, and is counted."""

    def test_mid_stream(self) -> None:
        harness = Harness()
        connection = harness.connect()
        connection.post(chat(stream=True, mock={"interval": 1}))
        harness.clock.pump([1] * 3)
        self.assertEqual(len(events(connection.response()[2])), 4)
        self.assertEqual(len(harness.clock.getDelayedCalls()), 1)
        connection.disconnect()
        self.assertEqual(harness.clock.getDelayedCalls(), [])
        self.assertEqual(harness.counters(), counters(started=1, cancelled=1))

    def test_mid_delay(self) -> None:
        for stream in (False, True):
            harness = Harness()
            connection = harness.connect()
            connection.post(chat(stream=stream, mock={"delay": 5}))
            harness.clock.advance(4)
            connection.disconnect()
            self.assertEqual(harness.clock.getDelayedCalls(), [])
            self.assertEqual(harness.counters(), counters(started=1, cancelled=1))

    def test_while_hanging(self) -> None:
        harness = Harness(Behaviour(fault="hang"))
        connection = harness.connect()
        connection.post(chat())
        connection.disconnect()
        self.assertEqual(harness.counters(), counters(started=1, cancelled=1))

    def test_after_completion_is_not_a_cancellation(self) -> None:
        harness = Harness()
        connection = harness.connect()
        connection.post(chat())
        self.assertTrue(connection.response()[3])
        connection.disconnect()
        self.assertEqual(harness.counters(), counters(started=1, completed=1))

    def test_only_the_departed_client_is_cancelled(self) -> None:
        harness = Harness(Behaviour(interval=1))
        staying, leaving = harness.connect(), harness.connect()
        staying.post(chat(stream=True))
        leaving.post(chat(stream=True))
        harness.clock.advance(1)
        leaving.disconnect()
        harness.clock.pump([1] * 7)
        self.assertEqual(events(staying.response()[2])[-1], "[DONE]")
        self.assertEqual(harness.counters(), counters(started=2, completed=1, cancelled=1))


class OptionsTests(unittest.TestCase):
    def parse(self, *argv: str) -> MockOptions:
        options = MockOptions()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        options = self.parse()
        self.assertEqual(
            {k: options[k] for k in ("bindip", "port", "cert", "key", "model", "portfile", "tls")},
            {
                "bindip": "127.0.0.1",
                "port": 8443,
                "cert": None,
                "key": None,
                "model": DEFAULT_MODEL,
                "portfile": None,
                "tls": None,
            },
        )
        self.assertEqual(
            options.behaviour(), Behaviour(delay=0.0, chunks=8, interval=0.05, fault="none")
        )

    def test_values(self) -> None:
        options = self.parse(
            "--bindip=::1",
            "--port=0",
            "--delay=1.5",
            "--chunks=3",
            "--interval=0",
            "--fault=reset",
            "--model=x/y",
            "--portfile=/tmp/p",
        )
        self.assertEqual(
            options.behaviour(), Behaviour(delay=1.5, chunks=3, interval=0.0, fault="reset")
        )
        self.assertEqual((options["bindip"], options["port"], options["model"]), ("::1", 0, "x/y"))
        self.assertEqual(options["portfile"], "/tmp/p")

    def test_bad_values(self) -> None:
        cases = [
            (["--port=65536"], "--port must be an integer from 0 to 65535, not '65536'"),
            (["--port=http"], "--port must be an integer from 0 to 65535, not 'http'"),
            (["--bindip=localhost"], "--bindip must be an IP address, not 'localhost'"),
            (["--delay=-1"], "--delay must be a finite number of seconds >= 0, not -1.0"),
            (["--delay=nan"], "--delay must be a finite number of seconds >= 0, not nan"),
            (["--interval=soon"], "--interval must be a number of seconds, not 'soon'"),
            (["--chunks=0"], "--chunks must be an integer >= 1, not 0"),
            (["--chunks=1.5"], "--chunks must be an integer >= 1, not '1.5'"),
            (
                ["--fault=fire"],
                "--fault must be one of none, hang, reset, garbage, 500, 503, 429, slow-first-byte",
            ),
            (["--cert=server.pem"], "--cert and --key go together"),
            (["--key=server.key"], "--cert and --key go together"),
        ]
        for argv, message in cases:
            error = self.assertRaises(usage.UsageError, self.parse, *argv)
            self.assertIn(message, str(error), argv)

    def test_unreadable_certificate(self) -> None:
        missing = self.mktemp()
        error = self.assertRaises(
            usage.UsageError, self.parse, f"--cert={missing}", f"--key={missing}"
        )
        self.assertEqual(str(error), f"cannot read {missing}: No such file or directory")

    def test_key_of_another_certificate(self) -> None:
        ca = devtls.make_ca()
        cert, _ = devtls.issue_server_certificate(ca)
        _, other_key = devtls.issue_server_certificate(ca)
        cert_path, key_path = Path(self.mktemp()), Path(self.mktemp())
        cert_path.write_bytes(cert)
        key_path.write_bytes(other_key)
        error = self.assertRaises(
            usage.UsageError, self.parse, f"--cert={cert_path}", f"--key={key_path}"
        )
        self.assertIn("are not a matching PEM certificate and key", str(error))
        cert_path.write_bytes(b"not a certificate")
        error = self.assertRaises(
            usage.UsageError, self.parse, f"--cert={cert_path}", f"--key={key_path}"
        )
        self.assertIn("are not a matching PEM certificate and key", str(error))


def loopback_client(testcase: unittest.TestCase, trust: bytes | None = None) -> HTTPClient:
    """A treq client with its own pool, closed at cleanup, trusting only ``trust`` for TLS."""
    pool = HTTPConnectionPool(reactor)
    testcase.addCleanup(pool.closeCachedConnections)
    if trust is None:
        return HTTPClient(Agent(reactor, pool=pool))
    policy = BrowserLikePolicyForHTTPS(trustRootFromCertificates([Certificate.loadPEM(trust)]))
    return HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))


def start(testcase: unittest.TestCase, *argv: str) -> MockService:
    """Parse ``argv`` as twistd would, then run the service on the real reactor until cleanup."""
    options = MockOptions()
    options.parseOptions(["--port=0", *argv])
    service = makeService(options, reactor=reactor)
    service.startService()
    testcase.addCleanup(service.stopService)
    return service


def port_of(service: MockService) -> int:
    assert service.port is not None
    port: int = service.port.getHost().port  # type: ignore[attr-defined]
    return port


class ServiceTests(unittest.TestCase):
    """The mock as ``twistd llmgw-mock`` runs it, on real loopback sockets."""

    def test_plugin_names(self) -> None:
        from llmgw import mock

        self.assertIs(mock.Options, MockOptions)
        self.assertIs(mock.makeService, makeService)

    async def _test_portfile(self) -> None:
        portfile = Path(self.mktemp())
        service = start(self, f"--portfile={portfile}", "--interval=0")
        self.assertEqual(portfile.read_text(), f"{port_of(service)}\n")
        self.assertNotEqual(port_of(service), 0)
        client = loopback_client(self)
        url = f"http://127.0.0.1:{port_of(service)}/v1/chat/completions"
        response = await client.post(url, data=json.dumps(chat(stream=True)).encode())
        body = await treq.content(response)
        self.assertEqual(events(body)[-1], "[DONE]")
        self.assertEqual(service.model.stats(), counters(started=1, completed=1))
        await service.stopService()
        self.assertFalse(portfile.exists())

    def test_portfile(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._test_portfile())

    def test_bind_failure_is_loud(self) -> None:
        """One line that names the flag, and a start-up that ends there."""
        first = start(self)
        options = MockOptions()
        options.parseOptions([f"--port={port_of(first)}"])
        second = makeService(options, reactor=reactor)
        stderr = Path(self.mktemp())
        stream = stderr.open("w")
        self.addCleanup(stream.close)
        self.patch(sys, "__stderr__", stream)
        failure = self.assertRaises(StartupFailure, second.startService)
        message = f"--port {port_of(first)}: address already in use"
        self.assertEqual((str(failure), stderr.read_text()), (message, message + "\n"))

    def test_bind_failure_stays_below_the_gateway_service(self) -> None:
        """
        The stand-in refuses to start the gateway's way without reaching up
        into L{llmgw.service}, which composes the gateway (layers point one way).
        """
        first = start(self)
        program = (
            "import sys\n"
            "from llmgw.mock import MockOptions, makeService\n"
            "options = MockOptions()\n"
            "options.parseOptions(sys.argv[1:])\n"
            "sys.__stderr__ = open('/dev/null', 'w')\n"
            "try:\n"
            "    makeService(options).startService()\n"
            "except SystemExit as e:\n"
            "    print(type(e).__name__, e, 'llmgw.service' in sys.modules)\n"
        )
        output = subprocess.run(
            [sys.executable, "-c", program, f"--port={port_of(first)}"],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        ).stdout
        self.assertEqual(
            output, f"StartupFailure --port {port_of(first)}: address already in use False\n"
        )

    async def _test_busy_port_under_twistd(self) -> None:
        first = start(self)
        out, err, code = await run_to_exit(
            "-c", TWISTD, "--nodaemon", "--pidfile=", "llmgw-mock", f"--port={port_of(first)}"
        )
        self.assertEqual(err, f"--port {port_of(first)}: address already in use\n", out)
        self.assertNotIn("Traceback", out)
        self.assertEqual(code, 1)

    def test_busy_port_under_twistd(self) -> defer.Deferred[None]:
        """``twistd -n llmgw-mock --port N`` with N in use: one line, no traceback, status 1."""
        return defer.Deferred.fromCoroutine(self._test_busy_port_under_twistd())

    async def _test_stop_closes_open_connections(self) -> None:
        service = start(self, "--interval=3600")
        client = loopback_client(self)
        url = f"http://127.0.0.1:{port_of(service)}/v1/chat/completions"
        response = await client.post(url, data=json.dumps(chat(stream=True)).encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(service.model.stats(), counters(started=1))
        await service.stopService()
        self.assertEqual(service.model.stats(), counters(started=1, cancelled=1))
        await self.assertFailure(treq.content(response), ResponseFailed)

    def test_stop_closes_open_connections(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._test_stop_closes_open_connections())

    async def _test_https(self) -> None:
        files = devtls.write_demo_files(self.mktemp())
        service = start(self, f"--cert={files.cert}", f"--key={files.key}", "--interval=0")
        client = loopback_client(self, trust=files.ca.read_bytes())
        for host in ("127.0.0.1", "localhost"):
            url = f"https://{host}:{port_of(service)}/v1/chat/completions"
            response = await client.post(url, data=json.dumps(chat(stream=True)).encode())
            received = events(await treq.content(response))
            self.assertEqual(response.code, 200)
            self.assertEqual(len(received), 11)
            text = "".join(e["choices"][0]["delta"]["content"] for e in received[:-1])
            self.assertEqual((text, received[-1]), (TEXT, "[DONE]"))
        self.assertEqual(service.model.stats(), counters(started=2, completed=2))

    def test_https(self) -> defer.Deferred[None]:
        """A real TLS round trip, verified against a CA from `llmgw.devtls`."""
        return defer.Deferred.fromCoroutine(self._test_https())

    async def _test_reset_over_a_socket(self) -> None:
        service = start(self, "--interval=0", "--fault=reset")
        client = loopback_client(self)
        url = f"http://127.0.0.1:{port_of(service)}/v1/chat/completions"
        response = await client.post(url, data=json.dumps(chat(stream=True)).encode())
        await self.assertFailure(treq.content(response), ResponseFailed)
        await self.assertFailure(client.post(url, data=json.dumps(chat()).encode()), ResponseFailed)
        self.assertEqual(service.model.stats(), counters(started=2, aborted=2))

    def test_reset_over_a_socket(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._test_reset_over_a_socket())

    def test_session_tickets_on(self) -> None:
        """
        Like vLLM's uvicorn, the stand-in issues TLS session tickets, so the
        gateway's session resumption is exercised against it (Twisted's
        default server options turn them off).
        """
        from OpenSSL import SSL

        from llmgw.mock import _load_tls

        ca = devtls.make_ca()
        cert, key = devtls.issue_server_certificate(ca)
        cert_path, key_path = Path(self.mktemp()), Path(self.mktemp())
        cert_path.write_bytes(cert)
        key_path.write_bytes(key)
        context = _load_tls(str(cert_path), str(key_path)).getContext()
        # set_options(0) changes nothing and returns the options in force.
        self.assertEqual(context.set_options(0) & SSL.OP_NO_TICKET, 0)
