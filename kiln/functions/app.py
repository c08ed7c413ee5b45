"""`kiln.App` and its decorators: the registry of what an app file deploys.

Decorating validates everything at once and records a `FunctionSpec`; nothing runs remotely
here. A decorated function stays an ordinary local callable (and `.local()` as in Modal), and
`.remote()`, `.spawn()` and `.remote_gen()` call its deployed copy (`kiln.remote`); a decorated
class is returned unchanged, so instances, type hints and subclassing keep working (its
methods are called remotely through `kiln.lookup("APP/Class.method")`).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, Unpack, overload

from kiln.errors import InvalidSpec
from kiln.functions.hooks import HookKind, describe, hook_of, lifecycle
from kiln.functions.options import Options, parse_options
from kiln.functions.signature import call_spec
from kiln.functions.spec import FunctionSpec, UnitKind

if TYPE_CHECKING:
    from kiln.remote import Job, RemoteFunction

__all__ = ["App", "Function"]

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound=type[Any])

_APP_NAME = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")
_APP_NAME_RULE = (
    "expected 1 to 63 lowercase letters, digits and hyphens, starting with a letter and not "
    'ending with a hyphen, such as "my-app"'
)


class Function(Generic[P, R]):
    """A function registered on an `App`. Calling it (or `.local()`) runs it here, in-process."""

    # Set by functools.update_wrapper; declared so that type checkers know them too.
    __name__: str
    __qualname__: str
    __wrapped__: Callable[P, R]

    def __init__(self, fn: Callable[P, R], spec: FunctionSpec, app_name: str) -> None:
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._spec = spec
        self._app_name = app_name

    @property
    def spec(self) -> FunctionSpec:
        return self._spec

    @property
    def fn(self) -> Callable[P, R]:
        """The undecorated function, as the replica calls it."""
        return self._fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._fn(*args, **kwargs)

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function in this process, as Modal's `.local()` does."""
        return self._fn(*args, **kwargs)

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the deployed function (`kiln deploy`) and return its result."""
        result: R = self._deployed().remote(*args, **kwargs)
        return result

    def remote_gen(self, *args: P.args, **kwargs: P.kwargs) -> Iterator[Any]:
        """Call the deployed generator and yield its items as they arrive."""
        return self._deployed().remote_gen(*args, **kwargs)

    def spawn(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Start the deployed function as an async job."""
        deployed = self._deployed()
        # RemoteFunction.spawn also takes idempotency_key=, which P cannot express.
        return deployed.spawn(*args, **kwargs)  # type: ignore[arg-type]

    def _deployed(self) -> RemoteFunction:
        from kiln.remote import lookup

        return lookup(f"{self._app_name}/{self._spec.name}")

    def __repr__(self) -> str:
        return f"<kiln function {self._app_name}/{self._spec.name}>"


class _FunctionDecorator(Protocol):
    def __call__(self, fn: Callable[P, R], /) -> Function[P, R]: ...


class _ClassDecorator(Protocol):
    def __call__(self, cls: C, /) -> C: ...


class App:
    """A deployable group of functions and classes: `app = kiln.App("tts")`."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not _APP_NAME.fullmatch(name):
            raise InvalidSpec(f"name={name!r} is not valid for kiln.App: {_APP_NAME_RULE}.")
        self._name = name
        self._objects: dict[str, Function[..., Any] | type[Any]] = {}
        self._specs: dict[str, FunctionSpec] = {}

    @property
    def name(self) -> str:
        return self._name

    @property
    def functions(self) -> Mapping[str, Function[..., Any] | type[Any]]:
        """Each decorated function or class by its Kiln name, in definition order."""
        return MappingProxyType(self._objects)

    def spec(self) -> list[FunctionSpec]:
        """The specification of every function and class, in definition order."""
        return list(self._specs.values())

    @overload
    def function(self, fn: Callable[P, R], /) -> Function[P, R]: ...
    @overload
    def function(self, fn: None = None, /, **options: Unpack[Options]) -> _FunctionDecorator: ...
    def function(self, fn: Any = None, /, **options: Any) -> Any:
        """Register a function: `@app.function` or `@app.function(gpu="A10G", ...)`."""
        if fn is None:
            return lambda f: self._add_function(f, options)
        return self._add_function(fn, options)

    @overload
    def cls(self, cls: C, /) -> C: ...
    @overload
    def cls(self, cls: None = None, /, **options: Unpack[Options]) -> _ClassDecorator: ...
    def cls(self, cls: Any = None, /, **options: Any) -> Any:
        """Register a class whose `@kiln.method()`s are entry points sharing its replicas."""
        if cls is None:
            return lambda c: self._add_class(c, options)
        return self._add_class(cls, options)

    def _add_function(self, fn: object, options: Mapping[str, Any]) -> Function[..., Any]:
        if inspect.isclass(fn):
            raise InvalidSpec(
                f"@app.function got {describe(fn)}; register classes with @app.cls instead."
            )
        if not inspect.isfunction(fn):
            raise InvalidSpec(
                f"@app.function must decorate a function defined with def or lambda, not "
                f'{describe(fn)}; its options are keyword-only: @app.function(gpu="A10G").'
            )
        hook = hook_of(fn)
        if hook is not None and hook.kind is not HookKind.WEBSOCKET:
            raise InvalidSpec(
                f"function {fn.__name__!r} is marked {hook.label}, which only applies to methods "
                "of a class registered with @app.cls."
            )
        name, resources = parse_options(options, kind=UnitKind.FUNCTION, default_name=fn.__name__)
        entry = call_spec(name, fn, method=False)
        spec = FunctionSpec(
            name=name, kind=UnitKind.FUNCTION, resources=resources, entries={name: entry}
        )
        function: Function[..., Any] = Function(fn, spec, self._name)
        self._register(spec, function)
        return function

    def _add_class(self, cls: object, options: Mapping[str, Any]) -> type[Any]:
        if not inspect.isclass(cls):
            what = f"function {cls.__name__!r}" if inspect.isfunction(cls) else describe(cls)
            raise InvalidSpec(
                f"@app.cls must decorate a class, not {what}; register functions with "
                '@app.function, and give options by keyword: @app.cls(gpu="A10G").'
            )
        name, resources = parse_options(options, kind=UnitKind.CLASS, default_name=cls.__name__)
        _check_constructible(cls)
        roles = lifecycle(cls)
        entries = {m: call_spec(m, getattr(cls, m), method=True) for m in roles.methods}
        spec = FunctionSpec(name=name, kind=UnitKind.CLASS, resources=resources, entries=entries)
        self._register(spec, cls)
        return cls

    def _register(self, spec: FunctionSpec, obj: Function[..., Any] | type[Any]) -> None:
        existing = self._specs.get(spec.name)
        if existing is not None:
            raise InvalidSpec(
                f"app {self._name!r} already has a {existing.kind.value} named {spec.name!r}; "
                "functions and classes share one namespace per app, so rename one (or pass "
                "name=...)."
            )
        self._specs[spec.name] = spec
        self._objects[spec.name] = obj

    def __repr__(self) -> str:
        return f"App({self._name!r}, functions={list(self._specs)!r})"


def _check_constructible(cls: type[Any]) -> None:
    """The replica builds the instance with `cls()`; state belongs in `@kiln.enter` hooks."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return  # builtins and C types without a signature: the replica will find out
    required = [
        p.name
        for p in signature.parameters.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise InvalidSpec(
            f"class {cls.__name__!r} must be constructible without arguments, but its "
            f"constructor needs {', '.join(required)}; set state up in a @kiln.enter() method "
            "instead."
        )
