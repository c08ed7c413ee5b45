"""What job events do to a job's row, with no database: retries, events out of order and
repeated, a finished job that never changes again, and expiry seen on read."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta

from kiln.db.enums import CallStatus, WebhookState
from kiln.db.models import Call
from kiln.invoker.jobs import retry_delay_s
from kiln.jobs.records import apply_event, call_view, is_expired
from kiln.jobs.webhooks import retry_delay_s as webhook_delay_s
from kiln.jobs.webhooks import sign
from kiln.wire import JobEvent, JobEventKind

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
REPLICA = str(uuid.uuid4())


def job(**fields: object) -> Call:
    defaults: dict[str, object] = {
        "id": uuid.uuid4(), "status": CallStatus.QUEUED, "attempts": 0, "max_retries": 2,
        "created_at": NOW,
    }  # fmt: skip
    return Call(**{**defaults, **fields})


def event(kind: JobEventKind, attempt: int, **fields: object) -> JobEvent:
    return JobEvent(str(uuid.uuid4()), kind, attempt, REPLICA, **fields)  # type: ignore[arg-type]


def test_a_failed_attempt_waits_for_the_next_and_the_last_one_fails_the_job() -> None:
    call = job(webhook_url="https://example.com/hook")
    assert not apply_event(call, event(JobEventKind.STARTED, 1), NOW, 60)
    assert (call.status, call.attempts, call.replica_id) == (
        CallStatus.RUNNING, 1, uuid.UUID(REPLICA)
    )  # fmt: skip
    failed = event(JobEventKind.FAILED, 1, error_code="function_error", error_message="boom")
    assert not apply_event(call, failed, NOW, 60)
    assert (call.status, call.error_message, call.replica_id) == (
        CallStatus.QUEUED, "boom", None
    )  # fmt: skip
    last = event(JobEventKind.FAILED, 3, final=True, error_code="function_error",
                 error_message="boom again")  # fmt: skip
    assert apply_event(call, last, NOW, 60)
    assert (call.status, call.attempts, call.finished_at) == (CallStatus.FAILED, 3, NOW)
    assert call.expires_at == NOW + timedelta(seconds=60)
    assert (call.webhook_state, call.webhook_next_at) == (WebhookState.PENDING, NOW)


def test_an_earlier_attempts_late_news_does_not_undo_a_later_attempt() -> None:
    call = job()
    apply_event(call, event(JobEventKind.STARTED, 2), NOW, 60)
    late = event(JobEventKind.FAILED, 1, error_code="function_error", error_message="old")
    assert not apply_event(call, late, NOW, 60)
    assert (call.status, call.attempts, call.error_message) == (CallStatus.RUNNING, 2, None)


def test_a_finished_job_never_changes_again() -> None:
    call = job()
    result = base64.b64encode(b'{"ok":true}').decode()
    done = event(JobEventKind.SUCCEEDED, 1, final=True, content_type="application/json",
                 result_b64=result)  # fmt: skip
    assert apply_event(call, done, NOW, 60)
    assert not apply_event(call, done, NOW, 60)  # delivered twice
    assert not apply_event(call, event(JobEventKind.STARTED, 1), NOW, 60)  # out of order
    assert not apply_event(call, event(JobEventKind.CANCELLED, 1, final=True), NOW, 60)
    assert call.status is CallStatus.SUCCEEDED
    assert call_view(call, "jobs/echo", NOW)["result"] == {"ok": True}


def test_a_lost_verdict_waits_while_the_replica_that_ran_the_job_lives() -> None:
    # NATS was away longer than the queue's ack wait: it delivered the job again, beyond its
    # one attempt, while the first replica was still finishing it.
    call = job(max_retries=0)
    apply_event(call, event(JobEventKind.STARTED, 1), NOW, 60)
    lost = event(JobEventKind.FAILED, 1, final=True, error_code="worker_lost",
                 error_message="the replica running the job stopped")  # fmt: skip
    assert not apply_event(call, lost, NOW, 60, runner_alive=True)
    assert (call.status, call.error_code) == (CallStatus.RUNNING, "worker_lost")
    result = base64.b64encode(b"7").decode()
    done = event(JobEventKind.SUCCEEDED, 1, final=True, content_type="application/json",
                 result_b64=result)  # fmt: skip
    assert apply_event(call, done, NOW, 60)
    assert (call.status, call.error_code, call.result) == (CallStatus.SUCCEEDED, None, b"7")
    # With its replica gone, the verdict stands at once; other failures never wait.
    dead = job(max_retries=0)
    apply_event(dead, event(JobEventKind.STARTED, 1), NOW, 60)
    assert apply_event(dead, lost, NOW, 60, runner_alive=False)
    assert dead.status is CallStatus.FAILED
    failing = job(max_retries=0)
    apply_event(failing, event(JobEventKind.STARTED, 1), NOW, 60)
    boom = event(JobEventKind.FAILED, 1, final=True, error_code="function_error")
    assert apply_event(failing, boom, NOW, 60, runner_alive=True)
    assert failing.status is CallStatus.FAILED


def test_a_result_expires_when_its_time_is_up_even_before_the_sweeper_runs() -> None:
    call = job(status=CallStatus.SUCCEEDED, expires_at=NOW, result=b"1",
               result_content_type="application/json")  # fmt: skip
    assert not is_expired(call, NOW - timedelta(seconds=1))
    assert is_expired(call, NOW)
    view = call_view(call, "jobs/echo", NOW)
    assert view["status"] == "expired"
    assert "result" not in view
    assert "result_url" not in view


def test_backoffs_and_signatures() -> None:
    # The signature pinned below is what `openssl dgst -sha256 -hmac secret` gives for the
    # bytes "1700000000.{}".
    assert [retry_delay_s(n) for n in (1, 2, 3, 7, 8)] == [1.0, 2.0, 4.0, 60.0, 60.0]
    assert [webhook_delay_s(n) for n in (1, 2, 9)] == [2.0, 4.0, 300.0]
    assert sign("secret", b"{}", 1700000000) == (
        "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
    )
