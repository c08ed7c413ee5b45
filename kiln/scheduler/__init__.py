"""The scheduler: the reconcile loop that sets each function's desired replicas from demand,
placement of replicas on nodes, and leader election. It talks to the rest only over NATS and
PostgreSQL and never imports the router or the invoker."""
