"""Each replica's own NATS credentials, issued by its node agent at assignment, in an account
of its function's own.

A replica runs a customer's code, so what its NATS user may do is exactly what the replica
protocol needs, bound to its function and to itself (`replica_permissions`): pull its function's
calls and settle them, answer them (the router's reply subjects carry the function), report its
own heartbeat, cold start and logs, ask its own node agent for its snapshot, and reach its
function's payload and job-result buckets. Nothing else: not another function's calls, not
usage, billing, access or job subjects of others, not the JetStream API beyond those buckets and
its consumer.

Permissions bind what the replica publishes, not what the server publishes for it: JetStream
answers a pull, a direct get or an ack on whatever reply subject the replica names. So the user
lives in an account of its function's own (`function_imports`), which has no JetStream and
imports from the Kiln account only that function's subjects: whatever reply subject a replica
names is one of its function's account, where nothing else listens. The agent makes the account
(signed with the operator signing key `KILN_NATS_OPERATOR_SIGNING_KEY`, its key derived from
the account signing key, so every agent makes the same one) and pushes it to the servers with
the system user `KILN_NATS_SYSTEM_CREDS` before the function's first replica here connects.
Platform processes still check the seal of what replicas send (kiln.seal).

Without credentials (NATS without authorisation) replicas connect as everything else does, with
none.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import json
import socket
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from kiln.errors import ConfigError
from kiln.natsauth import (
    Import,
    Permissions,
    account_jwt,
    derived_account_seed,
    mint_user,
    public_key_of_seed,
)
from kiln.settings import Settings
from kiln.wire import Subjects, consumer_name

__all__ = [
    "ReplicaCredentials",
    "function_imports",
    "replica_inbox",
    "replica_permissions",
]

_PUSH_TIMEOUT_S = 5.0


def replica_inbox(replica_id: uuid.UUID) -> str:
    """The prefix of the replica's reply inboxes (`nats.connect(inbox_prefix=...)`): its own,
    so that it cannot subscribe to other replicas' answers."""
    return f"_INBOX_{replica_id.hex}"


def _bucket_api(stream: str) -> tuple[str, ...]:
    """What reading objects of the bucket whose stream is `stream` takes: direct gets
    (kiln.objects; a function account reaches no other JetStream API)."""
    return (f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>")


def _jetstream(subjects: Subjects, function_id: uuid.UUID) -> tuple[str, ...]:
    """The JetStream subjects a replica of `function_id` publishes to."""
    calls, consumer = subjects.calls_stream, consumer_name(function_id)
    payloads = subjects.payload_bucket(function_id)
    results = subjects.job_results_bucket(function_id)
    cancels = subjects.job_cancels_bucket
    starts = subjects.job_starts_bucket
    return (
        f"$JS.API.CONSUMER.MSG.NEXT.{calls}.{consumer}",
        f"$JS.ACK.{calls}.{consumer}.>",
        *_bucket_api(f"OBJ_{payloads}"),
        f"$O.{payloads}.>",
        *_bucket_api(f"OBJ_{results}"),
        f"$O.{results}.>",
        # Whether a job was cancelled before it started: one key-value read by name.
        f"$JS.API.DIRECT.GET.KV_{cancels}.$KV.{cancels}.*",
        # How many attempts of its own function's jobs started: read, and counted up.
        f"$JS.API.DIRECT.GET.KV_{starts}.$KV.{starts}.{function_id.hex}.*",
        f"$KV.{starts}.{function_id.hex}.*",
    )


def replica_permissions(
    subjects: Subjects, *, function_id: uuid.UUID, replica_id: uuid.UUID, node_id: str
) -> Permissions:
    """What one replica of `function_id` may publish and subscribe to."""
    publish = (
        subjects.reply("*", function_id, "*", "*"),  # results, stream chunks, session frames
        subjects.accepted("*", function_id),
        subjects.replica_heartbeat(replica_id),
        subjects.cold_start(replica_id),
        subjects.logs(function_id),
        subjects.snapshot_requests(node_id, replica_id),
        subjects.job_events(function_id, "*"),
        *_jetstream(subjects, function_id),
    )
    subscribe = (f"{replica_inbox(replica_id)}.>", subjects.replica(replica_id))
    return Permissions(publish=publish, subscribe=subscribe)


def function_imports(
    subjects: Subjects, *, function_id: uuid.UUID, kiln_account: str
) -> tuple[Import, ...]:
    """What the account of `function_id` takes from the Kiln account (`kiln_account`): the
    subjects its replicas publish to (for any of its replicas, on any node), and the messages
    the platform sends replicas."""
    ns = subjects.ns
    services = (
        subjects.reply("*", function_id, "*", "*"),
        subjects.accepted("*", function_id),
        f"{ns}.hb.replica.*",
        f"{ns}.events.coldstart.*",
        subjects.logs(function_id),
        f"{ns}.node.*.snapshots.*",
        subjects.job_events(function_id, "*"),
        *_jetstream(subjects, function_id),
    )
    return (
        *(Import(subject, kiln_account) for subject in services),
        Import(f"{ns}.replica.>", kiln_account, stream=True),
    )


class ReplicaCredentials:
    """Issues replicas their credentials on a node, when NATS requires credentials, in their
    function's account (made and pushed by `prepare`). They work only from this host's
    addresses: copied out of a sandbox, they open nothing elsewhere."""

    def __init__(
        self,
        signing_seed: str,
        *,
        operator_signing_seed: str,
        kiln_account: str,
        subjects: Subjects,
        node_id: str,
        push: Callable[[str], Awaitable[None]],
        sources: tuple[str, ...] | None = None,
    ) -> None:
        """`push`: sends an account JWT to the NATS servers (raises when they refuse it)."""
        self.signing_seed = signing_seed
        self.operator_signing_seed = operator_signing_seed
        self.kiln_account = kiln_account
        self.subjects = subjects
        self.node_id = node_id
        self.push = push
        self.sources = host_addresses() if sources is None else sources
        self._pushed: dict[uuid.UUID, asyncio.Future[None]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, *, node_id: str) -> ReplicaCredentials | None:
        """None when this node connects without credentials; an error when it has credentials
        but not the keys to make its replicas theirs."""
        if settings.nats_creds is None:
            return None
        missing = [
            name
            for name, value in (
                ("KILN_NATS_SIGNING_KEY", settings.nats_signing_key),
                ("KILN_NATS_OPERATOR_SIGNING_KEY", settings.nats_operator_signing_key),
                ("KILN_NATS_SYSTEM_CREDS", settings.nats_system_creds),
            )
            if value is None
        ]
        if missing:
            raise ConfigError([
                f"{name} is needed by a node agent when KILN_NATS_CREDS is set: the agent makes "
                "each function a NATS account and each replica its own credentials"
                for name in missing
            ])  # fmt: skip
        assert settings.nats_signing_key is not None
        assert settings.nats_operator_signing_key is not None
        assert settings.nats_system_creds is not None
        return cls(
            settings.nats_signing_key,
            operator_signing_seed=settings.nats_operator_signing_key,
            kiln_account=account_of_creds(settings.nats_creds),
            subjects=Subjects(settings.namespace),
            node_id=node_id,
            push=functools.partial(push_account, settings, settings.nats_system_creds),
        )

    def account(self, function_id: uuid.UUID) -> str:
        """The public key of the function's account: the same on every node, and another in
        another namespace (installations may share NATS servers, and its imports name the
        namespace's subjects)."""
        label = f"{self.subjects.ns} {function_id.hex}"
        return public_key_of_seed(derived_account_seed(self.signing_seed, label))

    def account_jwt(self, function_id: uuid.UUID) -> str:
        return account_jwt(
            self.operator_signing_seed,
            account=self.account(function_id),
            name=f"function-{function_id.hex}",
            signing_key=public_key_of_seed(self.signing_seed),
            imports=function_imports(
                self.subjects, function_id=function_id, kiln_account=self.kiln_account
            ),
        )

    async def prepare(self, function_id: uuid.UUID) -> None:
        """Make sure the NATS servers know the function's account (once per function in this
        process; cold starts of one function share the push). Raises when they refuse it."""
        pushed = self._pushed.get(function_id)
        if pushed is None or (
            pushed.done() and (pushed.cancelled() or pushed.exception() is not None)
        ):
            pushed = self._pushed[function_id] = asyncio.ensure_future(
                self.push(self.account_jwt(function_id))
            )
        await asyncio.shield(pushed)

    def forget_pushed(self) -> None:
        """After NATS came back: the servers may have lost the accounts pushed so far."""
        self._pushed = {fid: f for fid, f in self._pushed.items() if not f.done()}

    def issue(self, *, function_id: uuid.UUID, replica_id: uuid.UUID) -> str:
        """The text of a credentials file for one replica (after `prepare`)."""
        permissions = replica_permissions(
            self.subjects, function_id=function_id, replica_id=replica_id, node_id=self.node_id
        )
        return mint_user(
            self.signing_seed,
            account=self.account(function_id),
            name=f"replica-{replica_id.hex}",
            permissions=permissions,
            sources=self.sources,
        ).creds_file_text()


async def push_account(settings: Settings, system_creds: Path, jwt: str) -> None:
    """Send an account JWT to the NATS servers as a user of the system account (a "full"
    resolver keeps it, and passes it on to the other servers of a cluster)."""
    import nats

    nc = await nats.connect(
        servers=settings.nats_servers,
        user_credentials=str(system_creds),
        connect_timeout=settings.connect_timeout_s,
        allow_reconnect=False,
        name="kiln-agent-accounts",
    )
    try:
        reply = await nc.request("$SYS.REQ.CLAIMS.UPDATE", jwt.encode(), timeout=_PUSH_TIMEOUT_S)
    finally:
        await nc.close()
    answer = json.loads(reply.data)
    error = answer.get("error") if isinstance(answer, dict) else None
    if error:
        raise RuntimeError(f"the NATS servers refused a function account: {error}")


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
