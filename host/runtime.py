"""The node host's wasm runtime: compiles modules once and makes each container's workload.

:class:`NodeRuntime` owns the engine and its linkers, and is the :class:`WorkloadHost` the
Task service talks to through :mod:`layotto.host.workload` (``check``, ``load_module``,
``create``); the workloads themselves are in :mod:`layotto.host.workloads`. What it needs of
the rest of the node (components, invoker, function registry, policy) comes in a
:class:`HostContext` the composition root (:mod:`layotto.host.daemon`) builds.
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime

from layotto.host import workloads
from layotto.host.engine import (
    DEFAULT_CACHE_LIMIT,
    CompiledModule,
    WasmEngine,
    module_too_large,
)
from layotto.host.fiber_runner import FiberRunner
from layotto.host.function_registry import FunctionRegistry
from layotto.host.nanoprocess import Nanoprocess, ProcessSpec, Runner, build_linker, fits_a_fiber
from layotto.host.policy import DEFAULT_POLICY, Policy
from layotto.host.scheduler import default_scheduler
from layotto.host.thread_runner import ThreadRunner
from layotto.host.workload import ContainerSpec, Module, ModuleSource, Workload

DIGEST_MEMO = 4096  # files remembered by their stat (see NodeRuntime.load)


@dataclass(frozen=True)
class HostContext:
    """What the node's workloads use besides the engine."""

    components: Any = None  # the node's components (layotto.host.components.registry.Components)
    invoker: Any = None  # how a function invokes another app (layotto.host.abi_host.HostInvoker)
    functions: FunctionRegistry | None = None  # the ingress's functions; None: no ingress
    policy: Policy = DEFAULT_POLICY  # the operator's policy, for admission
    pods: Any = None  # the pods' own listeners (layotto.host.podnet.PodNetworks); None: none


class NodeRuntime:
    """Compiles modules once and runs each container's module as a nanoprocess."""

    def __init__(
        self,
        state_dir: Path | None,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
        *,
        context: HostContext | None = None,
        fibers: bool = True,
        **engine_options: Any,
    ) -> None:
        """``cache_limit`` and ``engine_options`` (module size cap, compile limits, memory
        cache sizes): see :class:`WasmEngine`;
        ``context``: the rest of the node (none: no components, no ingress, the default policy);
        ``fibers``: run the command modules that fit a fiber as fibers (else each on a thread)."""
        cache = state_dir / "modules" if state_dir is not None else None
        self.engine = WasmEngine(cache, cache_limit, **engine_options)
        # The two ways of running a command module; functions share the threads' linker.
        self.threads = ThreadRunner(self.engine)
        self.scheduler = default_scheduler()  # function calls on every core (host/scheduler.py)
        self.fibers = FiberRunner(self.engine) if fibers else None
        self.linker = self.threads.linker
        self._pooled_linker: wasmtime.Linker | None = None
        self.context = context if context is not None else HostContext()
        self._digests: collections.OrderedDict[tuple[int, ...], str] = collections.OrderedDict()
        self._digests_lock = threading.Lock()

    def pooled(self) -> tuple[WasmEngine, wasmtime.Linker]:
        """The pooling-allocator engine and its linker (fresh instance per request)."""
        engine = self.engine.pooled()
        if self._pooled_linker is None:
            self._pooled_linker = build_linker(engine)
        return engine, self._pooled_linker

    def load(self, path: Path, *, name: str) -> CompiledModule:
        """Read and compile the module at ``path`` (called ``name`` in error messages).

        The containers of one image read one file (a layer of its snapshot): a file already
        read, unchanged since (same device, inode, size, mtime and ctime, taken from the open
        file), is not read and hashed again; its digest finds the compiled module. A file
        larger than the engine's ``max_module_bytes`` is refused without reading it whole."""
        limit = self.engine.max_module_bytes
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size > limit:
                raise module_too_large(name, st.st_size, limit)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with self._digests_lock:
                digest = self._digests.get(key)
            if digest is not None:
                found = self.engine.loaded(digest)
                if found is not None:
                    return found
            data = f.read(limit + 1)  # the file may have grown since fstat (or not be a regular file)
        if len(data) > limit:
            raise module_too_large(name, len(data), limit, at_least=True)
        compiled = self.engine.load(data, name=name)
        with self._digests_lock:
            self._digests[key] = compiled.digest
            if len(self._digests) > DIGEST_MEMO:
                self._digests.popitem(last=False)  # the oldest
        return compiled

    def runner_for(self, compiled: CompiledModule, spec: ProcessSpec, *, fiber: bool | None = None) -> Runner:
        """The runner for a module: a fiber when it fits one and the node runs fibers
        (``fiber``: force the choice, for tests)."""
        if fiber is None:
            fiber = self.fibers is not None and fits_a_fiber(compiled, spec)
        if fiber:
            if self.fibers is None:
                self.fibers = FiberRunner(self.engine)
            return self.fibers
        return self.threads

    def spawn(self, compiled: CompiledModule, spec: ProcessSpec, *, fiber: bool | None = None) -> Nanoprocess:
        """A nanoprocess ready to ``start()`` (on :meth:`runner_for` its module)."""
        return Nanoprocess(self.runner_for(compiled, spec, fiber=fiber), compiled, spec)

    # --- the seam (layotto.host.workload.WorkloadHost) ----------------------------------

    @property
    def max_module_bytes(self) -> int:
        """The largest module the engine accepts."""
        return self.engine.max_module_bytes

    def check(self, spec: ContainerSpec) -> None:
        """Admission of ``spec`` against the policy; raises InvalidSpec."""
        workloads.admit(spec, self)

    def load_module(self, source: ModuleSource) -> Module:
        """The compiled module at ``source``, its entry checked; raises InvalidSpec."""
        return workloads.load_module(self, source)

    def create(self, spec: ContainerSpec) -> Workload:
        """The workload for ``spec``, not started; raises InvalidSpec."""
        return workloads.create(self, spec)

    def function_logs(self, name: str) -> list[str] | None:
        """The recent output of the function ``name`` (an id, or ``<namespace>/<id>``)."""
        return workloads.function_logs(self, name)
