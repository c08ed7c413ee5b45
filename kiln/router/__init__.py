"""The router: customer API, control API, authentication, rate limits, dispatch, WebSocket
bridge (Starlette + uvicorn). Issue 3 builds the application; this package holds the pieces
that already exist."""
