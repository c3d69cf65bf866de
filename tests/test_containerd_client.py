"""tests/containerd_client.py against a real, private containerd: a layotto function and a
runc container started through the gRPC client are RUNNING and work, and are gone again,
with their snapshots, after :meth:`ContainerdClient.delete`."""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from layotto.images import builder
from layotto.shim.protocol import task_types_pb2
from tests.containerd_client import ClientError, ContainerdClient, chain_id, oci_spec
from tests.containerd_env import Containerd
from tests.support import wait_for

LAYOTTO = "io.containerd.layotto.v1"
FN_IMAGE = "docker.io/library/fn-hello:client-test"
BUSYBOX = "docker.io/library/busybox:client-test"

_ids = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


# --------------------------------------------------------------------------- without containerd


def test_chain_id_follows_the_layer_stack() -> None:
    a, b, c = (f"sha256:{x * 64}" for x in "abc")
    assert chain_id([a]) == a
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert chain_id([a, b]) == ab
    assert chain_id([a, b, c]) == "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    with pytest.raises(ValueError):
        chain_id([])


def test_spec_takes_the_image_config_and_overrides() -> None:
    config = {
        "Env": ["PATH=/bin", "A=1"],
        "Entrypoint": ["/entry"],
        "Cmd": ["x"],
        "WorkingDir": "/w",
        "User": "7:8",
    }
    spec = oci_spec("id1", "ns", config, annotations={"k": "v"})
    assert spec["process"]["args"] == ["/entry", "x"]
    assert spec["process"]["env"] == ["PATH=/bin", "A=1"]
    assert spec["process"]["cwd"] == "/w"
    assert spec["process"]["user"] == {"uid": 7, "gid": 8, "additionalGids": [8]}
    assert spec["annotations"] == {"k": "v"}
    assert spec["linux"]["cgroupsPath"] == "/ns/id1"
    spec = oci_spec("id1", "ns", config, args=["/other"], env=["A=2", "B=3"])
    assert spec["process"]["args"] == ["/other"]
    assert spec["process"]["env"] == ["PATH=/bin", "A=2", "B=3"]
    assert "annotations" not in spec
    with pytest.raises(ValueError):
        oci_spec("id1", "ns", {})  # no command at all
    with pytest.raises(ValueError):
        oci_spec("id1", "ns", {"Cmd": ["x"], "User": "nobody"})


# --------------------------------------------------------------------------- against containerd


@pytest.fixture(scope="module")
def images(containerd: Containerd, wasm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Containerd:
    out = tmp_path_factory.mktemp("client-images")
    wasm = wasm_dir / "fn-hello.wasm"
    if not wasm.is_file():
        pytest.fail(f"{wasm} is missing: run `make modules` first", pytrace=False)
    builder.build_image(out / "fn.tar", {"/fn-hello.wasm": wasm}, name=FN_IMAGE, cmd=["/fn-hello.wasm"])
    builder.busybox_image(out / "busybox.tar", BUSYBOX)
    containerd.import_image(out / "fn.tar")
    containerd.import_image(out / "busybox.tar")
    return containerd


@pytest.fixture
def client(images: Containerd) -> Iterator[ContainerdClient]:
    with ContainerdClient(str(images.address), snapshotter=images.snapshotter) as c:
        yield c


def ctr_tasks(c: Containerd) -> dict[str, str]:
    """Task id -> status, from `ctr tasks ls` (not from the client under test)."""
    rows = [line.split() for line in c.ctr("tasks", "ls").stdout.splitlines()[1:]]
    return {row[0]: row[-1] for row in rows if row}


def ctr_ids(c: Containerd, *args: str) -> set[str]:
    """The first column of a `ctr ... ls` listing."""
    return {line.split()[0] for line in c.ctr(*args).stdout.splitlines()[1:] if line.strip()}


def snapshot_keys(c: Containerd) -> set[str]:
    return ctr_ids(c, "snapshots", "--snapshotter", c.snapshotter, "ls")


@pytest.mark.integration
def test_spec_matches_what_ctr_run_writes(images: Containerd, client: ContainerdClient) -> None:
    theirs, ours = new_id("ctr-spec"), new_id("our-spec")
    run = ("run", "-d", "--null-io", "--snapshotter", images.snapshotter)
    images.ctr(*run, BUSYBOX, theirs, "/bin/sleep", "600")
    try:
        expected = json.loads(images.ctr("containers", "info", theirs).stdout)["Spec"]
        actual = oci_spec(ours, "default", client.image(BUSYBOX).config, args=["/bin/sleep", "600"])
        assert expected["linux"].pop("cgroupsPath") == f"/default/{theirs}"
        assert actual["linux"].pop("cgroupsPath") == f"/default/{ours}"
        assert actual == expected
    finally:
        images.ctr("tasks", "delete", "-f", theirs, check=False)
        images.ctr("containers", "delete", theirs, check=False)


@pytest.mark.integration
def test_runs_layotto_and_runc_containers_and_deletes_them(
    images: Containerd, client: ContainerdClient
) -> None:
    fn, box = new_id("grpc-fn"), new_id("grpc-runc")
    fid = new_id("fid")
    started = []
    try:
        fn_pid = client.run_detached(fn, FN_IMAGE, LAYOTTO, annotations={"layotto.io/function-id": fid})
        started.append(fn)
        box_pid = client.run_detached(box, BUSYBOX, None, args=["/bin/sleep", "600"])
        started.append(box)
        assert fn_pid > 0 and box_pid > 0

        tasks = ctr_tasks(images)
        assert (tasks.get(fn), tasks.get(box)) == ("RUNNING", "RUNNING"), tasks
        for cid, pid in ((fn, fn_pid), (box, box_pid)):
            task = client.task(cid)
            assert task is not None and task.pid == pid
            assert client.task_statuses()[cid] == "RUNNING"
        # The container records carry what ctr would have written.
        record = client.container(box)
        assert record is not None
        assert (record.image, record.runtime.name, record.snapshot_key) == (
            BUSYBOX,
            "io.containerd.runc.v2",
            box,
        )
        assert json.loads(record.spec.value)["process"]["args"] == ["/bin/sleep", "600"]
        assert {fn, box} <= snapshot_keys(images)
        # runc really runs the command, in namespaces of its own.
        assert psutil.Process(box_pid).cmdline() == ["/bin/sleep", "600"]
        for ns in ("mnt", "pid", "net"):
            assert os.readlink(f"/proc/{box_pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        # The function answers on the node host's ingress, under its annotated id.
        conn = http.client.HTTPConnection("127.0.0.1", images.host_port("http"), timeout=10)
        try:
            conn.request("GET", "/?name=grpc", headers={"id": fid})
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"Hello, grpc!\n")
        finally:
            conn.close()

        for cid in (fn, box):
            client.delete(cid)
            started.remove(cid)
        assert not psutil.pid_exists(box_pid)
        assert not {fn, box} & set(ctr_tasks(images))
        assert not {fn, box} & ctr_ids(images, "containers", "ls")
        assert not {fn, box} & snapshot_keys(images)
        assert client.task(fn) is None and client.container(box) is None
        assert not client.snapshot_exists(fn) and not client.snapshot_exists(box)
        # The short-lived leases went away too.
        assert not any(lease.startswith((fn, box)) for lease in ctr_ids(images, "leases", "ls"))
        # The image's layers stay: the next start needs them.
        assert client.snapshot_exists(client.image(BUSYBOX).chain_id)
    finally:
        for cid in started:
            client.delete(cid)


@pytest.mark.integration
def test_delete_of_a_stopped_or_missing_container(images: Containerd, client: ContainerdClient) -> None:
    cid = new_id("grpc-exits")
    client.run_detached(cid, BUSYBOX, None, args=["/bin/true"])

    def stopped() -> task_types_pb2.Process | None:
        task = client.task(cid)
        return task if task is not None and task.status == task_types_pb2.STOPPED else None

    assert wait_for(stopped, what=f"{cid} stopped").exit_status == 0
    client.delete(cid)
    assert client.container(cid) is None and not client.snapshot_exists(cid)
    client.delete(cid)  # again: nothing left to do, no error


@pytest.mark.integration
def test_failed_start_leaves_nothing_behind(images: Containerd, client: ContainerdClient) -> None:
    with pytest.raises(ClientError, match="not found"):
        client.run_detached(new_id("grpc-noimage"), "docker.io/library/no-such-image:1")
    cid = new_id("grpc-noexec")
    with pytest.raises(ClientError, match=r"Tasks\.(Create|Start)"):
        client.run_detached(cid, BUSYBOX, None, args=["/no/such/program"])
    assert client.task(cid) is None
    assert client.container(cid) is None
    assert not client.snapshot_exists(cid)
    assert cid not in ctr_ids(images, "containers", "ls")
