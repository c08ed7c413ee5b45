"""Every JetStream stream, durable consumer and bucket Kiln keeps, declared once.

A declaration says what the stream or bucket is for, how its name is made from the namespace
(`<ns>`) and, for the per-function ones, the function (`<function>`: its id in hex), and its
limits; `ensure_stream`, `ensure_consumer`, `key_value` and `object_store` create it as declared
or bring an existing one up to its declaration, with `KILN_STREAM_REPLICAS` copies.
`kiln.wire.Subjects` takes the names from here, and the table in docs/architecture.md
("Streams and buckets") is checked against `DECLARED` by tests/unit/test_docs.py.

nats is imported only by the functions that talk to JetStream, so replicas and the SDK can
read the names without loading it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.api import StreamConfig
    from nats.js.kv import KeyValue
    from nats.js.object_store import ObjectStore

__all__ = [
    "CALLS",
    "CALL_ACK_WAIT_S",
    "CODE",
    "DECLARED",
    "FUNCTION_CALLS",
    "JETSTREAM_WAIT_S",
    "JOB_CANCELS",
    "JOB_EVENTS",
    "JOB_RECORDER",
    "JOB_RESULTS",
    "JOB_STARTS",
    "LOGS",
    "PAYLOADS",
    "PUBLISH_RETRY_S",
    "SCHEDULER_LEASE",
    "SNAPSHOTS",
    "SNAPSHOT_BAKES",
    "USAGE",
    "USAGE_BILLING",
    "Bucket",
    "Consumer",
    "Stream",
    "ensure_consumer",
    "ensure_function_buckets",
    "ensure_job_streams",
    "ensure_stream",
    "key_value",
    "object_store",
    "patient",
    "queue_depth",
]

# How long a publish into a stream is retried (kiln._jetstream.publish_durably): a stream
# leader election in a cluster takes a few seconds, a reconnect about one.
PUBLISH_RETRY_S = 15.0
# How long the calls queue waits for a delivered call's ack before delivering it again. Sync
# calls are acked when a replica takes them; jobs when done, with progress acks meanwhile. Short,
# because a delivery lost in flight (its stream's leader died sending it) waits this long.
CALL_ACK_WAIT_S = 6.0


@dataclass(frozen=True, kw_only=True)
class Stream:
    """A stream: `name` and `subjects` are patterns with `<ns>`."""

    name: str
    subjects: str
    purpose: str
    retention: Literal["work queue", "limits"]
    max_age_s: float | None = None
    duplicate_window_s: float | None = None
    # Oldest messages dropped past max bytes and age, which the operator sets
    # (KILN_FUNCTION_LOGS_MAX_BYTES, KILN_FUNCTION_LOGS_MAX_AGE_S).
    operator_bounds: bool = False

    def named(self, ns: str) -> str:
        return _fill(self.name, ns)

    def subjects_in(self, ns: str) -> str:
        return _fill(self.subjects, ns)

    def config(
        self,
        ns: str,
        *,
        replicas: int,
        max_bytes: int | None = None,
        max_age_s: float | None = None,
    ) -> StreamConfig:
        from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

        if self.operator_bounds and (max_bytes is None or max_age_s is None):
            raise ValueError(f"stream {self.name} needs the operator's max_bytes and max_age_s")
        return StreamConfig(
            name=self.named(ns),
            subjects=[self.subjects_in(ns)],
            retention=(
                RetentionPolicy.WORK_QUEUE
                if self.retention == "work queue"
                else RetentionPolicy.LIMITS
            ),
            discard=DiscardPolicy.OLD,
            storage=StorageType.FILE,
            max_age=max_age_s if self.operator_bounds else self.max_age_s,
            max_bytes=max_bytes if self.operator_bounds else None,
            duplicate_window=self.duplicate_window_s or 0,  # 0: the server's default (2 min)
            num_replicas=replicas,
        )


@dataclass(frozen=True, kw_only=True)
class Consumer:
    """A durable pull consumer of `stream`; `name` and `filter` may hold `<function>`."""

    stream: Stream
    name: str
    filter: str
    purpose: str
    ack_wait_s: float
    # A work queue's function consumer takes every call queued before it existed.
    unlimited_pending: bool = False

    def named(self, function_hex: str = "") -> str:
        return _fill(self.name, "", function_hex)


@dataclass(frozen=True, kw_only=True)
class Bucket:
    """A key-value or object bucket: `name` is a pattern with `<ns>` (and `<function>`)."""

    name: str
    kind: Literal["key-value", "object"]
    purpose: str
    # Entries expire this long after their last write; `ttl_setting` when the operator sets it.
    ttl_s: float | None = None
    ttl_setting: str | None = None
    # Read by direct get: replicas' accounts reach no other JetStream API.
    direct: bool = False

    def named(self, ns: str, function_hex: str = "") -> str:
        return _fill(self.name, ns, function_hex)

    @property
    def stream_prefix(self) -> str:
        """What JetStream prefixes the bucket's own stream with."""
        return "KV_" if self.kind == "key-value" else "OBJ_"


def _fill(pattern: str, ns: str, function_hex: str = "") -> str:
    return pattern.replace("<ns>", ns).replace("<function>", function_hex)


# Streams ----------------------------------------------------------------------------------------

CALLS = Stream(
    name="<ns>_calls",
    subjects="<ns>.calls.>",
    purpose="every call and job, removed once a replica acks it",
    retention="work queue",
    max_age_s=24 * 3600.0,
    # Message ids are remembered this long, so a publish retried through a leader election is
    # stored once.
    duplicate_window_s=2 * PUBLISH_RETRY_S,
)
JOB_EVENTS = Stream(
    name="<ns>_job_events",
    subjects="<ns>.jobevents.>",
    purpose="async jobs' progress and outcomes, removed once the job recorder wrote them",
    retention="work queue",
    duplicate_window_s=120.0,
)
USAGE = Stream(
    name="<ns>_usage",
    subjects="<ns>.usage.*",
    purpose="replica-seconds reports (with a MAC), removed once billing put them in the ledger",
    retention="work queue",
    # A node agent's retries of one report are stored once.
    duplicate_window_s=300.0,
)
LOGS = Stream(
    name="<ns>_logs",
    subjects="<ns>.logs.*",
    purpose="what functions printed and logged, oldest dropped first",
    retention="limits",
    operator_bounds=True,
)

# Durable consumers -------------------------------------------------------------------------------

FUNCTION_CALLS = Consumer(
    stream=CALLS,
    name="fn_<function>",
    filter="<ns>.calls.<function>",
    purpose="a function's replicas pull its calls",
    ack_wait_s=CALL_ACK_WAIT_S,
    unlimited_pending=True,
)
JOB_RECORDER = Consumer(
    stream=JOB_EVENTS,
    name="recorder",
    filter="<ns>.jobevents.>",
    purpose="the job recorder writes jobs' events down",
    ack_wait_s=30.0,
)
USAGE_BILLING = Consumer(
    stream=USAGE,
    name="billing",
    filter="<ns>.usage.*",
    purpose="billing workers charge usage reports",
    # A worker that died holding reports: they are delivered again after this long.
    ack_wait_s=10.0,
)

# Buckets -----------------------------------------------------------------------------------------

JOB_CANCELS = Bucket(
    name="<ns>_job_cancels",
    kind="key-value",
    purpose="jobs cancelled before a replica started them",
    # Queued jobs wait in the calls stream at most a day: a cancellation need not outlive that.
    ttl_s=25 * 3600.0,
    direct=True,
)
JOB_STARTS = Bucket(
    name="<ns>_job_starts",
    kind="key-value",
    purpose="how many attempts of each job started, by `<function>.<job>` (a delivery lost on "
    "its way through a leader election started none, and is no lost attempt)",
    ttl_s=25 * 3600.0,
    direct=True,
)
PAYLOADS = Bucket(
    name="<ns>_payloads_<function>",
    kind="object",
    purpose="a function's bodies and results too large for one message; deleted when read",
    # Longer than a call can wait and run, so a payload outlives its call.
    ttl_s=24 * 3600.0,
)
JOB_RESULTS = Bucket(
    name="<ns>_jobresults_<function>",
    kind="object",
    purpose="a function's async jobs' results too large to keep in PostgreSQL",
    ttl_setting="KILN_JOB_RESULT_TTL_S",
)
CODE = Bucket(
    name="<ns>_code",
    kind="object",
    purpose="deployed apps' code archives, by digest",
)
SNAPSHOTS = Bucket(
    name="<ns>_snapshots",
    kind="object",
    purpose="baked snapshots, shared between nodes",
)
SNAPSHOT_BAKES = Bucket(
    name="<ns>_snapshot_bakes",
    kind="key-value",
    purpose="who bakes which snapshot (create-if-absent leases)",
    # A baker that died frees its lease after this long.
    ttl_s=30 * 60.0,
)
SCHEDULER_LEASE = Bucket(
    name="<ns>_scheduler",
    kind="key-value",
    purpose="which scheduler process acts (the leader's lease)",
    ttl_setting="KILN_SCHEDULER_LEASE_S",
)

DECLARED: tuple[Stream | Consumer | Bucket, ...] = (
    CALLS, JOB_EVENTS, USAGE, LOGS,
    FUNCTION_CALLS, JOB_RECORDER, USAGE_BILLING,
    JOB_CANCELS, JOB_STARTS, PAYLOADS, JOB_RESULTS, CODE, SNAPSHOTS, SNAPSHOT_BAKES,
    SCHEDULER_LEASE,
)  # fmt: skip


# Making them -------------------------------------------------------------------------------------

# JetStream answers nothing for a few seconds while a cluster elects its meta leader (after it
# starts, or a member dies): making a stream or bucket is retried this long before it fails.
JETSTREAM_WAIT_S = 30.0
_P = ParamSpec("_P")
_T = TypeVar("_T")


# JetStream's answer when a replicated stream cannot be placed because a peer is offline (a
# server restarting, a cluster still forming): it passes like an election does.
_NO_PEERS_FOR_PLACEMENT = 10005


def patient(make: Callable[_P, Awaitable[_T]]) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """`make`, retried through what a leader election or a reconnect answers (a timeout, no
    responders, 503, no peers for placement, a publish no stream acknowledged) for
    JETSTREAM_WAIT_S, with the reconnect backoff between tries. `make` must be safe to repeat."""

    @functools.wraps(make)
    async def patiently(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        import nats.errors
        from nats.js.errors import (
            BadRequestError,
            NoStreamResponseError,
            ServiceUnavailableError,
        )

        from kiln._nats import reconnect_delay

        retryable = (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.errors.ConnectionReconnectingError,
            ServiceUnavailableError,
            NoStreamResponseError,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + JETSTREAM_WAIT_S
        attempt = 0
        while True:
            try:
                return await make(*args, **kwargs)
            except (*retryable, BadRequestError) as exc:
                if isinstance(exc, BadRequestError) and exc.err_code != _NO_PEERS_FOR_PLACEMENT:
                    raise
                pause = reconnect_delay(attempt)
                if loop.time() + pause >= deadline:
                    raise
                await asyncio.sleep(pause)
                attempt += 1

    return patiently


@patient
async def ensure_stream(
    js: JetStreamContext,
    stream: Stream,
    ns: str,
    *,
    replicas: int,
    max_bytes: int | None = None,
    max_age_s: float | None = None,
) -> None:
    """Create `stream`, or bring an existing one's settings up to its declaration."""
    config = stream.config(ns, replicas=replicas, max_bytes=max_bytes, max_age_s=max_age_s)
    try:
        await js.add_stream(config)
    except Exception:  # noqa: BLE001 - exists already (maybe with other limits): update it
        await js.update_stream(config)


@patient
async def ensure_consumer(
    js: JetStreamContext, consumer: Consumer, ns: str, function_hex: str = ""
) -> str:
    """Create `consumer`, or bring an existing one up to its declaration; its name."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    name = consumer.named(function_hex)
    config = ConsumerConfig(
        durable_name=name,
        filter_subject=_fill(consumer.filter, ns, function_hex),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=consumer.ack_wait_s,
        max_ack_pending=-1 if consumer.unlimited_pending else None,
    )
    await js.add_consumer(consumer.stream.named(ns), config)
    return name


@patient
async def key_value(
    js: JetStreamContext,
    bucket: Bucket,
    name: str,
    *,
    replicas: int,
    ttl_s: float | None = None,
) -> KeyValue:
    """The key-value bucket `name` (`bucket`'s name in a namespace, from `kiln.wire.Subjects`),
    created as declared on first use; an existing one is brought to `replicas` copies (and to
    direct gets where declared). `ttl_s` is the operator's value for a bucket whose TTL is a
    setting."""
    from nats.js.api import KeyValueConfig
    from nats.js.errors import BucketNotFoundError, NotFoundError

    if bucket.kind != "key-value":
        raise ValueError(f"{bucket.name} is an object bucket")
    try:
        found = await js.key_value(name)
    except (BucketNotFoundError, NotFoundError):
        config = KeyValueConfig(
            bucket=name,
            ttl=_ttl(bucket, ttl_s),
            history=1,
            direct=bucket.direct,
            replicas=replicas,
        )
        return await js.create_key_value(config)
    await _match(js, bucket.stream_prefix + name, replicas=replicas, direct=bucket.direct)
    return found


@patient
async def object_store(
    js: JetStreamContext,
    bucket: Bucket,
    name: str,
    *,
    replicas: int,
    ttl_s: float | None = None,
) -> ObjectStore:
    """The object bucket `name` (`bucket`'s name in a namespace, from `kiln.wire.Subjects`),
    created as declared on first use; an existing one is brought to `replicas` copies. `ttl_s`
    is the operator's value for a bucket whose TTL is a setting."""
    from nats.js.api import ObjectStoreConfig, StorageType
    from nats.js.errors import BucketNotFoundError, NotFoundError

    if bucket.kind != "object":
        raise ValueError(f"{bucket.name} is a key-value bucket")
    try:
        found = await js.object_store(name)
    except (BucketNotFoundError, NotFoundError):
        config = ObjectStoreConfig(
            ttl=_ttl(bucket, ttl_s), storage=StorageType.FILE, replicas=replicas
        )
        return await js.create_object_store(name, config)
    await _match(js, bucket.stream_prefix + name, replicas=replicas, direct=False)
    return found


def _ttl(bucket: Bucket, given: float | None) -> float | None:
    if bucket.ttl_setting is not None:
        if given is None:
            raise ValueError(f"{bucket.name}'s TTL is {bucket.ttl_setting}: pass its value")
        return given
    return bucket.ttl_s


async def _match(js: JetStreamContext, stream: str, *, replicas: int, direct: bool) -> None:
    """An existing bucket made before the cluster grew (`KILN_STREAM_REPLICAS` raised), or
    before replicas read it by direct get."""
    info = await js.stream_info(stream)
    config = info.config
    if (config.num_replicas or 1) != replicas or (direct and not config.allow_direct):
        changes: dict[str, object] = {"num_replicas": replicas}
        if direct:
            changes["allow_direct"] = True
        await js.update_stream(dataclasses.replace(config, **changes))  # type: ignore[arg-type]


# What a part makes before it uses them ------------------------------------------------------------


async def ensure_job_streams(js: JetStreamContext, ns: str, *, replicas: int) -> None:
    """The job events stream and the cancellations and starts buckets (the router and the job
    recorder make them on start)."""
    await ensure_stream(js, JOB_EVENTS, ns, replicas=replicas)
    await key_value(js, JOB_CANCELS, JOB_CANCELS.named(ns), replicas=replicas)
    await key_value(js, JOB_STARTS, JOB_STARTS.named(ns), replicas=replicas)


async def ensure_function_buckets(
    js: JetStreamContext, ns: str, function_hex: str, *, replicas: int, result_ttl_s: float
) -> None:
    """A function's own buckets: its payloads and its jobs' large results. A node agent makes
    them before a replica starts, since the replica's credentials cannot."""
    await object_store(js, PAYLOADS, PAYLOADS.named(ns, function_hex), replicas=replicas)
    await object_store(
        js,
        JOB_RESULTS,
        JOB_RESULTS.named(ns, function_hex),
        replicas=replicas,
        ttl_s=result_ttl_s,
    )


async def queue_depth(js: JetStreamContext, ns: str, function_hex: str) -> int:
    """Calls in a function's queue that no replica has finished: pending plus unacked (0 when
    its consumer does not exist yet)."""
    from nats.js.errors import NotFoundError

    try:
        info = await js.consumer_info(
            CALLS.named(ns), FUNCTION_CALLS.named(function_hex), timeout=2
        )
    except NotFoundError:
        return 0
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
