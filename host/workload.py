"""The seam between containerd's Task service (shim/) and the node host's engine (host/).

The Task service reads a container's bundle into a :class:`ContainerSpec`, asks a
:class:`WorkloadHost` (the node runtime) for one :class:`Workload` per container and drives
it through containerd's state machine: ``start``, ``kill``, ``stats``, ``close``. What runs
behind a workload (a pod sandbox placeholder, a command module in a nanoprocess, a function
module served by the ingress) is the host's business; the Task service sees only this module.
Failures are the typed exceptions below, which the Task service maps to ttrpc codes.

This module imports nothing of the engine, so the shim can import it cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from layotto.host.compiler import DEFAULT_MAX_MODULE_BYTES
from layotto.host.rootpath import DirMount

__all__ = [
    "CRI_CONTAINER_NAME",
    "CRI_IMAGE_NAME",
    "CRI_SANDBOX_ID",
    "CRI_SANDBOX_NAME",
    "CRI_SANDBOX_NAMESPACE",
    "MAX_MODULE_BYTES",
    "ContainerSpec",
    "DirMount",
    "ExitCallback",
    "ExitStatus",
    "InvalidSpec",
    "Module",
    "ModuleSource",
    "StartFailed",
    "Workload",
    "WorkloadError",
    "WorkloadHost",
    "WorkloadStats",
]

MAX_MODULE_BYTES = DEFAULT_MAX_MODULE_BYTES  # the largest module read from any source

# The annotations CRI (containerd's Kubernetes plugin) puts on a pod's containers.
CRI_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
CRI_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CRI_CONTAINER_NAME = "io.kubernetes.cri.container-name"
CRI_IMAGE_NAME = "io.kubernetes.cri.image-name"


class WorkloadError(Exception):
    """Base class: the host cannot create or run a container's workload."""


class InvalidSpec(WorkloadError):
    """The container cannot be created as asked: a policy refusal, a bad annotation, a
    module that is missing, not wasm, too large, or lacks its entry point."""


class StartFailed(WorkloadError):
    """The workload could not start (instantiation, filesystem, a function id taken by
    another namespace). It has ended: :attr:`exit` says how."""

    def __init__(self, message: str, exit: ExitStatus) -> None:
        super().__init__(message)
        self.exit = exit


@dataclass(frozen=True)
class ExitStatus:
    """How a workload ended: its status (128+N for signal N), when, and why."""

    status: int
    exited_at: float
    reason: str = ""
    oom: bool = False


ExitCallback = Callable[[ExitStatus], None]


@dataclass(frozen=True)
class WorkloadStats:
    """A workload's resource use, as containerd's cgroup metrics report it."""

    memory_bytes: int = 0  # linear memory in use
    cpu_seconds: float = 0.0
    periods: int = 0  # CPU quota periods elapsed, and those throttled
    throttled_periods: int = 0
    throttled_seconds: float = 0.0


@dataclass(frozen=True)
class ModuleSource:
    """Where the Task service found a container's module: a file on the host (``path``) or
    its bytes (``data``, from a wasm layer in containerd's content store)."""

    name: str  # how errors name it: its path in the image, or the image and layer
    location: str  # its path in the image (argv[0] for a command), or the image's name
    entry: str = "_start"  # the export to run
    path: Path | None = None
    data: bytes | None = None


class Module(Protocol):
    """A compiled module, as the Task service sees it."""

    @property
    def source(self) -> ModuleSource: ...

    @property
    def function(self) -> bool:
        """True when the host serves it as a function (it needs no filesystem)."""
        ...

    @property
    def from_cache(self) -> str:
        """Where its compiled code came from (for the log)."""
        ...


@dataclass(frozen=True)
class ContainerSpec:
    """What the Task service read from a container's bundle and Create request."""

    id: str
    namespace: str  # the containerd namespace
    annotations: Mapping[str, str]
    args: list[str]
    env: list[str]
    cwd: str = "/"
    rootfs: Path = Path("/nonexistent")
    readonly: bool = False  # root.readonly
    mounts: tuple[DirMount, ...] = ()  # host directories bind-mounted into the container
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    memory_limit: int | None = None
    cpu_quota_us: int | None = None
    cpu_period_us: int = 100_000
    cpu_shares: int | None = None  # requests.cpu as CFS shares (1024 = one CPU); None: 1024
    sandbox: bool = False  # a pod's sandbox container: a placeholder that runs until killed
    module: Module | None = None  # the module found in the bundle (None for a sandbox)
    netns: str = ""  # the network namespace the spec names (a pod sandbox's is CNI's)

    @property
    def tenant(self) -> str:
        """The namespace the container belongs to: its pod's Kubernetes namespace (CRI
        names it), else its containerd namespace."""
        return self.annotations.get(CRI_SANDBOX_NAMESPACE) or self.namespace

    @property
    def pod(self) -> str:
        """The pod's name (CRI), or ""."""
        return self.annotations.get(CRI_SANDBOX_NAME, "")

    @property
    def sandbox_id(self) -> str:
        """The id of the container's pod sandbox (CRI; a sandbox's own id), or ""."""
        return self.annotations.get(CRI_SANDBOX_ID, "")

    @property
    def container(self) -> str:
        """The container's name in its pod (CRI), or ""."""
        return self.annotations.get(CRI_CONTAINER_NAME, "")


class Workload(Protocol):
    """One container's work on the node host.

    Exits are reported once: by :meth:`kill` when the workload ended right there, by
    :class:`StartFailed` when it could not start, else through the ``on_exit`` callback
    given to :meth:`start` (called from any thread)."""

    @property
    def kind(self) -> str:
        """``"sandbox"``, ``"command"`` or ``"function"``."""
        ...

    async def start(self, on_exit: ExitCallback) -> None:
        """Run it; raises :class:`StartFailed` (the workload has then ended)."""
        ...

    def kill(self, signal: int) -> ExitStatus | None:
        """Stop it with ``signal``: its exit when it ended at once, else None (the exit
        follows through ``on_exit``)."""
        ...

    def stats(self) -> WorkloadStats:
        """Its resource use now."""
        ...

    def describe(self) -> dict[str, object]:
        """What ``layotto ps`` shows of it: kind, module, memory, CPU, and for a function
        its id, calls, errors, instances and mode."""
        ...

    def log_lines(self) -> list[str]:
        """Its recent output lines (``layotto logs``)."""
        ...

    def close(self) -> None:
        """Stop it without reporting an exit and release what it holds (idempotent)."""
        ...


class WorkloadHost(Protocol):
    """What the Task service needs of the node host (``layotto.host.runtime.NodeRuntime``)."""

    @property
    def max_module_bytes(self) -> int:
        """The largest module the host accepts."""
        ...

    def check(self, spec: ContainerSpec) -> None:
        """Check the container against the operator's policy before anything is mounted or
        compiled; raises :class:`InvalidSpec`. (``create`` checks it again.)"""
        ...

    def load_module(self, source: ModuleSource) -> Module:
        """Compile (or find compiled) the module; raises :class:`InvalidSpec`. Blocking."""
        ...

    def create(self, spec: ContainerSpec) -> Workload:
        """The workload for a container (not started); raises :class:`InvalidSpec`."""
        ...
