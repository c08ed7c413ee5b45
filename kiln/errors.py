"""The one exception tree of Kiln.

Every error a user, a customer or an operator can see is a `KilnError`. Each class carries the
HTTP status and the stable machine-readable `code` that the router puts in the one JSON error
shape of the API, `{"error": {"code", "message", "request_id"}}`. The router maps errors to
responses in exactly one place; nothing else builds error bodies.

5xx errors never show their message to customers: `public_message` replaces it with a generic
sentence so that internals (hostnames, SQL, tracebacks) cannot leak.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AppImportError",
    "BadGateway",
    "ConfigError",
    "Conflict",
    "DevStackBusy",
    "DevStackError",
    "DevStackPortTaken",
    "FunctionError",
    "FunctionTimeout",
    "InternalError",
    "InvalidArguments",
    "InvalidJson",
    "InvalidPackage",
    "InvalidRequest",
    "InvalidSpec",
    "KilnError",
    "ModelNotFound",
    "NotFound",
    "PayloadTooLarge",
    "PaymentRequired",
    "PermissionDenied",
    "RateLimited",
    "RemoteError",
    "RequestTimeout",
    "ResultTooLarge",
    "ServiceFailed",
    "SnapshotError",
    "SnapshotTampered",
    "StreamBroken",
    "Unauthenticated",
    "Unavailable",
    "Unprocessable",
    "UnserializableResult",
    "WorkerLost",
]

_GENERIC_5XX = {
    500: "Kiln hit an internal error; the request id identifies it in the logs.",
    502: "The replica handling this call was lost; the call can be retried.",
    503: "Kiln cannot take this request right now; retry after the indicated time.",
    504: "The call did not finish within its timeout.",
}


class KilnError(Exception):
    """Base of every Kiln error. Subclasses set `status` and `code`."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.fields = fields

    @property
    def public_message(self) -> str:
        """The message a customer may see: the real one for 4xx, a generic one for 5xx."""
        if self.status >= 500:
            return _GENERIC_5XX.get(self.status, _GENERIC_5XX[500])
        return self.message

    def to_body(self, request_id: str) -> dict[str, Any]:
        return {
            "error": {"code": self.code, "message": self.public_message, "request_id": request_id}
        }


# Answers from a Kiln, met by its client (the CLI and the SDK) ----------------------------------


class RemoteError(KilnError):
    """An error answer from Kiln's API: the HTTP status, `code` and message as the API sent
    them. Unlike the errors below, its status is the one it was given."""

    code = "remote_error"

    def __init__(
        self,
        *,
        status: int,
        code: str,
        message: str,
        request_id: str = "-",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            f"{message} ({code}, HTTP {status}, request {request_id})", retry_after=retry_after
        )
        self.http_status = status
        self.api_code = code
        self.api_message = message
        self.request_id = request_id


# Configuration and local tooling -----------------------------------------------------------------


class ConfigError(KilnError):
    """A KILN_* setting is missing or invalid. `problems` lists every one found, one per line."""

    code = "config_invalid"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ServiceFailed(KilnError):
    """A platform process could not start serving (its port, its lifespan), or stopped
    serving by itself."""

    code = "service_failed"


class DevStackError(KilnError):
    """An embedded service (NATS, PostgreSQL, Redis) failed to start, answer or stop."""

    code = "devstack_failed"


class DevStackPortTaken(DevStackError):
    """A server could not bind its port: another program took it after Kiln chose it."""

    code = "devstack_port_taken"


class DevStackBusy(DevStackError):
    """Another process already runs the embedded services in this data directory."""

    code = "devstack_busy"


class SnapshotError(KilnError):
    """A snapshot cannot be made or used: a value that cannot be captured, a damaged, tampered
    or foreign file. The replica then runs the setup hooks the slow way; callers never see it."""

    code = "snapshot_failed"


class SnapshotTampered(SnapshotError):
    """A snapshot's signature or checksum does not match: it is never loaded."""

    code = "snapshot_tampered"


# Client errors -----------------------------------------------------------------------------------


class InvalidRequest(KilnError):
    status = 400
    code = "invalid_request"


class InvalidJson(InvalidRequest):
    code = "invalid_json"


class InvalidArguments(InvalidRequest):
    """A call's arguments do not match the function's signature."""

    code = "invalid_arguments"


class InvalidSpec(InvalidRequest):
    """A function or class specification is invalid (raised at decoration or deploy time)."""

    code = "invalid_spec"


class AppImportError(InvalidSpec):
    """An app file raised while being imported; the message carries the user's traceback, with
    only the frames from the user's own files."""

    code = "app_import_failed"


class InvalidPackage(InvalidRequest):
    """A packaged app source is malformed or unsafe to unpack (links, absolute paths, `..`)."""

    code = "invalid_package"


class Unauthenticated(KilnError):
    status = 401
    code = "unauthenticated"


class PaymentRequired(KilnError):
    status = 402
    code = "insufficient_balance"


class PermissionDenied(KilnError):
    status = 403
    code = "permission_denied"


class NotFound(KilnError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    """An OpenAI-compatible route's `model` names no deployment the caller may use."""

    code = "model_not_found"


class RequestTimeout(KilnError):
    status = 408
    code = "request_timeout"


class Conflict(KilnError):
    status = 409
    code = "conflict"


class PayloadTooLarge(KilnError):
    status = 413
    code = "payload_too_large"


class Unprocessable(KilnError):
    status = 422
    code = "unprocessable"


class RateLimited(KilnError):
    status = 429
    code = "rate_limited"


# Server errors -----------------------------------------------------------------------------------


class InternalError(KilnError):
    status = 500
    code = "internal_error"


class FunctionError(KilnError):
    """The customer's own code raised. Its type and message are the customer's, not Kiln's
    internals, so unlike other 5xx errors the body shows them; the traceback goes to the
    function's logs."""

    status = 500
    code = "function_error"

    @property
    def public_message(self) -> str:
        return self.message


class UnserializableResult(FunctionError):
    code = "unserializable_result"


class ResultTooLarge(FunctionError):
    code = "result_too_large"


class WorkerLost(KilnError):
    status = 502
    code = "worker_lost"


class StreamBroken(KilnError):
    """A stream lost a chunk on the way: it ends with this error rather than skip it."""

    status = 502
    code = "stream_broken"


class BadGateway(KilnError):
    """A pod's own server, reached through a forwarded port, did not answer: its message is
    about the customer's program, not Kiln's internals, and is shown."""

    status = 502
    code = "bad_gateway"

    @property
    def public_message(self) -> str:
        return self.message


class Unavailable(KilnError):
    status = 503
    code = "unavailable"


class FunctionTimeout(KilnError):
    status = 504
    code = "timeout"
