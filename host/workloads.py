"""The three kinds of workload behind the seam (:mod:`layotto.host.workload`).

- :class:`SandboxWorkload`: a pod's sandbox container, a placeholder that runs until killed.
- :class:`CommandWorkload`: a command module, run once in a nanoprocess with the
  container's filesystem, stdio, memory and CPU limits.
- :class:`FunctionWorkload`: a function module, instantiated by a :class:`Function` and
  served through the ingress under its function id, with the pub/sub topics and
  configuration items it subscribes to delivered as requests.

:func:`create` builds one from a :class:`ContainerSpec` after admission against the
operator's policy (:mod:`layotto.host.admission`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layotto.host import admission as notes
from layotto.host import podnet, subscriptions
from layotto.host.engine import CompiledModule, PoolSettings
from layotto.host.errors import ModuleError
from layotto.host.function import Function, HostServices, is_function_module
from layotto.host.function_registry import IdTaken
from layotto.host.nanoprocess import ExitInfo, Nanoprocess, Output, ProcessSpec
from layotto.host.policy import ComponentView, PolicyError
from layotto.host.workload import (
    CRI_CONTAINER_NAME,
    CRI_IMAGE_NAME,
    ContainerSpec,
    ExitCallback,
    ExitStatus,
    InvalidSpec,
    ModuleSource,
    StartFailed,
    WorkloadStats,
)

if TYPE_CHECKING:
    from layotto.host.runtime import NodeRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModule:
    """A compiled module and where it came from (the seam's ``Module``)."""

    source: ModuleSource
    compiled: CompiledModule
    function: bool  # served as a function: a function module, on a host with an ingress

    @property
    def from_cache(self) -> str:
        return self.compiled.from_cache


def admit(spec: ContainerSpec, runtime: NodeRuntime) -> notes.Admission | None:
    """The container's admission (None for a sandbox); :class:`InvalidSpec` if refused."""
    if spec.sandbox:
        return None
    try:
        return notes.admit(spec.annotations, spec.memory_limit, spec.tenant, runtime.context.policy)
    except PolicyError as exc:
        raise InvalidSpec(str(exc)) from exc


def load_module(runtime: NodeRuntime, source: ModuleSource) -> LoadedModule:
    """Compile ``source`` (or find it compiled) and check that it exports its entry."""
    try:
        if source.path is not None:
            compiled = runtime.load(source.path, name=source.name)
        else:
            compiled = runtime.engine.load(source.data or b"", name=source.name)
    except ModuleError as exc:
        raise InvalidSpec(str(exc)) from exc
    except OSError as exc:
        raise InvalidSpec(f"reading the module: {exc}") from exc
    function = is_function_module(compiled)
    if source.entry == "_start" and function:
        return LoadedModule(source, compiled, runtime.context.functions is not None)
    if source.entry not in compiled.exports:
        raise InvalidSpec(
            f"{source.name} has no export named {source.entry!r} "
            f"(it exports: {', '.join(sorted(compiled.exports)) or 'nothing'})"
        )
    return LoadedModule(source, compiled, False)


def create(runtime: NodeRuntime, spec: ContainerSpec) -> SandboxWorkload | CommandWorkload | FunctionWorkload:
    """The workload for ``spec`` (not started); :class:`InvalidSpec` if it may not run."""
    admission = admit(spec, runtime)
    if admission is None:
        return SandboxWorkload(runtime, spec)
    module = spec.module
    if not isinstance(module, LoadedModule):
        raise InvalidSpec(f"container {spec.id} has no module")
    if module.function:
        try:
            port = podnet.pod_port(spec.annotations)
        except ValueError as exc:
            raise InvalidSpec(str(exc)) from exc
        return FunctionWorkload(runtime, spec, module, admission, port)
    return CommandWorkload(runtime, spec, module, admission)


def function_logs(runtime: NodeRuntime, name: str) -> list[str] | None:
    """The recent output of a function by id, or ``<namespace>/<id>``; None if unknown."""
    functions = runtime.context.functions
    if functions is None:
        return None
    namespace, _, fid = name.rpartition("/")
    fn = functions.get(fid, namespace or None)
    return list(fn.log.lines) if fn is not None else None


def _exit(info: ExitInfo) -> ExitStatus:
    return ExitStatus(info.status, info.exited_at, info.reason, info.oom)


def _services(runtime: NodeRuntime, admission: notes.Admission) -> HostServices:
    """The components and invoker as one namespace's pods may reach them."""
    context = runtime.context
    components = context.components
    if components is not None:
        components = ComponentView(components, admission.rules, admission.namespace)
    return HostServices(components, context.invoker)


def _app_id(spec: ContainerSpec) -> str:
    """Who owns a workload's state keys: ``<namespace>.<app>`` (annotation
    ``layotto.io/app-id`` names the app; else the function id or container name)."""
    annotations = spec.annotations
    app = (
        annotations.get(notes.APP_ID)
        or annotations.get(notes.FUNCTION_ID)
        or annotations.get(CRI_CONTAINER_NAME)
        or ""
    )
    return f"{spec.tenant}.{app}" if app else ""


class SandboxWorkload:
    """A pod's sandbox container: nothing runs; it lasts until it is killed. While it runs,
    its network namespace (CNI's) is where its function containers listen (podnet)."""

    kind = "sandbox"

    def __init__(self, runtime: NodeRuntime | None = None, spec: ContainerSpec | None = None) -> None:
        self.pods: podnet.PodNetworks | None = runtime.context.pods if runtime is not None else None
        self.spec = spec
        self.networked = False  # known to self.pods

    async def start(self, on_exit: ExitCallback) -> None:
        spec = self.spec
        if self.pods is not None and spec is not None and spec.netns:
            self.networked = self.pods.add_sandbox(spec.namespace, spec.id, spec.netns, spec.tenant)

    def _forget(self) -> None:
        if self.networked and self.pods is not None and self.spec is not None:
            self.networked = False
            self.pods.remove_sandbox(self.spec.namespace, self.spec.id)

    def kill(self, signal: int) -> ExitStatus | None:
        self._forget()
        return ExitStatus(128 + signal, time.time(), f"killed by signal {signal}")

    def stats(self) -> WorkloadStats:
        return WorkloadStats()

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "module": "", "memory": 0, "cpu_seconds": 0.0}

    def log_lines(self) -> list[str]:
        return []

    def close(self) -> None:
        self._forget()


class CommandWorkload:
    """A command module run once in a nanoprocess."""

    kind = "command"

    def __init__(
        self, runtime: NodeRuntime, spec: ContainerSpec, module: LoadedModule, admission: notes.Admission
    ) -> None:
        self.runtime = runtime
        self.spec = spec
        self.module = module
        self.admission = admission
        self.proc: Nanoprocess | None = None

    def _process_spec(self) -> ProcessSpec:
        spec, admission, location = self.spec, self.admission, self.module.source.location
        args = list(spec.args)
        if location.startswith("/"):  # from the rootfs: argv[0] is its path in the image
            args[0] = location
        elif not args or args[0].startswith("#"):  # from a wasm layer: argv[0] names the image
            args = [location, *args[1:]]
        return ProcessSpec(
            name=f"{spec.namespace}/{spec.id}",
            args=args,
            env=spec.env,
            rootfs=spec.rootfs,
            cwd=spec.cwd,
            entry=self.module.source.entry,
            stdin=spec.stdin,
            stdout=spec.stdout,
            stderr=spec.stderr,
            memory_limit=admission.memory_limit,
            capabilities=admission.capabilities,
            app_id=_app_id(spec) or f"{spec.namespace}.{spec.id}",
            services=_services(self.runtime, admission),
            cpu_quota_us=spec.cpu_quota_us,
            cpu_period_us=spec.cpu_period_us,
            namespace=admission.namespace,
            readonly=spec.readonly,
            mounts=tuple(spec.mounts),
        )

    async def start(self, on_exit: ExitCallback) -> None:
        try:
            proc = self.runtime.spawn(self.module.compiled, self._process_spec())
            proc.on_exit(lambda info: on_exit(_exit(info)))
            ready = proc.start()
        except (ModuleError, OSError) as exc:
            raise StartFailed(str(exc), ExitStatus(1, time.time(), str(exc))) from exc
        self.proc = proc
        await asyncio.to_thread(ready.wait)
        if proc.start_error is not None:
            ended = _exit(proc.exit) if proc.exit else ExitStatus(1, time.time(), str(proc.start_error))
            raise StartFailed(str(proc.start_error), ended)

    def kill(self, signal: int) -> ExitStatus | None:
        if self.proc is None:  # never started: it ends right here
            return ExitStatus(128 + signal, time.time(), f"killed by signal {signal}")
        self.proc.kill(signal)
        return None

    def stats(self) -> WorkloadStats:
        proc = self.proc
        if proc is None:
            return WorkloadStats()
        throttle = proc.throttle
        return WorkloadStats(
            memory_bytes=proc.memory_bytes(),
            cpu_seconds=proc.cpu_seconds(),
            periods=throttle.periods,
            throttled_periods=throttle.throttled_periods,
            throttled_seconds=throttle.throttled_seconds,
        )

    def describe(self) -> dict[str, object]:
        stats = self.stats()
        return {
            "kind": self.kind,
            "module": self.module.source.location,
            "memory": stats.memory_bytes,
            "cpu_seconds": round(stats.cpu_seconds, 3),
        }

    def log_lines(self) -> list[str]:
        return list(self.proc.log.lines) if self.proc is not None else []

    def close(self) -> None:
        if self.proc is not None and self.proc.running:
            self.proc.kill(9)


class FunctionWorkload:
    """A function module served through the ingress under its function id."""

    kind = "function"

    def __init__(
        self,
        runtime: NodeRuntime,
        spec: ContainerSpec,
        module: LoadedModule,
        admission: notes.Admission,
        port: int = podnet.DEFAULT_POD_PORT,
    ) -> None:
        self.runtime = runtime
        self.spec = spec
        self.module = module
        self.admission = admission
        self.port = port  # of its pod's own listener, when its pod has a network namespace
        self.listener: podnet.PodListener | None = None
        self.fn: Function | None = None
        self.cancels: list[subscriptions.Cancel] = []  # pub/sub and configuration subscriptions
        self.outputs: list[Output] = []  # the container's stdio, closed when it stops
        self.registered = False

    async def start(self, on_exit: ExitCallback) -> None:
        """Open its pod's listener, instantiate the function and register it with the
        ingress (and with the pod's listener)."""
        spec, runtime = self.spec, self.runtime
        pods: podnet.PodNetworks | None = runtime.context.pods
        if pods is not None and spec.sandbox_id:
            try:
                self.listener = await pods.attach(spec.namespace, spec.sandbox_id, spec.tenant, self.port)
            except OSError as exc:
                why = f"listening on port {self.port} in the pod's network: {exc.strerror or exc}"
                raise StartFailed(why, ExitStatus(1, time.time(), why)) from exc
        try:
            await self._start(on_exit)
        except BaseException:
            self._leave_pod()
            raise

    def _leave_pod(self) -> None:
        listener, self.listener = self.listener, None
        pods = self.runtime.context.pods
        if listener is not None and pods is not None:
            pods.detach(listener, self.fn)

    async def _start(self, on_exit: ExitCallback) -> None:
        spec, admission, runtime = self.spec, self.admission, self.runtime
        annotations = spec.annotations
        # The id: the annotation, else what a Layotto-style module calls itself
        # (proxy_get_id), else the container's name, else the task id.
        function_id = annotations.get(notes.FUNCTION_ID, "")
        fallback_id = annotations.get(CRI_CONTAINER_NAME) or spec.id
        env = [tuple(e.split("=", 1)) if "=" in e else (e, "") for e in spec.env]
        engine, linker, compiled = runtime.engine, runtime.linker, self.module.compiled
        if admission.fresh and admission.memory_limit <= PoolSettings.max_memory_size:
            # A Store per request: take it from the pooling allocator's slots.
            engine, linker = await asyncio.to_thread(runtime.pooled)
            compiled = await asyncio.to_thread(runtime.engine.to_pooled, compiled)
        location = self.module.source.location
        try:
            fn = await asyncio.to_thread(
                Function,
                name=f"{spec.namespace}/{spec.id}",
                function_id=function_id,
                engine=engine,
                linker=linker,
                compiled=compiled,
                argv=[location, *spec.args[1:]],
                env=env,
                memory_limit=admission.memory_limit,
                pool_size=admission.pool_size,
                fresh_instances=admission.fresh,
                timeout=admission.timeout,
                queue_limit=admission.queue_limit,
                capabilities=admission.capabilities,
                app_id=_app_id(spec),
                services=_services(runtime, admission),
                image=annotations.get(CRI_IMAGE_NAME, location),
                namespace=admission.namespace,
                call_scheduler=runtime.scheduler,
                cpu_shares=spec.cpu_shares,
                cpu_quota=spec.cpu_quota_us / 1e6 if spec.cpu_quota_us else None,
                cpu_period=spec.cpu_period_us / 1e6,
            )
        except ModuleError as exc:
            raise StartFailed(str(exc), ExitStatus(1, time.time(), str(exc))) from exc
        if not fn.id:
            fn.id = fallback_id
            fn.app_id = fn.app_id or fallback_id
        self._wire_output(fn)
        self.fn = fn
        functions = runtime.context.functions
        assert functions is not None  # a LoadedModule is a function only on a host with an ingress
        try:
            functions.add(fn)
        except IdTaken as exc:
            fn.stop()
            raise StartFailed(str(exc), ExitStatus(1, time.time(), str(exc))) from exc
        self.registered = True
        self.cancels = subscriptions.subscribe(fn, admission)
        self.cancels += subscriptions.watch_configuration(fn, admission)
        if self.listener is not None:
            runtime.context.pods.serve(self.listener, fn)
        log.info(
            "function %s serving as id %r (%s)",
            fn.name,
            fn.id,
            "fresh instances" if fn.fresh else f"pool {fn.pool_size}",
        )

    def _wire_output(self, fn: Function) -> None:
        """Send the function's output lines to the container's stdout/stderr as well."""
        stdout, stderr = self.spec.stdout, self.spec.stderr
        try:
            out = Output(stdout, lazy=True)
            err = Output(stderr, lazy=True) if stderr and stderr != stdout else out
        except OSError as exc:
            log.warning("%s: cannot open the container's stdio: %s", fn.name, exc)
            return
        fn.log.sinks = {"stdout": out.write, "stderr": err.write}
        self.outputs = [out, err]

    def kill(self, signal: int) -> ExitStatus | None:
        if self.fn is None:  # never started: it ends right here
            return ExitStatus(128 + signal, time.time(), f"killed by signal {signal}")
        self._stop()
        return ExitStatus(128 + signal, time.time(), f"stopped by signal {signal}")

    def _stop(self) -> None:
        """Stop serving: cancel the subscriptions, stop the function, close its stdio and
        take it out of the ingress."""
        fn = self.fn
        assert fn is not None
        self._leave_pod()
        cancels, self.cancels = self.cancels, []
        for cancel in cancels:
            cancel()
        fn.stop()
        fn.log.sinks = {}
        for out in self.outputs:
            out.close()
        if self.registered:
            self.registered = False
            functions = self.runtime.context.functions
            if functions is not None:
                functions.remove(fn)

    def stats(self) -> WorkloadStats:
        fn = self.fn
        if fn is None:
            return WorkloadStats()
        return WorkloadStats(memory_bytes=fn.memory_bytes(), cpu_seconds=fn.cpu_seconds)

    def describe(self) -> dict[str, object]:
        stats = self.stats()
        row: dict[str, object] = {
            "kind": self.kind,
            "module": self.module.source.location,
            "memory": stats.memory_bytes,
            "cpu_seconds": round(stats.cpu_seconds, 3),
        }
        fn = self.fn
        if fn is not None:
            row.update(
                function_id=fn.id,
                invocations=fn.stats.invocations,
                errors=fn.stats.errors,
                instances=fn.instances,
                mode=fn.mode,
                call_cpu_us=round(fn.cost * 1e6, 1),  # CPU per call, a moving average
                call_wasm_us=round(fn.wasm_cost * 1e6, 1),  # ... of which in wasm
                **fn.share.describe(),
            )
        return row

    def log_lines(self) -> list[str]:
        return list(self.fn.log.lines) if self.fn is not None else []

    def close(self) -> None:
        if self.fn is not None:
            self._stop()
        else:
            self._leave_pod()
