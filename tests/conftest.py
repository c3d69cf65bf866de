"""Shared pytest fixtures: a private containerd, the project's shim, the built modules.

Integration tests never skip silently: a missing tool (containerd, ctr, runc, clang),
a missing shim or unbuilt modules fail the test with a message saying what to do.
Set LAYOTTO_ALLOW_SKIP=1 to turn those failures into skips on a machine that lacks them.
Other environment knobs:

- LAYOTTO_WASM_DIR: where the built modules are (default: build/wasm in the repo).
- LAYOTTO_SNAPSHOTTER: containerd snapshotter (default: overlayfs, native on overlay).
- LAYOTTO_KEEP_BASE=1: keep the containerds' base directories (logs, state) after the run.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from tests.containerd_env import Containerd, RedisError, default_snapshotter
from tests.containerd_env import redis_server as redis_server_at

if TYPE_CHECKING:
    import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIM_NAME = "containerd-shim-layotto-v1"


@pytest.hookimpl(trylast=True)  # after `-m "not integration"` has deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Integration tests need root (a private containerd, rootfs mounts, runc); unit tests
    do not, so `make unit` runs as an ordinary user. Selecting integration tests without
    root stops the run before anything starts (LAYOTTO_ALLOW_SKIP=1: skip them instead)."""
    if os.geteuid() == 0:
        return
    integration = [item for item in items if item.get_closest_marker("integration")]
    if not integration:
        return
    message = (
        "integration tests must run as root: they start a private containerd, mount "
        "container root filesystems and run runc (try: sudo -E pytest ..., or run only the "
        "unit tests: make unit / pytest -m 'not integration')"
    )
    if os.environ.get("LAYOTTO_ALLOW_SKIP") == "1":
        for item in integration:
            item.add_marker(pytest.mark.skip(reason=message))
        return
    raise pytest.UsageError(f"{len(integration)} {message}")


def _missing(message: str) -> NoReturn:
    if os.environ.get("LAYOTTO_ALLOW_SKIP") == "1":
        pytest.skip(message)
    pytest.fail(message + " (set LAYOTTO_ALLOW_SKIP=1 to skip instead)", pytrace=False)


def require(cmd: str) -> str:
    """The path of *cmd* on PATH. Fails the test clearly when it is missing, or skips
    it when LAYOTTO_ALLOW_SKIP=1."""
    path = shutil.which(cmd)
    if path is None:
        _missing(f"required program {cmd!r} is not on PATH ({os.environ.get('PATH', '')})")
    return path


def _keep_base() -> bool:
    return os.environ.get("LAYOTTO_KEEP_BASE") == "1"


@pytest.fixture(scope="session")
def project_bin() -> Path:
    """The directory holding the project's containerd-shim-layotto-v1."""
    found = shutil.which(SHIM_NAME)
    if found:
        return Path(found).resolve().parent
    beside = Path(sys.executable).parent / SHIM_NAME
    if beside.exists():
        return beside.parent
    _missing(
        f"{SHIM_NAME} is neither on PATH nor next to {sys.executable}: install the "
        "project first (pip install -e . / make install)"
    )


@pytest.fixture(scope="session")
def wasm_dir() -> Path:
    """The directory of the built example modules (hello.wasm, ...)."""
    path = Path(os.environ.get("LAYOTTO_WASM_DIR", "build/wasm"))
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not (path / "hello.wasm").is_file():
        _missing(f"{path / 'hello.wasm'} is missing: run `make modules` first")
    return path


def _started(*, path_prepend: list[Path], cri: bool) -> Containerd:
    for tool in ("containerd", "ctr", "runc"):
        require(tool)
    c = Containerd(path_prepend=path_prepend, cri=cri, snapshotter=default_snapshotter())
    c.start()
    return c


def _stop(c: Containerd) -> None:
    c.stop(remove_base=not _keep_base())
    if _keep_base():
        print(f"\nkept containerd base {c.base} (log: {c.log})")


@pytest.fixture(scope="session")
def containerd(project_bin: Path) -> Iterator[Containerd]:
    """A private containerd (no CRI) whose PATH finds the project's shim first."""
    c = _started(path_prepend=[project_bin], cri=False)
    try:
        yield c
    finally:
        _stop(c)


@pytest.fixture(scope="session")
def cri_containerd(project_bin: Path) -> Iterator[Containerd]:
    """A second private containerd with the CRI plugin and the `layotto` runtime
    handler. Its sandbox image (docker.io/library/layotto-pause:latest) is not imported
    here: tests import it into the k8s.io namespace."""
    c = _started(path_prepend=[project_bin], cri=True)
    try:
        yield c
    finally:
        _stop(c)


def find_host_process(c: Containerd) -> psutil.Process | None:
    """The layotto node host serving containerd *c*, or None when none runs.

    A candidate's command line mentions ``layotto`` and ``host`` and either names c's
    state directory or the process has c's TTRPC_ADDRESS in its environment (as
    everything the shim's ``start`` spawns does). Among several, the top-most wins.
    """
    import psutil

    state = str(c.state)
    ttrpc = str(c.ttrpc_address)
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "status", "create_time"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or ())
            if "layotto" not in cmdline or "host" not in cmdline or "containerd-shim-runc" in cmdline:
                continue
            if state in cmdline or proc.environ().get("TTRPC_ADDRESS") == ttrpc:
                found[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    tops = [p for p in found.values() if p.info["ppid"] not in found]
    return min(tops, key=lambda p: (p.info["create_time"] or 0, p.pid)) if tops else None


@pytest.fixture
def host_proc() -> Callable[[Containerd], psutil.Process | None]:
    """A function mapping a Containerd to its layotto node host process (or None)."""
    return find_host_process


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server (Debian package ``redis-server``) on a free loopback port,
    without persistence; yields its ``host:port``. Stopped at the end of the session."""
    binary = require("redis-server")
    try:
        with redis_server_at(tmp_path_factory.mktemp("redis"), binary) as address:
            yield address
    except RedisError as exc:
        pytest.fail(str(exc), pytrace=False)
