"""A model server on vLLM's own web stack: FastAPI on uvicorn, in a process of its own.

The stand-in of L{llmgw.mock} runs on Twisted, so it cannot show how the
gateway copes with the server most users run.  vLLM's OpenAI server is a
FastAPI app served by uvicorn, and uvicorn closes every keep-alive connection
that stays idle for C{--timeout-keep-alive} seconds (vLLM keeps its default of
5).  This app answers in vLLM's shapes, echoing the last user message, and
L{start_vllm_stand_in} runs it under the real C{python -m uvicorn}, over TLS
from a CA made for the test, so that its timer is uvicorn's own.

Importing this module never fails: where FastAPI or uvicorn is missing (Debian
12 without C{python3-fastapi}), L{UNAVAILABLE} says why and tests skip.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from llmgw.devtls import issue_server_certificate, make_ca
from llmgw.mock import chat_completion_body, model_listing
from tests.loopback import Reply, free_port, reactor

try:
    import uvicorn  # noqa: F401  (not used here: the server runs it as `python -m uvicorn`)
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError as e:  # pragma: no cover - depends on the stack
    UNAVAILABLE: str | None = f"vLLM's web stack (FastAPI on uvicorn) is not installed: {e}"
else:
    UNAVAILABLE = None

SERVED_MODEL = "TheBloke/Mistral-7B-Instruct-v0.2-AWQ"
"""The one model this server lists and serves, as C{vllm serve NAME} would."""

MAX_MODEL_LEN = 32768

STARTUP_TIMEOUT = 30.0
"""Seconds for the interpreter to import FastAPI and bind; generous for a loaded machine."""


def vllm_error(status: int, message: str, kind: str) -> dict[str, Any]:
    """vLLM's C{ErrorResponse}, as its OpenAI server sends it."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def model_list(created: int) -> dict[str, Any]:
    """vLLM's C{GET /v1/models} body for one served model."""
    return model_listing(SERVED_MODEL, created, f"modelperm-{created}", MAX_MODEL_LEN)


def last_user_text(document: dict[str, Any]) -> str:
    """The reply this stand-in gives: the last user message, or nothing."""
    for message in reversed(document.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def completion(request_id: str, created: int, text: str, prompt: str) -> dict[str, Any]:
    """vLLM's non-streamed C{chat.completion} body."""
    prompt_tokens, completion_tokens = len(prompt.split()), len(text.split())
    usage = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    return chat_completion_body(request_id, created, SERVED_MODEL, text, usage)


def chunk(request_id: str, created: int, delta: dict[str, str], finish: str | None) -> bytes:
    """One C{chat.completion.chunk} event of vLLM's stream."""
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = None
    body = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": SERVED_MODEL,
        "choices": [choice],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def events(request_id: str, created: int, text: str) -> AsyncIterator[bytes]:
    """vLLM's stream: the role, one chunk per word, the finish, then C{[DONE]}."""
    yield chunk(request_id, created, {"role": "assistant", "content": ""}, None)
    words = text.split(" ")
    for i, word in enumerate(words):
        yield chunk(request_id, created, {"content": word if i == 0 else " " + word}, None)
    yield chunk(request_id, created, {"content": ""}, "stop")
    yield b"data: [DONE]\n\n"


def make_app() -> Any:
    """The FastAPI app: C{GET /v1/models} and C{POST /v1/chat/completions}."""
    api = FastAPI()
    counter = iter(range(1, sys.maxsize))

    @api.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(model_list(int(time.time())))

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        try:
            document = json.loads(await request.body())
        except ValueError as e:
            return JSONResponse(vllm_error(400, f"invalid JSON: {e}", "BadRequestError"), 400)
        if not isinstance(document, dict):
            return JSONResponse(vllm_error(400, "expected an object", "BadRequestError"), 400)
        model = document.get("model")
        if model != SERVED_MODEL:
            message = f"The model `{model}` does not exist."
            return JSONResponse(vllm_error(404, message, "NotFoundError"), 404)
        request_id, created = f"chatcmpl-{next(counter)}", int(time.time())
        text = last_user_text(document)
        if document.get("stream") is True:
            return StreamingResponse(
                events(request_id, created, text), media_type="text/event-stream"
            )
        prompt = " ".join(
            m["content"]
            for m in document.get("messages") or []
            if isinstance(m, dict) and isinstance(m.get("content"), str)
        )
        return JSONResponse(completion(request_id, created, text, prompt))

    return api


app = make_app() if UNAVAILABLE is None else None
"""What C{python -m uvicorn tests.vllm_stand_in:app} serves."""


class _UvicornProcess(ProcessProtocol):
    """Keeps the server's output for a failure message, and says when it has exited."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[None] = Deferred()
        self.exited = False

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        self.ended.callback(None)


@attrs.frozen
class VLLMServer:
    """A running uvicorn server and what a gateway needs to trust it."""

    port: int
    ca_file: str
    process: IProcessTransport


def _accepts(port: int) -> bool:
    """Whether something listens on the loopback port (a refused connect returns at once)."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def start_vllm_stand_in(test: TestCase, keep_alive: float) -> VLLMServer:
    """
    Run this app under C{python -m uvicorn} on a free loopback port, over TLS,
    with C{--timeout-keep-alive keep_alive}; return once it accepts.

    The test's cleanup kills it and waits for it to be gone.  A port taken by
    someone else between L{free_port} and uvicorn's bind makes uvicorn exit,
    and another port is tried.
    """
    if UNAVAILABLE is not None:
        raise RuntimeError(UNAVAILABLE)
    ca = make_ca()
    cert_pem, key_pem = issue_server_certificate(ca, ("localhost",), ("127.0.0.1",))
    directory = Path(test.mktemp()).resolve()
    directory.mkdir()
    for name, pem in (("ca.pem", ca.cert_pem), ("server.pem", cert_pem), ("server.key", key_pem)):
        (directory / name).write_bytes(pem)
    # The directory that holds the `tests` package: `python -m` imports from it.
    root = str(Path(__file__).resolve().parent.parent)
    for _attempt in range(3):
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.vllm_stand_in:app",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--timeout-keep-alive={keep_alive:g}",
            f"--ssl-certfile={directory / 'server.pem'}",
            f"--ssl-keyfile={directory / 'server.key'}",
            "--log-level=warning",
            "--no-access-log",
        ]
        protocol = _UvicornProcess()
        process = reactor.spawnProcess(
            protocol, sys.executable, argv, env=dict(os.environ), path=root
        )

        def stop(protocol: _UvicornProcess = protocol) -> Deferred[None]:
            if not protocol.exited:
                protocol.transport.signalProcess("KILL")  # type: ignore[union-attr]
            return protocol.ended

        test.addCleanup(stop)
        waited = 0.0
        while not protocol.exited and not _accepts(port):
            if waited > STARTUP_TIMEOUT:
                raise AssertionError(
                    f"uvicorn did not accept on port {port} within {STARTUP_TIMEOUT:g} s:\n"
                    + protocol.output.decode(errors="replace")
                )
            await task.deferLater(reactor, 0.05, lambda: None)
            waited += 0.05
        if not protocol.exited:
            return VLLMServer(port, str(directory / "ca.pem"), process)
        output = protocol.output.decode(errors="replace")
        if "address already in use" not in output.lower():
            raise AssertionError(f"uvicorn exited at start-up:\n{output}")
    raise AssertionError(f"uvicorn found no free port in three tries:\n{output}")


def gateway_connection(test: TestCase, port: int) -> socket.socket:
    """
    One keep-alive client connection to the gateway, opened before the race.

    A plain socket, so that a request can be put in the gateway's receive
    buffer synchronously (L{send_while_busy}); a new connection would need a
    reactor turn to be accepted, in which the gateway would also see the model
    server's close.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    test.addCleanup(sock.close)
    sock.setblocking(False)
    return sock


def send_while_busy(sock: socket.socket, data: bytes, busy: float) -> None:
    """
    Send a whole request, then hold this process's reactor for C{busy} seconds.

    The gateway runs on this reactor: when it next polls, the request and
    anything the model server sent meanwhile (uvicorn's close) are pending
    together, and it reads the request first, as a loaded worker does.  This
    widens the race at the keep-alive edge from a fraction of a millisecond to
    C{busy} seconds, so every request reused there meets a closing connection.
    """
    sock.setblocking(True)
    try:
        sock.sendall(data)
    finally:
        sock.setblocking(False)
    time.sleep(busy)


async def read_reply(sock: socket.socket, timeout: float = 30.0) -> Reply:
    """
    Read one HTTP/1.1 response from the gateway off a non-blocking socket,
    without blocking the reactor: its body has a C{Content-Length} or is chunked.
    """
    buffer = bytearray()
    waited = 0.0

    async def more() -> None:
        nonlocal waited
        while True:
            try:
                data: bytes | None = sock.recv(65536)
            except BlockingIOError:
                data = None
            if data is None:
                if waited > timeout:
                    raise AssertionError(f"no whole reply in {timeout:g} s: {bytes(buffer)!r}")
                await task.deferLater(reactor, 0.001, lambda: None)
                waited += 0.001
                continue
            if not data:
                raise AssertionError(f"the gateway closed the connection: {bytes(buffer)!r}")
            buffer.extend(data)
            return

    while b"\r\n\r\n" not in buffer:
        await more()
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    del buffer[: len(head) + 4]
    status_line, *lines = head.split(b"\r\n")
    headers = Headers()
    for line in lines:
        name, _, value = line.partition(b":")
        headers.addRawHeader(name.strip(), value.strip())
    status = int(status_line.split(b" ")[1])
    length = headers.getRawHeaders(b"content-length")
    if length is not None:
        while len(buffer) < int(length[0]):
            await more()
        return Reply(status, headers, bytes(buffer[: int(length[0])]))
    body = bytearray()
    while True:  # chunked: size line, data, CRLF; a zero size ends it
        while b"\r\n" not in buffer:
            await more()
        size_line, _, _ = bytes(buffer).partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(buffer) < len(size_line) + 2 + size + 2:
            await more()
        body += buffer[len(size_line) + 2 : len(size_line) + 2 + size]
        del buffer[: len(size_line) + 2 + size + 2]
        if size == 0:
            return Reply(status, headers, bytes(body))
