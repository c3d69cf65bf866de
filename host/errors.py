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
