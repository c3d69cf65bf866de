"""A command's stdout reaches containerd's reader completely, whatever the timing of the
reader's open of the fifo (issue 13): many parallel `ctr run --rm`, a large output, and a
detached task nobody reads.

ctr opens its end of each fifo in a goroutine, so under load the host may get to the
fifo before anyone reads it; the host then keeps the output until the reader comes.
"""

from __future__ import annotations

import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from layotto.images import builder
from tests.conftest import find_host_process
from tests.containerd_env import Containerd
from tests.support import wait_for

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.layotto.v1"
IMAGE = "docker.io/library/layotto-stdio:latest"
GREETING = "Hello from a Layotto nanoprocess!\n"
WORKERS = 8
RUNS_PER_WORKER = 40

_ids = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


@pytest.fixture(scope="module")
def images(containerd: Containerd, wasm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Containerd:
    out = tmp_path_factory.mktemp("stdio-image")
    files = {f"/{m}.wasm": wasm_dir / f"{m}.wasm" for m in ("hello", "echoargs", "sleeper")}
    builder.build_image(out / "stdio.tar", files, name=IMAGE, cmd=["/hello.wasm"])
    containerd.import_image(out / "stdio.tar")
    return containerd


def task_status(c: Containerd, task_id: str) -> str:
    for line in c.ctr("tasks", "ls").stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == task_id:
            return parts[-1]
    return ""


def test_parallel_runs_all_get_their_output(images: Containerd) -> None:
    def worker(n: int) -> list[str]:
        problems = []
        for i in range(RUNS_PER_WORKER):
            if i % 2:
                cmd: tuple[str, ...] = ("/hello.wasm",)
                want = GREETING
            else:
                cmd = ("/echoargs.wasm", f"w{n}", f"run{i}")
                want = f"arg[0]=/echoargs.wasm\narg[1]=w{n}\narg[2]=run{i}\n"
            r = images.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, new_id(f"p{n}"), *cmd, check=False)
            if r.returncode != 0 or r.stdout != want:
                problems.append(
                    f"worker {n} run {i}: status {r.returncode}, stdout {r.stdout!r}, {r.stderr!r}"
                )
        return problems

    # One run first: parallel shims racing to start the node host is another matter.
    images.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, new_id("first"), "/hello.wasm")
    with ThreadPoolExecutor(WORKERS) as pool:
        problems = [p for found in pool.map(worker, range(WORKERS)) for p in found]
    runs = WORKERS * RUNS_PER_WORKER
    assert not problems, f"{len(problems)} of {runs} runs lost output:\n" + "\n".join(problems[:10])


def test_a_large_output_arrives_whole(images: Containerd) -> None:
    # 200 arguments of 1 KiB: echoargs prints each as a line, over 200 KiB in all.
    args = [f"{i:04d}" + "x" * 1020 for i in range(200)]
    r = images.ctr(
        "run", "--rm", "--runtime", RUNTIME, IMAGE, new_id("big"), "/echoargs.wasm", *args, check=False
    )
    assert r.returncode == 0, r.stderr
    want = "arg[0]=/echoargs.wasm\n" + "".join(f"arg[{i + 1}]={a}\n" for i, a in enumerate(args))
    assert len(want) > 200 * 1024
    assert len(r.stdout) == len(want)
    assert r.stdout == want


def test_a_detached_task_nobody_reads_still_exits(images: Containerd) -> None:
    # `ctr run -d` returns once the task started: nobody reads its output afterwards.
    args = [f"{i:04d}" + "y" * 1020 for i in range(200)]
    ids = [new_id("detached") for _ in range(3)]
    try:
        for task_id in ids:
            images.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, task_id, "/echoargs.wasm", *args)
        for task_id in ids:
            wait_for(lambda t=task_id: task_status(images, t) == "STOPPED", timeout=30)
        # The host is not stuck on the fifos: it still runs and prints for others.
        started = time.monotonic()
        r = images.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, new_id("after"), "/hello.wasm", timeout=30)
        assert r.stdout == GREETING
        assert time.monotonic() - started < 10
        host = find_host_process(images)
        assert host is not None and host.is_running()
    finally:
        for task_id in ids:
            images.ctr("tasks", "delete", task_id, check=False)
            images.ctr("containers", "delete", task_id, check=False)
