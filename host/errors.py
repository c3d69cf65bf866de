"""Every error the host raises on purpose: one tree under :class:`LayottoError`.

::

    LayottoError                    anything the host reports, naming its cause
    ├── ModuleError                 a container's module cannot run
    │   └── PolicyError             the pod asks for more than the operator's policy allows
    ├── ScopeError (ValueError)     a name that would reach outside the caller's scope
    ├── ComponentError              a component (backend) failed
    │   ├── ComponentConfigError    the components file cannot be read or built
    │   ├── UnknownComponent        no component of that kind has that name
    │   │   └── ComponentDenied     the caller's namespace is not granted that component
    │   ├── ETagMismatch            an etag did not match (optimistic concurrency)
    │   └── NotFound                no such item (secret, ...)
    ├── AbiStatus                   answer a Runtime ABI call with this Status
    └── ApiError                    answer a Runtime API (gRPC) call with this status code

:class:`Status` holds the Runtime ABI's status codes; the codes are written once, in
abi/layotto_abi.yaml. :func:`abi_status` is the one place an exception becomes an ABI
status (``host/grpc_api.py``'s ``grpc_status`` is the one place it becomes a gRPC code).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from layotto.abi import spec as _abi_spec

if TYPE_CHECKING:
    import grpc

_CODES = _abi_spec.load().status


class Status(enum.IntEnum):
    """A Runtime ABI status code (abi/layotto_abi.yaml's ``status`` table)."""

    OK = _CODES["OK"]
    NOT_FOUND = _CODES["NOT_FOUND"]
    BAD_ARGUMENT = _CODES["BAD_ARGUMENT"]
    SERIALIZATION_FAILURE = _CODES["SERIALIZATION_FAILURE"]
    PARSE_FAILURE = _CODES["PARSE_FAILURE"]
    INVALID_MEMORY_ACCESS = _CODES["INVALID_MEMORY_ACCESS"]
    EMPTY = _CODES["EMPTY"]
    CAS_MISMATCH = _CODES["CAS_MISMATCH"]
    INTERNAL_FAILURE = _CODES["INTERNAL_FAILURE"]
    UNIMPLEMENTED = _CODES["UNIMPLEMENTED"]
    PERMISSION_DENIED = _CODES["PERMISSION_DENIED"]
    LIMIT_EXCEEDED = _CODES["LIMIT_EXCEEDED"]


if set(Status.__members__) != set(_CODES):  # a status added to (or removed from) the table
    raise ImportError(
        f"Status and abi/layotto_abi.yaml disagree: {sorted(set(Status.__members__) ^ set(_CODES))}"
    )


class LayottoError(Exception):
    """Base class: a request the host cannot carry out, with its cause in the message."""


# --- modules and policy -------------------------------------------------------------------


class ModuleError(LayottoError):
    """The container's module cannot run: missing, not wasm, or needs what we lack."""


class PolicyError(ModuleError):
    """A pod asks for more than the operator's policy allows (or the policy is malformed)."""


class ScopeError(LayottoError, ValueError):
    """A name (key, topic, secret) that would reach outside the caller's scope."""


# --- components ---------------------------------------------------------------------------


class ComponentError(LayottoError):
    """A backend failure (connection lost, bad configuration, closed component, ...)."""


class ComponentConfigError(ComponentError):
    """The components file is unreadable or describes something we cannot build."""


class UnknownComponent(ComponentError):
    """No component of that kind has that name."""


class ComponentDenied(UnknownComponent):
    """A component the caller's namespace is not granted (the ABI's PERMISSION_DENIED)."""


class ETagMismatch(ComponentError):
    """A write or delete named an etag that is not the stored one (optimistic concurrency)."""


class NotFound(ComponentError):
    """No such item (where an API must tell missing from empty)."""


# --- answers to callers -------------------------------------------------------------------


class AbiStatus(LayottoError):
    """Return this status to the guest (raised from deep inside a host function)."""

    def __init__(self, status: Status | str, why: str = "") -> None:
        status = Status[status] if isinstance(status, str) else Status(status)
        super().__init__(why or status.name)
        self.status = status


class ApiError(LayottoError):
    """Answer the Runtime API call with this gRPC status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# The ABI status each kind of failure answers with, most specific first.
_ABI_STATUS: tuple[tuple[type[BaseException], Status], ...] = (
    (ETagMismatch, Status.CAS_MISMATCH),
    (NotFound, Status.NOT_FOUND),
    (ComponentDenied, Status.PERMISSION_DENIED),
    (UnknownComponent, Status.NOT_FOUND),
    (ScopeError, Status.BAD_ARGUMENT),
    (ComponentError, Status.INTERNAL_FAILURE),
    (OSError, Status.INTERNAL_FAILURE),
)


def abi_status(exc: BaseException) -> Status | None:
    """The Runtime ABI status ``exc`` answers the guest with; None for an unexpected
    exception (a bug: the caller logs it and answers INTERNAL_FAILURE)."""
    if isinstance(exc, AbiStatus):
        return exc.status
    for kind, status in _ABI_STATUS:
        if isinstance(exc, kind):
            return status
    return None


def describe_error(exc: BaseException) -> str:
    """The cause of a wasmtime error in one line, with the innermost wasm frame.

    wasmtime formats errors as "error while executing at wasm backtrace: <frames> ...
    Caused by: <cause>"; the cause is what a user needs first.
    """
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Caused by:" in lines:
        cause = "; ".join(lines[lines.index("Caused by:") + 1 :]).removeprefix("wasm trap: ")
        frames = [line for line in lines if line[:1].isdigit() and " - " in line]
        return cause + (f" (in {frames[0].split(' - ', 1)[1]})" if frames else "")
    return "; ".join(lines[:3])
