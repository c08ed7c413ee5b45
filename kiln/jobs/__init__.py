"""Async jobs (`POST /v1/spawn`): the job recorder that writes what replicas report about jobs
to PostgreSQL, expires old results and delivers completion webhooks. The router's routes are in
`kiln.router.jobs`; the replica's side in `kiln.invoker.jobs`."""
