"""Loading an app file as `kiln deploy` and the replica do: finding its one App, resolving names,
and showing the user's own traceback when the file fails to import."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

import kiln
from kiln.errors import AppImportError, InvalidSpec, NotFound
from kiln.functions import Function, Lifecycle, lifecycle
from kiln.functions.loader import import_app, load_app, resolve

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


pytestmark = pytest.mark.usefixtures("isolated_imports")


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source).lstrip())
    return path


APP = """
import kiln

app = kiln.App("hello")

@app.function
def shout(text: str) -> str:
    return text.upper()
"""


def test_loads_the_hello_example() -> None:
    app = load_app(EXAMPLES / "hello.py")
    assert app.name == "hello"
    assert list(app.functions) == ["shout", "Greeter"]
    shout = resolve(app, "shout")
    assert isinstance(shout, Function)
    assert shout("hi") == "HI!"
    greeter_cls = resolve(app, "Greeter")
    assert isinstance(greeter_cls, type)
    assert lifecycle(greeter_cls) == Lifecycle(enter=("setup",), methods=("greet",))
    greeter = greeter_cls()
    for hook in lifecycle(greeter_cls).enter:
        getattr(greeter, hook)()
    assert greeter.greet("Ada") == "Hello, Ada!"
    assert [s.entries for s in app.spec()][1]["greet"].signature == "(name: str) -> str"


def test_the_module_is_importable_by_its_stem(tmp_path: Path) -> None:
    # Snapshots pickle instances of the app's classes; unpickling imports them by module name.
    loaded = import_app(write(tmp_path / "tts.py", APP))
    assert sys.modules["tts"] is loaded.module
    assert loaded.path == (tmp_path / "tts.py").resolve()
    assert loaded.root == tmp_path.resolve()
    assert sys.path[0] == str(tmp_path.resolve())


def test_local_modules_and_packages_import(tmp_path: Path) -> None:
    write(tmp_path / "helpers.py", "def twice(x):\n    return x * 2\n")
    write(tmp_path / "lib" / "__init__.py", "from lib.core import VALUE\n")
    write(tmp_path / "lib" / "core.py", "VALUE = 21\n")
    app_file = write(
        tmp_path / "app.py",
        """
        import kiln
        from helpers import twice
        from lib import VALUE

        app = kiln.App("hello")

        @app.function
        def answer() -> int:
            return twice(VALUE)
        """,
    )
    loaded = import_app(app_file)
    assert resolve(loaded.app, "answer")() == 42
    assert sorted(m.__name__ for m in loaded.local_modules) == ["helpers", "lib", "lib.core"]


def test_a_second_app_gets_its_own_helpers(tmp_path: Path) -> None:
    for folder, value in (("one", 1), ("two", 2)):
        write(tmp_path / folder / "helpers.py", f"VALUE = {value}\n")
        write(
            tmp_path / folder / "app.py",
            f"""
            import kiln
            import helpers

            app = kiln.App("app-{folder}")

            @app.function
            def value() -> int:
                return helpers.VALUE
            """,
        )
    first = load_app(tmp_path / "one" / "app.py")
    second = load_app(tmp_path / "two" / "app.py")
    assert resolve(first, "value")() == 1
    assert resolve(second, "value")() == 2
    assert str((tmp_path / "one").resolve()) not in sys.path
    assert sys.modules["helpers"].VALUE == 2


def test_a_hyphenated_file_name_still_loads(tmp_path: Path) -> None:
    loaded = import_app(write(tmp_path / "my-app.py", APP))
    assert loaded.module.__name__ == "my_app"


def message_of(path: Path) -> str:
    with pytest.raises(InvalidSpec) as caught:
        load_app(path)
    return caught.value.message


def test_no_app(tmp_path: Path) -> None:
    path = write(tmp_path / "app.py", "import kiln\n")
    assert message_of(path) == (
        f'{path} defines no kiln.App; create one with `app = kiln.App("name")`.'
    )


def test_two_apps(tmp_path: Path) -> None:
    path = write(
        tmp_path / "app.py",
        """
        import kiln

        app = kiln.App("one")
        other = kiln.App("two")
        same = app
        """,
    )
    assert message_of(path) == (
        f"{path} defines 2 kiln.App objects: app ('one'), other ('two'); keep one app per file."
    )


def test_an_app_without_functions(tmp_path: Path) -> None:
    path = write(tmp_path / "app.py", 'import kiln\napp = kiln.App("empty")\n')
    assert message_of(path) == (
        f"app 'empty' in {path} has no functions or classes; register one with @app.function "
        "or @app.cls."
    )


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.py"
    assert message_of(path) == (
        f"{path} does not exist or is not a file; expected a Python app file."
    )


def test_not_a_python_file(tmp_path: Path) -> None:
    path = write(tmp_path / "app.txt", APP)
    assert message_of(path) == f"{path} is not a Python file; expected a file ending in .py."


def test_a_file_named_like_a_standard_module(tmp_path: Path) -> None:
    path = write(tmp_path / "json.py", APP)
    message = message_of(path)
    assert message.startswith(f"{path} would be imported as the module 'json', which is already ")
    assert message.endswith("; rename the file, e.g. to json_app.py.")
    assert sys.modules["json"].__name__ == "json"
    assert hasattr(sys.modules["json"], "dumps")


def import_failure(path: Path) -> str:
    with pytest.raises(AppImportError) as caught:
        load_app(path)
    assert caught.value.code == "app_import_failed"
    message = caught.value.message
    for internal in ("kiln/functions", "importlib", "<frozen"):
        assert internal not in message
    return message


def test_a_raising_app_shows_only_the_users_frames(tmp_path: Path) -> None:
    path = write(
        tmp_path / "app.py",
        """
        import kiln

        def broken():
            return 1 / 0

        broken()
        """,
    )
    assert import_failure(path) == (
        f"{path} failed to import:\n"
        "Traceback (most recent call last):\n"
        f'  File "{path.resolve()}", line 6, in <module>\n'
        "    broken()\n"
        f'  File "{path.resolve()}", line 4, in broken\n'
        "    return 1 / 0\n"
        "           ~~^~~\n"
        "ZeroDivisionError: division by zero"
    )
    assert "app" not in sys.modules


def test_a_failing_local_module_shows_its_frame(tmp_path: Path) -> None:
    write(tmp_path / "helpers.py", "import missing_dependency_xyz\n")
    path = write(tmp_path / "app.py", "import helpers\n")
    message = import_failure(path)
    assert f'File "{(tmp_path / "helpers.py").resolve()}", line 1, in <module>' in message
    assert message.endswith("ModuleNotFoundError: No module named 'missing_dependency_xyz'")


def test_a_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path / "app.py", "def broken(:\n    pass\n")
    message = import_failure(path)
    assert message.startswith(f"{path} failed to import:\n")
    assert f'File "{path.resolve()}", line 1' in message
    assert "SyntaxError" in message
    assert "Traceback" not in message


def test_a_bad_spec_in_the_app_names_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "app.py",
        """
        import kiln

        app = kiln.App("hello")

        @app.function(max_replicas=0)
        def shout() -> None: ...
        """,
    )
    message = import_failure(path)
    assert f'File "{path.resolve()}", line 5, in <module>' in message
    assert message.endswith(
        "kiln.errors.InvalidSpec: max_replicas=0 is not valid for function 'shout': expected an "
        "integer from 1 to 1000."
    )


def test_sys_exit_while_importing_is_an_import_failure(tmp_path: Path) -> None:
    path = write(tmp_path / "app.py", "import sys\nsys.exit(3)\n")
    assert import_failure(path).endswith("SystemExit: 3")


def test_chained_exceptions_keep_the_users_frames(tmp_path: Path) -> None:
    path = write(
        tmp_path / "app.py",
        """
        try:
            {}["model"]
        except KeyError as exc:
            raise RuntimeError("no model configured") from exc
        """,
    )
    message = import_failure(path)
    assert re.search(r"KeyError: 'model'\n\nThe above exception was the direct cause", message)
    assert message.endswith("RuntimeError: no model configured")


def test_resolve_unknown_names() -> None:
    app = kiln.App("hello")

    @app.function
    def shout() -> None: ...

    @app.cls
    class Greeter:
        @kiln.method
        def greet(self) -> None: ...

    cases = {
        "shot": "app 'hello' has no function or class named 'shot'; did you mean 'shout'?",
        "Greeter.greet": (
            "app 'hello' has no function or class named 'Greeter.greet'; address the class "
            "'Greeter'; its methods share its replicas."
        ),
        "zzz": "app 'hello' has no function or class named 'zzz'; it has 'shout', 'Greeter'.",
    }
    for name, expected in cases.items():
        with pytest.raises(NotFound, match=f"^{re.escape(expected)}$"):
            resolve(app, name)
