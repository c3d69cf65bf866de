"""`ctr run --runtime io.containerd.layotto.v1` against a real, private containerd.

Every test drives the real shim binary, the real node host and real wasm modules built
from tests/modules (make modules). The modules are packed into one image; each test
picks its module and arguments with ctr's command override.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from layotto.images import builder
from tests.conftest import find_host_process
from tests.containerd_env import Containerd, mounts_under
from tests.support import wait_for

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.layotto.v1"
IMAGE = "docker.io/library/layotto-testmods:latest"
HELLO = "docker.io/library/layotto-hello:latest"
GREETING = "Hello from a Layotto nanoprocess!"
MODULES = ("echoargs", "ticker", "busyloop", "sleeper", "memhog", "trap", "badimport", "hello")

_ids = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


@pytest.fixture(scope="module")
def images(containerd: Containerd, wasm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Containerd:
    out = tmp_path_factory.mktemp("images")
    files: dict[str, Path] = {f"/{m}.wasm": wasm_dir / f"{m}.wasm" for m in MODULES}
    files["/notwasm.txt"] = wasm_dir / "notwasm.txt"
    builder.build_image(out / "mods.tar", files, name=IMAGE, cmd=["/hello.wasm"])
    builder.build_image(
        out / "hello.tar", {"/hello.wasm": wasm_dir / "hello.wasm"}, name=HELLO, cmd=["/hello.wasm"]
    )
    containerd.import_image(out / "mods.tar")
    containerd.import_image(out / "hello.tar")
    return containerd


def run(
    c: Containerd, *cmd: str, opts: tuple[str, ...] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`ctr run --rm` in the foreground; returns the completed process (not checked)."""
    return c.ctr(
        "run", "--rm", "--runtime", RUNTIME, *opts, IMAGE, new_id("t"), *cmd, check=False, timeout=timeout
    )


def task_status(c: Containerd, task_id: str) -> str:
    for line in c.ctr("tasks", "ls").stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == task_id:
            return parts[-1]
    return ""


def test_hello_prints_and_exits_zero(images: Containerd) -> None:
    r = images.ctr("run", "--rm", "--runtime", RUNTIME, HELLO, new_id("hello"), check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == GREETING + "\n"


def test_args_env_stderr_and_exit_code(images: Containerd) -> None:
    r = run(
        images,
        "/echoargs.wasm",
        "first arg",
        "env:GREETING",
        "env:UNSET_VAR",
        "stderr:something went wrong",
        "exit:7",
        opts=("--env", "GREETING=hi there"),
    )
    assert r.returncode == 7, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "arg[0]=/echoargs.wasm"
    assert lines[1] == "arg[1]=first arg"
    assert "env:GREETING=hi there" in lines
    assert "env:UNSET_VAR=(unset)" in lines
    assert r.stderr.splitlines() == ["something went wrong"]
    assert "something went wrong" not in lines  # only echoed as an argument


def test_output_is_streamed_while_the_module_runs(images: Containerd) -> None:
    proc = images.ctr_popen(
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        new_id("ticker"),
        "/ticker.wasm",
        "4",
        "300",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert first == "tick 0\n"
        # The first line arrived while the module was still sleeping towards tick 3.
        assert proc.poll() is None
        rest = proc.stdout.read().decode()
        assert proc.wait(timeout=20) == 0
        assert rest.splitlines() == ["tick 1", "tick 2", "tick 3"]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("module", "sig", "status"),
    [
        ("/busyloop.wasm", "SIGTERM", 143),
        ("/busyloop.wasm", "SIGKILL", 137),
        ("/sleeper.wasm", "SIGTERM", 143),
    ],
)
def test_kill_stops_a_running_module(images: Containerd, module: str, sig: str, status: int) -> None:
    task_id = new_id("kill")
    proc = images.ctr_popen(
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        task_id,
        module,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.strip() in ("spinning", "sleeping")
        assert task_status(images, task_id) == "RUNNING"
        images.ctr("tasks", "kill", "--signal", sig, task_id)
        assert proc.wait(timeout=10) == status
    finally:
        proc.kill()
        proc.wait()


def test_trap_exits_non_zero_with_the_trap_on_stderr(images: Containerd) -> None:
    r = run(images, "/trap.wasm")
    assert r.returncode == 134
    assert "about to trap" in r.stdout
    assert "wasm trap" in r.stderr
    assert "unreachable" in r.stderr


def test_memory_limit_caps_linear_memory(images: Containerd) -> None:
    r = run(images, "/memhog.wasm", opts=("--memory-limit", str(32 << 20)))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "memhog: out of memory after" in r.stderr
    mib = int(r.stderr.split("out of memory after")[1].split()[0])
    assert 16 <= mib < 32
    # Without the limit the same module gets further than the cap allowed.
    r = run(images, "/memhog.wasm", "48")
    assert r.returncode == 0 and "allocated 48 MiB" in r.stdout


def test_exit_code_from_proc_exit(images: Containerd) -> None:
    assert run(images, "/echoargs.wasm", "exit:42").returncode == 42
    assert run(images, "/echoargs.wasm").returncode == 0


@pytest.mark.parametrize(
    ("cmd", "message"),
    [
        (("/notwasm.txt",), "/notwasm.txt is not a WebAssembly module"),
        (("/missing.wasm",), "/missing.wasm: no such file in the container image"),
        (("/badimport.wasm",), "imports env.layotto_not_provided, which the layotto host does not provide"),
        (("/hello.wasm#nosuchexport",), "has no export named 'nosuchexport'"),
    ],
)
def test_bad_input_fails_with_a_precise_error(images: Containerd, cmd: tuple[str, ...], message: str) -> None:
    r = run(images, *cmd)
    assert r.returncode != 0
    assert message in r.stderr
    # The host keeps serving everybody else, and nothing of the failed task remains.
    ok = images.ctr("run", "--rm", "--runtime", RUNTIME, HELLO, new_id("after"), check=False)
    assert ok.returncode == 0 and ok.stdout == GREETING + "\n"
    assert images.ctr("tasks", "ls").stdout.splitlines()[1:] == []
    assert [m for m in mounts_under(images.state) if "/rootfs" in m] == []


def test_memory_smaller_than_the_module_needs_fails_at_start(images: Containerd) -> None:
    # 64 KiB cannot hold the C module's initial memory (its stack alone is larger).
    r = run(images, "/hello.wasm", opts=("--memory-limit", str(64 << 10)))
    assert r.returncode != 0
    assert "cannot instantiate the module" in r.stderr


def test_ten_modules_at_once_in_one_host(images: Containerd) -> None:
    ids = [new_id("many") for _ in range(10)]
    for task_id in ids:
        images.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, task_id, "/sleeper.wasm")
    try:
        wait_for(lambda: all(task_status(images, t) == "RUNNING" for t in ids))
        host = find_host_process(images)
        assert host is not None
        pids = {
            line.split()[1]
            for line in images.ctr("tasks", "ls").stdout.splitlines()[1:]
            if line.split()[0] in ids
        }
        assert pids == {str(host.pid)}
        # The host runs them as threads of one process: no process per container.
        assert len(host.children()) == 0
        assert host.num_threads() >= 10
    finally:
        for task_id in ids:
            images.ctr("tasks", "kill", "--signal", "SIGKILL", task_id, check=False)
        for task_id in ids:
            wait_for(lambda t=task_id: task_status(images, t) in ("STOPPED", ""))
            images.ctr("tasks", "delete", task_id, check=False)
            images.ctr("containers", "delete", task_id, check=False)


def test_events_are_published_in_order(images: Containerd) -> None:
    events = images.ctr_popen("events", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.2)  # ctr events has no ready signal; give it a moment to subscribe
        task_id = new_id("events")
        assert images.ctr("run", "--rm", "--runtime", RUNTIME, HELLO, task_id).returncode == 0
        seen: list[str] = []
        assert events.stdout is not None
        deadline = time.monotonic() + 10
        while "/tasks/delete" not in seen and time.monotonic() < deadline:
            line = events.stdout.readline()
            if task_id in line and "/tasks/" in line:
                seen.append(next(w for w in line.split() if w.startswith("/tasks/")))
        assert seen == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    finally:
        events.send_signal(signal.SIGTERM)
        events.wait(timeout=5)


def _host_resources(host: psutil.Process) -> tuple[int, int]:
    return host.num_fds(), host.num_threads()


def test_runs_in_a_row_leak_nothing(images: Containerd) -> None:
    for _ in range(3):  # warm up: module cache, executor threads, event connection
        images.ctr("run", "--rm", "--runtime", RUNTIME, HELLO, new_id("warm"))
    host = find_host_process(images)
    assert host is not None
    fds, threads = _host_resources(host)

    def runs() -> None:
        for _ in range(25):
            r = images.ctr("run", "--rm", "--runtime", RUNTIME, HELLO, new_id("loop"), check=False)
            assert r.returncode == 0 and r.stdout == GREETING + "\n"

    runs()
    # One thread may have started on demand: the host's single helper that waits for fifo
    # readers (host/process.py _ReaderWait), made the first time an output finds ctr's
    # reader not open yet, which depends on timing. A second batch then adds nothing.
    wait_for(lambda: _host_resources(host)[1] <= threads + 1)
    threads = _host_resources(host)[1]
    runs()
    wait_for(lambda: _host_resources(host)[1] <= threads)
    fds_after, threads_after = _host_resources(host)
    assert fds_after <= fds
    assert threads_after <= threads
    assert find_host_process(images).pid == host.pid
    assert [m for m in mounts_under(images.state) if "/rootfs" in m] == []


def test_oci_wasm_artifact_runs_from_the_content_store(
    containerd: Containerd, wasm_dir: Path, tmp_path: Path
) -> None:
    """An OCI wasm artifact (config application/vnd.wasm.config.v0+json, one
    application/wasm layer) has no filesystem: containerd 1.6 cannot unpack it, so it is
    imported without unpacking and run with an empty --rootfs; the host finds the image
    from the layotto.io/wasm-image annotation and streams the layer from containerd."""
    ref = "docker.io/library/layotto-echo-artifact:latest"
    builder.build_wasm_artifact(tmp_path / "artifact.tar", wasm_dir / "echoargs.wasm", name=ref)
    containerd.ctr("images", "import", "--no-unpack", str(tmp_path / "artifact.tar"))
    empty = tmp_path / "rootfs"
    empty.mkdir()
    r = containerd.ctr(
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        f"layotto.io/wasm-image={ref}",
        "--rootfs",
        str(empty),
        new_id("artifact"),
        "one",
        "env:HOME",
        "exit:5",
        check=False,
    )
    assert r.returncode == 5, r.stderr
    assert r.stdout.splitlines()[:2] == ["arg[0]=one", "arg[1]=env:HOME"]
    # An annotation naming an ordinary image (no wasm layer) is still a clear error.
    r = containerd.ctr(
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        f"layotto.io/wasm-image={HELLO}",
        "--rootfs",
        str(empty),
        new_id("artifact"),
        "/nothing.wasm",
        check=False,
    )
    assert r.returncode != 0
    assert "/nothing.wasm: no such file in the container image" in r.stderr


def test_tasks_in_another_namespace(images: Containerd, wasm_dir: Path, tmp_path: Path) -> None:
    """containerd forwards ctr's calls without namespace metadata: the host must still
    file each task under its own namespace (taken from the bundle path)."""
    ns = "layotto-ns-test"
    builder.build_image(
        tmp_path / "s.tar", {"/sleeper.wasm": wasm_dir / "sleeper.wasm"}, name=HELLO, cmd=["/sleeper.wasm"]
    )
    images.import_image(tmp_path / "s.tar", namespace=ns)
    task_id = new_id("ns")
    images.ctr("run", "-d", "--runtime", RUNTIME, HELLO, task_id, namespace=ns)
    try:
        wait_for(
            lambda: any(
                line.split()[0] == task_id and line.split()[-1] == "RUNNING"
                for line in images.ctr("tasks", "ls", namespace=ns).stdout.splitlines()[1:]
            )
        )
        metrics = images.ctr("tasks", "metrics", task_id, namespace=ns).stdout
        assert "memory.usage_in_bytes" in metrics
        host_log = (images.state / "layotto" / "host.log").read_text()
        assert f"created {ns}/{task_id}" in host_log
    finally:
        images.ctr("tasks", "kill", "--signal", "SIGKILL", task_id, namespace=ns, check=False)
        wait_for(
            lambda: (
                task_id not in images.ctr("tasks", "ls", namespace=ns).stdout
                or "STOPPED" in images.ctr("tasks", "ls", namespace=ns).stdout
            )
        )
        images.ctr("tasks", "delete", task_id, namespace=ns, check=False)
        images.ctr("containers", "delete", task_id, namespace=ns, check=False)
