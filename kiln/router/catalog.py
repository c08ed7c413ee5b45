"""Resolving `APP/NAME` to a deployed function, and listing the inference tasks an owner's apps
serve (the models of the OpenAI-compatible routes), both cached briefly so the warm path does
not touch PostgreSQL on every call."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln._trouble import Trouble
from kiln.db.enums import AppState
from kiln.db.models import App, AppVersion, Function
from kiln.db.session import database_unreachable, transaction
from kiln.errors import NotFound, Unavailable
from kiln.functions.spec import FunctionSpec, UnitKind

__all__ = ["Catalog", "FunctionRoute", "ServedTask", "spec_of"]

_log = logging.getLogger("kiln.router")

# A redeploy or a scale change reaches other routers within this time; this router's own
# changes invalidate at once.
_TTL_S = 2.0


@dataclass(frozen=True)
class FunctionRoute:
    function_id: uuid.UUID
    app: str
    spec: FunctionSpec
    timeout_s: int
    startup_timeout_s: int
    generation: int
    version_id: uuid.UUID | None = None


@dataclass(frozen=True)
class ServedTask:
    """One entry point of an owner's active app that serves an inference task."""

    app: str
    function: str  # the function's or class's name
    method: str | None  # a class's method; None for a plain function
    task: str
    function_id: uuid.UUID
    created_at: float  # epoch seconds the app was created
    # Other names the app answers to: a catalog deployment's model id.
    aliases: tuple[str, ...] = ()


def spec_of(version: AppVersion, name: str) -> FunctionSpec:
    for data in version.spec.get("functions", []):
        if data.get("name") == name:
            return FunctionSpec.from_dict(data)
    raise NotFound(f"function {name!r} is not part of version {version.version}")


class Catalog:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self._trouble = Trouble(_log, "reading the function catalog from PostgreSQL")
        self._cache: dict[tuple[uuid.UUID, str, str], tuple[float, FunctionRoute]] = {}
        self._tasks: dict[uuid.UUID, tuple[float, list[ServedTask]]] = {}

    def invalidate(self) -> None:
        self._cache.clear()
        self._tasks.clear()

    async def served_tasks(self, owner_id: uuid.UUID) -> list[ServedTask]:
        """The task entry points of the owner's active apps, apps in creation order."""
        now = time.monotonic()
        cached = self._tasks.get(owner_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            served = await self._load_tasks(owner_id)
        except Exception as exc:
            if not database_unreachable(exc):
                raise
            self._trouble.failed(exc)
            if cached is not None:
                return cached[1]
            raise Unavailable(
                "the function catalog is unreachable; retry shortly", retry_after=1
            ) from None
        self._trouble.ok()
        self._tasks[owner_id] = (now + _TTL_S, served)
        return served

    async def _load_tasks(self, owner_id: uuid.UUID) -> list[ServedTask]:
        async with transaction(self.sessions) as session:
            rows = (
                await session.execute(
                    sa.select(Function.id, Function.name, App.name, App.created_at, AppVersion)
                    .join(App, Function.app_id == App.id)
                    .join(AppVersion, Function.current_version_id == AppVersion.id)
                    .where(App.customer_id == owner_id, App.state == AppState.ACTIVE)
                    .order_by(App.created_at, App.name, Function.created_at)
                )
            ).all()
        served = []
        for function_id, name, app, created_at, version in rows:
            spec = spec_of(version, name)
            model = version.spec.get("catalog", {}).get("model")
            aliases = (model,) if isinstance(model, str) and model else ()
            for key, task in spec.tasks().items():
                method = key if spec.kind is UnitKind.CLASS else None
                served.append(
                    ServedTask(
                        app, name, method, task, function_id, created_at.timestamp(), aliases
                    )
                )
        return served

    async def resolve(self, owner_id: uuid.UUID, app: str, name: str) -> FunctionRoute:
        key = (owner_id, app, name)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            route = await self._load(owner_id, app, name)
        except Exception as exc:
            if not database_unreachable(exc):
                raise
            self._trouble.failed(exc)
            if cached is not None:  # PostgreSQL is away: what we knew still routes calls
                return cached[1]
            raise Unavailable(
                "the function catalog is unreachable; retry shortly", retry_after=1
            ) from None
        self._trouble.ok()
        self._cache[key] = (now + _TTL_S, route)
        return route

    async def _load(self, owner_id: uuid.UUID, app: str, name: str) -> FunctionRoute:
        async with transaction(self.sessions) as session:
            row = (
                await session.execute(
                    sa.select(Function, AppVersion)
                    .join(App, Function.app_id == App.id)
                    .join(AppVersion, Function.current_version_id == AppVersion.id)
                    .where(
                        App.customer_id == owner_id,
                        App.name == app,
                        App.state == AppState.ACTIVE,
                        Function.name == name,
                    )
                )
            ).first()
            if row is None:
                exists = await session.scalar(
                    sa.select(App.id).where(App.customer_id == owner_id, App.name == app)
                )
                if exists is None:
                    raise NotFound(f"app {app!r} not found; `kiln deploy` creates it")
                raise NotFound(f"function {name!r} not found in app {app!r}")
            function, version = row
        return FunctionRoute(
            function_id=function.id,
            app=app,
            spec=spec_of(version, name),
            timeout_s=function.timeout_s,
            startup_timeout_s=function.startup_timeout_s,
            generation=function.generation,
            version_id=version.id,
        )
