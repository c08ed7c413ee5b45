"""The inference tasks a method can serve behind Kiln's OpenAI-compatible routes, and the values
that cross between the router and such a method.

A method marked `@kiln.method(task="chat")` is called with one `ChatRequest` (already validated
by the router against OpenAI's API) and yields text deltas, optionally ending with a `Finish`
that says why it stopped and how many tokens it read and wrote. `"completions"` is the same with
a `CompletionRequest`. `"embeddings"` returns `Embeddings` (or a plain list of vectors) for an
`EmbeddingsRequest`; `"image"` returns `Images` (PNG bytes) for an `ImageRequest`.

Requests travel as JSON objects (`to_wire` / `from_wire`, unknown keys ignored so an older
replica reads a newer router's request); outputs travel as JSON too. Standard library only: the
SDK, the router and the replica all import this module.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypeVar

__all__ = [
    "GENERATOR_TASKS",
    "ChatRequest",
    "CompletionRequest",
    "Embeddings",
    "EmbeddingsRequest",
    "Finish",
    "ImageRequest",
    "Images",
    "Message",
    "Task",
    "embeddings_from_wire",
    "images_from_wire",
    "request_from_wire",
]


class Task(enum.StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    IMAGE = "image"


# Tasks whose method is a generator of text deltas (the others return one value).
GENERATOR_TASKS = frozenset({Task.CHAT, Task.COMPLETIONS})

_R = TypeVar("_R")


@dataclass(frozen=True, kw_only=True)
class Message:
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str


@dataclass(frozen=True, kw_only=True)
class _Sampling:
    """The sampling options chat and completions share, as OpenAI names them. `max_tokens` is
    None when the caller set no limit (the engine then stops at its context's end)."""

    model: str = ""
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ChatRequest(_Sampling):
    messages: tuple[Message, ...] = ()


@dataclass(frozen=True, kw_only=True)
class CompletionRequest(_Sampling):
    prompt: str = ""
    echo: bool = False


@dataclass(frozen=True, kw_only=True)
class EmbeddingsRequest:
    model: str = ""
    input: tuple[str, ...] = ()
    # Shorten each vector to this many dimensions (then renormalise), where the model allows.
    dimensions: int | None = None


@dataclass(frozen=True, kw_only=True)
class ImageRequest:
    model: str = ""
    prompt: str = ""
    n: int = 1
    size: str = "512x512"
    seed: int | None = None
    steps: int | None = None  # inference steps; None: the engine's default

    @property
    def width_height(self) -> tuple[int, int]:
        width, _, height = self.size.partition("x")
        return int(width), int(height)


@dataclass(frozen=True, kw_only=True)
class Finish:
    """The last item a chat or completions method may yield: why it stopped ("stop": a natural
    end or a stop sequence; "length": `max_tokens` or the context ran out) and the tokens it
    read and wrote. Without one, the router reports "stop" and counts one token per delta."""

    reason: Literal["stop", "length"] = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"finish": asdict(self)}


@dataclass(frozen=True, kw_only=True)
class Embeddings:
    vectors: Sequence[Sequence[float]]
    prompt_tokens: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "vectors": [[float(x) for x in vector] for vector in self.vectors],
            "prompt_tokens": self.prompt_tokens,
        }


@dataclass(frozen=True, kw_only=True)
class Images:
    png: Sequence[bytes] = field(default_factory=tuple)

    def to_wire(self) -> dict[str, Any]:
        return {"png": [base64.b64encode(image).decode() for image in self.png]}


_REQUESTS: dict[Task, type[Any]] = {
    Task.CHAT: ChatRequest,
    Task.COMPLETIONS: CompletionRequest,
    Task.EMBEDDINGS: EmbeddingsRequest,
    Task.IMAGE: ImageRequest,
}


def request_from_wire(task: Task, data: Mapping[str, Any]) -> Any:
    """The request object a `task` method receives, from the JSON the router sent."""
    cls = _REQUESTS[task]
    known = {f.name for f in fields(cls)}
    values = {key: value for key, value in data.items() if key in known}
    if "messages" in values:
        values["messages"] = tuple(Message(**m) for m in values["messages"])
    for name in ("stop", "input"):
        if name in values:
            values[name] = tuple(values[name])
    return cls(**values)


def to_wire(request: Any) -> dict[str, Any]:
    """The JSON object for a request (the router's side of `request_from_wire`)."""
    return asdict(request)


def embeddings_from_wire(data: Any) -> Embeddings:
    """What an embeddings method returned, as the router reads it: `Embeddings`' wire form or
    a plain list of vectors."""
    if isinstance(data, list):
        return Embeddings(vectors=data)
    return Embeddings(vectors=data["vectors"], prompt_tokens=int(data.get("prompt_tokens", 0)))


def images_from_wire(data: Any) -> list[str]:
    """The base64 PNGs an image method returned."""
    return [str(image) for image in data["png"]]
