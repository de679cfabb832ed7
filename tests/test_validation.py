"""
Tests for L{llmgw.validation}.

Two tables drive most of it: bodies the gateway must forward, and bodies it
must refuse, each with the exact status, error type, C{param} and C{code} the
client gets.  Each row becomes its own test method, so a failure names the
rule that broke.  Hypothesis then throws arbitrary bytes and arbitrary JSON
documents at the validator: nothing may escape but an L{ApiError}, and every
L{ApiError} is a 4xx in OpenAI's error shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmgw.errors import ApiError
from llmgw.validation import ChatRequest, validate_chat

try:
    from openai.types.chat import ChatCompletion, ChatCompletionFunctionMessageParam
except ImportError:  # pragma: no cover - depends on the stack
    ChatCompletion = None  # type: ignore[assignment,misc]

DEFAULT = "TheBloke/Mistral-7B-Instruct-v0.2-AWQ"
TEMPERATURE_MESSAGE = "Temperature must be between 0.1 and 1.0"
INVALID = "invalid_request_error"

USER: dict[str, Any] = {"role": "user", "content": "Hello"}


def chat(messages: object = None, **fields: object) -> bytes:
    """A body with one user message (or the given messages) and C{fields}."""
    document: dict[str, object] = {"messages": [USER] if messages is None else messages}
    document.update(fields)
    return json.dumps(document).encode()


def one(message: object, **fields: object) -> bytes:
    """A body whose only message is C{message}."""
    return chat([message], **fields)


def content(value: object) -> bytes:
    """A body with one user message whose content is C{value}."""
    return one({"role": "user", "content": value})


@attrs.frozen
class Invalid:
    """A body the validator must refuse, and exactly how."""

    body: bytes
    param: str | None
    code: str | None = None
    message: str | None = None
    allowed: tuple[str, ...] = ()


@attrs.frozen
class Valid:
    """A body the validator must accept, and what it must make of it."""

    body: bytes
    model: str = DEFAULT
    stream: bool = False
    allowed: tuple[str, ...] = ()


def _temperature(value: object) -> Invalid:
    return Invalid(chat(temperature=value), "temperature", message=TEMPERATURE_MESSAGE)


def _raw_temperature(literal: bytes) -> bytes:
    return b'{"messages":[{"role":"user","content":"Hi"}],"temperature":' + literal + b"}"


INVALID_BODIES: dict[str, Invalid] = {
    # The body must be a UTF-8 JSON object.
    "empty": Invalid(b"", None),
    "whitespace_only": Invalid(b"  \r\n", None),
    "not_json": Invalid(b"{messages: []}", None),
    "truncated": Invalid(chat()[:-1], None),
    "trailing_garbage": Invalid(chat() + b" x", None),
    "two_documents": Invalid(chat() + chat(), None),
    "single_quotes": Invalid(b"{'messages': []}", None),
    "top_level_array": Invalid(b'[{"messages":[{"role":"user","content":"Hi"}]}]', None),
    "top_level_string": Invalid(b'"messages"', None),
    "top_level_number": Invalid(b"42", None),
    "top_level_null": Invalid(b"null", None),
    "top_level_true": Invalid(b"true", None),
    "invalid_utf8": Invalid(b'{"messages":[{"role":"user","content":"\xff\xfe"}]}', None),
    "latin1": Invalid('{"messages":[{"role":"user","content":"café"}]}'.encode("latin-1"), None),
    "utf16": Invalid(chat().decode().encode("utf-16"), None),
    "utf8_bom": Invalid(b"\xef\xbb\xbf" + chat(), None),
    "surrogate_bytes": Invalid(b'{"messages":[{"role":"user","content":"\xed\xa0\x80"}]}', None),
    "nul_in_string": Invalid(b'{"messages":[{"role":"user","content":"a\x00b"}]}', None),
    "deep_arrays": Invalid(b"[" * 100_000, None),
    "deep_arrays_closed": Invalid(b"[" * 100_000 + b"]" * 100_000, None),
    "deep_objects": Invalid(b'{"a":' * 100_000, None),
    "deep_inside_messages": Invalid(b'{"messages":' + b"[" * 100_000, None),
    "deep_inside_content": Invalid(
        b'{"messages":[{"role":"user","content":' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
        None,
    ),
    "nan": Invalid(_raw_temperature(b"NaN"), None),
    "infinity": Invalid(_raw_temperature(b"Infinity"), None),
    "minus_infinity": Invalid(_raw_temperature(b"-Infinity"), None),
    "nan_elsewhere": Invalid(b'{"messages":[{"role":"user","content":"Hi"}],"top_p":NaN}', None),
    "huge_integer": Invalid(
        b'{"messages":[{"role":"user","content":"Hi"}],"seed":' + b"9" * 5000 + b"}", None
    ),
    # messages: required, a non-empty array of objects.
    "messages_missing": Invalid(b'{"model":"m"}', "messages"),
    "empty_object": Invalid(b"{}", "messages"),
    "messages_null": Invalid(b'{"messages":null}', "messages"),
    "messages_empty": Invalid(chat([]), "messages"),
    "messages_object": Invalid(chat(USER), "messages"),
    "messages_string": Invalid(chat("Hello"), "messages"),
    "messages_number": Invalid(chat(1), "messages"),
    "messages_true": Invalid(chat(True), "messages"),
    "message_string": Invalid(chat(["Hello"]), "messages[0]"),
    "message_null": Invalid(chat([None]), "messages[0]"),
    "message_array": Invalid(chat([[USER]]), "messages[0]"),
    "message_number": Invalid(chat([7]), "messages[0]"),
    "second_message_not_object": Invalid(chat([USER, "Hello"]), "messages[1]"),
    # role in {system, user, assistant, tool, developer, function}.
    "role_missing": Invalid(one({"content": "Hi"}), "messages[0].role"),
    "role_null": Invalid(one({"role": None, "content": "Hi"}), "messages[0].role"),
    "role_unknown": Invalid(one({"role": "admin", "content": "Hi"}), "messages[0].role"),
    "role_functions": Invalid(one({"role": "functions", "content": "Hi"}), "messages[0].role"),
    "role_wrong_case": Invalid(one({"role": "User", "content": "Hi"}), "messages[0].role"),
    "role_padded": Invalid(one({"role": " user", "content": "Hi"}), "messages[0].role"),
    "role_empty": Invalid(one({"role": "", "content": "Hi"}), "messages[0].role"),
    "role_number": Invalid(one({"role": 1, "content": "Hi"}), "messages[0].role"),
    "role_list": Invalid(one({"role": ["user"], "content": "Hi"}), "messages[0].role"),
    "third_role_unknown": Invalid(
        chat([USER, USER, {"role": "robot", "content": "Hi"}]), "messages[2].role"
    ),
    # function messages name the function.
    "function_without_name": Invalid(
        one({"role": "function", "content": "42"}), "messages[0].name"
    ),
    "function_name_null": Invalid(
        one({"role": "function", "name": None, "content": "42"}), "messages[0].name"
    ),
    "function_name_number": Invalid(
        one({"role": "function", "name": 7, "content": "42"}), "messages[0].name"
    ),
    "second_message_function_without_name": Invalid(
        chat([USER, {"role": "function", "content": None}]), "messages[1].name"
    ),
    # content: a string or an array of parts; null or absent only on an
    # assistant message, null (but present) on a function message.
    "content_missing": Invalid(one({"role": "user"}), "messages[0].content"),
    "content_null": Invalid(content(None), "messages[0].content"),
    "content_number": Invalid(content(5), "messages[0].content"),
    "content_true": Invalid(content(True), "messages[0].content"),
    "content_object": Invalid(content({"type": "text", "text": "Hi"}), "messages[0].content"),
    "system_content_null": Invalid(one({"role": "system", "content": None}), "messages[0].content"),
    "system_content_missing": Invalid(one({"role": "system"}), "messages[0].content"),
    "developer_content_null": Invalid(
        one({"role": "developer", "content": None}), "messages[0].content"
    ),
    "tool_content_null": Invalid(
        one({"role": "tool", "content": None, "tool_call_id": "call_1"}), "messages[0].content"
    ),
    "tool_content_missing": Invalid(
        one({"role": "tool", "tool_call_id": "call_1"}), "messages[0].content"
    ),
    "function_content_missing": Invalid(
        one({"role": "function", "name": "lookup"}), "messages[0].content"
    ),
    "function_content_number": Invalid(
        one({"role": "function", "name": "lookup", "content": 42}), "messages[0].content"
    ),
    "assistant_content_number": Invalid(
        one({"role": "assistant", "content": 0}), "messages[0].content"
    ),
    "assistant_content_object": Invalid(
        one({"role": "assistant", "content": {"type": "text", "text": "Hi"}}),
        "messages[0].content",
    ),
    "assistant_bad_part": Invalid(
        one({"role": "assistant", "content": [{"type": "text"}]}), "messages[0].content[0].text"
    ),
    "user_refusal_content_null": Invalid(
        one({"role": "user", "content": None, "refusal": "no"}), "messages[0].content"
    ),
    "user_null_with_tool_calls": Invalid(
        one({"role": "user", "content": None, "tool_calls": [{"id": "c"}]}),
        "messages[0].content",
    ),
    "tool_null_with_tool_calls": Invalid(
        one({"role": "tool", "content": None, "tool_calls": [{"id": "c"}]}),
        "messages[0].content",
    ),
    "second_content_null": Invalid(chat([USER, {"role": "user"}]), "messages[1].content"),
    # Content parts: objects with a string type; text and image_url checked.
    "part_without_type": Invalid(content([{"text": "Hi"}]), "messages[0].content[0].type"),
    "part_type_null": Invalid(
        content([{"type": None, "text": "Hi"}]), "messages[0].content[0].type"
    ),
    "part_type_number": Invalid(
        content([{"type": 1, "text": "Hi"}]), "messages[0].content[0].type"
    ),
    "part_string": Invalid(content(["Hi"]), "messages[0].content[0]"),
    "part_null": Invalid(content([None]), "messages[0].content[0]"),
    "text_part_without_text": Invalid(content([{"type": "text"}]), "messages[0].content[0].text"),
    "text_part_text_null": Invalid(
        content([{"type": "text", "text": None}]), "messages[0].content[0].text"
    ),
    "text_part_text_number": Invalid(
        content([{"type": "text", "text": 5}]), "messages[0].content[0].text"
    ),
    "text_part_text_array": Invalid(
        content([{"type": "text", "text": ["Hi"]}]), "messages[0].content[0].text"
    ),
    "second_part_bad": Invalid(
        content([{"type": "text", "text": "Hi"}, {"type": "text"}]),
        "messages[0].content[1].text",
    ),
    "image_part_without_image_url": Invalid(
        content([{"type": "image_url"}]), "messages[0].content[0].image_url"
    ),
    "image_url_string": Invalid(
        content([{"type": "image_url", "image_url": "https://example.com/a.png"}]),
        "messages[0].content[0].image_url",
    ),
    "image_url_without_url": Invalid(
        content([{"type": "image_url", "image_url": {"detail": "low"}}]),
        "messages[0].content[0].image_url",
    ),
    "image_url_url_number": Invalid(
        content([{"type": "image_url", "image_url": {"url": 5}}]),
        "messages[0].content[0].image_url",
    ),
    "image_url_url_null": Invalid(
        content([{"type": "image_url", "image_url": {"url": None}}]),
        "messages[0].content[0].image_url",
    ),
    "part_in_second_message": Invalid(
        chat([USER, {"role": "user", "content": [{"type": "image_url"}]}]),
        "messages[1].content[0].image_url",
    ),
    # model: optional non-empty string.
    "model_empty": Invalid(chat(model=""), "model"),
    "model_number": Invalid(chat(model=7), "model"),
    "model_array": Invalid(chat(model=["m"]), "model"),
    "model_object": Invalid(chat(model={"name": "m"}), "model"),
    "model_true": Invalid(chat(model=True), "model"),
    # max_tokens: integer >= 1; booleans are not integers.
    "max_tokens_zero": Invalid(chat(max_tokens=0), "max_tokens"),
    "max_tokens_negative": Invalid(chat(max_tokens=-1), "max_tokens"),
    "max_tokens_fraction": Invalid(chat(max_tokens=1.5), "max_tokens"),
    "max_tokens_float": Invalid(chat(max_tokens=10.0), "max_tokens"),
    "max_tokens_string": Invalid(chat(max_tokens="10"), "max_tokens"),
    "max_tokens_true": Invalid(chat(max_tokens=True), "max_tokens"),
    "max_tokens_false": Invalid(chat(max_tokens=False), "max_tokens"),
    "max_tokens_array": Invalid(chat(max_tokens=[10]), "max_tokens"),
    "max_tokens_overflow": Invalid(
        b'{"messages":[{"role":"user","content":"Hi"}],"max_tokens":1e400}', "max_tokens"
    ),
    # temperature: a number with 0.1 <= t <= 1.0, and exactly this message.
    "temperature_0_09": _temperature(0.09),
    "temperature_1_01": _temperature(1.01),
    "temperature_1_5": _temperature(1.5),
    "temperature_2": _temperature(2),
    "temperature_zero": _temperature(0),
    "temperature_float_zero": _temperature(0.0),
    "temperature_negative": _temperature(-0.5),
    "temperature_just_below": _temperature(0.09999999999999999),
    "temperature_just_above": _temperature(1.0000000000000002),
    "temperature_string": _temperature("0.5"),
    "temperature_true": _temperature(True),
    "temperature_false": _temperature(False),
    "temperature_array": _temperature([0.5]),
    "temperature_object": _temperature({"value": 0.5}),
    "temperature_overflow": Invalid(
        _raw_temperature(b"1e400"), "temperature", message=TEMPERATURE_MESSAGE
    ),
    # stream: true or false.
    "stream_string": Invalid(chat(stream="true"), "stream"),
    "stream_one": Invalid(chat(stream=1), "stream"),
    "stream_zero": Invalid(chat(stream=0), "stream"),
    "stream_object": Invalid(chat(stream={"include_usage": True}), "stream"),
    # Fields that reconfigure the model server need --allow-field.
    "chat_template": Invalid(
        chat(chat_template="{{ messages }}"), "chat_template", "field_not_allowed"
    ),
    "chat_template_kwargs": Invalid(
        chat(chat_template_kwargs={"enable_thinking": True}),
        "chat_template_kwargs",
        "field_not_allowed",
    ),
    "logits_processors": Invalid(
        chat(logits_processors=["my.module.Processor"]), "logits_processors", "field_not_allowed"
    ),
    "chat_template_null": Invalid(chat(chat_template=None), "chat_template", "field_not_allowed"),
    "logits_processors_other_allowed": Invalid(
        chat(logits_processors=[], chat_template="t"),
        "logits_processors",
        "field_not_allowed",
        allowed=("chat_template",),
    ),
    "chat_template_kwargs_not_covered_by_chat_template": Invalid(
        chat(chat_template_kwargs={}),
        "chat_template_kwargs",
        "field_not_allowed",
        allowed=("chat_template",),
    ),
}


TOOL_CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"q": "x"}'},
    }
]

VALID_BODIES: dict[str, Valid] = {
    "minimal": Valid(chat()),
    "minimal_with_model": Valid(chat(model="gpt-4o-mini"), model="gpt-4o-mini"),
    "leading_whitespace": Valid(b' \r\n\t{"messages":[{"role":"user","content":"Hi"}]}'),
    "escaped_unicode": Valid(content("Grüße, 世界 🌍")),
    "raw_utf8": Valid('{"messages":[{"role":"user","content":"Grüße 🌍"}]}'.encode()),
    "system": Valid(one({"role": "system", "content": "Be brief."})),
    "developer": Valid(one({"role": "developer", "content": "Be brief."})),
    "assistant": Valid(one({"role": "assistant", "content": "Hi there"})),
    "tool": Valid(one({"role": "tool", "content": "42", "tool_call_id": "call_1"})),
    "every_role": Valid(
        chat(
            [
                {"role": "system", "content": "s"},
                {"role": "developer", "content": "d"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": None, "tool_calls": TOOL_CALLS},
                {"role": "tool", "content": "t", "tool_call_id": "call_1"},
            ]
        )
    ),
    "empty_string_content": Valid(content("")),
    "text_part": Valid(content([{"type": "text", "text": "Hi"}])),
    "empty_text_part": Valid(content([{"type": "text", "text": ""}])),
    "image_url_part": Valid(
        content(
            [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ]
        )
    ),
    "image_url_with_detail": Valid(
        content([{"type": "image_url", "image_url": {"url": "data:,", "detail": "high"}}])
    ),
    "other_part_type": Valid(
        content([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])
    ),
    "content_empty_array": Valid(content([])),
    "assistant_content_empty_array": Valid(one({"role": "assistant", "content": []})),
    "assistant_content_null": Valid(one({"role": "assistant", "content": None})),
    "assistant_content_missing": Valid(one({"role": "assistant"})),
    "assistant_null_empty_tool_calls": Valid(
        one({"role": "assistant", "content": None, "tool_calls": []})
    ),
    "assistant_missing_content_empty_tool_calls": Valid(
        one({"role": "assistant", "tool_calls": []})
    ),
    "assistant_null_tool_calls_null": Valid(
        one({"role": "assistant", "content": None, "tool_calls": None})
    ),
    "assistant_null_with_refusal": Valid(
        one({"role": "assistant", "content": None, "refusal": "I can't help with that."})
    ),
    "assistant_null_with_function_call": Valid(
        one(
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "lookup", "arguments": "{}"},
            }
        )
    ),
    "assistant_null_with_audio": Valid(
        one({"role": "assistant", "content": None, "audio": {"id": "audio_1"}})
    ),
    "function": Valid(one({"role": "function", "name": "lookup", "content": "42"})),
    "function_content_null": Valid(one({"role": "function", "name": "lookup", "content": None})),
    "function_call_round_trip": Valid(
        chat(
            [
                USER,
                {"role": "assistant", "function_call": {"name": "lookup", "arguments": "{}"}},
                {"role": "function", "name": "lookup", "content": "42"},
            ]
        )
    ),
    "assistant_null_with_tool_calls": Valid(
        one({"role": "assistant", "content": None, "tool_calls": TOOL_CALLS})
    ),
    "assistant_missing_content_with_tool_calls": Valid(
        one({"role": "assistant", "tool_calls": TOOL_CALLS})
    ),
    "extra_message_fields": Valid(one({"role": "user", "content": "Hi", "name": "ann"})),
    "temperature_0_1": Valid(chat(temperature=0.1)),
    "temperature_1_0": Valid(chat(temperature=1.0)),
    "temperature_integer_1": Valid(chat(temperature=1)),
    "temperature_0_5": Valid(chat(temperature=0.5)),
    "temperature_exponent": Valid(_raw_temperature(b"1e-1")),
    "temperature_null": Valid(chat(temperature=None)),
    "max_tokens_1": Valid(chat(max_tokens=1)),
    "max_tokens_large": Valid(chat(max_tokens=2**63)),
    "max_tokens_null": Valid(chat(max_tokens=None)),
    "stream_true": Valid(chat(stream=True), stream=True),
    "stream_false": Valid(chat(stream=False)),
    "stream_null": Valid(chat(stream=None)),
    "model_null_means_default": Valid(chat(model=None)),
    "stream_true_with_model": Valid(chat(model="m", stream=True), model="m", stream=True),
    "chat_template_allowed": Valid(chat(chat_template="t"), allowed=("chat_template",)),
    "all_reconfiguring_allowed": Valid(
        chat(chat_template="t", chat_template_kwargs={"a": 1}, logits_processors=[]),
        allowed=("chat_template", "chat_template_kwargs", "logits_processors"),
    ),
    "passthrough_fields": Valid(
        chat(
            model="m",
            top_p=0.9,
            stop=["\n\n", "END"],
            n=2,
            seed=7,
            presence_penalty=-0.5,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            tool_choice="auto",
            response_format={"type": "json_object"},
            stream_options={"include_usage": True},
            user="u-1",
            some_future_parameter={"nested": [1, None, "x"]},
        ),
        model="m",
    ),
}


class ValidationTableTests(SynchronousTestCase):
    """One test per row of L{INVALID_BODIES} and L{VALID_BODIES} (added below)."""

    def check_invalid(self, case: Invalid) -> None:
        with self.assertRaises(ApiError) as caught:
            validate_chat(case.body, default_model=DEFAULT, allowed_fields=case.allowed)
        error = caught.exception
        self.assertEqual(
            (error.status, error.type, error.param, error.code),
            (400, INVALID, case.param, case.code),
        )
        self.assertEqual(error.headers, ())
        if case.message is not None:
            self.assertEqual(error.message, case.message)
        self.assertEqual(
            json.loads(error.body()),
            {
                "error": {
                    "message": error.message,
                    "type": INVALID,
                    "param": case.param,
                    "code": case.code,
                }
            },
        )

    def check_valid(self, case: Valid) -> None:
        result = validate_chat(case.body, default_model=DEFAULT, allowed_fields=case.allowed)
        self.assertIsInstance(result, ChatRequest)
        self.assertEqual((result.model, result.stream), (case.model, case.stream))
        document = json.loads(case.body)
        if document.get("model") is not None:
            self.assertIs(result.body, case.body)
        else:
            self.assertEqual(json.loads(result.body), {**document, "model": DEFAULT})


def _add_table_tests() -> None:
    def invalid_test(case: Invalid) -> Callable[[ValidationTableTests], None]:
        return lambda self: self.check_invalid(case)

    def valid_test(case: Valid) -> Callable[[ValidationTableTests], None]:
        return lambda self: self.check_valid(case)

    for name, bad in INVALID_BODIES.items():
        setattr(ValidationTableTests, f"test_invalid_{name}", invalid_test(bad))
    for name, good in VALID_BODIES.items():
        setattr(ValidationTableTests, f"test_valid_{name}", valid_test(good))


_add_table_tests()


#: choices[0].message of replies model servers send with no text in them: what
#: an agent loop appends to its messages, and sends back on the next turn.
ASSISTANT_REPLIES: dict[str, dict[str, Any]] = {
    "refusal": {"role": "assistant", "content": None, "refusal": "I can't help with that."},
    "function_call": {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "lookup", "arguments": '{"q": "x"}'},
    },
    "audio": {
        "role": "assistant",
        "content": None,
        "audio": {
            "id": "audio_1",
            "data": "UklGRg==",
            "expires_at": 1700000000,
            "transcript": "Hi",
        },
    },
    # vLLM's ChatMessage: every field present, tool_calls an empty list.
    "vllm_empty_tool_calls": {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": [],
        "reasoning_content": None,
    },
    "no_content_key": {"role": "assistant", "refusal": "No."},
}


def sdk_message(reply: dict[str, Any]) -> Any:
    """
    The message as the SDK hands it to the agent loop: a C{ChatCompletion}
    built from the reply the way the SDK builds it (C{construct}, no
    validation), then its first choice's C{ChatCompletionMessage}.
    """
    completion = ChatCompletion.construct(
        id="chatcmpl-1",
        object="chat.completion",
        created=1700000000,
        model="m",
        choices=[{"index": 0, "message": reply, "finish_reason": "stop", "logprobs": None}],
    )
    return completion.choices[0].message


class AgentLoopTests(SynchronousTestCase):
    """
    C{messages.append(response.choices[0].message)} and send again: the
    assistant turn goes back as the SDK serialises it (C{model_dump} with
    C{exclude_unset=True}, as C{openai._utils._transform} does) and as agent
    loops that keep plain dicts do (C{model_dump()}, every field, nulls included).
    """

    if ChatCompletion is None:
        skip = "the openai SDK is not installed"

    def check_sent_back(self, name: str) -> None:
        message = sdk_message(ASSISTANT_REPLIES[name])
        follow_up: dict[str, Any] = {"role": "user", "content": "And then?"}
        if message.function_call is not None:
            result: ChatCompletionFunctionMessageParam = {
                "role": "function",
                "name": message.function_call.name,
                "content": "42",
            }
            follow_up = dict(result)
        for sent in (
            message.model_dump(exclude_unset=True, mode="json"),
            message.model_dump(mode="json"),
        ):
            body = chat([USER, sent, follow_up], model="m")
            request = validate_chat(body, default_model=DEFAULT)
            self.assertEqual(request, ChatRequest(body, "m", False))
            self.assertIs(request.body, body)

    def test_refusal(self) -> None:
        self.check_sent_back("refusal")

    def test_function_call_then_function_result(self) -> None:
        self.check_sent_back("function_call")

    def test_audio(self) -> None:
        self.check_sent_back("audio")

    def test_vllm_empty_tool_calls(self) -> None:
        self.check_sent_back("vllm_empty_tool_calls")

    def test_no_content_key(self) -> None:
        """The SDK leaves out what the reply left out: no content key at all."""
        sent = sdk_message(ASSISTANT_REPLIES["no_content_key"]).model_dump(
            exclude_unset=True, mode="json"
        )
        self.assertEqual(sent, {"role": "assistant", "refusal": "No."})
        self.check_sent_back("no_content_key")


class TemperatureTests(SynchronousTestCase):
    """The one error whose wording the issue fixes exactly."""

    def test_message_type_and_param(self) -> None:
        with self.assertRaises(ApiError) as caught:
            validate_chat(chat(temperature=1.5), default_model=DEFAULT)
        self.assertEqual(
            json.loads(caught.exception.body()),
            {
                "error": {
                    "message": "Temperature must be between 0.1 and 1.0",
                    "type": "invalid_request_error",
                    "param": "temperature",
                    "code": None,
                }
            },
        )
        self.assertEqual(caught.exception.status, 400)

    def test_bounds_are_inclusive(self) -> None:
        for temperature in (0.1, 1.0):
            result = validate_chat(chat(model="m", temperature=temperature), default_model=DEFAULT)
            self.assertEqual(json.loads(result.body)["temperature"], temperature)


class ForwardingTests(SynchronousTestCase):
    """What L{ChatRequest.body} holds: the client's bytes, or those bytes plus a model."""

    def test_model_given_forwards_the_same_bytes(self) -> None:
        body = (
            b'{ "model" : "m",\n  "messages": [{"role":"user","content":"Hi"}],'
            b' "temperature": 0.50, "top_p": 1E0, "seed": 7 }'
        )
        result = validate_chat(body, default_model=DEFAULT)
        self.assertIs(result.body, body)
        self.assertEqual(result, ChatRequest(body, "m", False))

    def test_model_given_ignores_default(self) -> None:
        result = validate_chat(chat(model="other"), default_model=DEFAULT)
        self.assertEqual(result.model, "other")
        self.assertEqual(json.loads(result.body)["model"], "other")

    def test_default_model_filled_in(self) -> None:
        body = chat(stream=True)
        result = validate_chat(body, default_model="my/model")
        self.assertEqual(result.model, "my/model")
        self.assertTrue(result.stream)
        self.assertEqual(json.loads(result.body), {**json.loads(body), "model": "my/model"})

    def test_default_model_keeps_every_other_byte(self) -> None:
        """
        The default is spliced in: removing the inserted member gives back the
        client's bytes exactly, formatting of numbers and whitespace included.
        """
        body = (
            b'\n{ "messages" : [ {"role":"user","content":"Hi \\u00e9"} ],\n'
            b'  "top_p": 0.90, "stop": ["\\n\\n", "END"], "n": 1, "seed": 1E3,\n'
            b'  "tools": [{"type":"function","function":{"name":"f","parameters":{}}}],\n'
            b'  "response_format": {"type": "json_object"}, "stream": false,\n'
            b'  "temperature": 1.00, "max_tokens": 16, "logprobs": null }\n'
        )
        result = validate_chat(body, default_model=DEFAULT)
        member = b'"model":' + json.dumps(DEFAULT).encode() + b","
        self.assertEqual(result.body.count(member), 1)
        self.assertEqual(result.body.replace(member, b"", 1), body)
        expected = json.loads(body)
        expected["model"] = DEFAULT
        self.assertEqual(json.loads(result.body), expected)
        for field in ("top_p", "stop", "n", "seed", "tools", "response_format", "stream"):
            self.assertEqual(json.loads(result.body)[field], json.loads(body)[field], field)

    def test_default_model_needing_escapes(self) -> None:
        model = 'odd "model" \\ name é\n'
        result = validate_chat(chat(), default_model=model)
        self.assertEqual(result.model, model)
        self.assertEqual(json.loads(result.body), {"messages": [USER], "model": model})

    def test_stream_defaults_to_false(self) -> None:
        self.assertFalse(validate_chat(chat(), default_model=DEFAULT).stream)


# Arbitrary JSON: every kind of value, nested.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

# JSON shaped like a chat request, so the properties reach the deeper rules.
roles = (
    st.sampled_from(["system", "user", "assistant", "tool", "developer", "function", "admin"])
    | json_values
)
parts = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["text", "image_url", "input_audio"]) | json_values,
        "text": st.text() | json_values,
        "image_url": st.fixed_dictionaries({}, optional={"url": st.text() | json_values})
        | json_values,
    },
)
contents = st.text() | st.lists(parts | json_values, max_size=3) | json_values
messages = st.fixed_dictionaries(
    {},
    optional={
        "role": roles,
        "content": contents,
        "tool_calls": st.lists(json_values, max_size=2) | json_values,
        "name": st.text(max_size=8) | json_values,
    },
)
chat_documents = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.lists(messages | json_values, max_size=3) | json_values,
        "model": st.text() | json_values,
        "max_tokens": st.integers() | json_values,
        "temperature": st.floats(allow_nan=False, allow_infinity=False) | json_values,
        "stream": json_values,
        "chat_template": json_values,
        "chat_template_kwargs": json_values,
        "logits_processors": json_values,
        "top_p": json_values,
    },
)
allowed_fields = st.sets(
    st.sampled_from(["chat_template", "chat_template_kwargs", "logits_processors"])
)


class PropertyTests(SynchronousTestCase):
    """No input makes the validator raise anything but a 4xx L{ApiError}."""

    def check(self, body: bytes, allowed: frozenset[str] = frozenset()) -> ChatRequest | None:
        try:
            result = validate_chat(body, default_model=DEFAULT, allowed_fields=allowed)
        except ApiError as e:
            self.assertTrue(400 <= e.status <= 499, e.status)
            document = json.loads(e.body())
            self.assertEqual(list(document), ["error"])
            error = document["error"]
            self.assertEqual(sorted(error), ["code", "message", "param", "type"])
            self.assertIsInstance(error["message"], str)
            self.assertIsInstance(error["type"], str)
            self.assertIsInstance(error["param"], str | None)
            self.assertIsInstance(error["code"], str | None)
            self.assertEqual(error["type"], e.type)
            self.assertEqual(error["param"], e.param)
            return None
        self.assertIsInstance(result, ChatRequest)
        return result

    @settings(deadline=None)
    @given(st.binary())
    def test_any_bytes(self, body: bytes) -> None:
        self.check(body)

    @settings(deadline=None)
    @given(json_values)
    def test_any_json(self, document: object) -> None:
        self.check(json.dumps(document).encode())

    @settings(deadline=None)
    @given(chat_documents, allowed_fields, st.booleans())
    def test_chat_shaped_json(
        self, document: dict[str, Any], allowed: set[str], ascii_only: bool
    ) -> None:
        body = json.dumps(document, ensure_ascii=ascii_only).encode()
        result = self.check(body, frozenset(allowed))
        if result is None:
            return
        forwarded = json.loads(result.body)
        if "model" in document:
            self.assertIs(result.body, body)
            self.assertEqual(result.model, document["model"])
        else:
            self.assertEqual(forwarded, {**document, "model": DEFAULT})
            self.assertEqual(result.model, DEFAULT)
        self.assertEqual(result.stream, document.get("stream", False))
        self.assertTrue(forwarded["messages"])
        for field in ("chat_template", "chat_template_kwargs", "logits_processors"):
            if field in document:
                self.assertIn(field, allowed)

    @settings(deadline=None)
    @given(chat_documents, st.integers(0, 200))
    def test_mangled_chat_bytes(self, document: dict[str, Any], cut: int) -> None:
        body = json.dumps(document).encode()
        self.check(body[:cut] + b"\xff" + body[cut:])
        self.check(body[:cut])
