"""Observability: Prometheus metrics, GPU telemetry through pynvml, the batched invocation log,
function logs, and the Grafana dashboards and alert rules shipped as files."""
