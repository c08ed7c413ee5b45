"""What sandboxed replicas may connect to: a firewall chain for the sandboxes' uids.

Every sandbox runs under a host uid of its own from one range (kiln.invoker.sandbox), so one
`iptables` rule sends every packet they send through a chain of this node agent's
(`-m owner --uid-owner FIRST-LAST`), whatever network namespace tricks the code tries (it has
none: the sandbox shares the host's network, and the seccomp filter refuses new namespaces).

- `KILN_SANDBOX_EGRESS=allow` (the default): replicas reach NATS and whatever the host reaches,
  except the platform's PostgreSQL and Redis (those of `KILN_DATABASE_URL` and `KILN_REDIS_URL`,
  where the agent has them, as under `kiln dev`) and the metrics port, which refuse them. A
  node agent on its own host has no database URL: keep the platform's services unreachable from
  GPU hosts in the network (security groups), or use `deny`.
- `deny`: replicas reach the NATS servers and nothing else (no DNS either: give NATS by address
  or in /etc/hosts).

Refusals are TCP resets (or ICMP unreachable for other protocols), so a refused connection fails
at once instead of hanging. The agent adds the chain when it starts and removes it when it
stops; one left behind by a crash is flushed and reused by the next start on the node.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import shlex
import shutil
import socket
import subprocess
from urllib.parse import urlsplit

from kiln.errors import ConfigError
from kiln.settings import EgressMode, Settings

__all__ = ["Egress", "Endpoint", "egress_rules", "remove_chains"]

_log = logging.getLogger("kiln.egress")
_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A TCP port at an address; `local`: any address of this host (the service is on it)."""

    address: str
    port: int
    local: bool = False

    @property
    def family(self) -> int:
        return 4 if ipaddress.ip_address(self.address).version == 4 else 6


def _endpoints(url: str | None, default_port: int) -> list[Endpoint]:
    """Every address a service URL's host resolves to (all of a cluster's, comma-separated)."""
    found: list[Endpoint] = []
    for part in (url or "").split(","):
        split = urlsplit(part.strip())
        if not split.hostname:
            continue
        port = split.port or default_port
        try:
            infos = socket.getaddrinfo(split.hostname, port, proto=socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            problem = f"cannot resolve {split.hostname} for the sandboxes' egress policy: {exc}"
            raise ConfigError([problem]) from None
        for info in infos:
            address = str(info[4][0])
            ip = ipaddress.ip_address(address)
            found.append(Endpoint(address, port, local=ip.is_loopback or ip.is_unspecified))
    return list(dict.fromkeys(found))


def egress_rules(
    mode: EgressMode,
    *,
    nats: list[Endpoint],
    refused: list[Endpoint],
    metrics_port: int,
    family: int,
) -> list[list[str]]:
    """The chain's rules (arguments of `iptables -A CHAIN`) for one address family."""
    rules: list[list[str]] = []

    def where(endpoint: Endpoint) -> list[str]:
        # A service on the loopback interface answers on every local address of the host.
        if endpoint.local:
            return ["-m", "addrtype", "--dst-type", "LOCAL"]
        return ["-d", endpoint.address]

    def port(endpoint: Endpoint) -> list[str]:
        return ["-p", "tcp", "--dport", str(endpoint.port)]

    for endpoint in nats:
        if endpoint.family == family:
            rules.append([*where(endpoint), *port(endpoint), "-j", "ACCEPT"])
    reset = ["-j", "REJECT", "--reject-with", "tcp-reset"]
    if mode is EgressMode.DENY:
        rules.append(["-p", "tcp", *reset])
        rules.append(["-j", "REJECT"])
        return rules
    for endpoint in refused:
        if endpoint.family == family or endpoint.local:
            rules.append([*where(endpoint), *port(endpoint), *reset])
    rules.append(["-p", "tcp", "--dport", str(metrics_port), *reset])
    return rules


class Egress:
    """This node agent's chain, for the sandbox uids `first`..`last`."""

    def __init__(self, settings: Settings, *, first_uid: int, last_uid: int, tag: str) -> None:
        self.mode = settings.sandbox_egress
        self.uids = f"{first_uid}-{last_uid}"
        # Chain names are at most 28 characters; one per agent, so that agents sharing a host
        # (tests, a GPU host split between installations) never remove each other's.
        self.chain = "KILN-" + hashlib.sha256(tag.encode()).hexdigest()[:12]
        # On the jump into it, so that whoever owns the namespace can find it again (a test
        # session removing what its killed agents left).
        self.comment = f"kiln {settings.namespace} {tag}"[:255]
        self.nats = _endpoints(settings.nats_url, 4222)
        self.refused = [
            *_endpoints(settings.database_url, 5432),
            *_endpoints(settings.redis_url, 6379),
        ]
        self.metrics_port = settings.metrics_port
        self.tools = [tool for tool in ("iptables", "ip6tables") if shutil.which(tool)]

    @classmethod
    def for_node(cls, settings: Settings, *, first_uid: int, last_uid: int, tag: str) -> Egress:
        """The policy, or a clear error where it cannot be enforced."""
        egress = cls(settings, first_uid=first_uid, last_uid=last_uid, tag=tag)
        if "iptables" not in egress.tools:
            raise ConfigError([
                "KILN_SANDBOX_EGRESS needs iptables on the node to keep replicas off the "
                "platform's ports: apt-get install iptables (or set KILN_SANDBOX=off on a "
                "trusted single-tenant node)"
            ])  # fmt: skip
        if egress.mode is EgressMode.DENY and "ip6tables" not in egress.tools:
            raise ConfigError([
                "KILN_SANDBOX_EGRESS=deny needs ip6tables too, or IPv6 would stay open to "
                "replicas: apt-get install iptables"
            ])  # fmt: skip
        return egress

    def install(self) -> None:
        for tool, family in (("iptables", 4), ("ip6tables", 6)):
            if tool not in self.tools:
                continue
            self._remove(tool)
            _run(tool, "-N", self.chain)
            rules = egress_rules(
                self.mode, nats=self.nats, refused=self.refused,
                metrics_port=self.metrics_port, family=family,
            )  # fmt: skip
            for rule in rules:
                _run(tool, "-A", self.chain, *rule)
            _run(tool, "-I", "OUTPUT", *self._jump())
        _log.info("sandboxes' egress: %s (chain %s)", self.mode.value, self.chain)

    def remove(self) -> None:
        for tool in self.tools:
            try:
                self._remove(tool)
            except OSError as exc:
                _log.warning("could not remove the egress chain %s: %s", self.chain, exc)

    def _jump(self) -> list[str]:
        return ["-m", "owner", "--uid-owner", self.uids,
                "-m", "comment", "--comment", self.comment, "-j", self.chain]  # fmt: skip

    def _remove(self, tool: str) -> None:
        while _try(tool, "-D", "OUTPUT", *self._jump()):
            pass
        if _try(tool, "-F", self.chain):
            _try(tool, "-X", self.chain)


def remove_chains(marker: str) -> int:
    """Remove every egress chain whose comment holds `marker` (`kiln <namespace>`, or a part
    of the agents' home), its agent live or dead: a test session's teardown, since agents it
    killed could not remove theirs. How many it removed."""
    removed = 0
    for tool in ("iptables", "ip6tables"):
        if not shutil.which(tool):
            continue
        try:
            listed = subprocess.run(
                [tool, "-w", "-S", "OUTPUT"], capture_output=True, text=True,
                timeout=_TIMEOUT_S, check=True,
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            continue
        for line in listed.splitlines():
            if not line.startswith("-A OUTPUT ") or "-j KILN-" not in line or marker not in line:
                continue
            args = shlex.split(line)[2:]
            chain = args[args.index("-j") + 1]
            if _try(tool, "-D", "OUTPUT", *args) and _try(tool, "-F", chain):
                _try(tool, "-X", chain)
                removed += 1
    return removed


def _run(tool: str, *args: str) -> None:
    done = subprocess.run(
        [tool, "-w", *args], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise OSError(f"{tool} {' '.join(args)}: {done.stderr.strip()}")


def _try(tool: str, *args: str) -> bool:
    try:
        _run(tool, *args)
    except OSError:
        return False
    return True
