"""containerd's Task API (containerd.task.v2.Task, also served as v3) for every container.

One node host serves every container on the node: each container's task is a nanoprocess
(or, for a pod's sandbox container, a placeholder that runs until it is killed).
Semantics follow what containerd 1.6+ relies on: see shared/reference/shim-protocol.md §3.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from layotto.host import scoping
from layotto.host.components import Delivery
from layotto.host.components import Message as PubSubMessage
from layotto.host.engine import CompiledModule, PoolSettings
from layotto.host.errors import ModuleError
from layotto.host.function import Function, HostServices, Request, is_function_module
from layotto.host.function_registry import FunctionRegistry, IdTaken
from layotto.host.nanoprocess import ExitInfo, Nanoprocess, Output, ProcessSpec
from layotto.host.policy import DEFAULT_POLICY, ComponentView, Policy, PolicyError
from layotto.host.runtime import NodeRuntime
from layotto.shim import admission as notes
from layotto.shim import bundle as oci
from layotto.shim.content import MAX_MODULE_BYTES, ContainerdContent
from layotto.shim.events import Publisher, bare_any, timestamp
from layotto.shim.paths import TASK_DIR
from layotto.shim.protocol import cgroups_v1_pb2, events_pb2, task_pb2, task_types_pb2
from layotto.shim.ttrpc import Code, Context, Method, TtrpcError

log = logging.getLogger(__name__)

SERVICE_NAMES = ("containerd.task.v2.Task", "containerd.task.v3.Task")
NAMESPACE_KEY = "containerd-namespace-ttrpc"
SANDBOX_ANNOTATION = "io.kubernetes.cri.container-type"
CRI_IMAGE_ANNOTATION = "io.kubernetes.cri.image-name"
WASM_IMAGE_ANNOTATION = "layotto.io/wasm-image"  # for `ctr run --rootfs`, which records no image
CRI_CONTAINER_NAME_ANNOTATION = "io.kubernetes.cri.container-name"
CRI_SANDBOX_NAMESPACE_ANNOTATION = "io.kubernetes.cri.sandbox-namespace"
HOST_OVERHEAD_BYTES = 64 * 1024  # Store, instance and WASI context of one nanoprocess (measured order)

Status = task_types_pb2.Status


@dataclass
class Task:
    id: str
    namespace: str
    bundle: Path
    spec: oci.BundleSpec
    rootfs: Path
    mounted: bool
    stdin: str
    stdout: str
    stderr: str
    terminal: bool
    pid: int
    compiled: CompiledModule | None = None  # None: a pod sandbox placeholder
    admission: notes.Admission | None = None  # its annotations, checked against the policy
    module_path: str = ""
    entry: str = "_start"
    status: int = Status.CREATED
    proc: Nanoprocess | None = None
    function: Function | None = None  # a function module serving HTTP requests
    unsubscribe: list = field(default_factory=list)  # pub/sub subscriptions to cancel
    outputs: list = field(default_factory=list)  # a function's stdio, closed when it stops
    exit_status: int = 0
    exited_at: float | None = None
    exit_reason: str = ""
    created_at: float = field(default_factory=time.time)
    exited: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def is_sandbox(self) -> bool:
        return self.compiled is None


class TaskService:
    """The Task API over the node runtime; one instance serves every connection."""

    def __init__(
        self,
        runtime: NodeRuntime,
        publisher: Publisher,
        content: ContainerdContent | None = None,
        functions: FunctionRegistry | None = None,
        policy: Policy = DEFAULT_POLICY,
    ) -> None:
        self.runtime = runtime
        self.policy = policy
        self.publisher = publisher
        self.content = content
        self.functions = functions
        self.tasks: dict[tuple[str, str], Task] = {}
        self.pid = os.getpid()

    def methods(self) -> dict[str, Method]:
        def m(request_type: type[Message], handler: object) -> Method:
            return Method(request_type, handler)  # type: ignore[arg-type]

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
            spec = await asyncio.to_thread(oci.BundleSpec.load, bundle)
        except ModuleError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from exc
        if req.terminal or spec.process.terminal:
            raise TtrpcError(
                Code.INVALID_ARGUMENT,
                "a terminal (tty) is not supported by the layotto runtime: run without -t",
            )
        admission = None
        if spec.annotations.get(SANDBOX_ANNOTATION) != "sandbox":
            try:
                admission = notes.admit(
                    spec.annotations, spec.memory_limit, _tenant_namespace(spec, namespace), self.policy
                )
            except PolicyError as exc:
                raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from exc
        mounts = [oci.Mount(m.type, m.source, list(m.options)) for m in req.rootfs]
        # A function module is served without its rootfs mounted (see oci.find_in_layers).
        loaded = await self._load_function_unmounted(spec, mounts) if mounts else None
        if loaded is not None:
            compiled, module_path, entry = loaded
            rootfs, mounts = spec.root_path, []
        else:
            rootfs = spec.root_path
            try:
                if mounts:
                    rootfs = await asyncio.to_thread(oci.mount_rootfs, bundle, mounts)
            except OSError as exc:
                raise TtrpcError(Code.INTERNAL, f"mounting the rootfs of {req.id}: {exc}") from exc
            try:
                compiled, module_path, entry = await self._load_module(spec, rootfs, namespace, req.id)
            except BaseException:
                if mounts:
                    await asyncio.to_thread(oci.unmount_rootfs, bundle)
                raise
        task = Task(
            id=req.id,
            namespace=namespace,
            bundle=bundle,
            spec=spec,
            rootfs=rootfs,
            mounted=bool(mounts),
            stdin=req.stdin,
            stdout=req.stdout,
            stderr=req.stderr,
            terminal=req.terminal,
            pid=self.pid,
            compiled=compiled,
            module_path=module_path,
            entry=entry,
            admission=admission,
        )
        self.tasks[(namespace, req.id)] = task
        log.info(
            "created %s/%s: %s",
            namespace,
            req.id,
            "pod sandbox" if compiled is None else f"{module_path} ({compiled.from_cache})",
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

    async def _load_function_unmounted(
        self, spec: oci.BundleSpec, mounts: list[oci.Mount]
    ) -> tuple[CompiledModule, str, str] | None:
        """A function module read from the rootfs's layers, or None: not found plainly there,
        a command module (it gets its filesystem), a pod sandbox, no ingress, or any error
        (the mounted path then reports it)."""
        if self.functions is None or spec.annotations.get(SANDBOX_ANNOTATION) == "sandbox":
            return None
        try:
            ref = await asyncio.to_thread(oci.locate_module_in_layers, spec, mounts)
            if ref is None:
                return None
            compiled = await asyncio.to_thread(self.runtime.load, ref.host_path, name=ref.image_path)
        except (ModuleError, OSError):
            return None
        if ref.entry != "_start" or not is_function_module(compiled):
            return None
        return compiled, ref.image_path, ref.entry

    async def _load_module(
        self, spec: oci.BundleSpec, rootfs: Path, namespace: str, task_id: str
    ) -> tuple[CompiledModule | None, str, str]:
        if spec.annotations.get(SANDBOX_ANNOTATION) == "sandbox":
            return None, "", ""
        try:
            try:
                ref = await asyncio.to_thread(oci.locate_module, spec, rootfs)
            except ModuleError as missing:
                # No module file in the rootfs: the image may carry it as an OCI wasm layer.
                found = await self._load_from_layers(spec, namespace, task_id)
                if found is None:
                    raise missing from None
                return found
            compiled = await asyncio.to_thread(self.runtime.load, ref.host_path, name=ref.image_path)
        except ModuleError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from exc
        except OSError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"reading the module: {exc}") from exc
        self._check_entry(compiled, ref.image_path, ref.entry)
        return compiled, ref.image_path, ref.entry

    async def _load_from_layers(
        self, spec: oci.BundleSpec, namespace: str, task_id: str
    ) -> tuple[CompiledModule, str, str] | None:
        """The module from the image's wasm layer, or None for an image without one."""
        if self.content is None:
            return None
        # The container's own image; layotto.io/wasm-image only for a container that has
        # none (`ctr run --rootfs`): never another image's module for an image's container.
        image = spec.annotations.get(CRI_IMAGE_ANNOTATION)
        try:
            if not image:
                image = await asyncio.to_thread(self.content.image_of_container, namespace, task_id)
            if not image:
                image = spec.annotations.get(WASM_IMAGE_ANNOTATION)
            if not image:
                return None
            layers = await asyncio.to_thread(self.content.wasm_layers, namespace, image)
            if not layers:
                return None
            if len(layers) > 1:
                raise ModuleError(
                    f"image {image} has {len(layers)} wasm layers; the layotto runtime runs one module"
                )
            layer = layers[0]
            wasm = await asyncio.to_thread(self.content.read, namespace, layer.digest, MAX_MODULE_BYTES)
        except ModuleError:
            raise
        except Exception as exc:  # grpc errors: containerd unreachable, image unknown, ...
            log.info("no wasm layers for %s/%s: %s", namespace, task_id, exc)
            return None
        name = f"{image} (layer {layer.digest[:19]})"
        compiled = await asyncio.to_thread(self.runtime.engine.load, wasm, name=name)
        args = spec.process.args
        entry = "_start"
        if args and args[0].startswith("#"):
            entry = args[0][1:] or "_start"
        self._check_entry(compiled, name, entry)
        return compiled, image, entry

    @staticmethod
    def _check_entry(compiled: CompiledModule, name: str, entry: str) -> None:
        if entry == "_start" and is_function_module(compiled):
            return  # a function module: served through the ingress, not run
        if entry not in compiled.exports:
            raise TtrpcError(
                Code.INVALID_ARGUMENT,
                f"{name} has no export named {entry!r} "
                f"(it exports: {', '.join(sorted(compiled.exports)) or 'nothing'})",
            )

    async def start(self, req: task_pb2.StartRequest, ctx: Context) -> task_pb2.StartResponse:
        task = self._task(ctx, req.id, req.exec_id)
        if task.status != Status.CREATED:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"task {req.id} was already started")
        task.status = Status.RUNNING
        self._publish(task, "/tasks/start", events_pb2.TaskStart(container_id=task.id, pid=task.pid))
        if task.compiled is None:
            return task_pb2.StartResponse(pid=task.pid)
        if is_function_module(task.compiled) and self.functions is not None:
            await self._start_function(task)
            return task_pb2.StartResponse(pid=task.pid)
        admission = task.admission
        assert admission is not None
        args = list(task.spec.process.args)
        if task.module_path.startswith("/"):  # from the rootfs: argv[0] is its path in the image
            args[0] = task.module_path
        elif not args or args[0].startswith("#"):  # from a wasm layer: argv[0] names the image
            args = [task.module_path, *args[1:]]
        spec = ProcessSpec(
            name=f"{task.namespace}/{task.id}",
            args=args,
            env=task.spec.process.env,
            rootfs=task.rootfs,
            cwd=task.spec.process.cwd,
            entry=task.entry,
            stdin=task.stdin,
            stdout=task.stdout,
            stderr=task.stderr,
            memory_limit=admission.memory_limit,
            capabilities=admission.capabilities,
            app_id=self._app_id(task) or f"{task.namespace}.{task.id}",
            services=self._services(admission),
            cpu_quota_us=task.spec.cpu_quota_us,
            cpu_period_us=task.spec.cpu_period_us,
            namespace=admission.namespace,
            readonly=task.spec.readonly,
            mounts=tuple(task.spec.mounts),
        )
        loop = asyncio.get_running_loop()
        try:
            proc = self.runtime.spawn(task.compiled, spec)
            proc.on_exit(lambda info: loop.call_soon_threadsafe(self._on_exit, task, info))
            ready = proc.start()
        except (ModuleError, OSError) as exc:
            self._on_exit(task, ExitInfo(1, time.time(), str(exc)))
            raise TtrpcError(Code.FAILED_PRECONDITION, str(exc)) from exc
        task.proc = proc
        await asyncio.to_thread(ready.wait)
        if proc.start_error is not None:
            # Mark it stopped now, not when the thread's exit callback gets scheduled:
            # the client's Delete follows this error immediately.
            self._on_exit(task, proc.exit or ExitInfo(1, time.time(), str(proc.start_error)))
            raise TtrpcError(Code.FAILED_PRECONDITION, str(proc.start_error))
        return task_pb2.StartResponse(pid=task.pid)

    async def _start_function(self, task: Task) -> None:
        """Instantiate a function module and register it with the ingress."""
        annotations = task.spec.annotations
        admission = task.admission
        assert admission is not None
        # The id: the annotation, else what a Layotto-style module calls itself
        # (proxy_get_id), else the container's name, else the task id.
        function_id = annotations.get(notes.FUNCTION_ID, "")
        fallback_id = annotations.get(CRI_CONTAINER_NAME_ANNOTATION) or task.id
        env = [tuple(e.split("=", 1)) if "=" in e else (e, "") for e in task.spec.process.env]
        fresh = admission.fresh
        engine, linker, compiled = self.runtime.engine, self.runtime.linker, task.compiled
        if fresh and admission.memory_limit <= PoolSettings.max_memory_size:
            # A Store per request: take it from the pooling allocator's slots.
            engine, linker = await asyncio.to_thread(self.runtime.pooled)
            compiled = await asyncio.to_thread(self.runtime.engine.to_pooled, task.compiled)
        try:
            fn = await asyncio.to_thread(
                Function,
                name=f"{task.namespace}/{task.id}",
                function_id=function_id,
                engine=engine,
                linker=linker,
                compiled=compiled,
                argv=[task.module_path, *task.spec.process.args[1:]],
                env=env,
                memory_limit=admission.memory_limit,
                pool_size=admission.pool_size,
                fresh_instances=fresh,
                timeout=admission.timeout,
                queue_limit=admission.queue_limit,
                capabilities=admission.capabilities,
                app_id=self._app_id(task),
                services=self._services(admission),
                image=annotations.get(CRI_IMAGE_ANNOTATION, task.module_path),
                namespace=admission.namespace,
            )
        except ModuleError as exc:
            self._on_exit(task, ExitInfo(1, time.time(), str(exc)))
            raise TtrpcError(Code.FAILED_PRECONDITION, str(exc)) from exc
        if not fn.id:
            fn.id = fallback_id
            fn.app_id = fn.app_id or fallback_id
        self._wire_output(task, fn)
        task.function = fn
        assert self.functions is not None
        try:
            self.functions.add(fn)
        except IdTaken as exc:
            fn.stop()
            self._on_exit(task, ExitInfo(1, time.time(), str(exc)))
            raise TtrpcError(Code.FAILED_PRECONDITION, str(exc)) from exc
        self._subscribe(task, fn)
        log.info(
            "function %s serving as id %r (%s)",
            fn.name,
            fn.id,
            "fresh instances" if fn.fresh else f"pool {fn.pool_size}",
        )

    @staticmethod
    def _wire_output(task: Task, fn: Function) -> None:
        """Send the function's output lines to the container's stdout/stderr as well."""
        try:
            out = Output(task.stdout, lazy=True)
            err = Output(task.stderr, lazy=True) if task.stderr and task.stderr != task.stdout else out
        except OSError as exc:
            log.warning("%s: cannot open the container's stdio: %s", fn.name, exc)
            return
        fn.log.sinks = {"stdout": out.write, "stderr": err.write}
        task.outputs = [out, err]

    def _services(self, admission: notes.Admission) -> HostServices:
        """The components and invoker as one namespace's pods may reach them."""
        services = self.runtime.services
        components = services.components
        if components is not None:
            components = ComponentView(components, admission.rules, admission.namespace)
        return HostServices(components, services.invoker)

    @staticmethod
    def _app_id(task: Task) -> str:
        """Who owns a function's state keys: ``<namespace>.<app>`` (annotation
        ``layotto.io/app-id`` names the app; else the container name or function id)."""
        annotations = task.spec.annotations
        namespace = _tenant_namespace(task.spec, task.namespace)
        app = (
            annotations.get(notes.APP_ID)
            or annotations.get(notes.FUNCTION_ID)
            or annotations.get(CRI_CONTAINER_NAME_ANNOTATION)
            or ""
        )
        return f"{namespace}.{app}" if app else ""

    def _subscribe(self, task: Task, fn: Function) -> None:
        """Deliver the pub/sub topics the pod subscribes to (annotation
        ``layotto.io/subscriptions: <pubsub>/<topic>,...``) to the function as
        ``POST /<topic>`` requests: 2xx acknowledges, 404 drops, anything else retries."""
        admission = task.admission
        components = fn.services.components if fn.services is not None else None
        if admission is None or components is None:
            return
        cancels = []
        for pubsub_name, topic in admission.subscriptions:
            item = f"{pubsub_name}/{topic}"
            try:
                pubsub = components.pubsub(pubsub_name)
                # Topics are per namespace: another namespace's publishers never reach it.
                scoped = scoping.scoped_topic(components, pubsub_name, admission.namespace, topic)
            except Exception as exc:
                log.warning("%s: cannot subscribe to %s: %s", fn.name, item, exc)
                fn.log.add("host", f"cannot subscribe to {item}: {exc}")
                continue
            cancels.append(pubsub.subscribe(scoped, _deliverer(fn, topic)))
            fn.log.add("host", f"subscribed to {item}")
        task.unsubscribe = cancels + self._watch_configuration(task, fn)

    def _watch_configuration(self, task: Task, fn: Function) -> list:
        """Tell the function about configuration changes (annotation
        ``layotto.io/config-subscriptions: <store>/<key>[+<key>...],...``): each change is a
        ``POST /_layotto/config/<store>`` request whose body is a JSON list of the changed
        items (key, content, group, label; deleted items have ``"deleted": true``)."""
        admission = task.admission
        components = fn.services.components if fn.services is not None else None
        if admission is None or components is None:
            return []
        cancels = []
        for store_name, keys in admission.config_subscriptions:
            item = f"{store_name}/{'+'.join(keys)}"
            try:
                # The function sees its own app's items only, under the keys it named.
                cancel = scoping.subscribe_configuration(
                    components,
                    store_name,
                    admission.namespace,
                    fn.app_id,
                    keys,
                    _config_notifier(fn, store_name),
                )
            except Exception as exc:
                fn.log.add("host", f"cannot watch configuration {item}: {exc}")
                continue
            cancels.append(cancel)
            fn.log.add("host", f"watching configuration {item}")
        return cancels

    def _on_exit(self, task: Task, info: ExitInfo) -> None:
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
            stdin=task.stdin,
            stdout=task.stdout,
            stderr=task.stderr,
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
        if task.function is not None:
            for cancel in task.unsubscribe:
                cancel()
            task.function.stop()
            task.function.log.sinks = {}
            for out in task.outputs:
                out.close()
            if self.functions is not None:
                self.functions.remove(task.function)
            self._on_exit(task, ExitInfo(128 + req.signal, time.time(), f"stopped by signal {req.signal}"))
            return empty_pb2.Empty()
        if task.status == Status.CREATED or task.proc is None:
            # Never started, or a pod sandbox placeholder: it ends right here.
            self._on_exit(task, ExitInfo(128 + req.signal, time.time(), f"killed by signal {req.signal}"))
            return empty_pb2.Empty()
        task.proc.kill(req.signal)
        return empty_pb2.Empty()

    async def delete(self, req: task_pb2.DeleteRequest, ctx: Context) -> task_pb2.DeleteResponse:
        task = self._task(ctx, req.id, req.exec_id)
        if task.status == Status.RUNNING:
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"task {req.id} must be stopped before deletion: running"
            )
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
        proc = task.proc
        fn = task.function
        if fn is not None:
            linear = fn.memory_bytes()
            cpu_seconds = fn.stats.cpu_seconds
        else:
            linear = proc.memory_bytes() if proc is not None else 0
            cpu_seconds = proc.cpu_seconds() if proc is not None else 0.0
        usage = linear + HOST_OVERHEAD_BYTES if task.status == Status.RUNNING else 0
        cpu_ns = int(cpu_seconds * 1e9)
        limit = task.spec.memory_limit or 0
        metrics = cgroups_v1_pb2.Metrics(
            pids=cgroups_v1_pb2.PidsStat(current=1 if task.status == Status.RUNNING else 0),
            cpu=cgroups_v1_pb2.CPUStat(
                usage=cgroups_v1_pb2.CPUUsage(total=cpu_ns, user=cpu_ns, per_cpu=[cpu_ns]),
                throttling=cgroups_v1_pb2.Throttle(
                    periods=proc.throttle.periods if proc else 0,
                    throttled_periods=proc.throttle.throttled_periods if proc else 0,
                    throttled_time=int(proc.throttle.throttled_seconds * 1e9) if proc else 0,
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
        """Every task on the node, for ``layotto ps``."""
        rows: list[dict[str, object]] = []
        names = {Status.CREATED: "created", Status.RUNNING: "running", Status.STOPPED: "stopped"}
        for task in self.tasks.values():
            fn, proc = task.function, task.proc
            row: dict[str, object] = {
                # the tenant: the pod's Kubernetes namespace, else the containerd namespace
                "namespace": _tenant_namespace(task.spec, task.namespace),
                "containerd_namespace": task.namespace,
                "id": task.id,
                "kind": "sandbox" if task.is_sandbox else "function" if fn is not None else "command",
                "state": names.get(task.status, "unknown"),
                "image": task.spec.annotations.get(CRI_IMAGE_ANNOTATION, ""),
                "module": task.module_path,
                "memory": (fn.memory_bytes() if fn else proc.memory_bytes() if proc else 0),
                "cpu_seconds": round(fn.stats.cpu_seconds if fn else proc.cpu_seconds() if proc else 0.0, 3),
                "exit_status": task.exit_status if task.status == Status.STOPPED else None,
            }
            if fn is not None:
                row.update(
                    function_id=fn.id,
                    invocations=fn.stats.invocations,
                    errors=fn.stats.errors,
                    instances=fn.instances,
                    mode="threads" if fn.threaded else "inline",
                )
            rows.append(row)
        return rows

    def logs(self, name: str) -> list[str] | None:
        """The recent output of a task (by id, or namespace/id with its tenant or containerd
        namespace) or function (by id, or namespace/id)."""
        for task in self.tasks.values():
            tenant = _tenant_namespace(task.spec, task.namespace)
            if name in (task.id, f"{task.namespace}/{task.id}", f"{tenant}/{task.id}"):
                source = task.function or task.proc
                return list(source.log.lines) if source is not None else []
        if self.functions is not None:
            namespace, _, fid = name.rpartition("/")
            fn = self.functions.get(fid, namespace or None)
            if fn is not None:
                return list(fn.log.lines)
        return None

    # --- host shutdown -------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every module and unmount every rootfs (the host is going away)."""
        for task in list(self.tasks.values()):
            if task.function is not None:
                task.function.stop()
            if task.proc is not None and task.proc.running:
                task.proc.kill(9)
            if task.mounted:
                await asyncio.to_thread(oci.unmount_rootfs, task.bundle)
                task.mounted = False


def _tenant_namespace(spec: oci.BundleSpec, containerd_namespace: str) -> str:
    """The namespace a container belongs to: its pod's Kubernetes namespace (CRI names it),
    else its containerd namespace."""
    return spec.annotations.get(CRI_SANDBOX_NAMESPACE_ANNOTATION) or containerd_namespace


def _deliverer(fn: Function, topic: str):  # noqa: ANN202
    """A pub/sub handler that hands each message to ``fn`` as ``POST /<topic>``."""

    def deliver(message: PubSubMessage) -> Delivery:
        request = Request(
            b"POST",
            b"/" + topic.encode(),
            b"",
            [
                (b"content-type", message.content_type.encode()),
                (b"x-layotto-topic", topic.encode()),
                (b"x-layotto-message-id", message.id.encode()),
                (b"x-layotto-attempt", str(message.attempt).encode()),
            ],
            message.data,
        )
        status = fn.call_sync(request).status
        if 200 <= status < 300:
            return Delivery.SUCCESS
        if status == 404:
            return Delivery.DROP
        return Delivery.RETRY

    return deliver


def _config_notifier(fn: Function, store: str):  # noqa: ANN202
    """A configuration callback that hands changed items to ``fn`` as a JSON list."""
    import json

    def notify(items: list) -> None:
        body = json.dumps(
            [
                {
                    "key": i.key,
                    "content": i.content,
                    "group": i.group,
                    "label": i.label,
                    **({"deleted": True} if dict(i.metadata).get("deleted") == "true" else {}),
                }
                for i in items
            ]
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"x-layotto-config-store", store.encode())]
        response = fn.call_sync(Request(b"POST", b"/_layotto/config/" + store.encode(), b"", headers, body))
        if response.status >= 300:
            fn.log.add("host", f"configuration change for {store} answered {response.status}")

    return notify
