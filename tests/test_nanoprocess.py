"""Nanoprocesses in the host process, without containerd: command modules as fibers on the
shared scheduler (plain WASI modules) and on threads of their own (Runtime ABI users,
stdin readers), with exit codes, output, kills, CPU quotas and memory limits."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wasmtime

from layotto.host.engine import WasmEngine
from layotto.host.nanoprocess import KILL_GRACE, ExitInfo, Nanoprocess, ProcessSpec, build_linker


class Host:
    """An engine, its linker and the nanoprocesses a test started (all killed at teardown)."""

    def __init__(self, wasm_dir: Path, tmp: Path) -> None:
        self.engine = WasmEngine(None)
        self.linker = build_linker(self.engine)
        self.wasm_dir = wasm_dir
        self.tmp = tmp
        self.rootfs = tmp / "rootfs"
        self.rootfs.mkdir()
        self.procs: list[Nanoprocess] = []
        self._serial = 0

    def spawn(
        self, module: str | bytes, *args: str, fiber: bool | None = None, **spec: object
    ) -> Nanoprocess:
        """A nanoprocess of ``module`` (a name in build/wasm, or the bytes of a module);
        ``fiber`` forces how it runs; ``spec`` overrides ProcessSpec fields."""
        if isinstance(module, bytes):
            wasm, module = module, "inline"
        else:
            wasm = (self.wasm_dir / f"{module}.wasm").read_bytes()
        compiled = self.engine.load(wasm, name=module)
        self._serial += 1
        out = self.tmp / f"out-{self._serial}.txt"
        fields: dict[str, object] = {"stdout": f"file://{out}", "stderr": f"file://{out}"}
        fields.update(spec)
        proc = Nanoprocess(
            self.engine,
            self.linker,
            compiled,
            ProcessSpec(
                name=f"test/{self._serial}",
                args=[f"/{module}.wasm", *args],
                env=[],
                rootfs=self.rootfs,
                **fields,
            ),  # type: ignore[arg-type]
        )
        if fiber is not None:
            proc.fiber = fiber
        self.procs.append(proc)
        return proc

    def run(self, module: str | bytes, *args: str, **kw: object) -> Nanoprocess:
        """Start a module and wait (at most 30 s) for its exit."""
        proc = self.spawn(module, *args, **kw)
        assert proc.start().wait(10)
        wait_exit(proc, 30)
        return proc

    def output(self, proc: Nanoprocess) -> str:
        return Path(proc.spec.stdout.removeprefix("file://")).read_text()


def wait_exit(proc: Nanoprocess, timeout: float) -> ExitInfo:
    done = threading.Event()
    proc.on_exit(lambda _info: done.set())
    assert done.wait(timeout), f"{proc.spec.name} still running after {timeout}s"
    assert proc.exit is not None
    return proc.exit


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def host(wasm_dir: Path, tmp_path: Path) -> Iterator[Host]:
    h = Host(wasm_dir, tmp_path)
    yield h
    for proc in h.procs:
        if proc.running:
            proc.kill(9)
    for proc in h.procs:
        if proc.started_at is not None:
            wait_exit(proc, 10)


def test_plain_wasi_modules_run_as_fibers_on_a_few_threads(host: Host) -> None:
    before = threading.active_count()
    procs = [host.spawn("sleeper", "3600") for _ in range(20)]
    for proc in procs:
        assert proc.fiber
        assert proc.start().wait(10)
    wait_for(lambda: all("sleeping" in host.output(p) for p in procs))
    # One scheduler thread per CPU (at most 4) and the epoch ticker, not one per module.
    assert threading.active_count() - before <= 5
    assert all(p.running for p in procs)


@pytest.mark.parametrize("fiber", [True, False], ids=["fiber", "thread"])
def test_exit_codes_output_and_traps(host: Host, fiber: bool) -> None:
    ok = host.run("echoargs", "one", "exit:3", fiber=fiber)
    assert ok.exit is not None and ok.exit.status == 3
    assert "arg[1]=one" in host.output(ok)
    zero = host.run("hello", fiber=fiber)
    assert zero.exit is not None and zero.exit.status == 0
    assert "Hello" in host.output(zero)
    trap = host.run("trap", fiber=fiber)
    assert trap.exit is not None and trap.exit.status == 134
    text = host.output(trap)
    assert "about to trap" in text and "wasm trap" in text


@pytest.mark.parametrize("fiber", [True, False], ids=["fiber", "thread"])
@pytest.mark.parametrize(("module", "sig"), [("sleeper", 9), ("sleeper", 15), ("busyloop", 9)])
def test_kill_is_prompt(
    host: Host, fiber: bool, module: str, sig: int, caplog: pytest.LogCaptureFixture
) -> None:
    proc = host.spawn(module, fiber=fiber)
    assert proc.start().wait(10)
    wait_for(lambda: host.output(proc))  # it printed: it is sleeping or spinning now
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="layotto.host.nanoprocess"):
        proc.kill(sig)
        info = wait_exit(proc, 5)
    assert info.status == 128 + sig and info.reason == "killed"
    assert time.monotonic() - began < 1.0
    # It stopped by itself, not through the reaper that reports stuck modules.
    assert "did not stop" not in caplog.text
    wait_for(lambda: proc._store is None, KILL_GRACE * 4)


def test_a_busy_fiber_does_not_starve_the_others(host: Host) -> None:
    busy = [host.spawn("busyloop") for _ in range(3)]  # more than there are scheduler threads
    for proc in busy:
        assert proc.start().wait(10)
    wait_for(lambda: all(host.output(p) for p in busy))
    began = time.monotonic()
    ticker = host.run("ticker", "5", "100")
    assert ticker.exit is not None and ticker.exit.status == 0
    assert host.output(ticker).count("tick") == 5
    assert time.monotonic() - began < 5.0  # 0.4 s of sleeps; never if the loops held every thread
    for proc in busy:
        assert proc.running and proc.cpu_seconds() > 0


def test_sleeps_last_as_long_as_asked(host: Host) -> None:
    began = time.monotonic()
    proc = host.run("ticker", "3", "200")
    elapsed = time.monotonic() - began
    assert proc.exit is not None and proc.exit.status == 0
    assert 0.4 <= elapsed < 3.0


@pytest.mark.parametrize("fiber", [True, False], ids=["fiber", "thread"])
def test_cpu_quota_throttles_a_busy_loop(host: Host, fiber: bool) -> None:
    proc = host.spawn("busyloop", fiber=fiber, cpu_quota_us=10_000, cpu_period_us=100_000)
    assert proc.start().wait(10)
    wait_for(lambda: proc.throttle.throttled_periods >= 10, 10)
    periods, cpu = proc.throttle.periods, proc.cpu_seconds()
    # 10% of a CPU: about 10 ms of CPU per 100 ms period (slack for coarse ticks).
    assert cpu <= 0.03 * max(periods, 1) + 0.05
    assert cpu > 0
    began = time.monotonic()
    proc.kill(9)  # a throttled module is killed at once, not at the end of its pause
    assert wait_exit(proc, 5).status == 137
    assert time.monotonic() - began < 1.0


@pytest.mark.parametrize("fiber", [True, False], ids=["fiber", "thread"])
def test_memory_limit_ends_in_oom(host: Host, fiber: bool) -> None:
    proc = host.run("memhog", fiber=fiber, memory_limit=16 << 20)
    assert proc.exit is not None
    assert proc.exit.status == 1 and proc.exit.oom
    assert "out of memory" in host.output(proc)


def test_a_module_that_fails_to_instantiate_reports_it(host: Host) -> None:
    proc = host.spawn("sleeper", memory_limit=64 << 10)  # smaller than its linear memory
    assert proc.fiber
    assert proc.start().wait(10)
    assert proc.start_error is not None and "cannot instantiate" in str(proc.start_error)
    assert wait_exit(proc, 5).status == 1


ABI_USER = bytes(
    wasmtime.wat2wasm(
        """
    (module
      (import "layotto" "layotto_time_now" (func $now (param i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        (drop (call $now (i32.const 8)))
        ;; exit 7 if the clock was written (non-zero), else 1
        (call $exit (select (i32.const 7) (i32.const 1) (i64.ne (i64.load (i32.const 8)) (i64.const 0))))))
    """
    )
)

STDIN_ECHO = bytes(
    wasmtime.wat2wasm(
        """
    (module
      (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 64))   ;; iovec: buf at 64
        (i32.store (i32.const 4) (i32.const 256))  ;; len 256
        (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
        (i32.store (i32.const 4) (i32.load (i32.const 16)))  ;; write what was read
        (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))
    """
    )
)


def test_runtime_abi_users_and_stdin_readers_keep_a_thread(host: Host) -> None:
    abi = host.spawn(ABI_USER, capabilities=frozenset({"time"}))
    assert not abi.fiber
    assert abi.start().wait(10)
    assert wait_exit(abi, 10).status == 7

    fifo = host.tmp / "stdin"
    os.mkfifo(fifo)
    reader = host.spawn(STDIN_ECHO, stdin=str(fifo))
    assert not reader.fiber  # its read blocks: it must not hold a scheduler thread
    assert reader.start().wait(10)
    sleeper = host.spawn("sleeper", "3600")
    assert sleeper.start().wait(10)
    with open(fifo, "wb") as w:
        w.write(b"from stdin\n")
    assert wait_exit(reader, 10).status == 0
    assert host.output(reader) == "from stdin\n"
    wait_for(lambda: "sleeping" in host.output(sleeper))
    # Without a stdin to read, a module importing fd_read runs as a fiber (EOF at once).
    no_stdin = host.spawn(STDIN_ECHO)
    assert no_stdin.fiber
    assert no_stdin.start().wait(10)
    assert wait_exit(no_stdin, 10).status == 0


def test_finished_fibers_drop_their_store(host: Host) -> None:
    procs = [host.run("hello") for _ in range(5)]
    for proc in procs:
        assert proc.exit is not None and proc.exit.status == 0
        assert proc._store is None and proc.memory_bytes() == 0


def test_killed_sleepers_are_not_kept_alive_by_their_timers(host: Host) -> None:
    def start_and_kill(n: int) -> list[weakref.ref[Nanoprocess]]:
        procs = [host.spawn("sleeper", "3600") for _ in range(n)]
        for proc in procs:
            assert proc.start().wait(10)
        wait_for(lambda: all("sleeping" in host.output(p) for p in procs))
        for proc in procs:
            proc.kill(9)
        for proc in procs:
            assert wait_exit(proc, 10).status == 137
        host.procs.clear()
        return [weakref.ref(p) for p in procs]

    refs = start_and_kill(100)
    # Their timers (an hour ahead) are dropped in batches: most are gone at once.
    wait_for(lambda: gc.collect() >= 0 and sum(r() is not None for r in refs) <= 64, 5)
