"""The node agent (GPU inventory, standby process pool, snapshot cache) and the replica runtime
that restores a function's snapshot, pulls calls and replies. Replicas run customers' code, so
they hold no database or Stripe credentials and reach the platform only through NATS."""
