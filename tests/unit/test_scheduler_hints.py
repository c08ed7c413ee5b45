"""A router's demand hint starts the first replica of a function with none first thing in the
next pass: without asking the queue and before the database is read for every function (a
stand-in NATS and database; placement and the pass itself are the real code)."""

from __future__ import annotations

import asyncio

from scheduler_fakes import Records, demand_hint, function_row, make_scheduler, node_beat

from kiln._clock import FakeClock
from kiln.wire import consumer_name


async def test_a_hint_starts_the_first_replica_before_the_pass_reads_the_database() -> None:
    function = function_row()
    records = Records(functions={function.id: function}, load_gate=asyncio.Event())
    scheduler, nc = make_scheduler(FakeClock(), records)
    scheduler.functions = {function.id: function}  # as the last full pass loaded it
    await scheduler.observer.on_node(node_beat("n1"))
    nc.pending[function.id] = 1

    await scheduler.observer.on_demand(demand_hint(function))
    assert scheduler.wake.is_set()
    full_pass = asyncio.create_task(scheduler.reconcile())
    await asyncio.wait_for(records.launched.wait(), 5)
    assert not full_pass.done()  # the database read still hangs
    assert [c["op"] for _, c in nc.commands] == ["start"]
    assert nc.asked == []  # a hint means a call waits; the queue is asked by the full pass
    [replica_id] = records.replicas
    assert scheduler.cluster.replicas[replica_id].schedule_s is not None

    assert records.load_gate is not None
    records.load_gate.set()  # the pass goes on: one replica serves the one call, no second
    await asyncio.wait_for(full_pass, 5)
    assert nc.asked == [consumer_name(function.id)]
    assert [c["op"] for _, c in nc.commands] == ["start"]
    assert scheduler.cluster.hinted == set()
