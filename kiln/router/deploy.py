"""Deploying an app version: store the code artifact, record the version and its functions, and
make sure each function has its work-queue consumer.

A deploy with the digest of a version the app already has changes nothing (or makes that
version current again). Live scaling changes made by an operator (`Function.overridden`) survive
a redeploy, unless the deploy asks to reset them (`reset_scaling`) or the developer wrote a new
value for that setting in the decorator (one the previous version did not write, or wrote
differently): a value the code has always said does not undo the operator's change, an edited
one does. Everything else follows the new code.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln.codestore import CodeStore
from kiln.db.enums import FunctionKind, PodState
from kiln.db.models import App, AppVersion, Function, Pod
from kiln.db.session import transaction
from kiln.errors import Conflict, InvalidRequest, InvalidSpec, NotFound
from kiln.functions.options import parse_options
from kiln.functions.spec import FunctionSpec, Resources, UnitKind
from kiln.router.bodies import DeployBody
from kiln.router.validation import validated
from kiln.streams import FUNCTION_CALLS, ensure_consumer
from kiln.wire import Subjects, consumer_name

__all__ = ["DeployRequest", "DeployResult", "Deployer", "ReplicaCap"]

# Columns a deploy sets from Resources, and the Resources field each comes from.
_SCALING = {
    "min_replicas": "min_replicas",
    "max_replicas": "max_replicas",
    "buffer_replicas": "buffer_replicas",
    "idle_timeout_s": "idle_timeout_s",
    "concurrency": "concurrency",
    "target_concurrency": "target_concurrency",
    "timeout_s": "timeout_s",
    "startup_timeout_s": "startup_timeout_s",
    "retries": "retries",
    "memory_mb": "memory_mb",
}

_RESOURCE_FIELDS = {f.name for f in dataclasses.fields(Resources)} - {"explicit"}


@dataclass(frozen=True)
class DeployRequest:
    app: str
    digest: str
    entrypoint: str
    functions: list[FunctionSpec]
    archive: bytes
    reset_scaling: bool = False
    # A catalog deployment's origin ({"slug", "model", "task"}), kept with its version.
    catalog: dict[str, str] | None = None

    @classmethod
    def from_json(cls, data: Any) -> DeployRequest:
        """A deploy body (decoded JSON): its shape is `DeployBody`'s; what it means (the
        archive, its digest, each specification) is checked here."""
        body = validated(DeployBody, data)
        app = body.app
        try:
            archive = base64.b64decode(body.archive, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("archive is not valid base64") from None
        if hashlib.sha256(archive).hexdigest() != body.digest:
            raise InvalidRequest("the archive does not match its digest; upload it again")
        if not body.functions:
            raise InvalidSpec(f"app {app!r} defines no functions")
        try:
            functions = [_validated(FunctionSpec.from_dict(f)) for f in body.functions]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidSpec(f"a function specification is not valid: {exc}") from None
        entrypoint = body.entrypoint
        if (
            not entrypoint.endswith(".py")
            or entrypoint.startswith("/")
            or ".." in entrypoint.split("/")
        ):
            raise InvalidRequest(
                f"entrypoint {entrypoint!r} is not valid: expected the app file's relative path "
                "inside the archive, such as app.py"
            )
        names = [f.name for f in functions]
        if len(set(names)) != len(names):
            raise InvalidSpec(f"app {app!r} defines a name twice: {sorted(names)}")
        return cls(app, body.digest, entrypoint, functions, archive, body.reset_scaling)


@dataclass(frozen=True)
class DeployResult:
    app: str
    version: int
    unchanged: bool
    functions: list[FunctionSpec]
    # Per function, the operator's live settings this deploy kept over the code's values.
    kept: dict[str, dict[str, int | None]] = dataclasses.field(default_factory=dict)


class Deployer:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        js: JetStreamContext,
        subjects: Subjects,
        code: CodeStore,
        *,
        max_replicas: int,
    ) -> None:
        self.sessions = sessions
        self.js = js
        self.subjects = subjects
        self.code = code
        self.max_replicas = max_replicas  # the platform's cap per function (KILN_MAX_REPLICAS)

    async def deploy(
        self, owner_id: uuid.UUID, request: DeployRequest, *, cap: ReplicaCap | None = None
    ) -> DeployResult:
        """Deploy `request` for `owner_id`. `cap`: the most replicas the customer's tier allows
        a function; a max_replicas the developer wrote above it is refused, the default one is
        lowered to it."""
        cap = cap or ReplicaCap(self.max_replicas, "this platform allows")
        if cap.limit > self.max_replicas:
            cap = ReplicaCap(self.max_replicas, "this platform allows")
        request = dataclasses.replace(
            request, functions=[_capped(spec, cap) for spec in request.functions]
        )
        await self.code.put(request.digest, request.archive)
        try:
            async with transaction(self.sessions) as session:
                result, function_ids = await self._record(session, owner_id, request)
        except IntegrityError as exc:
            raise InvalidSpec(
                f"the database refused the specification of app {request.app!r}: "
                f"{getattr(exc.orig, 'args', [exc])[0]}"
            ) from None
        for function_id, spec in function_ids:
            await self._ensure_consumer(function_id, spec)
        return result

    async def _record(
        self, session: AsyncSession, owner_id: uuid.UUID, request: DeployRequest
    ) -> tuple[DeployResult, list[tuple[uuid.UUID, FunctionSpec]]]:
        app = await session.scalar(
            sa.select(App)
            .where(App.customer_id == owner_id, App.name == request.app)
            .with_for_update()
        )
        if app is None:
            app = App(customer_id=owner_id, name=request.app)
            session.add(app)
            await session.flush()
        version = await session.scalar(
            sa.select(AppVersion).where(
                AppVersion.app_id == app.id, AppVersion.source_digest == request.digest
            )
        )
        unchanged = version is not None and version.id == app.current_version_id
        if version is None:
            latest = await session.scalar(
                sa.select(sa.func.max(AppVersion.version)).where(AppVersion.app_id == app.id)
            )
            version = AppVersion(
                app_id=app.id,
                version=(latest or 0) + 1,
                source_digest=request.digest,
                artifact_key=request.digest,
                spec={
                    "entrypoint": request.entrypoint,
                    "functions": [f.to_dict() for f in request.functions],
                    **({"catalog": request.catalog} if request.catalog else {}),
                },
            )
            session.add(version)
            await session.flush()
        functions, kept = await self._upsert_functions(session, app, version, request)
        app.current_version_id = version.id
        return (
            DeployResult(request.app, version.version, unchanged, request.functions, kept),
            functions,
        )

    async def _upsert_functions(
        self, session: AsyncSession, app: App, version: AppVersion, request: DeployRequest
    ) -> tuple[list[tuple[uuid.UUID, FunctionSpec]], dict[str, dict[str, int | None]]]:
        existing = {
            f.name: f
            for f in await session.scalars(sa.select(Function).where(Function.app_id == app.id))
        }
        previous = await _previous_resources(session, existing.values())
        wanted = {spec.name for spec in request.functions}
        for name, gone in existing.items():
            if name not in wanted:
                await session.delete(gone)
                await self._drop_consumer(gone.id)
        result = []
        kept: dict[str, dict[str, int | None]] = {}
        for spec in request.functions:
            function = existing.get(spec.name)
            if function is None:
                function = Function(app_id=app.id, name=spec.name, overridden=[], generation=1)
                session.add(function)
            elif function.current_version_id != version.id:
                function.generation += 1
            function.current_version_id = version.id
            function.kind = _kind(spec)
            function.gpu = spec.resources.gpu
            overridden = [] if request.reset_scaling else list(function.overridden)
            for column, field_name in _SCALING.items():
                if column in overridden and _code_changed(
                    field_name, spec.resources, previous.get(spec.name)
                ):
                    overridden.remove(column)
                if column in overridden:
                    kept.setdefault(spec.name, {})[column] = getattr(function, column)
                else:
                    setattr(function, column, getattr(spec.resources, field_name))
            function.overridden = overridden
            await session.flush()
            result.append((function.id, spec))
        return result, kept

    async def _ensure_consumer(self, function_id: uuid.UUID, spec: FunctionSpec) -> None:
        await ensure_consumer(self.js, FUNCTION_CALLS, self.subjects.ns, function_id.hex)

    async def _drop_consumer(self, function_id: uuid.UUID) -> None:
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(self.subjects.calls_stream, consumer_name(function_id))

    async def delete_app(self, owner_id: uuid.UUID, name: str) -> None:
        async with transaction(self.sessions) as session:
            app = await session.scalar(
                sa.select(App).where(App.customer_id == owner_id, App.name == name)
            )
            if app is None:
                raise NotFound(f"app {name!r} not found")
            ids = list(
                await session.scalars(sa.select(Function.id).where(Function.app_id == app.id))
            )
            pods = list(
                await session.scalars(
                    sa.select(Pod.name)
                    .where(Pod.function_id.in_(ids), Pod.state != PodState.ENDED)
                    .order_by(Pod.name)
                )
            )
            if pods:
                raise Conflict(
                    f"app {name!r} is the environment of pods that have not ended: "
                    f"{', '.join(pods)}; end them first (kiln pods rm NAME)"
                )
            # Functions first: they reference versions, which the app's cascade also removes.
            await session.execute(sa.delete(Function).where(Function.app_id == app.id))
            await session.delete(app)
        for function_id in ids:
            await self._drop_consumer(function_id)


async def _previous_resources(
    session: AsyncSession, functions: Iterable[Function]
) -> dict[str, dict[str, Any]]:
    """The resources each function's current version declared, as stored with that version."""
    by_version: dict[uuid.UUID, list[str]] = {}
    for function in functions:
        if function.current_version_id is not None:
            by_version.setdefault(function.current_version_id, []).append(function.name)
    if not by_version:
        return {}
    found: dict[str, dict[str, Any]] = {}
    rows = await session.execute(
        sa.select(AppVersion.id, AppVersion.spec).where(AppVersion.id.in_(by_version))
    )
    for version_id, stored in rows:
        names = set(by_version[version_id])
        for function in stored.get("functions", ()):
            if function.get("name") in names:
                found[function["name"]] = dict(function.get("resources", {}))
    return found


def _code_changed(field_name: str, new: Resources, old: dict[str, Any] | None) -> bool:
    """Whether the developer wrote a new value for `field_name` in this deploy's decorator:
    written now, and not written (or written differently) in the version it replaces."""
    if field_name not in new.explicit:
        return False
    if old is None or field_name not in old.get("explicit", ()):
        return True
    return bool(old.get(field_name) != getattr(new, field_name))


@dataclass(frozen=True)
class ReplicaCap:
    limit: int
    who: str  # "this platform allows", "the free tier allows": what the refusal says

    def refusal(self, asked: int, spec: FunctionSpec) -> str:
        return (
            f"max_replicas={asked} is not valid for {spec.kind.value} {spec.name!r}: {self.who} "
            f"at most {self.limit} replica{'s' if self.limit != 1 else ''} per function"
        )


def _capped(spec: FunctionSpec, cap: ReplicaCap) -> FunctionSpec:
    r = spec.resources
    if r.max_replicas <= cap.limit:
        return spec
    if "max_replicas" in r.explicit:
        raise InvalidSpec(cap.refusal(r.max_replicas, spec))
    if r.min_replicas > cap.limit:
        raise InvalidSpec(
            f"min_replicas={r.min_replicas} is not valid for {spec.kind.value} {spec.name!r}: "
            f"{cap.who} at most {cap.limit} replicas per function"
        )
    return dataclasses.replace(spec, resources=dataclasses.replace(r, max_replicas=cap.limit))


def _validated(spec: FunctionSpec) -> FunctionSpec:
    """The server does not trust what a client sends: the SDK's own checks run again, so a
    hand-made deploy cannot carry settings that `@app.function` would refuse."""
    if not spec.name.isidentifier() or any(not m.isidentifier() for m in spec.entries):
        raise InvalidSpec(f"function and method names must be Python identifiers: {spec.name!r}")
    r = spec.resources
    options = {
        "gpu": r.gpu,
        "min_replicas": r.min_replicas,
        "max_replicas": r.max_replicas,
        "buffer_replicas": r.buffer_replicas,
        "idle_timeout": r.idle_timeout_s,
        "concurrency": r.concurrency,
        "target_concurrency": r.target_concurrency,
        "timeout": r.timeout_s,
        "startup_timeout": r.startup_timeout_s,
        "retries": r.retries,
        "memory_mb": r.memory_mb,
        "env": r.env,
        "secrets": list(r.secrets),
    }
    if spec.kind is UnitKind.CLASS or r.snapshot != "shared":
        options["snapshot"] = r.snapshot
    _, checked = parse_options(options, kind=spec.kind, default_name=spec.name)
    # The options above are all spelled out; which ones the developer wrote is the client's word.
    unknown = sorted(set(r.explicit) - _RESOURCE_FIELDS)
    if unknown:
        raise InvalidSpec(f"explicit names unknown settings {unknown} of {spec.name!r}")
    checked = dataclasses.replace(checked, explicit=tuple(sorted(set(r.explicit))))
    return dataclasses.replace(spec, resources=checked)


def _kind(spec: FunctionSpec) -> FunctionKind:
    if spec.kind is UnitKind.CLASS:
        return FunctionKind.CLASS
    return FunctionKind(spec.entries[spec.name].kind.value)
