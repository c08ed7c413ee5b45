"""The SDK: `App`, `@app.function`, `@app.cls`, `@enter`/`@exit`/`@method`, specification
validation and packaging. Light by rule: no torch, no database or NATS drivers at import."""
