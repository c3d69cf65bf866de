"""Compiling modules once: the wasmtime Engine, the WASI linker and the module cache.

Compiled code is cached twice: in memory by the module's sha256, and on disk in the
host's own state directory, keyed by sha256(wasm) + wasmtime version + the engine
settings. The disk cache is written only by this host, in a directory only root can
write; nothing that came from an image is ever deserialized (wasmtime would run it as
native code).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import wasmtime
from wasmtime import _bindings as ffi

from layotto.host.errors import ModuleError

log = logging.getLogger(__name__)

WASM_MAGIC = b"\0asm"
WASI_MODULES = frozenset({"wasi_snapshot_preview1", "wasi_unstable"})
ABI_MODULES = frozenset({"layotto", "env"})  # the Runtime ABI, ours and Layotto's

MAX_WASM_STACK = 512 << 10  # bytes of native stack wasm may use (deeper recursion traps)
ENGINE_SETTINGS = f"epoch_interruption=1;cranelift_opt_level=speed;max_wasm_stack={MAX_WASM_STACK}"
TICK = 0.005  # seconds per epoch tick while the ticker runs
DEFAULT_CACHE_LIMIT = 1 << 30  # bytes of compiled modules kept on disk


class EpochTicker:
    """Advances the engine's epoch every ``interval`` seconds while anyone needs it.

    CPU-limited nanoprocesses need a steady tick (their epoch-deadline callback does the
    accounting), and so do function modules (their calls have budgets and deadlines);
    kills bump the epoch themselves. The thread runs only while someone needs it.
    """

    def __init__(self, engine: wasmtime.Engine, interval: float = TICK) -> None:
        self.engine = engine
        self.interval = interval
        self._users = 0
        self.ticks = 0  # epochs this ticker has added (lets callers skip redundant deadline resets)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        with self._cond:
            self._users += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="epoch-ticker", daemon=True)
                self._thread.start()
            self._cond.notify()

    def release(self) -> None:
        with self._cond:
            self._users -= 1

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._users <= 0:
                    self._cond.wait()
            time.sleep(self.interval)
            self.engine.increment_epoch()
            self.ticks += 1


class ModuleFacts:
    """What the host reads off a compiled module's imports and exports, once per module.

    wasmtime-py builds a Python object per import, export and type on every access; a node
    starting hundreds of containers of one image asks the same questions of one Module each
    time. Also the module's InstancePre per linker (linking resolves every import)."""

    __slots__ = (
        "export_names",
        "export_arity",
        "import_modules",
        "uses_abi",
        "reads_stdin",
        "checked",
        "_pres",
        "_lock",
    )

    def __init__(self, module: wasmtime.Module) -> None:
        self.export_names = frozenset(e.name for e in module.exports)
        self.export_arity = {
            e.name: len(e.type.params) for e in module.exports if isinstance(e.type, wasmtime.FuncType)
        }
        imports = list(module.imports)
        self.import_modules = frozenset(imp.module for imp in imports)
        self.uses_abi = not self.import_modules.isdisjoint(ABI_MODULES)
        self.reads_stdin = any(imp.name == "fd_read" for imp in imports)
        self.checked = False  # check_imports has passed
        self._pres: dict[int, tuple[wasmtime.Linker, wasmtime.InstancePre]] = {}
        self._lock = threading.Lock()

    def instance_pre(self, linker: wasmtime.Linker, module: wasmtime.Module) -> wasmtime.InstancePre:
        """``linker.instantiate_pre(module)``, made once per linker."""
        with self._lock:
            found = self._pres.get(id(linker))
            if found is not None and found[0] is linker:
                return found[1]
        pre = linker.instantiate_pre(module)
        with self._lock:
            self._pres[id(linker)] = (linker, pre)  # holds the linker: its id stays its own
        return pre


_facts: weakref.WeakKeyDictionary[wasmtime.Module, ModuleFacts] = weakref.WeakKeyDictionary()
_facts_lock = threading.Lock()


def module_facts(module: wasmtime.Module) -> ModuleFacts:
    """The :class:`ModuleFacts` of ``module`` (computed on first use, kept while it lives)."""
    with _facts_lock:
        facts = _facts.get(module)
    if facts is None:
        facts = ModuleFacts(module)
        with _facts_lock:
            facts = _facts.setdefault(module, facts)
    return facts


@dataclass(frozen=True)
class CompiledModule:
    """A module compiled for this host's engine."""

    digest: str
    module: wasmtime.Module
    exports: frozenset[str]
    from_cache: str  # "memory", "disk" or "compiled"
    reads_stdin: bool = True  # imports fd_read: give it the container's stdin


@dataclass(frozen=True)
class PoolSettings:
    """wasmtime's pooling allocator: instance slots reserved up front, reused without mmap.

    Creating and dropping a Store then costs a few microseconds instead of tens; the
    host uses it for functions that want a fresh instance per request.
    """

    instances: int = 1000
    max_memory_size: int = 256 << 20
    keep_resident: int = 1 << 20
    decommit_batch: int = 64


def _config(pooling: PoolSettings | None) -> wasmtime.Config:
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.cranelift_opt_level = "speed"
    config.max_wasm_stack = MAX_WASM_STACK
    if pooling is not None:
        pool = ffi.wasmtime_pooling_allocation_config_new()
        ffi.wasmtime_pooling_allocation_config_total_core_instances_set(pool, pooling.instances)
        ffi.wasmtime_pooling_allocation_config_total_memories_set(pool, pooling.instances)
        ffi.wasmtime_pooling_allocation_config_total_tables_set(pool, pooling.instances)
        ffi.wasmtime_pooling_allocation_config_max_memory_size_set(pool, pooling.max_memory_size)
        ffi.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(pool, pooling.keep_resident)
        # Give memory back to the kernel in batches rather than one madvise per instance.
        ffi.wasmtime_pooling_allocation_config_decommit_batch_size_set(pool, pooling.decommit_batch)
        ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
        ffi.wasmtime_pooling_allocation_config_delete(pool)
    return config


class WasmEngine:
    """One wasmtime Engine for the whole node host (plus a pooled sibling, on demand)."""

    def __init__(
        self,
        cache_dir: Path | None,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
        *,
        pooling: PoolSettings | None = None,
    ) -> None:
        self.pooling = pooling
        self.engine = wasmtime.Engine(_config(pooling))
        self._pooled: WasmEngine | None = None
        self._pooled_modules: dict[str, CompiledModule] = {}
        self.ticker = EpochTicker(self.engine)
        self.cache_dir = cache_dir
        self.cache_limit = cache_limit
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(cache_dir, 0o700)
        self._fingerprint = hashlib.sha256(
            f"wasmtime-py {package_version('wasmtime')};{ENGINE_SETTINGS}".encode()
        ).hexdigest()[:16]
        self._modules: dict[str, wasmtime.Module] = {}
        self._lock = threading.Lock()
        self.stats = {"memory_hits": 0, "disk_hits": 0, "compiles": 0}

    def pooled(self) -> WasmEngine:
        """The sibling engine with the pooling allocator (created on first use)."""
        with self._lock:
            if self._pooled is None:
                self._pooled = WasmEngine(None, pooling=PoolSettings())
            return self._pooled

    def to_pooled(self, compiled: CompiledModule) -> CompiledModule:
        """``compiled`` for the pooled engine: our own serialized code, never an image's."""
        pooled = self.pooled()
        with self._lock:
            found = self._pooled_modules.get(compiled.digest)
        if found is None:
            module = wasmtime.Module.deserialize(pooled.engine, compiled.module.serialize())
            found = CompiledModule(compiled.digest, module, compiled.exports, "memory", compiled.reads_stdin)
            with self._lock:
                self._pooled_modules.setdefault(compiled.digest, found)
        return found

    def _cache_path(self, digest: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{digest}-{self._fingerprint}.cwasm"

    def loaded(self, digest: str) -> CompiledModule | None:
        """The module with this sha256, when it is compiled in memory already (else None)."""
        with self._lock:
            module = self._modules.get(digest)
        if module is None:
            return None
        facts = module_facts(module)
        if not facts.checked:
            return None  # let load() check its imports (and report them)
        self.stats["memory_hits"] += 1
        return CompiledModule(digest, module, facts.export_names, "memory", facts.reads_stdin)

    def load(self, wasm: bytes, *, name: str) -> CompiledModule:
        """Validate and compile ``wasm`` (named ``name`` in errors), using the caches."""
        if wasm[:4] != WASM_MAGIC:
            raise ModuleError(f"{name} is not a WebAssembly module (it does not start with \\0asm)")
        digest = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            module = self._modules.get(digest)
        source = "memory"
        if module is None:
            module, source = self._load_uncached(wasm, digest, name)
            with self._lock:
                self._modules.setdefault(digest, module)
        self.stats[{"memory": "memory_hits", "disk": "disk_hits", "compiled": "compiles"}[source]] += 1
        facts = module_facts(module)
        if not facts.checked:
            self.check_imports(module, name)
            facts.checked = True
        return CompiledModule(digest, module, facts.export_names, source, facts.reads_stdin)

    def _load_uncached(self, wasm: bytes, digest: str, name: str) -> tuple[wasmtime.Module, str]:
        path = self._cache_path(digest)
        if path is not None and path.exists():
            try:
                module = wasmtime.Module.deserialize_file(self.engine, str(path))
                os.utime(path)  # recently used: last to be evicted
                return module, "disk"
            except wasmtime.WasmtimeError as exc:
                log.warning("dropping unusable cache entry %s: %s", path, exc)
                path.unlink(missing_ok=True)
        try:
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise ModuleError(f"{name} is not a valid WebAssembly module: {_first_line(exc)}") from exc
        if path is not None:
            try:
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
                with os.fdopen(fd, "wb") as out:
                    out.write(module.serialize())
                os.replace(tmp, path)
                self.evict()
            except OSError as exc:
                log.warning("cannot write module cache %s: %s", path, exc)
        return module, "compiled"

    def evict(self) -> int:
        """Drop the least recently used compiled modules until the cache fits its limit."""
        if self.cache_dir is None:
            return 0
        entries = []
        for entry in os.scandir(self.cache_dir):
            if entry.name.endswith(".cwasm"):
                st = entry.stat()
                entries.append((st.st_mtime, st.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        removed = 0
        for _mtime, size, path in sorted(entries):
            if total <= self.cache_limit:
                break
            try:
                os.unlink(path)  # a loaded module keeps its own mapping: safe to unlink
            except FileNotFoundError:
                continue
            total -= size
            removed += 1
        if removed:
            self.stats["evictions"] = self.stats.get("evictions", 0) + removed
            log.info("module cache: evicted %d least recently used entries", removed)
        return removed

    @staticmethod
    def check_imports(module: wasmtime.Module, name: str) -> None:
        """Refuse modules importing anything the host does not provide."""
        from layotto.host.abi_host import is_known_import

        missing = [
            f"{imp.module}.{imp.name}"
            for imp in module.imports
            if imp.module not in WASI_MODULES and not is_known_import(imp.module, imp.name)
        ]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ModuleError(
                f"{name} imports {shown}, which the layotto host does not provide "
                "(available: WASI preview 1 and the Runtime ABI, see abi/ABI.md)"
            )


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
