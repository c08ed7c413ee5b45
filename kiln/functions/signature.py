"""How an entry point is called, read from its Python definition: one reply or a stream, sync
or async, and the signature shown to callers whose arguments do not match."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from kiln.errors import InvalidSpec
from kiln.functions.spec import CallKind, CallSpec
from kiln.functions.tasks import GENERATOR_TASKS, Task

__all__ = ["call_spec", "format_signature"]


def call_spec(name: str, fn: Callable[..., Any], *, method: bool) -> CallSpec:
    """The `CallSpec` of a function, or of a method (its signature then omits `self`)."""
    hook = getattr(fn, "__kiln_hook__", None)
    if getattr(hook, "kind", None) == "websocket":
        _check_websocket(name, fn, method=method)
        kind, is_async = CallKind.WEBSOCKET, True
    elif inspect.isasyncgenfunction(fn):
        kind, is_async = CallKind.GENERATOR, True
    elif inspect.isgeneratorfunction(fn):
        kind, is_async = CallKind.GENERATOR, False
    else:
        kind, is_async = CallKind.FUNCTION, inspect.iscoroutinefunction(fn)
    signature = format_signature(fn, drop_first=method)
    task = getattr(hook, "task", None)
    if task is not None and kind is not CallKind.WEBSOCKET:
        _check_task(name, fn, task, kind, signature)
    return CallSpec(name=name, kind=kind, is_async=is_async, signature=signature, task=task)


def _check_task(name: str, fn: Callable[..., Any], task: str, kind: CallKind, shown: str) -> None:
    streams = Task(task) in GENERATOR_TASKS
    if streams and kind is not CallKind.GENERATOR:
        raise InvalidSpec(
            f'@kiln.method(task="{task}") {name}{shown} must be a generator: '
            + (
                "yield kiln.Audio pieces as they are synthesised."
                if task == Task.SPEECH
                else "yield the text as it is made (str deltas), optionally ending with a "
                "kiln.Finish."
            )
        )
    if not streams and kind is not CallKind.FUNCTION:
        raise InvalidSpec(
            f'@kiln.method(task="{task}") {name}{shown} must return its result (one value), '
            "not yield it."
        )
    params = list(inspect.signature(fn).parameters.values())[1:]
    required = [
        p
        for p in params
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if not params or len(required) > 1 or params[0].kind is inspect.Parameter.KEYWORD_ONLY:
        raise InvalidSpec(
            f'@kiln.method(task="{task}") {name}{shown} must take exactly one argument, the '
            f"validated request: def {name}(self, request)."
        )


def _check_websocket(name: str, fn: Callable[..., Any], *, method: bool) -> None:
    shown = f"{name}{format_signature(fn, drop_first=method)}"
    if not inspect.iscoroutinefunction(fn):
        raise InvalidSpec(
            f"@kiln.websocket() handler {shown} must be defined with async def: a session "
            "sends and receives with await."
        )
    params = list(inspect.signature(fn).parameters.values())[1 if method else 0 :]
    required = [
        p
        for p in params
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if len(params) < 1 or len(required) > 1:
        raise InvalidSpec(
            f"@kiln.websocket() handler {shown} must take exactly one argument, the session: "
            "async def talk(self, session: kiln.Session)."
        )


def format_signature(fn: Callable[..., Any], *, drop_first: bool = False) -> str:
    """`str(inspect.signature(fn))`, but with postponed annotations (`from __future__ import
    annotations`) shown as written rather than as quoted strings."""
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())[1 if drop_first else 0 :]
    params = [
        p.replace(annotation=_Source(p.annotation)) if isinstance(p.annotation, str) else p
        for p in params
    ]
    returns = signature.return_annotation
    if isinstance(returns, str):
        returns = _Source(returns)
    return str(signature.replace(parameters=params, return_annotation=returns))


class _Source(str):
    """Annotation source text that prints bare: inspect shows a plain string with quotes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)
