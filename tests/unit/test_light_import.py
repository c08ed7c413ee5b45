"""`import kiln`, the SDK and the CLI must not pull in heavy or server-side modules.

A child interpreter makes those modules unimportable (as in a bare environment where they are
not installed) and imports the light surface; any import of them fails the test.
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = [
    "torch", "transformers", "safetensors", "sqlalchemy", "alembic", "asyncpg", "redis",
    "stripe", "nats", "starlette", "uvicorn", "prometheus_client", "pynvml", "numpy",
    "pydantic",
]  # fmt: skip

CHILD = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} must not be imported by the light surface")
        return None

BLOCKED = set(sys.argv[1:])
sys.meta_path.insert(0, Block())
import kiln, kiln.settings, kiln.errors, kiln.cli.main, kiln.config_file, kiln.client, kiln.apikeys
from kiln.functions import App, lifecycle
from kiln.functions.loader import load_app, resolve
from kiln.functions.package import package, unpack

app = kiln.App("light")

@app.function(gpu="A10G", max_containers=2)
def shout(text: str) -> str:
    return text.upper()

@app.cls
class Greeter:
    @kiln.enter(snap=True)
    def load(self): ...

    @kiln.method()
    def greet(self, name: str) -> str:
        return name

assert [s.to_dict()["name"] for s in app.spec()] == ["shout", "Greeter"]
assert lifecycle(resolve(app, "Greeter")).enter_snap == ("load",)

import tempfile
from pathlib import Path

built = package(Path(kiln.__file__).resolve().parents[1] / "examples" / "hello.py")
with tempfile.TemporaryDirectory() as scratch:
    assert unpack(built.archive, Path(scratch)) == ["hello.py"]
    assert load_app(Path(scratch) / "hello.py").name == "hello"
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok")
"""


def test_light_surface_imports_without_heavy_modules() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *HEAVY], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_help_runs_without_heavy_modules() -> None:
    code = CHILD.replace(
        'print("ok")',
        "import runpy\nsys.argv = ['kiln', 'db', '--help']\n"
        "runpy.run_module('kiln', run_name='__main__')",
    )
    # Kiln's CLI imports no pydantic, but typer itself coerces parameters with it when it runs.
    blocked = [module for module in HEAVY if module != "pydantic"]
    result = subprocess.run(
        [sys.executable, "-c", code, *blocked], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "upgrade" in result.stdout


SDK_ONLY = """
import sys
import kiln

function = kiln.lookup("hello/shout", url="http://127.0.0.1:9", api_key="kiln_test_key")
client = function.client()
assert function.client() is client  # one session per handle, kept for its later calls
client.close()
parts = [m.split(".") for m in sys.modules]
cli = sorted(".".join(p) for p in parts if p[:2] == ["kiln", "cli"] or p[0] == "typer")
assert not cli, cli
print("ok")
"""


def test_the_sdk_calls_kiln_without_importing_the_cli() -> None:
    """The SDK's remote calls use kiln.client; the CLI (typer, every command) is not theirs."""
    result = subprocess.run(
        [sys.executable, "-c", SDK_ONLY], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
