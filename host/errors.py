"""Errors the host reports to containerd, each naming its cause."""

from __future__ import annotations


class HostError(Exception):
    """Base class: a request the host cannot carry out."""


class ModuleError(HostError):
    """The container's module cannot run: missing, not wasm, or needs what we lack."""


class NotFound(HostError):
    """No such task or process."""


class InvalidState(HostError):
    """The task is not in a state that allows the request."""


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
