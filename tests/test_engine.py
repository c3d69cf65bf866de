"""The module cache: compile once, load from disk, bounded with LRU eviction, and never
deserialize anything that did not come from the host itself."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import wasmtime

from layotto.host.engine import WasmEngine
from layotto.host.errors import ModuleError


def _wasm(wasm_dir: Path, name: str) -> bytes:
    return (wasm_dir / f"{name}.wasm").read_bytes()


def test_compiles_once_then_hits_memory_then_disk(tmp_path: Path, wasm_dir: Path) -> None:
    cache = tmp_path / "modules"
    engine = WasmEngine(cache)
    first = engine.load(_wasm(wasm_dir, "hello"), name="/hello.wasm")
    second = engine.load(_wasm(wasm_dir, "hello"), name="/hello.wasm")
    assert (first.from_cache, second.from_cache) == ("compiled", "memory")
    assert engine.stats["compiles"] == 1
    files = list(cache.glob("*.cwasm"))
    assert len(files) == 1 and files[0].name.startswith(first.digest)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    # A new host (new engine) finds the compiled module on disk.
    again = WasmEngine(cache).load(_wasm(wasm_dir, "hello"), name="/hello.wasm")
    assert again.from_cache == "disk"


def test_lru_eviction_keeps_the_cache_bounded(tmp_path: Path, wasm_dir: Path) -> None:
    cache = tmp_path / "modules"
    engine = WasmEngine(cache, cache_limit=1)  # smaller than any module: keep only the newest
    engine.load(_wasm(wasm_dir, "hello"), name="a")
    engine.load(_wasm(wasm_dir, "echoargs"), name="b")
    files = list(cache.glob("*.cwasm"))
    assert len(files) <= 1
    assert engine.stats.get("evictions", 0) >= 1
    # Generous limit: both stay, and the least recently used goes first when shrinking.
    engine = WasmEngine(tmp_path / "big", cache_limit=1 << 30)
    a = engine.load(_wasm(wasm_dir, "hello"), name="a")
    b = engine.load(_wasm(wasm_dir, "echoargs"), name="b")
    paths = {p.name.split("-")[0]: p for p in (tmp_path / "big").glob("*.cwasm")}
    os.utime(paths[a.digest], (1, 1))  # a is the least recently used
    engine.cache_limit = paths[b.digest].stat().st_size
    engine.evict()
    left = {p.name.split("-")[0] for p in (tmp_path / "big").glob("*.cwasm")}
    assert left == {b.digest}


def test_refuses_precompiled_code_and_garbage(tmp_path: Path, wasm_dir: Path) -> None:
    engine = WasmEngine(tmp_path / "modules")
    serialized = bytes(wasmtime.Module(engine.engine, _wasm(wasm_dir, "hello")).serialize())
    with pytest.raises(ModuleError, match="is not a WebAssembly module"):
        engine.load(serialized, name="/hello.cwasm")
    with pytest.raises(ModuleError, match="not a valid WebAssembly module"):
        engine.load(b"\0asm\x01\0\0\0garbage", name="/broken.wasm")


def test_a_corrupted_cache_entry_is_recompiled(tmp_path: Path, wasm_dir: Path) -> None:
    cache = tmp_path / "modules"
    digest = WasmEngine(cache).load(_wasm(wasm_dir, "hello"), name="x").digest
    (entry,) = cache.glob(f"{digest}-*.cwasm")
    entry.write_bytes(b"not a compiled module")
    reloaded = WasmEngine(cache).load(_wasm(wasm_dir, "hello"), name="x")
    assert reloaded.from_cache == "compiled"


def test_a_file_already_read_is_not_read_again_until_it_changes(
    tmp_path: Path, wasm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from layotto.host.runtime import NodeRuntime

    runtime = NodeRuntime(tmp_path)
    module = tmp_path / "fn.wasm"
    module.write_bytes(_wasm(wasm_dir, "hello"))
    first = runtime.load(module, name="/fn.wasm")
    reads: list[str] = []
    real_load = runtime.engine.load

    def counting_load(wasm: bytes, *, name: str):
        reads.append(name)
        return real_load(wasm, name=name)

    monkeypatch.setattr(runtime.engine, "load", counting_load)
    again = runtime.load(module, name="/fn.wasm")
    assert (again.digest, again.from_cache, reads) == (first.digest, "memory", [])
    # Rewritten (another module, same path): read, hashed and compiled anew.
    module.write_bytes(_wasm(wasm_dir, "echoargs"))
    changed = runtime.load(module, name="/fn.wasm")
    assert reads == ["/fn.wasm"] and changed.digest != first.digest
    assert "_start" in changed.exports


def test_module_facts_and_instance_pre_are_computed_once_per_module(wasm_dir: Path) -> None:
    from layotto.host.engine import module_facts
    from layotto.host.nanoprocess import build_linker

    engine = WasmEngine(None)
    compiled = engine.load(_wasm(wasm_dir, "hello"), name="/hello.wasm")
    facts = module_facts(compiled.module)
    assert module_facts(engine.load(_wasm(wasm_dir, "hello"), name="x").module) is facts
    assert "wasi_snapshot_preview1" in facts.import_modules and "_start" in facts.export_names
    linker, other = build_linker(engine), build_linker(engine)
    pre = facts.instance_pre(linker, compiled.module)
    assert facts.instance_pre(linker, compiled.module) is pre
    assert facts.instance_pre(other, compiled.module) is not pre


def test_eviction_drops_temporaries_a_crashed_compile_left(tmp_path: Path, wasm_dir: Path) -> None:
    cache = tmp_path / "modules"
    engine = WasmEngine(cache)
    engine.load(_wasm(wasm_dir, "hello"), name="/hello.wasm")
    old, fresh = cache / ".tmp-old", cache / ".tmp-fresh"
    old.write_bytes(b"half a module")
    fresh.write_bytes(b"a compile in progress")
    os.utime(old, (1, 1))
    engine.evict()
    assert not old.exists() and fresh.exists()
    assert len(list(cache.glob("*.cwasm"))) == 1
