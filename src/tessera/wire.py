"""The JSON shapes of catalog records on the HTTP API, shared by server and client.

Errors travel as ``{"error": "<TesseraError subclass>", "message": ..., "missing": [...]}``
and the client raises the same class, so code behaves the same against either backend.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from tessera import errors
from tessera.store.catalog import (
    ArtifactRecord,
    ProjectRecord,
    RunRecord,
    SampleMatch,
    TableRow,
    TokenRecord,
    VersionRecord,
)

R = TypeVar("R")
API = "/api/v1"

RECORDS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        ArtifactRecord,
        ProjectRecord,
        RunRecord,
        SampleMatch,
        TableRow,
        TokenRecord,
        VersionRecord,
    )
}


def dump(record: Any) -> Any:
    if record is None:
        return None
    if dataclasses.is_dataclass(record):
        return dataclasses.asdict(record)  # type: ignore[arg-type]
    if isinstance(record, list | tuple):
        return [dump(r) for r in record]
    return record


def load(cls: type[R], data: dict[str, Any] | None) -> R:
    if data is None:
        return None  # type: ignore[return-value]
    values = dict(data)
    if cls is VersionRecord:
        values["aliases"] = tuple(values.get("aliases", ()))
    return cls(**values)


# Which exception class each HTTP status maps to when the body names no known class.
STATUS_FOR: dict[type[Exception], int] = {
    errors.NotSignedInError: 401,
    errors.BlobTooLargeError: 413,
    errors.MissingBlobsError: 409,
    errors.ConflictError: 409,
    errors.NotFoundError: 404,
    errors.AuthError: 403,
    errors.DigestMismatchError: 400,
    errors.InvalidNameError: 400,
    errors.InvalidPathError: 400,
    errors.RunFinishedError: 409,
    errors.StoreCorruptError: 500,
    errors.StoreFormatError: 500,
}


def status_of(exc: Exception) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR:
            return STATUS_FOR[cls]
    return 400


def error_body(exc: Exception) -> dict[str, Any]:
    body: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, errors.MissingBlobsError):
        body["missing"] = exc.missing
    return body


def raise_error(status: int, body: Any) -> None:
    """Raise the exception an error response describes."""
    if not isinstance(body, dict):
        body = {"message": str(body)}
    message = body.get("message") or body.get("detail") or f"server answered {status}"
    if not isinstance(message, str):
        message = str(message)
    name = body.get("error")
    if name == "MissingBlobsError":
        raise errors.MissingBlobsError(message, list(body.get("missing", [])))
    cls = getattr(errors, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, errors.TesseraError):
        raise cls(message)
    if status == 401:
        raise errors.NotSignedInError(message)
    if status == 403:
        raise errors.AuthError(message)
    if status == 404:
        raise errors.NotFoundError(message)
    if status == 413:
        raise errors.BlobTooLargeError(f"the server refused the upload as too large: {message}")
    raise errors.TesseraError(f"server error {status}: {message}")
