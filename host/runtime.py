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

from layotto.host.engine import DEFAULT_CACHE_LIMIT, CompiledModule, WasmEngine
from layotto.host.function import HostServices
from layotto.host.nanoprocess import Nanoprocess, ProcessSpec, build_linker

DIGEST_MEMO = 4096  # files remembered by their stat (see NodeRuntime.load)


class NodeRuntime:
    """Compiles modules once and runs each container's module as a nanoprocess."""

    def __init__(self, state_dir: Path | None, cache_limit: int = DEFAULT_CACHE_LIMIT) -> None:
        cache = state_dir / "modules" if state_dir is not None else None
        self.engine = WasmEngine(cache, cache_limit)
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
        file), is not read and hashed again; its digest finds the compiled module."""
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with self._digests_lock:
                digest = self._digests.get(key)
            if digest is not None:
                found = self.engine.loaded(digest)
                if found is not None:
                    return found
            data = f.read()
        compiled = self.engine.load(data, name=name)
        with self._digests_lock:
            self._digests[key] = compiled.digest
            if len(self._digests) > DIGEST_MEMO:
                self._digests.popitem(last=False)  # the oldest
        return compiled

    def spawn(self, compiled: CompiledModule, spec: ProcessSpec) -> Nanoprocess:
        """A nanoprocess ready to ``start()``."""
        return Nanoprocess(self.engine, self.linker, compiled, spec)
