"""containerd's Task API (containerd.task.v2.Task, also served as v3) for every container.

One node host serves every container on the node. This module keeps containerd's side:
the task table, the CREATED/RUNNING/STOPPED state machine, events, the bundle's rootfs
mounts and where the module is found (the rootfs, its layers, or a wasm layer in the
content store). What runs is a :class:`~layotto.host.workload.Workload` the node host
creates (a pod sandbox placeholder, a command module, a function): this module reaches the
engine only through that seam, and maps its typed errors to ttrpc codes in one place.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from layotto.host.errors import ModuleError
from layotto.host.workload import (
    CRI_IMAGE_NAME,
    ContainerSpec,
    ExitStatus,
    InvalidSpec,
    StartFailed,
    Workload,
    WorkloadError,
    WorkloadHost,
)
from layotto.shim import bundle as oci
from layotto.shim.content import ContainerdContent
from layotto.shim.events import Publisher, bare_any, timestamp
from layotto.shim.modules import ModuleFinder
from layotto.shim.paths import TASK_DIR, write_exit_record
from layotto.shim.protocol import cgroups_v1_pb2, events_pb2, task_pb2, task_types_pb2
from layotto.shim.ttrpc import Code, Context, Method, TtrpcError

log = logging.getLogger(__name__)

SERVICE_NAMES = ("containerd.task.v2.Task", "containerd.task.v3.Task")
NAMESPACE_KEY = "containerd-namespace-ttrpc"
SANDBOX_ANNOTATION = "io.kubernetes.cri.container-type"
HOST_OVERHEAD_BYTES = 64 * 1024  # Store, instance and WASI context of one nanoprocess (measured order)

Status = task_types_pb2.Status


# The seam's errors, as ttrpc codes: the one place they are mapped.
ERROR_CODES: dict[type[WorkloadError], Code] = {
    InvalidSpec: Code.INVALID_ARGUMENT,
    StartFailed: Code.FAILED_PRECONDITION,
}


def ttrpc_error(exc: WorkloadError) -> TtrpcError:
    """The ttrpc error a client sees for ``exc``."""
    for kind, code in ERROR_CODES.items():
        if isinstance(exc, kind):
            return TtrpcError(code, str(exc))
    return TtrpcError(Code.INTERNAL, str(exc))


@dataclass
class Task:
    id: str
    namespace: str
    bundle: Path
    spec: ContainerSpec
    workload: Workload
    mounted: bool
    terminal: bool
    pid: int
    status: int = Status.CREATED
    exit_status: int = 0
    exited_at: float | None = None
    exit_reason: str = ""
    created_at: float = field(default_factory=time.time)
    exited: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class TaskService:
    """The Task API over the node host's workloads; one instance serves every connection."""

    def __init__(
        self, host: WorkloadHost, publisher: Publisher, content: ContainerdContent | None = None
    ) -> None:
        self.host = host
        self.publisher = publisher
        self.modules = ModuleFinder(host, content)
        self.tasks: dict[tuple[str, str], Task] = {}
        self.pid = os.getpid()

    def methods(self) -> dict[str, Method]:
        def m(request_type: type[Message], handler: object) -> Method:
            return Method(request_type, handler)

        return {
            "Create": m(task_pb2.CreateTaskRequest, self.create),
            "Start": m(task_pb2.StartRequest, self.start),
            "Wait": m(task_pb2.WaitRequest, self.wait),
            "State": m(task_pb2.StateRequest, self.state),
            "Kill": m(task_pb2.KillRequest, self.kill),
            "Delete": m(task_pb2.DeleteRequest, self.delete),
            "Connect": m(task_pb2.ConnectRequest, self.connect),
            "Shutdown": m(task_pb2.ShutdownRequest, self.shutdown),
            "Pids": m(task_pb2.PidsRequest, self.pids),
            "Stats": m(task_pb2.StatsRequest, self.stats),
            "Pause": m(task_pb2.PauseRequest, self._unsupported("pause")),
            "Resume": m(task_pb2.ResumeRequest, self._unsupported("resume")),
            "Checkpoint": m(task_pb2.CheckpointTaskRequest, self._unsupported("checkpoint")),
            "Exec": m(task_pb2.ExecProcessRequest, self._unsupported("exec")),
            "ResizePty": m(task_pb2.ResizePtyRequest, self._unsupported("terminals")),
            "CloseIO": m(task_pb2.CloseIORequest, self.close_io),
            "Update": m(task_pb2.UpdateTaskRequest, self._unsupported("update")),
        }

    # --- helpers ---------------------------------------------------------------------

    @staticmethod
    def _unsupported(what: str) -> object:
        async def handler(_request: Message, _ctx: Context) -> Message:
            raise TtrpcError(Code.UNIMPLEMENTED, f"{what} is not supported by the layotto runtime")

        return handler

    def _namespace(self, ctx: Context, task_id: str = "") -> str:
        """The containerd namespace of a request.

        CRI sends it as ttrpc metadata; calls containerd makes for ctr carry none. Then it
        is the one remembered for this connection (containerd dials once per container,
        and Create names the bundle, which sits under the namespace's directory), or the
        namespace of the only task with this id.
        """
        namespace = ctx.get(NAMESPACE_KEY)
        if namespace:
            return namespace
        namespace = ctx.connection.get("namespace", "")
        if namespace:
            return namespace
        if task_id:
            matches = [ns for (ns, tid) in self.tasks if tid == task_id]
            if len(matches) == 1:
                return matches[0]
        return "default"

    @staticmethod
    def _namespace_of_bundle(bundle: Path) -> str:
        if bundle.parent.parent.name == TASK_DIR and bundle.parent.name:
            return bundle.parent.name
        return ""

    def _task(self, ctx: Context, task_id: str, exec_id: str = "") -> Task:
        if exec_id:
            raise TtrpcError(Code.NOT_FOUND, f"exec {exec_id} in task {task_id}: exec is not supported")
        task = self.tasks.get((self._namespace(ctx, task_id), task_id))
        if task is None:
            raise TtrpcError(Code.NOT_FOUND, f"task {task_id} not found")
        return task

    def _publish(self, task: Task, topic: str, event: Message) -> None:
        self.publisher.publish(task.namespace, topic, event)

    # --- Create / Start ----------------------------------------------------------------

    async def create(self, req: task_pb2.CreateTaskRequest, ctx: Context) -> task_pb2.CreateTaskResponse:
        namespace = ctx.get(NAMESPACE_KEY) or self._namespace_of_bundle(Path(req.bundle)) or "default"
        ctx.connection["namespace"] = namespace
        if (namespace, req.id) in self.tasks:
            raise TtrpcError(Code.ALREADY_EXISTS, f"task {req.id} already exists")
        if req.checkpoint:
            raise TtrpcError(Code.UNIMPLEMENTED, "checkpoint restore is not supported by the layotto runtime")
        bundle = Path(req.bundle)
        try:
            bundle_spec = await asyncio.to_thread(oci.BundleSpec.load, bundle)
        except ModuleError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from exc
        if req.terminal or bundle_spec.process.terminal:
            raise TtrpcError(
                Code.INVALID_ARGUMENT,
                "a terminal (tty) is not supported by the layotto runtime: run without -t",
            )
        spec = _container_spec(req, namespace, bundle_spec)
        try:
            self.host.check(spec)  # before anything is mounted or compiled
        except WorkloadError as exc:
            raise ttrpc_error(exc) from exc
        mounts = [oci.Mount(m.type, m.source, list(m.options)) for m in req.rootfs]
        # A function module is served without its rootfs mounted (see oci.find_in_layers).
        module = await self.modules.function_in_layers(spec, bundle_spec, mounts) if mounts else None
        rootfs, mounted = bundle_spec.root_path, False
        if module is None:
            try:
                if mounts:
                    rootfs = await asyncio.to_thread(oci.mount_rootfs, bundle, mounts)
                    mounted = True
            except OSError as exc:
                raise TtrpcError(Code.INTERNAL, f"mounting the rootfs of {req.id}: {exc}") from exc
        try:
            if module is None and not spec.sandbox:
                module = await self.modules.locate(bundle_spec, rootfs, namespace, req.id)
            spec = replace(spec, rootfs=rootfs, module=module)
            workload = self.host.create(spec)
        except BaseException as exc:
            if mounted:
                await asyncio.to_thread(oci.unmount_rootfs, bundle)
            if isinstance(exc, WorkloadError):
                raise ttrpc_error(exc) from exc
            raise
        task = Task(
            id=req.id,
            namespace=namespace,
            bundle=bundle,
            spec=spec,
            workload=workload,
            mounted=mounted,
            terminal=req.terminal,
            pid=self.pid,
        )
        self.tasks[(namespace, req.id)] = task
        log.info(
            "created %s/%s: %s",
            namespace,
            req.id,
            "pod sandbox" if module is None else f"{module.source.location} ({module.from_cache})",
        )
        self._publish(
            task,
            "/tasks/create",
            events_pb2.TaskCreate(
                container_id=req.id,
                bundle=req.bundle,
                rootfs=list(req.rootfs),
                io=events_pb2.TaskIO(
                    stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal
                ),
                checkpoint=req.checkpoint,
                pid=task.pid,
            ),
        )
        return task_pb2.CreateTaskResponse(pid=task.pid)

    async def start(self, req: task_pb2.StartRequest, ctx: Context) -> task_pb2.StartResponse:
        task = self._task(ctx, req.id, req.exec_id)
        if task.status != Status.CREATED:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"task {req.id} was already started")
        task.status = Status.RUNNING
        self._publish(task, "/tasks/start", events_pb2.TaskStart(container_id=task.id, pid=task.pid))
        loop = asyncio.get_running_loop()
        try:
            await task.workload.start(lambda ended: loop.call_soon_threadsafe(self._on_exit, task, ended))
        except StartFailed as exc:
            # Mark it stopped now, not when an exit callback gets scheduled: the client's
            # Delete follows this error immediately.
            self._on_exit(task, exc.exit)
            raise ttrpc_error(exc) from exc
        return task_pb2.StartResponse(pid=task.pid)

    def _on_exit(self, task: Task, info: ExitStatus) -> None:
        if task.exited.done():
            return
        task.status = Status.STOPPED
        task.exit_status = info.status
        task.exited_at = info.exited_at
        task.exit_reason = info.reason
        if info.oom:
            self._publish(task, "/tasks/oom", events_pb2.TaskOOM(container_id=task.id))
        self._publish(
            task,
            "/tasks/exit",
            events_pb2.TaskExit(
                container_id=task.id,
                id=task.id,
                pid=task.pid,
                exit_status=info.status,
                exited_at=timestamp(info.exited_at),
            ),
        )
        task.exited.set_result(None)
        log.info("exited %s/%s: status %d %s", task.namespace, task.id, info.status, info.reason)

    # --- Wait / State / Kill / Delete -----------------------------------------------

    async def wait(self, req: task_pb2.WaitRequest, ctx: Context) -> task_pb2.WaitResponse:
        task = self._task(ctx, req.id, req.exec_id)
        await asyncio.shield(task.exited)
        return task_pb2.WaitResponse(exit_status=task.exit_status, exited_at=timestamp(task.exited_at))

    async def state(self, req: task_pb2.StateRequest, ctx: Context) -> task_pb2.StateResponse:
        task = self._task(ctx, req.id, req.exec_id)
        response = task_pb2.StateResponse(
            id=task.id,
            bundle=str(task.bundle),
            pid=task.pid,
            status=task.status,
            stdin=task.spec.stdin,
            stdout=task.spec.stdout,
            stderr=task.spec.stderr,
            terminal=task.terminal,
            exit_status=task.exit_status,
        )
        if task.exited_at is not None:
            response.exited_at.CopyFrom(timestamp(task.exited_at))
        return response

    async def kill(self, req: task_pb2.KillRequest, ctx: Context) -> empty_pb2.Empty:
        task = self._task(ctx, req.id, req.exec_id)
        if task.status == Status.STOPPED:
            raise TtrpcError(Code.NOT_FOUND, f"task {req.id}: process already finished")
        if req.signal == 0:
            return empty_pb2.Empty()
        ended = task.workload.kill(req.signal)
        if ended is not None:  # it ended right here (else its exit follows)
            self._on_exit(task, ended)
        return empty_pb2.Empty()

    async def delete(self, req: task_pb2.DeleteRequest, ctx: Context) -> task_pb2.DeleteResponse:
        task = self._task(ctx, req.id, req.exec_id)
        if task.status == Status.RUNNING:
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"task {req.id} must be stopped before deletion: running"
            )
        task.workload.close()
        if task.mounted:
            await asyncio.to_thread(oci.unmount_rootfs, task.bundle)
            task.mounted = False
        self.tasks.pop((task.namespace, task.id), None)
        exited_at = timestamp(task.exited_at if task.exited_at is not None else time.time())
        self._publish(
            task,
            "/tasks/delete",
            events_pb2.TaskDelete(
                container_id=task.id, pid=task.pid, exit_status=task.exit_status, exited_at=exited_at
            ),
        )
        log.info("deleted %s/%s", task.namespace, task.id)
        return task_pb2.DeleteResponse(pid=task.pid, exit_status=task.exit_status, exited_at=exited_at)

    # --- the rest ----------------------------------------------------------------------

    async def connect(self, req: task_pb2.ConnectRequest, ctx: Context) -> task_pb2.ConnectResponse:
        task = self.tasks.get((self._namespace(ctx, req.id), req.id))
        return task_pb2.ConnectResponse(shim_pid=self.pid, task_pid=task.pid if task else 0)

    async def shutdown(self, req: task_pb2.ShutdownRequest, ctx: Context) -> empty_pb2.Empty:
        # The node host outlives every container: it serves the whole node.
        return empty_pb2.Empty()

    async def pids(self, req: task_pb2.PidsRequest, ctx: Context) -> task_pb2.PidsResponse:
        task = self._task(ctx, req.id)
        if task.status != Status.RUNNING:
            return task_pb2.PidsResponse()
        return task_pb2.PidsResponse(processes=[task_types_pb2.ProcessInfo(pid=task.pid)])

    async def close_io(self, req: task_pb2.CloseIORequest, ctx: Context) -> empty_pb2.Empty:
        self._task(ctx, req.id, req.exec_id)
        return empty_pb2.Empty()

    async def stats(self, req: task_pb2.StatsRequest, ctx: Context) -> task_pb2.StatsResponse:
        task = self._task(ctx, req.id)
        running = task.status == Status.RUNNING
        used = task.workload.stats()
        usage = used.memory_bytes + HOST_OVERHEAD_BYTES if running else 0
        cpu_ns = int(used.cpu_seconds * 1e9)
        limit = task.spec.memory_limit or 0
        metrics = cgroups_v1_pb2.Metrics(
            pids=cgroups_v1_pb2.PidsStat(current=1 if running else 0),
            cpu=cgroups_v1_pb2.CPUStat(
                usage=cgroups_v1_pb2.CPUUsage(total=cpu_ns, user=cpu_ns, per_cpu=[cpu_ns]),
                throttling=cgroups_v1_pb2.Throttle(
                    periods=used.periods,
                    throttled_periods=used.throttled_periods,
                    throttled_time=int(used.throttled_seconds * 1e9),
                ),
            ),
            memory=cgroups_v1_pb2.MemoryStat(
                rss=usage,
                total_rss=usage,
                hierarchical_memory_limit=limit,
                usage=cgroups_v1_pb2.MemoryEntry(usage=usage, limit=limit, max=usage),
            ),
        )
        return task_pb2.StatsResponse(stats=bare_any(metrics))

    # --- layotto ps / layotto logs ----------------------------------------------------

    def describe(self) -> list[dict[str, object]]:
        """Every task on the node, for ``layotto ps``: the tenant namespace (the pod's
        Kubernetes namespace, else the containerd namespace), the pod and container names
        CRI gives, its state, and what its workload reports."""
        rows: list[dict[str, object]] = []
        names = {Status.CREATED: "created", Status.RUNNING: "running", Status.STOPPED: "stopped"}
        for task in self.tasks.values():
            spec = task.spec
            row: dict[str, object] = {
                "namespace": spec.tenant,
                "containerd_namespace": task.namespace,
                "id": task.id,
                "pod": spec.pod,
                "container": spec.container,
                "state": names.get(task.status, "unknown"),
                "image": spec.annotations.get(CRI_IMAGE_NAME, ""),
                "exit_status": task.exit_status if task.status == Status.STOPPED else None,
            }
            row.update(task.workload.describe())  # kind, module, memory, cpu_seconds, function_id, ...
            rows.append(row)
        return rows

    def logs(self, name: str) -> list[str] | None:
        """The recent output of a task (by id, or namespace/id with its tenant or containerd
        namespace), or None for no such task."""
        for task in self.tasks.values():
            if name in (task.id, f"{task.namespace}/{task.id}", f"{task.spec.tenant}/{task.id}"):
                return task.workload.log_lines()
        return None

    # --- host shutdown -------------------------------------------------------------------

    async def close(self) -> None:
        """The host is going away: every task it has not seen end ends now, as a process
        sent SIGTERM would (status 143, this time), its exit published and its Wait
        answered; every task's exit is recorded in its bundle, for the shim's ``delete``
        that containerd runs once the host is gone. Then every workload is stopped and
        every rootfs unmounted."""
        now = time.time()
        tasks = list(self.tasks.values())
        for task in tasks:
            if task.status != Status.STOPPED:
                self._on_exit(task, ExitStatus(128 + signal.SIGTERM, now, "the node host stopped"))
        records = [(task.bundle, task.exit_status, task.exited_at or now) for task in tasks]
        await asyncio.to_thread(_record_exits, records)
        for task in tasks:
            task.workload.close()
            if task.mounted:
                await asyncio.to_thread(oci.unmount_rootfs, task.bundle)
                task.mounted = False


def _record_exits(records: list[tuple[Path, int, float]]) -> None:
    for bundle, status, exited_at in records:
        try:
            write_exit_record(bundle, status, exited_at)
        except OSError as exc:
            log.warning("recording the exit of %s: %s", bundle.name, exc)


def _container_spec(req: task_pb2.CreateTaskRequest, namespace: str, bundle: oci.BundleSpec) -> ContainerSpec:
    """What the host is told of a container (its module and mounted rootfs come later)."""
    return ContainerSpec(
        id=req.id,
        namespace=namespace,
        annotations=dict(bundle.annotations),
        args=list(bundle.process.args),
        env=list(bundle.process.env),
        cwd=bundle.process.cwd,
        rootfs=bundle.root_path,
        readonly=bundle.readonly,
        mounts=tuple(bundle.mounts),
        stdin=req.stdin,
        stdout=req.stdout,
        stderr=req.stderr,
        memory_limit=bundle.memory_limit,
        cpu_quota_us=bundle.cpu_quota_us,
        cpu_period_us=bundle.cpu_period_us,
        cpu_shares=bundle.cpu_shares,
        sandbox=bundle.annotations.get(SANDBOX_ANNOTATION) == "sandbox",
        netns=bundle.netns,
    )
