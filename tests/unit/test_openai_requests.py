"""The OpenAI-compatible routes' bodies and error shape (`kiln.router.openai`), and the SDK's
side of tasks (`@kiln.method(task=...)`, `kiln.functions.tasks`, a replica's `Target`), without
a running platform. The e2e test (tests/integration/test_openai_e2e.py) covers the rest."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any, get_args

import pytest

import kiln
from kiln.errors import (
    FunctionTimeout,
    InternalError,
    InvalidRequest,
    InvalidSpec,
    KilnError,
    ModelNotFound,
    PaymentRequired,
    RateLimited,
)
from kiln.functions.hooks import SessionTaskName, TaskName
from kiln.functions.spec import FunctionSpec
from kiln.functions.tasks import SESSION_TASKS, Task, request_from_wire, to_wire
from kiln.invoker.target import build_target
from kiln.router.openai.calls import OpenStream
from kiln.router.openai.chat import _events, _item, _Outcome, _Shape
from kiln.router.openai.errors import openai_body
from kiln.router.openai.requests import (
    chat_call,
    completion_call,
    embeddings_call,
    image_call,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refused(call: Any, body: dict[str, Any]) -> tuple[str | None, str]:
    with pytest.raises(InvalidRequest) as caught:
        call(body)
    return caught.value.fields.get("param"), caught.value.message


def test_a_chat_body_becomes_the_request_a_method_receives() -> None:
    asked = chat_call(
        {**CHAT, "max_completion_tokens": 5, "temperature": 0, "stop": "\n", "seed": 3,
         "stream": True, "stream_options": {"include_usage": True}, "user": "u1"}
    )  # fmt: skip
    assert asked.stream
    assert asked.include_usage
    request = asked.request
    assert (request.model, request.max_tokens, request.temperature) == ("m", 5, 0.0)
    assert (request.stop, request.seed, request.top_p) == (("\n",), 3, 1.0)
    assert request.messages == (kiln.Message(role="user", content="hi"),)
    assert request_from_wire(Task.CHAT, to_wire(request)) == request


def test_text_parts_are_joined_and_other_parts_refused() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    asked = chat_call({"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert asked.request.messages[0].content == "ab"
    image = [*parts, {"type": "image_url", "image_url": {"url": "x"}}]
    assert refused(chat_call, {"model": "m", "messages": [{"role": "user", "content": image}]}) == (
        "messages[0].content[2]",
        'messages[0].content[2] is a image_url part: this deployment reads text only ({"type": '
        '"text", "text": "..."})',
    )


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        ({"model": ""}, "model", "model is required: the name of one of your deployments"),
        ({"colour": "red"}, "colour", "Unrecognized request argument supplied: colour"),
        ({"messages": "hi"}, "messages",
         "messages must be a non-empty list of {role, content} objects"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role",
         "messages[0].role='tool' is not supported: no tools are"),
        ({"messages": [{"role": "user"}]}, "messages[0].content",
         "messages[0].content must be a string or a non-empty list of text parts"),
        ({"temperature": 3}, "temperature", "temperature=3 is not valid: expected 0 to 2"),
        ({"temperature": "hot"}, "temperature",
         "temperature='hot' is not valid: expected a number"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens=0 is not valid: expected at least 1"),
        ({"max_tokens": True}, "max_tokens", "max_tokens=True is not valid: expected an integer"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens",
         "max_tokens=5 and max_completion_tokens=6 disagree; send max_completion_tokens only"),
        ({"n": 3}, "n", "n=3 is not supported: a deployment makes one choice per request "
         "(send several requests instead)"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "stop=['a', 'b', 'c', 'd', 'e'] is not "
         "valid: expected a string or a list of up to 4 non-empty strings"),
        ({"stream_options": {"include_usage": True}}, "stream_options",
         "stream_options is only allowed when stream is true"),
        ({"tools": [{"type": "function"}]}, "tools", "tools are not supported by Kiln's "
         "deployments yet"),
        ({"tool_choice": "required"}, "tool_choice",
         "tool_choice='required' is not supported: no tools are supported"),
        ({"response_format": {"type": "json_object"}}, "response_format",
         "response_format={'type': 'json_object'} is not supported: deployments answer in text "
         '({"type": "text"})'),
        ({"logprobs": True}, "logprobs", "logprobs are not supported by Kiln's deployments"),
        ({"presence_penalty": -2.5}, "presence_penalty",
         "presence_penalty=-2.5 is not valid: expected -2 to 2"),
    ],
)  # fmt: skip
def test_chat_refusals_name_the_param(change: dict[str, Any], param: str, message: str) -> None:
    assert refused(chat_call, {**CHAT, **change}) == (param, message)


def test_null_means_not_given() -> None:
    asked = chat_call({**CHAT, "max_tokens": None, "n": None, "stop": None, "temperature": None})
    assert asked.request.max_tokens is None
    assert asked.request.temperature == 1.0


def test_completions_default_to_sixteen_tokens_as_openai_does() -> None:
    assert completion_call({"model": "m", "prompt": "a"}).request.max_tokens == 16
    assert completion_call({"model": "m", "prompt": ["a"], "echo": True}).request.echo
    assert refused(completion_call, {"model": "m", "prompt": ["a", "b"]}) == (
        "prompt",
        "prompt must be one string (several prompts or token ids are not supported: send one "
        "request per prompt)",
    )
    assert refused(completion_call, {"model": "m", "prompt": "a", "suffix": "z"})[0] == "suffix"
    assert refused(completion_call, {"model": "m", "prompt": "a", "best_of": 2})[0] == "best_of"


def test_embeddings_bodies() -> None:
    asked = embeddings_call({"model": "m", "input": "one", "encoding_format": "base64"})
    assert asked.base64
    assert asked.request.input == ("one",)
    assert embeddings_call({"model": "m", "input": ["a", "b"], "dimensions": 8}).request == (
        kiln.EmbeddingsRequest(model="m", input=("a", "b"), dimensions=8)
    )
    assert refused(embeddings_call, {"model": "m", "input": []}) == (
        "input",
        "input must be a string or a non-empty list of strings",
    )
    assert refused(embeddings_call, {"model": "m", "input": ["a", 7]}) == (
        "input[1]",
        "input[1]=7 is not valid: expected a string (token ids are not supported: send text)",
    )
    assert refused(embeddings_call, {"model": "m", "input": ["a", ""]}) == (
        "input[1]",
        "input[1] is empty: expected non-empty text",
    )
    assert refused(embeddings_call, {"model": "m", "input": "a", "encoding_format": "int8"}) == (
        "encoding_format",
        "encoding_format='int8' is not valid: expected 'float' or 'base64'",
    )


def test_image_bodies() -> None:
    request = image_call({"model": "m", "prompt": "a cat", "n": 2, "size": "256x128"}).request
    assert (request.n, request.size, request.width_height) == (2, "256x128", (256, 128))
    assert image_call({"model": "m", "prompt": "a cat", "size": "auto"}).request.size == "512x512"
    assert refused(image_call, {"model": "m", "prompt": "a", "size": "huge"}) == (
        "size",
        "size='huge' is not valid: expected WIDTHxHEIGHT with each side 64 to 2048 pixels, such "
        "as '512x512', or 'auto'",
    )
    assert refused(image_call, {"model": "m", "prompt": "a", "n": 11})[0] == "n"
    assert refused(image_call, {"model": "m", "prompt": " "})[0] == "prompt"
    assert refused(image_call, {"model": "m", "prompt": "a", "response_format": "url"}) == (
        "response_format",
        "response_format='url' is not supported: deployments return images as b64_json",
    )


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ModelNotFound("The model 'x' does not exist", param="model"), "invalid_request_error"),
        (PaymentRequired("top up"), "insufficient_quota"),
        (RateLimited("slow down"), "rate_limit_error"),
        (InternalError("a secret stack trace"), "server_error"),
    ],
)
def test_errors_take_openais_shape(error: KilnError, kind: str) -> None:
    body = openai_body(error)["error"]
    assert body["type"] == kind
    assert body["code"] == error.code
    assert body["param"] == error.fields.get("param")
    assert body["message"] == error.public_message  # a 5xx shows nothing of the bug
    assert "secret" not in body["message"]


def test_a_streamed_chunk_is_openais() -> None:
    shape = _Shape(True, "m", "req1")
    for text in ("plain", 'quo"ted\n', "h\u00e9", "\x00"):  # a delta is spliced in as it came
        assert shape.delta(json.dumps(text).encode()) == shape.chunk(text)
    role = json.loads(shape.chunk(None, role=True).removeprefix(b"data: "))
    assert role["id"] == "chatcmpl-req1"
    assert role["object"] == "chat.completion.chunk"
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
         "finish_reason": None}
    ]  # fmt: skip
    outcome = _Outcome()
    assert _item(b'"hel"', outcome) == "hel"
    assert _item(b'{"finish":{"reason":"length","prompt_tokens":3,"completion_tokens":9}}',
                 outcome) is None  # fmt: skip
    assert outcome.usage == {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}
    silent = _Outcome()
    for _ in range(4):
        _item(b'"x"', silent)
    assert silent.usage["completion_tokens"] == 4  # no Finish: one token per delta
    with pytest.raises(KilnError, match=r"yields str deltas and, last, a kiln\.Finish"):
        _item(b"[1, 2]", outcome)


# The SDK's side ---------------------------------------------------------------------------------


def test_the_task_names_are_the_tasks() -> None:
    assert set(get_args(TaskName)) == {t.value for t in Task if t not in SESSION_TASKS}
    assert set(get_args(SessionTaskName)) == {t.value for t in SESSION_TASKS}


def test_task_methods_are_checked_at_decoration() -> None:
    with pytest.raises(InvalidSpec, match=r"^task='chatt' is not valid for @kiln.method\(\): "):
        kiln.method(task="chatt")  # type: ignore[call-overload]
    app = kiln.App("checks")
    with pytest.raises(InvalidSpec, match="must be a generator: yield the text as it is made"):

        @app.cls()
        class Returns:
            @kiln.method(task="chat")
            def chat(self, request: kiln.ChatRequest) -> str:
                return "no"

    with pytest.raises(InvalidSpec, match="must return its result"):

        @app.cls()
        class Yields:
            @kiln.method(task="embeddings")
            def embed(self, request: kiln.EmbeddingsRequest) -> Iterator[str]:
                yield "no"

    with pytest.raises(InvalidSpec, match="must take exactly one argument, the validated"):

        @app.cls()
        class TwoArguments:
            @kiln.method(task="image")
            def paint(self, request: kiln.ImageRequest, extra: int) -> kiln.Images:
                return kiln.Images()


def test_a_task_travels_in_the_spec_and_old_specs_have_none() -> None:
    app = kiln.App("tasks")

    @app.cls()
    class Model:
        @kiln.method(task="chat")
        def chat(self, request: kiln.ChatRequest) -> Iterator[str]:
            yield "hi"

        @kiln.method()
        def plain(self) -> int:
            return 1

    (spec,) = app.spec()
    data = json.loads(json.dumps(spec.to_dict()))
    assert FunctionSpec.from_dict(data).tasks() == {"chat": "chat"}
    del data["entries"]["chat"]["task"]  # a spec written before tasks existed
    assert FunctionSpec.from_dict(data).tasks() == {}


def test_a_replica_hands_a_task_method_its_request_and_sends_its_outputs() -> None:
    app = kiln.App("served")

    @app.cls(concurrency=2)
    class Served:
        @kiln.method(task="chat")
        def chat(self, request: kiln.ChatRequest) -> Iterator[Any]:
            yield f"{type(request).__name__}:{request.messages[0].content}"
            yield kiln.Finish(reason="length", prompt_tokens=2, completion_tokens=1)

        @kiln.method(task="embeddings")
        def embed(self, request: kiln.EmbeddingsRequest) -> kiln.Embeddings:
            return kiln.Embeddings(vectors=[[0.5] * 2 for _ in request.input], prompt_tokens=4)

        @kiln.method(task="image")
        def paint(self, request: kiln.ImageRequest) -> kiln.Images:
            return kiln.Images(png=[b"\x89PNG"] * request.n)

    (spec,) = app.spec()
    target = build_target(spec, Served)

    async def run() -> tuple[list[bytes], bytes, bytes]:
        await target.instantiate()
        body = json.dumps(
            [to_wire(kiln.ChatRequest(messages=(kiln.Message(role="user", content="hi"),)))]
        )
        chunks = [c async for c in target.stream("chat", body.encode(), "application/json")]
        embedded = await target.call(
            "embed", json.dumps([{"input": ["a", "b"]}]).encode(), "application/json"
        )
        painted = await target.call("paint", json.dumps([{"n": 2}]).encode(), "application/json")
        return chunks, embedded.body, painted.body

    try:
        chunks, embedded, painted = asyncio.run(run())
    finally:
        target.executor.shutdown()
    assert json.loads(chunks[0]) == "ChatRequest:hi"
    assert json.loads(chunks[1]) == {
        "finish": {"reason": "length", "prompt_tokens": 2, "completion_tokens": 1}
    }
    assert json.loads(embedded) == {"vectors": [[0.5, 0.5], [0.5, 0.5]], "prompt_tokens": 4}
    assert json.loads(painted) == {"png": [base64.b64encode(b"\x89PNG").decode()] * 2}


def test_a_task_method_called_with_a_wrong_body_says_what_it_takes() -> None:
    app = kiln.App("strict")

    @app.cls()
    class Strict:
        @kiln.method(task="embeddings")
        def embed(self, request: kiln.EmbeddingsRequest) -> kiln.Embeddings:
            return kiln.Embeddings(vectors=[])

    (spec,) = app.spec()
    target = build_target(spec, Strict)

    async def run() -> None:
        await target.instantiate()
        await target.call("embed", b'["not an object"]', "application/json")

    with pytest.raises(KilnError, match=r"embed serves the 'embeddings' task: it takes one JSON"):
        asyncio.run(run())
    target.executor.shutdown()


class _Stream:
    """A replica's stream that sends `chunks`, then fails with `error`."""

    def __init__(self, chunks: list[bytes], error: KilnError) -> None:
        self.chunks = chunks
        self.error = error
        self.abandoned = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        raise self.error

    def abandon(self) -> None:
        self.abandoned = True


class _Watch:
    def __init__(self) -> None:
        self.outcome: tuple[str, Any] | None = None

    def count_tokens(self, prompt: int, completion: int) -> None:
        raise AssertionError("a failed stream counts no tokens")

    def succeeded(self, sent: int) -> None:
        self.outcome = ("succeeded", sent)

    def failed(self, code: str, sent: int = 0) -> None:
        self.outcome = ("failed", code)

    def cancelled(self, sent: int = 0) -> None:
        self.outcome = ("cancelled", sent)


def test_an_error_after_the_stream_began_is_a_data_event_then_done() -> None:
    released = []

    async def release() -> None:
        released.append(True)

    stream = _Stream([b'" world"'], FunctionTimeout("the stream did not finish in time"))
    watch = _Watch()
    opened = OpenStream(stream, watch, release)  # type: ignore[arg-type]

    async def read() -> list[bytes]:
        outcome = _Outcome()
        events = _events(opened, _Shape(True, "m", "r"), b'"hello"', outcome, True)
        return [event async for event in events]

    events = asyncio.run(read())
    data = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert [d["choices"][0]["delta"] for d in data[:3]] == [
        {"role": "assistant", "content": ""},
        {"content": "hello"},
        {"content": " world"},
    ]
    assert data[3] == {
        "error": {
            "message": "The call did not finish within its timeout.",
            "type": "server_error",
            "param": None,
            "code": "timeout",
        }
    }
    assert events[-1] == b"data: [DONE]\n\n"
    assert watch.outcome == ("failed", "timeout")
    assert stream.abandoned
    assert released == [True]
