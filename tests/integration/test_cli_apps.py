"""`kiln deploy`, `kiln apps`, `kiln ps`, `kiln stop` and the SDK, through the one client
(kiln/client.py) against a running platform."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from eventually import eventually
from stack import Platform, next_node_beat
from typer.testing import CliRunner, Result

import kiln
from kiln.cli.main import app as cli
from kiln.errors import RemoteError

KEPT = """
import kiln

app = kiln.App("kept")


@app.function(gpu="none", min_replicas=1)
def echo(text: str) -> str:
    return text
"""


async def test_apps_lists_stop_drains_and_removes_and_json_is_the_apis(
    platform: Platform, tmp_path: Path
) -> None:
    (tmp_path / "kept.py").write_text(KEPT)
    env = {"KILN_URL": platform.url, "KILN_API_KEY": platform.key, "KILN_HOME": str(tmp_path)}

    def kiln_cli(*args: str) -> Result:
        # In a thread: the CLI's client blocks, and the platform serves on this event loop.
        return CliRunner().invoke(cli, list(args), env=env)

    deployed = await asyncio.to_thread(kiln_cli, "deploy", str(tmp_path / "kept.py"))
    assert deployed.exit_code == 0, deployed.output
    assert deployed.output.startswith("deployed kept version 1")

    listed = await asyncio.to_thread(kiln_cli, "apps", "--json")
    assert listed.exit_code == 0, listed.output
    (kept,) = [a for a in json.loads(listed.output) if a["name"] == "kept"]
    assert (kept["version"], kept["state"]) == (1, "active")
    table = await asyncio.to_thread(kiln_cli, "apps")
    header, *rows = table.output.splitlines()
    assert header.split() == ["APP", "VERSION", "STATE", "DIGEST", "UPDATED"]
    assert any(row.split()[:3] == ["kept", "1", "active"] for row in rows)

    async def replica_is_up() -> bool:
        return any(r["state"] == "ready" for r in await platform.replicas("kept/echo"))

    await eventually(replica_is_up, within_s=60)
    (replica,) = await platform.replicas("kept/echo")
    ps = await asyncio.to_thread(kiln_cli, "ps", "--json")
    (echo,) = [f for f in json.loads(ps.output) if f["app"] == "kept"]
    assert (echo["name"], echo["min_replicas"]) == ("echo", 1)
    assert [r["state"] for r in echo["live_replicas"]] == ["ready"]

    # The SDK reaches the same app through the same client.
    function = kiln.lookup("kept/echo", url=platform.url, api_key=platform.key)
    assert await asyncio.to_thread(function.remote, text="still here") == "still here"

    stopped = await asyncio.to_thread(kiln_cli, "stop", "kept")
    assert stopped.exit_code == 0, stopped.output
    assert stopped.output.strip() == "stopped kept: its replicas drain and its routes are gone"
    after = json.loads((await asyncio.to_thread(kiln_cli, "apps", "--json")).output)
    assert "kept" not in [a["name"] for a in after]

    # Drained: its node stops reporting the replica.
    await next_node_beat(
        platform,
        lambda beat: beat.node_id == replica["node"] and replica["id"] not in beat.replicas,
        timeout_s=45,
    )
    with pytest.raises(RemoteError) as gone:
        await asyncio.to_thread(function.remote, text="too late")
    assert (gone.value.http_status, gone.value.api_code) == (404, "not_found")

    again = await asyncio.to_thread(kiln_cli, "stop", "kept")
    assert isinstance(again.exception, RemoteError)
    assert again.exception.api_message == "app 'kept' not found"


def test_a_missing_configuration_names_where_it_looks(tmp_path: Path) -> None:
    unset = {"KILN_URL": None, "KILN_API_KEY": None}
    result = CliRunner().invoke(cli, ["apps"], env={"KILN_HOME": str(tmp_path), **unset})
    assert result.exit_code != 0
    message = str(result.exception)
    assert message.startswith(
        f"no Kiln to talk to: start `kiln dev` (it writes the URL and a key to "
        f"{tmp_path / 'config.toml'}), or set KILN_URL and KILN_API_KEY"
    )
