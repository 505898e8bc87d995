"""Errors raised by the client SDK, on top of the protocol's tree.

::

    TetherError (protocol.errors)
    ├── StorageError
    │   └── LocalStoreError      the local SQLite file is corrupt, foreign, locked or failing
    ├── UsageError
    │   └── ClientClosed         the client was used before ``start()`` or after ``close()``
    └── SyncStopped              syncing stopped for good (bad token, forbidden, version);
                                 ``cause`` holds the server's error

Every error keeps its wire ``code`` so an application can switch on it, and the
library exception it came from is chained with ``raise ... from``.
"""

from __future__ import annotations

from protocol.errors import ErrorCode, StorageError, TetherError, UsageError

__all__ = ["ClientClosed", "LocalStoreError", "SyncStopped"]


class LocalStoreError(StorageError):
    """The local SQLite file cannot be used (corrupt, foreign, locked or failing).

    Args:
        message: what went wrong and which file.
        retryable: True for transient failures (disk full, busy), False for a file
            that will never work (corrupt, foreign, newer schema).
    """

    def __init__(self, message: str | None = None, *, retryable: bool = False) -> None:
        super().__init__(message)
        self._retryable = retryable

    @property
    def retryable(self) -> bool:
        """Whether the same operation may succeed later."""
        return self._retryable


class ClientClosed(UsageError):
    """The client is not started, or already closed."""


class SyncStopped(TetherError):
    """Syncing stopped for good; the queued mutations stay in the local file.

    Args:
        cause: the error that stopped it (e.g. ``Unauthorized`` for a bad token).
    """

    def __init__(self, cause: TetherError) -> None:
        super().__init__(f"sync stopped: {cause.message} ({cause.code})")
        self.cause = cause

    @property
    def code(self) -> ErrorCode:  # type: ignore[override]
        """The code of the error that stopped syncing."""
        return self.cause.code
