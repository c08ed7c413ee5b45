"""Idle pods' reminders, a step of the invoice worker's sweep: a running pod with no terminal or
port traffic for `KILN_POD_IDLE_REMINDER_S` has its customer's owners mailed once (its name,
how long it has sat idle, what it costs an hour, how to stop it), and again only after traffic
began a new idle spell: `reminded_at` before the spell's start.

A pod is idle since its last traffic (`active_at`, which the scheduler writes from its
replica's heartbeats) or since it last became ready, whichever is later. One whose replica has
never reported its traffic (`active_at` unset) is not judged. Each pod is claimed with its row
locked (SKIP LOCKED) and marked in the transaction that mails it, so two billing services never
both send one.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln.billing.invoice_forms import money
from kiln.billing.ledger import BillingRules
from kiln.billing.prices import cost_micros
from kiln.console.mail import Mail, Mailer
from kiln.db.enums import PodKind, PodState, UserRole
from kiln.db.models import Customer, Function, Plan, Pod, Replica, User
from kiln.db.session import transaction
from kiln.errors import Unavailable
from kiln.functions.gpu import gpu_request
from kiln.pods.idle import span, whole_span

__all__ = ["PodReminders", "reminder_text"]

_log = logging.getLogger("kiln.billing.pods")
_BATCH = 20
_HOUR_MS = 3_600_000


class PodReminders:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        mailer: Mailer,
        rules: BillingRules,
        *,
        after_s: float,
    ) -> None:
        """`after_s`: idle this long, a pod's owners are mailed (0: never)."""
        self.sessions = sessions
        self.mailer = mailer
        self.rules = rules
        self.after_s = after_s

    def _due(self, now: datetime) -> list[sa.ColumnElement[bool]]:
        idle_since = sa.func.greatest(Pod.active_at, Pod.started_at)
        return [
            Pod.kind == PodKind.POD,
            Pod.state == PodState.RUNNING,
            Pod.active_at.is_not(None),
            idle_since <= now - timedelta(seconds=self.after_s),
            sa.or_(Pod.reminded_at.is_(None), Pod.reminded_at < idle_since),
        ]

    async def remind_due(self, now: datetime | None = None) -> int:
        """Mail the owners of every pod idle past the setting and not told this idle spell,
        each in a transaction of its own; how many pods were reminded. The mail server being
        away ends the sweep (the next one tries again)."""
        if self.after_s <= 0:
            return 0
        now = now or datetime.now(UTC)
        sent = 0
        passed_over: set[uuid.UUID] = set()
        while True:
            async with transaction(self.sessions) as session:
                query = sa.select(Pod.id).where(*self._due(now)).order_by(Pod.id).limit(_BATCH)
                if passed_over:
                    query = query.where(Pod.id.not_in(passed_over))
                due = list(await session.scalars(query))
            for pod_id in due:
                try:
                    async with transaction(self.sessions) as session:
                        pod = await session.scalar(
                            sa.select(Pod)
                            .where(Pod.id == pod_id, *self._due(now))
                            .with_for_update(skip_locked=True)
                        )
                        if pod is None:
                            passed_over.add(pod_id)  # another service has it, or it moved on
                            continue
                        if not await self._remind(session, pod, now):
                            return sent
                        sent += 1
                except Exception:  # noqa: BLE001 - this pod next sweep; the others now
                    _log.exception("reminding the owners of idle pod %s failed", pod_id)
                    passed_over.add(pod_id)
            if len(due) < _BATCH:
                return sent

    async def _remind(self, session: AsyncSession, pod: Pod, now: datetime) -> bool:
        """Mail its owners and mark it; False when the mail server did not take a message."""
        customer, plan_prices, function_gpu = (
            await session.execute(
                sa.select(Customer.name, Plan.gpu_prices, Function.gpu)
                .select_from(Customer)
                .join(Plan, Plan.name == Customer.plan)
                .join(Function, Function.id == pod.function_id)
                .where(Customer.id == pod.customer_id)
            )
        ).one()
        kind, count = gpu_request(pod.gpu or function_gpu)
        if kind == "any":  # the type it was given
            kind = (
                await session.scalar(
                    sa.select(Replica.gpu_type).where(Replica.id == pod.replica_id)
                )
                or kind
            )
        prices = {**self.rules.prices, **plan_prices} if plan_prices else self.rules.prices
        per_hour = cost_micros(prices, kind, count, _HOUR_MS)
        idle_since = max(t for t in (pod.active_at, pod.started_at) if t is not None)
        text = reminder_text(
            customer=customer, pod=pod.name, idle_s=(now - idle_since).total_seconds(),
            per_hour=money(per_hour, self.rules.currency), auto_stop_s=pod.auto_stop_s,
            volume=pod.volume_gb > 0,
        )  # fmt: skip
        owners = list(
            await session.scalars(
                sa.select(User.email).where(
                    User.customer_id == pod.customer_id,
                    User.role == UserRole.OWNER,
                    User.verified_at.is_not(None),
                    User.disabled_at.is_(None),
                )
            )
        )
        for address in owners:
            mail = Mail(to=address, subject=f"Kiln pod {pod.name} is idle", text=text,
                        kind="pod-idle")  # fmt: skip
            try:
                await self.mailer.send(mail)
            except Unavailable:
                return False
        if not owners:
            _log.warning("idle pod %s: its customer has no owner to tell", pod.id)
        pod.reminded_at = now
        return True


def reminder_text(
    *,
    customer: str,
    pod: str,
    idle_s: float,
    per_hour: str,
    auto_stop_s: int | None,
    volume: bool,
) -> str:
    """The mail's body."""
    kept = " (its volume is kept)" if volume else ""
    auto_stop = (
        f"It stops by itself after {span(auto_stop_s)} without traffic."
        if auto_stop_s is not None
        else "A pod created with auto_stop_hours stops by itself when idle that long."
    )
    return (
        f"Hello {customer},\n\nyour pod {pod} has had no terminal or port traffic for "
        f"{whole_span(idle_s)}; it costs {per_hour} an hour while it runs. Stop it with "
        f"`kiln pods stop {pod}`{kept}; `kiln pods start {pod}` starts it again, and "
        f"`kiln pods rm {pod}` ends it.\n{auto_stop}\n"
    )
