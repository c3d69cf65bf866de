"""The compiling child: turns one untrusted wasm module into wasmtime code, within limits.

Cranelift's cost grows with the module (a 24 MB module takes tens of seconds of CPU and
over a GiB), so the node host never compiles an uncached module itself: it runs

    python -I -S host/compiler.py LIBRARY OUTPUT CPU_SECONDS MEMORY_BYTES FILE_BYTES

with the wasm on stdin (``ChildCompiler`` in child_compiler.py). This file is the child's
whole program and stays small on purpose: the standard library only, and libwasmtime through
its own few ctypes declarations (``import wasmtime`` takes longer than most compiles; the
rest of the C API is declared in ``host/capi.py``). The child

1. sets its rlimits before reading anything: address space, CPU seconds (SIGXCPU at the
   limit, SIGKILL a second later), file size, no core dumps;
2. compiles with exactly the host's engine settings (:func:`apply_engine_settings`, which
   the host applies to its own engine config too: wasmtime refuses serialized code whose
   settings differ from the engine's);
3. writes the serialized module to OUTPUT, a file it creates (O_EXCL, mode 0600) in the
   host's private directory, and prints one line: ``ok SIZE CPU MAXRSS`` or
   ``error KIND CPU MAXRSS`` followed by the detail (KIND: ``invalid``, ``memory`` or
   ``failed``).

The host deserializes only that file, once its own child has exited successfully. The
limits and the cache as operators see them: see docs/security.md ("Compilation").
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

DEFAULT_MAX_MODULE_BYTES = 64 << 20  # the largest module the host reads, from any source
MAX_WASM_STACK = 512 << 10  # bytes of native stack wasm may use (deeper recursion traps)

# The engine settings, as (C API setter, argument type, value).
_SETTINGS: tuple[tuple[str, type, int], ...] = (
    ("wasmtime_config_epoch_interruption_set", ctypes.c_bool, 1),
    ("wasmtime_config_cranelift_opt_level_set", ctypes.c_uint8, 1),  # 1: "speed"
    ("wasmtime_config_max_wasm_stack_set", ctypes.c_size_t, MAX_WASM_STACK),
    # One linear memory per module: a store's memory limit applies to each of its memories,
    # so a module declaring four would otherwise get four times its limit.
    ("wasmtime_config_wasm_multi_memory_set", ctypes.c_bool, 0),
    # No GC proposal either: a GC heap is one more memory, limited like a linear memory
    # (a module could hold its memory limit in linear memory and as much again in GC objects).
    ("wasmtime_config_wasm_gc_set", ctypes.c_bool, 0),
)
ENGINE_SETTINGS = ";".join(f"{name[len('wasmtime_config_') : -len('_set')]}={v}" for name, _, v in _SETTINGS)

# What running out of address space looks like, from Rust, wasmtime, rayon and ld.so.
OOM_MARKERS = (
    "memory allocation of",
    "Cannot allocate memory",
    "os error 12",
    "out of memory",
    "ThreadPoolBuildError",
    "failed to map segment",
)


def _fn(lib: ctypes.CDLL, name: str, restype: object, *argtypes: object) -> ctypes._CFuncPtr:
    fn = lib[name]  # a fresh function object: typing it leaves wasmtime-py's own alone
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


def apply_engine_settings(lib: ctypes.CDLL, config: int) -> None:
    """Apply the host's engine settings to the ``wasm_config_t*`` at address ``config``."""
    for name, argtype, value in _SETTINGS:
        _fn(lib, name, None, ctypes.c_void_p, argtype)(config, value)


class _ByteVec(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("data", ctypes.c_void_p)]


def _error_text(lib: ctypes.CDLL, error: int) -> str:
    message = _ByteVec()
    _fn(lib, "wasmtime_error_message", None, ctypes.c_void_p, ctypes.POINTER(_ByteVec))(error, message)
    text = ctypes.string_at(message.data, message.size).decode(errors="replace")
    _fn(lib, "wasm_byte_vec_delete", None, ctypes.POINTER(_ByteVec))(message)
    _fn(lib, "wasmtime_error_delete", None, ctypes.c_void_p)(error)
    return text


def _report(status: str, *fields: object, detail: str = "") -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    head = " ".join(str(f) for f in (status, *fields, cpu, usage.ru_maxrss * 1024))
    sys.stdout.write(head + "\n" + detail)
    sys.stdout.flush()


def _compile(library: str, output: str, cpu_seconds: str, memory_bytes: str, file_bytes: str) -> None:
    cpu = max(1, int(float(cpu_seconds) + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (int(memory_bytes), int(memory_bytes)))
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(file_bytes), int(file_bytes)))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    wasm = sys.stdin.buffer.read()
    lib = ctypes.CDLL(library)
    config = _fn(lib, "wasm_config_new", ctypes.c_void_p)()
    apply_engine_settings(lib, config)
    engine = _fn(lib, "wasm_engine_new_with_config", ctypes.c_void_p, ctypes.c_void_p)(config)
    module = ctypes.c_void_p()
    new = _fn(
        lib,
        "wasmtime_module_new",
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_void_p),
    )
    error = new(engine, wasm, len(wasm), ctypes.byref(module))
    if error:
        text = _error_text(lib, error)
        _report("error", "memory" if any(m in text for m in OOM_MARKERS) else "invalid", detail=text)
        return
    del wasm
    code = _ByteVec()
    vec = ctypes.POINTER(_ByteVec)
    serialize = _fn(lib, "wasmtime_module_serialize", ctypes.c_void_p, ctypes.c_void_p, vec)
    error = serialize(module, code)
    if error:
        _report("error", "failed", detail="serializing: " + _error_text(lib, error))
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(memoryview((ctypes.c_uint8 * code.size).from_address(code.data)))
    _report("ok", code.size)


def main(argv: list[str]) -> int:
    """The child's entry point (``argv`` as in the module docstring)."""
    try:
        _compile(*argv[1:6])
    except MemoryError:
        _report("error", "memory", detail="MemoryError")
    except OSError as exc:
        short = exc.errno == 12 or any(m in str(exc) for m in OOM_MARKERS)
        _report("error", "memory" if short else "failed", detail=str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
