"""The private-containerd harness itself: it starts, answers on its own address, runs
runc containers, and stop() leaves no process, mount or runc state behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, SHIM_NAME, require
from tests.containerd_env import (
    Containerd,
    ContainerdError,
    CtrError,
    busybox_rootfs,
    default_snapshotter,
    make_base,
    mounts_under,
    pid_alive,
    write_oci_archive,
)

IMAGE = "docker.io/library/lt-busybox:latest"


@pytest.fixture
def ctd() -> Iterator[Containerd]:
    """A fresh containerd with no project shim on its PATH (the harness needs none)."""
    for tool in ("containerd", "ctr", "runc", "busybox"):
        require(tool)
    c = Containerd(snapshotter=default_snapshotter())
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _rootfs(c: Containerd) -> Path:
    return busybox_rootfs(c.base / "rootfs-dir")


def _import_busybox(c: Containerd) -> None:
    archive = write_oci_archive(c.base / "busybox.tar", IMAGE, _rootfs(c), cmd=["/bin/echo", "from-image"])
    c.import_image(archive)


def _task_pids(c: Containerd, namespace: str = "default") -> dict[str, int]:
    lines = c.ctr("tasks", "ls", namespace=namespace).stdout.splitlines()[1:]
    return {f[0]: int(f[1]) for f in (line.split() for line in lines) if len(f) >= 3}


@pytest.mark.integration  # needs root
def test_answers_on_its_own_address(ctd: Containerd) -> None:
    r = ctd.ctr("version")
    assert "Server:" in r.stdout and "Version:" in r.stdout
    assert r.args[:3] == [ctd.ctr_bin, "--address", str(ctd.address)]
    assert ctd.address.is_socket() and str(ctd.address).startswith(str(ctd.base) + "/")
    assert ctd.ttrpc_address.is_socket() and str(ctd.ttrpc_address) == f"{ctd.address}.ttrpc"
    assert f"address={ctd.address}" in ctd.log.read_text()
    assert ctd.startup_seconds is not None and ctd.startup_seconds < 20


@pytest.mark.integration  # needs root
def test_ctr_error_carries_command_and_output(ctd: Containerd) -> None:
    with pytest.raises(CtrError) as info:
        ctd.ctr("containers", "info", "no-such-container")
    message = str(info.value)
    assert "no-such-container" in message and "exited 1" in message and "not found" in message
    assert ctd.ctr("containers", "info", "no-such-container", check=False).returncode == 1


@pytest.mark.integration  # needs root
@pytest.mark.parametrize("cri", [False, True], ids=["plain", "cri"])
def test_cri_plugin_only_when_asked(cri: bool) -> None:
    for tool in ("containerd", "ctr"):
        require(tool)
    with Containerd(cri=cri, snapshotter=default_snapshotter()) as c:
        plugins = c.ctr("plugins", "ls").stdout.splitlines()
        cri_lines = [line.split() for line in plugins if " cri " in f" {line} "]
        if cri:
            assert cri_lines and cri_lines[0][-1] == "ok", plugins
            assert 'runtime_type = "io.containerd.layotto.v1"' in c.config_path.read_text()
        else:
            assert not cri_lines, plugins


@pytest.mark.integration  # needs root
def test_runc_runs_busybox_from_a_rootfs_dir(ctd: Containerd) -> None:
    r = ctd.ctr("run", "--rm", "--rootfs", str(_rootfs(ctd)), "t-echo", "/bin/echo", "hi")
    assert r.stdout == "hi\n"


@pytest.mark.integration  # needs root
def test_runc_runs_an_imported_image(ctd: Containerd) -> None:
    _import_busybox(ctd)
    assert IMAGE in ctd.ctr("images", "ls", "-q").stdout.split()
    assert ctd.ctr("run", "--rm", IMAGE, "t-img").stdout == "from-image\n"
    assert ctd.ctr("run", "--rm", IMAGE, "t-img2", "/bin/echo", "args").stdout == "args\n"


@pytest.mark.integration  # needs root
@pytest.mark.parametrize("graceful", [True, False], ids=["graceful", "forced"])
def test_stop_leaves_nothing_behind(graceful: bool) -> None:
    for tool in ("containerd", "ctr", "runc", "busybox"):
        require(tool)
    c = Containerd(snapshotter=default_snapshotter())
    c.start()
    try:
        _import_busybox(c)
        ids = [f"{c.base.name}-img", f"{c.base.name}-dir"]
        c.ctr("run", "-d", IMAGE, ids[0], "/bin/sleep", "1000")
        c.ctr("run", "-d", "--rootfs", str(_rootfs(c)), ids[1], "/bin/sleep", "1000")
        tasks = _task_pids(c)
        assert set(tasks) == set(ids)
        owned = c.owned_pids()
        assert set(tasks.values()) <= set(owned) and c.process is not None and c.process.pid in owned
        assert mounts_under(c.base), "the image container's rootfs should be mounted"
    finally:
        c.stop(graceful=graceful, remove_base=False)

    assert not c.running
    assert [p for p in owned if pid_alive(p)] == []
    assert c.owned_pids() == []
    assert mounts_under(c.base) == []
    for cid in ids:
        runc_state = ["runc", "--root", "/run/containerd/runc/default", "state", cid]
        st = subprocess.run(runc_state, capture_output=True)
        assert st.returncode != 0, f"runc state of {cid} left behind"
        assert not list(Path("/sys/fs/cgroup").glob(f"*/default/{cid}")), "cgroup left behind"
    shutil.rmtree(c.base)  # removable: nothing mounted, nothing busy


@pytest.mark.integration  # needs root
def test_restart_keeps_tasks_running(ctd: Containerd) -> None:
    cid = f"{ctd.base.name}-r"
    ctd.ctr("run", "-d", "--rootfs", str(_rootfs(ctd)), cid, "/bin/sleep", "1000")
    pid = _task_pids(ctd)[cid]
    ctd.restart()
    assert _task_pids(ctd) == {cid: pid}
    assert "RUNNING" in ctd.ctr("tasks", "ls").stdout


def test_start_failure_reports_the_log() -> None:
    require("containerd")
    c = Containerd(extra_toml="[this is not toml")
    with pytest.raises(ContainerdError) as info:
        c.start(timeout=10)
    assert "exited with status" in str(info.value) and "toml" in str(info.value).lower()
    assert c.owned_pids() == []
    c.stop()
    assert not c.base.exists()


def test_long_base_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too long"):
        Containerd(tmp_path / ("x" * 60))


@pytest.mark.integration  # needs root
def test_cli_runs_in_foreground_and_stops_on_sigterm() -> None:
    for tool in ("containerd", "ctr"):
        require(tool)
    base = make_base()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.containerd_env", "--base", str(base)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address == str(base / "c.sock")
        subprocess.run(["ctr", "--address", address, "version"], check=True, capture_output=True, timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert Containerd(base).owned_pids() == []
        assert (base / "containerd.log").exists(), "a given --base is kept"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        Containerd(base).stop(remove_base=True)


@pytest.mark.integration  # needs root
def test_session_fixture_finds_the_project_shim(containerd: Containerd, project_bin: Path) -> None:
    path = containerd.environ()["PATH"]
    assert path.split(os.pathsep)[0] == str(project_bin)
    assert shutil.which(SHIM_NAME, path=path) == str(project_bin / SHIM_NAME)


@pytest.mark.integration  # needs root
@pytest.mark.parametrize("how", ["cmdline", "environ"])
def test_stop_kills_a_detached_host_process(ctd: Containerd, host_proc, how: str) -> None:
    """A stand-in for the layotto node host, detached like the shim's ``start`` leaves
    it: host_proc finds it, and stop() ends it."""
    argv = [sys.executable, "-c", "import time; time.sleep(600)", "layotto", "host"]
    env = dict(os.environ)
    if how == "cmdline":
        argv.append(str(ctd.state))
    else:
        env["TTRPC_ADDRESS"] = str(ctd.ttrpc_address)
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        found = host_proc(ctd)
        assert found is not None and found.pid == proc.pid
        assert proc.pid in ctd.owned_pids()
        ctd.stop()
        assert proc.wait(10) == -signal.SIGTERM
        assert host_proc(ctd) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
