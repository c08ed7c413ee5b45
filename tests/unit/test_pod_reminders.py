"""What an idle pod's reminder says (kiln.billing.pod_reminders); who gets it and when is
tests/integration/test_pod_policies_e2e.py's."""

from __future__ import annotations

from kiln.billing.pod_reminders import reminder_text


def test_the_reminder_names_the_pod_its_idle_time_its_price_and_the_way_to_stop_it() -> None:
    text = reminder_text(customer="Acme", pod="box", idle_s=3 * 3600 + 2400, per_hour="$2.50",
                         auto_stop_s=None, volume=True)  # fmt: skip
    assert text == (
        "Hello Acme,\n\nyour pod box has had no terminal or port traffic for 3 hours; it costs "
        "$2.50 an hour while it runs. Stop it with `kiln pods stop box` (its volume is kept); "
        "`kiln pods start box` starts it again, and `kiln pods rm box` ends it.\nA pod created "
        "with auto_stop_hours stops by itself when idle that long.\n"
    )
    text = reminder_text(customer="Acme", pod="gpu-1", idle_s=7200, per_hour="$4.00",
                         auto_stop_s=8 * 3600, volume=False)  # fmt: skip
    assert "Stop it with `kiln pods stop gpu-1`; `kiln pods start gpu-1`" in text
    assert text.endswith("\nIt stops by itself after 8 hours without traffic.\n")
