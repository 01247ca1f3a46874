"""Errors of a KV transfer.

Every failure is a `TransferError`; each subclass also derives from the matching
`pdserve.errors` class, so callers may catch `TransferError` (any transfer failure) or e.g.
`pdserve.errors.Cancelled`, and `err.code` / `err.to_info()` give the status either way:

| code                | when                                                              |
|---------------------|-------------------------------------------------------------------|
| FAILED_PRECONDITION | layouts differ (message names the field), num_tokens differs from |
|                     | the reservation, a chunk cannot fit a message, already in progress |
| NOT_FOUND           | the receiver expects no transfer with that id                     |
| DATA_LOSS           | checksum, size, order, count or coverage violation; no commit     |
| DEADLINE_EXCEEDED   | the transfer did not finish within its timeout                    |
| CANCELLED           | the sender's cancel event was set, or the receiver cancelled       |
| UNAVAILABLE         | the peer cannot be reached or was stopped                          |
| RESOURCE_EXHAUSTED  | a message exceeded the peer's size limit                          |
| UNAUTHENTICATED     | the sender lacks the internal KV peer token                        |
| INTERNAL            | a bug or an unexpected exception (e.g. a source or sink raised)    |
"""

from __future__ import annotations

from pdserve.errors import (
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    NotFound,
    PdserveError,
    ResourceExhausted,
    StatusCode,
    Unauthenticated,
    Unavailable,
)


class TransferError(PdserveError):
    """Base of every KV transfer failure; its subclass (and `code`) says which."""


class TransferFailedPrecondition(TransferError, FailedPrecondition):
    pass


class TransferNotFound(TransferError, NotFound):
    pass


class TransferDataLoss(TransferError, DataLoss):
    pass


class TransferDeadlineExceeded(TransferError, DeadlineExceeded):
    pass


class TransferCancelled(TransferError, Cancelled):
    pass


class TransferUnavailable(TransferError, Unavailable):
    pass


class TransferResourceExhausted(TransferError, ResourceExhausted):
    pass


class TransferUnauthenticated(TransferError, Unauthenticated):
    pass


class TransferInternal(TransferError, Internal):
    pass


_CLASS_BY_CODE: dict[StatusCode, type[TransferError]] = {
    cls.code: cls
    for cls in (
        TransferFailedPrecondition,
        TransferNotFound,
        TransferDataLoss,
        TransferDeadlineExceeded,
        TransferCancelled,
        TransferUnavailable,
        TransferResourceExhausted,
        TransferUnauthenticated,
        TransferInternal,
    )
}


def transfer_error(code: StatusCode, message: str) -> TransferError:
    """The TransferError subclass for `code` (INTERNAL for codes a transfer never produces)."""
    return _CLASS_BY_CODE.get(code, TransferInternal)(message)


def as_transfer_error(exc: BaseException, context: str) -> TransferError:
    """Wraps any exception raised by a collaborator (source, sink) as a TransferError.

    A PdserveError keeps its code; anything else becomes INTERNAL. `context` says what failed.
    """
    if isinstance(exc, TransferError):
        return exc
    if isinstance(exc, PdserveError):
        return transfer_error(exc.code, f"{context}: {exc.message}")
    return TransferInternal(f"{context}: {type(exc).__name__}: {exc}")
