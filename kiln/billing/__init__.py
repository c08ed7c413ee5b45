"""Billing: the usage-event consumer, the PostgreSQL ledger in integer micro-units, prices,
prepaid balances and Stripe (meter events, top-ups, verified webhooks)."""
