"""Money typed by people and sent to Stripe: decimal amounts to micro-units and micro-units to
Stripe's minor units, never through floats."""

from __future__ import annotations

import pytest
import typer

from kiln.billing.stripe_gateway import micros_to_minor, minor_to_micros
from kiln.cli.billing import parse_amount


def test_amounts_are_read_exactly() -> None:
    assert parse_amount("25") == 25_000_000
    assert parse_amount("12.50") == 12_500_000
    assert parse_amount("-0.000001") == -1
    assert parse_amount("0.1") + parse_amount("0.2") == parse_amount("0.3")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("ten", "'ten' is not an amount; write it like 10 or 12.50"),
        ("0.0000001", "'0.0000001' is not an amount with at most 6 decimals"),
        ("inf", "'inf' is not an amount with at most 6 decimals"),
    ],
)
def test_what_is_not_an_amount_is_refused(raw: str, message: str) -> None:
    with pytest.raises(typer.BadParameter, match=message):
        parse_amount(raw)


def test_stripe_minor_units_follow_the_currency() -> None:
    assert micros_to_minor(12_345_678, "usd") == 1234  # cents, rounded down
    assert minor_to_micros(1234, "usd") == 12_340_000
    assert micros_to_minor(1_500_000_000, "jpy") == 1500  # no minor unit
    assert minor_to_micros(1500, "jpy") == 1_500_000_000
