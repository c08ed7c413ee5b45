"""`@kiln.enter`, `@kiln.exit`, `@kiln.method` and `@kiln.websocket`: the roles of a class's
methods (`@kiln.websocket` also marks a plain function as a WebSocket handler).

The decorators only mark the function (an attribute holding a `Hook`); `lifecycle(cls)` reads the
marks back, in definition order, and checks them. The replica calls `lifecycle` to know what to
run at bake time, after a restore, per call and at shutdown.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

from kiln.errors import InvalidSpec
from kiln.functions.signature import format_signature
from kiln.functions.tasks import SESSION_TASKS, Task

TaskName = Literal["chat", "completions", "embeddings", "image", "transcription", "speech"]
SessionTaskName = Literal["realtime"]
_TASKS = tuple(t.value for t in Task if t not in SESSION_TASKS)
_SESSION_TASKS = tuple(t.value for t in Task if t in SESSION_TASKS)

__all__ = [
    "Hook",
    "HookKind",
    "Lifecycle",
    "describe",
    "enter",
    "exit",
    "hook_of",
    "lifecycle",
    "method",
    "websocket",
]

_F = TypeVar("_F", bound=Callable[..., Any])
_ATTR = "__kiln_hook__"


class HookKind(enum.StrEnum):
    ENTER = "enter"
    EXIT = "exit"
    METHOD = "method"
    WEBSOCKET = "websocket"


@dataclass(frozen=True)
class Hook:
    kind: HookKind
    snap: bool = False
    task: str | None = None  # methods: the inference task served (kiln.functions.tasks.Task)

    @property
    def label(self) -> str:
        option = "snap=True" if self.snap else f'task="{self.task}"' if self.task else ""
        return f"@kiln.{self.kind.value}({option})"


@dataclass(frozen=True)
class Lifecycle:
    """The marked methods of a class, by name, each group in definition order."""

    enter_snap: tuple[str, ...] = ()  # run once at bake time; their effect is in the snapshot
    enter: tuple[str, ...] = ()  # run after every start or restore
    exit: tuple[str, ...] = ()  # run once when the replica stops
    # The entry points (methods and WebSocket handlers), addressed as APP/Class.method.
    methods: tuple[str, ...] = ()


@overload
def enter(fn: _F, /) -> _F: ...
@overload
def enter(fn: None = None, /, *, snap: bool = False) -> Callable[[_F], _F]: ...
def enter(fn: _F | None = None, /, *, snap: bool = False) -> _F | Callable[[_F], _F]:
    """Mark a method to run when a replica starts. With `snap=True` it runs once, at bake time,
    and what it builds (models, tensors, tokenizers) is restored from the snapshot instead."""
    if not isinstance(snap, bool):
        raise InvalidSpec(f"snap={snap!r} is not valid for @kiln.enter(): expected True or False.")
    return _decorator(fn, Hook(HookKind.ENTER, snap))


@overload
def exit(fn: _F, /) -> _F: ...
@overload
def exit(fn: None = None, /) -> Callable[[_F], _F]: ...
def exit(fn: _F | None = None, /) -> _F | Callable[[_F], _F]:
    """Mark a method to run once when the replica stops, after in-flight calls have finished."""
    return _decorator(fn, Hook(HookKind.EXIT))


@overload
def method(fn: _F, /) -> _F: ...
@overload
def method(fn: None = None, /, *, task: TaskName | None = None) -> Callable[[_F], _F]: ...
def method(fn: _F | None = None, /, *, task: TaskName | None = None) -> _F | Callable[[_F], _F]:
    """Mark a method of an `@app.cls` class as an entry point, called as `APP/Class.method`.

    With `task=` it also serves that task behind the OpenAI-compatible routes, as the model
    named after the app: "chat" and "completions" methods take a `kiln.ChatRequest` or
    `kiln.CompletionRequest` and yield text deltas (optionally ending with a `kiln.Finish`);
    "embeddings" returns `kiln.Embeddings` for a `kiln.EmbeddingsRequest`; "image" returns
    `kiln.Images` for a `kiln.ImageRequest`; "transcription" returns a `kiln.Transcription`
    for a `kiln.TranscriptionRequest`; "speech" yields `kiln.Audio` for a
    `kiln.SpeechRequest`."""
    if task is not None and task not in _TASKS:
        raise InvalidSpec(
            f"task={task!r} is not valid for @kiln.method(): expected one of "
            f"{', '.join(repr(t) for t in _TASKS)}."
        )
    return _decorator(fn, Hook(HookKind.METHOD, task=task))


@overload
def websocket(fn: _F, /) -> _F: ...
@overload
def websocket(fn: None = None, /, *, task: SessionTaskName | None = None) -> Callable[[_F], _F]: ...
def websocket(
    fn: _F | None = None, /, *, task: SessionTaskName | None = None
) -> _F | Callable[[_F], _F]:
    """Mark an `async def handler(session)` (a method of an `@app.cls` class, or a function
    under `@app.function`) as a WebSocket handler, opened as `WS /v1/ws/APP/NAME`. It gets a
    `kiln.Session` and runs for as long as the session lasts.

    With `task="realtime"` it also serves `WS /v1/realtime?model=APP`, where clients speak
    OpenAI's Realtime protocol (the handler speaks it too: `kiln.catalog.realtime`)."""
    if task is not None and task not in _SESSION_TASKS:
        raise InvalidSpec(
            f"task={task!r} is not valid for @kiln.websocket(): expected one of "
            f"{', '.join(repr(t) for t in _SESSION_TASKS)}."
        )
    return _decorator(fn, Hook(HookKind.WEBSOCKET, task=task))


def hook_of(obj: object) -> Hook | None:
    hook = getattr(obj, _ATTR, None)
    return hook if isinstance(hook, Hook) else None


def lifecycle(cls: type) -> Lifecycle:
    """The hooks and entry points of `cls`, base classes first; raises `InvalidSpec` when a mark
    is misplaced or the class has no entry point."""
    marked: dict[str, Hook] = {}
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            inner = attr.__func__ if isinstance(attr, staticmethod | classmethod) else attr
            hook = hook_of(inner)
            if hook is None:
                # An override without a mark takes the name out of the roles.
                marked.pop(name, None)
                continue
            if inner is not attr:
                raise InvalidSpec(
                    f"{cls.__name__}.{name} is a {type(attr).__name__}, but {hook.label} needs a "
                    f"regular method that takes self; remove @{type(attr).__name__}."
                )
            _check_parameters(cls, name, inner, hook)
            marked[name] = hook

    def named(kind: HookKind, snap: bool = False) -> tuple[str, ...]:
        return tuple(n for n, h in marked.items() if h.kind is kind and h.snap is snap)

    found = Lifecycle(
        enter_snap=named(HookKind.ENTER, snap=True),
        enter=named(HookKind.ENTER),
        exit=named(HookKind.EXIT),
        methods=tuple(n for n, h in marked.items() if h.kind in _ENTRY_POINTS),
    )
    if not found.methods:
        raise InvalidSpec(
            f"class {cls.__name__!r} has no entry points: mark at least one method with "
            "@kiln.method() (or @kiln.websocket())."
        )
    return found


_ENTRY_POINTS = (HookKind.METHOD, HookKind.WEBSOCKET)


def describe(obj: object) -> str:
    """A short phrase for an object a decorator did not expect."""
    if inspect.isclass(obj):
        return f"class {obj.__name__!r}"
    if isinstance(obj, staticmethod | classmethod | property):
        return f"a {type(obj).__name__}"
    shown = repr(obj)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({type(obj).__name__})"


def _decorator(fn: _F | None, hook: Hook) -> _F | Callable[[_F], _F]:
    if fn is None:
        return lambda f: _mark(f, hook)
    return _mark(fn, hook)


def _mark(fn: _F, hook: Hook) -> _F:
    if isinstance(fn, staticmethod | classmethod):
        raise InvalidSpec(
            f"{hook.label} cannot mark a {type(fn).__name__}: entry points and hooks are regular "
            f"methods that take self; remove @{type(fn).__name__}."
        )
    if not inspect.isfunction(fn):
        hint = (
            " (its option is keyword-only: @kiln.enter(snap=True))"
            if hook.kind is HookKind.ENTER
            else ""
        )
        raise InvalidSpec(
            f"{hook.label} must decorate a method defined with def, not {describe(fn)}{hint}."
        )
    existing = hook_of(fn)
    if existing is not None and existing != hook:
        raise InvalidSpec(
            f"{fn.__qualname__} is marked both {existing.label} and {hook.label}; a method has "
            "one role, so split it into two methods."
        )
    setattr(fn, _ATTR, hook)
    return fn


def _check_parameters(cls: type, name: str, fn: Callable[..., Any], hook: Hook) -> None:
    where = f"{cls.__name__}.{name}"
    signature = format_signature(fn)
    params = list(inspect.signature(fn).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or params[0].kind not in positional:
        raise InvalidSpec(
            f"{hook.label} {where}{signature} has no self parameter: Kiln calls it on an "
            "instance of the class, so make self its first parameter."
        )
    if hook.kind in _ENTRY_POINTS:
        return
    required = [
        p.name
        for p in params[1:]
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise InvalidSpec(
            f"{hook.label} {where}{signature} needs {', '.join(required)}, but hooks are called "
            "with self only; give those parameters defaults."
        )
