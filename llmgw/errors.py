"""The one error type, and the one place that turns it into OpenAI's error shape.

Every failure anywhere in the gateway, from a bad body to an unreachable model
server, ends as an L{ApiError}, so that clients (mostly OpenAI SDKs) always get
C{{"error": {"message", "type", "param", "code"}}} with the right status and
never a traceback.
"""

from __future__ import annotations

import json

import attrs

INVALID_REQUEST = "invalid_request_error"
API_ERROR = "api_error"


@attrs.define(auto_exc=True)
class ApiError(Exception):
    """
    A failure to report to the client.

    Not frozen, although nothing changes one: Python and Twisted set
    C{__traceback__} on exceptions, which a frozen attrs class on Debian 12's
    attrs 22.2 refuses.

    @ivar headers: extra response headers the error needs, such as C{Allow}
        on a 405 or C{Retry-After} on a 429.
    """

    status: int
    message: str
    type: str = INVALID_REQUEST
    param: str | None = None
    code: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def body(self) -> bytes:
        """The OpenAI error document, as bytes ready to send."""
        return json.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        ).encode()

    def sse_event(self) -> bytes:
        """The error as a final server-sent event, for a stream already under way."""
        return b"data: " + self.body() + b"\n\n"


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 for a request body that breaks a rule."""
    return ApiError(400, message, INVALID_REQUEST, param, code)


def not_found(path: str) -> ApiError:
    return ApiError(
        404,
        f"Unknown path {path!r}. This gateway serves POST /v1/chat/completions, "
        "GET /v1/models, GET /healthz and GET /readyz.",
        INVALID_REQUEST,
        None,
        "not_found",
    )


def method_not_allowed(method: str, allowed: tuple[bytes, ...]) -> ApiError:
    allow = b", ".join(allowed)
    return ApiError(
        405,
        f"Method {method} is not allowed here; use {allow.decode()}.",
        INVALID_REQUEST,
        None,
        "method_not_allowed",
        ((b"Allow", allow),),
    )


def unsupported_media_type() -> ApiError:
    return ApiError(
        415,
        "Content-Type must be application/json; send the body as JSON.",
        INVALID_REQUEST,
        None,
        "unsupported_media_type",
    )


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than this gateway accepts ({limit} bytes). "
        "Send a shorter conversation, or ask the operator to raise --max-body.",
        INVALID_REQUEST,
        None,
        "request_too_large",
    )


def upstream_unreachable(detail: str) -> ApiError:
    return ApiError(
        502,
        f"The model server could not be reached: {detail}",
        API_ERROR,
        None,
        "upstream_unreachable",
    )


def upstream_bad_reply(detail: str) -> ApiError:
    return ApiError(
        502,
        f"The model server sent a reply the gateway cannot use: {detail}",
        API_ERROR,
        None,
        "upstream_bad_response",
    )


def upstream_timeout(seconds: float, what: str = "reply") -> ApiError:
    return ApiError(
        504,
        f"The model server did not {what} within {seconds:g} seconds.",
        API_ERROR,
        None,
        "upstream_timeout",
    )


def request_timeout(seconds: float) -> ApiError:
    return ApiError(
        408,
        f"The request did not arrive within {seconds:g} seconds.",
        INVALID_REQUEST,
        None,
        "request_timeout",
    )


def invalid_api_key() -> ApiError:
    return ApiError(
        401,
        "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
        INVALID_REQUEST,
        None,
        "invalid_api_key",
    )


def rate_limited(limit: int, window: int, retry_after: int) -> ApiError:
    return ApiError(
        429,
        f"Rate limit reached: {limit} requests per {window} seconds. "
        f"Retry after {retry_after} seconds.",
        "rate_limit_error",
        None,
        "rate_limit_exceeded",
        ((b"Retry-After", b"%d" % (retry_after,)),),
    )


def rate_store_unavailable(retry_after: int) -> ApiError:
    """
    A 503: the shared limiter cannot be reached and C{--rate-store-fallback
    closed} says to admit no one rather than count alone.
    """
    return ApiError(
        503,
        "The rate limiter cannot be reached, so no request is admitted for now. "
        f"Retry after {retry_after} seconds.",
        API_ERROR,
        None,
        "rate_limiter_unavailable",
        ((b"Retry-After", b"%d" % (retry_after,)),),
    )


def not_ready(detail: str) -> ApiError:
    return ApiError(503, f"Not ready: {detail}", API_ERROR, None, "upstream_unavailable")


def internal() -> ApiError:
    """A bug, not bad input; the traceback goes to the log, never to the client."""
    return ApiError(500, "The gateway failed unexpectedly; the error is logged.", API_ERROR)
