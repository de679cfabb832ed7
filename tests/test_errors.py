"""
Tests for L{llmgw.errors}: each constructor's status, type and code, and the
exact OpenAI shape of the rendered body and server-sent event.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from llmgw import errors
from llmgw.errors import ApiError


def rendered(error: ApiError) -> object:
    return json.loads(error.body())


class ApiErrorTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        error = ApiError(400, "Bad.")
        self.assertEqual(
            (error.status, error.message, error.type, error.param, error.code, error.headers),
            (400, "Bad.", "invalid_request_error", None, None, ()),
        )

    def test_body_shape(self) -> None:
        error = ApiError(429, "Slow down.", "rate_limit_error", None, "rate_limit_exceeded")
        self.assertEqual(
            rendered(error),
            {
                "error": {
                    "message": "Slow down.",
                    "type": "rate_limit_error",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            },
        )

    def test_body_with_param(self) -> None:
        error = ApiError(400, "No.", param="messages[1].role")
        self.assertEqual(
            rendered(error),
            {
                "error": {
                    "message": "No.",
                    "type": "invalid_request_error",
                    "param": "messages[1].role",
                    "code": None,
                }
            },
        )

    def test_body_is_bytes_of_one_object(self) -> None:
        body = ApiError(400, "x").body()
        self.assertIsInstance(body, bytes)
        self.assertEqual(body[:1] + body[-1:], b"{}")

    def test_body_escapes_message(self) -> None:
        message = 'line one\nline "two" \\ é 🌍'
        error = ApiError(400, message)
        body = error.body()
        self.assertNotIn(b"\n", body)
        body.decode("ascii")
        self.assertEqual(json.loads(body)["error"]["message"], message)

    def test_headers_not_in_body(self) -> None:
        error = ApiError(400, "x", headers=((b"Retry-After", b"3"),))
        self.assertEqual(
            list(json.loads(error.body())["error"]), ["message", "type", "param", "code"]
        )
        self.assertNotIn(b"Retry-After", error.body())

    def test_is_an_exception(self) -> None:
        with self.assertRaises(ApiError) as caught:
            raise ApiError(418, "teapot")
        self.assertEqual(caught.exception.status, 418)


class ServerSentEventTests(SynchronousTestCase):
    def test_framing(self) -> None:
        error = errors.upstream_timeout(5, "send the next chunk")
        self.assertEqual(error.sse_event(), b"data: " + error.body() + b"\n\n")

    def test_exact_event(self) -> None:
        error = ApiError(502, "gone", "api_error", None, "upstream_unreachable")
        self.assertEqual(
            error.sse_event(),
            b'data: {"error": {"message": "gone", "type": "api_error", "param": null, '
            b'"code": "upstream_unreachable"}}\n\n',
        )

    def test_one_event_even_with_newlines_in_message(self) -> None:
        event = ApiError(502, "first\n\nsecond\r\n").sse_event()
        self.assertTrue(event.startswith(b"data: "))
        self.assertTrue(event.endswith(b"\n\n"))
        self.assertEqual(event.count(b"\n"), 2)
        self.assertNotIn(b"\r", event)
        self.assertEqual(
            json.loads(event[len(b"data: ") : -2])["error"]["message"], "first\n\nsecond\r\n"
        )


class ConstructorTests(SynchronousTestCase):
    """Each named constructor: status, type, param, code and extra headers."""

    def check(
        self,
        error: ApiError,
        status: int,
        type: str,
        code: str | None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        param: str | None = None,
    ) -> None:
        self.assertIsInstance(error, ApiError)
        self.assertEqual(
            (error.status, error.type, error.param, error.code, error.headers),
            (status, type, param, code, headers),
        )
        self.assertEqual(
            rendered(error),
            {"error": {"message": error.message, "type": type, "param": param, "code": code}},
        )
        self.assertTrue(error.message)

    def test_invalid(self) -> None:
        error = errors.invalid("Bad field.", "messages[0].role")
        self.check(error, 400, "invalid_request_error", None, param="messages[0].role")
        self.assertEqual(error.message, "Bad field.")

    def test_invalid_without_param(self) -> None:
        self.check(errors.invalid("Bad body."), 400, "invalid_request_error", None)

    def test_invalid_with_code(self) -> None:
        error = errors.invalid("No.", "x", "some_code")
        self.check(error, 400, "invalid_request_error", "some_code", param="x")

    def test_not_found(self) -> None:
        error = errors.not_found("/v2/nothing")
        self.check(error, 404, "invalid_request_error", "not_found")
        self.assertIn("'/v2/nothing'", error.message)

    def test_method_not_allowed(self) -> None:
        error = errors.method_not_allowed("GET", (b"POST",))
        self.check(
            error, 405, "invalid_request_error", "method_not_allowed", ((b"Allow", b"POST"),)
        )
        self.assertIn("GET", error.message)
        self.assertIn("POST", error.message)

    def test_method_not_allowed_several(self) -> None:
        error = errors.method_not_allowed("DELETE", (b"GET", b"HEAD"))
        self.check(
            error,
            405,
            "invalid_request_error",
            "method_not_allowed",
            ((b"Allow", b"GET, HEAD"),),
        )
        self.assertIn("DELETE", error.message)

    def test_unsupported_media_type(self) -> None:
        error = errors.unsupported_media_type()
        self.check(error, 415, "invalid_request_error", "unsupported_media_type")
        self.assertIn("application/json", error.message)

    def test_body_too_large(self) -> None:
        error = errors.body_too_large(4096)
        # No headers of its own: raw_response, which sends every 413, closes the connection.
        self.check(error, 413, "invalid_request_error", "request_too_large")
        self.assertIn("4096", error.message)

    def test_upstream_unreachable(self) -> None:
        error = errors.upstream_unreachable("connection refused")
        self.check(error, 502, "api_error", "upstream_unreachable")
        self.assertIn("connection refused", error.message)

    def test_upstream_bad_reply(self) -> None:
        error = errors.upstream_bad_reply("not JSON")
        self.check(error, 502, "api_error", "upstream_bad_response")
        self.assertIn("not JSON", error.message)

    def test_upstream_timeout(self) -> None:
        error = errors.upstream_timeout(600.0)
        self.check(error, 504, "api_error", "upstream_timeout")
        self.assertEqual(error.message, "The model server did not reply within 600 seconds.")

    def test_upstream_timeout_fraction_and_what(self) -> None:
        error = errors.upstream_timeout(0.5, "send the next chunk")
        self.check(error, 504, "api_error", "upstream_timeout")
        self.assertEqual(
            error.message, "The model server did not send the next chunk within 0.5 seconds."
        )
