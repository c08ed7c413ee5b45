"""Wire messages survive their encoding and name their subjects under the namespace."""

from __future__ import annotations

import json
import uuid

import pytest

from kiln.wire import (
    CallHeaders,
    Event,
    H,
    ReplicaHeartbeat,
    Subjects,
    consumer_name,
    decode,
    decode_own,
    encode,
    parse_event,
    stream_event,
)


def test_call_headers_round_trip() -> None:
    call = CallHeaders(
        call_id="c1", router="r", content_type="application/json",
        accept_by=1234.5, timeout_s=30, method="greet", request_id="req_1", generation=3,
        token="5e3c",
    )  # fmt: skip
    headers = call.to_headers()
    assert headers == {H.CALL: "5 c1 r 1234.500 30 3 0 greet 5e3c req_1"}
    assert CallHeaders.from_headers(headers) == call


def test_call_headers_keep_spaces_in_request_ids_and_other_content_types() -> None:
    call = CallHeaders("c", "r", "text/plain; charset=utf-8", 1.0, 1.0, request_id="a b c")
    headers = call.to_headers()
    assert headers[H.CONTENT_TYPE] == "text/plain; charset=utf-8"
    assert CallHeaders.from_headers(headers) == call


def test_call_headers_refuse_another_wire_version() -> None:
    headers = CallHeaders("c", "r", "application/json", 1.0, 1.0).to_headers()
    headers[H.CALL] = "2" + headers[H.CALL][1:]
    with pytest.raises(ValueError, match="wire format '2', expected 5"):
        CallHeaders.from_headers(headers)
    with pytest.raises(ValueError, match="call header has 3 fields, expected 10"):
        CallHeaders.from_headers({H.CALL: "5 c r"})


def test_a_streaming_calls_window_and_its_events_sequence_numbers_travel() -> None:
    call = CallHeaders("c", "r", "application/json", 1.0, 1.0, method="gen", window=32)
    assert CallHeaders.from_headers(call.to_headers()) == call
    assert parse_event(stream_event(Event.CHUNK, 7)[H.EVENT]) == ("chunk", 7)
    assert parse_event(stream_event(Event.END, 12)[H.EVENT]) == ("end", 12)
    assert parse_event(Event.RESULT) == ("result", -1)


def test_heartbeat_round_trip() -> None:
    beat = ReplicaHeartbeat("r", "f", "v", "node", "ready", 2, None, None)
    assert decode(ReplicaHeartbeat, encode(beat)) == beat


def test_a_message_from_an_older_or_a_newer_sender_still_decodes() -> None:
    """A message grows only by fields with defaults: an older sender's lacks them (they take
    their defaults), a newer sender's has fields this version does not know (dropped)."""
    beat = ReplicaHeartbeat("r", "f", "v", "node", "ready", 0, None, pod_id="p", active_at=5.0)
    older = json.loads(encode(beat))
    del older["active_at"]
    assert decode(ReplicaHeartbeat, json.dumps(older).encode()).active_at is None
    newer = {**json.loads(encode(beat)), "gpu_load": 0.5}
    assert decode(ReplicaHeartbeat, json.dumps(newer).encode()) == beat


def test_subjects_live_under_the_namespace() -> None:
    fid = uuid.UUID(int=7)
    subjects = Subjects("t1")
    assert subjects.calls(fid) == f"t1.calls.{fid.hex}"
    assert subjects.all_calls == "t1.calls.>"
    assert subjects.calls_stream == "t1_calls"
    assert subjects.code_bucket == "t1_code"
    assert subjects.reply("r", fid, "c", "k") == f"t1.reply.r.{fid.hex}.c.k"
    assert subjects.accepted("r", fid) == f"t1.accepted.r.{fid.hex}"
    assert subjects.payload_bucket(fid) == f"t1_payloads_{fid.hex}"
    assert consumer_name(fid) == f"fn_{fid.hex}"


def test_a_message_on_a_replicas_own_subject_may_speak_only_for_that_replica() -> None:
    subjects = Subjects("t1")
    me, other = uuid.UUID(int=1), uuid.UUID(int=2)
    beat = ReplicaHeartbeat(str(me), "f", "v", "node", "ready", 0, None, None)
    assert decode_own(ReplicaHeartbeat, subjects.replica_heartbeat(me), encode(beat)) == beat
    with pytest.raises(ValueError, match=f"speaks for replica {me}"):
        decode_own(ReplicaHeartbeat, subjects.replica_heartbeat(other), encode(beat))
