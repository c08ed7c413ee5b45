"""The console's parts that need no server: password rules and hashes, addresses, money as a
page shows it, mail written to files, and the sign-in throttle counting on its own when Redis
is away."""

from __future__ import annotations

from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

from kiln.console import passwords
from kiln.console.accounts import email_problem, normal_email
from kiln.console.mail import Mail, Mailer
from kiln.console.throttle import Rule, Throttle
from kiln.console.web import money
from kiln.errors import RateLimited
from kiln.settings import Settings


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        ("short", "use at least 10 characters (this one has 5)"),
        (" " * 12, "use something other than spaces"),
        ("x" * 257, "use at most 256 characters"),
        ("correct horse", None),
    ],
)
def test_password_rules_name_the_fix(password: str, problem: str | None) -> None:
    assert passwords.problem(password) == problem


async def test_hashes_are_argon2id_and_check_only_the_right_password() -> None:
    stored = await passwords.hash_password("correct horse")
    assert stored.startswith("$argon2id$")
    assert (await passwords.check(stored, "correct horse")).ok
    assert not (await passwords.check(stored, "wrong horse")).ok
    assert not (await passwords.check(None, "correct horse")).ok  # no user: work done anyway
    assert not (await passwords.check("not a hash", "correct horse")).ok


def test_addresses() -> None:
    assert normal_email("  Ada@Example.COM ") == "ada@example.com"
    assert email_problem("ada@example.com") is None
    assert email_problem("ada") == "'ada' is not an email address (name@example.com)"
    assert email_problem("ada@localhost") is not None
    assert email_problem("a@" + "b" * 320 + ".com") == "an address has at most 320 characters"


def test_money_reads_as_people_write_it() -> None:
    assert money(12_345_678_900) == "$12,345.68"
    assert money(-500_000) == "-$0.50"
    assert money(1_000_000, "eur") == "1.00 EUR"


async def test_without_smtp_mail_is_a_file_with_its_link(tmp_path: Path) -> None:
    settings = Settings.from_env({"HOME": str(tmp_path), "KILN_HOME": str(tmp_path)})
    mail = Mail(
        to="Ada@Example.com", subject="Confirm", text="Follow https://x/console/verify?token=t\n",
        link="https://x/console/verify?token=t", kind="verify",
    )  # fmt: skip
    path = await Mailer(settings).send(mail)
    assert path is not None
    assert path.parent == tmp_path / "mail"
    assert path.name.endswith("-verify-ada@example.com.eml")
    assert path.stat().st_mode & 0o777 == 0o600
    message = message_from_bytes(path.read_bytes())
    assert message["To"] == "Ada@Example.com"
    assert message["From"] == "Kiln <kiln@localhost>"
    assert message["Subject"] == "Confirm"
    assert "https://x/console/verify?token=t" in str(message.get_payload())


class _NoRedis:
    async def eval(self, *_: Any) -> Any:
        raise ConnectionError("Redis is away")


async def test_without_redis_each_router_still_counts() -> None:
    throttle = Throttle(_NoRedis(), "t:")
    rule = Rule("sign-in", limit=3, window_s=600)
    for _ in range(3):
        await throttle.attempt((rule, "account:a"))
    with pytest.raises(RateLimited) as refused:
        await throttle.attempt((rule, "account:a"))
    assert refused.value.message == "too many sign-in attempts; try again in 10 minutes"
    assert refused.value.retry_after == 600
    await throttle.attempt((rule, "account:b"))  # another account has its own window
