"""Settings: defaults, parsing, and the exact text of every kind of validation message."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.apikeys import mint_key
from kiln.db.enums import ApiKeyKind
from kiln.errors import ConfigError
from kiln.settings import Environment, LogLevel, Settings

SECRET = "s" * 32


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"HOME": "/home/dev", **env})
    return caught.value.problems


def test_defaults_need_nothing_but_home() -> None:
    settings = Settings.from_env({"HOME": "/home/dev"})
    assert settings.env is Environment.DEV
    assert settings.home == Path("/home/dev/.kiln")
    assert settings.dev_dir == Path("/home/dev/.kiln/dev")
    assert settings.config_file == Path("/home/dev/.kiln/config.toml")
    assert (settings.nats_url, settings.database_url, settings.redis_url) == (None, None, None)
    assert settings.port == 8000
    assert settings.namespace == "kiln"
    assert settings.redis_prefix == "kiln:"
    assert settings.log_level is LogLevel.INFO


def test_values_are_parsed_to_their_types() -> None:
    settings = Settings.from_env(
        {
            "HOME": "/home/dev",
            "KILN_HOME": "~/kiln-state",
            "KILN_PORT": "9000",
            "KILN_ENV": "TEST",
            "KILN_LOG_LEVEL": "debug",
            "KILN_SHUTDOWN_TIMEOUT": "2.5",
            "KILN_NATS_URL": "nats://a:4222, nats://b:4222",
            "KILN_DATABASE_URL": "postgres://u@db:5432/kiln",
            "KILN_URL": "http://localhost:8000/",
        }
    )
    assert settings.port == 9000
    assert settings.env is Environment.TEST
    assert settings.shutdown_timeout_s == 2.5
    assert settings.nats_servers == ["nats://a:4222", "nats://b:4222"]
    assert settings.sqlalchemy_url == "postgresql+asyncpg://u@db:5432/kiln"
    assert settings.url == "http://localhost:8000"
    assert settings.home == Path("/home/dev/kiln-state")  # ~ is the given HOME, not ours


def test_empty_value_means_unset() -> None:
    assert Settings.from_env({"HOME": "/h", "KILN_PORT": ""}).port == 8000


def test_bad_integer_names_variable_value_and_range() -> None:
    assert problems({"KILN_PORT": "eighty"}) == [
        "KILN_PORT='eighty' is not valid: expected an integer from 1 to 65535."
    ]
    assert problems({"KILN_PORT": "0"}) == [
        "KILN_PORT='0' is not valid: expected an integer from 1 to 65535."
    ]


def test_bad_choice_lists_what_is_allowed() -> None:
    assert problems({"KILN_ENV": "prod"}) == [
        "KILN_ENV='prod' is not valid: expected one of: dev, test, production."
    ]


def test_bad_url_shows_an_example() -> None:
    assert problems({"KILN_REDIS_URL": "localhost:6379"}) == [
        "KILN_REDIS_URL='localhost:6379' is not valid: expected a redis:// or rediss:// or "
        "unix:// URL such as redis://127.0.0.1:6379/0."
    ]
    assert problems({"KILN_DATABASE_URL": "mysql://db/kiln"}) == [
        "KILN_DATABASE_URL='mysql://db/kiln' is not valid: expected a postgresql:// or "
        "postgres:// or postgresql+asyncpg:// URL such as postgresql://127.0.0.1:5432/kiln."
    ]


def test_bad_port_in_url() -> None:
    assert problems({"KILN_NATS_URL": "nats://host:99999"}) == [
        "KILN_NATS_URL='nats://host:99999' is not valid: expected a comma-separated list of "
        "nats:// or tls:// URLs with a port from 1 to 65535."
    ]


def test_seconds_range() -> None:
    assert problems({"KILN_CONNECT_TIMEOUT": "-1"}) == [
        "KILN_CONNECT_TIMEOUT='-1' is not valid: expected a number of seconds from 0.1 to 300."
    ]


def test_namespace_rules() -> None:
    assert problems({"KILN_NAMESPACE": "Kiln.prod"}) == [
        "KILN_NAMESPACE='Kiln.prod' is not valid: expected 1 to 31 characters of lowercase "
        "letters, digits and underscores, starting with a letter."
    ]


def test_relative_home_is_refused() -> None:
    assert problems({"KILN_HOME": "state"}) == [
        "KILN_HOME='state' is not valid: expected an absolute path or one starting with ~/."
    ]
    assert problems({"KILN_HOME": "~nosuchuser/x"}) == [
        "KILN_HOME='~nosuchuser/x' is not valid: expected an absolute path or one starting with ~/."
    ]


def test_home_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("")
    assert problems({"KILN_HOME": str(file)}) == [
        f"KILN_HOME={str(file)!r} is not valid: expected a directory, but a file is there."
    ]


def test_secret_values_are_never_shown() -> None:
    found = problems({"KILN_API_KEY_PEPPER": "hunter2"})
    assert found == [
        "KILN_API_KEY_PEPPER (value hidden, 7 characters) is not valid: expected at least 32 "
        "characters and no whitespace; generate one with "
        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`."
    ]
    assert "hunter2" not in found[0]


def test_secrets_are_not_in_repr() -> None:
    settings = Settings.from_env({"HOME": "/h", "KILN_API_KEY_PEPPER": SECRET})
    assert SECRET not in repr(settings)


def test_unknown_variable_suggests_the_closest_name() -> None:
    assert problems({"KILN_DATABSE_URL": "postgresql://db/kiln"}) == [
        "KILN_DATABSE_URL is not a Kiln setting; did you mean KILN_DATABASE_URL?"
    ]
    assert problems({"KILN_FROBNICATE": "1"}) == [
        "KILN_FROBNICATE is not a Kiln setting; see docs/operations.md for the list"
    ]


def test_test_suite_variables_are_not_settings() -> None:
    Settings.from_env({"HOME": "/h", "KILN_TEST_NATS_URL": "nats://x:1"})


def test_every_problem_is_reported_at_once() -> None:
    found = problems({"KILN_PORT": "x", "KILN_ENV": "y", "KILN_TYPO": "z"})
    assert [line.split("=")[0].split(" ")[0] for line in found] == [
        "KILN_TYPO",
        "KILN_ENV",
        "KILN_PORT",
    ]
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"HOME": "/h", "KILN_PORT": "x", "KILN_ENV": "y"})
    assert caught.value.message == "\n".join(caught.value.problems)


def test_production_requires_services_and_secrets() -> None:
    assert problems({"KILN_ENV": "production"}) == [
        "KILN_NATS_URL is required when KILN_ENV=production: NATS server(s); unset under "
        "`kiln dev` starts an embedded one.",
        "KILN_DATABASE_URL is required when KILN_ENV=production: PostgreSQL URL; unset under "
        "`kiln dev` starts an embedded one.",
        "KILN_REDIS_URL is required when KILN_ENV=production: Redis URL; unset under "
        "`kiln dev` starts an embedded one.",
        "KILN_API_KEY_PEPPER is required when KILN_ENV=production: secret mixed into API-key "
        "hashes; at least 32 random characters.",
        "KILN_SNAPSHOT_SIGNING_KEY is required when KILN_ENV=production: HMAC key that signs "
        "snapshots and usage reports and seals what platform processes send each other over NATS "
        "(routers, schedulers, node agents and billing workers need the same one); at least 32 "
        "random characters.",
        "KILN_WEBHOOK_SECRET is required when KILN_ENV=production: HMAC key that signs job "
        "completion webhooks (Kiln-Signature); at least 32 characters.",
    ]


def test_require_names_the_variable() -> None:
    settings = Settings.from_env({"HOME": "/h"})
    with pytest.raises(ConfigError) as caught:
        settings.require("database_url")
    assert caught.value.message == (
        "KILN_DATABASE_URL is required here: PostgreSQL URL; unset under `kiln dev` starts an "
        "embedded one."
    )


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({"HOME": "/h"})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]
    assert settings.replace(port=1).port == 1
    assert settings.port == 8000


def test_whitespace_pepper_is_refused() -> None:
    assert problems({"KILN_API_KEY_PEPPER": " " * 40})[0].startswith(
        "KILN_API_KEY_PEPPER (value hidden, 40 characters) is not valid: expected at least 32 "
        "characters and no whitespace"
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("KILN_DATABASE_URL", "postgresql:kiln"),
        ("KILN_NATS_URL", "nats:foo"),
        ("KILN_REDIS_URL", "redis:localhost"),
    ],
)
def test_url_without_host_is_refused(var: str, value: str) -> None:
    found = problems({var: value})
    assert len(found) == 1
    assert found[0].startswith(f"{var}={value!r} is not valid: expected a")


def test_port_zero_and_bad_ports_are_refused() -> None:
    assert problems({"KILN_REDIS_URL": "redis://h:0/0"}) == [
        "KILN_REDIS_URL='redis://h:0/0' is not valid: expected a redis:// or rediss:// or "
        "unix:// URL with a port from 1 to 65535."
    ]
    for url in ("http://h:abc", "http://h:99999"):
        assert problems({"KILN_URL": url}) == [
            f"KILN_URL={url!r} is not valid: expected an http:// or https:// URL such as "
            "http://127.0.0.1:8000."
        ]


def test_unix_socket_redis_is_accepted() -> None:
    settings = Settings.from_env({"HOME": "/h", "KILN_REDIS_URL": "unix:///run/redis.sock"})
    assert settings.redis_url == "unix:///run/redis.sock"


def test_passwords_are_masked_in_messages_and_repr() -> None:
    found = problems({"KILN_DATABASE_URL": "mysql://u:supersecret@db/kiln"})
    assert found == [
        "KILN_DATABASE_URL='mysql://u:***@db/kiln' is not valid: expected a postgresql:// or "
        "postgres:// or postgresql+asyncpg:// URL such as postgresql://127.0.0.1:5432/kiln."
    ]
    settings = Settings.from_env(
        {
            "HOME": "/h",
            "KILN_DATABASE_URL": "postgresql://u:supersecret@db/kiln",
            "KILN_REDIS_URL": "redis://:supersecret@cache:6379/0",
            "KILN_SNAPSHOT_SIGNING_KEY": SECRET,
        }
    )
    shown = repr(settings)
    assert "supersecret" not in shown
    assert SECRET not in shown
    assert "postgresql://u:***@db/kiln" in shown
    assert "snapshot_signing_key='***'" in shown


def test_sslmode_is_translated_for_asyncpg() -> None:
    settings = Settings.from_env(
        {"HOME": "/h", "KILN_DATABASE_URL": "postgresql://u@db:5432/kiln?sslmode=require&x=1"}
    )
    assert settings.sqlalchemy_url == "postgresql+asyncpg://u@db:5432/kiln?ssl=require&x=1"


def test_host_with_scheme_or_port_is_refused() -> None:
    for value in ("http://x", "127.0.0.1:8000"):
        assert problems({"KILN_HOST": value}) == [
            f"KILN_HOST={value!r} is not valid: expected a host name or IP address such as "
            "127.0.0.1 or 0.0.0.0, without a scheme or port (the port is KILN_PORT)."
        ]
    assert Settings.from_env({"HOME": "/h", "KILN_HOST": "::1"}).host == "::1"


def test_api_key_checksum_is_verified() -> None:
    key = mint_key(ApiKeyKind.ACCOUNT).plaintext
    assert Settings.from_env({"HOME": "/h", "KILN_API_KEY": key}).api_key == key
    mistyped = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert problems({"KILN_API_KEY": mistyped}) == [
        f"KILN_API_KEY (value hidden, {len(key)} characters) is not valid: expected a Kiln API "
        "key (kiln_<kind>_<secret>_<checksum>); this one is malformed or mistyped, copy it again."
    ]


def test_stripe_settings_are_checked_and_the_key_is_never_shown() -> None:
    key = "sk_test_" + "a" * 24
    settings = Settings.from_env({
        "HOME": "/h", "KILN_STRIPE_API_KEY": key, "KILN_STRIPE_WEBHOOK_SECRET": "whsec_abc",
        "KILN_STRIPE_API_BASE": "http://127.0.0.1:12111", "KILN_CURRENCY": "eur",
    })  # fmt: skip
    assert settings.stripe_enabled
    assert (settings.stripe_api_base, settings.currency) == ("http://127.0.0.1:12111", "eur")
    assert key not in repr(settings)
    assert not Settings.from_env({"HOME": "/h"}).stripe_enabled
    found = problems({"KILN_STRIPE_API_KEY": "pk_live_abcdefgh123", "KILN_CURRENCY": "USD",
                      "KILN_STRIPE_WEBHOOK_SECRET": "secret"})  # fmt: skip
    assert found == [
        "KILN_STRIPE_API_KEY (value hidden, 19 characters) is not valid: expected a Stripe "
        "secret or restricted key: sk_test_…, sk_live_…, rk_….",
        "KILN_STRIPE_WEBHOOK_SECRET (value hidden, 6 characters) is not valid: expected the "
        "endpoint's signing secret, which starts with whsec_.",
        "KILN_CURRENCY='USD' is not valid: expected a three-letter ISO currency code in lower "
        "case, such as usd.",
    ]
