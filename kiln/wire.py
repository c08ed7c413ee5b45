"""NATS subjects, stream names and message formats: the one module that the router, the
scheduler, node agents and replicas share. Standard library only.

Everything lives under the deployment's namespace `ns` (`KILN_NAMESPACE`):

| subject                                | kind          | from → to                  |
|----------------------------------------|---------------|----------------------------|
| `ns.calls.<fid>`                       | JetStream WQ  | router → replicas          |
| `ns.reply.<router>.<fid>.<call>.<tok>` | core          | JetStream, replica → router|
| `ns.accepted.<router>.<fid>`           | core          | replica → router (batched) |
| `ns.demand.<fid>`                      | core          | router → scheduler (hint)  |
| `ns.hb.replica.<rid>`                  | core          | replica → all (1 s)        |
| `ns.hb.node.<node>`                    | core          | node agent → scheduler     |
| `ns.node.<node>.cmd`                   | core req/rep  | scheduler → node agent     |
| `ns.node.<node>.snapshots.<rid>`       | core req/rep  | replica → its node agent   |
| `ns.replica.<rid>.drain`               | core          | node agent → replica       |
| `ns.replica.<rid>.ctl`                 | core          | router → replica (credits, cancel) |
| `ns.replica.<rid>.in.<r>.<call>`       | core          | router → replica (session frames) |
| `ns.events.replica`                    | core          | node agent → scheduler     |
| `ns.events.coldstart.<rid>`            | core          | replica → scheduler, agent |
| `ns.jobevents.<fid>.<job>`             | JetStream     | replica → job recorder     |
| `ns.usage.<rid>`                       | JetStream     | node agent → billing worker |
| `ns.billing.blocks`                    | core          | billing → routers, scheduler |
| `ns.logs.<fid>`                        | JetStream     | replica → routers (`kiln logs`) |

A replica's NATS credentials (kiln.invoker.credentials) allow exactly its part of this table:
subjects of its own function (`<fid>`) and of itself (`<rid>`). Whoever receives a message on a
replica's subject trusts the subject, not the body, for who sent it (`decode_own`).

`<fid>` is a function's UUID in hex. Calls carry their parameters in headers and the caller's
bytes untouched in the body, so large JSON is never parsed on the hot path more than needed.
"""

from __future__ import annotations

import enum
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar, cast

from kiln import streams

__all__ = [
    "HEARTBEAT_INTERVAL_S",
    "JOB_ROUTER",
    "POD_SESSION_S",
    "REPLICA_LOST_AFTER_S",
    "SESSION_WINDOW",
    "TERMINAL_METHOD",
    "TUNNEL_METHOD",
    "WIRE_VERSION",
    "CallHeaders",
    "Event",
    "H",
    "JobEvent",
    "JobEventKind",
    "NodeHeartbeat",
    "Origin",
    "ProcessOrigin",
    "ReplicaHeartbeat",
    "StartReplica",
    "StreamControl",
    "Subjects",
    "UsageReport",
    "consumer_name",
    "decode",
    "decode_own",
    "encode",
    "parse_event",
    "stream_event",
]

_T = TypeVar("_T")

WIRE_VERSION = "5"
_JSON = "application/json"
HEARTBEAT_INTERVAL_S = 1.0
# A replica silent for this long is lost: its callers get worker_lost, the scheduler replaces it.
REPLICA_LOST_AFTER_S = 3.5
MAX_ADVERTISED_SNAPSHOTS = 1024
MAX_READY_FOR = 1024


class H:
    """Header names."""

    # A call's fields in one header, space-separated: wire version, call id, router (the one
    # waiting for the reply: subjects reply() and accepted()), accept-by (epoch seconds; a call
    # not started by then is dropped), timeout (seconds of execution allowed), deploy
    # generation (older replicas hand the call back), stream window (chunks a streaming call
    # may send before the router grants more; 0 for a plain call), method ("-" for none), token
    # (the call's secret: every reply subject carries it, so only the replica that took the
    # call can answer it), request id (last: it may hold spaces). Headers cost a parse on both
    # ends of the hot path, so one, not ten.
    CALL = "Kiln-Call"
    CONTENT_TYPE = "Kiln-Content-Type"  # only when not application/json
    # What a reply says (Event), and for stream events their sequence number: "chunk 7",
    # "end 12" (the number of chunks sent), "error 3" (chunks sent before the error).
    EVENT = "Kiln-Event"
    REPLICA = "Kiln-Replica"
    # The message's bytes are in the payload object store under this name (kiln.payloads).
    PAYLOAD = "Kiln-Payload"


class Event(enum.StrEnum):
    """What a message on a reply subject says."""

    # ACCEPTED travels on its own subject, batched: {"replica": id, "calls": [call ids]}.
    RESULT = "result"
    ERROR = "error"  # body: {"code", "message", "status"}
    CHUNK = "chunk"  # one item a generator yielded, as JSON
    END = "end"  # the generator finished; a session closed (body: {"code", "reason"})
    TEXT = "text"  # a session's text frame (UTF-8)
    BINARY = "binary"  # a session's binary frame
    CREDIT = "credit"  # a session's receiver may take frames numbered below this one


# The `router` of a job's CallHeaders: no router waits for it; its outcome goes to the job
# events stream (JobEvent), and its message is acked only when it is done.
JOB_ROUTER = "job"
# The method a pod's terminal session carries (kiln.invoker.pod_host serves it).
TERMINAL_METHOD = "kiln.terminal"
# How long a pod's terminal or forwarded connection may last: a week (an ssh left open must
# outlive any function's session limit; the pod's auto-stop is what bounds an idle one).
POD_SESSION_S = 7 * 86_400.0
# ... and one of its forwarded ports' connections (kiln.pods.tunnel).
TUNNEL_METHOD = "kiln.tunnel"


class JobEventKind(enum.StrEnum):
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # final: no attempt is left; otherwise it is retried after a backoff
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class JobEvent:
    """What a replica says about a job's attempt, for the job recorder to write down."""

    job_id: str
    kind: str  # JobEventKind
    attempt: int
    replica_id: str
    final: bool = False
    error_code: str | None = None
    error_message: str | None = None
    content_type: str | None = None
    result_b64: str | None = None  # a small result, inline
    result_ref: str | None = None  # a large one, in the job results bucket under this name
    # For the invocation log, on an attempt's end: how long it ran, the result's size, and
    # whether the job was stored before its replica was ready (it waited for a cold start).
    run_s: float | None = None
    bytes_out: int = 0
    cold: bool = False


# Frames of a WebSocket session either side may have in flight before the other grants more.
SESSION_WINDOW = 64


def stream_event(event: Event, seq: int) -> dict[str, str]:
    """The headers of a stream message: its event and sequence number in one header."""
    return {H.EVENT: f"{event} {seq}"}


def parse_event(value: str) -> tuple[str, int]:
    """`Kiln-Event`'s event and sequence number (-1 when it carries none)."""
    event, _, seq = value.partition(" ")
    return event, int(seq) if seq else -1


@dataclass(frozen=True)
class StreamControl:
    """A router's word about one streaming call to the replica running it: the chunks it may
    send (`limit`: sequence numbers below it), or stop (`cancel`: the caller left)."""

    router: str
    call: str
    limit: int = 0
    cancel: bool = False


def affinity_id(code_digest: str, function: str) -> str:
    """A short name for "a snapshot of this function's code" (`function` as `APP/NAME`, as
    snapshot manifests record it), whatever the node's runtime: what
    node agents advertise in their heartbeats and the scheduler's placement looks for. (The
    snapshot key also holds the node's Python and torch versions, which only the node knows.)"""
    return hashlib.sha256(f"{code_digest}/{function}".encode()).hexdigest()[:16]


def consumer_name(function_id: uuid.UUID) -> str:
    return streams.FUNCTION_CALLS.named(function_id.hex)


@dataclass(frozen=True)
class Subjects:
    ns: str

    @property
    def calls_stream(self) -> str:
        return streams.CALLS.named(self.ns)

    def payload_bucket(self, function_id: uuid.UUID) -> str:
        """Object store: the function's call bodies and results too large for one message
        (kiln.payloads). One per function, so a replica's credentials reach only its own."""
        return streams.PAYLOADS.named(self.ns, function_id.hex)

    def job_results_bucket(self, function_id: uuid.UUID) -> str:
        """Object store: the function's job results too large to record in PostgreSQL."""
        return streams.JOB_RESULTS.named(self.ns, function_id.hex)

    @property
    def job_cancels_bucket(self) -> str:
        """Key-value bucket: jobs cancelled before a replica started them."""
        return streams.JOB_CANCELS.named(self.ns)

    @property
    def job_starts_bucket(self) -> str:
        """Key-value bucket: the attempts of each job that started."""
        return streams.JOB_STARTS.named(self.ns)

    @property
    def job_events_stream(self) -> str:
        return streams.JOB_EVENTS.named(self.ns)

    def job_events(self, function_id: uuid.UUID, job_id: str) -> str:
        return f"{self.ns}.jobevents.{function_id.hex}.{job_id}"

    @property
    def all_job_events(self) -> str:
        return streams.JOB_EVENTS.subjects_in(self.ns)

    @property
    def usage_stream(self) -> str:
        return streams.USAGE.named(self.ns)

    def usage(self, replica_id: uuid.UUID) -> str:
        return f"{self.ns}.usage.{replica_id.hex}"

    @property
    def all_usage(self) -> str:
        return streams.USAGE.subjects_in(self.ns)

    @property
    def logs_stream(self) -> str:
        return streams.LOGS.named(self.ns)

    def logs(self, function_id: uuid.UUID) -> str:
        return f"{self.ns}.logs.{function_id.hex}"

    @property
    def all_logs(self) -> str:
        return streams.LOGS.subjects_in(self.ns)

    @property
    def code_bucket(self) -> str:
        return streams.CODE.named(self.ns)

    @property
    def snapshot_bucket(self) -> str:
        return streams.SNAPSHOTS.named(self.ns)

    @property
    def snapshot_leases(self) -> str:
        """Key-value bucket: who is baking which snapshot."""
        return streams.SNAPSHOT_BAKES.named(self.ns)

    @property
    def scheduler_lease(self) -> str:
        """Key-value bucket: which scheduler process acts (kiln.scheduler.leader)."""
        return streams.SCHEDULER_LEASE.named(self.ns)

    def snapshot_requests(self, node_id: str, replica_id: uuid.UUID) -> str:
        """Where a starting replica asks its node agent for its snapshot (or to bake it)."""
        return f"{self.ns}.node.{node_id}.snapshots.{replica_id.hex}"

    def all_snapshot_requests(self, node_id: str) -> str:
        return f"{self.ns}.node.{node_id}.snapshots.*"

    def cold_start(self, replica_id: uuid.UUID) -> str:
        """Where a replica reports how its cold start went (`ColdStartReport`)."""
        return f"{self.ns}.events.coldstart.{replica_id.hex}"

    @property
    def all_cold_starts(self) -> str:
        return f"{self.ns}.events.coldstart.*"

    @property
    def all_calls(self) -> str:
        return streams.CALLS.subjects_in(self.ns)

    def calls(self, function_id: uuid.UUID) -> str:
        return f"{self.ns}.calls.{function_id.hex}"

    def replies(self, router_id: str) -> str:
        return f"{self.ns}.reply.{router_id}.>"

    def reply(self, router_id: str, function_id: uuid.UUID, call_id: str, token: str) -> str:
        """Replies to one call (its PubAck, then the result or stream). The function is in
        the subject so that a replica may answer only its own function's calls, and the call's
        token (a secret in the call's headers) so that only the replica that took the call can:
        a replica can get JetStream to publish its bytes on any subject (docs/security.md)."""
        return f"{self.ns}.reply.{router_id}.{function_id.hex}.{call_id}.{token}"

    def accepted(self, router_id: str, function_id: uuid.UUID) -> str:
        """Where replicas say which of this router's calls of the function they took, several
        per message."""
        return f"{self.ns}.accepted.{router_id}.{function_id.hex}"

    def all_accepted(self, router_id: str) -> str:
        return f"{self.ns}.accepted.{router_id}.*"

    def demand(self, function_id: uuid.UUID) -> str:
        return f"{self.ns}.demand.{function_id.hex}"

    @property
    def all_demand(self) -> str:
        return f"{self.ns}.demand.*"

    def replica_heartbeat(self, replica_id: uuid.UUID) -> str:
        return f"{self.ns}.hb.replica.{replica_id.hex}"

    @property
    def all_replica_heartbeats(self) -> str:
        return f"{self.ns}.hb.replica.*"

    def node_heartbeat(self, node_id: str) -> str:
        return f"{self.ns}.hb.node.{node_id}"

    @property
    def all_node_heartbeats(self) -> str:
        return f"{self.ns}.hb.node.*"

    def node_command(self, node_id: str) -> str:
        return f"{self.ns}.node.{node_id}.cmd"

    def replica(self, replica_id: uuid.UUID) -> str:
        """Everything the platform sends one replica (its drain order, stream controls and
        session frames)."""
        return f"{self.ns}.replica.{replica_id.hex}.>"

    def drain(self, replica_id: uuid.UUID) -> str:
        return f"{self.ns}.replica.{replica_id.hex}.drain"

    def session_frames(self, replica_id: uuid.UUID, router: str, call_id: str) -> str:
        """Where a router sends the client's frames of one session to the replica holding it."""
        return f"{self.ns}.replica.{replica_id.hex}.in.{router}.{call_id}"

    def all_session_frames(self, replica_id: uuid.UUID) -> str:
        return f"{self.ns}.replica.{replica_id.hex}.in.>"

    def pod_sessions(self, replica_id: uuid.UUID) -> str:
        """Where a router opens a terminal (or a forwarded port's connection) on a pod's
        replica: core NATS, repeated until the replica says it took it, since a pod's replica
        takes no calls from the function's queue."""
        return f"{self.ns}.replica.{replica_id.hex}.open"

    def replica_control(self, replica_id: uuid.UUID) -> str:
        """Where routers send a replica `StreamControl`s for the calls it runs."""
        return f"{self.ns}.replica.{replica_id.hex}.ctl"

    @property
    def routers(self) -> str:
        """Routers announce themselves every 2 s (the rate-limit fallback counts them)."""
        return f"{self.ns}.routers"

    @property
    def billing_blocks(self) -> str:
        """The billing worker announces a customer's block set or lifted (JSON
        `{"customer_id", "block"}`): routers answer 402, the scheduler scales to zero."""
        return f"{self.ns}.billing.blocks"

    @property
    def access_revoked(self) -> str:
        """Routers tell each other of revoked keys and disabled customers (kiln.router.auth)."""
        return f"{self.ns}.access.revoked"

    @property
    def replica_events(self) -> str:
        return f"{self.ns}.events.replica"


@dataclass(frozen=True)
class CallHeaders:
    call_id: str
    router: str
    content_type: str
    accept_by: float
    timeout_s: float
    method: str | None = None
    request_id: str = ""
    generation: int = 0
    window: int = 0  # a streaming call's first credit, in chunks; 0: not a stream
    payload: str | None = None  # the body is in the payload store under this name
    token: str = "-"  # noqa: S105 - the call's secret, in its reply subject ("-": no replies)

    def to_headers(self) -> dict[str, str]:
        headers = {
            H.CALL: (
                f"{WIRE_VERSION} {self.call_id} {self.router} {self.accept_by:.3f} "
                f"{self.timeout_s:g} {self.generation} {self.window} {self.method or '-'} "
                f"{self.token} {self.request_id}"
            )
        }
        if self.content_type != _JSON:
            headers[H.CONTENT_TYPE] = self.content_type
        if self.payload is not None:
            headers[H.PAYLOAD] = self.payload
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> CallHeaders:
        fields = headers.get(H.CALL, "").split(" ", 9)
        if fields[0] != WIRE_VERSION:
            raise ValueError(f"call in wire format {fields[0]!r}, expected {WIRE_VERSION}")
        if len(fields) != 10:
            raise ValueError(f"call header has {len(fields)} fields, expected 10")
        _, call_id, router, accept_by, timeout_s, generation, window, method, token, request_id = (
            fields
        )
        return cls(
            call_id=call_id,
            router=router,
            content_type=headers.get(H.CONTENT_TYPE, _JSON),
            accept_by=float(accept_by),
            timeout_s=float(timeout_s),
            method=None if method == "-" else method,
            request_id=request_id,
            generation=int(generation),
            window=int(window),
            payload=headers.get(H.PAYLOAD),
            token=token,
        )


@dataclass(frozen=True)
class ReplicaHeartbeat:
    replica_id: str
    function_id: str
    version_id: str
    node_id: str
    state: str  # kiln.db.enums.ReplicaState values
    in_flight: int
    idle_since: float | None  # epoch seconds; None while busy
    error: str | None = None
    calls: int = 0  # taken since it started (its node agent puts them in usage reports)
    pod_id: str | None = None  # it is this pod's (kiln.db.models_pods): outside the autoscaler
    # A pod's replica: when its terminals or forwarded ports last carried a byte either way
    # (epoch seconds), for the pod's auto-stop and idle reminder. Later fields have defaults,
    # so a beat without them still decodes.
    active_at: float | None = None


class Origin(enum.StrEnum):
    """How a replica's instance came to be."""

    SNAPSHOT = "snapshot"  # restored from its snapshot
    BAKED = "baked"  # setup hooks ran, and their result became the snapshot
    HOOKS = "hooks"  # setup hooks ran (nothing to snapshot, snapshots off, or another baker)
    FALLBACK = "fallback"  # a snapshot existed but failed; hooks ran and a re-bake was asked


class ProcessOrigin(enum.StrEnum):
    """What process a replica's cold start ran in."""

    STANDBY = "standby"  # a standby that had imported everything the function needed
    PARTIAL = "partial"  # a standby that had not: the replica imported the rest (late_imports)
    FRESH = "fresh"  # no standby was ready: a new interpreter, which imported everything


@dataclass(frozen=True)
class ColdStartReport:
    """Sent once a replica is ready, and again (with `first_call` only) after its first call."""

    replica_id: str
    function_id: str
    origin: str
    phases: dict[str, float]  # phase name -> seconds
    snapshot_bytes: int = 0
    fallback_reason: str | None = None
    process: str = ProcessOrigin.FRESH.value  # ProcessOrigin
    # What the replica imported after it was assigned (module leaves, at most MAX_IMPORTS):
    # its node agent adds them to what standbys for the function import.
    late_imports: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NodeHeartbeat:
    node_id: str
    hostname: str
    # Slots by GPU type ("none" = CPU slots): total and free.
    slots: dict[str, int]
    free: dict[str, int]
    replicas: list[str] = field(default_factory=list)
    standbys: dict[str, int] = field(default_factory=dict)  # ready standbys by slot kind
    # affinity_id() of the snapshots cached on the node, most recent first, at most
    # MAX_ADVERTISED_SNAPSHOTS: placement prefers nodes that need not fetch.
    snapshots: list[str] = field(default_factory=list)
    # affinity_id() of the functions that ready standbys here have imported everything for, and
    # how many such standbys (at most MAX_READY_FOR functions): placement prefers nodes whose
    # cold start imports nothing.
    ready_for: dict[str, int] = field(default_factory=dict)
    containers: bool = False  # it runs container pods (Docker)
    gpu_containers: bool = False  # with GPUs (the NVIDIA container toolkit)


@dataclass(frozen=True)
class StartReplica:
    """The scheduler's order to a node agent."""

    replica_id: str
    function_id: str
    version_id: str
    generation: int  # the function's deploy generation, compared with each call's (H.CALL)
    app: str
    function: str  # the function's or class's name
    artifact_digest: str
    entrypoint: str  # the app file's path inside the artifact
    spec: dict[str, Any]  # FunctionSpec.to_dict()
    gpu_type: str
    gpu_count: int
    requested_at: float = 0.0  # epoch seconds: when the scheduler saw the demand it serves
    received_at: float = 0.0  # epoch seconds: when the node agent got the order
    snapshot_key: str | None = None  # set by the node agent for a class it can snapshot
    customer_id: str = ""  # who is billed for the replica's time (UsageReport)
    pod_id: str | None = None  # a pod's or a shell's replica: it serves terminals, no calls
    pod_kind: str = ""  # kiln.db.enums.PodKind: "shell" ends with its first terminal
    volume_gb: int = 0  # a pod's volume: a directory on the node kept across its replicas
    # A pod's Python requirements, installed by its node into an environment it keeps for
    # every pod that asks for the same (kiln.invoker.environments).
    requirements: list[str] = field(default_factory=list)
    environment: str = ""  # set by the node agent: that environment's directory
    image: str = ""  # a container pod's image, run by the node agent beside the replica


@dataclass(frozen=True)
class UsageReport:
    """An interval of a replica's billable time: from when it held its slot (or its previous
    report) to now. `event_id` is the replica id and a sequence number, so a report sent twice
    is charged once."""

    event_id: str
    replica_id: str
    customer_id: str
    function_id: str
    gpu_type: str  # "none" for a CPU slot
    gpu_count: int
    period_start: float  # epoch seconds
    period_end: float
    final: bool = False  # the replica released its slot
    calls: int = 0  # calls the replica took in the interval (0 in a node agent's closing report)
    since: float = 0.0  # epoch seconds: when the replica's billable time began (its slot)


def encode(message: Any) -> bytes:
    """Encode a wire dataclass as JSON."""
    return json.dumps(asdict(message), separators=(",", ":")).encode()


_FIELD_NAMES: dict[type, frozenset[str]] = {}  # by wire dataclass, for decode


def decode(kind: type[_T], data: bytes) -> _T:
    """A wire dataclass from its JSON. Fields it does not declare are dropped: a message
    grows only by fields with defaults, so one from a newer sender (in a rolling upgrade)
    still reads, and one from an older sender gets the defaults."""
    values = json.loads(data)
    if isinstance(values, dict):
        known = _FIELD_NAMES.get(kind)
        if known is None:
            known = _FIELD_NAMES[kind] = frozenset(f.name for f in fields(cast(Any, kind)))
        values = {name: value for name, value in values.items() if name in known}
    return kind(**values)


def decode_own(kind: type[_T], subject: str, data: bytes) -> _T:
    """Decode what a replica sent on one of its own subjects (those ending in its id, the only
    ones its credentials let it publish to), refusing a message that speaks for another."""
    message = decode(kind, data)
    sender = getattr(message, "replica_id", "")
    # Exactly the id's canonical form: other spellings of the same id would count as other
    # replicas in the maps keyed by it.
    if sender != str(uuid.UUID(hex=subject.rsplit(".", 1)[-1])):
        raise ValueError(f"a message on {subject} speaks for replica {sender}")
    return message
