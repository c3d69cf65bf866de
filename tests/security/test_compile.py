"""Compiling untrusted modules: size caps, a bounded child compiler, a bounded module
cache, and no multi-memory.

The modules here are generated in the test: bytes written directly (a data segment of any
size, or one function long enough to be costly for Cranelift) or small WAT texts.
"""

from __future__ import annotations

import stat
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import wasmtime

from layotto.host.engine import DEFAULT_MAX_MODULE_BYTES, WasmEngine
from layotto.host.errors import ModuleError
from layotto.host.runtime import NodeRuntime
from layotto.host.workload import MAX_MODULE_BYTES

MiB = 1 << 20


# ---------------------------------------------------------------- generated modules


def _uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _sleb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if (n == 0 and not byte & 0x40) or (n == -1 and byte & 0x40):
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _section(sid: int, payload: bytes) -> bytes:
    return bytes([sid]) + _uleb(len(payload)) + payload


def _vec(items: list[bytes]) -> bytes:
    return _uleb(len(items)) + b"".join(items)


HEADER = b"\0asm\x01\0\0\0"


def data_module(size: int) -> bytes:
    """A valid module with one memory and a data segment of ``size`` bytes."""
    pages = size // 65536 + 1
    memory = _section(5, _vec([b"\x00" + _uleb(pages)]))
    segment = b"\x00\x41\x00\x0b" + _uleb(size) + b"\xab" * size  # active, memory 0, offset 0
    return HEADER + memory + _section(11, _vec([segment]))


def costly_module(steps: int, salt: int = 0) -> bytes:
    """One exported function ``() -> i32``, a chain of ``steps`` additions and multiplications:
    Cranelift's time and memory grow with it (100,000 steps: ~1 s of CPU, ~150 MiB)."""
    body = bytearray(b"\x41" + _sleb(salt))
    for i in range(steps):
        body += b"\x41" + _sleb(i) + b"\x6a\x41\x03\x6c"  # i32.const i; i32.add; i32.const 3; i32.mul
    code = b"\x00" + bytes(body) + b"\x0b"  # no locals
    return (
        HEADER
        + _section(1, _vec([b"\x60\x00\x01\x7f"]))  # type 0: () -> i32
        + _section(3, _vec([b"\x00"]))
        + _section(7, _vec([_uleb(3) + b"run\x00\x00"]))  # export "run" = func 0
        + _section(10, _vec([_uleb(len(code)) + code]))
    )


def tiny_module(n: int) -> bytes:
    """A small module of its own (different bytes for each ``n``)."""
    return bytes(wasmtime.wat2wasm(f'(module (func (export "run") (result i32) i32.const {n}))'))


def run(engine: wasmtime.Engine, module: wasmtime.Module) -> int:
    """Call the module's ``run`` export in a fresh store of ``engine``."""
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1 << 40)  # the host's engines interrupt at each epoch deadline
    return wasmtime.Instance(store, module, []).exports(store)["run"](store)


# ---------------------------------------------------------------- size caps


def test_one_size_cap_for_every_source() -> None:
    assert MAX_MODULE_BYTES == DEFAULT_MAX_MODULE_BYTES == 64 * MiB
    assert WasmEngine(None).max_module_bytes == DEFAULT_MAX_MODULE_BYTES


def test_an_oversized_module_is_refused_with_its_size_and_the_cap(tmp_path: Path) -> None:
    wasm = data_module(2 * MiB)
    engine = WasmEngine(None, max_module_bytes=1 * MiB)
    with pytest.raises(
        ModuleError, match=rf"/big.wasm is {len(wasm)} bytes .*module size limit of 1048576 bytes"
    ):
        engine.load(wasm, name="/big.wasm")
    assert engine.stats["compiles"] == 0
    # The same module under a cap it fits: it is a valid module.
    assert WasmEngine(None, max_module_bytes=4 * MiB).load(wasm, name="/big.wasm").from_cache == "compiled"


def test_a_rootfs_file_over_the_cap_is_refused_without_reading_it(tmp_path: Path) -> None:
    runtime = NodeRuntime(None)  # the default cap, 64 MiB
    big = tmp_path / "big.wasm"
    with open(big, "wb") as f:
        f.write(HEADER)
        f.truncate(DEFAULT_MAX_MODULE_BYTES + 1)  # sparse: nothing to read anyway
    started = time.perf_counter()
    with pytest.raises(
        ModuleError, match=rf"/big.wasm is {DEFAULT_MAX_MODULE_BYTES + 1} bytes .*67108864 bytes"
    ):
        runtime.load(big, name="/big.wasm")
    assert time.perf_counter() - started < 0.5
    # A file whose size says nothing (it grows, or is no regular file): at most cap+1 bytes read.
    small = NodeRuntime(None, max_module_bytes=1 * MiB)
    with pytest.raises(ModuleError, match=r"/zero is more than 1048577 bytes .*1048576 bytes"):
        small.load(Path("/dev/zero"), name="/zero")


def test_a_rootfs_file_under_the_cap_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "fn.wasm"
    path.write_bytes(tiny_module(1))
    assert NodeRuntime(None, max_module_bytes=1 * MiB).load(path, name="/fn.wasm").exports == {"run"}


# ---------------------------------------------------------------- the compiling child


def test_a_compile_over_the_cpu_limit_fails_precisely_and_the_engine_goes_on(tmp_path: Path) -> None:
    engine = WasmEngine(tmp_path / "modules", compile_cpu_seconds=1)
    slow = costly_module(300_000)  # several seconds of CPU
    started = time.perf_counter()
    with pytest.raises(ModuleError, match=r"^compiling /slow.wasm took more than 1 s of CPU \(limit 1 s"):
        engine.load(slow, name="/slow.wasm")
    assert time.perf_counter() - started < 10
    assert engine.load(tiny_module(2), name="/ok.wasm").from_cache == "compiled"
    # The same module again is refused at once: it would fail the same way.
    started = time.perf_counter()
    with pytest.raises(ModuleError, match=r"refused before .*took more than 1 s of CPU"):
        engine.load(slow, name="/slow-again.wasm")
    assert time.perf_counter() - started < 0.5
    assert engine.stats["refused"] == 1
    assert not [p for p in (tmp_path / "modules").iterdir() if p.name.startswith(".tmp-")]


def test_a_compile_over_the_memory_limit_fails_precisely_and_the_engine_goes_on() -> None:
    engine = WasmEngine(None, compile_memory_bytes=150 * MiB)
    with pytest.raises(ModuleError, match=r"^compiling /fat.wasm needed more than 150 MiB \(limit 150 MiB"):
        engine.load(costly_module(150_000), name="/fat.wasm")
    assert engine.load(tiny_module(3), name="/ok.wasm").exports == {"run"}


def test_a_compile_over_the_wall_clock_limit_is_killed_and_may_be_tried_again() -> None:
    engine = WasmEngine(None, compile_timeout=0.3)
    slow = costly_module(100_000)
    started = time.perf_counter()
    with pytest.raises(
        ModuleError, match=r"^compiling /slow.wasm took more than 0.3 s \(the host's wall-clock"
    ):
        engine.load(slow, name="/slow.wasm")
    assert time.perf_counter() - started < 2
    # A timeout may be the host being busy: not remembered as a refusal.
    engine.compiler.timeout = 60
    assert engine.load(slow, name="/slow.wasm").from_cache == "compiled"


def test_invalid_modules_are_refused_by_the_child() -> None:
    engine = WasmEngine(None)
    with pytest.raises(ModuleError, match=r"/bad.wasm is not a valid WebAssembly module: .*type mismatch"):
        engine.load(bytes(wasmtime.wat2wasm("(module (func (result i32) i64.const 1))")), name="/bad.wasm")
    with pytest.raises(ModuleError, match=r"is not a WebAssembly module \(it does not start with"):
        engine.load(b"#!/bin/sh\necho hi\n", name="/script")


def test_the_host_does_not_grow_by_the_compile_memory() -> None:
    engine = WasmEngine(None)
    wasm = costly_module(100_000)
    me = psutil.Process()
    before = me.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, me.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        compiled = engine.load(wasm, name="/fat.wasm")
    finally:
        done.set()
        sampler.join()
    report = engine.last_compile
    assert report is not None and compiled.from_cache == "compiled"
    assert report.max_rss > 100 * MiB, report  # the child needed that much ...
    assert peak - before < 40 * MiB, (before, peak, report)  # ... the host did not
    assert isinstance(run(engine.engine, compiled.module), int)


def test_compiled_code_lands_in_private_files(tmp_path: Path) -> None:
    cache = tmp_path / "modules"
    engine = WasmEngine(cache)
    digest = engine.load(tiny_module(4), name="/a.wasm").digest
    (entry,) = cache.glob(f"{digest}-*.cwasm")
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]  # no temporary left behind
    # Without a cache directory: a private scratch directory, emptied after each compile.
    nocache = WasmEngine(None)
    nocache.load(tiny_module(5), name="/b.wasm")
    scratch = Path(nocache._scratch or "")
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o700 and not list(scratch.iterdir())


def test_a_cache_hit_never_starts_a_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "modules"
    WasmEngine(cache).load(tiny_module(6), name="/a.wasm")

    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError("a child was started for a cached module")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    engine = WasmEngine(cache)
    assert engine.load(tiny_module(6), name="/a.wasm").from_cache == "disk"
    assert engine.load(tiny_module(6), name="/a.wasm").from_cache == "memory"


def test_concurrent_loads_of_one_new_module_compile_it_once() -> None:
    engine = WasmEngine(None)
    wasm = tiny_module(7)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(engine.load(wasm, name="/a").digest)) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert engine.stats["compiles"] == 1 and engine.stats["memory_hits"] == 3


def test_the_child_uses_the_hosts_engine_settings() -> None:
    """wasmtime refuses serialized code compiled with other settings: the host's own
    engine deserializes what the child wrote, and so does the pooled sibling."""
    engine = WasmEngine(None)
    compiled = engine.load(tiny_module(8), name="/a.wasm")
    assert run(engine.engine, compiled.module) == 8
    assert run(engine.pooled().engine, engine.to_pooled(compiled).module) == 8


# ---------------------------------------------------------------- multi-memory


def test_a_module_with_two_memories_is_refused() -> None:
    engine = WasmEngine(None)
    two = bytes(wasmtime.wat2wasm('(module (memory 1) (memory (export "m2") 1))'))
    with pytest.raises(ModuleError, match=r"/two.wasm declares more than one linear memory"):
        engine.load(two, name="/two.wasm")
    one = bytes(wasmtime.wat2wasm('(module (memory (export "memory") 1))'))
    assert engine.load(one, name="/one.wasm").exports == {"memory"}


def test_a_module_using_gc_objects_is_refused() -> None:
    """A GC heap is limited like one more linear memory: no GC proposal on this host."""
    gc = bytes(
        wasmtime.wat2wasm(
            "(module (type $a (array (mut i8)))"
            ' (func (export "run") (result i32)'
            " (drop (array.new_default $a (i32.const 1048576))) i32.const 0))"
        )
    )
    with pytest.raises(ModuleError, match=r"/gc.wasm is not a valid WebAssembly module: .*without the gc"):
        WasmEngine(None).load(gc, name="/gc.wasm")


# ---------------------------------------------------------------- the in-memory cache


def test_the_memory_cache_drops_the_least_recently_used(tmp_path: Path) -> None:
    engine = WasmEngine(tmp_path / "modules", memory_cache_modules=2)
    a, b, c = (engine.load(tiny_module(10 + i), name=f"/{i}.wasm") for i in range(3))
    assert engine.loaded(a.digest) is None  # the oldest went
    assert engine.loaded(b.digest) is not None and engine.loaded(c.digest) is not None
    assert engine.stats["memory_evictions"] == 1
    # Loading it again reads the host's own compiled code from disk (no compile) ...
    assert engine.load(tiny_module(10), name="/0.wasm").from_cache == "disk"
    assert (engine.stats["compiles"], engine.stats["disk_hits"]) == (3, 1)
    # ... and drops the least recently used now: b (c was looked up after it).
    assert engine.loaded(b.digest) is None and engine.loaded(c.digest) is not None
    # A running function keeps its module: eviction only drops the cache's reference.
    assert run(engine.engine, b.module) == 11


def test_the_memory_cache_is_bounded_by_size_too(tmp_path: Path) -> None:
    engine = WasmEngine(tmp_path / "modules", memory_cache_bytes=1)  # smaller than any module
    first = engine.load(tiny_module(20), name="/a.wasm")
    assert engine.loaded(first.digest) is not None  # the newest always stays
    second = engine.load(tiny_module(21), name="/b.wasm")
    assert engine.loaded(first.digest) is None and engine.loaded(second.digest) is not None
    assert len(engine._modules) == 1 and engine._module_bytes > 0
