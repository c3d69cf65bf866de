"""The Workload seam without containerd: the container spec's names, the error mapping,
the Task service's ``layotto ps`` rows and the ``ps`` table."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from layotto.host import cli
from layotto.host.workload import ContainerSpec, ExitStatus, InvalidSpec, StartFailed, WorkloadError
from layotto.host.workloads import SandboxWorkload
from layotto.shim.task_service import Task, TaskService, ttrpc_error
from layotto.shim.ttrpc import Code

CRI = {
    "io.kubernetes.cri.sandbox-namespace": "shop",
    "io.kubernetes.cri.sandbox-name": "cart-7d9f",
    "io.kubernetes.cri.container-name": "cart",
    "io.kubernetes.cri.image-name": "docker.io/library/cart:latest",
}


def test_a_cri_container_is_named_by_its_pod():
    spec = ContainerSpec(id="a" * 64, namespace="k8s.io", annotations=CRI, args=[], env=[])
    assert (spec.tenant, spec.pod, spec.container) == ("shop", "cart-7d9f", "cart")
    plain = ContainerSpec(id="hello", namespace="default", annotations={}, args=[], env=[])
    assert (plain.tenant, plain.pod, plain.container) == ("default", "", "")


def test_the_seams_errors_map_to_ttrpc_codes():
    assert ttrpc_error(InvalidSpec("policy: no")).code == Code.INVALID_ARGUMENT
    failed = StartFailed("id taken", ExitStatus(1, 0.0, "id taken"))
    assert ttrpc_error(failed).code == Code.FAILED_PRECONDITION
    assert ttrpc_error(WorkloadError("?")).code == Code.INTERNAL


def test_a_sandbox_ends_when_killed():
    ended = SandboxWorkload().kill(9)
    assert ended is not None and ended.status == 137


def test_ps_rows_carry_the_pod_and_container_names():
    async def rows() -> list[dict[str, object]]:
        service = TaskService(host=None, publisher=None)
        spec = ContainerSpec(id="b" * 64, namespace="k8s.io", annotations=CRI, args=[], env=[], sandbox=True)
        task = Task("b" * 64, "k8s.io", Path("/x"), spec, SandboxWorkload(), False, False, 1)
        service.tasks[("k8s.io", task.id)] = task
        assert service.logs("shop/" + task.id) == []
        return service.describe()

    (row,) = asyncio.run(rows())
    assert row["namespace"] == "shop" and row["containerd_namespace"] == "k8s.io"
    names = (row["pod"], row["container"], row["kind"], row["state"])
    assert names == ("cart-7d9f", "cart", "sandbox", "created")


def test_the_ps_table_names_pods_and_containers(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    base = {"kind": "function", "state": "running", "exit_status": None, "image": "", "module": "/f.wasm"}
    rows = [
        {**base, "namespace": "shop", "id": "c" * 64, "pod": "cart-7d9f", "container": "cart"},
        {**base, "namespace": "shop", "id": "d" * 64, "pod": "cart-7d9f", "container": "", "kind": "sandbox"},
        {**base, "namespace": "default", "id": "hello", "pod": "", "container": "", "kind": "command"},
    ]
    for row in rows:
        row.update(memory=0, cpu_seconds=0.0)
    monkeypatch.setattr(cli, "admin_get", lambda _run_dir, _path: (200, rows))
    assert cli.ps(Path("/nonexistent")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["NAMESPACE", "POD", "CONTAINER", "KIND"]
    table = [line.split()[:4] for line in lines[1:]]
    assert ["shop", "cart-7d9f", "cart", "function"] in table
    assert ["shop", "cart-7d9f", "-", "sandbox"] in table
    assert ["default", "-", "hello", "command"] in table
    assert not any("c" * 64 in line for line in lines)
