"""One error tree for every layer.

Each error carries a category; the CLI maps it to an exit code, the API to an HTTP
status and the NBD server to a protocol errno (the errno table lives in virtua.nbd).
"""

from __future__ import annotations

import errno


class VirtuaError(Exception):
    """Root of every error virtua reports to a user."""

    exit_code = 1
    http_status = 500
    errno = errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"error": type(self).__name__, "message": self.message}


class InvalidArgument(VirtuaError):
    """Bad name, bad size, out-of-range offset: the request itself is wrong."""

    exit_code = 2
    http_status = 400
    errno = errno.EINVAL


class NotFound(VirtuaError):
    exit_code = 3
    http_status = 404
    errno = errno.ENOENT


class AlreadyExists(VirtuaError):
    exit_code = 4
    http_status = 409
    errno = errno.EEXIST


class DependencyError(VirtuaError):
    """Something else depends on the object (snapshots, clones, running VMs)."""

    exit_code = 5
    http_status = 409
    errno = errno.EBUSY


class NoSpace(VirtuaError):
    exit_code = 6
    http_status = 507
    errno = errno.ENOSPC


class ReadOnly(VirtuaError):
    exit_code = 7
    http_status = 403
    errno = errno.EPERM


class Busy(VirtuaError):
    """Another process or operation holds what this one needs."""

    exit_code = 8
    http_status = 423
    errno = errno.EBUSY


class StoreConflict(Busy):
    """A cluster-state transaction read keys that another writer changed before it could
    commit (etcd's compare-and-swap): nothing of it was written; retrying is the caller's choice."""


class PlacementError(VirtuaError):
    exit_code = 9
    http_status = 409
    errno = errno.ENOSPC


class Unavailable(VirtuaError):
    """A host, daemon or external tool is missing or unreachable."""

    exit_code = 10
    http_status = 503
    errno = errno.EIO


class OutcomeUnknown(Unavailable):
    """A write was sent but its answer was lost, and the store stayed unreachable while
    its outcome was checked: it may or may not have been applied. Nothing that depends on
    it may be undone until the store says which (the next write, or job recovery, settles it)."""

    def __init__(self, message: str, txn: str | None = None) -> None:
        super().__init__(message)
        self.txn = txn  # the store's id of the write (EtcdStateStore.settle)


class Unauthenticated(VirtuaError):
    """No valid credential: no client certificate, or a bad, expired or used join token."""

    exit_code = 11
    http_status = 401
    errno = errno.EACCES


class Forbidden(VirtuaError):
    """A valid credential that may not do this (a host running an admin operation, a
    revoked certificate)."""

    exit_code = 12
    http_status = 403
    errno = errno.EPERM


class PermissionDenied(Forbidden):
    """The caller may not do this (not an administrator, or a path it may not name)."""

    errno = errno.EACCES


class Cancelled(VirtuaError):
    """An operation stopped at an administrator's request (`virtua job cancel`); what it
    had done is undone."""

    exit_code = 13
    http_status = 409
    errno = errno.ECANCELED


ERROR_TYPES: dict[str, type[VirtuaError]] = {
    cls.__name__: cls
    for cls in (
        VirtuaError,
        InvalidArgument,
        NotFound,
        AlreadyExists,
        DependencyError,
        NoSpace,
        ReadOnly,
        PermissionDenied,
        Busy,
        StoreConflict,
        PlacementError,
        Unavailable,
        OutcomeUnknown,
        Unauthenticated,
        Forbidden,
        Cancelled,
    )
}


def from_dict(d: dict[str, str]) -> VirtuaError:
    cls = ERROR_TYPES.get(d.get("error", ""), VirtuaError)
    return cls(d.get("message", "unknown error"))
