"""Which modules a function needs before it can serve, learned rather than configured.

Restoring a snapshot unpickles its object graph, and unpickling a class imports the module that
defines it: a GPT-2 model's graph imports `transformers` (seconds). A standby process that
imported those modules ahead of time turns that into dictionary lookups. So the replica that
bakes a snapshot records what the function needed — the modules its graph names, the modules
its code and hooks imported, and the modules its own code refers to by name — and the manifest
carries the list; node agents keep standbys that imported it (`kiln.invoker.flavours`).

Sets of modules are kept as their *leaves*: a module whose name is no other's prefix. Importing
every leaf imports every module of the set (a module's parents import first), and the list stays
short enough for a manifest. `expand` gives the whole set back for comparisons.

No torch here: the node agent, which never imports torch, compares these sets too.
"""

from __future__ import annotations

import os
import pickletools
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType

__all__ = [
    "MAX_IMPORTS",
    "expand",
    "function_needs",
    "graph_modules",
    "imported_since",
    "leaves",
    "module_names",
    "platform_module",
    "referenced_modules",
    "user_modules",
    "valid_module_name",
]

# A manifest or report naming more modules than this is refused: no real program needs it, and
# the lists travel in heartbeats' neighbours (cold-start reports) and manifests.
MAX_IMPORTS = 4000
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_MAX_NAME = 200
_PLATFORM = frozenset({"kiln", "uvloop"})
# Strings a pickle pushes before a STACK_GLOBAL (module, then qualified name).
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}


def valid_module_name(name: str) -> bool:
    return len(name) <= _MAX_NAME and _NAME.match(name) is not None


def platform_module(name: str) -> bool:
    """Kiln's own modules and its event loop's (every standby imports them), modules built
    into the interpreter, and made-up ones (`__main__`, multiprocessing's `__mp_main__`), which
    no import can find: none of them makes a function need a standby of its own."""
    top = name.partition(".")[0]
    return top in _PLATFORM or name.startswith("__") or name in sys.builtin_module_names


def leaves(names: Iterable[str]) -> tuple[str, ...]:
    """The names that are no other name's package: importing them imports all of `names`."""
    ordered = sorted(set(names))
    # Sorted, a package is followed at once by its first submodule (a "." sorts before every
    # character a module name may hold), so one comparison with the next name decides.
    return tuple(
        name
        for name, after in zip(ordered, [*ordered[1:], ""], strict=False)
        if not after.startswith(name + ".")
    )


def expand(names: Iterable[str]) -> frozenset[str]:
    """`names` with every package above them (`a.b.c` brings `a` and `a.b`)."""
    found: set[str] = set()
    for name in names:
        parts = name.split(".")
        found.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return frozenset(found)


def module_names(raw: object) -> tuple[str, ...]:
    """A list of module names from a manifest or a report, checked: a bad one raises ValueError
    naming it (these lists come from processes that run customer code)."""
    if not isinstance(raw, list | tuple):
        raise ValueError(f"expected a list of module names, got {type(raw).__name__}")
    if len(raw) > MAX_IMPORTS:
        raise ValueError(f"{len(raw)} module names; at most {MAX_IMPORTS} are kept")
    for name in raw:
        if not isinstance(name, str) or not valid_module_name(name):
            raise ValueError(f"{name!r} is not a module name")
    return tuple(raw)


def graph_modules(graph: bytes) -> set[str]:
    """The modules an unpickling of `graph` imports: every global it names (classes, functions,
    enums), read from the opcodes without running any of them."""
    found: set[str] = set()
    memo: dict[int, object] = {}
    recent: list[object] = []  # the last two values pushed, as far as strings go
    for opcode, arg, _ in pickletools.genops(graph):
        name = opcode.name
        if name in _STRING_OPS:
            recent = [*recent[-1:], arg]
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = recent[-1] if recent else None  # type: ignore[arg-type]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            recent = [*recent[-1:], memo.get(int(arg))]  # type: ignore[arg-type]
        elif name == "STACK_GLOBAL":
            module = recent[0] if len(recent) == 2 else None
            if isinstance(module, str):
                found.add(module)
            recent = [None]
        elif name in ("FRAME", "PROTO"):
            continue  # framing: nothing pushed
        elif name in ("GLOBAL", "INST"):
            found.add(str(arg).split(" ", 1)[0])
            recent = [None]
        else:
            recent = [None]
    return {module for module in found if valid_module_name(module)}


def referenced_modules(modules: Iterable[ModuleType]) -> set[str]:
    """The modules that `modules`' globals refer to: `import x` binds a module, `from x import
    f` a function or class whose `__module__` is x's. Catches what the user's code imported
    even when the process had imported it already (a standby did)."""
    found: set[str] = set()
    for module in modules:
        for value in list(vars(module).values()):
            if isinstance(value, ModuleType):
                found.add(value.__name__)
            else:
                owner = getattr(type(value) if _is_instance(value) else value, "__module__", None)
                if isinstance(owner, str):
                    found.add(owner)
    return found


def _is_instance(value: object) -> bool:
    """Plain data (a constant, a logger) is kept by its class's module; classes and functions
    by their own."""
    return not (isinstance(value, type) or callable(value))


def user_modules(root: Path, modules: Mapping[str, ModuleType] | None = None) -> set[str]:
    """Names of the modules loaded from under `root` (the function's own code)."""
    loaded = sys.modules if modules is None else modules
    prefixes = tuple({str(root) + os.sep, str(root.resolve()) + os.sep})
    found = set()
    for name, module in list(loaded.items()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and file.startswith(prefixes):
            found.add(name)
    return found


def imported_since(
    preloaded: Iterable[str], code_root: Path | None, loaded: Iterable[str] | None = None
) -> set[str]:
    """The modules this process imported since `preloaded` was taken (up to when `loaded` was,
    if given), the function's own code and Kiln's modules left out: what a standby could have
    imported ahead of time."""
    before = set(preloaded)
    own = user_modules(code_root) if code_root is not None else set()
    names = list(sys.modules) if loaded is None else loaded
    return {
        name
        for name in names
        if name not in before and name not in own and _importable(name, sys.modules.get(name))
    }


def function_needs(
    preloaded: Iterable[str], code_root: Path | None, graph: bytes | None = None
) -> tuple[str, ...]:
    """What the function running in this process needed, as leaves: the modules imported since
    `preloaded` (its code, its hooks), the modules its own code refers to (imported earlier,
    by a standby), and the modules its snapshot's object graph names."""
    own = user_modules(code_root) if code_root is not None else set()
    names = imported_since(preloaded, code_root)
    loaded = [sys.modules[name] for name in own if name in sys.modules]
    for name in referenced_modules(loaded) | (graph_modules(graph) if graph else set()):
        if name not in own and _importable(name, sys.modules.get(name)):
            names.add(name)
    return leaves(names)[:MAX_IMPORTS]


def _importable(name: str, module: object) -> bool:
    """Worth importing by name in another process: not Kiln's, a valid name, and a module
    that came from an import (some libraries put made-up modules into sys.modules)."""
    if platform_module(name) or not valid_module_name(name):
        return False
    return module is None or getattr(module, "__spec__", None) is not None
