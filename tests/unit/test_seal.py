"""Seals: the platform's messages and a function's replicas' messages are told apart from what a
replica could have the server publish for it."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import pytest

from kiln.seal import SEAL, FunctionSealer, Seals, function_key

SECRET = "s" * 40


@dataclass
class Received:
    subject: str
    data: bytes
    headers: dict[str, str] | None


def test_a_platform_seal_opens_for_its_subject_and_body_only() -> None:
    seals = Seals(SECRET)
    headers = seals.platform("ns.node.n1.cmd", b'{"op": "stop"}')
    assert headers is not None
    assert set(headers) == {SEAL}
    assert seals.from_platform("ns.node.n1.cmd", b'{"op": "stop"}', headers)
    assert not seals.from_platform("ns.node.n2.cmd", b'{"op": "stop"}', headers)  # elsewhere
    assert not seals.from_platform("ns.node.n1.cmd", b'{"op": "start"}', headers)  # altered
    assert not seals.from_platform("ns.node.n1.cmd", b'{"op": "stop"}', None)
    assert not seals.from_platform("ns.node.n1.cmd", b'{"op": "stop"}', {SEAL: "00" * 32})
    # Another installation's key seals nothing here.
    assert not Seals("t" * 40).from_platform("ns.node.n1.cmd", b'{"op": "stop"}', headers)


def test_a_replica_seals_in_its_own_functions_name_only() -> None:
    seals = Seals(SECRET)
    mine, other = uuid.uuid4(), uuid.uuid4()
    # What the node agent hands the replica is what the platform derives.
    assert seals.function_key(mine) == function_key(SECRET, mine)
    replica = FunctionSealer(function_key(SECRET, mine))
    subject = "ns.hb.replica.abc"
    headers = replica.headers(subject, b"beat")
    assert seals.from_function(mine, subject, b"beat", headers)
    assert not seals.from_function(other, subject, b"beat", headers)
    # Nor does a function's key make platform seals.
    assert not seals.from_platform(subject, b"beat", headers)


def test_a_replica_takes_only_calls_a_router_sealed_for_its_function() -> None:
    router = Seals(SECRET)
    mine, other = uuid.uuid4(), uuid.uuid4()
    replica = FunctionSealer(function_key(SECRET, mine))
    call = b"5 7 r1 0.000 30 0 0 - a1b2 req"
    to_me, to_other = f"ns.calls.{mine.hex}", f"ns.calls.{other.hex}"
    assert replica.opens(to_me, call, router.function(mine, to_me, call))
    # Another function's call, delivered here by the server at a replica's request.
    assert not replica.opens(to_me, call, router.function(other, to_other, call))
    assert not replica.opens(to_me, call, None)


def test_without_a_signing_key_nothing_is_sealed_and_everything_is_taken() -> None:
    seals, replica = Seals(None), FunctionSealer(None)
    assert not seals.enabled
    assert seals.platform("s", b"x") is None
    assert seals.function(uuid.uuid4(), "s", b"x") is None
    assert replica.headers("s", b"x") is None
    assert seals.from_platform("s", b"x", None)
    assert seals.from_function(uuid.uuid4(), "s", b"x", None)
    assert replica.opens("s", b"x", None)


def test_refusals_are_logged_once_a_minute_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    seals = Seals(SECRET)
    forged = Received("ns.node.n1.cmd", b'{"op": "stop"}', {SEAL: "forged"})
    with caplog.at_level(logging.WARNING, logger="kiln.seal"):
        assert not seals.platform_sent(forged, "a node command")
        assert not seals.platform_sent(forged, "a node command")
        assert not seals.function_sent(forged, uuid.uuid4(), "a job event")
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring a node command on ns.node.n1.cmd without its seal: a replica may be forging "
        "messages (logged once a minute)",
        "ignoring a job event on ns.node.n1.cmd without its seal: a replica may be forging "
        "messages (logged once a minute)",
    ]
    sealed = Received(forged.subject, forged.data, seals.platform(forged.subject, forged.data))
    assert seals.platform_sent(sealed, "a node command")
