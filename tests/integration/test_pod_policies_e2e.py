"""A pod's policies on the real stack: the tier's caps on pods (two creates at once cannot both
take the last one), its auto-stop after hours without traffic (an open terminal nobody types
in is idle, and the generic WebSocket idle timeout cuts no terminal), and the mail that tells
an idle pod's owners what it costs.

The platform's WebSocket idle timeout is 1 s here, so a terminal silent for 2 s proves the
exemption; the auto-stop is 6 s, so the whole pod's life takes seconds."""

from __future__ import annotations

import asyncio
import contextlib
import email
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from eventually import eventually
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform, error_of, running_platform
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from kiln.billing.invoice_forms import money
from kiln.billing.ledger import billing_rules
from kiln.billing.pod_reminders import PodReminders
from kiln.console.mail import Mailer
from kiln.db.enums import UserRole
from kiln.db.models import Customer, Pod, User
from kiln.db.session import session_factory
from kiln.settings import Settings

pytestmark = pytest.mark.integration

WS_IDLE_S = 1.0
APP = "idlebench"
WORK = f"""
import kiln

app = kiln.App("{APP}")


@app.function(gpu="none")
def work(x: int) -> int:
    return x
"""


@pytest.fixture(scope="module", name="platform")
async def platform_with_a_short_websocket_idle_timeout(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    home = tmp_path_factory.mktemp("pod-policies-home")
    async with running_platform(
        settings.replace(ws_idle_timeout_s=WS_IDLE_S), home, stop_apps=True
    ) as running:
        await running.deploy_source(tmp_path_factory.mktemp(APP), f"{APP}.py", WORK)
        yield running


async def new_pod(platform: Platform, **body: Any) -> dict[str, Any]:
    async with platform.client() as client:
        made = await client.post("/v1/pods", json={"environment": {"app": APP}, **body})
    assert made.status_code == 201, made.text
    pod: dict[str, Any] = made.json()
    return pod


async def running_view(platform: Platform, pod: dict[str, Any]) -> dict[str, Any]:
    """The pod's view once it runs and its replica's traffic was written."""

    async def ran() -> dict[str, Any]:
        async with platform.client() as client:
            view: dict[str, Any] = (await client.get(f"/v1/pods/{pod['id']}")).json()
        assert view["state"] == "running", view
        assert view["active_at"], view
        return view

    view: dict[str, Any] = await eventually(ran, within_s=60)
    return view


def terminal(platform: Platform, pod: dict[str, Any]) -> connect:
    url = platform.url.replace("http://", "ws://") + pod["terminal"]
    return connect(url, additional_headers={"Authorization": f"Bearer {platform.key}"},
                   open_timeout=60)  # fmt: skip


async def read_until(ws: ClientConnection, wanted: str, *, within_s: float = 30) -> str:
    text = ""
    async with asyncio.timeout(within_s):
        while wanted not in text:
            message = await ws.recv()
            if isinstance(message, bytes):
                text += message.decode(errors="replace")
    return text


async def test_pods_past_the_customers_cap_are_refused_even_when_asked_for_at_once(
    platform: Platform, tmp_path: Path
) -> None:
    """First in the module: the replicas of the pods it ends while they start take a few
    seconds to go, meanwhile the other tests run."""
    async with platform.client() as operator:
        made = await operator.post("/v1/customers", json={"name": "pod-caps", "tier": "enterprise"})
        customer = made.json()
        limited = await operator.patch(
            f"/v1/customers/{customer['id']}", json={"limits": {"max_pods": 1}}
        )
        assert limited.json()["limits"]["max_pods"] == 1
        key = await operator.post(
            "/v1/keys", json={"kind": "account", "customer_id": customer["id"]}
        )
    own = Platform(platform.url, key.json()["key"], platform.settings)
    await own.deploy_source(tmp_path, f"{APP}.py", WORK)
    refusal = (
        "pod limit reached: this account may have 1 active pod (starting or running; shells "
        "count) and has 1; stop or delete one (`kiln pods ls` lists them), or ask an operator "
        "to raise its max_pods"
    )
    async with own.client() as client:
        both = await asyncio.gather(*(
            client.post("/v1/pods", json={"environment": {"app": APP}, "name": f"cap-{i}"})
            for i in range(2)
        ))  # fmt: skip
        assert sorted(r.status_code for r in both) == [201, 429], [r.text for r in both]
        [made] = [r.json() for r in both if r.status_code == 201]
        [refused] = [r for r in both if r.status_code == 429]
        assert error_of(refused)["code"] == "rate_limited"
        assert error_of(refused)["message"] == refusal
        # A stopped pod holds nothing; starting it again counts like a new one.
        assert (await client.post(f"/v1/pods/{made['id']}/stop")).status_code == 200
        other = await client.post("/v1/pods", json={"environment": {"app": APP}, "name": "c2"})
        assert other.status_code == 201, other.text
        restarted = await client.post(f"/v1/pods/{made['id']}/start")
        assert (restarted.status_code, error_of(restarted)["message"]) == (429, refusal)
        for pod_id in (made["id"], other.json()["id"]):
            assert (await client.delete(f"/v1/pods/{pod_id}")).status_code == 204


async def test_an_idle_pod_stops_after_its_auto_stop_hours_and_no_websocket_timeout_cuts_it(
    platform: Platform,
) -> None:
    pod = await new_pod(platform, name="idler", auto_stop_hours=0.0015)  # 5.4 s: 6 whole ones
    assert pod["auto_stop_hours"] == 6 / 3600
    await running_view(platform, pod)
    async with terminal(platform, pod) as ws:
        # Silent for 2 s, past the platform's 1 s WebSocket idle timeout: the terminal stays.
        await ws.send(b"sleep 2; echo $((40+2))-woke\r")
        await read_until(ws, "42-woke")
        # Open, but nobody types: idle. 6 s later the pod stops and its terminal is hung up.
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(60):
                while True:
                    message = await ws.recv()
                    if isinstance(message, str) and json.loads(message).get("type") == "exit":
                        break
    async with platform.client() as client:
        view = (await client.get(f"/v1/pods/{pod['id']}")).json()
        assert view["state"] == "stopped"
        assert view["error"] == (
            "stopped after 6 seconds without terminal or port traffic (its auto_stop_hours); "
            "`kiln pods start idler` starts it again"
        )
        assert (await client.delete(f"/v1/pods/{pod['id']}")).status_code == 204


async def test_an_idle_pods_owners_are_mailed_once_an_idle_spell(
    platform: Platform, engine: AsyncEngine, tmp_path: Path
) -> None:
    pod = await new_pod(platform, name="watched")
    await running_view(platform, pod)
    sessions = session_factory(engine)
    address = f"owner-{secrets.token_hex(4)}@example.com"
    async with sessions.begin() as session:
        row = await session.get(Pod, uuid.UUID(pod["id"]))
        assert row is not None
        customer = await session.scalar(
            sa.select(Customer.name).where(Customer.id == row.customer_id)
        )
        session.add(User(customer_id=row.customer_id, role=UserRole.OWNER, email=address,
                         password_hash="-", verified_at=datetime.now(UTC)))  # fmt: skip
    mailed = platform.settings.replace(home=tmp_path)
    reminders = PodReminders(
        sessions, Mailer(mailed), billing_rules(mailed), after_s=3 * 3600
    )  # fmt: skip

    async def reminded_at() -> datetime | None:
        async with sessions() as session:
            return await session.scalar(
                sa.select(Pod.reminded_at).where(Pod.id == uuid.UUID(pod["id"]))
            )

    def mails() -> list[EmailMessage]:
        found = sorted((tmp_path / "mail").glob(f"*-pod-idle-{address}.eml"))
        return [email.message_from_bytes(p.read_bytes(), policy=policy.default) for p in found]

    try:
        # Nothing yet: it has been idle for seconds.
        await reminders.remind_due()
        assert await reminded_at() is None
        later = datetime.now(UTC) + timedelta(hours=4)  # idle for 4 hours and seconds by then
        assert await reminders.remind_due(later) >= 1
        assert await reminded_at() == later
        [mail] = mails()
        assert mail["Subject"] == "Kiln pod watched is idle"
        price = money(platform.settings.gpu_prices["none"], platform.settings.currency)
        assert mail.get_content() == (
            f"Hello {customer},\n\nyour pod watched has had no terminal or port traffic "
            f"for 4 hours; it costs {price} an hour while it runs. Stop it with `kiln pods "
            "stop watched`; `kiln pods start watched` starts it again, and `kiln pods rm "
            "watched` ends it.\nA pod created with auto_stop_hours stops by itself when idle "
            "that long.\n"
        )
        # Once an idle spell: an hour on, nothing; traffic, then three hours idle, again.
        await reminders.remind_due(later + timedelta(hours=1))
        assert len(mails()) == 1
        typed = later + timedelta(minutes=5)  # as the scheduler writes it from the beats
        async with sessions.begin() as session:
            await session.execute(
                sa.update(Pod).where(Pod.id == uuid.UUID(pod["id"])).values(active_at=typed)
            )
        again = typed + timedelta(hours=3)
        await reminders.remind_due(again)
        assert await reminded_at() == again
        assert len(mails()) == 2
    finally:
        async with sessions.begin() as session:
            await session.execute(sa.delete(User).where(User.email == address))
        async with platform.client() as client:
            assert (await client.delete(f"/v1/pods/{pod['id']}")).status_code == 204
