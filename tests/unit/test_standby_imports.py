"""What a function needs imported, learned from what it did: the modules a snapshot's object graph
names (read from the pickle's opcodes, never run), what its code refers to and what the process
imported; kept as leaves, and refused when a name is not a module's."""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import pickle
import sys
import types
from pathlib import Path

import pytest

from kiln.snapshots.imports import (
    MAX_IMPORTS,
    expand,
    function_needs,
    graph_modules,
    imported_since,
    leaves,
    module_names,
    referenced_modules,
    user_modules,
)


class Local:
    """A class of this module: a graph holding one names it."""


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_graph_names_the_modules_of_its_classes_in_every_pickle_protocol(protocol: int) -> None:
    state = {
        "ratio": fractions.Fraction(1, 3),
        "again": fractions.Fraction(2, 3),  # the module name comes from the memo this time
        "price": decimal.Decimal("1.5"),
        "ordered": collections.OrderedDict(a=1),
        "day": datetime.date(2026, 1, 1),
        "kind": Local,
        "plain": [1, "two", 3.0, None],
    }
    found = graph_modules(pickle.dumps(state, protocol=protocol))
    expected = {"fractions", "decimal", "collections", "datetime", __name__}
    assert expected <= found
    assert found - expected <= {"_codecs", "copyreg", "builtins"}  # what old protocols use


def test_a_graph_of_plain_data_names_no_module() -> None:
    assert graph_modules(pickle.dumps({"a": [1, 2], "b": ("x", b"y")}, protocol=5)) == set()


def test_leaves_import_everything_and_expand_gives_it_back() -> None:
    names = {"a", "a.b", "a.b.c", "a.bc", "ab", "x.y"}
    assert leaves(names) == ("a.b.c", "a.bc", "ab", "x.y")
    assert expand(leaves(names)) == names | {"x"}
    assert leaves([]) == ()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("torch", "expected a list of module names, got str"),
        (["torch", "os; rm -rf /"], "'os; rm -rf /' is not a module name"),
        (["../etc"], "'../etc' is not a module name"),
        ([3], "3 is not a module name"),
        (["a" * 201], "is not a module name"),
        (["m"] * (MAX_IMPORTS + 1), f"{MAX_IMPORTS + 1} module names; at most {MAX_IMPORTS}"),
    ],
)
def test_module_lists_from_customer_processes_are_checked(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        module_names(raw)


def test_module_lists_that_are_fine_pass() -> None:
    assert module_names(["torch", "transformers.models.gpt2", "_decimal"]) == (
        "torch", "transformers.models.gpt2", "_decimal"
    )  # fmt: skip


def test_what_the_users_code_refers_to_is_found_even_when_imported_before(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "helper.py").write_text("")
    app = types.ModuleType("userapp")
    app.__file__ = str(code / "userapp.py")
    app.fractions = fractions  # type: ignore[attr-defined]  # `import fractions`
    app.Decimal = decimal.Decimal  # type: ignore[attr-defined]  # `from decimal import Decimal`
    app.LIMIT = 3  # type: ignore[attr-defined]
    assert referenced_modules([app]) >= {"fractions", "decimal", "builtins"}
    sys.modules["userapp"] = app
    try:
        assert user_modules(code) == {"userapp"}
        # Everything was imported already (as in a standby), and still the needs name them;
        # the user's own module never (no other process can import it by name).
        needs = function_needs(frozenset(sys.modules), code)
        assert {"fractions", "decimal"} <= set(needs)
        assert "userapp" not in needs
        assert not [name for name in needs if name.startswith("kiln")]
    finally:
        del sys.modules["userapp"]


def test_what_a_process_imported_since_a_point_leaves_out_kiln_and_the_users_code(
    tmp_path: Path,
) -> None:
    before = frozenset(sys.modules) - {"fractions", "kiln.snapshots.imports", "__main__"}
    assert {"fractions"} <= imported_since(before, tmp_path)
    assert not {"kiln.snapshots.imports", "__main__"} & imported_since(before, tmp_path)
