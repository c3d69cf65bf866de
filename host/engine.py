"""Compiling modules once: the wasmtime Engine, the WASI linker and the module cache.

Compiled code is cached twice: in memory by the module's sha256 (least recently used
modules dropped beyond a count and a size), and on disk in the host's own state
directory, keyed by sha256(wasm) + wasmtime version + the engine settings. The disk cache
is written only by this host, in a directory only root can write; nothing that came from
an image is ever deserialized (wasmtime would run it as native code).

Uncached modules are compiled in a child process bounded in CPU time, address space and
wall time (host/compiler.py, run by :class:`ChildCompiler` from host/child_compiler.py): a
module built to be costly to compile costs its own child, not the host serving every tenant.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import wasmtime

from layotto.host import capi
from layotto.host.child_compiler import (
    DEFAULT_COMPILE_CPU_SECONDS,
    DEFAULT_COMPILE_MEMORY_BYTES,
    DEFAULT_COMPILE_TIMEOUT,
    DEFAULT_COMPILE_WORKERS,
    ChildCompiler,
    CompileFailure,
    CompileReport,
    innermost_cause,
    mib,
)
from layotto.host.compiler import (
    DEFAULT_MAX_MODULE_BYTES,
    ENGINE_SETTINGS,
    apply_engine_settings,
)
from layotto.host.errors import ModuleError

log = logging.getLogger(__name__)

WASM_MAGIC = b"\0asm"
WASI_MODULES = frozenset({"wasi_snapshot_preview1", "wasi_unstable"})
ABI_MODULES = frozenset({"layotto", "env"})  # the Runtime ABI, ours and Layotto's

TICK = 0.005  # seconds per epoch tick while the ticker runs
DEFAULT_CACHE_LIMIT = 1 << 30  # bytes of compiled modules kept on disk
DEFAULT_MEMORY_CACHE_MODULES = 256  # compiled modules kept in memory ...
DEFAULT_MEMORY_CACHE_BYTES = 1 << 30  # ... and their total serialized size
FAILURE_MEMO = 1024  # modules remembered as refused (invalid or over a limit)


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
    """The engine config: the settings every compiling child uses too (compiler.py)."""
    config = wasmtime.Config()
    apply_engine_settings(capi.DLL, capi.config_address(config))
    if pooling is not None:
        # The allocation strategy is no compile setting: code compiled for the plain engine
        # deserializes into the pooled one (WasmEngine.to_pooled). Memory goes back to the
        # kernel in batches rather than one madvise per instance.
        capi.set_pooling_allocation(
            config,
            instances=pooling.instances,
            max_memory_size=pooling.max_memory_size,
            keep_resident=pooling.keep_resident,
            decommit_batch=pooling.decommit_batch,
        )
    return config


def module_too_large(name: str, size: int, limit: int, *, at_least: bool = False) -> ModuleError:
    """The error for a module of ``size`` bytes (``at_least``: or more) over ``limit``."""
    more = "more than " if at_least else ""
    return ModuleError(
        f"{name} is {more}{size} bytes ({more}{mib(size)}), larger than the host's module size "
        f"limit of {limit} bytes ({mib(limit)})"
    )


class WasmEngine:
    """One wasmtime Engine for the whole node host (plus a pooled sibling, on demand).

    ``max_module_bytes``: the largest module ``load`` accepts. ``compile_*``: the limits of
    one compile (see :class:`ChildCompiler`). ``memory_cache_modules`` and
    ``memory_cache_bytes`` (total serialized size): the compiled modules kept in memory,
    least recently used dropped first (running functions keep their own reference; the
    newest module is always kept). ``cache_limit``: bytes of compiled code kept on disk."""

    def __init__(
        self,
        cache_dir: Path | None,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
        *,
        pooling: PoolSettings | None = None,
        max_module_bytes: int = DEFAULT_MAX_MODULE_BYTES,
        compile_cpu_seconds: float = DEFAULT_COMPILE_CPU_SECONDS,
        compile_memory_bytes: int = DEFAULT_COMPILE_MEMORY_BYTES,
        compile_timeout: float = DEFAULT_COMPILE_TIMEOUT,
        compile_workers: int = DEFAULT_COMPILE_WORKERS,
        memory_cache_modules: int = DEFAULT_MEMORY_CACHE_MODULES,
        memory_cache_bytes: int = DEFAULT_MEMORY_CACHE_BYTES,
    ) -> None:
        self.pooling = pooling
        self.engine = wasmtime.Engine(_config(pooling))
        self._pooled: WasmEngine | None = None
        self._pooled_modules: collections.OrderedDict[str, CompiledModule] = collections.OrderedDict()
        self.ticker = EpochTicker(self.engine)
        self.cache_dir = cache_dir
        self.cache_limit = cache_limit
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(cache_dir, 0o700)
        self._fingerprint = hashlib.sha256(
            f"wasmtime-py {package_version('wasmtime')};{ENGINE_SETTINGS}".encode()
        ).hexdigest()[:16]
        self.max_module_bytes = max_module_bytes
        self.compiler = ChildCompiler(
            cpu_seconds=compile_cpu_seconds,
            memory_bytes=compile_memory_bytes,
            timeout=compile_timeout,
            workers=compile_workers,
        )
        self.memory_cache_modules = memory_cache_modules
        self.memory_cache_bytes = memory_cache_bytes
        # digest -> (module, its serialized size), least recently used first
        self._modules: collections.OrderedDict[str, tuple[wasmtime.Module, int]] = collections.OrderedDict()
        self._module_bytes = 0
        self._refused: collections.OrderedDict[str, str] = collections.OrderedDict()  # digest -> error
        self._compiling: dict[str, threading.Lock] = {}
        self._scratch: str | None = None  # a private directory for compiles without a cache dir
        self.last_compile: CompileReport | None = None  # what the latest compile cost its child
        self._lock = threading.Lock()
        self.stats = {"memory_hits": 0, "disk_hits": 0, "compiles": 0, "memory_evictions": 0, "refused": 0}

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
            if found is not None:
                self._pooled_modules.move_to_end(compiled.digest)
        if found is None:
            module = wasmtime.Module.deserialize(pooled.engine, compiled.module.serialize())
            found = CompiledModule(compiled.digest, module, compiled.exports, "memory", compiled.reads_stdin)
            with self._lock:
                found = self._pooled_modules.setdefault(compiled.digest, found)
                while len(self._pooled_modules) > max(1, self.memory_cache_modules):
                    self._pooled_modules.popitem(last=False)
        return found

    def _cache_path(self, digest: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{digest}-{self._fingerprint}.cwasm"

    def _cached(self, digest: str) -> wasmtime.Module | None:
        with self._lock:
            found = self._modules.get(digest)
            if found is None:
                return None
            self._modules.move_to_end(digest)
            return found[0]

    def _remember(self, digest: str, module: wasmtime.Module, size: int) -> wasmtime.Module:
        """Keep ``module`` in memory, dropping the least recently used beyond the limits."""
        with self._lock:
            found = self._modules.get(digest)
            if found is not None:
                self._modules.move_to_end(digest)
                return found[0]
            self._modules[digest] = (module, size)
            self._module_bytes += size
            while len(self._modules) > 1 and (
                len(self._modules) > self.memory_cache_modules or self._module_bytes > self.memory_cache_bytes
            ):
                _, (_, dropped) = self._modules.popitem(last=False)
                self._module_bytes -= dropped
                self.stats["memory_evictions"] += 1
        return module

    def loaded(self, digest: str) -> CompiledModule | None:
        """The module with this sha256, when it is compiled in memory already (else None)."""
        module = self._cached(digest)
        if module is None:
            return None
        facts = module_facts(module)
        if not facts.checked:
            return None  # let load() check its imports (and report them)
        self.stats["memory_hits"] += 1
        return CompiledModule(digest, module, facts.export_names, "memory", facts.reads_stdin)

    def load(self, wasm: bytes, *, name: str) -> CompiledModule:
        """Validate and compile ``wasm`` (named ``name`` in errors), using the caches."""
        if len(wasm) > self.max_module_bytes:
            raise module_too_large(name, len(wasm), self.max_module_bytes)
        if wasm[:4] != WASM_MAGIC:
            raise ModuleError(f"{name} is not a WebAssembly module (it does not start with \\0asm)")
        digest = hashlib.sha256(wasm).hexdigest()
        module = self._cached(digest)
        source = "memory"
        if module is None:
            module, source = self._load_once(wasm, digest, name)
        self.stats[{"memory": "memory_hits", "disk": "disk_hits", "compiled": "compiles"}[source]] += 1
        facts = module_facts(module)
        if not facts.checked:
            self.check_imports(module, name)
            facts.checked = True
        return CompiledModule(digest, module, facts.export_names, source, facts.reads_stdin)

    def _load_once(self, wasm: bytes, digest: str, name: str) -> tuple[wasmtime.Module, str]:
        """Load an uncached module; concurrent loads of one module wait for the first."""
        with self._lock:
            gate = self._compiling.setdefault(digest, threading.Lock())
        try:
            with gate:
                module = self._cached(digest)
                if module is not None:
                    return module, "memory"
                with self._lock:
                    refused = self._refused.get(digest)
                if refused is not None:
                    self.stats["refused"] += 1
                    raise ModuleError(f"{name} was refused before (same sha256): {refused}")
                module, source, size = self._load_uncached(wasm, digest, name)
                return self._remember(digest, module, size), source
        finally:
            with self._lock:
                if self._compiling.get(digest) is gate and not gate.locked():
                    del self._compiling[digest]

    def _load_uncached(self, wasm: bytes, digest: str, name: str) -> tuple[wasmtime.Module, str, int]:
        path = self._cache_path(digest)
        if path is not None and path.exists():
            try:
                module = wasmtime.Module.deserialize_file(self.engine, str(path))
                os.utime(path)  # recently used: last to be evicted
                return module, "disk", path.stat().st_size
            except (wasmtime.WasmtimeError, OSError) as exc:
                log.warning("dropping unusable cache entry %s: %s", path, exc)
                path.unlink(missing_ok=True)
        # The child creates this name exclusively, in a directory only the host can write;
        # it is deserialized only once that child has exited with success.
        scratch = path.parent if path is not None else Path(self._scratch_dir())
        tmp = scratch / f".tmp-{digest[:16]}-{os.getpid()}-{os.urandom(6).hex()}"
        try:
            try:
                report = self.compiler.compile(wasm, tmp, name=name)
            except CompileFailure as exc:
                if exc.lasting:  # the same again would fail the same way: refuse it at once
                    self._refuse(digest, str(exc))
                raise
            try:
                module = wasmtime.Module.deserialize_file(self.engine, str(tmp))
            except wasmtime.WasmtimeError as exc:
                raise ModuleError(f"compiling {name} failed: {innermost_cause(str(exc))}") from exc
            self.last_compile = report
            log.info(
                "compiled %s (%s) in a child: %.2f s, %.2f s CPU, peak %s",
                name,
                mib(len(wasm)),
                report.seconds,
                report.cpu_seconds,
                mib(report.max_rss),
            )
            if path is not None:
                try:
                    os.replace(tmp, path)
                    self.evict()
                except OSError as exc:
                    log.warning("cannot write module cache %s: %s", path, exc)
            return module, "compiled", report.size
        finally:
            tmp.unlink(missing_ok=True)  # a loaded module keeps its own mapping

    def _refuse(self, digest: str, message: str) -> None:
        with self._lock:
            self._refused[digest] = message
            while len(self._refused) > FAILURE_MEMO:
                self._refused.popitem(last=False)

    def _scratch_dir(self) -> str:
        with self._lock:
            if self._scratch is None:
                self._scratch = tempfile.mkdtemp(prefix="layotto-compile-")  # mode 0700
                weakref.finalize(self, shutil.rmtree, self._scratch, True)
            return self._scratch

    def evict(self) -> int:
        """Drop the least recently used compiled modules until the cache fits its limit
        (and what a compile interrupted by a crash of the host left behind)."""
        if self.cache_dir is None:
            return 0
        entries = []
        stale = time.time() - self.compiler.timeout - 3600  # older than any compile still running
        for entry in os.scandir(self.cache_dir):
            if entry.name.endswith(".cwasm"):
                st = entry.stat()
                entries.append((st.st_mtime, st.st_size, entry.path))
            elif entry.name.startswith(".tmp-") and entry.stat().st_mtime < stale:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
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
