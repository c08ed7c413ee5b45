"""The SDK as a developer writes it: `kiln.App`, the decorators, the specs they record, and the
errors for misplaced marks, each pinned to its exact text."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

import kiln
from kiln.errors import InvalidSpec
from kiln.functions import Function, Lifecycle, lifecycle
from kiln.functions.spec import CallKind, CallSpec, FunctionSpec, Resources, UnitKind


def raises(message: str) -> Any:
    return pytest.raises(InvalidSpec, match=f"^{re.escape(message)}$")


def test_public_surface() -> None:
    assert kiln.__all__ == [
        "App",
        "Audio",
        "ChatRequest",
        "CompletionRequest",
        "Embeddings",
        "EmbeddingsRequest",
        "Finish",
        "ImageRequest",
        "Images",
        "InvalidArguments",
        "Job",
        "Message",
        "RemoteError",
        "RemoteFunction",
        "Segment",
        "Session",
        "SessionClosed",
        "SpeechRequest",
        "Transcription",
        "TranscriptionRequest",
        "__version__",
        "enter",
        "exit",
        "lookup",
        "method",
        "websocket",
    ]
    assert isinstance(kiln.__version__, str)


# App names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "hello", "tts-v2", "a" * 63, "x1-y2"])
def test_app_accepts_dns_labels(name: str) -> None:
    assert kiln.App(name).name == name


@pytest.mark.parametrize("name", ["", "Hello", "my app", "1app", "-app", "app-", "a" * 64, "a_b"])
def test_app_refuses_other_names(name: str) -> None:
    with raises(
        f"name={name!r} is not valid for kiln.App: expected 1 to 63 lowercase letters, digits "
        'and hyphens, starting with a letter and not ending with a hyphen, such as "my-app".'
    ):
        kiln.App(name)


def test_app_refuses_a_name_that_is_not_a_string() -> None:
    with raises(
        "name=None is not valid for kiln.App: expected 1 to 63 lowercase letters, digits and "
        'hyphens, starting with a letter and not ending with a hyphen, such as "my-app".'
    ):
        kiln.App(None)  # type: ignore[arg-type]


# @app.function -----------------------------------------------------------------------------------


def test_bare_function_decorator_records_defaults_and_stays_callable() -> None:
    app = kiln.App("hello")

    @app.function
    def shout(text: str, loud: bool = True) -> str:
        """Shout it."""
        return text.upper() + ("!" if loud else "")

    assert isinstance(shout, Function)
    assert shout("hi") == "HI!"
    assert shout.local("hi", loud=False) == "HI"
    assert shout.__name__ == "shout"
    assert shout.__doc__ == "Shout it."
    assert shout.fn("a") == "A!"
    assert repr(shout) == "<kiln function hello/shout>"
    assert shout.spec == FunctionSpec(
        name="shout",
        kind=UnitKind.FUNCTION,
        resources=Resources(),
        entries={
            "shout": CallSpec(
                name="shout",
                kind=CallKind.FUNCTION,
                is_async=False,
                signature="(text: str, loud: bool = True) -> str",
            )
        },
    )
    assert app.functions == {"shout": shout}
    assert app.spec() == [shout.spec]


def test_called_function_decorator_takes_every_option() -> None:
    app = kiln.App("tts")

    @app.function(
        gpu="h100:2",
        min_replicas=1,
        max_replicas=8,
        buffer_replicas=2,
        idle_timeout=60,
        concurrency=4,
        target_concurrency=3,
        timeout=30,
        startup_timeout=120,
        retries=2,
        memory_mb=2048,
        env={"LOG_LEVEL": "debug"},
        secrets=["huggingface", "openai", "huggingface"],
    )
    def speak(text: str) -> bytes:
        return text.encode()

    assert speak.spec.resources == Resources(
        gpu="H100:2",
        min_replicas=1,
        max_replicas=8,
        buffer_replicas=2,
        idle_timeout_s=60,
        concurrency=4,
        target_concurrency=3,
        timeout_s=30,
        startup_timeout_s=120,
        retries=2,
        memory_mb=2048,
        env={"LOG_LEVEL": "debug"},
        secrets=("huggingface", "openai"),
    )


def test_empty_parentheses_mean_defaults() -> None:
    app = kiln.App("hello")

    @app.function()
    def ping() -> str:
        return "pong"

    assert ping.spec.resources == Resources()


def test_target_concurrency_defaults_to_concurrency() -> None:
    app = kiln.App("hello")

    @app.function(concurrency=8)
    def ping() -> None: ...

    assert ping.spec.resources.target_concurrency == 8


async def test_async_generator_and_async_generator_functions() -> None:
    app = kiln.App("kinds")

    @app.function
    async def answer(question: str) -> str:
        return question[::-1]

    @app.function
    def count(n: int) -> Iterator[int]:
        yield from range(n)

    @app.function
    async def tick(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    entries = {spec.name: spec.entries[spec.name] for spec in app.spec()}
    assert [(e.kind, e.is_async) for e in entries.values()] == [
        (CallKind.FUNCTION, True),
        (CallKind.GENERATOR, False),
        (CallKind.GENERATOR, True),
    ]
    assert entries["tick"].signature == "(n: int) -> AsyncIterator[int]"
    assert await answer.local("abc") == "cba"
    assert list(count(3)) == [0, 1, 2]
    assert [i async for i in tick.local(2)] == [0, 1]


def test_a_lambda_needs_a_name() -> None:
    app = kiln.App("hello")
    double = app.function(name="double")(lambda x: x * 2)
    assert double(2) == 4
    assert app.spec()[0].entries["double"].signature == "(x)"
    with raises(
        "function '<lambda>' has no name that Kiln can address (expected a Python identifier "
        "of 1 to 63 ASCII characters); define it with def, or name it: "
        '@app.function(name="double").'
    ):
        app.function(lambda x: x)


def test_name_option_renames_the_function() -> None:
    app = kiln.App("hello")

    @app.function(name="yell")
    def shout() -> None: ...

    assert list(app.functions) == ["yell"]
    assert shout.spec.entries == {"yell": CallSpec(name="yell", signature="() -> None")}


def test_function_names_must_be_ascii_and_short() -> None:
    app = kiln.App("hello")

    def grüße() -> None: ...

    with raises(
        "function 'grüße' has no name that Kiln can address (expected a Python identifier of 1 "
        'to 63 ASCII characters); define it with def, or name it: @app.function(name="double").'
    ):
        app.function(grüße)
    assert app.function(name="gruesse")(grüße).spec.name == "gruesse"
    anonymous = type("my model", (), {"run": kiln.method(lambda self: None)})
    with raises(
        "class 'my model' has no name that Kiln can address (expected a Python identifier of 1 "
        'to 63 ASCII characters); name it: @app.cls(name="Model").'
    ):
        app.cls(anonymous)


@pytest.mark.parametrize("name", ["my fn", "", "ünïcode", "a" * 64, 3])
def test_name_option_must_be_an_identifier(name: Any) -> None:
    app = kiln.App("hello")
    with raises(
        f"name={name!r} is not valid for function 'shout': expected a Python identifier of 1 to "
        '63 ASCII characters, such as "shout".'
    ):

        @app.function(name=name)
        def shout() -> None: ...


def test_postponed_annotations_show_without_quotes() -> None:
    # Under `from __future__ import annotations` (as in this file) annotations are strings.
    app = kiln.App("hello")

    def shout(text, times=1):  # type: ignore[no-untyped-def]
        return [text] * times

    shout.__annotations__ = {"text": "str", "times": "int", "return": "list[str]"}
    assert app.function(shout).spec.entries["shout"].signature == (
        "(text: str, times: int = 1) -> list[str]"
    )


def test_spec_round_trips_through_json_dicts() -> None:
    app = kiln.App("hello")

    @app.function(gpu="A10G", env={"A": "1"}, secrets=["hf"])
    def shout(text: str) -> str:
        return text

    @app.cls(concurrency=2)
    class Greeter:
        @kiln.method
        def greet(self, name: str) -> str:
            return name

        @kiln.method()
        def stream(self, n: int) -> Iterator[int]:
            yield n

    for spec in app.spec():
        back = FunctionSpec.from_dict(spec.to_dict())
        assert back == spec
        assert back.resources.explicit == spec.resources.explicit != ()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (int, "@app.function got class 'int'; register classes with @app.cls instead."),
        (
            42,
            "@app.function must decorate a function defined with def or lambda, not 42 (int); "
            'its options are keyword-only: @app.function(gpu="A10G").',
        ),
        (
            "A10G",
            "@app.function must decorate a function defined with def or lambda, not 'A10G' "
            '(str); its options are keyword-only: @app.function(gpu="A10G").',
        ),
        (
            print,
            "@app.function must decorate a function defined with def or lambda, not <built-in "
            "function print> (builtin_function_or_method); its options are keyword-only: "
            '@app.function(gpu="A10G").',
        ),
    ],
)
def test_function_decorator_refuses_what_is_not_a_function(target: Any, message: str) -> None:
    with raises(message):
        kiln.App("hello").function(target)


def test_function_decorator_refuses_a_method_mark() -> None:
    def greet(self: object) -> None: ...

    with raises(
        "function 'greet' is marked @kiln.method(), which only applies to methods of a class "
        "registered with @app.cls."
    ):
        kiln.App("hello").function(kiln.method(greet))


def test_names_are_unique_across_functions_and_classes() -> None:
    app = kiln.App("hello")

    @app.function
    def shout() -> None: ...

    with raises(
        "app 'hello' already has a function named 'shout'; functions and classes share one "
        "namespace per app, so rename one (or pass name=...)."
    ):

        @app.cls(name="shout")
        class Shout:
            @kiln.method
            def run(self) -> None: ...

    @app.cls
    class Greeter:
        @kiln.method
        def greet(self) -> None: ...

    with raises(
        "app 'hello' already has a class named 'Greeter'; functions and classes share one "
        "namespace per app, so rename one (or pass name=...)."
    ):
        app.function(name="Greeter")(lambda: None)
    assert list(app.functions) == ["shout", "Greeter"]


# @app.cls and the lifecycle marks ----------------------------------------------------------------


def test_class_with_hooks_and_methods() -> None:
    app = kiln.App("tts")

    @app.cls(gpu="A10G", concurrency=4)
    class Speaker:
        @kiln.enter(snap=True)
        def load(self) -> None:
            self.model = "weights"

        @kiln.enter
        def warm(self) -> None:
            self.warm_calls = 1

        @kiln.method()
        def speak(self, text: str) -> str:
            return f"{self.model}:{text}"

        @kiln.method
        async def stream(self, text: str) -> AsyncIterator[str]:
            yield text

        @kiln.exit()
        def close(self) -> None: ...

        @kiln.enter()
        def also_warm(self, retries: int = 3) -> None: ...

        def helper(self) -> None: ...

    assert lifecycle(Speaker) == Lifecycle(
        enter_snap=("load",),
        enter=("warm", "also_warm"),
        exit=("close",),
        methods=("speak", "stream"),
    )
    assert app.functions["Speaker"] is Speaker
    spec = app.spec()[0]
    assert spec.kind is UnitKind.CLASS
    assert spec.resources == Resources(gpu="A10G", concurrency=4, target_concurrency=4)
    assert spec.entries == {
        "speak": CallSpec(name="speak", signature="(text: str) -> str"),
        "stream": CallSpec(
            name="stream",
            kind=CallKind.GENERATOR,
            is_async=True,
            signature="(text: str) -> AsyncIterator[str]",
        ),
    }
    assert spec.entry("speak") == spec.entries["speak"]
    speaker = Speaker()
    speaker.load()
    assert speaker.speak("hi") == "weights:hi"


def test_bare_exit_and_inherited_marks() -> None:
    class Base:
        @kiln.enter
        def setup(self) -> None: ...

        @kiln.method
        def run(self) -> None: ...

        @kiln.method
        def hidden(self) -> None: ...

    app = kiln.App("hello")

    @app.cls
    class Child(Base):
        @kiln.exit
        def teardown(self) -> None: ...

        def hidden(self) -> None: ...  # an unmarked override is no longer an entry point

        @kiln.method
        def extra(self) -> None: ...

    assert lifecycle(Child) == Lifecycle(
        enter=("setup",), exit=("teardown",), methods=("run", "extra")
    )


def test_class_without_entry_points() -> None:
    with raises(
        "class 'Empty' has no entry points: mark at least one method with @kiln.method() (or "
        "@kiln.websocket())."
    ):

        @kiln.App("hello").cls
        class Empty:
            @kiln.enter
            def setup(self) -> None: ...


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            len,
            "@app.cls must decorate a class, not <built-in function len> "
            "(builtin_function_or_method); register functions with @app.function, and give "
            'options by keyword: @app.cls(gpu="A10G").',
        ),
        (
            "A10G",
            "@app.cls must decorate a class, not 'A10G' (str); register functions with "
            '@app.function, and give options by keyword: @app.cls(gpu="A10G").',
        ),
    ],
)
def test_cls_decorator_refuses_what_is_not_a_class(target: Any, message: str) -> None:
    with raises(message):
        kiln.App("hello").cls(target)


def test_cls_decorator_refuses_a_function() -> None:
    def shout() -> None: ...

    with raises(
        "@app.cls must decorate a class, not function 'shout'; register functions with "
        '@app.function, and give options by keyword: @app.cls(gpu="A10G").'
    ):
        kiln.App("hello").cls(shout)  # type: ignore[call-overload]


def test_class_must_be_constructible_without_arguments() -> None:
    with raises(
        "class 'Model' must be constructible without arguments, but its constructor needs "
        "path; set state up in a @kiln.enter() method instead."
    ):

        @kiln.App("hello").cls
        class Model:
            def __init__(self, path: str) -> None:
                self.path = path

            @kiln.method
            def run(self) -> None: ...


def test_class_options_are_validated_with_the_class_name() -> None:
    with raises(
        "max_replicas=0 is not valid for class 'Greeter': expected an integer from 1 to 1000."
    ):

        @kiln.App("hello").cls(max_replicas=0)
        class Greeter:
            @kiln.method
            def greet(self) -> None: ...


@pytest.mark.parametrize("wrapper", [staticmethod, classmethod])
def test_mark_on_a_static_or_class_method(wrapper: Callable[[Any], Any]) -> None:
    kind = wrapper.__name__
    with raises(
        f"@kiln.method() cannot mark a {kind}: entry points and hooks are regular methods that "
        f"take self; remove @{kind}."
    ):

        class Greeter:
            @kiln.method
            @wrapper
            def greet(name: str) -> None: ...


@pytest.mark.parametrize("wrapper", [staticmethod, classmethod])
def test_static_or_class_method_over_a_mark(wrapper: Callable[[Any], Any]) -> None:
    kind = wrapper.__name__

    class Greeter:
        @wrapper
        @kiln.method
        def greet(name: str) -> None: ...

    with raises(
        f"Greeter.greet is a {kind}, but @kiln.method() needs a regular method that takes "
        f"self; remove @{kind}."
    ):
        kiln.App("hello").cls(Greeter)


def test_method_without_self() -> None:
    class Greeter:
        @kiln.method
        def greet() -> None: ...  # type: ignore[misc]

    with raises(
        "@kiln.method() Greeter.greet() -> None has no self parameter: Kiln calls it on an "
        "instance of the class, so make self its first parameter."
    ):
        kiln.App("hello").cls(Greeter)


def test_method_with_only_keyword_parameters() -> None:
    class Greeter:
        @kiln.method
        def greet(*, name: str) -> None: ...  # type: ignore[misc]

    with raises(
        "@kiln.method() Greeter.greet(*, name: str) -> None has no self parameter: Kiln calls "
        "it on an instance of the class, so make self its first parameter."
    ):
        kiln.App("hello").cls(Greeter)


def test_hook_with_required_parameters() -> None:
    class Model:
        @kiln.enter(snap=True)
        def load(self, path: str, *args: Any, device: str, **kw: Any) -> None: ...

        @kiln.method
        def run(self) -> None: ...

    with raises(
        "@kiln.enter(snap=True) Model.load(self, path: str, *args: Any, device: str, **kw: Any) "
        "-> None needs path, device, but hooks are called with self only; give those parameters "
        "defaults."
    ):
        kiln.App("hello").cls(Model)


@pytest.mark.parametrize(
    ("decorator", "label"),
    [(kiln.method(), "@kiln.method()"), (kiln.exit(), "@kiln.exit()")],
)
def test_marks_refuse_a_non_function(decorator: Callable[[Any], Any], label: str) -> None:
    with raises(f"{label} must decorate a method defined with def, not a property."):

        class Greeter:
            @decorator  # type: ignore[prop-decorator]
            @property
            def greeting(self) -> str:
                return "hi"


def test_mark_refuses_a_plain_value() -> None:
    with raises("@kiln.method() must decorate a method defined with def, not 42 (int)."):
        kiln.method(42)  # type: ignore[call-overload]


def test_enter_hints_that_snap_is_keyword_only() -> None:
    with raises(
        "@kiln.enter() must decorate a method defined with def, not True (bool) (its option is "
        "keyword-only: @kiln.enter(snap=True))."
    ):
        kiln.enter(True)  # type: ignore[call-overload]


def test_enter_snap_must_be_a_bool() -> None:
    with raises("snap='yes' is not valid for @kiln.enter(): expected True or False."):
        kiln.enter(snap="yes")  # type: ignore[call-overload]


def test_one_role_per_method() -> None:
    with raises(
        "test_one_role_per_method.<locals>.Greeter.greet is marked both @kiln.method() and "
        "@kiln.enter(); a method has one role, so split it into two methods."
    ):

        class Greeter:
            @kiln.enter
            @kiln.method
            def greet(self) -> None: ...


def test_the_same_mark_twice_is_harmless() -> None:
    class Greeter:
        @kiln.method
        @kiln.method()
        def greet(self) -> None: ...

    assert lifecycle(Greeter).methods == ("greet",)


# WebSocket handlers ------------------------------------------------------------------------------


def test_websocket_handlers_on_classes_and_functions() -> None:
    app = kiln.App("voice")

    @app.cls()
    class Agent:
        @kiln.websocket()
        async def talk(self, session: kiln.Session) -> None: ...

        @kiln.method
        def ping(self) -> str:
            return "pong"

    @app.function
    @kiln.websocket
    async def echo(session: kiln.Session) -> None: ...

    agent, plain = app.spec()
    assert agent.entries["talk"].kind is CallKind.WEBSOCKET
    assert agent.entries["ping"].kind is CallKind.FUNCTION
    assert plain.entries["echo"].kind is CallKind.WEBSOCKET
    assert plain.entries["echo"].signature == "(session: kiln.Session) -> None"


def test_a_websocket_handler_must_be_async() -> None:
    with raises(
        "@kiln.websocket() handler talk(session) must be defined with async def: a session "
        "sends and receives with await."
    ):

        @kiln.App("voice").cls
        class Agent:
            @kiln.websocket()
            def talk(self, session): ...  # type: ignore[no-untyped-def]


def test_a_websocket_handler_takes_the_session_only() -> None:
    with raises(
        "@kiln.websocket() handler echo(session, voice) must take exactly one argument, the "
        "session: async def talk(self, session: kiln.Session)."
    ):

        @kiln.App("voice").function
        @kiln.websocket
        async def echo(session, voice): ...  # type: ignore[no-untyped-def]
