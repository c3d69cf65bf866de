"""Kubernetes pods through containerd's CRI with the ``layotto`` runtime handler.

Each test acts as a kubelet would, in the order it does: RunPodSandbox (handler
``layotto``, host network), CreateContainer, StartContainer, ContainerStatus, the CRI log
file, StopContainer, ContainerStats, RemoveContainer, StopPodSandbox, RemovePodSandbox.
The client is tests/cri_client.py (our own runtime.v1 declarations; crictl is not
installable here). Everything runs against a private containerd with the CRI plugin
(the ``cri_containerd`` fixture), the real shim, the real node host and real modules.
"""

from __future__ import annotations

import itertools
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from layotto.images import builder
from tests.conftest import find_host_process
from tests.containerd_env import Containerd, mounts_under
from tests.cri_client import (
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    CriClient,
    LogLine,
    Pod,
    cri,
    read_cri_log,
    wait_for_log,
)

pytestmark = pytest.mark.integration

CRI_NAMESPACE = "k8s.io"
HANDLER = "layotto"
GREETING = "Hello from a Layotto nanoprocess!"

#: Every test module plus a text file, CMD ["/hello.wasm"]: pods pick a module with
#: `command` (which replaces the ENTRYPOINT and drops the CMD, as in Kubernetes).
MODS = "docker.io/library/layotto-cri-mods:latest"
#: Only hello.wasm, CMD ["/hello.wasm"]: a pod that gives neither command nor args.
HELLO = "docker.io/library/layotto-cri-hello:latest"
#: ENTRYPOINT ["/echoargs.wasm"]: a pod's `args` replace only the (empty) CMD.
ECHOARGS = "docker.io/library/layotto-cri-echoargs:latest"
#: An image whose command is a text file, not a WebAssembly module.
NOTWASM = "docker.io/library/layotto-cri-notwasm:latest"

MODULES = ("hello", "echoargs", "ticker", "busyloop", "sleeper", "memhog", "trap")
MiB = 1 << 20

_ids = itertools.count()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cri_images(
    cri_containerd: Containerd, wasm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Containerd:
    """The sandbox image (under the configured sandbox_image name) and the function
    images, imported into CRI's namespace and known to CRI."""
    c = cri_containerd
    out = tmp_path_factory.mktemp("cri-images")
    mods = {f"/{m}.wasm": wasm_dir / f"{m}.wasm" for m in MODULES}
    mods["/notwasm.txt"] = wasm_dir / "notwasm.txt"
    # The pause image: the layotto host never executes it, any tiny content will do.
    builder.build_image(
        out / "pause.tar", {"/pause": b"layotto pause placeholder\n"}, name=c.sandbox_image, cmd=["/pause"]
    )
    builder.build_image(out / "mods.tar", mods, name=MODS, cmd=["/hello.wasm"])
    builder.build_image(
        out / "hello.tar", {"/hello.wasm": wasm_dir / "hello.wasm"}, name=HELLO, cmd=["/hello.wasm"]
    )
    builder.build_image(
        out / "echoargs.tar",
        {"/echoargs.wasm": wasm_dir / "echoargs.wasm"},
        name=ECHOARGS,
        entrypoint=["/echoargs.wasm"],
    )
    builder.build_image(
        out / "notwasm.tar", {"/notwasm.txt": wasm_dir / "notwasm.txt"}, name=NOTWASM, cmd=["/notwasm.txt"]
    )
    for name in ("pause", "mods", "hello", "echoargs", "notwasm"):
        c.import_image(out / f"{name}.tar", namespace=CRI_NAMESPACE)
    with CriClient(c.address) as client:
        for image in (c.sandbox_image, MODS, HELLO, ECHOARGS, NOTWASM):
            client.wait_image(image)  # CRI learns about imports from /images/ events
    return c


@dataclass
class Kubelet:
    """A CRI client plus what a kubelet keeps: the pods it made (removed at teardown)."""

    c: Containerd
    client: CriClient
    log_root: Path
    pods: list[Pod] = field(default_factory=list)

    def run_pod(self, name: str = "fn", namespace: str = "default") -> Pod:
        n = next(_ids)
        name = f"{name}-{n}"
        uid = str(uuid.uuid4())
        log_dir = self.log_root / f"{namespace}_{name}_{uid}"  # like /var/log/pods/<ns>_<name>_<uid>
        pod = self.client.run_pod(name, namespace, uid, log_dir, handler=HANDLER)
        self.pods.append(pod)
        return pod

    def start(self, pod: Pod, name: str, image: str, **kw: object) -> str:
        """CreateContainer + StartContainer; returns the container id."""
        cid = self.client.create_container(pod.id, pod.config, name, image, **kw)
        self.client.start_container(cid)
        return cid

    def run_to_exit(
        self, pod: Pod, name: str, image: str, timeout: float = 20, **kw: object
    ) -> cri.ContainerStatus:
        cid = self.start(pod, name, image, **kw)
        return self.client.wait_container_state(cid, CONTAINER_EXITED, timeout=timeout)

    def log(self, pod: Pod, cid: str) -> list[LogLine]:
        return read_cri_log(self.client.log_file(pod, cid))

    def remove(self, pod: Pod) -> None:
        """What the kubelet does when a pod is deleted."""
        self.client.remove_pod(pod.id)
        self.pods.remove(pod)

    def host_pid(self) -> int:
        host = find_host_process(self.c)
        assert host is not None, f"no layotto node host runs for {self.c.state}"
        return host.pid

    def diagnostics(self) -> str:
        host_log = self.c.state / "layotto" / "host.log"
        try:
            tail = "\n".join(host_log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            tail = "(none)"
        return f"--- containerd log ---\n{self.c.log_tail(30)}\n--- {host_log} ---\n{tail}"


@pytest.fixture
def kubelet(cri_images: Containerd, tmp_path: Path) -> Iterator[Kubelet]:
    client = CriClient(cri_images.address)
    k = Kubelet(cri_images, client, tmp_path / "pods")
    try:
        yield k
    finally:
        for pod in list(k.pods):
            try:
                k.remove(pod)
            except grpc.RpcError as exc:
                print(f"removing pod {pod.id} failed: {exc}\n{k.diagnostics()}")
        client.close()


def rootfs_mounts(c: Containerd) -> list[str]:
    return [m for m in mounts_under(c.base) if "/rootfs" in m]


def texts(lines: list[LogLine], stream: str = "stdout") -> list[str]:
    return [line.content for line in lines if line.stream == stream]


def is_rfc3339_nano(stamp: str) -> bool:
    # Go's RFC3339Nano trims trailing zeros of the fraction; Python wants 6 digits at most.
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", stamp)
    if m is None:
        return False
    datetime.fromisoformat(m.group(1) + (m.group(3).replace("Z", "+00:00")))
    return True


# --------------------------------------------------------------------------- lifecycle


def test_hello_pod_runs_like_a_kubelet_drives_it(kubelet: Kubelet) -> None:
    client = kubelet.client
    pod = kubelet.run_pod("hello")

    status = client.pod_sandbox_status(pod.id).status
    assert status.state == SANDBOX_READY
    assert status.runtime_handler == HANDLER
    assert status.metadata.name == pod.config.metadata.name
    host_pid = kubelet.host_pid()
    assert client.sandbox_info(pod.id)["pid"] == host_pid  # the sandbox is a placeholder in the host

    cid = client.create_container(pod.id, pod.config, "hello", HELLO)
    assert client.container_status(cid).status.state == cri.CONTAINER_CREATED
    client.start_container(cid)
    st = client.wait_container_state(cid, CONTAINER_EXITED, timeout=20)
    assert st.exit_code == 0, kubelet.diagnostics()
    assert st.reason == "Completed"
    # finished_at is the module's own exit time; CRI stamps started_at only after Start
    # returned, by which time hello may already have finished: order them loosely.
    assert st.created_at < st.started_at and st.created_at < st.finished_at

    log_file = client.log_file(pod, cid)
    assert log_file == pod.log_directory / "hello" / "0.log"
    lines = read_cri_log(log_file)
    assert [(x.stream, x.tag, x.content) for x in lines] == [("stdout", "F", GREETING)]
    assert is_rfc3339_nano(lines[0].time), lines[0].time
    raw = log_file.read_text()
    assert re.fullmatch(r"\S+ stdout F " + re.escape(GREETING) + "\n", raw), raw

    assert find_host_process(kubelet.c).pid == host_pid  # still the same node host
    client.remove_container(cid)
    assert client.list_containers(pod_id=pod.id) == []
    client.stop_pod_sandbox(pod.id)
    assert client.pod_sandbox_status(pod.id).status.state == SANDBOX_NOTREADY
    client.remove_pod_sandbox(pod.id)
    kubelet.pods.remove(pod)
    assert pod.id not in [p.id for p in client.list_pod_sandbox()]
    assert rootfs_mounts(kubelet.c) == []


def test_exit_code_stderr_args_and_env(kubelet: Kubelet) -> None:
    pod = kubelet.run_pod("exit7")
    st = kubelet.run_to_exit(
        pod,
        "echo",
        ECHOARGS,
        args=["first arg", "env:GREETING", "stderr:something went wrong", "exit:7"],
        env={"GREETING": "hi there"},
    )
    assert st.exit_code == 7
    assert st.reason == "Error"
    lines = kubelet.log(pod, st.id)
    assert texts(lines, "stderr") == ["something went wrong"]
    assert [x.tag for x in lines] == ["F"] * len(lines)
    out = texts(lines)
    assert out[:2] == ["arg[0]=/echoargs.wasm", "arg[1]=first arg"]
    assert "env:GREETING=hi there" in out
    assert "something went wrong" not in out
    assert kubelet.client.pod_sandbox_status(pod.id).status.state == SANDBOX_READY


def test_command_replaces_entrypoint_and_cmd(kubelet: Kubelet) -> None:
    pod = kubelet.run_pod("cmd")
    st = kubelet.run_to_exit(pod, "echo", MODS, command=["/echoargs.wasm"], args=["exit:3"])
    assert st.exit_code == 3
    assert texts(kubelet.log(pod, st.id)) == ["arg[0]=/echoargs.wasm", "arg[1]=exit:3"]


def test_output_reaches_the_log_file_while_the_module_runs(kubelet: Kubelet) -> None:
    client = kubelet.client
    pod = kubelet.run_pod("ticker")
    cid = kubelet.start(pod, "ticker", MODS, command=["/ticker.wasm"], args=["4", "400"])
    log_file = client.log_file(pod, cid)
    wait_for_log(log_file, lambda lines: "tick 0" in texts(lines))
    # The first line is in the CRI log file while the module still sleeps towards tick 3.
    assert client.container_status(cid).status.state == CONTAINER_RUNNING
    st = client.wait_container_state(cid, CONTAINER_EXITED, timeout=20)
    assert st.exit_code == 0
    assert texts(read_cri_log(log_file)) == ["tick 0", "tick 1", "tick 2", "tick 3"]


@pytest.mark.parametrize(
    ("module", "first_line", "grace", "exit_code"),
    [
        ("busyloop", "spinning", 10, 143),  # SIGTERM ends it within the grace period
        ("sleeper", "sleeping", 10, 143),  # even while blocked in a WASI sleep
        ("busyloop", "spinning", 0, 137),  # no grace period: SIGKILL at once
    ],
)
def test_stop_container_ends_the_function(
    kubelet: Kubelet, module: str, first_line: str, grace: int, exit_code: int
) -> None:
    client = kubelet.client
    pod = kubelet.run_pod(module)
    cid = kubelet.start(pod, module, MODS, command=[f"/{module}.wasm"])
    client.wait_container_state(cid, CONTAINER_RUNNING)
    wait_for_log(client.log_file(pod, cid), lambda lines: first_line in texts(lines))
    host_pid = kubelet.host_pid()
    assert client.container_info(cid)["pid"] == host_pid  # a nanoprocess in the node host
    assert client.sandbox_info(pod.id)["pid"] == host_pid

    began = time.monotonic()
    client.stop_container(cid, timeout=grace)
    took = time.monotonic() - began
    st = client.wait_container_state(cid, CONTAINER_EXITED, timeout=5)
    assert st.exit_code == exit_code
    assert took < 5, f"StopContainer took {took:.1f} s"
    assert client.pod_sandbox_status(pod.id).status.state == SANDBOX_READY


# --------------------------------------------------------------------------- stats and limits


def sample(client: CriClient, cid: str) -> tuple[int, int]:
    """(cpu usage ns, timestamp ns) of one ContainerStats."""
    stats = client.container_stats(cid)
    return stats.cpu.usage_core_nano_seconds.value, stats.cpu.timestamp


def cpu_share(client: CriClient, cid: str, seconds: float = 2.0) -> float:
    """The container's CPU use over about ``seconds``, in cores, from ContainerStats."""
    cpu0, ts0 = sample(client, cid)
    time.sleep(seconds)  # the measurement window itself, not a wait for a condition
    cpu1, ts1 = sample(client, cid)
    assert ts1 > ts0
    return (cpu1 - cpu0) / (ts1 - ts0)


def test_container_stats_show_real_memory_and_cpu(kubelet: Kubelet) -> None:
    client = kubelet.client
    pod = kubelet.run_pod("stats")
    busy = kubelet.start(pod, "busy", MODS, command=["/busyloop.wasm"])
    sleepy = kubelet.start(pod, "sleepy", MODS, command=["/sleeper.wasm"])
    for cid, line in ((busy, "spinning"), (sleepy, "sleeping")):
        client.wait_container_state(cid, CONTAINER_RUNNING)
        wait_for_log(client.log_file(pod, cid), lambda lines, line=line: line in texts(lines))

    for cid, name in ((busy, "busy"), (sleepy, "sleepy")):
        stats = client.container_stats(cid)
        assert stats.attributes.id == cid
        assert stats.attributes.metadata.name == name
        assert stats.memory.working_set_bytes.value > 0
        assert stats.memory.timestamp > 0 and stats.cpu.timestamp > 0

    first = client.container_stats(busy).cpu.usage_core_nano_seconds.value
    deadline = time.monotonic() + 5
    while client.container_stats(busy).cpu.usage_core_nano_seconds.value <= first:
        assert time.monotonic() < deadline, "the busy loop's CPU usage does not grow"
        time.sleep(0.05)

    listed = {s.attributes.id: s for s in client.list_container_stats(pod_id=pod.id)}
    assert set(listed) == {busy, sleepy}
    assert listed[busy].memory.working_set_bytes.value > 0
    # A sleeping module uses (nearly) no CPU, a spinning one a lot.
    assert listed[sleepy].cpu.usage_core_nano_seconds.value < listed[busy].cpu.usage_core_nano_seconds.value


def test_memory_limit_ends_a_memory_hog_as_oom_killed(kubelet: Kubelet) -> None:
    pod = kubelet.run_pod("memhog")
    st = kubelet.run_to_exit(pod, "memhog", MODS, command=["/memhog.wasm"], memory_limit=32 * MiB)
    stderr = texts(kubelet.log(pod, st.id), "stderr")
    assert st.exit_code != 0, stderr
    assert st.reason == "OOMKilled", (st.reason, st.message, stderr, kubelet.diagnostics())
    assert len(stderr) == 1 and stderr[0].startswith("memhog: out of memory after"), stderr
    mib = int(stderr[0].split("out of memory after")[1].split()[0])
    assert 16 <= mib < 32
    # Under its limit the same module completes normally (no OOM reported).
    ok = kubelet.run_to_exit(
        pod, "memhog-ok", MODS, command=["/memhog.wasm"], args=["8"], memory_limit=32 * MiB
    )
    assert (ok.exit_code, ok.reason) == (0, "Completed")
    assert kubelet.client.pod_sandbox_status(pod.id).status.state == SANDBOX_READY


def test_cpu_limit_throttles_a_busy_loop(kubelet: Kubelet) -> None:
    client = kubelet.client
    pod = kubelet.run_pod("cpu")
    limited = kubelet.start(
        pod, "limited", MODS, command=["/busyloop.wasm"], cpu_quota=10_000, cpu_period=100_000
    )
    client.wait_container_state(limited, CONTAINER_RUNNING)
    wait_for_log(client.log_file(pod, limited), lambda lines: "spinning" in texts(lines))
    share = cpu_share(client, limited)
    client.stop_container(limited, timeout=2)
    assert 0.05 <= share <= 0.20, f"100m busy loop used {share:.1%} of a core"

    unlimited = kubelet.start(pod, "unlimited", MODS, command=["/busyloop.wasm"])
    client.wait_container_state(unlimited, CONTAINER_RUNNING)
    wait_for_log(client.log_file(pod, unlimited), lambda lines: "spinning" in texts(lines))
    # Other work on this (2-core) machine can take CPU from it for a while: the best of
    # up to three windows is what the runtime itself allows.
    full = 0.0
    for _ in range(3):
        full = max(full, cpu_share(client, unlimited))
        if full > 0.5:
            break
    client.stop_container(unlimited, timeout=2)
    print(f"CPU use: limited to 100m {share:.1%} of a core, unlimited {full:.1%}")
    # Under load the unlimited loop may not get half a core, but it must get several times
    # what the limited one is allowed: the throttle, not the machine, holds the limited one.
    assert full > max(0.3, 2.5 * share), f"an unlimited busy loop used only {full:.1%} of a core"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("image", "kw", "cause"),
    [
        pytest.param(NOTWASM, {}, "/notwasm.txt is not a WebAssembly module", id="image-not-wasm"),
        pytest.param(
            MODS,
            {"command": ["/missing.wasm"]},
            "/missing.wasm: no such file in the container image",
            id="missing-file",
        ),
        pytest.param(
            HELLO, {"memory_limit": 64 << 10}, "cannot instantiate the module", id="memory-below-initial"
        ),
    ],
)
def test_a_failed_start_names_its_cause_and_harms_nobody(
    kubelet: Kubelet, image: str, kw: dict[str, object], cause: str
) -> None:
    client = kubelet.client
    pod = kubelet.run_pod("bad")
    cid = client.create_container(pod.id, pod.config, "bad", image, **kw)
    try:
        client.start_container(cid)
    except grpc.RpcError as exc:
        assert cause in (exc.details() or ""), exc.details()
    st = client.wait_container_state(cid, CONTAINER_EXITED)
    print(f"ContainerStatus: exit_code={st.exit_code} reason={st.reason!r} message={st.message!r}")
    assert st.exit_code != 0
    assert cause in st.reason + " " + st.message, (st.reason, st.message)

    # That pod's sandbox keeps working ...
    assert client.pod_sandbox_status(pod.id).status.state == SANDBOX_READY
    ok = kubelet.run_to_exit(pod, "after", HELLO)
    assert ok.exit_code == 0 and texts(kubelet.log(pod, ok.id)) == [GREETING]
    # ... and so does every other pod.
    other = kubelet.run_pod("other")
    ok = kubelet.run_to_exit(other, "hello", HELLO)
    assert ok.exit_code == 0 and texts(kubelet.log(other, ok.id)) == [GREETING]

    kubelet.remove(pod)
    kubelet.remove(other)
    assert rootfs_mounts(kubelet.c) == []


# --------------------------------------------------------------------------- several at once


def test_two_pods_at_once(kubelet: Kubelet) -> None:
    client = kubelet.client
    pods = [kubelet.run_pod("a"), kubelet.run_pod("b")]
    cids = [
        kubelet.start(pod, "ticker", MODS, command=["/ticker.wasm"], args=["3", "500"], env={"POD": str(i)})
        for i, pod in enumerate(pods)
    ]
    # Both run at the same time, both as nanoprocesses of the one node host.
    for cid in cids:
        client.wait_container_state(cid, CONTAINER_RUNNING)
    host_pid = kubelet.host_pid()
    for pod, cid in zip(pods, cids, strict=True):
        assert client.sandbox_info(pod.id)["pid"] == host_pid
        if client.container_status(cid).status.state == CONTAINER_RUNNING:
            assert client.container_info(cid)["pid"] == host_pid
    assert client.list_containers(pod_id=pods[0].id, state=CONTAINER_RUNNING) != []
    assert client.list_containers(pod_id=pods[1].id, state=CONTAINER_RUNNING) != []
    for pod, cid in zip(pods, cids, strict=True):
        st = client.wait_container_state(cid, CONTAINER_EXITED, timeout=20)
        assert st.exit_code == 0
        assert texts(kubelet.log(pod, cid)) == ["tick 0", "tick 1", "tick 2"]
    for pod in list(pods):
        kubelet.remove(pod)
    assert rootfs_mounts(kubelet.c) == []


def test_a_pod_with_two_containers(kubelet: Kubelet) -> None:
    client = kubelet.client
    pod = kubelet.run_pod("pair")
    server = kubelet.start(pod, "server", MODS, command=["/sleeper.wasm"])
    client.wait_container_state(server, CONTAINER_RUNNING)
    wait_for_log(client.log_file(pod, server), lambda lines: "sleeping" in texts(lines))
    sidecar = kubelet.run_to_exit(pod, "sidecar", ECHOARGS, args=["second"])
    assert sidecar.exit_code == 0
    assert texts(kubelet.log(pod, sidecar.id)) == ["arg[0]=/echoargs.wasm", "arg[1]=second"]
    assert texts(kubelet.log(pod, server)) == ["sleeping"]
    host_pid = kubelet.host_pid()
    assert client.container_info(server)["pid"] == host_pid
    assert client.sandbox_info(pod.id)["pid"] == host_pid
    assert {c.id for c in client.list_containers(pod_id=pod.id)} == {server, sidecar.id}

    client.stop_container(server, timeout=5)
    assert client.wait_container_state(server, CONTAINER_EXITED).exit_code == 143
    kubelet.remove(pod)
    assert rootfs_mounts(kubelet.c) == []


def test_nothing_is_left_after_the_pods_are_removed(kubelet: Kubelet) -> None:
    # Runs last: every earlier test's pods are gone (their fixtures removed them).
    pod = kubelet.run_pod("last")
    kubelet.run_to_exit(pod, "hello", HELLO)
    kubelet.remove(pod)
    assert kubelet.client.list_pod_sandbox() == []
    assert kubelet.client.list_containers() == []
    assert rootfs_mounts(kubelet.c) == []
    tasks = kubelet.c.ctr("tasks", "ls", "-q", namespace=CRI_NAMESPACE).stdout.split()
    assert tasks == []
