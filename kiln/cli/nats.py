"""`kiln nats trust`: the NATS operator trust a production cluster needs, made once.

Kiln runs NATS in operator mode (`kiln.natsauth`): an operator JWT, the system account and
Kiln's account preloaded into each server, and credentials for the platform's processes. `kiln
dev` makes these for its embedded server; a production cluster gets them from this command,
whose files go into Secrets Manager (docs/production.md):

- `nats-server.conf`: the trust part of every server's configuration (`include`d by it);
- `nats-platform.json`: the platform's and the system account's credentials and the keys node
  agents sign their replicas' credentials with (what each Kiln host fetches at boot);
- `trust.json`: every key, to keep offline: with it the others can be made again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["nats_app"]

nats_app = typer.Typer(help="NATS for a production cluster.", no_args_is_help=True)


@nats_app.command("trust")
def trust(
    out: Annotated[Path, typer.Option(help="A new directory for the files.")],
    resolver_dir: Annotated[
        str, typer.Option(help="Where each server keeps the function accounts it is sent.")
    ] = "/var/lib/nats/accounts",
) -> None:
    """Make a new operator trust: the servers' configuration part and the platform's
    credentials."""
    from kiln._files import write_private
    from kiln.natsauth import Trust

    if out.exists() and any(out.iterdir()):
        raise typer.BadParameter(f"{out} is not empty: a trust is made once, into a new directory")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = Trust.generate()
    write_private(out / "trust.json", made.to_json().encode())
    write_private(out / "nats-server.conf", made.server_config(Path(resolver_dir)).encode())
    platform = {
        "platform_creds": made.platform_user("kiln-platform").creds_file_text(),
        "system_creds": made.system_user("kiln-accounts").creds_file_text(),
        "signing_key": made.signing_seed,
        "operator_signing_key": made.operator_signing_seed,
    }
    write_private(out / "nats-platform.json", json.dumps(platform, indent=2).encode())
    typer.echo(f"wrote {out}/nats-server.conf, nats-platform.json and trust.json (keep it offline)")
