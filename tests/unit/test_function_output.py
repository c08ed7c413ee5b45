"""A replica's output capture without NATS: lines split per thread, tagged with the call the
code serves (its own threads' lines too while one call runs), batched under the message limit,
bounded, and the original streams still written."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import threading
from typing import Any, cast

from nats.aio.client import Client as NATS

from kiln.invoker import output
from kiln.invoker.output import CallContextFilter, FunctionOutput, in_call
from kiln.seal import FunctionSealer


class Published:
    """Stands in for the NATS client: keeps what was published."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    async def publish(
        self, subject: str, data: bytes, *, headers: dict[str, str] | None = None
    ) -> None:
        self.messages.append((subject, data))

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for _, data in self.messages for line in data.split(b"\n")]


def capture() -> tuple[FunctionOutput, Published]:
    published = Published()
    output = FunctionOutput(
        cast(NATS, published), "ns.logs.f", "replica-1", sealer=FunctionSealer(None)
    )
    return output, published


def test_lines_are_split_per_thread_and_tagged_with_their_call() -> None:
    out, published = capture()
    original = io.StringIO()
    lines = output._Lines(original, "stdout", out)

    def half_lines(name: str) -> None:
        with in_call(f"call-{name}", f"req-{name}"):
            lines.write(f"{name} starts ")
            lines.write(f"and ends\n{name} again\n")

    threads = [threading.Thread(target=half_lines, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    asyncio.run(out.send())
    records = published.records()
    assert sorted((r["line"], r["request_id"]) for r in records) == [
        ("a again", "req-a"), ("a starts and ends", "req-a"),
        ("b again", "req-b"), ("b starts and ends", "req-b"),
    ]  # fmt: skip
    assert {r["replica"] for r in records} == {"replica-1"}
    assert original.getvalue().count("\n") == 4  # still written through


def test_a_thread_the_code_starts_belongs_to_the_one_call_running() -> None:
    out, published = capture()
    with in_call("call-1", "req-1"):
        worker = threading.Thread(target=out.line, args=("stdout", "from my thread"))
        worker.start()
        worker.join()
        with in_call("call-2", "req-2"):  # two at once: a loose thread's line is nobody's
            loose = threading.Thread(target=out.line, args=("stdout", "whose?"))
            loose.start()
            loose.join()
    out.line("stdout", "between calls")
    asyncio.run(out.send())
    tags = {r["line"]: r.get("request_id") for r in published.records()}
    assert tags == {"from my thread": "req-1", "whose?": None, "between calls": None}


def test_messages_stay_under_the_limit_and_a_flood_is_counted() -> None:
    out, published = capture()
    for i in range(output._MAX_QUEUED + 25):
        out.line("stdout", f"{i:05d} " + "x" * 200)
    asyncio.run(out.send())
    assert all(len(data) < 64 * 1024 for _, data in published.messages)
    records = published.records()
    assert len(records) == output._MAX_QUEUED + 1
    assert records[-1]["line"] == "[kiln] 25 lines were dropped: output came too fast"
    assert [r["line"][:5] for r in records[:3]] == ["00000", "00001", "00002"]


def test_install_captures_prints_and_logging_and_uninstall_restores() -> None:
    out, published = capture()
    stdout, stderr = sys.stdout, sys.stderr
    out.install()
    try:
        with in_call("call-9", "req-9"):
            print("printed")
            logging.getLogger("user").warning("logged %d", 3)
    finally:
        out.uninstall()
    assert (sys.stdout, sys.stderr) == (stdout, stderr)
    asyncio.run(out.send())
    records = {r["line"]: r for r in published.records()}
    assert records["printed"]["stream"] == "stdout"
    assert (records["user: logged 3"]["level"], records["user: logged 3"]["request_id"]) == (
        "WARNING", "req-9",
    )  # fmt: skip


def test_log_records_name_the_request() -> None:
    record = logging.LogRecord("kiln.replica", logging.INFO, __file__, 1, "hi", None, None)
    CallContextFilter().filter(record)
    assert record.__dict__["request_id"] == "-"
    with in_call("call-1", "req-1"):
        CallContextFilter().filter(record)
    assert record.__dict__["request_id"] == "req-1"
