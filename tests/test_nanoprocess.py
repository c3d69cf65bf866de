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
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from layotto.host import nanoprocess
from layotto.host.errors import ModuleError
from layotto.host.fiber_runner import FiberRunner
from layotto.host.function import DEFAULT_MEMORY_LIMIT
from layotto.host.nanoprocess import KILL_GRACE, ExitInfo, Nanoprocess, ProcessSpec
from layotto.host.rootpath import DirMount
from layotto.host.runtime import NodeRuntime
from tests.support import wait_for


class Host:
    """A node runtime (engine and runners) and the nanoprocesses a test started (all
    killed at teardown)."""

    def __init__(self, wasm_dir: Path, tmp: Path) -> None:
        self.runtime = NodeRuntime(None)
        self.engine = self.runtime.engine
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
        ``fiber`` picks its runner (None: the runtime's choice); ``spec`` overrides
        ProcessSpec fields."""
        if isinstance(module, bytes):
            wasm, module = module, "inline"
        else:
            wasm = (self.wasm_dir / f"{module}.wasm").read_bytes()
        compiled = self.engine.load(wasm, name=module)
        self._serial += 1
        out = self.tmp / f"out-{self._serial}.txt"
        fields: dict[str, object] = {"stdout": f"file://{out}", "stderr": f"file://{out}"}
        fields.update(spec)
        proc = self.runtime.spawn(
            compiled,
            ProcessSpec(
                name=f"test/{self._serial}",
                args=[f"/{module}.wasm", *args],
                env=[],
                rootfs=self.rootfs,
                **fields,
            ),
            fiber=fiber,
        )
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


def is_fiber(proc: Nanoprocess) -> bool:
    return isinstance(proc.runner, FiberRunner)


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
        assert is_fiber(proc)
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
    assert is_fiber(proc)
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
    assert not is_fiber(abi)
    assert abi.start().wait(10)
    assert wait_exit(abi, 10).status == 7

    fifo = host.tmp / "stdin"
    os.mkfifo(fifo)
    reader = host.spawn(STDIN_ECHO, stdin=str(fifo))
    assert not is_fiber(reader)  # its read blocks: it must not hold a scheduler thread
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
    assert is_fiber(no_stdin)
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


# --- the module's filesystem: preopens resolved inside the rootfs -----------------------


def _open_under(directory: Path) -> list[str]:
    """What this process holds open under ``directory`` (its descriptors' targets)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == str(directory) or target.startswith(f"{directory}/"):
            found.append(target)
    return found


def test_the_working_directory_stays_inside_the_rootfs(host: Host) -> None:
    outside = host.tmp / "outside"
    outside.mkdir()
    (outside / "secret").write_text("outside\n")
    (host.rootfs / "app").mkdir()
    (host.rootfs / "app" / "conf").write_text("inside\n")
    (host.rootfs / "w").symlink_to("/")
    rel = str(outside / "secret").lstrip("/")
    for cwd in ("/" + "../" * 24, "/w", "/w/app/../../.."):
        proc = host.run("fsprobe", f"read:{rel}", f"write:{outside}/created", "read:conf", cwd=cwd)
        assert proc.exit is not None and proc.exit.status == 0
        out = host.output(proc)
        assert f"read {rel}: error" in out and f"write {outside}/created: error" in out, out
        assert "read conf: error" in out  # "." is the rootfs's root, not /app
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    proc = host.run("fsprobe", "read:conf", cwd="/w/app")  # w -> / is the rootfs's root
    assert "read conf: ok inside" in host.output(proc)
    wait_for(lambda: not _open_under(host.rootfs))  # the preopens' descriptors are closed


@pytest.mark.parametrize("cwd", ["/missing", "/file", "/loop"])
def test_a_working_directory_that_does_not_resolve_fails_the_start(host: Host, cwd: str) -> None:
    (host.rootfs / "file").write_text("x\n")
    (host.rootfs / "loop").symlink_to("loop")
    proc = host.spawn("fsprobe", cwd=cwd)
    with pytest.raises(ModuleError, match=f"working directory '{cwd}'"):
        proc.start()
    assert _open_under(host.rootfs) == []
    host.procs.remove(proc)


@pytest.mark.parametrize("fiber", [True, False], ids=["fiber", "thread"])
def test_a_read_only_rootfs_is_preopened_read_only(host: Host, fiber: bool) -> None:
    (host.rootfs / "app").mkdir()
    (host.rootfs / "app" / "conf").write_text("inside\n")
    proc = host.run("fsprobe", "read:/app/conf", "write:/app/conf", "write:/new", fiber=fiber, readonly=True)
    out = host.output(proc)
    assert "read /app/conf: ok inside" in out
    assert "write /app/conf: error" in out and "write /new: error" in out, out
    # The working directory, in the rootfs, is read-only too.
    args = ("read:conf", "write:conf", "write:made-here")
    proc = host.run("fsprobe", *args, fiber=fiber, readonly=True, cwd="/app")
    out = host.output(proc)
    assert "read conf: ok inside" in out
    assert "write conf: error" in out and "write made-here: error" in out, out
    assert sorted(p.name for p in host.rootfs.rglob("*")) == ["app", "conf"]
    assert (host.rootfs / "app" / "conf").read_text() == "inside\n"


def test_bind_mounts_are_preopened_at_their_destination(host: Host) -> None:
    ro, rw = host.tmp / "ro", host.tmp / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "a.txt").write_text("read-only volume\n")
    mounts = (DirMount("/config", str(ro), True), DirMount("/var/data", str(rw), False))
    args = ("read:/config/a.txt", "write:/config/b", "write:/var/data/c", "read:a.txt")
    proc = host.run("fsprobe", *args, mounts=mounts, cwd="/config")
    out = host.output(proc)
    assert "read /config/a.txt: ok read-only volume" in out
    assert "write /config/b: error" in out and not (ro / "b").exists()
    assert "write /var/data/c: ok" in out and (rw / "c").read_text() == "probe\n"
    assert "read a.txt: ok read-only volume" in out  # the cwd is in the mount


def test_a_bind_mount_source_that_is_a_symlink_fails_the_start(host: Host) -> None:
    (host.tmp / "real").mkdir()
    (host.tmp / "link").symlink_to(host.tmp / "real")
    proc = host.spawn("fsprobe", mounts=(DirMount("/data", str(host.tmp / "link"), False),))
    with pytest.raises(ModuleError, match="bind mount at /data"):
        proc.start()
    host.procs.remove(proc)


def test_a_module_without_a_memory_limit_gets_the_default(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert nanoprocess.COMMAND_MEMORY_LIMIT == DEFAULT_MEMORY_LIMIT
    monkeypatch.setattr(nanoprocess, "COMMAND_MEMORY_LIMIT", 24 << 20)  # read at each start
    proc = host.run("memhog", "1024")
    assert proc.exit is not None and proc.exit.status == 1 and proc.exit.oom
    mib = int(host.output(proc).split("out of memory after")[1].split()[0])
    assert 8 <= mib < 24
