"""The bodies of the OpenAI-compatible routes, checked against OpenAI's API and turned into the
requests a task method receives (`kiln.functions.tasks`).

Every refusal is an `InvalidRequest` with `param` naming the field as OpenAI does
(`messages[1].content`), in words that say what is allowed. What OpenAI accepts and Kiln does not
do (several choices, tools, log probabilities, URLs for images) is refused by name rather than
ignored; fields that change nothing here (`user`, `metadata`, `store`, `service_tier`) are
accepted; a field OpenAI does not have is refused as OpenAI refuses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kiln.errors import InvalidRequest
from kiln.functions.tasks import (
    ChatRequest,
    CompletionRequest,
    EmbeddingsRequest,
    ImageRequest,
    Message,
)

__all__ = [
    "ChatCall",
    "CompletionCall",
    "EmbeddingsCall",
    "ImageCall",
    "chat_call",
    "completion_call",
    "embeddings_call",
    "image_call",
    "model_of",
]

_ROLES = ("system", "developer", "user", "assistant")
_MAX_STOP = 4
_MAX_INPUTS = 2048
_MAX_IMAGES = 10
# Accepted and ignored: they change nothing about what a deployment computes.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
_SAMPLING = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
     "presence_penalty", "frequency_penalty", "seed", "logprobs", "logit_bias"}
)  # fmt: skip
_CHAT_FIELDS = _SAMPLING | _IGNORED | {
    "messages", "max_completion_tokens", "tools", "tool_choice", "functions", "function_call",
    "top_logprobs", "response_format", "modalities", "audio", "prediction", "reasoning_effort",
}  # fmt: skip
_COMPLETION_FIELDS = _SAMPLING | _IGNORED | {"prompt", "echo", "suffix", "best_of"}
_EMBEDDINGS_FIELDS = _IGNORED | {"model", "input", "encoding_format", "dimensions"}
_IMAGE_FIELDS = _IGNORED | {
    "model", "prompt", "n", "size", "response_format", "quality", "style", "output_format",
    "background", "moderation", "output_compression",
}  # fmt: skip


@dataclass(frozen=True)
class ChatCall:
    request: ChatRequest
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class CompletionCall:
    request: CompletionRequest
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class EmbeddingsCall:
    request: EmbeddingsRequest
    base64: bool


@dataclass(frozen=True)
class ImageCall:
    request: ImageRequest


def _refuse(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _object(data: Any, known: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    for key in data:
        if key not in known:
            raise _refuse(key, f"Unrecognized request argument supplied: {key}")
    return {key: value for key, value in data.items() if value is not None}


def model_of(data: Any) -> str:
    """The `model` of a body, which every route needs first."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, str) or not model.strip():
        raise _refuse("model", "model is required: the name of one of your deployments")
    return model


def _number(data: Mapping[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _refuse(name, f"{name}={value!r} is not valid: expected a number")
    if not low <= value <= high:
        raise _refuse(name, f"{name}={value!r} is not valid: expected {low:g} to {high:g}")
    return float(value)


def _integer(data: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(name, f"{name}={value!r} is not valid: expected an integer")
    if value < low or (high is not None and value > high):
        allowed = f"at least {low}" if high is None else f"{low} to {high}"
        raise _refuse(name, f"{name}={value!r} is not valid: expected {allowed}")
    return value


def _boolean(data: Mapping[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise _refuse(name, f"{name}={value!r} is not valid: expected true or false")
    return value


def _unsupported(data: Mapping[str, Any], name: str, allowed: tuple[Any, ...], why: str) -> None:
    value = data.get(name)
    if value is not None and value not in allowed:
        raise _refuse(name, f"{name}={value!r} is not supported: {why}")


def _one_choice(data: Mapping[str, Any]) -> None:
    if _integer(data, "n", 1) not in (None, 1):
        raise _refuse(
            "n", f"n={data['n']!r} is not supported: a deployment makes one choice per request "
            "(send several requests instead)"
        )  # fmt: skip


def _streaming(data: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _boolean(data, "stream")
    options = data.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise _refuse("stream_options", "stream_options is only allowed when stream is true")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise _refuse(
            "stream_options",
            f'stream_options={options!r} is not valid: expected {{"include_usage": true}}',
        )
    return stream, _boolean(options, "include_usage")


def _stop(data: Mapping[str, Any]) -> tuple[str, ...]:
    stop = data.get("stop", ())
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list | tuple)
        or len(stop) > _MAX_STOP
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise _refuse(
            "stop", f"stop={data['stop']!r} is not valid: expected a string or a list of up to "
            f"{_MAX_STOP} non-empty strings"
        )  # fmt: skip
    return tuple(stop)


def _sampling(data: Mapping[str, Any], model: str) -> dict[str, Any]:
    _one_choice(data)
    if data.get("logprobs") not in (None, False, 0):
        raise _refuse("logprobs", "logprobs are not supported by Kiln's deployments")
    if data.get("logit_bias"):
        raise _refuse("logit_bias", "logit_bias is not supported by Kiln's deployments")
    return {
        "model": model,
        "temperature": _number(data, "temperature", 0, 2, 1.0),
        "top_p": _number(data, "top_p", 0, 1, 1.0),
        "seed": _integer(data, "seed", -(2**63)),
        "stop": _stop(data),
        "presence_penalty": _number(data, "presence_penalty", -2, 2, 0.0),
        "frequency_penalty": _number(data, "frequency_penalty", -2, 2, 0.0),
    }


def chat_call(body: Any) -> ChatCall:
    model = model_of(body)
    data = _object(body, _CHAT_FIELDS)
    if data.get("tools") or data.get("functions"):
        name = "tools" if data.get("tools") else "functions"
        raise _refuse(name, f"{name} are not supported by Kiln's deployments yet")
    _unsupported(data, "tool_choice", ("none", "auto"), "no tools are supported")
    _unsupported(data, "function_call", ("none", "auto"), "no functions are supported")
    _unsupported(data, "top_logprobs", (0,), "log probabilities are not supported")
    format_ = data.get("response_format")
    if format_ is not None and format_ != {"type": "text"}:
        raise _refuse("response_format", f"response_format={format_!r} is not supported: "
                      'deployments answer in text ({"type": "text"})')  # fmt: skip
    _unsupported(data, "modalities", (["text"],), 'deployments answer in text (["text"])')
    for name in ("audio", "prediction", "reasoning_effort"):
        if name in data:
            raise _refuse(name, f"{name} is not supported by Kiln's deployments")
    max_tokens = _integer(data, "max_tokens", 1)
    newer = _integer(data, "max_completion_tokens", 1)
    if max_tokens is not None and newer is not None and max_tokens != newer:
        raise _refuse(
            "max_tokens", f"max_tokens={max_tokens} and max_completion_tokens={newer} disagree; "
            "send max_completion_tokens only"
        )  # fmt: skip
    stream, usage = _streaming(data)
    request = ChatRequest(
        messages=_messages(data.get("messages")),
        max_tokens=newer if newer is not None else max_tokens,
        **_sampling(data, model),
    )
    return ChatCall(request, stream, usage)


def _messages(messages: Any) -> tuple[Message, ...]:
    if not isinstance(messages, list) or not messages:
        raise _refuse("messages", "messages must be a non-empty list of {role, content} objects")
    return tuple(_message(i, m) for i, m in enumerate(messages))


def _message(index: int, message: Any) -> Message:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _refuse(where, f"{where} must be an object with role and content")
    role = message.get("role")
    if role in ("tool", "function"):
        raise _refuse(f"{where}.role", f"{where}.role={role!r} is not supported: no tools are")
    if role not in _ROLES:
        allowed = ", ".join(repr(r) for r in _ROLES)
        raise _refuse(f"{where}.role", f"{where}.role={role!r} is not valid: expected {allowed}")
    if message.get("tool_calls"):
        raise _refuse(f"{where}.tool_calls", "tool calls are not supported by Kiln's deployments")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    return Message(role=role, content=_text_content(f"{where}.content", content))


def _text_content(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise _refuse(
                    f"{where}[{i}]", f"{where}[{i}] is a {kind or 'malformed'} part: this "
                    'deployment reads text only ({"type": "text", "text": "..."})'
                )  # fmt: skip
            texts.append(part["text"])
        return "".join(texts)
    raise _refuse(where, f"{where} must be a string or a non-empty list of text parts")


def completion_call(body: Any) -> CompletionCall:
    model = model_of(body)
    data = _object(body, _COMPLETION_FIELDS)
    prompt = data.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _refuse("prompt", "prompt must be one string (several prompts or token ids are not "
                      "supported: send one request per prompt)")  # fmt: skip
    if data.get("suffix"):
        raise _refuse("suffix", "suffix is not supported by Kiln's deployments")
    _unsupported(data, "best_of", (1,), "a deployment makes one choice per request")
    stream, usage = _streaming(data)
    max_tokens = _integer(data, "max_tokens", 1)
    request = CompletionRequest(
        prompt=prompt,
        echo=_boolean(data, "echo"),
        max_tokens=16 if max_tokens is None else max_tokens,  # OpenAI's default for this route
        **_sampling(data, model),
    )
    return CompletionCall(request, stream, usage)


def embeddings_call(body: Any) -> EmbeddingsCall:
    model = model_of(body)
    data = _object(body, _EMBEDDINGS_FIELDS)
    given = data.get("input")
    inputs = [given] if isinstance(given, str) else given
    if not isinstance(inputs, list) or not inputs:
        raise _refuse("input", "input must be a string or a non-empty list of strings")
    if len(inputs) > _MAX_INPUTS:
        raise _refuse("input", f"input has {len(inputs)} items; the limit is {_MAX_INPUTS}")
    for i, text in enumerate(inputs):
        if not isinstance(text, str):
            raise _refuse(f"input[{i}]", f"input[{i}]={text!r} is not valid: expected a string "
                          "(token ids are not supported: send text)")  # fmt: skip
        if not text:
            raise _refuse(f"input[{i}]", f"input[{i}] is empty: expected non-empty text")
    encoding = data.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _refuse("encoding_format", f"encoding_format={encoding!r} is not valid: expected "
                      "'float' or 'base64'")  # fmt: skip
    request = EmbeddingsRequest(
        model=model, input=tuple(inputs), dimensions=_integer(data, "dimensions", 1)
    )
    return EmbeddingsCall(request, encoding == "base64")


def image_call(body: Any) -> ImageCall:
    model = model_of(body)
    data = _object(body, _IMAGE_FIELDS)
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _refuse("prompt", "prompt is required: a description of the image")
    _unsupported(data, "response_format", ("b64_json",),
                 "deployments return images as b64_json")  # fmt: skip
    _unsupported(data, "output_format", ("png",), "deployments return PNG images")
    size = data.get("size", "auto")
    if size == "auto":
        size = ImageRequest().size
    width, _, height = str(size).partition("x")
    if not (
        isinstance(size, str)
        and width.isdigit()
        and height.isdigit()
        and 64 <= int(width) <= 2048
        and 64 <= int(height) <= 2048
    ):
        raise _refuse("size", f"size={size!r} is not valid: expected WIDTHxHEIGHT with each "
                      "side 64 to 2048 pixels, such as '512x512', or 'auto'")  # fmt: skip
    n = _integer(data, "n", 1, _MAX_IMAGES)
    return ImageCall(ImageRequest(model=model, prompt=prompt, n=n or 1, size=size))
