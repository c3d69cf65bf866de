"""Function pods on their own pod IPs, through containerd's CRI with real pod networking.

The private containerd of the ``cri_containerd`` fixture has a bridge CNI network of its own
(tests/containerd_env.py: Debian's containernetworking-plugins, a ``lyt-`` bridge on a free
private /24, no masquerade). Pods here ask for a network namespace of their own, as every
pod without ``hostNetwork`` does, so CNI gives each an IP; the node host opens each function
pod's listener inside that namespace (host/podnet.py). Everything is checked from outside,
as a Service, another pod or the kubelet reaches a pod: TCP to the pod IP.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from layotto.host import podnet
from layotto.host.errors import ModuleError
from layotto.host.function_registry import FunctionRegistry
from layotto.host.ingress import Ingress
from layotto.images import builder
from layotto.shim.bundle import network_namespace
from tests.conftest import REPO_ROOT, find_host_process
from tests.containerd_env import CNI_PLUGIN_DIR, Containerd
from tests.cri_client import CONTAINER_EXITED, CONTAINER_RUNNING, CriClient, Pod, cri
from tests.support import wait_for

CRI_NAMESPACE = "k8s.io"
HANDLER = "layotto"
#: fn_echo.wasm (echoes method, path, query and headers; ?status=N answers N) and
#: fn-hello.wasm ("Hello, <name>!"), CMD ["/fn_echo.wasm"].
FUNCS = "docker.io/library/layotto-podnet-fns:latest"
#: The image deploy/function.yaml names, built as its comment says.
MANIFEST_IMAGE = "docker.io/library/fn-hello:latest"

_ids = itertools.count()


# --------------------------------------------------------------------------- parsing (no containerd)


def test_the_pod_port_is_2045_or_the_annotation() -> None:
    assert podnet.pod_port({}) == 2045
    assert podnet.pod_port({"layotto.io/port": "8080"}) == 8080
    assert podnet.pod_port({"layotto.io/port": " 1 "}) == 1
    for bad in ("0", "65536", "-1", "80a", "", "８０", "1e3", "99999999999999999999"):
        with pytest.raises(ValueError, match=r"annotation layotto.io/port=.* is not a TCP port"):
            podnet.pod_port({"layotto.io/port": bad})


def test_the_sandbox_spec_names_its_network_namespace() -> None:
    def spec(*namespaces: object) -> dict[str, object]:
        return {"linux": {"namespaces": list(namespaces)}}

    cni = "/var/run/netns/cni-1234"
    assert network_namespace(spec({"type": "pid"}, {"type": "network", "path": cni})) == cni
    assert network_namespace(spec({"type": "network"})) == ""  # a new one: nothing CNI made
    assert network_namespace(spec({"type": "ipc", "path": "/x"})) == ""
    assert network_namespace({}) == ""
    assert network_namespace({"linux": {"namespaces": "network"}}) == ""
    for bad in ("relative/netns", "/var/run/netns/../../etc/passwd", "/x\0y", 7):
        with pytest.raises(ModuleError, match="network namespace path"):
            network_namespace(spec({"type": "network", "path": bad}))


# --------------------------------------------------------------------------- PodNetworks alone


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[str]:
    """A network namespace of the test's own (``ip netns add``), with loopback up."""
    name = f"lyt-t{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.integration
def test_pod_networks_listen_in_the_namespace_for_its_own_pods(netns: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        ingress = Ingress(FunctionRegistry())
        pods = podnet.PodNetworks(ingress)
        # The node's own namespace is host network: nothing to do.
        assert not pods.add_sandbox("k8s.io", "hostnet", "/proc/self/ns/net", "default")
        assert pods.add_sandbox("k8s.io", "sb", netns, "default")
        # Another tenant naming this sandbox gets no listener in it.
        assert await pods.attach("k8s.io", "sb", "other", 2045) is None
        assert await pods.attach("other-containerd-ns", "sb", "default", 2045) is None
        listener = await pods.attach("k8s.io", "sb", "default", 2045)
        assert listener is not None and pods.listeners == [listener]
        # The socket is in the pod's namespace: listed there, not in the node's.
        assert listener_inodes(netns, 2045) and not listener_inodes("/proc/self/ns/net", 2045)
        # A second function of the pod on the same port shares the listener.
        assert await pods.attach("k8s.io", "sb", "default", 2045) is listener
        pods.detach(listener, None)
        assert listener_inodes(netns, 2045)
        pods.detach(listener, None)
        assert not listener_inodes(netns, 2045) and pods.listeners == []
        # A file that is not a network namespace is refused by the kernel, with the path.
        bogus = tmp_path / "not-a-netns"
        bogus.write_text("")
        assert pods.add_sandbox("k8s.io", "bogus", str(bogus), "default")
        with pytest.raises(OSError, match="not-a-netns: not a network namespace"):
            await pods.attach("k8s.io", "bogus", "default", 2045)
        # A sandbox that stops closes what it still has.
        await pods.attach("k8s.io", "sb", "default", 8080)
        assert listener_inodes(netns, 8080)
        pods.remove_sandbox("k8s.io", "sb")
        assert not listener_inodes(netns, 8080)
        await ingress.close()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def net_images(
    cri_containerd: Containerd, wasm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Containerd:
    c = cri_containerd
    if c.cni_bin_dir != CNI_PLUGIN_DIR:
        pytest.fail(f"{CNI_PLUGIN_DIR}/bridge is missing: apt-get install containernetworking-plugins")
    out = tmp_path_factory.mktemp("podnet-images")
    builder.build_image(
        out / "pause.tar", {"/pause": b"layotto pause placeholder\n"}, name=c.sandbox_image, cmd=["/pause"]
    )
    mods = {f"/{m}.wasm": wasm_dir / f"{m}.wasm" for m in ("fn_echo", "fn-hello")}
    builder.build_image(out / "fns.tar", mods, name=FUNCS, cmd=["/fn_echo.wasm"])
    hello = {"/fn-hello.wasm": wasm_dir / "fn-hello.wasm"}
    builder.build_image(out / "fn-hello.tar", hello, name=MANIFEST_IMAGE, cmd=["/fn-hello.wasm"])
    for name in ("pause", "fns", "fn-hello"):
        c.import_image(out / f"{name}.tar", namespace=CRI_NAMESPACE)
    with CriClient(c.address) as client:
        for image in (c.sandbox_image, FUNCS, MANIFEST_IMAGE):
            client.wait_image(image)
    return c


@dataclass
class NetPod:
    pod: Pod
    ip: str
    netns: str
    containers: list[str] = field(default_factory=list)


@dataclass
class Kubelet:
    c: Containerd
    client: CriClient
    log_root: Path
    pods: list[NetPod] = field(default_factory=list)

    def run_pod(self, name: str, annotations: dict[str, str] | None = None) -> NetPod:
        """RunPodSandbox for a pod with a network namespace of its own (CNI)."""
        name = f"{name}-{next(_ids)}"
        uid = str(uuid.uuid4())
        log_dir = self.log_root / f"default_{name}_{uid}"
        log_dir.mkdir(parents=True)
        config = CriClient.pod_config(name, "default", uid, log_dir, annotations=annotations)
        config.linux.security_context.namespace_options.network = cri.POD
        pod = Pod(self.client.run_pod_sandbox(config, HANDLER), config)
        info = self.client.sandbox_info(pod.id)
        netns = next(
            ns["path"] for ns in info["runtimeSpec"]["linux"]["namespaces"] if ns["type"] == "network"
        )
        found = NetPod(pod, CriClient.pod_ipv4(info), netns)
        self.pods.append(found)
        return found

    def start(self, pod: NetPod, name: str, module: str, function_id: str | None, image: str = FUNCS) -> str:
        config = CriClient.container_config(name, image, command=[f"/{module}.wasm"] if module else None)
        config.linux.security_context.namespace_options.network = cri.POD
        # (CRI hands the pod's layotto.io/* annotations, as CreateContainer sends them, to
        # the container: the function id is set per container here.)
        sandbox = pod.pod.config if function_id is None else with_id(pod.pod.config, function_id)
        cid = self.client.create_container_raw(pod.pod.id, config, sandbox)
        self.client.start_container(cid)
        pod.containers.append(cid)
        return cid

    def remove(self, pod: NetPod) -> None:
        self.client.remove_pod(pod.pod.id)
        self.pods.remove(pod)

    def host_pid(self) -> int:
        host = find_host_process(self.c)
        assert host is not None
        return host.pid


def with_id(config: cri.PodSandboxConfig, function_id: str) -> cri.PodSandboxConfig:
    """The pod's config as CreateContainer sends it, its function-id annotation set."""
    copy = cri.PodSandboxConfig()
    copy.CopyFrom(config)
    copy.annotations["layotto.io/function-id"] = function_id
    return copy


@pytest.fixture
def kubelet(net_images: Containerd, tmp_path: Path) -> Iterator[Kubelet]:
    client = CriClient(net_images.address)
    k = Kubelet(net_images, client, tmp_path / "pods")
    try:
        yield k
    finally:
        for pod in list(k.pods):
            try:
                k.remove(pod)
            except grpc.RpcError as exc:
                print(f"removing pod {pod.pod.id} failed: {exc}")
        client.close()


def get(ip: str, port: int, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(ip, port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def refused(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


# --------------------------------------------------------------------------- pods on their IPs


@pytest.mark.integration
def test_each_function_answers_on_its_own_pod_ip(kubelet: Kubelet) -> None:
    echo = kubelet.run_pod("echo")
    hello = kubelet.run_pod("hello", {"layotto.io/port": "8080"})
    assert echo.ip != hello.ip
    echo_id, hello_id = f"echo-{echo.pod.id[:8]}", f"hello-{hello.pod.id[:8]}"
    echo_c = kubelet.start(echo, "echo", "fn_echo", echo_id)
    kubelet.start(hello, "hello", "fn-hello", hello_id)
    # The listeners open before StartContainer returns: no wait.
    status, body = get(echo.ip, 2045, "/some/path?x=1")
    assert status == 200 and b"path=/some/path\nquery=x=1\n" in body
    assert get(hello.ip, 8080, "/?name=pod") == (200, b"Hello, pod!\n")
    assert refused(hello.ip, 2045)  # its pod named another port
    assert refused(echo.ip, 8080)
    # By id on a pod's IP: its own id answers, another function's id is not there.
    assert get(echo.ip, 2045, "/", {"id": echo_id})[0] == 200
    assert get(echo.ip, 2045, "/", {"id": hello_id})[0] == 404
    # The node-wide ingress keeps serving both by id.
    node = kubelet.c.host_port()
    assert get("127.0.0.1", node, "/?name=node", {"id": hello_id}) == (200, b"Hello, node!\n")
    assert get("127.0.0.1", node, "/", {"id": echo_id})[0] == 200

    # A keep-alive connection open when the container stops is closed with its listener.
    idle = http.client.HTTPConnection(echo.ip, 2045, timeout=10)
    idle.request("GET", "/")
    assert idle.getresponse().read().startswith(b"method=GET")
    kubelet.client.stop_container(echo_c, timeout=2)
    kubelet.client.wait_container_state(echo_c, CONTAINER_EXITED)
    assert refused(echo.ip, 2045)  # the stopped pod's IP stops answering at once
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        idle.request("GET", "/")
        idle.getresponse().read()
    idle.close()
    assert get(hello.ip, 8080, "/") == (200, b"Hello, world!\n")  # the other pod keeps answering


@pytest.mark.integration
def test_probes_as_the_kubelet_sends_them(kubelet: Kubelet) -> None:
    pod = kubelet.run_pod("probe")
    kubelet.start(pod, "echo", "fn_echo", f"probe-{pod.pod.id[:8]}")

    def probe(path: str, method: str = "GET") -> bytes:
        """One httpGet probe, byte for byte as the kubelet's prober writes it."""
        with socket.create_connection((pod.ip, 2045), timeout=10) as s:
            s.sendall(
                f"{method} {path} HTTP/1.1\r\nHost: {pod.ip}:2045\r\nUser-Agent: kube-probe/1.27\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data

    # The function answers its own /healthz ...
    answer = probe("/healthz")
    assert answer.startswith(b"HTTP/1.1 200 ") and b"path=/healthz\n" in answer
    assert b"h:user-agent=kube-probe/1.27\n" in answer
    # ... and when it has none (it answers 404), the host answers: the function is serving.
    answer = probe("/healthz?status=404")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nok\n")
    assert probe("/healthz?status=404", "HEAD").startswith(b"HTTP/1.1 200 ")
    # Any other failure of the function is the probe's answer, as are other paths' 404s.
    assert probe("/healthz?status=503").startswith(b"HTTP/1.1 503 ")
    assert probe("/ready?status=404").startswith(b"HTTP/1.1 404 ")


@pytest.mark.integration
def test_several_functions_in_one_pod_are_routed_by_id(kubelet: Kubelet) -> None:
    pod = kubelet.run_pod("pair")
    first_id, second_id = f"first-{pod.pod.id[:8]}", f"second-{pod.pod.id[:8]}"
    first = kubelet.start(pod, "first", "fn-hello", first_id)
    kubelet.start(pod, "second", "fn_echo", second_id)
    assert get(pod.ip, 2045, "/") == (200, b"Hello, world!\n")  # no id: the first container
    status, body = get(pod.ip, 2045, "/", {"id": second_id})
    assert status == 200 and body.startswith(b"method=GET")
    assert get(pod.ip, 2045, "/", {"id": "nobody"})[0] == 404
    kubelet.client.stop_container(first, timeout=2)
    kubelet.client.wait_container_state(first, CONTAINER_EXITED)
    status, body = get(pod.ip, 2045, "/")  # the listener stays for the second one
    assert status == 200 and body.startswith(b"method=GET")
    assert get(pod.ip, 2045, "/", {"id": first_id})[0] == 404


@pytest.mark.integration
def test_a_bad_port_annotation_fails_the_container_with_its_cause(kubelet: Kubelet) -> None:
    pod = kubelet.run_pod("badport", {"layotto.io/port": "70000"})
    config = CriClient.container_config("echo", FUNCS, command=["/fn_echo.wasm"])
    config.linux.security_context.namespace_options.network = cri.POD
    cid = kubelet.client.create_container_raw(pod.pod.id, config, pod.pod.config)
    with pytest.raises(grpc.RpcError) as failure:  # (CRI creates the task at StartContainer)
        kubelet.client.start_container(cid)
    cause = "annotation layotto.io/port='70000' is not a TCP port (1-65535)"
    assert cause in str(failure.value.details())
    assert cause in kubelet.client.container_status(cid).status.message


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return found


def listener_inodes(netns: str, port: int) -> set[str]:
    """``socket:[inode]`` of the sockets listening on ``port`` inside the namespace."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        out = subprocess.run(
            ["nsenter", f"--net={netns}", "cat", table], capture_output=True, text=True, check=True
        ).stdout
        for line in out.splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                found.add(f"socket:[{fields[9]}]")
    return found


@pytest.mark.integration
def test_removing_the_pod_leaves_no_listener_and_no_namespace_fd(kubelet: Kubelet) -> None:
    pod = kubelet.run_pod("gone", {"layotto.io/port": "9090"})
    kubelet.start(pod, "echo", "fn_echo", f"gone-{pod.pod.id[:8]}")
    assert get(pod.ip, 9090, "/")[0] == 200
    pid = kubelet.host_pid()
    listeners = listener_inodes(pod.netns, 9090)
    assert len(listeners) == 1 and listeners <= socket_inodes(pid)  # the host holds it
    netns_fd = f"net:[{os.stat(pod.netns).st_ino}]"
    assert netns_fd not in socket_inodes(pid)  # no descriptor of the namespace is kept

    kubelet.remove(pod)
    left = socket_inodes(pid)
    assert not listeners & left, "the pod's listener is still open in the node host"
    assert netns_fd not in left
    assert not Path(pod.netns).exists()
    assert refused_or_unreachable(pod.ip, 9090)


def refused_or_unreachable(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=2):
            return False
    except OSError:
        return True


@pytest.mark.integration
def test_host_network_pods_stay_on_the_node_ingress(kubelet: Kubelet, tmp_path: Path) -> None:
    client = kubelet.client
    log_dir = tmp_path / "hostnet"
    pod = client.run_pod(f"hostnet-{next(_ids)}", "default", str(uuid.uuid4()), log_dir)
    try:
        fid = f"hostnet-{pod.id[:8]}"
        config = CriClient.container_config("echo", FUNCS, command=["/fn_echo.wasm"])
        cid = client.create_container_raw(pod.id, config, with_id(pod.config, fid))
        client.start_container(cid)
        client.wait_container_state(cid, CONTAINER_RUNNING)
        wait_for(lambda: get("127.0.0.1", kubelet.c.host_port(), "/", {"id": fid})[0] == 200, timeout=10)
    finally:
        client.remove_pod(pod.id)


@pytest.mark.integration
def test_the_function_manifest_works_as_written(kubelet: Kubelet) -> None:
    """deploy/function.yaml's pod template through CRI, two replicas: each is ready by its
    readiness probe as the kubelet would send it, and answers on the Service's target port."""
    docs = [d for d in yaml.safe_load_all((REPO_ROOT / "deploy" / "function.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    def port(ref: int | str) -> int:
        return ports[ref] if isinstance(ref, str) else ref

    replicas = []
    for _ in range(deployment["spec"]["replicas"]):
        pod = kubelet.run_pod("fn-hello", template["metadata"]["annotations"])
        kubelet.start(pod, container["name"], "", None, image=container["image"])
        replicas.append(pod)
    for pod in replicas:
        for probe in ("readinessProbe", "livenessProbe"):
            action = container[probe]["httpGet"]
            status, _ = get(pod.ip, port(action["port"]), action["path"], {"User-Agent": "kube-probe/1.27"})
            assert 200 <= status < 400, f"{probe} of {pod.ip} answered {status}"
        (target,) = service["spec"]["ports"]
        assert get(pod.ip, port(target["targetPort"]), "/?name=svc") == (200, b"Hello, svc!\n")


@pytest.mark.integration
def test_a_port_taken_in_the_pod_fails_the_start_with_its_cause(kubelet: Kubelet) -> None:
    pod = kubelet.run_pod("taken", {"layotto.io/port": "7070"})
    # Something else of the pod holds its port: a listener in its namespace.
    holder = subprocess.Popen(
        ["nsenter", f"--net={pod.netns}", sys.executable, "-c", HOLD_PORT, "7070"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "listening"
        config = CriClient.container_config("echo", FUNCS, command=["/fn_echo.wasm"])
        config.linux.security_context.namespace_options.network = cri.POD
        cid = kubelet.client.create_container_raw(pod.pod.id, config, pod.pod.config)
        with pytest.raises(grpc.RpcError) as failure:
            kubelet.client.start_container(cid)
        cause = "port 7070 is already in use in the pod's network namespace"
        assert cause in str(failure.value.details())
        assert cause in kubelet.client.container_status(cid).status.message
    finally:
        holder.kill()
        holder.wait()


#: Listen on argv[1] on every address, say so, and wait to be killed.
HOLD_PORT = """
import socket, sys, time
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
time.sleep(600)
"""
