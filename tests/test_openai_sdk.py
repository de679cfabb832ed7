"""The official OpenAI Python SDK, driving the gateway over loopback.

The SDK is synchronous, so each call runs in a thread while the reactor serves
the gateway and the stand-in model in this process.  Skipped where the SDK is
not installed (Debian 12 does not package it).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from llmgw.mock import Behaviour
from llmgw.ratelimit import SlidingWindowLimiter
from tests.loopback import (
    Gateway,
    eventually,
    free_port,
    gateway_config,
    inline,
    start_gateway,
    start_upstream,
)
from tests.test_validation import ASSISTANT_REPLIES, sdk_message

try:
    import openai
except ImportError:  # pragma: no cover - depends on the stack
    openai = None  # type: ignore[assignment]


def sdk(test: TestCase, gateway: Gateway) -> Any:
    """An SDK client whose pooled connections are closed, and seen closed, after the test."""
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{gateway.port}/v1",
        api_key="unused",
        max_retries=0,
        timeout=30,
    )

    def close() -> Deferred[None]:
        client.close()
        return Deferred.fromCoroutine(eventually(lambda: not gateway.site.channels))

    test.addCleanup(close)
    return client


class OpenAISDKTests(TestCase):
    if openai is None:
        skip = "the openai SDK is not installed"

    @inline
    async def test_create(self) -> None:
        upstream = start_upstream(self)
        gateway = start_gateway(self, gateway_config(upstream))
        client = sdk(self, gateway)
        completion = await deferToThread(
            client.chat.completions.create,
            model="TheBloke/Mistral-7B-Instruct-v0.2-AWQ",
            messages=[{"role": "user", "content": "Hello SDK"}],
            temperature=0.5,
        )
        self.assertEqual(completion.choices[0].message.content, "Hello SDK")
        self.assertEqual(completion.choices[0].finish_reason, "stop")

    @inline
    async def test_stream(self) -> None:
        upstream = start_upstream(self, defaults=Behaviour(chunks=5, interval=0.01))
        gateway = start_gateway(self, gateway_config(upstream))
        client = sdk(self, gateway)

        def collect() -> list[Any]:
            stream = client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "streamed words arrive in order"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            return list(stream)

        chunks = await deferToThread(collect)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, "streamed words arrive in order")
        self.assertIsNotNone(chunks[-1].usage)

    @inline
    async def test_bad_request(self) -> None:
        upstream = start_upstream(self)
        gateway = start_gateway(self, gateway_config(upstream))
        client = sdk(self, gateway)
        failure = None
        try:
            await deferToThread(
                client.chat.completions.create,
                model="m",
                messages=[{"role": "user", "content": "hot"}],
                temperature=1.5,
            )
        except openai.BadRequestError as e:
            failure = e
        assert failure is not None, "no BadRequestError"
        self.assertEqual(failure.status_code, 400)
        self.assertEqual(failure.param, "temperature")
        self.assertIn("Temperature must be between 0.1 and 1.0", str(failure))

    @inline
    async def test_agent_loop_sends_each_reply_back(self) -> None:
        """
        C{messages.append(response.choices[0].message)}, then the next call:
        the SDK serialises the assistant message itself, and the gateway
        forwards it whatever the reply carried instead of text.
        """
        upstream = start_upstream(self)
        gateway = start_gateway(self, gateway_config(upstream))
        client = sdk(self, gateway)
        for name, reply in ASSISTANT_REPLIES.items():
            message = sdk_message(reply)
            messages: list[Any] = [{"role": "user", "content": "What is x?"}, message]
            if message.function_call is not None:
                messages.append({"role": "function", "name": "lookup", "content": "42"})
                expected = "What is x?"
            else:
                messages.append({"role": "user", "content": "And then?"})
                expected = "And then?"
            completion = await deferToThread(
                client.chat.completions.create, model="m", messages=messages
            )
            self.assertEqual(completion.choices[0].message.content, expected, name)

    @inline
    async def test_rate_limited(self) -> None:
        clock = Clock()
        upstream = start_upstream(self)
        gateway = start_gateway(
            self,
            gateway_config(upstream, rate_limit=1),
            clock=clock,
            limiter=SlidingWindowLimiter(1, 60, clock),
        )
        client = sdk(self, gateway)
        messages = [{"role": "user", "content": "once"}]
        await deferToThread(client.chat.completions.create, model="m", messages=messages)
        failure = None
        try:
            await deferToThread(client.chat.completions.create, model="m", messages=messages)
        except openai.RateLimitError as e:
            failure = e
        assert failure is not None, "no RateLimitError"
        self.assertEqual(failure.code, "rate_limit_exceeded")
        self.assertEqual(failure.response.headers["retry-after"], "60")

    @inline
    async def test_upstream_outage(self) -> None:
        gateway = start_gateway(self, gateway_config(aihostport=free_port(), aischeme="http"))
        client = sdk(self, gateway)
        failure = None
        try:
            await deferToThread(
                client.chat.completions.create,
                model="m",
                messages=[{"role": "user", "content": "anyone?"}],
            )
        except openai.APIStatusError as e:
            failure = e
        assert failure is not None, "no APIStatusError"
        self.assertIsInstance(failure, openai.InternalServerError)
        self.assertEqual(failure.status_code, 502)
        self.assertIn("The model server could not be reached", str(failure))
