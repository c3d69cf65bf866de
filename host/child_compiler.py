"""Compiling a module in a child process bounded in CPU time, address space and wall time.

The host side of host/compiler.py: :class:`ChildCompiler` starts the child, feeds it the
wasm, and turns its exit (a report line, a signal, an out-of-memory message) into a
:class:`CompileReport` or a :class:`CompileFailure` that says which limit was hit. The
engine (host/engine.py) calls it for every module it finds in neither of its caches.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from layotto.host import capi
from layotto.host import compiler as _compiler_program
from layotto.host.compiler import OOM_MARKERS
from layotto.host.errors import ModuleError

DEFAULT_COMPILE_CPU_SECONDS = 60.0  # CPU time of one compile (all compiler threads together)
DEFAULT_COMPILE_MEMORY_BYTES = 4 << 30  # address space of one compiling child
DEFAULT_COMPILE_TIMEOUT = 120.0  # wall-clock seconds of one compile (waiting for a slot excluded)
DEFAULT_COMPILE_WORKERS = 2  # compiles running at once; more wait for a slot


def mib(size: int) -> str:
    """``size`` bytes in MiB, for messages."""
    return f"{size / (1 << 20):.1f} MiB" if size % (1 << 20) else f"{size >> 20} MiB"


def innermost_cause(text: str) -> str:
    """The innermost cause of a wasmtime error message, in one line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    if "Caused by:" in lines:
        cause = lines[-1]
        return cause.split(": ", 1)[1] if cause[:1].isdigit() and ": " in cause else cause
    return lines[0]


# The child's whole environment: few malloc arenas (each reserves 64 MiB of address space),
# and no Rust backtraces (symbolizing one near the memory limit can hang).
_CHILD_ENV = {"MALLOC_ARENA_MAX": "2", "RUST_BACKTRACE": "0", "LC_ALL": "C"}


class CompileFailure(ModuleError):
    """A compile that failed; ``lasting``: it would fail again (the module is invalid or
    exceeds a limit), as opposed to a timeout on a busy host or a crash."""

    def __init__(self, message: str, *, lasting: bool) -> None:
        super().__init__(message)
        self.lasting = lasting


@dataclass(frozen=True)
class CompileReport:
    """A compile the child finished: what it wrote and what it cost."""

    size: int  # bytes of serialized code written
    cpu_seconds: float  # the child's CPU time, all threads
    max_rss: int  # the child's peak resident memory, bytes
    seconds: float  # wall time, from starting the child to its exit


class ChildCompiler:
    """Compiles in child processes running host/compiler.py, at most ``workers`` at a time.

    Limits per compile: ``cpu_seconds`` of CPU (RLIMIT_CPU), ``memory_bytes`` of address
    space (RLIMIT_AS) and ``timeout`` wall-clock seconds (the child is killed). The child is
    a fresh ``python -I -S`` (no site-packages, no environment) loading only libwasmtime:
    starting it from a multi-threaded host is a plain fork+exec, and costs ~15 ms."""

    def __init__(
        self,
        *,
        cpu_seconds: float = DEFAULT_COMPILE_CPU_SECONDS,
        memory_bytes: int = DEFAULT_COMPILE_MEMORY_BYTES,
        timeout: float = DEFAULT_COMPILE_TIMEOUT,
        workers: int = DEFAULT_COMPILE_WORKERS,
    ) -> None:
        self.cpu_seconds = max(1, math.ceil(cpu_seconds))  # RLIMIT_CPU counts whole seconds
        self.memory_bytes = memory_bytes
        self.timeout = timeout
        self._slots = threading.BoundedSemaphore(max(1, workers))

    def argv(self, output: Path) -> list[str]:
        """The child's command line, writing to ``output``."""
        return [
            sys.executable,
            "-I",
            "-S",
            str(Path(_compiler_program.__file__).resolve()),
            capi.LIBRARY_PATH,
            str(output),
            str(self.cpu_seconds),
            str(int(self.memory_bytes)),
            str(max(int(self.memory_bytes), 1 << 20)),  # RLIMIT_FSIZE: no file larger than that
        ]

    def compile(self, wasm: bytes, output: Path, *, name: str) -> CompileReport:
        """Compile ``wasm`` into the new file ``output``, or raise a ModuleError saying why."""
        with self._slots:
            started = time.perf_counter()
            child = subprocess.Popen(
                self.argv(output),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_CHILD_ENV,
                cwd="/",
                start_new_session=True,  # a terminal's ^C is for the host, not its compiles
            )
            try:
                out, err = child.communicate(wasm, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                raise CompileFailure(
                    f"compiling {name} took more than {self.timeout:g} s (the host's wall-clock limit "
                    "per compile)",
                    lasting=False,
                ) from None
            except BaseException:
                child.kill()
                child.wait()
                raise
            seconds = time.perf_counter() - started
        return self._outcome(name, child.returncode, out, err, seconds)

    def _outcome(self, name: str, returncode: int, out: bytes, err: bytes, seconds: float) -> CompileReport:
        head, _, detail_bytes = out.partition(b"\n")
        fields = head.decode(errors="replace").split()
        detail = detail_bytes.decode(errors="replace")
        stderr = err.decode(errors="replace").strip()
        kind = fields[1] if fields[:1] == ["error"] and len(fields) > 1 else ""
        if fields[:1] == ["ok"] and returncode == 0 and len(fields) == 4:
            return CompileReport(int(fields[1]), float(fields[2]), int(fields[3]), seconds)
        if returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not kind:
            kind = "cpu"  # SIGXCPU at the soft limit (SIGKILL at the hard one)
        elif not kind and any(marker in stderr for marker in OOM_MARKERS):
            kind = "memory"
        cpu = f"{self.cpu_seconds:g} s"
        if kind == "cpu":
            message = f"compiling {name} took more than {cpu} of CPU (limit {cpu} per compile)"
            raise CompileFailure(message, lasting=True)
        if kind == "memory":
            memory = mib(self.memory_bytes)
            message = (
                f"compiling {name} needed more than {memory} (limit {memory} of address space per compile)"
            )
            raise CompileFailure(message, lasting=True)
        if kind == "invalid":
            if "multiple memories" in detail:
                message = (
                    f"{name} declares more than one linear memory: multi-memory modules are not allowed "
                    "on this host"
                )
            else:
                message = f"{name} is not a valid WebAssembly module: {innermost_cause(detail)}"
            raise CompileFailure(message, lasting=True)
        if kind:
            raise CompileFailure(f"compiling {name} failed: {innermost_cause(detail)}", lasting=False)
        if returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"was killed by signal {-returncode}"
        else:
            how = f"exited with status {returncode}"
        said = _stderr_summary(stderr)
        raise CompileFailure(
            f"compiling {name} failed: the compiler {how}{': ' + said if said else ''}", lasting=False
        )


def _stderr_summary(stderr: str) -> str:
    """The line of a child's stderr that says what went wrong (a Rust panic's message)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if " panicked at " in line:
            return lines[i + 1][:300]
    lines = [line for line in lines if not line.startswith(("note:", "stack backtrace:"))]
    return lines[-1][:300] if lines else ""
