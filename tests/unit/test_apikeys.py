"""API key format: well-formed keys parse, anything else is refused before any lookup."""

from __future__ import annotations

import pytest

from kiln.apikeys import TOKENS, display_prefix, hash_key, mint_key, parse_key
from kiln.db.enums import ApiKeyKind

PEPPER = "p" * 32


@pytest.mark.parametrize("kind", list(ApiKeyKind))
def test_minted_key_round_trips(kind: ApiKeyKind) -> None:
    key = mint_key(kind)
    assert key.plaintext.startswith(f"kiln_{TOKENS[kind]}_")
    assert parse_key(key.plaintext) is kind
    assert key.prefix == display_prefix(key.plaintext)
    assert key.plaintext.startswith(key.prefix)
    assert len(key.prefix) < len(key.plaintext) - 20


def test_keys_are_unique_and_long() -> None:
    keys = {mint_key(ApiKeyKind.ACCOUNT).plaintext for _ in range(200)}
    assert len(keys) == 200
    secret = next(iter(keys)).split("_")[2]
    assert len(secret) == 32  # 32 base62 characters: about 190 bits


def test_a_single_changed_character_fails_the_checksum() -> None:
    key = mint_key(ApiKeyKind.OPERATOR).plaintext
    position = len("kiln_op_") + 5
    swapped = "A" if key[position] != "A" else "B"
    assert parse_key(key[:position] + swapped + key[position + 1 :]) is None


@pytest.mark.parametrize(
    "candidate",
    [
        "",
        "kiln",
        "kiln_op",
        "sk_live_abc",
        "kiln_xx_" + "a" * 32 + "_000000",
        "kiln_op_short_abcdef",
    ],
)
def test_malformed_keys_are_refused(candidate: str) -> None:
    assert parse_key(candidate) is None


def test_truncated_key_is_refused() -> None:
    key = mint_key(ApiKeyKind.FUNCTION).plaintext
    assert parse_key(key[:-1]) is None


def test_hash_depends_on_pepper_and_is_fixed_size() -> None:
    key = mint_key(ApiKeyKind.ACCOUNT)
    assert key.digest(PEPPER) == hash_key(key.plaintext, PEPPER)
    assert len(key.digest(PEPPER)) == 32
    assert key.digest(PEPPER) != key.digest("q" * 32)
