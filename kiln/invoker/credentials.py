"""Each replica's own NATS credentials, issued by its node agent at assignment.

A replica runs a customer's code, so what its NATS user may do is exactly what the replica
protocol needs, bound to its function and to itself (`replica_permissions`): pull its function's
calls and settle them, answer them (the router's reply subjects carry the function), report its
own heartbeat, cold start and logs, ask its own node agent for its snapshot, and reach its
function's payload and job-result buckets. Nothing else: not another function's calls, not
usage, billing, access or job subjects of others, not the JetStream API beyond those buckets and
its consumer. Platform processes check the rest (a message on a replica's own subject must speak
for that replica: `kiln.wire.decode_own`).

The agent signs with an account signing key (`KILN_NATS_SIGNING_KEY`); the account is the one
its own credentials (`KILN_NATS_CREDS`) belong to. Without credentials (NATS without
authorisation) replicas connect as everything else does, with none.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import socket
import uuid
from pathlib import Path

from kiln.errors import ConfigError
from kiln.natsauth import Permissions, mint_user
from kiln.settings import Settings
from kiln.wire import Subjects, consumer_name

__all__ = ["ReplicaCredentials", "replica_inbox", "replica_permissions"]


def replica_inbox(replica_id: uuid.UUID) -> str:
    """The prefix of the replica's reply inboxes (`nats.connect(inbox_prefix=...)`): its own,
    so that it cannot subscribe to the platform's `_INBOX.>`."""
    return f"_INBOX_{replica_id.hex}"


def _bucket_api(stream: str) -> tuple[str, ...]:
    """What nats-py's object and key-value stores publish to use the stream's bucket: read,
    write and delete objects, with the short-lived consumers that reading takes."""
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.STREAM.PURGE.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


def replica_permissions(
    subjects: Subjects, *, function_id: uuid.UUID, replica_id: uuid.UUID, node_id: str
) -> Permissions:
    """What one replica of `function_id` may publish and subscribe to."""
    calls, consumer = subjects.calls_stream, consumer_name(function_id)
    payloads = subjects.payload_bucket(function_id)
    results = subjects.job_results_bucket(function_id)
    cancels = subjects.job_cancels_bucket
    publish = (
        subjects.reply("*", function_id, "*", "*"),  # results, stream chunks, session frames
        subjects.accepted("*", function_id),
        subjects.replica_heartbeat(replica_id),
        subjects.cold_start(replica_id),
        subjects.logs(function_id),
        subjects.snapshot_requests(node_id, replica_id),
        subjects.job_events(function_id, "*"),
        f"$JS.API.CONSUMER.MSG.NEXT.{calls}.{consumer}",
        f"$JS.ACK.{calls}.{consumer}.>",
        # nats-py finds a bucket's stream by subject before reading an object.
        "$JS.API.STREAM.NAMES",
        *_bucket_api(f"OBJ_{payloads}"),
        f"$O.{payloads}.>",
        *_bucket_api(f"OBJ_{results}"),
        f"$O.{results}.>",
        # Whether a job was cancelled before it started: one key-value read by name.
        f"$JS.API.STREAM.INFO.KV_{cancels}",
        f"$JS.API.DIRECT.GET.KV_{cancels}.$KV.{cancels}.*",
        f"$JS.API.STREAM.MSG.GET.KV_{cancels}",
    )
    subscribe = (f"{replica_inbox(replica_id)}.>", subjects.replica(replica_id))
    return Permissions(publish=publish, subscribe=subscribe)


class ReplicaCredentials:
    """Issues replicas their credentials on a node, when NATS requires credentials. They work
    only from this host's addresses: copied out of a sandbox, they open nothing elsewhere."""

    def __init__(
        self,
        signing_seed: str,
        *,
        account: str,
        subjects: Subjects,
        node_id: str,
        sources: tuple[str, ...] | None = None,
    ) -> None:
        self.signing_seed = signing_seed
        self.account = account
        self.subjects = subjects
        self.node_id = node_id
        self.sources = host_addresses() if sources is None else sources

    @classmethod
    def from_settings(cls, settings: Settings, *, node_id: str) -> ReplicaCredentials | None:
        """None when this node connects without credentials; an error when it has credentials
        but no key to issue its replicas theirs."""
        if settings.nats_creds is None:
            return None
        if settings.nats_signing_key is None:
            raise ConfigError([
                "KILN_NATS_SIGNING_KEY is needed by a node agent when KILN_NATS_CREDS is set: "
                "the agent issues each replica its own NATS credentials"
            ])  # fmt: skip
        return cls(
            settings.nats_signing_key,
            account=account_of_creds(settings.nats_creds),
            subjects=Subjects(settings.namespace),
            node_id=node_id,
        )

    def issue(self, *, function_id: uuid.UUID, replica_id: uuid.UUID) -> str:
        """The text of a credentials file for one replica."""
        permissions = replica_permissions(
            self.subjects, function_id=function_id, replica_id=replica_id, node_id=self.node_id
        )
        return mint_user(
            self.signing_seed,
            account=self.account,
            name=f"replica-{replica_id.hex}",
            permissions=permissions,
            sources=self.sources,
        ).creds_file_text()


def host_addresses() -> tuple[str, ...]:
    """This host's addresses (link-local ones aside), each as a network of one."""
    import psutil

    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(address.address.split("%")[0])
            if not ip.is_link_local:
                found.append(str(ipaddress.ip_network(ip)))
    return tuple(dict.fromkeys(found))


def account_of_creds(path: Path) -> str:
    """The account (public key) that the user in the credentials file at `path` belongs to."""
    text = path.read_text()
    try:
        jwt = text.split("-----BEGIN NATS USER JWT-----", 1)[1].split("---", 1)[0].strip()
        claims_part = jwt.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(claims_part + "=" * (-len(claims_part) % 4)))
        account = claims["nats"].get("issuer_account") or claims["iss"]
    except (IndexError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError([
            f"KILN_NATS_CREDS={path} is not a NATS credentials file (user JWT and seed)"
        ]) from None  # fmt: skip
    return str(account)
