"""The options of `@app.function` and `@app.cls`, checked at decoration time.

Every problem raises `InvalidSpec` in one format: the option as the user spelled it, its value,
the function or class it was given to, and what is allowed, e.g.
`max_replicas=0 is not valid for function 'shout': expected an integer from 1 to 1000.`
Modal's names are accepted as aliases, and messages use whichever name the user wrote.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from kiln.errors import InvalidSpec
from kiln.functions.gpu import parse_gpu
from kiln.functions.spec import Resources, UnitKind

__all__ = ["ALIASES", "OPTIONS", "Options", "parse_options"]


class Options(TypedDict, total=False):
    """What `@app.function(...)` and `@app.cls(...)` accept, for type checkers."""

    name: str
    gpu: str | None
    min_replicas: int
    max_replicas: int
    buffer_replicas: int
    idle_timeout: int
    concurrency: int
    target_concurrency: int
    timeout: int
    startup_timeout: int
    retries: int
    memory_mb: int | None
    env: Mapping[str, str]
    secrets: Sequence[str]
    snapshot: str
    # Modal's names for the same settings.
    memory: int | None
    min_containers: int
    max_containers: int
    buffer_containers: int
    scaledown_window: int
    allow_concurrent_inputs: int
    keep_warm: int
    concurrency_limit: int
    container_idle_timeout: int


OPTIONS: tuple[str, ...] = (
    "name",
    "gpu",
    "min_replicas",
    "max_replicas",
    "buffer_replicas",
    "idle_timeout",
    "concurrency",
    "target_concurrency",
    "timeout",
    "startup_timeout",
    "retries",
    "memory_mb",
    "env",
    "secrets",
    "snapshot",
)
ALIASES: Mapping[str, str] = {
    "memory": "memory_mb",
    "min_containers": "min_replicas",
    "max_containers": "max_replicas",
    "buffer_containers": "buffer_replicas",
    "scaledown_window": "idle_timeout",
    "allow_concurrent_inputs": "concurrency",
    # Names from older Modal releases that users still write.
    "keep_warm": "min_replicas",
    "concurrency_limit": "max_replicas",
    "container_idle_timeout": "idle_timeout",
}

MAX_NAME_CHARS = 63
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
# How a class's replicas get the state its @enter(snap=True) hooks build.
SNAPSHOT_MODES = {
    "shared": "restore a read-only mapping that every replica on the node shares",
    "private": "restore a private, writable copy",
    "off": "run the hooks in every replica",
}


@dataclass(frozen=True)
class _Int:
    low: int
    high: int
    unit: str = ""

    @property
    def expected(self) -> str:
        what = f"a whole number of {self.unit}" if self.unit else "an integer"
        return f"expected {what} from {self.low} to {self.high}"


_INTS: Mapping[str, _Int] = {
    "min_replicas": _Int(0, 1000),
    "max_replicas": _Int(1, 1000),
    "buffer_replicas": _Int(0, 1000),
    "idle_timeout": _Int(0, 86_400, "seconds"),
    "concurrency": _Int(1, 1000),
    "target_concurrency": _Int(1, 1000),
    "timeout": _Int(1, 86_400, "seconds"),
    "startup_timeout": _Int(1, 86_400, "seconds"),
    "retries": _Int(0, 10),
    "memory_mb": _Int(1, 4_194_304, "megabytes"),
}
# Options whose Resources field carries a unit suffix.
_FIELDS = {
    "idle_timeout": "idle_timeout_s",
    "timeout": "timeout_s",
    "startup_timeout": "startup_timeout_s",
}


def parse_options(
    options: Mapping[str, Any], *, kind: UnitKind, default_name: str
) -> tuple[str, Resources]:
    """The unit's name (`name=` or `default_name`) and its validated `Resources`."""
    decorator = "@app.function" if kind is UnitKind.FUNCTION else "@app.cls"
    spelled = _canonical_names(options, decorator, f"{kind.value} {default_name!r}")
    name = _name(options[spelled["name"]] if "name" in spelled else None, kind, default_name)
    check = _Checker(f"{kind.value} {name!r}", spelled)

    fields: dict[str, Any] = {}
    if "gpu" in spelled:
        fields["gpu"] = check.gpu(options[spelled["gpu"]])
    for option, rule in _INTS.items():
        if option in spelled:
            value = options[spelled[option]]
            if option != "memory_mb" or value is not None:
                check.integer(option, value, rule)
            fields[_FIELDS.get(option, option)] = value
    if "env" in spelled:
        fields["env"] = check.env(options[spelled["env"]])
    if "secrets" in spelled:
        fields["secrets"] = check.secrets(options[spelled["secrets"]])
    if "snapshot" in spelled:
        fields["snapshot"] = check.snapshot(options[spelled["snapshot"]], kind)

    fields.setdefault("target_concurrency", fields.get("concurrency", 1))
    fields["explicit"] = tuple(sorted(_FIELDS.get(o, o) for o in spelled if o != "name"))
    resources = Resources(**fields)
    check.at_most("min_replicas", resources.min_replicas, "max_replicas", resources.max_replicas)
    check.at_most(
        "target_concurrency",
        resources.target_concurrency,
        "concurrency",
        resources.concurrency,
    )
    return name, resources


def _canonical_names(options: Mapping[str, Any], decorator: str, what: str) -> dict[str, str]:
    """Map each canonical option to the name the user wrote it under."""
    spelled: dict[str, str] = {}
    for given, value in options.items():
        canonical = ALIASES.get(given, given)
        if canonical not in OPTIONS:
            raise InvalidSpec(
                f"{decorator} got an unknown option {given}={value!r} for {what}; {_hint(given)}"
            )
        if canonical in spelled:
            first, second = sorted((spelled[canonical], given), key=lambda n: n != canonical)
            raise InvalidSpec(
                f"{first} and {second} were both given for {what}: {second} is Modal's name for "
                f"{canonical}, so keep only one of them."
            )
        spelled[canonical] = given
    return spelled


def _hint(given: str) -> str:
    close = difflib.get_close_matches(given, [*OPTIONS, *ALIASES], n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    return f"the options are {', '.join(OPTIONS)}."


def _name(value: object, kind: UnitKind, default: str) -> str:
    rule = f"a Python identifier of 1 to {MAX_NAME_CHARS} ASCII characters"
    if value is None:
        if _is_name(default):
            return default
        if kind is UnitKind.FUNCTION:
            fix = 'define it with def, or name it: @app.function(name="double")'
        else:
            fix = 'name it: @app.cls(name="Model")'
        raise InvalidSpec(
            f"{kind.value} {default!r} has no name that Kiln can address (expected {rule}); {fix}."
        )
    if not isinstance(value, str) or not _is_name(value):
        raise InvalidSpec(
            f"name={value!r} is not valid for {kind.value} {default!r}: expected {rule}, "
            'such as "shout".'
        )
    return value


def _is_name(text: str) -> bool:
    return text.isascii() and text.isidentifier() and len(text) <= MAX_NAME_CHARS


class _Checker:
    """Raise `InvalidSpec` for one unit's option values, naming options as the user wrote them."""

    def __init__(self, what: str, spelled: Mapping[str, str]) -> None:
        self._what = what
        self._spelled = spelled

    def fail(self, option: str, value: object, expected: str) -> InvalidSpec:
        given = self._spelled.get(option, option)
        return InvalidSpec(f"{given}={value!r} is not valid for {self._what}: {expected}.")

    def gpu(self, value: object) -> str:
        try:
            return parse_gpu(value)
        except ValueError as exc:
            raise self.fail("gpu", value, str(exc)) from None

    def integer(self, option: str, value: object, rule: _Int) -> None:
        # bool is an int subclass, but gpu=True-style mistakes must not pass as 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(option, value, rule.expected)
        if not rule.low <= value <= rule.high:
            raise self.fail(option, value, rule.expected)

    def at_most(self, option: str, value: int, bound: str, limit: int) -> None:
        if value <= limit:
            return
        if bound in self._spelled:
            expected = f"expected at most {self._spelled[bound]}={limit}"
        else:
            expected = f"expected at most {bound}={limit} (the default); set {bound} too"
        raise self.fail(option, value, expected)

    def env(self, value: object) -> dict[str, str]:
        if not isinstance(value, Mapping):
            raise self.fail(
                "env", value, 'expected a dict of names to strings, such as {"LOG_LEVEL": "debug"}'
            )
        # Messages show only the offending entry: the others may hold tokens.
        env: dict[str, str] = {}
        for key, item in value.items():
            if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
                raise self._env_fail(
                    f"key {key!r}",
                    "expected letters, digits and underscores, not starting with a digit",
                )
            if key.upper().startswith("KILN_"):
                raise self._env_fail(
                    f"key {key!r}", "names starting with KILN_ are reserved for Kiln"
                )
            if isinstance(item, str) and "\0" in item:
                raise self._env_fail(
                    f"[{key!r}]", "it holds a NUL character, which no variable can"
                )
            if not isinstance(item, str):
                # Numbers are the usual slip (env={"WORKERS": 4}): show the spelling that works.
                example = f", such as {str(item)!r}" if isinstance(item, int | float) else ""
                raise self._env_fail(f"[{key!r}]={item!r}", f"expected a string{example}")
            env[key] = item
        return env

    def _env_fail(self, what: str, expected: str) -> InvalidSpec:
        sep = "" if what.startswith("[") else " "
        return InvalidSpec(f"env{sep}{what} is not valid for {self._what}: {expected}.")

    def secrets(self, value: object) -> tuple[str, ...]:
        example = 'such as ["huggingface"]'
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise self.fail("secrets", value, f"expected a list of secret names, {example}")
        names: list[str] = []
        for item in value:
            if not isinstance(item, str) or not _SECRET_NAME.fullmatch(item):
                raise self.fail(
                    "secrets",
                    value,
                    f"{item!r} is not a secret name; expected names of 1 to 63 letters, digits, "
                    f"hyphens and underscores, starting with a letter, {example}",
                )
            if item not in names:
                names.append(item)
        return tuple(names)

    def snapshot(self, value: object, kind: UnitKind) -> str:
        if kind is UnitKind.FUNCTION:
            raise self.fail(
                "snapshot",
                value,
                "snapshots keep what a class's @kiln.enter(snap=True) hooks build, so the "
                "option belongs on @app.cls",
            )
        if value not in SNAPSHOT_MODES:
            modes = "; ".join(f'"{mode}" to {what}' for mode, what in SNAPSHOT_MODES.items())
            raise self.fail("snapshot", value, f"expected {modes}")
        return str(value)
