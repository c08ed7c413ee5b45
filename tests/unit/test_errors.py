"""The error tree: statuses, codes and the one body shape; 5xx bodies never carry internals."""

from __future__ import annotations

import pytest

from kiln import errors
from kiln.errors import KilnError


def all_errors() -> list[type[KilnError]]:
    """The tree as kiln.errors defines it."""
    found: list[type[KilnError]] = []
    pending: list[type[KilnError]] = [KilnError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == errors.__name__:
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize(
    ("cls", "status", "code"),
    [
        (errors.InvalidRequest, 400, "invalid_request"),
        (errors.InvalidSpec, 400, "invalid_spec"),
        (errors.AppImportError, 400, "app_import_failed"),
        (errors.InvalidPackage, 400, "invalid_package"),
        (errors.InvalidJson, 400, "invalid_json"),
        (errors.InvalidArguments, 400, "invalid_arguments"),
        (errors.FunctionError, 500, "function_error"),
        (errors.UnserializableResult, 500, "unserializable_result"),
        (errors.ResultTooLarge, 500, "result_too_large"),
        (errors.Unauthenticated, 401, "unauthenticated"),
        (errors.PaymentRequired, 402, "insufficient_balance"),
        (errors.PermissionDenied, 403, "permission_denied"),
        (errors.NotFound, 404, "not_found"),
        (errors.RequestTimeout, 408, "request_timeout"),
        (errors.Conflict, 409, "conflict"),
        (errors.PayloadTooLarge, 413, "payload_too_large"),
        (errors.Unprocessable, 422, "unprocessable"),
        (errors.RateLimited, 429, "rate_limited"),
        (errors.InternalError, 500, "internal_error"),
        (errors.WorkerLost, 502, "worker_lost"),
        (errors.Unavailable, 503, "unavailable"),
        (errors.FunctionTimeout, 504, "timeout"),
    ],
)
def test_status_and_code(cls: type[KilnError], status: int, code: str) -> None:
    assert (cls.status, cls.code) == (status, code)


def test_every_error_is_exported_and_codes_are_unique() -> None:
    classes = all_errors()
    assert {cls.__name__ for cls in classes} == set(errors.__all__)
    codes = [cls.code for cls in classes if cls is not KilnError]
    assert len(codes) == len(set(codes))


def test_client_error_body_shows_the_message() -> None:
    body = errors.NotFound("function shout not found in app tts").to_body("req_1")
    assert body == {
        "error": {
            "code": "not_found",
            "message": "function shout not found in app tts",
            "request_id": "req_1",
        }
    }


@pytest.mark.parametrize(
    "cls",
    [
        c
        for c in all_errors()
        # A function's own error (and its pod's server's) is its owner's to read; a
        # RemoteError is an answer the client met, never served.
        if c.status >= 500
        and not issubclass(c, errors.FunctionError | errors.RemoteError | errors.BadGateway)
    ],
)
def test_server_error_body_hides_internals(cls: type[KilnError]) -> None:
    secret = "connection to db-7.internal:5432 refused; Traceback ..."
    body = cls(secret).to_body("req_2")
    assert body["error"]["code"] == cls.code
    assert body["error"]["request_id"] == "req_2"
    assert secret not in body["error"]["message"]
    assert body["error"]["message"]


def test_a_pods_server_failing_is_said_to_its_owner() -> None:
    body = errors.BadGateway("nothing listens on port 8765 in the pod").to_body("req_3")
    assert body["error"] == {
        "code": "bad_gateway",
        "message": "nothing listens on port 8765 in the pod",
        "request_id": "req_3",
    }


def test_retry_after_and_fields_are_kept() -> None:
    error = errors.RateLimited("slow down", retry_after=1.5, limit=10)
    assert error.retry_after == 1.5
    assert error.fields == {"limit": 10}


def test_config_error_keeps_every_problem() -> None:
    error = errors.ConfigError(["KILN_A is bad.", "KILN_B is bad."])
    assert error.problems == ["KILN_A is bad.", "KILN_B is bad."]
    assert str(error) == "KILN_A is bad.\nKILN_B is bad."


def test_function_errors_show_the_customers_exception() -> None:
    body = errors.FunctionError("ZeroDivisionError: division by zero").to_body("req_3")
    assert body["error"] == {
        "code": "function_error",
        "message": "ZeroDivisionError: division by zero",
        "request_id": "req_3",
    }
