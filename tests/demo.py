"""``make demo``: run hello.wasm as a Layotto nanoprocess through a real containerd.

Starts a private containerd (its own root, state and sockets under /tmp/lt-XXXXXXXX, so a
system containerd is never touched) whose PATH finds this venv's
``containerd-shim-layotto-v1``, imports ``build/hello.tar``, runs hello twice with
``ctr run --rm --runtime io.containerd.layotto.v1`` and shows that one node host served
both runs. containerd, the node host and every mount are cleaned up on the way out, also
after Ctrl-C or a failure.

Run it as ``python -m tests.demo`` from the repository root (as root).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.containerd_env import Containerd, ContainerdError, CtrError, default_snapshotter, pid_alive

REPO_ROOT = Path(__file__).resolve().parent.parent
HELLO_TAR = REPO_ROOT / "build" / "hello.tar"
HELLO_WASM = REPO_ROOT / "build" / "wasm" / "hello.wasm"
IMAGE = "docker.io/library/hello:latest"
RUNTIME = "io.containerd.layotto.v1"
SHIM_NAME = "containerd-shim-layotto-v1"
EXPECTED = "Hello from a Layotto nanoprocess!"


class DemoFailed(Exception):
    """Something the demo shows did not happen; the message says what."""


def say(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        pass  # the reader went away (`make demo | head`): keep going, cleanup must still run


def step(text: str) -> None:
    say(f"» {text}")


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


def demo(c: Containerd) -> None:
    shim_dir = Path(sys.executable).parent
    step(f"starting a private containerd in {c.base} (its PATH finds {SHIM_NAME} in {shim_dir})")
    c.start()
    say(f"  containerd {server_version(c)} is ready after {c.startup_seconds:.2f} s")

    archive = ensure_image()
    step(f"ctr images import {os.path.relpath(archive)}")
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


def show_logs(c: Containerd) -> None:
    host_log = c.state / "layotto" / "host.log"
    if host_log.is_file():
        tail = host_log.read_text(errors="replace").splitlines()[-15:]
        say(f"--- last lines of {host_log} ---")
        say("\n".join(tail))
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
    c = Containerd(
        path_prepend=[Path(sys.executable).parent],
        cri=False,
        snapshotter=default_snapshotter(),
    )
    status = 0
    try:
        demo(c)
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
