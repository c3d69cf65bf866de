"""Functions started in the node host over its Task API directly (ttrpc), as containerd does.

For the scale benchmark's largest step. containerd 1.6 holds three file descriptors per
task: its ttrpc connection to the shim, and two on the task's shim-log fifo (an O_PATH
handle and the fifo opened read-write, kept until the shim's connection closes). A
containerd whose hard RLIMIT_NOFILE is 20,000 therefore runs out near 6,600 tasks, and in
this sandbox no process can raise that limit (CAP_SYS_RESOURCE is dropped). Past what
containerd can hold, the benchmark creates the remaining functions in the same node host
through the same API containerd uses (``containerd.task.v2.Task``: Create with a bundle
holding config.json and a rootfs with the module, then Start), over one connection, in a
containerd namespace of their own; they are then served, measured and deleted like the
others.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from google.protobuf.message import Message

from layotto.shim.protocol import task_pb2
from layotto.shim.ttrpc import Client

SERVICE = "containerd.task.v2.Task"
Call = Callable[[str, Message], Awaitable[None]]  # a Task API method on one connection
NAMESPACE_KEY = "containerd-namespace"


class DirectTasks:
    """Tasks created in a running node host over its ttrpc socket, bypassing containerd."""

    def __init__(
        self,
        socket: str | Path,
        base: Path,
        module: Path,
        *,
        annotations: Mapping[str, str] | None = None,
        namespace: str = "scale-direct",
    ) -> None:
        self.socket = str(socket)
        self.base = base
        self.module = module
        self.annotations = dict(annotations or {})
        self.namespace = namespace
        self.ids: list[str] = []
        self._module_name = module.name
        self._shared = base / "module" / module.name
        self._shared.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(module, self._shared)

    def _bundle(self, task_id: str) -> Path:
        bundle = self.base / "bundles" / task_id
        rootfs = bundle / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)
        target = rootfs / self._module_name
        if not target.exists():
            os.link(self._shared, target)  # one inode for every bundle
        spec = {
            "ociVersion": "1.0.2",
            "process": {"args": [f"/{self._module_name}"], "env": [], "cwd": "/", "terminal": False},
            "root": {"path": "rootfs"},
            "annotations": self.annotations,
            "linux": {},
        }
        (bundle / "config.json").write_text(json.dumps(spec))
        return bundle

    def start(self, ids: Sequence[str], concurrency: int = 8) -> list[float]:
        """Create and start ``ids``; returns each one's Create + Start time in seconds."""
        bundles = {task_id: self._bundle(task_id) for task_id in ids}
        times: list[float] = []

        async def create_and_start(call: Call, task_id: str) -> None:
            began = time.perf_counter()
            await call("Create", task_pb2.CreateTaskRequest(id=task_id, bundle=str(bundles[task_id])))
            self.ids.append(task_id)
            await call("Start", task_pb2.StartRequest(id=task_id))
            times.append(time.perf_counter() - began)

        asyncio.run(self._each(list(ids), create_and_start, concurrency))
        return times

    def delete_all(self, concurrency: int = 8) -> int:
        """Kill and delete every task this created; returns how many were deleted."""
        ids, self.ids = self.ids, []
        deleted: list[str] = []

        async def kill_and_delete(call: Call, task_id: str) -> None:
            await call("Kill", task_pb2.KillRequest(id=task_id, signal=9, all=True))
            await call("Wait", task_pb2.WaitRequest(id=task_id))
            await call("Delete", task_pb2.DeleteRequest(id=task_id))
            deleted.append(task_id)

        asyncio.run(self._each(ids, kill_and_delete, concurrency))
        shutil.rmtree(self.base / "bundles", ignore_errors=True)
        return len(deleted)

    async def _each(
        self, ids: list[str], work: Callable[[Call, str], Awaitable[None]], concurrency: int
    ) -> None:
        """Run ``work`` on every id, ``concurrency`` at a time, over one ttrpc connection."""
        client = await Client.connect(self.socket)
        metadata = {NAMESPACE_KEY: self.namespace}
        queue = list(ids)

        async def call(method: str, request: Message) -> None:
            await client.call(SERVICE, method, request, metadata=metadata, timeout=60)

        async def worker() -> None:
            while queue:
                await work(call, queue.pop())

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            await client.close()
