"""The router: customer API, control API, authentication, rate limits, dispatch, WebSocket
bridge (Starlette + uvicorn)."""
