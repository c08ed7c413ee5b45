"""Import an app file and find what to run in it: used by `kiln deploy` (to read the spec and
package the source) and by the replica (to run it).

The file is imported as a top-level module named after its stem, with its folder first on
`sys.path`, as `python app.py` would see it; the module stays in `sys.modules` under that name so
that pickled snapshots of its classes can be loaded again. Loading a second app in the same
process (tests, tools that deploy several apps) first forgets the modules of the apps loaded
before, so a helper module of one app never answers an import of another's.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from kiln.errors import AppImportError, InvalidSpec, NotFound
from kiln.functions.app import App, Function
from kiln.functions.tree import is_local

__all__ = ["LoadedApp", "import_app", "load_app", "module_files", "resolve"]

# App folders this process has put on sys.path, so the next load can take them off again.
_loaded_roots: list[Path] = []


@dataclass(frozen=True)
class LoadedApp:
    app: App
    path: Path  # the app file, resolved
    root: Path  # its folder: the root of the source tree and of the package
    module: ModuleType
    # The local modules (the user's own, under root) that importing the app file imported.
    local_modules: tuple[ModuleType, ...]


def load_app(path: Path) -> App:
    """Import the app file at `path` and return its one `kiln.App`."""
    return import_app(path).app


def import_app(path: Path) -> LoadedApp:
    """Import the app file at `path`; also report which local modules it imported (the packager
    needs them). Raises `InvalidSpec`, or `AppImportError` with the user's traceback."""
    file = _app_file(path)
    root = file.parent
    name = _module_name(file)
    _forget_loaded_apps(root)
    _check_module_name_free(name, file, path)
    sys.path.insert(0, str(root))
    _loaded_roots.append(root)

    before = set(sys.modules)
    module = _execute(name, file, root, shown=path)
    local = tuple(
        mod
        for mod_name, mod in list(sys.modules.items())
        if mod_name not in before and mod is not module and _is_local_module(mod, root)
    )
    return LoadedApp(_the_app(module, path), file, root, module, local)


def resolve(app: App, name: str) -> Function[..., Any] | type[Any]:
    """The decorated function or class named `name`: the `NAME` of `APP/NAME`, or the `Class` of
    `APP/Class.method`. Raises `NotFound`."""
    found = app.functions.get(name)
    if found is not None:
        return found
    names = list(app.functions)
    close = difflib.get_close_matches(name, names, n=1)
    if "." in name and name.partition(".")[0] in app.functions:
        hint = f"address the class {name.partition('.')[0]!r}; its methods share its replicas."
    elif close:
        hint = f"did you mean {close[0]!r}?"
    else:
        hint = f"it has {', '.join(repr(n) for n in names) or 'none'}."
    raise NotFound(f"app {app.name!r} has no function or class named {name!r}; {hint}")


def module_files(module: ModuleType) -> list[Path]:
    """Where a module was loaded from: its file, or a namespace package's folders."""
    file = getattr(module, "__file__", None)
    if isinstance(file, str):
        return [Path(file).resolve()]
    return [Path(entry).resolve() for entry in getattr(module, "__path__", ()) or ()]


def _app_file(path: Path) -> Path:
    file = Path(path).resolve()
    if not file.is_file():
        raise InvalidSpec(f"{path} does not exist or is not a file; expected a Python app file.")
    if file.suffix != ".py":
        raise InvalidSpec(f"{path} is not a Python file; expected a file ending in .py.")
    return file


def _module_name(file: Path) -> str:
    # "my-app.py" still deploys: the module is my_app, as in `python -m`-friendly spelling.
    name = re.sub(r"\W", "_", file.stem, flags=re.ASCII)
    return f"_{name}" if name[0].isdigit() else name


def _forget_loaded_apps(root: Path) -> None:
    if not _loaded_roots:
        # The first app of this process (every replica's case): nothing to forget, and
        # scanning thousands of modules (torch, transformers) would cost a cold start ~0.3 s.
        importlib.invalidate_caches()
        return
    roots = {*_loaded_roots, root}
    for mod_name, mod in list(sys.modules.items()):
        if any(_is_local_module(mod, old) for old in roots):
            del sys.modules[mod_name]
    for old in _loaded_roots:
        while str(old) in sys.path:
            sys.path.remove(str(old))
    _loaded_roots.clear()
    importlib.invalidate_caches()


def _check_module_name_free(name: str, file: Path, shown: Path) -> None:
    """Refuse an app whose module name would replace another module (`json.py`, `torch.py`):
    every later import of that name would get the app instead."""
    existing = sys.modules.get(name)
    if existing is not None:
        where = [str(p) for p in module_files(existing)] or ["built into Python"]
    else:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return
        places = [spec.origin] if spec.origin else list(spec.submodule_search_locations or ())
        where = [str(Path(p).resolve()) if Path(p).is_absolute() else p for p in places]
    if where == [str(file)]:
        return
    raise InvalidSpec(
        f"{shown} would be imported as the module {name!r}, which is already "
        f"{' and '.join(where) or 'taken'}; rename the file, e.g. to {name}_app.py."
    )


def _execute(name: str, file: Path, root: Path, *, shown: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, file)
    # A .py path always gets a spec with a source loader.
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    # SystemExit too: an app that calls sys.exit() while importing must not end `kiln deploy`.
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise AppImportError(f"{shown} failed to import:\n{user_traceback(exc, root)}") from exc
    return module


def user_traceback(exc: BaseException, root: Path) -> str:
    """The traceback of `exc` with only the frames from the user's files under `root`: Kiln's
    and importlib's frames say nothing to the user."""
    formatted = traceback.TracebackException.from_exception(exc)
    pending, seen = [formatted], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        current.stack = traceback.StackSummary.from_list(
            [frame for frame in current.stack if _is_user_frame(frame.filename, root)]
        )
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return "".join(formatted.format()).rstrip("\n")


def _is_user_frame(filename: str, root: Path) -> bool:
    path = Path(filename)
    return path.is_absolute() and is_local(path.resolve(), root)


def _is_local_module(module: ModuleType, root: Path) -> bool:
    return any(is_local(place, root) for place in module_files(module))


def _the_app(module: ModuleType, shown: Path) -> App:
    found: dict[int, tuple[str, App]] = {}
    for variable, value in vars(module).items():
        if isinstance(value, App):
            found.setdefault(id(value), (variable, value))
    if not found:
        raise InvalidSpec(f'{shown} defines no kiln.App; create one with `app = kiln.App("name")`.')
    if len(found) > 1:
        listed = ", ".join(f"{var} ({app.name!r})" for var, app in found.values())
        raise InvalidSpec(
            f"{shown} defines {len(found)} kiln.App objects: {listed}; keep one app per file."
        )
    (_, app), *_ = found.values()
    if not app.functions:
        raise InvalidSpec(
            f"app {app.name!r} in {shown} has no functions or classes; register one with "
            "@app.function or @app.cls."
        )
    return app
