"""Real NATS, PostgreSQL and Redis for every test session.

Each service comes from `KILN_TEST_<NAME>_URL` when set, else the well-known local port; when it
does not answer there (a fresh laptop, a bare CI image) the session starts the embedded server
from kiln.devstack instead. `KILN_TEST_EMBEDDED=1` forces the embedded stack for all three.

NATS is the exception: the session starts the embedded one unless `KILN_TEST_NATS_URL` names
another, because the embedded one runs with the platform's authorisation (every process with
its own credentials, replicas with theirs), which the tests prove. A server named there is used
with `KILN_TEST_NATS_CREDS`, `KILN_TEST_NATS_SIGNING_KEY`, `KILN_TEST_NATS_OPERATOR_SIGNING_KEY`
and `KILN_TEST_NATS_SYSTEM_CREDS` if set (else without credentials,
and the tests of NATS authorisation skip).

Sessions never see each other's data: each gets its own PostgreSQL database, its own namespace
(the prefix of NATS streams and subjects and of Redis keys) and its own KILN_HOME, and removes
them at the end.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kiln.devstack import DevStack
from kiln.devstack.probes import nats_answers, postgres_answers, redis_answers
from kiln.settings import SandboxMode, Settings

if TYPE_CHECKING:
    from fakestripe import FakeStripe
    from sqlalchemy.ext.asyncio import AsyncEngine
    from stack import Platform

    from kiln.devstack.nats import EmbeddedNats

# The platform harness (tests/integration/stack.py) serves the chaos suite (tests/chaos) too.
sys.path.insert(0, str(Path(__file__).parent / "integration"))

DEFAULT_URLS = {
    "nats_url": "nats://127.0.0.1:4222",
    "database_url": "postgresql://postgres@127.0.0.1:5432/postgres",
    "redis_url": "redis://127.0.0.1:6379/0",
}
_PROBES = {
    "nats_url": nats_answers,
    "database_url": postgres_answers,
    "redis_url": redis_answers,
}
_TEST_VARS = {
    "nats_url": "KILN_TEST_NATS_URL",
    "database_url": "KILN_TEST_DATABASE_URL",
    "redis_url": "KILN_TEST_REDIS_URL",
}


# The settings a node agent needs when NATS requires credentials, and their variables.
_NATS_KEYS = {
    "nats_signing_key": "KILN_NATS_SIGNING_KEY",
    "nats_operator_signing_key": "KILN_NATS_OPERATOR_SIGNING_KEY",
    "nats_system_creds": "KILN_NATS_SYSTEM_CREDS",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "unsandboxed: the module's `platform` runs its replicas unsandboxed"
    )
    config.addinivalue_line(
        "markers",
        "without_scheduler(lease_s): the module's `platform` has no scheduler (its tests run "
        "their own, with that lease)",
    )


@dataclass(frozen=True)
class ServiceUrls:
    nats_url: str
    database_url: str  # a maintenance database on the server; tests get their own database
    redis_url: str
    embedded: tuple[str, ...]
    nats_creds: str = ""  # the platform's NATS credentials file, when NATS requires them
    # What a node agent needs then: KILN_NATS_SIGNING_KEY and the rest (`_NATS_KEYS`).
    nats_keys: tuple[tuple[str, str], ...] = ()


async def _can_create_databases(url: str) -> bool:
    """The tests log in and create databases: a server that answers is not enough."""
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError):
        return False
    try:
        allowed = await conn.fetchval(
            "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
        )
    finally:
        await conn.close()
    return bool(allowed)


def _usable(attr: str, url: str) -> bool:
    if not _PROBES[attr](url):
        return False
    return attr != "database_url" or asyncio.run(_can_create_databases(url))


@pytest.fixture(scope="session")
def service_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceUrls]:
    force_embedded = os.environ.get("KILN_TEST_EMBEDDED") == "1"
    urls: dict[str, str | None] = {}
    for attr, default in DEFAULT_URLS.items():
        chosen = os.environ.get(_TEST_VARS[attr])
        if force_embedded or (attr == "nats_url" and not chosen):
            urls[attr] = None
        elif chosen:
            if not _usable(attr, chosen):
                pytest.exit(
                    f"{_TEST_VARS[attr]}={chosen} does not answer, or refuses to log in (or to "
                    "create databases); fix it, unset it, or set KILN_TEST_EMBEDDED=1",
                    returncode=3,
                )
            urls[attr] = chosen
        else:
            urls[attr] = default if _usable(attr, default) else None
    missing = tuple(attr for attr, url in urls.items() if url is None)
    if not missing:
        yield ServiceUrls(
            **urls,  # type: ignore[arg-type]
            embedded=(),
            nats_creds=os.environ.get("KILN_TEST_NATS_CREDS", ""),
            nats_keys=tuple(
                (variable, os.environ[f"KILN_TEST_{variable[5:]}"])
                for variable in _NATS_KEYS.values()
                if os.environ.get(f"KILN_TEST_{variable[5:]}")
            ),
        )
        return
    home = tmp_path_factory.mktemp("embedded-home")
    base = Settings.from_env({"HOME": str(home)}).replace(**urls)
    with DevStack(base, home / "dev", durable=False) as running:
        yield ServiceUrls(
            nats_url=running.nats_url or "",
            database_url=running.database_url or "",
            redis_url=running.redis_url or "",
            embedded=missing,
            nats_creds=str(running.nats_creds or ""),
            nats_keys=tuple(
                (variable, str(getattr(running, field)))
                for field, variable in _NATS_KEYS.items()
                if getattr(running, field) is not None
            ),
        )


def _with_database(url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=database).render_as_string(hide_password=False)


async def _create_database(admin_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(admin_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _clean_nats(settings: Settings) -> None:
    import nats

    from kiln._nats import connect_options

    nc = await nats.connect(**{**connect_options(settings), "max_reconnect_attempts": 0})
    namespace = settings.namespace
    try:
        js = nc.jetstream()
        owned = (namespace, f"KV_{namespace}", f"OBJ_{namespace}")
        for info in await js.streams_info():
            if info.config.name and info.config.name.startswith(owned):
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()


def _clean_redis(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session")
def settings(
    service_urls: ServiceUrls, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """Settings for this session: its own (empty, unmigrated) database, namespace and home."""
    token = secrets.token_hex(5)
    database = f"kiln_test_{token}"
    namespace = f"t{token}"
    home: Path = tmp_path_factory.mktemp("kiln-home")
    asyncio.run(_create_database(service_urls.database_url, database))
    built = Settings.from_env(
        {
            "HOME": str(home),
            "KILN_ENV": "test",
            "KILN_HOME": str(home),
            "KILN_NAMESPACE": namespace,
            "KILN_NATS_URL": service_urls.nats_url,
            **({"KILN_NATS_CREDS": service_urls.nats_creds} if service_urls.nats_creds else {}),
            **dict(service_urls.nats_keys),
            "KILN_DATABASE_URL": _with_database(service_urls.database_url, database),
            "KILN_REDIS_URL": service_urls.redis_url,
            "KILN_API_KEY_PEPPER": secrets.token_urlsafe(32),
            "KILN_SNAPSHOT_SIGNING_KEY": secrets.token_urlsafe(32),
            "KILN_WEBHOOK_SECRET": secrets.token_urlsafe(32),
        }
    )
    try:
        yield built
    finally:
        asyncio.run(_drop_database(service_urls.database_url, database))
        asyncio.run(_clean_nats(built))
        _clean_redis(service_urls.redis_url, built.namespace)  # and namespaces made from it
        if os.geteuid() == 0:  # the egress chains of node agents the tests killed
            from kiln.invoker.egress import remove_chains

            remove_chains(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def fresh_database(service_urls: ServiceUrls) -> Iterator[Callable[[], str]]:
    """Makes empty databases on the session's server (for sync tests); all dropped at the end."""
    created: list[str] = []

    def make() -> str:
        name = f"kiln_fresh_{secrets.token_hex(5)}"
        asyncio.run(_create_database(service_urls.database_url, name))
        created.append(name)
        return _with_database(service_urls.database_url, name)

    yield make
    for name in created:
        asyncio.run(_drop_database(service_urls.database_url, name))


@pytest.fixture
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test's app modules and sys.path entries disappear after it (for tests that import
    apps from files; modules that use it opt in with `pytestmark`)."""
    from kiln.functions import loader

    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]
    loader._loaded_roots.clear()


@pytest.fixture
def chaos(request: pytest.FixtureRequest) -> random.Random:
    """The chaos tests' source of randomness: its seed is printed, and
    `KILN_TEST_CHAOS_SEED=N` replays it."""
    seed = int(os.environ.get("KILN_TEST_CHAOS_SEED") or random.randrange(10**6))
    print(f"{request.node.name}: chaos seed {seed} (KILN_TEST_CHAOS_SEED={seed} replays it)")
    return random.Random(seed)


# The platform and what tests meet it with. Their harness is imported when a test asks for
# them, so unit tests never load it.


@pytest.fixture(scope="module")
async def platform(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> AsyncIterator[Platform]:
    """A platform per test module (tests/integration/stack.py), sandboxed unless the module is
    marked `unsandboxed`: for tests that meet their functions through files on the host or
    signal replica processes by pid, both of which a sandbox hides.
    tests/integration/test_sandbox_e2e.py covers the sandbox; the snapshot and standby tests
    cold-start in it. A module marked `without_scheduler(lease_s)` gets none: its tests run
    schedulers of their own. A module with a platform of its own defines its own `platform`."""
    from stack import running_platform

    if request.node.get_closest_marker("unsandboxed"):
        settings = settings.replace(sandbox=SandboxMode.OFF)
    unscheduled = request.node.get_closest_marker("without_scheduler")
    if unscheduled:
        settings = settings.replace(scheduler_lease_s=unscheduled.kwargs["lease_s"])
    home = tmp_path_factory.mktemp("platform-home")
    async with running_platform(
        settings, home, scheduler=not unscheduled, stop_apps=True
    ) as running:
        yield running


@pytest.fixture
async def engine(platform: Platform) -> AsyncIterator[AsyncEngine]:
    """A connection pool on the platform's database."""
    from kiln.db.session import create_engine

    built = create_engine(platform.settings, application_name="kiln-test")
    yield built
    await built.dispose()


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A NATS server of the module's own, for modules whose tests stop or kill it."""
    from stack import own_server

    from kiln.devstack.nats import EmbeddedNats

    with own_server(EmbeddedNats, tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="module")
async def stripe_fake() -> AsyncIterator[FakeStripe]:
    """Stripe's HTTP API, faked on a loopback port (tests/integration/fakestripe.py)."""
    from fakestripe import fake_stripe

    async with fake_stripe() as fake:
        yield fake
