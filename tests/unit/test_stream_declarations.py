"""kiln/streams.py: the names Subjects hand out are the declarations', and making a stream or
bucket waits out a cluster electing its JetStream leader instead of failing a start."""

from __future__ import annotations

import uuid
from typing import Any, cast

import nats.errors
import pytest
from nats.js.errors import BadRequestError

from kiln import streams
from kiln.wire import Subjects, consumer_name


def test_subjects_name_what_the_declarations_declare() -> None:
    subjects, function = Subjects("ns"), uuid.UUID(int=7)
    assert subjects.calls_stream == "ns_calls"
    assert subjects.all_calls == "ns.calls.>"
    assert subjects.payload_bucket(function) == f"ns_payloads_{function.hex}"
    assert consumer_name(function) == f"fn_{function.hex}"
    config = streams.CALLS.config("ns", replicas=3)
    assert (config.name, config.subjects, config.num_replicas) == ("ns_calls", ["ns.calls.>"], 3)
    assert config.duplicate_window == 2 * streams.PUBLISH_RETRY_S


def test_a_bucket_whose_ttl_is_a_setting_needs_its_value() -> None:
    with pytest.raises(ValueError, match="KILN_JOB_RESULT_TTL_S: pass its value"):
        streams._ttl(streams.JOB_RESULTS, None)
    assert streams._ttl(streams.JOB_RESULTS, 60.0) == 60.0
    assert streams._ttl(streams.PAYLOADS, None) == 24 * 3600.0


class _Electing:
    """JetStream while its cluster elects a leader: no answer, `silent` times."""

    def __init__(self, silent: int) -> None:
        self.silent = silent
        self.asked = 0

    async def add_stream(self, config: Any) -> None:
        self.asked += 1
        if self.asked <= self.silent:
            raise nats.errors.TimeoutError

    async def update_stream(self, config: Any) -> None:  # tried when adding fails
        raise nats.errors.TimeoutError


async def test_making_a_stream_waits_out_an_election(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kiln._nats.reconnect_delay", lambda attempt: 0.01)
    js = _Electing(silent=2)
    await streams.ensure_stream(cast(Any, js), streams.USAGE, "ns", replicas=3)
    assert js.asked == 3


async def test_an_election_that_outlasts_the_wait_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kiln._nats.reconnect_delay", lambda attempt: 0.01)
    monkeypatch.setattr(streams, "JETSTREAM_WAIT_S", 0.05)
    with pytest.raises(nats.errors.TimeoutError):
        await streams.ensure_stream(cast(Any, _Electing(silent=10**6)), streams.USAGE, "ns",
                                    replicas=1)  # fmt: skip


class _PeerOffline:
    """JetStream while a peer of a replicated stream is offline: no placement, `times` times,
    then a refusal of another kind."""

    def __init__(self, times: int, then: Exception | None = None) -> None:
        self.times = times
        self.then = then
        self.asked = 0

    def _refusal(self) -> Exception | None:
        if self.asked <= self.times:
            return BadRequestError(err_code=10005, description="no suitable peers for placement")
        return self.then

    async def add_stream(self, config: Any) -> None:
        self.asked += 1
        if (refusal := self._refusal()) is not None:
            raise refusal

    async def update_stream(self, config: Any) -> None:  # tried when adding fails
        if (refusal := self._refusal()) is not None:
            raise refusal


async def test_making_a_stream_waits_for_an_offline_peer_but_not_for_a_bad_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("kiln._nats.reconnect_delay", lambda attempt: 0.01)
    js = _PeerOffline(times=2)
    await streams.ensure_stream(cast(Any, js), streams.USAGE, "ns", replicas=3)
    assert js.asked == 3
    refused = _PeerOffline(times=0, then=BadRequestError(err_code=10052, description="bad"))
    with pytest.raises(BadRequestError):
        await streams.ensure_stream(cast(Any, refused), streams.USAGE, "ns", replicas=3)
    assert refused.asked == 1
