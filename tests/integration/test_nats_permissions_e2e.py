"""A hostile function with its replica's own NATS credentials: every attempt to reach beyond
its function and itself is refused by the server, and the platform keeps serving.

The function reads the credentials its node agent issued it (they are in its launch file, as
they must be for the replica to connect) and tries, one at a time, what a customer who wanted
other customers' calls, or free compute, would try. The server answers each refused publish or
subscription with a permissions violation; a publish it allows gets none, which the control
attempts (the replica's own subjects) show."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
import sqlalchemy as sa
from stack import Platform

from kiln._nats import connect_options
from kiln.db.models import App, Function, Replica
from kiln.db.session import create_engine

pytestmark = pytest.mark.integration

HOSTILE = """
import asyncio
import json
import os
from pathlib import Path

import nats
from nats.aio.client import RawCredentials

import kiln

app = kiln.App("intruder")


def _launch() -> dict:
    # Sandboxed, the launch file is in its read-only home; otherwise in its working directory.
    for place in (Path(os.environ["KILN_HOME"]), Path.cwd()):
        if (place / "launch.json").exists():
            return json.loads((place / "launch.json").read_text())
    raise FileNotFoundError("launch.json")


async def _attempt(attacks: list[list[str]]) -> dict:
    launch = _launch()
    url = os.environ["KILN_NATS_URL"]
    outcome = {}
    try:
        anonymous = await nats.connect(url, max_reconnect_attempts=0, allow_reconnect=False)
    except Exception as exc:
        outcome["connect without credentials"] = f"refused: {exc}"
    else:
        outcome["connect without credentials"] = "allowed"
        await anonymous.close()

    violations = []
    marked = asyncio.Event()  # the server refused the marker
    marker = "marker.refused"  # a subject no replica may publish to

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc).lower())
        if marker in violations[-1]:
            marked.set()

    me = launch["replica_id"].replace("-", "")
    nc = await nats.connect(
        url, user_credentials=RawCredentials(launch["nats_creds"]), error_cb=on_error,
        inbox_prefix=f"_INBOX_{me}",
    )
    try:
        for name, kind, subject in attacks:
            subject = subject.replace("{node}", launch["node_id"]).replace("{me}", me)
            before = len(violations)
            marked.clear()
            if kind == "sub":
                await nc.subscribe(subject)
            else:
                await nc.publish(subject, b"{}", reply=f"_INBOX_{me}.x")
            # The server answers in order: once it refused the marker, sent after the attempt,
            # it has said whatever it had to say about the attempt.
            await nc.publish(marker, b"")
            await asyncio.wait_for(marked.wait(), 1)
            said = [v for v in violations[before:] if marker not in v]
            outcome[name] = (
                "refused" if any(subject.lower() in v and "permission" in v for v in said)
                else "allowed"
            )
    finally:
        await nc.close()
    return outcome


@app.function(idle_timeout=120)
def attack(attacks: list[list[str]]) -> dict:
    return asyncio.run(_attempt(attacks))


async def _forge(namespace: str, targets: list, beat: dict) -> str:
    # The server publishes for it: an object of its own bucket, fetched by a direct get whose
    # reply subject is a target, goes there with the headers it was stored with.
    launch = _launch()
    me, function = (launch[k].replace("-", "") for k in ("replica_id", "function_id"))
    bucket = f"{namespace}_payloads_{function}"
    nc = await nats.connect(
        os.environ["KILN_NATS_URL"], user_credentials=RawCredentials(launch["nats_creds"]),
        inbox_prefix=f"_INBOX_{me}",
    )
    try:
        direct_get = f"$JS.API.DIRECT.GET.OBJ_{bucket}"
        for n, (target, body) in enumerate(targets):
            chunk = f"$O.{bucket}.C.forged{n}"
            await nc.request(chunk, body.encode(), headers={"Kiln-Seal": "0" * 64}, timeout=5)
            request = json.dumps({"last_by_subj": chunk}).encode()
            await nc.publish(direct_get, request, reply=target)
        # Served after those (one stream's direct gets are answered in order).
        request = json.dumps({"last_by_subj": f"$O.{bucket}.C.forged0"}).encode()
        answer = await nc.request(direct_get, request, timeout=5)
        # And its own heartbeat subject, which it may publish to, without its function's seal.
        beat = {**beat, "replica_id": launch["replica_id"], "node_id": launch["node_id"],
                "version_id": launch["version_id"]}
        await nc.publish(f"{namespace}.hb.replica.{me}", json.dumps(beat).encode())
        await nc.flush()
    finally:
        await nc.close()
    return answer.headers["Nats-Subject"]


@app.function(idle_timeout=120)
def forge(namespace: str, targets: list, beat: dict) -> str:
    return asyncio.run(_forge(namespace, targets, beat))
"""

BYSTANDER = """
import kiln

app = kiln.App("neighbour")


@app.function(idle_timeout=120)
def hello() -> str:
    return "still here"
"""


async def _neighbour(platform: Platform) -> tuple[str, str]:
    """The bystander function's id and its running replica's id, both in hex."""
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(Function.id, Replica.id)
                    .join(App, App.id == Function.app_id)
                    .join(Replica, Replica.function_id == Function.id)
                    .where(App.name == "neighbour", Replica.stopped_at.is_(None))
                    .limit(1)
                )
            ).one()
    finally:
        await engine.dispose()
    return uuid.UUID(str(row[0])).hex, uuid.UUID(str(row[1])).hex


async def _intruder_beside_neighbour(platform: Platform, tmp_path: Path) -> tuple[str, str]:
    """Both functions deployed, the neighbour serving: its function's and replica's ids (hex)."""
    if platform.settings.nats_creds is None:
        pytest.skip("NATS runs without authorisation here: unset KILN_TEST_NATS_URL")
    await platform.deploy_source(tmp_path, "neighbour.py", BYSTANDER)
    await platform.deploy_source(tmp_path, "intruder.py", HOSTILE)
    assert (await platform.call("neighbour/hello")).json() == "still here"
    return await _neighbour(platform)


async def test_a_replica_reaches_nothing_beyond_its_function_and_itself(
    platform: Platform, tmp_path: Path
) -> None:
    other, other_replica = await _intruder_beside_neighbour(platform, tmp_path)
    ns = platform.settings.namespace
    attacks: dict[str, tuple[str, str]] = {
        "subscribe to everything": ("sub", ">"),
        "subscribe to another function's calls": ("sub", f"{ns}.calls.{other}"),
        "subscribe to the platform's inboxes": ("sub", "_INBOX.>"),
        "subscribe to another replica's orders": ("sub", f"{ns}.replica.{other_replica}.>"),
        "subscribe to usage": ("sub", f"{ns}.usage.*"),
        "pull another function's calls": (
            "pub", f"$JS.API.CONSUMER.MSG.NEXT.{ns}_calls.fn_{other}"
        ),
        "answer another function's call": ("pub", f"{ns}.reply.r1.{other}.1"),
        "say it took another function's calls": ("pub", f"{ns}.accepted.r1.{other}"),
        "publish a usage report for another replica": ("pub", f"{ns}.usage.{other_replica}"),
        "publish a usage report of its own": ("pub", f"{ns}.usage.{{me}}"),
        "beat in another replica's name": ("pub", f"{ns}.hb.replica.{other_replica}"),
        "report another replica's cold start": (
            "pub", f"{ns}.events.coldstart.{other_replica}"
        ),
        "ask for another replica's snapshot": (
            "pub", f"{ns}.node.{{node}}.snapshots.{other_replica}"
        ),
        "publish a job event of another function": ("pub", f"{ns}.jobevents.{other}.1"),
        "write another function's logs": ("pub", f"{ns}.logs.{other}"),
        "create a JetStream consumer": ("pub", f"$JS.API.CONSUMER.CREATE.{ns}_calls"),
        "delete the calls stream": ("pub", f"$JS.API.STREAM.DELETE.{ns}_calls"),
        "read another function's payloads": (
            "pub", f"$JS.API.STREAM.INFO.OBJ_{ns}_payloads_{other}"
        ),
        "read the code store": ("pub", f"$JS.API.STREAM.INFO.OBJ_{ns}_code"),
        "block a customer": ("pub", f"{ns}.billing.blocks"),
        "revoke a key": ("pub", f"{ns}.access.revoked"),
        "order a node": ("pub", f"{ns}.node.{{node}}.cmd"),
        # Controls: what its protocol needs is allowed, so a refusal above is not an accident.
        "beat in its own name": ("pub", f"{ns}.hb.replica.{{me}}"),
        "listen for its own orders": ("sub", f"{ns}.replica.{{me}}.>"),
    }  # fmt: skip
    response = await platform.call(
        "intruder/attack",
        json={"attacks": [[name, kind, subject] for name, (kind, subject) in attacks.items()]},
    )
    assert response.status_code == 200, response.text
    outcome: dict[str, Any] = response.json()
    assert outcome.pop("connect without credentials").startswith("refused")
    assert outcome.pop("beat in its own name") == "allowed"
    assert outcome.pop("listen for its own orders") == "allowed"
    assert outcome == {name: "refused" for name in outcome}, outcome
    assert len(outcome) == len(attacks) - 2
    # The platform is unharmed: the neighbour answers, and so does the intruder.
    assert (await platform.call("neighbour/hello")).json() == "still here"


@contextmanager
def heard(text: str) -> Iterator[asyncio.Event]:
    """An event set once the platform (running in this process) logs a line containing
    `text`."""
    said = asyncio.Event()

    class Listener(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                said.set()

    listener, root = Listener(logging.WARNING), logging.getLogger()
    root.addHandler(listener)
    try:
        yield said
    finally:
        root.removeHandler(listener)


async def _replica_is_running(platform: Platform, replica: str) -> bool:
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        async with engine.connect() as conn:
            stopped = await conn.scalar(
                sa.select(Replica.stopped_at).where(Replica.id == uuid.UUID(hex=replica))
            )
    finally:
        await engine.dispose()
    return stopped is None


async def test_what_a_replica_has_the_server_publish_for_it_reaches_nothing_of_the_platform(
    platform: Platform, tmp_path: Path
) -> None:
    """Its permissions let a replica read its own bucket, and a direct get's reply subject is
    its to choose: the server publishes an object it wrote, headers and all, wherever it says.
    In the platform's account that could delete any stream; the replica's user lives in an
    account of its function's own, where the answer stays. What it may send the platform, its
    own heartbeat, counts only under its function's seal."""
    other, other_replica = await _intruder_beside_neighbour(platform, tmp_path)
    ns = platform.settings.namespace
    targets = [
        (f"$JS.API.STREAM.DELETE.{ns}_usage", ""),  # everyone's unbilled time
        (f"$JS.API.STREAM.PURGE.{ns}_calls", ""),  # everyone's queued calls
        (  # another customer's replica, stopped
            f"{ns}.node.{platform.settings.node_id}.cmd",
            json.dumps(
                {"op": "stop", "replica_id": str(uuid.UUID(hex=other_replica)), "grace_s": 0}
            ),
        ),
        (  # another function's job, ended with a result of its choosing
            f"{ns}.jobevents.{other}.{uuid.uuid4()}",
            json.dumps(
                {"job_id": str(uuid.uuid4()), "kind": "succeeded", "attempt": 1, "replica": "x"}
            ),
        ),
    ]
    beat = {  # its own replica, in the neighbour's function's name
        "function_id": str(uuid.UUID(hex=other)), "state": "ready", "in_flight": 0,
        "idle_since": None,
    }  # fmt: skip
    with heard("ignoring a replica heartbeat on") as refused:
        response = await platform.call(
            "intruder/forge", json={"namespace": ns, "targets": targets, "beat": beat}
        )
        assert response.status_code == 200, response.text
        await asyncio.wait_for(refused.wait(), 20)
    nc = await nats.connect(**connect_options(platform.settings))
    try:
        js = nc.jetstream()
        for stream in (f"{ns}_usage", f"{ns}_calls"):
            await js.stream_info(stream)  # still there
    finally:
        await nc.close()
    assert await _replica_is_running(platform, other_replica)
    assert (await platform.call("neighbour/hello")).json() == "still here"
    assert await _neighbour(platform) == (other, other_replica)
