"""Turn a request body into a L{ChatRequest}, or say exactly what is wrong with it.

Pure: bytes in, an immutable value or an L{ApiError} out, with no I/O, so the
rules can be tested exhaustively (including by hypothesis) without a network.
Only the fields the gateway has rules for are checked; everything else passes
to the model server untouched, so new OpenAI parameters need no release here.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import attrs

from llmgw.errors import invalid

#: "function" is deprecated in favour of "tool", but the OpenAI SDK still types
#: it, and clients built on function calling still send it.
ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})

#: Fields that let a client change vLLM's chat template or run code on the
#: model server; refused unless the operator names them in --allow-field.
RECONFIGURING_FIELDS = ("chat_template", "chat_template_kwargs", "logits_processors")

TEMPERATURE_MESSAGE = "Temperature must be between 0.1 and 1.0"


@attrs.frozen
class ChatRequest:
    """
    A chat completion request that passed validation.

    @ivar body: the bytes to send upstream: the client's own bytes when nothing
        needed filling in, so a valid request is never re-encoded.
    @ivar model: the model asked for, or the default filled in.
    @ivar stream: whether the client asked for server-sent events.
    """

    body: bytes
    model: str
    stream: bool


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_object(body: bytes) -> dict[str, Any]:
    """Decode a UTF-8 JSON object, refusing NaN/Infinity and absurd nesting."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"The request body is not valid UTF-8 (byte {e.start}).") from None
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise invalid("The request body is JSON nested too deeply.") from None
    except ValueError as e:
        raise invalid(f"The request body is not valid JSON: {e}.") from None
    if not isinstance(document, dict):
        raise invalid("The request body must be a JSON object.")
    return document


def _check_content(message: dict[str, Any], where: str) -> None:
    """
    Check a message's content: a string or an array of content parts.

    An assistant message may leave content out or null whatever else it carries
    (tool calls, a function call, audio, a refusal, or nothing): agent loops
    send the model's own reply back as it came, and OpenAI's types and vLLM
    accept that.  A function message must have the key, though it may be null,
    as in the SDK's C{ChatCompletionFunctionMessageParam}.  An empty array is
    the model server's to judge.
    """
    role = message["role"]
    content = message.get("content")
    if content is None:
        if role == "assistant" or (role == "function" and "content" in message):
            return
        if role == "function":
            detail = "it may be null, but not left out"
        else:
            detail = "only assistant and function messages may have it null"
        raise invalid(
            f"{where}.content is required on a {role} message; {detail}.", f"{where}.content"
        )
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise invalid(
            f"{where}.content must be a string or an array of content parts.",
            f"{where}.content",
        )
    for j, part in enumerate(content):
        _check_part(part, f"{where}.content[{j}]")


def _check_part(part: object, where: str) -> None:
    if not isinstance(part, dict):
        raise invalid(f"{where} must be a content part object.", where)
    if not isinstance(part.get("type"), str):
        raise invalid(f"{where}.type must be a string.", f"{where}.type")
    kind = part["type"]
    if kind == "text" and not isinstance(part.get("text"), str):
        raise invalid(f"{where}.text must be a string.", f"{where}.text")
    if kind == "image_url":
        image = part.get("image_url")
        if not isinstance(image, dict) or not isinstance(image.get("url"), str):
            raise invalid(
                f"{where}.image_url must be an object with a string 'url'.",
                f"{where}.image_url",
            )


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' is required and must be a non-empty array.", "messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object.", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(
                f"{where}.role must be one of {', '.join(sorted(ROLES))}.", f"{where}.role"
            )
        if role == "function" and not isinstance(message.get("name"), str):
            raise invalid(
                f"{where}.name is required on a function message: the function's name.",
                f"{where}.name",
            )
        _check_content(message, where)


def validate_chat(
    body: bytes, *, default_model: str, allowed_fields: Collection[str] = ()
) -> ChatRequest:
    """
    Check a chat completion request body against the gateway's rules.

    @param allowed_fields: names from L{RECONFIGURING_FIELDS} the operator allows.
    @raise ApiError: a 400 naming the offending field in C{param}.
    """
    document = parse_object(body)
    _check_messages(document.get("messages"))

    temperature = document.get("temperature")
    if temperature is not None and not (_is_number(temperature) and 0.1 <= temperature <= 1.0):
        raise invalid(TEMPERATURE_MESSAGE, "temperature")

    max_tokens = document.get("max_tokens")
    if max_tokens is not None and not (_is_int(max_tokens) and max_tokens >= 1):
        raise invalid("max_tokens must be an integer of at least 1.", "max_tokens")

    for field in RECONFIGURING_FIELDS:
        if field in document and field not in allowed_fields:
            raise invalid(
                f"{field} reconfigures the model server and is not allowed by this "
                f"gateway; the operator can allow it with --allow-field {field}.",
                field,
                "field_not_allowed",
            )

    stream = document.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream must be true or false.", "stream")

    if document.get("model") is None:
        if "model" in document:  # "model": null; splicing would duplicate the key
            document["model"] = default_model
            return ChatRequest(json.dumps(document).encode(), default_model, bool(stream))
        return ChatRequest(_with_model(body, default_model), default_model, bool(stream))
    model = document["model"]
    if not isinstance(model, str) or not model:
        raise invalid("model must be a non-empty string.", "model")
    return ChatRequest(body, model, bool(stream))


def _with_model(body: bytes, model: str) -> bytes:
    """
    Add C{"model"} to a JSON object without re-encoding the rest of it.

    Splicing after the opening brace keeps the client's bytes (and their
    number formatting) exactly, and costs a copy rather than a serialisation.
    The body is known to be an object with at least C{messages} in it, so the
    first C{{} is its opening brace and a comma must follow the new member.
    """
    brace = body.index(b"{") + 1
    return body[:brace] + b'"model":' + json.dumps(model).encode() + b"," + body[brace:]
