"""The web console at `/console`, rendered by the router: accounts (users of a customer, and
operators), sessions, and pages over the platform's own API. See docs/console.md."""
