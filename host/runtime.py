"""The node host's wasm runtime: the seam between "speak containerd" (shim/) and "run wasm".

The Task service only ever calls ``load`` (compile or fetch a module) and ``spawn``
(start a nanoprocess); everything wasmtime-specific stays on this side.
"""

from __future__ import annotations

from pathlib import Path

import wasmtime

from layotto.host.engine import DEFAULT_CACHE_LIMIT, CompiledModule, WasmEngine
from layotto.host.function import HostServices
from layotto.host.nanoprocess import Nanoprocess, ProcessSpec, build_linker


class NodeRuntime:
    """Compiles modules once and runs each container's module as a nanoprocess."""

    def __init__(self, state_dir: Path | None, cache_limit: int = DEFAULT_CACHE_LIMIT) -> None:
        cache = state_dir / "modules" if state_dir is not None else None
        self.engine = WasmEngine(cache, cache_limit)
        self.linker = build_linker(self.engine)
        self._pooled_linker: wasmtime.Linker | None = None
        self.services = HostServices()  # components and invoker, set by the daemon

    def pooled(self) -> tuple[WasmEngine, wasmtime.Linker]:
        """The pooling-allocator engine and its linker (fresh instance per request)."""
        engine = self.engine.pooled()
        if self._pooled_linker is None:
            self._pooled_linker = build_linker(engine)
        return engine, self._pooled_linker

    def load(self, path: Path, *, name: str) -> CompiledModule:
        """Read and compile the module at ``path`` (called ``name`` in error messages)."""
        return self.engine.load(path.read_bytes(), name=name)

    def spawn(self, compiled: CompiledModule, spec: ProcessSpec) -> Nanoprocess:
        """A nanoprocess ready to ``start()``."""
        return Nanoprocess(self.engine, self.linker, compiled, spec)
