"""``make demo``: hello.wasm through ``ctr``, then Layotto's FaaS quickstart through CRI.

Starts a private containerd with its CRI plugin (its own root, state and sockets under
/tmp/lt-XXXXXXXX, so a system containerd is never touched) whose PATH finds this venv's
``containerd-shim-layotto-v1``, and then:

1. imports ``build/hello.tar`` and runs hello twice with ``ctr run --rm --runtime
   io.containerd.layotto.v1``, showing that one node host served both runs;
2. runs Layotto's FaaS quickstart on that node host: seeds ``book1=100`` in the state store
   ``state_demo`` through the gRPC Runtime API, runs function_1 and function_2 as pods
   through CRI (as a kubelet would for ``images/examples/faas/function-{1,2}.yaml``), and
   runs ``curl -s -H 'id: id_1' 'localhost:2045/?name=book1'``, which must print
   ``There are 100 inventories for book1.``

The node host's HTTP ingress listens on port 2045 (Layotto's), or on a free port when 2045
is taken. Its components come from ``images/examples/faas/components.yaml`` (embedded
SQLite), or from ``components-redis.yaml`` pointed at ``LAYOTTO_DEMO_REDIS=host:port`` when
that is set. containerd, the node host, the pods and every mount are cleaned up on the way
out, also after Ctrl-C or a failure.

Run it as ``python -m tests.demo`` from the repository root (as root).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.containerd_env import Containerd, ContainerdError, CtrError, default_snapshotter, pid_alive

REPO_ROOT = Path(__file__).resolve().parent.parent
HELLO_TAR = REPO_ROOT / "build" / "hello.tar"
WASM_DIR = REPO_ROOT / "build" / "wasm"
HELLO_WASM = WASM_DIR / "hello.wasm"
IMAGE = "docker.io/library/hello:latest"
RUNTIME = "io.containerd.layotto.v1"
SHIM_NAME = "containerd-shim-layotto-v1"
EXPECTED = "Hello from a Layotto nanoprocess!"

FAAS = REPO_ROOT / "images" / "examples" / "faas"
MANIFESTS = (FAAS / "function-1.yaml", FAAS / "function-2.yaml")
#: The image each manifest names, and the module it holds.
FAAS_IMAGES = {
    "docker.io/library/function_1:latest": "faas_fn1",
    "docker.io/library/function_2:latest": "faas_fn2",
}
INGRESS_PORT = 2045  # Layotto's port for wasm functions
CRI_NAMESPACE = "k8s.io"
ANSWER = "There are 100 inventories for book1."
REDIS_ENV = "LAYOTTO_DEMO_REDIS"


class DemoFailed(Exception):
    """Something the demo shows did not happen; the message says what."""


def say(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        pass  # the reader went away (`make demo | head`): keep going, cleanup must still run


def step(text: str) -> None:
    say(f"» {text}")


def rel(path: Path) -> str:
    return os.path.relpath(path)


# --------------------------------------------------------------------------- hello (ctr)


def ensure_image() -> Path:
    """build/hello.tar, built from build/wasm/hello.wasm when ``make images`` has not run."""
    if HELLO_TAR.is_file():
        return HELLO_TAR
    if not HELLO_WASM.is_file():
        raise DemoFailed(f"{HELLO_WASM.relative_to(REPO_ROOT)} is missing: run `make modules` first")
    from layotto.images.builder import build_image

    wasm, tar = HELLO_WASM.relative_to(REPO_ROOT), HELLO_TAR.relative_to(REPO_ROOT)
    step(f"layotto image build --wasm {wasm} --name {IMAGE} -o {tar}")
    build_image(HELLO_TAR, {"/hello.wasm": HELLO_WASM}, name=IMAGE, cmd=["/hello.wasm"])
    return HELLO_TAR


def server_version(c: Containerd) -> str:
    lines = c.ctr("version").stdout.splitlines()
    server = lines.index("Server:") if "Server:" in lines else 0
    for line in lines[server:]:
        key, _, value = line.strip().partition(":")
        if key == "Version":
            return value.strip()
    return "?"


def run_hello(c: Containerd, container_id: str) -> tuple[int, list[str], float]:
    """``ctr run --rm`` hello, echoing its output as it arrives: (exit code, lines, seconds)."""
    args = ["run", "--rm", "--runtime", RUNTIME, IMAGE, container_id]
    step(shlex.join(["ctr", *args]))
    began = time.perf_counter()
    proc = c.ctr_popen(*args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, bufsize=1)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            say(line.rstrip("\n"))
            lines.append(line.rstrip("\n"))
        code = proc.wait(timeout=60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return code, lines, time.perf_counter() - began


def check_run(code: int, lines: list[str]) -> None:
    if code != 0:
        raise DemoFailed(f"hello exited with code {code}, expected 0")
    if lines != [EXPECTED]:
        raise DemoFailed(f"hello printed {lines!r}, expected {[EXPECTED]!r}")


def host_pid(c: Containerd) -> int:
    """The node host's pid, from ``<state>/layotto/host.pid``; it must be alive."""
    pid_file = c.state / "layotto" / "host.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise DemoFailed(f"no node host pid in {pid_file}: {exc}") from None
    if not pid_alive(pid):
        raise DemoFailed(f"the node host (pid {pid}, from {pid_file}) is not running")
    return pid


def hello(c: Containerd) -> None:
    archive = ensure_image()
    step(f"ctr images import {rel(archive)}")
    c.import_image(archive)
    say(f"  {IMAGE}")

    code, lines, seconds = run_hello(c, "hello-1")
    why = "cold: the shim started the node host, which compiled hello.wasm"
    say(f"  exit code {code}, {seconds * 1000:.0f} ms ({why})")
    check_run(code, lines)
    first = host_pid(c)

    code, lines, seconds = run_hello(c, "hello-2")
    why = "warm: the node host was running and had hello.wasm compiled"
    say(f"  exit code {code}, {seconds * 1000:.0f} ms ({why})")
    check_run(code, lines)
    second = host_pid(c)

    if first != second:
        raise DemoFailed(f"the runs were served by different node hosts (pids {first} and {second})")
    step(f"both runs were served by one node host process: pid {first}")
    say(f"  its log: {c.state / 'layotto' / 'host.log'}")


# --------------------------------------------------------------------------- the FaaS quickstart


@dataclass(frozen=True)
class FunctionPod:
    """The parts of a function's Pod manifest the node sees."""

    name: str
    namespace: str
    annotations: dict[str, str]
    container: str
    image: str

    @classmethod
    def load(cls, path: Path) -> FunctionPod:
        doc = yaml.safe_load(path.read_text())
        (container,) = doc["spec"]["containers"]
        meta = doc["metadata"]
        return cls(
            meta["name"],
            meta.get("namespace", "default"),
            dict(meta.get("annotations") or {}),
            container["name"],
            container["image"],
        )


def ingress_port() -> tuple[int, str]:
    """2045 when it is free, else a free port: (port, why it is not 2045 or "")."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", INGRESS_PORT))
            return INGRESS_PORT, ""
        except OSError as exc:
            why = exc.strerror or str(exc)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1], why


def redis_answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "localhost", int(port)), timeout=2) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except (OSError, ValueError):
        return False


def components_file(base: Path) -> tuple[Path, str]:
    """The node host's components file and how to describe state_demo."""
    redis = os.environ.get(REDIS_ENV, "").strip()
    if not redis:
        path = FAAS / "components.yaml"
        return path, f"embedded SQLite ({rel(path)})"
    if ":" not in redis:
        raise DemoFailed(f"{REDIS_ENV}={redis!r}: expected host:port")
    if not redis_answers(redis):
        raise DemoFailed(f"{REDIS_ENV}={redis}: no Redis answers PING there")
    template = FAAS / "components-redis.yaml"
    text = template.read_text().replace('redisHost: "localhost:6379"', f'redisHost: "{redis}"')
    path = base / "components.yaml"
    path.write_text(text)
    return path, f"Redis at {redis} ({rel(template)}, redisHost {redis})"


def load_save_state() -> ModuleType:
    """images/examples/faas/save_state.py, the seeding script the README uses by hand."""
    spec = importlib.util.spec_from_file_location("faas_save_state", FAAS / "save_state.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def faas_images(c: Containerd, client: Any) -> None:
    """The pause placeholder and function_1/function_2, imported into CRI's namespace."""
    from layotto.images.builder import build_image

    out = c.base / "images"
    out.mkdir(exist_ok=True)
    tars = [out / "pause.tar"]
    build_image(tars[0], {"/pause": b"layotto pause placeholder\n"}, name=c.sandbox_image, cmd=["/pause"])
    built = []
    for image, module in FAAS_IMAGES.items():
        wasm = WASM_DIR / f"{module}.wasm"
        if not wasm.is_file():
            raise DemoFailed(f"{rel(wasm)} is missing: run `make modules` first")
        tars.append(out / f"{module}.tar")
        build_image(tars[-1], {f"/{module}.wasm": wasm}, name=image, cmd=[f"/{module}.wasm"])
        built.append(f"{image.rsplit('/', 1)[1].removesuffix(':latest')} ({rel(wasm)})")
    step(f"layotto image build {', '.join(built)}; ctr -n {CRI_NAMESPACE} images import")
    for tar in tars:
        c.import_image(tar, namespace=CRI_NAMESPACE)
    for image in (c.sandbox_image, *FAAS_IMAGES):
        client.wait_image(image)


def run_pod(c: Containerd, client: Any, spec: FunctionPod, pods: list[str]) -> float:
    """RunPodSandbox on handler layotto, CreateContainer, StartContainer; seconds taken."""
    from tests.cri_client import CONTAINER_RUNNING

    began = time.perf_counter()
    uid = str(uuid.uuid4())
    log_dir = c.base / "pods" / f"{spec.namespace}_{spec.name}_{uid}"
    pod = client.run_pod(spec.name, spec.namespace, uid, log_dir, spec.annotations, handler="layotto")
    pods.append(pod.id)
    cid = client.create_container(pod.id, pod.config, spec.container, spec.image)
    client.start_container(cid)
    client.wait_container_state(cid, CONTAINER_RUNNING)
    return time.perf_counter() - began


def function_logs(c: Containerd, name: str) -> list[str]:
    from layotto.host.cli import admin_get

    try:
        status, body = admin_get(c.state / "layotto", f"/logs/{name}")
    except OSError:
        return []
    return [str(line) for line in body] if status == 200 else []


def policy_file(base: Path) -> Path:
    """The operator's policy for the demo node: the default rules, plus a Runtime API token
    for the app that seeds the state (as an operator provisions one per app)."""
    import secrets

    token = base / "seeder.token"
    token.write_text(secrets.token_urlsafe(32) + "\n")
    token.chmod(0o600)
    policy = base / "policy.yaml"
    apps = [{"namespace": "default", "app": "seeder", "tokenFile": str(token)}]
    policy.write_text(yaml.safe_dump({"runtimeApi": {"apps": apps}}))
    return policy


def quickstart(c: Containerd, port: int, store: str) -> None:
    from tests.cri_client import CriClient

    say("")
    step("Layotto's FaaS quickstart: function_1 (id_1) invokes function_2 (id_2), which reads the book")
    say(f"  state_demo is {store}")
    sock = c.state / "layotto" / "runtime.sock"
    target = f"unix://{sock}"
    step(f"SaveState state_demo book1=100 (gRPC Runtime API, {target}, the seeder app's token)")
    seeding = load_save_state()
    token = (c.base / "seeder.token").read_text().strip()
    seeding.save_state(target, token, "state_demo", "book1", b"100")
    value = seeding.get_state(target, token, "state_demo", "book1")
    if value != b"100":
        raise DemoFailed(f"GetState state_demo book1 answered {value!r} after the SaveState")

    specs = [FunctionPod.load(path) for path in MANIFESTS]
    pods: list[str] = []
    with CriClient(c.address) as client:
        try:
            faas_images(c, client)
            step("kubectl apply -f " + " -f ".join(rel(p) for p in MANIFESTS))
            calls = "RunPodSandbox (handler layotto), CreateContainer, StartContainer"
            say(f"  through CRI, as a kubelet: {calls}")
            for spec in specs:
                seconds = run_pod(c, client, spec, pods)
                fid = spec.annotations.get("layotto.io/function-id", "?")
                caps = spec.annotations.get("layotto.io/capabilities", "-")
                say(f"  pod {spec.name} running after {seconds * 1000:.0f} ms: id {fid}, capabilities {caps}")
            curl(c, port)
        finally:
            if pods:
                step("kubectl delete pod " + " ".join(s.name for s in specs[: len(pods)]))
            for pod_id in pods:
                try:
                    client.remove_pod(pod_id)
                except Exception as exc:  # cleanup goes on; containerd's stop removes the rest
                    say(f"  removing pod {pod_id[:12]} failed: {exc}")


def curl(c: Containerd, port: int) -> None:
    binary = shutil.which("curl")
    if binary is None:
        raise DemoFailed("curl is not installed (apt-get install -y curl)")
    argv = ["curl", "-s", "-H", "id: id_1", f"localhost:{port}/?name=book1"]
    step(shlex.join(argv))
    began = time.perf_counter()
    r = subprocess.run([binary, *argv[1:]], capture_output=True, text=True, timeout=30)
    seconds = time.perf_counter() - began
    say(r.stdout.rstrip("\n") or "(no output)")
    if r.returncode != 0 or r.stdout != ANSWER:
        logs = [f"  {fid}: {line}" for fid in ("id_1", "id_2") for line in function_logs(c, fid)[-5:]]
        raise DemoFailed(
            f"curl exited {r.returncode} and printed {r.stdout!r}, expected {ANSWER!r}"
            + (f" ({r.stderr.strip()})" if r.stderr.strip() else "")
            + ("\nfunction logs (layotto logs):\n" + "\n".join(logs) if logs else "")
        )
    say(f"  {seconds * 1000:.0f} ms: function_1 took the request and called function_2, which read book1")


# --------------------------------------------------------------------------- main


def demo(c: Containerd, port: int, port_note: str, store: str) -> None:
    shim_dir = Path(sys.executable).parent
    step(f"starting a private containerd with CRI in {c.base} (its PATH finds {SHIM_NAME} in {shim_dir})")
    c.start()
    say(f"  containerd {server_version(c)} is ready after {c.startup_seconds:.2f} s")
    if port_note:
        say(f"  port {INGRESS_PORT} is taken ({port_note}): the node host's ingress uses port {port} instead")

    hello(c)
    try:
        bound = c.host_port("http", timeout=5)
    except (OSError, ValueError):
        raise DemoFailed(f"the node host's HTTP ingress did not start on port {port}") from None
    if bound != port:
        raise DemoFailed(f"the node host's HTTP ingress listens on port {bound}, not {port}")
    quickstart(c, port, store)


def show_logs(c: Containerd) -> None:
    host_log = c.state / "layotto" / "host.log"
    if host_log.is_file():
        tail = host_log.read_text(errors="replace").splitlines()[-15:]
        say(f"--- last lines of {host_log} ---")
        say("\n".join(tail))
    if c.log.is_file():
        say(f"--- last lines of {c.log} ---")
        say(c.log_tail(15))


def main() -> int:
    if os.geteuid() != 0:
        say("make demo must run as root: it starts a private containerd and mounts container filesystems")
        return 1
    if not (Path(sys.executable).parent / SHIM_NAME).exists():
        say(f"{SHIM_NAME} is not next to {sys.executable}: run `make venv` first")
        return 1

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    port, port_note = ingress_port()
    c = Containerd(path_prepend=[Path(sys.executable).parent], cri=True, snapshotter=default_snapshotter())
    status = 0
    try:
        components, store = components_file(c.base)
        c.env.update(
            {
                "LAYOTTO_HTTP_PORT": str(port),
                "LAYOTTO_COMPONENTS": str(components),
                "LAYOTTO_GRPC_ADDRESS": "",  # the Runtime API on its unix socket only
                "LAYOTTO_POLICY": str(policy_file(c.base)),
            }
        )
        demo(c, port, port_note, store)
    except KeyboardInterrupt:
        say("\ninterrupted")
        status = 130
    except DemoFailed as exc:
        say(f"demo failed: {exc}")
        show_logs(c)
        status = 1
    except (ContainerdError, CtrError) as exc:
        say(f"demo failed: {exc}")
        status = 1
    except Exception as exc:  # a gRPC or CRI call that failed: say what, then clean up
        say(f"demo failed: {type(exc).__name__}: {exc}")
        show_logs(c)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            step("stopping containerd and the node host")
        finally:
            c.stop()
        say("  done" if status == 0 else "  stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
