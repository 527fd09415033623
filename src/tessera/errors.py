"""Every error Tessera raises on purpose.

Each message says what was wrong and how to fix it; the CLI prints the message alone, without a
traceback. All of them derive from :class:`TesseraError`, so ``except tessera.TesseraError``
catches exactly the failures Tessera explains.
"""

from __future__ import annotations


class TesseraError(Exception):
    """Base class of every error Tessera raises deliberately."""


class InvalidNameError(TesseraError, ValueError):
    """A project, artifact, alias or file name breaks the naming rules."""


class InvalidPathError(TesseraError, ValueError):
    """A path inside an artifact is absolute, contains `..`, or is otherwise unsafe."""


class NotFoundError(TesseraError, LookupError):
    """A project, run, artifact, version or file does not exist."""


class ConflictError(TesseraError):
    """The request contradicts what the store already holds (e.g. an artifact's type)."""


class MissingBlobsError(ConflictError):
    """A version names blobs the store does not hold (upload them, then commit again)."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


class AuthError(TesseraError, PermissionError):
    """The caller may not do this."""


class NotSignedInError(AuthError):
    """No token, or an unknown or revoked one (HTTP 401)."""


class StoreNotFoundError(TesseraError):
    """No Tessera store at the given folder."""


class StoreFormatError(TesseraError):
    """The store was written by a newer Tessera, or is not a Tessera store at all."""


class StoreCorruptError(TesseraError):
    """The store's files disagree with each other: a missing blob, a bad digest, a broken catalog."""


class DigestMismatchError(StoreCorruptError):
    """Bytes do not hash to the digest they were stored or announced under."""


class BlobTooLargeError(TesseraError):
    """A blob (or an upload request) is larger than the server accepts (HTTP 413)."""


class RunFinishedError(TesseraError):
    """Something was logged to a run that has already finished."""
