"""The node host's wasm runtime: the seam between "speak containerd" (shim/) and "run wasm".

The Task service only ever calls ``load`` (compile or fetch a module) and ``spawn``
(start a nanoprocess); everything wasmtime-specific stays on this side.
"""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path

import wasmtime

from layotto.host.engine import (
    DEFAULT_CACHE_LIMIT,
    DEFAULT_COMPILE_CPU_SECONDS,
    DEFAULT_COMPILE_MEMORY_BYTES,
    DEFAULT_COMPILE_TIMEOUT,
    DEFAULT_COMPILE_WORKERS,
    DEFAULT_MAX_MODULE_BYTES,
    DEFAULT_MEMORY_CACHE_BYTES,
    DEFAULT_MEMORY_CACHE_MODULES,
    CompiledModule,
    WasmEngine,
    module_too_large,
)
from layotto.host.function import HostServices
from layotto.host.nanoprocess import Nanoprocess, ProcessSpec, build_linker

DIGEST_MEMO = 4096  # files remembered by their stat (see NodeRuntime.load)


class NodeRuntime:
    """Compiles modules once and runs each container's module as a nanoprocess."""

    def __init__(
        self,
        state_dir: Path | None,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
        *,
        max_module_bytes: int = DEFAULT_MAX_MODULE_BYTES,
        compile_cpu_seconds: float = DEFAULT_COMPILE_CPU_SECONDS,
        compile_memory_bytes: int = DEFAULT_COMPILE_MEMORY_BYTES,
        compile_timeout: float = DEFAULT_COMPILE_TIMEOUT,
        compile_workers: int = DEFAULT_COMPILE_WORKERS,
        memory_cache_modules: int = DEFAULT_MEMORY_CACHE_MODULES,
        memory_cache_bytes: int = DEFAULT_MEMORY_CACHE_BYTES,
    ) -> None:
        """``cache_limit`` and the keyword arguments: see :class:`WasmEngine`."""
        cache = state_dir / "modules" if state_dir is not None else None
        self.engine = WasmEngine(
            cache,
            cache_limit,
            max_module_bytes=max_module_bytes,
            compile_cpu_seconds=compile_cpu_seconds,
            compile_memory_bytes=compile_memory_bytes,
            compile_timeout=compile_timeout,
            compile_workers=compile_workers,
            memory_cache_modules=memory_cache_modules,
            memory_cache_bytes=memory_cache_bytes,
        )
        self.linker = build_linker(self.engine)
        self._pooled_linker: wasmtime.Linker | None = None
        self.services = HostServices()  # components and invoker, set by the daemon
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

    def spawn(self, compiled: CompiledModule, spec: ProcessSpec) -> Nanoprocess:
        """A nanoprocess ready to ``start()``."""
        return Nanoprocess(self.engine, self.linker, compiled, spec)
