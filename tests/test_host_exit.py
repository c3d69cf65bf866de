"""Honest exits when the node host goes away (issue 13).

A command module and a function run in the node host; the host is then stopped with
SIGTERM (it reports every task's exit, 143, before it goes) or killed with SIGKILL (the
shim's `delete`, which containerd runs when the host's connection drops, reports 137 and
the time it found the host gone). Every exit event containerd publishes for those tasks
must carry that status and a real time, never 0 and 0001-01-01.

These tests kill the node host, so they run against a containerd of their own.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from layotto.images import builder
from tests.conftest import _started, _stop, find_host_process
from tests.containerd_env import Containerd
from tests.support import wait_for

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.layotto.v1"
IMAGE = "docker.io/library/layotto-hostexit:latest"
MODULES = ("sleeper", "fn-hello")  # a command module, a function
CLEANUP_TIMEOUT = 30.0  # containerd notices the host's end and runs `shim delete`

_ids = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


@pytest.fixture(scope="module")
def c(project_bin: Path, wasm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    containerd = _started(path_prepend=[project_bin], cri=False)
    try:
        out = tmp_path_factory.mktemp("hostexit")
        files = {f"/{m}.wasm": wasm_dir / f"{m}.wasm" for m in MODULES}
        builder.build_image(out / "img.tar", files, name=IMAGE, cmd=["/sleeper.wasm"])
        containerd.import_image(out / "img.tar")
        yield containerd
    finally:
        _stop(containerd)


class Events:
    """`ctr events`, read on a thread: (topic, event) pairs of task events."""

    def __init__(self, c: Containerd) -> None:
        self.proc = c.ctr_popen("events", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[tuple[str, dict]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def collect(self) -> list[tuple[str, dict]]:
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return self.seen
            # "<date> <time> +0000 UTC <namespace> <topic> <json>"
            parts = line.split(maxsplit=6)
            if len(parts) == 7 and parts[5].startswith("/tasks/"):
                try:
                    self.seen.append((parts[5], json.loads(parts[6])))
                except ValueError:
                    pass

    def of(self, task_id: str, topic: str) -> list[dict]:
        return [e for t, e in self.collect() if t == topic and e.get("container_id") == task_id]

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=5)


def task_status(c: Containerd, task_id: str) -> str:
    for line in c.ctr("tasks", "ls").stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == task_id:
            return parts[-1]
    return ""


def exited_year(event: dict) -> int:
    return datetime.fromisoformat(event["exited_at"].replace("Z", "+00:00")[:26]).year


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGKILL, 137)])
def test_tasks_of_a_host_that_goes_away_exit_non_zero_at_a_real_time(
    c: Containerd, sig: signal.Signals, status: int
) -> None:
    events = Events(c)
    tasks = [new_id("cmd"), new_id("fn")]
    try:
        for task_id, module in zip(tasks, MODULES, strict=True):
            c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, task_id, f"/{module}.wasm")
        wait_for(lambda: all(task_status(c, t) == "RUNNING" for t in tasks), what="both tasks running")
        host = find_host_process(c)
        assert host is not None
        wait_for(lambda: all(events.of(t, "/tasks/start") for t in tasks), what="start events")

        host.send_signal(sig)
        host.wait(timeout=20)
        # containerd runs `shim delete` for each task once the host's connection drops,
        # then publishes its exit and forgets the task.
        for task_id in tasks:
            wait_for(
                lambda t=task_id: events.of(t, "/tasks/delete"),
                CLEANUP_TIMEOUT,
                what=f"{task_id}'s delete event",
            )
            assert task_status(c, task_id) in ("STOPPED", "")
        for task_id in tasks:
            exits = events.of(task_id, "/tasks/exit") + events.of(task_id, "/tasks/delete")
            assert exits, task_id
            for event in exits:
                assert event.get("exit_status", 0) == status, (task_id, exits)
                assert exited_year(event) >= 2025, (task_id, exits)
        if sig == signal.SIGTERM:
            # The host itself reported the exit before it went (pid: the host's).
            for task_id in tasks:
                assert any(e.get("pid") == host.pid for e in events.of(task_id, "/tasks/exit")), task_id
    finally:
        events.close()
        for task_id in tasks:
            c.ctr("tasks", "delete", "--force", task_id, check=False)
            c.ctr("containers", "delete", task_id, check=False)
    # The next container gets a new node host.
    after = new_id("after")
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, after, "/sleeper.wasm")
    try:
        assert task_status(c, after) == "RUNNING"
    finally:
        c.ctr("tasks", "kill", "--signal", "SIGKILL", after, check=False)
        wait_for(lambda: task_status(c, after) in ("STOPPED", ""))
        c.ctr("tasks", "delete", after, check=False)
        c.ctr("containers", "delete", after, check=False)
