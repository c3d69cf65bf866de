"""A long-lived containerd gRPC client for tests and benchmarks: `ctr run -d --null-io`
and `ctr tasks delete -f` + `ctr containers delete` without a process per container.

An orchestrator does not fork a CLI for every container: kubelet keeps one gRPC
connection to containerd. :class:`ContainerdClient` does the same from Python. It reads an
image once (Images and Content services: manifest, config, the chain ID of its unpacked
layers) and keeps what it read, then starts each container with six calls:

1. ``Leases.Create``: a lease that shields the new snapshot from containerd's garbage
   collector until the container record references it (``ctr`` takes one too);
2. ``Snapshots.Prepare``: a writable snapshot keyed by the container id on top of the
   image's layers; its answer is the root filesystem's mounts;
3. ``Containers.Create``: the record (image, runtime, snapshotter, snapshot key, and the
   OCI runtime spec as JSON in a ``google.protobuf.Any``);
4. ``Leases.Delete``;
5. ``Tasks.Create`` with those mounts and no stdio (``--null-io``);
6. ``Tasks.Start``.

:meth:`ContainerdClient.delete` undoes it: ``Tasks.Kill`` (SIGKILL), ``Tasks.Wait``,
``Tasks.Delete``, ``Containers.Delete``, ``Snapshots.Remove``; what is already gone is
skipped. The client is thread-safe: threads may share one (one channel, one connection)
or each own one (``private_connection=True``: a channel of its own, not shared with the
process's other channels); an :class:`ImageCache` can be shared either way.

The spec is what ``ctr run`` writes for a Linux container (:func:`oci_spec`): pid, ipc,
uts, mount and network namespaces, the default mounts, masked and read-only paths, the
default capabilities, a device cgroup allowing the usual character devices, process
arguments, environment, working directory and user from the image config unless
overridden, and annotations (layotto's shim reads ``process.args[0]`` and annotations).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import secrets
import signal
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, empty_pb2

from layotto.shim.protocol import (
    containers_pb2,
    content_pb2,
    images_pb2,
    leases_pb2,
    mount_pb2,
    snapshots_pb2,
    task_types_pb2,
    tasks_pb2,
)

__all__ = [
    "ClientError",
    "ContainerdClient",
    "ImageCache",
    "ImageInfo",
    "RUNC_RUNTIME",
    "chain_id",
    "oci_spec",
]

RUNC_RUNTIME = "io.containerd.runc.v2"
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
STOP_SIGNAL_LABEL = "io.containerd.image.config.stop-signal"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
MAX_DOCUMENT_BYTES = 4 << 20

_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


class ClientError(RuntimeError):
    """A containerd call failed; ``code`` is its gRPC status code (or None)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- images


def chain_id(diff_ids: Sequence[str]) -> str:
    """The chain ID of a stack of layers: the first layer's diff ID, then for each
    further layer sha256 of "<chain so far> <its diff ID>" (the name containerd gives the
    committed snapshot of an unpacked image)."""
    if not diff_ids:
        raise ValueError("an image without layers has no chain ID")
    chain = diff_ids[0]
    for diff in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {diff}".encode()).hexdigest()
    return chain


@dataclass(frozen=True)
class ImageInfo:
    """What starting a container needs from an image."""

    name: str
    manifest_digest: str
    chain_id: str
    #: The image config's ``config`` object: Env, Entrypoint, Cmd, WorkingDir, User, ...
    config: Mapping[str, Any]


@dataclass
class ImageCache:
    """Images already read, by name; may be shared by several clients (and threads)."""

    images: dict[str, ImageInfo] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _host_platform() -> tuple[str, str]:
    machine = platform.machine()
    return "linux", _GO_ARCH.get(machine, machine)


# --------------------------------------------------------------------------- the OCI spec

_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
_NOSUID_NOEXEC_NODEV = ["nosuid", "noexec", "nodev"]
_MOUNTS: list[dict[str, Any]] = [
    {"destination": "/proc", "type": "proc", "source": "proc", "options": _NOSUID_NOEXEC_NODEV},
    {
        "destination": "/dev",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
    },
    {
        "destination": "/dev/pts",
        "type": "devpts",
        "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
    },
    {
        "destination": "/dev/shm",
        "type": "tmpfs",
        "source": "shm",
        "options": [*_NOSUID_NOEXEC_NODEV, "mode=1777", "size=65536k"],
    },
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": _NOSUID_NOEXEC_NODEV},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": [*_NOSUID_NOEXEC_NODEV, "ro"]},
    {
        "destination": "/run",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
    },
]
# Character devices a container may use (major, minor; None: any minor): null, zero,
# full, tty, random, urandom, console, the pty slaves, ptmx.
_DEVICES = [(1, 3), (1, 8), (1, 7), (5, 0), (1, 5), (1, 9), (5, 1), (136, None), (5, 2)]
_MASKED = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
]
_READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def _user(text: str) -> dict[str, Any]:
    """The spec's process.user from an image config's User ("", "uid" or "uid:gid")."""
    uid_text, _, gid_text = (text or "0").partition(":")
    try:
        uid = int(uid_text)
        gid = int(gid_text) if gid_text else 0
    except ValueError:
        # Names need the image's /etc/passwd and /etc/group; nothing here uses them.
        raise ValueError(f"image user {text!r}: only numeric uid[:gid] is supported") from None
    return {"uid": uid, "gid": gid, "additionalGids": [gid]}


def oci_spec(
    container_id: str,
    namespace: str,
    image_config: Mapping[str, Any],
    args: Sequence[str] = (),
    env: Sequence[str] = (),
    annotations: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> dict[str, Any]:
    """An OCI runtime spec for a Linux container, shaped like the one ``ctr run`` writes.

    ``args`` replaces the image's Entrypoint + Cmd when given; ``env`` entries
    (``KEY=value``) are added to the image's Env, replacing a same-named one.
    """
    process_args = list(args) or [*(image_config.get("Entrypoint") or []), *(image_config.get("Cmd") or [])]
    if not process_args:
        raise ValueError("no command: the image has neither Entrypoint nor Cmd and no args were given")
    environment: dict[str, str] = {}
    for entry in [*(image_config.get("Env") or [DEFAULT_PATH]), *env]:
        key = entry.partition("=")[0]
        environment[key] = entry
    devices: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
    for major, minor in _DEVICES:
        device: dict[str, Any] = {"allow": True, "type": "c", "major": major}
        if minor is not None:
            device["minor"] = minor
        device["access"] = "rwm"
        devices.append(device)
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2-dev",
        "process": {
            "user": _user(str(image_config.get("User") or "")),
            "args": process_args,
            "env": list(environment.values()),
            "cwd": cwd or image_config.get("WorkingDir") or "/",
            "capabilities": {k: list(_CAPABILITIES) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs"},
        "mounts": [dict(m, options=list(m["options"])) for m in _MOUNTS],
        "linux": {
            "resources": {"devices": devices, "cpu": {"shares": 1024}},
            "cgroupsPath": f"/{namespace}/{container_id}",
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": list(_MASKED),
            "readonlyPaths": list(_READONLY),
        },
    }
    if annotations:
        spec["annotations"] = dict(annotations)
    return spec


# --------------------------------------------------------------------------- the client


class ContainerdClient:
    """Runs and removes containers through containerd's gRPC API (see the module doc)."""

    def __init__(
        self,
        address: str,
        namespace: str = "default",
        snapshotter: str = "overlayfs",
        *,
        private_connection: bool = False,
        image_cache: ImageCache | None = None,
        use_leases: bool = True,
        timeout: float = 60.0,
    ) -> None:
        self.address = str(address).removeprefix("unix://")
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.use_leases = use_leases
        self.timeout = timeout
        self.image_cache = image_cache if image_cache is not None else ImageCache()
        # grpc shares connections between channels to the same target unless told not to.
        options = [("grpc.use_local_subchannel_pool", 1)] if private_connection else []
        self._channel = grpc.insecure_channel(f"unix://{self.address}", options=options)
        self._metadata = ((NAMESPACE_HEADER, namespace),)
        call = self._method
        self._image_get = call("images.v1.Images/Get", images_pb2.GetImageResponse)
        self._content_read = self._channel.unary_stream(
            "/containerd.services.content.v1.Content/Read",
            request_serializer=_serialize,
            response_deserializer=content_pb2.ReadContentResponse.FromString,
        )
        self._lease_create = call("leases.v1.Leases/Create", leases_pb2.CreateResponse)
        self._lease_delete = call("leases.v1.Leases/Delete", empty_pb2.Empty)
        self._prepare = call("snapshots.v1.Snapshots/Prepare", snapshots_pb2.PrepareSnapshotResponse)
        self._snapshot_mounts = call("snapshots.v1.Snapshots/Mounts", snapshots_pb2.MountsResponse)
        self._snapshot_remove = call("snapshots.v1.Snapshots/Remove", empty_pb2.Empty)
        self._snapshot_stat = call("snapshots.v1.Snapshots/Stat", snapshots_pb2.StatSnapshotResponse)
        self._container_create = call(
            "containers.v1.Containers/Create", containers_pb2.CreateContainerResponse
        )
        self._container_get = call("containers.v1.Containers/Get", containers_pb2.GetContainerResponse)
        self._container_list = call("containers.v1.Containers/List", containers_pb2.ListContainersResponse)
        self._container_delete = call("containers.v1.Containers/Delete", empty_pb2.Empty)
        self._task_create = call("tasks.v1.Tasks/Create", tasks_pb2.CreateTaskResponse)
        self._task_start = call("tasks.v1.Tasks/Start", tasks_pb2.StartResponse)
        self._task_kill = call("tasks.v1.Tasks/Kill", empty_pb2.Empty)
        self._task_wait = call("tasks.v1.Tasks/Wait", tasks_pb2.WaitResponse)
        self._task_delete = call("tasks.v1.Tasks/Delete", tasks_pb2.DeleteResponse)
        self._task_get = call("tasks.v1.Tasks/Get", tasks_pb2.GetResponse)
        self._task_list = call("tasks.v1.Tasks/List", tasks_pb2.ListTasksResponse)

    def _method(self, name: str, response_type: Any) -> Callable[..., Any]:
        return self._channel.unary_unary(
            f"/containerd.services.{name}",
            request_serializer=_serialize,
            response_deserializer=response_type.FromString,
        )

    def _call(
        self,
        method: Callable[..., Any],
        what: str,
        request: Any,
        *,
        lease: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        metadata = self._metadata if lease is None else (*self._metadata, (LEASE_HEADER, lease))
        try:
            return method(request, metadata=metadata, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            name = code.name if code is not None else "?"
            raise ClientError(f"{what}: {name}: {details}", code) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ images

    def read_blob(self, digest: str, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
        """A blob from the content store, checked against its sha256 digest."""
        data = bytearray()
        try:
            for chunk in self._content_read(
                content_pb2.ReadContentRequest(digest=digest), metadata=self._metadata, timeout=self.timeout
            ):
                data += chunk.data
                if len(data) > limit:
                    raise ClientError(f"blob {digest} is larger than {limit} bytes")
        except grpc.RpcError as e:
            raise ClientError(f"Content.Read {digest}: {e.code().name}: {e.details()}", e.code()) from None
        algorithm, _, expected = digest.partition(":")
        if algorithm == "sha256" and hashlib.sha256(data).hexdigest() != expected:
            raise ClientError(f"blob {digest} does not match its digest")
        return bytes(data)

    def image(self, name: str, refresh: bool = False) -> ImageInfo:
        """The image *name* as containers need it (read once, then cached): its manifest
        for this machine's platform, its config, and the chain ID of its layers, which
        must already be unpacked into the client's snapshotter."""
        cache = self.image_cache
        if not refresh:
            with cache.lock:
                if name in cache.images:
                    return cache.images[name]
        target = self._call(
            self._image_get, f"Images.Get {name}", images_pb2.GetImageRequest(name=name)
        ).image.target
        media_type, digest = target.media_type, target.digest
        want_os, want_arch = _host_platform()
        for _ in range(4):  # an index points at manifests (rarely at another index)
            document = json.loads(self.read_blob(digest))
            media_type = document.get("mediaType") or media_type
            if media_type not in INDEX_TYPES and "manifests" not in document:
                break
            manifests = document.get("manifests") or []
            if not manifests:
                raise ClientError(f"image {name}: its index lists no manifests")
            chosen = next(
                (
                    m
                    for m in manifests
                    if (m.get("platform") or {}).get("os") == want_os
                    and (m.get("platform") or {}).get("architecture") == want_arch
                ),
                manifests[0],
            )
            media_type, digest = chosen.get("mediaType", ""), chosen["digest"]
        else:
            raise ClientError(f"image {name}: indexes nested too deep")
        config = json.loads(self.read_blob(document["config"]["digest"]))
        chain = chain_id((config.get("rootfs") or {}).get("diff_ids") or [])
        stat = self._call(
            self._snapshot_stat,
            f"Snapshots.Stat {chain} (is {name} unpacked into {self.snapshotter}?)",
            snapshots_pb2.StatSnapshotRequest(snapshotter=self.snapshotter, key=chain),
        )
        if stat.info.kind != snapshots_pb2.COMMITTED:
            raise ClientError(f"image {name}: snapshot {chain} is not committed")
        info = ImageInfo(name, digest, chain, config.get("config") or {})
        with cache.lock:
            cache.images[name] = info
        return info

    # ------------------------------------------------------------------ containers

    def run_detached(
        self,
        container_id: str,
        image: str,
        runtime: str | None = None,
        args: Sequence[str] = (),
        annotations: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        env: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
    ) -> int:
        """Create and start *container_id* from *image* under *runtime* (default runc)
        with no stdio, like ``ctr run -d --null-io``; returns the task's pid. On failure,
        whatever was created is removed again and ClientError is raised."""
        info = self.image(image)
        spec = oci_spec(container_id, self.namespace, info.config, args, env, dict(annotations or {}))
        stop_signal = info.config.get("StopSignal") or "SIGTERM"
        container = containers_pb2.Container(
            id=container_id,
            image=image,
            labels={STOP_SIGNAL_LABEL: stop_signal, **(labels or {})},
            runtime=containers_pb2.Container.Runtime(name=runtime or RUNC_RUNTIME),
            spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=json.dumps(spec).encode()),
            snapshotter=self.snapshotter,
            snapshot_key=container_id,
        )
        created: list[str] = []
        try:
            lease = self._new_lease(container_id) if self.use_leases else None
            try:
                mounts = self._call(
                    self._prepare,
                    f"Snapshots.Prepare {container_id}",
                    snapshots_pb2.PrepareSnapshotRequest(
                        snapshotter=self.snapshotter, key=container_id, parent=info.chain_id
                    ),
                    lease=lease,
                ).mounts
                created.append("snapshot")
                self._call(
                    self._container_create,
                    f"Containers.Create {container_id}",
                    containers_pb2.CreateContainerRequest(container=container),
                    lease=lease,
                )
                created.append("container")
            finally:
                if lease is not None:
                    self._call(
                        self._lease_delete, f"Leases.Delete {lease}", leases_pb2.DeleteRequest(id=lease)
                    )
            self._call(
                self._task_create,
                f"Tasks.Create {container_id}",
                tasks_pb2.CreateTaskRequest(container_id=container_id, rootfs=mounts),
            )
            created.append("task")
            return self._call(
                self._task_start,
                f"Tasks.Start {container_id}",
                tasks_pb2.StartRequest(container_id=container_id),
            ).pid
        except BaseException:
            if created:
                try:
                    self.delete(container_id, timeout=10.0)
                except ClientError:
                    pass  # the original error matters more
            raise

    def _new_lease(self, container_id: str) -> str:
        lease = f"{container_id}-{secrets.token_hex(4)}"
        expire = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        self._call(
            self._lease_create,
            f"Leases.Create {lease}",
            leases_pb2.CreateRequest(
                id=lease, labels={"containerd.io/gc.expire": expire.strftime("%Y-%m-%dT%H:%M:%SZ")}
            ),
        )
        return lease

    def delete(self, container_id: str, timeout: float | None = None) -> None:
        """Remove *container_id*'s task (SIGKILL, wait, delete), its container record and
        its snapshot; parts already gone are skipped. Raises ClientError otherwise."""
        cid = container_id
        wait_s = timeout or self.timeout
        try:
            self._call(
                self._task_kill,
                f"Tasks.Kill {cid}",
                tasks_pb2.KillRequest(container_id=cid, signal=int(signal.SIGKILL), all=True),
            )
        except ClientError as e:
            # NOT_FOUND: no task, or (from some shims) a process that already finished.
            if e.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                raise
        task_gone = False
        try:
            self._call(
                self._task_wait, f"Tasks.Wait {cid}", tasks_pb2.WaitRequest(container_id=cid), timeout=wait_s
            )
        except ClientError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
            task_gone = True
        if not task_gone:
            self._ignore_missing(
                self._task_delete, f"Tasks.Delete {cid}", tasks_pb2.DeleteTaskRequest(container_id=cid)
            )
        self._ignore_missing(
            self._container_delete, f"Containers.Delete {cid}", containers_pb2.DeleteContainerRequest(id=cid)
        )
        self._ignore_missing(
            self._snapshot_remove,
            f"Snapshots.Remove {cid}",
            snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=cid),
        )

    def _ignore_missing(self, method: Callable[..., Any], what: str, request: Any) -> None:
        try:
            self._call(method, what, request)
        except ClientError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise

    # ------------------------------------------------------------------ queries

    def task(self, container_id: str) -> task_types_pb2.Process | None:
        """The task of *container_id* (status, pid, exit status), or None without one."""
        try:
            return self._call(
                self._task_get, f"Tasks.Get {container_id}", tasks_pb2.GetRequest(container_id=container_id)
            ).process
        except ClientError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def tasks(self) -> dict[str, task_types_pb2.Process]:
        """Every task in the namespace, by container id."""
        reply = self._call(self._task_list, "Tasks.List", tasks_pb2.ListTasksRequest())
        return {t.id or t.container_id: t for t in reply.tasks}

    def task_statuses(self) -> dict[str, str]:
        """Container id → task status name (RUNNING, STOPPED, ...), like ``ctr tasks ls``."""
        return {cid: task_types_pb2.Status.Name(t.status) for cid, t in self.tasks().items()}

    def containers(self) -> list[str]:
        """The ids of every container record in the namespace."""
        reply = self._call(self._container_list, "Containers.List", containers_pb2.ListContainersRequest())
        return [c.id for c in reply.containers]

    def container(self, container_id: str) -> containers_pb2.Container | None:
        try:
            return self._call(
                self._container_get,
                f"Containers.Get {container_id}",
                containers_pb2.GetContainerRequest(id=container_id),
            ).container
        except ClientError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def snapshot_exists(self, key: str) -> bool:
        try:
            self._call(
                self._snapshot_stat,
                f"Snapshots.Stat {key}",
                snapshots_pb2.StatSnapshotRequest(snapshotter=self.snapshotter, key=key),
            )
        except ClientError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    def snapshot_mounts(self, key: str) -> list[mount_pb2.Mount]:
        """The mounts of the active snapshot *key* (what ``ctr`` passes Tasks.Create)."""
        reply = self._call(
            self._snapshot_mounts,
            f"Snapshots.Mounts {key}",
            snapshots_pb2.MountsRequest(snapshotter=self.snapshotter, key=key),
        )
        return list(reply.mounts)


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()
