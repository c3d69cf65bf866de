"""A minimal CRI (runtime.v1) client that drives containerd the way a kubelet does.

``crictl`` is not installable here, so the tests speak CRI themselves: the messages are
our own wire-compatible declarations (shim/protocol/cri.proto, generated into
``layotto.shim.protocol.cri_pb2``) and the calls are generic gRPC unary calls, so no
gRPC code generation is needed.

:class:`CriClient` mirrors the RuntimeService and ImageService RPCs one to one, plus a
few kubelet-shaped helpers: :meth:`CriClient.run_pod` (a host-network pod on a runtime
handler), :meth:`CriClient.create_container` (a container with command/args/env, a log
file and resource limits), :meth:`CriClient.wait_container_state` (poll until a state is
reached). :func:`read_cri_log` and :func:`wait_for_log` read the CRI log file containerd
writes from the container's stdout and stderr.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from layotto.shim.protocol import cri_pb2 as cri

__all__ = [
    "CONTAINER_CREATED",
    "CONTAINER_EXITED",
    "CONTAINER_RUNNING",
    "CONTAINER_UNKNOWN",
    "NODE",
    "SANDBOX_NOTREADY",
    "SANDBOX_READY",
    "CriClient",
    "LogLine",
    "Pod",
    "cri",
    "read_cri_log",
    "state_name",
    "wait_for_log",
]

RUNTIME_SERVICE = "runtime.v1.RuntimeService"
IMAGE_SERVICE = "runtime.v1.ImageService"

CONTAINER_CREATED = cri.CONTAINER_CREATED
CONTAINER_RUNNING = cri.CONTAINER_RUNNING
CONTAINER_EXITED = cri.CONTAINER_EXITED
CONTAINER_UNKNOWN = cri.CONTAINER_UNKNOWN
SANDBOX_READY = cri.SANDBOX_READY
SANDBOX_NOTREADY = cri.SANDBOX_NOTREADY
NODE = cri.NODE

#: Seconds between two polls of a wait_* helper.
POLL_INTERVAL = 0.02

R = TypeVar("R", bound=Message)


def state_name(state: int) -> str:
    """``CONTAINER_RUNNING`` for 1, and so on."""
    return cri.ContainerState.Name(state)


@dataclass(frozen=True)
class Pod:
    """A pod sandbox as RunPodSandbox made it: its id and the config a kubelet keeps
    (CreateContainer sends the same config again)."""

    id: str
    config: cri.PodSandboxConfig

    @property
    def log_directory(self) -> Path:
        return Path(self.config.log_directory)


@dataclass(frozen=True)
class LogLine:
    """One line of a CRI log file: ``<RFC3339Nano time> <stream> <P|F> <content>``."""

    time: str
    stream: str  # "stdout" or "stderr"
    tag: str  # "F" (full line) or "P" (partial: continued by the next line)
    content: str


_LOG_LINE = re.compile(r"^(\S+) (stdout|stderr) ([A-Z](?::[A-Z])*) (.*)$")


def read_cri_log(path: Path | str) -> list[LogLine]:
    """The lines of a CRI log file; ``[]`` while it does not exist yet. A line that does
    not follow the CRI format raises ValueError (a malformed file is a test failure)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = []
    for raw in text.splitlines():
        m = _LOG_LINE.match(raw)
        if m is None:
            raise ValueError(f"{path}: not a CRI log line: {raw!r}")
        lines.append(LogLine(*m.groups()))
    return lines


def wait_for_log(
    path: Path | str,
    predicate: Callable[[list[LogLine]], bool],
    timeout: float = 10.0,
    interval: float = POLL_INTERVAL,
) -> list[LogLine]:
    """Poll the CRI log file until ``predicate(lines)`` holds; returns the lines."""
    deadline = time.monotonic() + timeout
    while True:
        lines = read_cri_log(path)
        if predicate(lines):
            return lines
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: condition not met within {timeout} s; content: {lines!r}")
        time.sleep(interval)


class CriClient:
    """containerd's CRI over its gRPC socket (``address``: a path or ``unix://`` URL)."""

    def __init__(self, address: Path | str, *, timeout: float = 60.0) -> None:
        target = str(address)
        if not target.startswith("unix:"):
            target = "unix://" + target
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target)
        self._stubs: dict[str, Callable[..., Any]] = {}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[R],
        timeout: float | None = None,
    ) -> R:
        path = f"/{service}/{method}"
        stub = self._stubs.get(path)
        if stub is None:
            stub = self.channel.unary_unary(
                path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_type.FromString,
            )
            self._stubs[path] = stub
        return stub(request, timeout=self.timeout if timeout is None else timeout)

    def _runtime(
        self, method: str, request: Message, response_type: type[R], timeout: float | None = None
    ) -> R:
        return self._call(RUNTIME_SERVICE, method, request, response_type, timeout)

    def _image(self, method: str, request: Message, response_type: type[R]) -> R:
        return self._call(IMAGE_SERVICE, method, request, response_type)

    # ------------------------------------------------------------------ RuntimeService

    def version(self) -> cri.VersionResponse:
        return self._runtime("Version", cri.VersionRequest(version="v1"), cri.VersionResponse)

    def status(self, verbose: bool = False) -> cri.StatusResponse:
        return self._runtime("Status", cri.StatusRequest(verbose=verbose), cri.StatusResponse)

    def run_pod_sandbox(self, config: cri.PodSandboxConfig, handler: str = "") -> str:
        request = cri.RunPodSandboxRequest(config=config, runtime_handler=handler)
        return self._runtime("RunPodSandbox", request, cri.RunPodSandboxResponse).pod_sandbox_id

    def stop_pod_sandbox(self, pod_id: str) -> None:
        self._runtime(
            "StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), cri.StopPodSandboxResponse
        )

    def remove_pod_sandbox(self, pod_id: str) -> None:
        self._runtime(
            "RemovePodSandbox",
            cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
            cri.RemovePodSandboxResponse,
        )

    def pod_sandbox_status(self, pod_id: str, verbose: bool = False) -> cri.PodSandboxStatusResponse:
        request = cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        return self._runtime("PodSandboxStatus", request, cri.PodSandboxStatusResponse)

    def list_pod_sandbox(
        self, pod_id: str = "", labels: Mapping[str, str] | None = None
    ) -> list[cri.PodSandbox]:
        flt = cri.PodSandboxFilter(id=pod_id, label_selector=dict(labels or {}))
        request = cri.ListPodSandboxRequest(filter=flt)
        return list(self._runtime("ListPodSandbox", request, cri.ListPodSandboxResponse).items)

    def create_container_raw(
        self, pod_id: str, config: cri.ContainerConfig, sandbox_config: cri.PodSandboxConfig
    ) -> str:
        request = cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config
        )
        return self._runtime("CreateContainer", request, cri.CreateContainerResponse).container_id

    def start_container(self, container_id: str) -> None:
        self._runtime(
            "StartContainer", cri.StartContainerRequest(container_id=container_id), cri.StartContainerResponse
        )

    def stop_container(self, container_id: str, timeout: int = 0) -> None:
        """StopContainer: the stop signal, then SIGKILL after ``timeout`` seconds."""
        request = cri.StopContainerRequest(container_id=container_id, timeout=timeout)
        self._runtime("StopContainer", request, cri.StopContainerResponse, timeout=self.timeout + timeout)

    def remove_container(self, container_id: str) -> None:
        self._runtime(
            "RemoveContainer",
            cri.RemoveContainerRequest(container_id=container_id),
            cri.RemoveContainerResponse,
        )

    def list_containers(
        self, pod_id: str = "", state: int | None = None, container_id: str = ""
    ) -> list[cri.Container]:
        flt = cri.ContainerFilter(id=container_id, pod_sandbox_id=pod_id)
        if state is not None:
            flt.state.state = state
        response = self._runtime(
            "ListContainers", cri.ListContainersRequest(filter=flt), cri.ListContainersResponse
        )
        return list(response.containers)

    def container_status(self, container_id: str, verbose: bool = False) -> cri.ContainerStatusResponse:
        request = cri.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        return self._runtime("ContainerStatus", request, cri.ContainerStatusResponse)

    def update_container_resources(self, container_id: str, linux: cri.LinuxContainerResources) -> None:
        request = cri.UpdateContainerResourcesRequest(container_id=container_id, linux=linux)
        self._runtime("UpdateContainerResources", request, cri.UpdateContainerResourcesResponse)

    def container_stats(self, container_id: str) -> cri.ContainerStats:
        request = cri.ContainerStatsRequest(container_id=container_id)
        return self._runtime("ContainerStats", request, cri.ContainerStatsResponse).stats

    def list_container_stats(self, pod_id: str = "", container_id: str = "") -> list[cri.ContainerStats]:
        flt = cri.ContainerStatsFilter(id=container_id, pod_sandbox_id=pod_id)
        request = cri.ListContainerStatsRequest(filter=flt)
        return list(self._runtime("ListContainerStats", request, cri.ListContainerStatsResponse).stats)

    # ------------------------------------------------------------------ ImageService

    def image_status(self, image: str) -> cri.Image | None:
        """The image as CRI knows it, or None when CRI does not have it."""
        request = cri.ImageStatusRequest(image=cri.ImageSpec(image=image))
        response = self._image("ImageStatus", request, cri.ImageStatusResponse)
        return response.image if response.HasField("image") else None

    def list_images(self) -> list[cri.Image]:
        return list(self._image("ListImages", cri.ListImagesRequest(), cri.ListImagesResponse).images)

    def pull_image(self, image: str) -> str:
        request = cri.PullImageRequest(image=cri.ImageSpec(image=image))
        return self._image("PullImage", request, cri.PullImageResponse).image_ref

    def remove_image(self, image: str) -> None:
        self._image(
            "RemoveImage", cri.RemoveImageRequest(image=cri.ImageSpec(image=image)), cri.RemoveImageResponse
        )

    # ------------------------------------------------------------------ kubelet-shaped helpers

    @staticmethod
    def pod_config(
        name: str,
        namespace: str,
        uid: str,
        log_dir: Path | str,
        *,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        attempt: int = 0,
    ) -> cri.PodSandboxConfig:
        """A host-network pod's sandbox config, as the kubelet builds it for
        ``hostNetwork: true`` (network and IPC of the node: no CNI, no /dev/shm mount)."""
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=attempt),
            hostname=name,
            log_directory=str(log_dir),
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            linux=cri.LinuxPodSandboxConfig(
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=cri.NamespaceOption(network=cri.NODE, ipc=cri.NODE, pid=cri.CONTAINER)
                )
            ),
        )

    def run_pod(
        self,
        name: str,
        namespace: str,
        uid: str,
        log_dir: Path | str,
        annotations: Mapping[str, str] | None = None,
        handler: str = "layotto",
        *,
        labels: Mapping[str, str] | None = None,
    ) -> Pod:
        """RunPodSandbox for a host-network pod on ``handler``; makes ``log_dir``."""
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        config = self.pod_config(name, namespace, uid, log_dir, annotations=annotations, labels=labels)
        return Pod(self.run_pod_sandbox(config, handler), config)

    @staticmethod
    def container_config(
        name: str,
        image: str,
        *,
        command: Sequence[str] | None = None,
        args: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
        memory_limit: int | None = None,
        cpu_quota: int | None = None,
        cpu_period: int | None = None,
        cpu_shares: int | None = None,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        working_dir: str = "",
        attempt: int = 0,
    ) -> cri.ContainerConfig:
        """A container config as the kubelet sends it. ``command`` replaces the image's
        ENTRYPOINT and ``args`` its CMD (Kubernetes semantics). ``log_path`` is relative
        to the pod's log directory (default ``<name>_<attempt>.log``, like a kubelet)."""
        resources = cri.LinuxContainerResources(
            memory_limit_in_bytes=memory_limit or 0,
            cpu_quota=cpu_quota or 0,
            cpu_period=cpu_period or 0,
            cpu_shares=cpu_shares or 0,
        )
        return cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=attempt),
            image=cri.ImageSpec(image=image),
            command=list(command or ()),
            args=list(args or ()),
            working_dir=working_dir,
            envs=[cri.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            log_path=log_path if log_path is not None else f"{name}/{attempt}.log",
            linux=cri.LinuxContainerConfig(
                resources=resources,
                security_context=cri.LinuxContainerSecurityContext(
                    namespace_options=cri.NamespaceOption(network=cri.NODE, ipc=cri.NODE, pid=cri.CONTAINER)
                ),
            ),
        )

    def create_container(
        self,
        pod_id: str,
        pod_config: cri.PodSandboxConfig,
        name: str,
        image: str,
        command: Sequence[str] | None = None,
        args: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
        memory_limit: int | None = None,
        cpu_quota: int | None = None,
        cpu_period: int | None = None,
        **kw: Any,
    ) -> str:
        """CreateContainer in pod ``pod_id``; returns the container id. ``kw`` go to
        :meth:`container_config` (cpu_shares, labels, annotations, working_dir, attempt)."""
        config = self.container_config(
            name,
            image,
            command=command,
            args=args,
            env=env,
            log_path=log_path,
            memory_limit=memory_limit,
            cpu_quota=cpu_quota,
            cpu_period=cpu_period,
            **kw,
        )
        return self.create_container_raw(pod_id, config, pod_config)

    def log_file(self, pod: Pod, container_id: str) -> Path:
        """The CRI log file of a container: the pod's log directory + its log_path."""
        status = self.container_status(container_id).status
        path = Path(status.log_path)
        return path if path.is_absolute() else pod.log_directory / path

    def wait_container_state(
        self,
        container_id: str,
        state: int | Sequence[int],
        timeout: float = 10.0,
        interval: float = POLL_INTERVAL,
    ) -> cri.ContainerStatus:
        """Poll ContainerStatus until the container is in ``state`` (one or several);
        returns that status. TimeoutError names the state it was last seen in."""
        wanted = {state} if isinstance(state, int) else set(state)
        deadline = time.monotonic() + timeout
        while True:
            status = self.container_status(container_id).status
            if status.state in wanted:
                return status
            if time.monotonic() > deadline:
                names = ", ".join(state_name(s) for s in sorted(wanted))
                raise TimeoutError(
                    f"container {container_id} still {state_name(status.state)} after {timeout} s "
                    f"(waiting for {names}); reason={status.reason!r} message={status.message!r}"
                )
            time.sleep(interval)

    def wait_pod_state(self, pod_id: str, state: int, timeout: float = 10.0) -> cri.PodSandboxStatus:
        """Poll PodSandboxStatus until the sandbox is in ``state``."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.pod_sandbox_status(pod_id).status
            if status.state == state:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"pod sandbox {pod_id} still {cri.PodSandboxState.Name(status.state)} after {timeout} s"
                )
            time.sleep(POLL_INTERVAL)

    def wait_image(self, image: str, timeout: float = 10.0) -> cri.Image:
        """Poll ImageStatus until CRI knows ``image`` (it learns imports from events)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.image_status(image)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRI does not know image {image} after {timeout} s")
            time.sleep(POLL_INTERVAL)

    def sandbox_info(self, pod_id: str) -> dict[str, Any]:
        """The verbose PodSandboxStatus ``info`` JSON (containerd: pid, runtimeType, ...)."""
        info = self.pod_sandbox_status(pod_id, verbose=True).info
        return json.loads(info["info"]) if "info" in info else {}

    @staticmethod
    def pod_ipv4(info: dict[str, Any]) -> str:
        """The pod's IPv4 address in a sandbox's verbose info (:meth:`sandbox_info`: its CNI
        result); LookupError when CNI gave it none."""
        for iface in ((info.get("cniResult") or {}).get("Interfaces") or {}).values():
            for config in iface.get("IPConfigs") or ():
                if "." in config["IP"]:
                    return config["IP"]
        raise LookupError(f"no IPv4 address in the CNI result: {json.dumps(info.get('cniResult'))}")

    def container_info(self, container_id: str) -> dict[str, Any]:
        """The verbose ContainerStatus ``info`` JSON (containerd: pid, sandboxID, runtimeSpec, ...)."""
        info = self.container_status(container_id, verbose=True).info
        return json.loads(info["info"]) if "info" in info else {}

    def remove_pod(self, pod_id: str) -> None:
        """What the kubelet does to delete a pod: stop and remove every container,
        StopPodSandbox, RemovePodSandbox."""
        for c in self.list_containers(pod_id=pod_id):
            if c.state in (CONTAINER_RUNNING, CONTAINER_UNKNOWN):
                self.stop_container(c.id, timeout=2)
            self.remove_container(c.id)
        self.stop_pod_sandbox(pod_id)
        self.remove_pod_sandbox(pod_id)
