"""Tenants against each other, through a real containerd: function ids, invokes,
self-granted capabilities, annotation caps, the operator's policy, another image's module,
and the files the node host writes.

The node host here runs with an operator policy file (``LAYOTTO_POLICY``): the default
rules, plus a namespace ``locked`` that may use state only, from one store, and a
namespace ``walled`` that may use no component at all, and a namespace ``partner`` whose
functions the operator lets invoke ``victim``'s.
"""

from __future__ import annotations

import http.client
import itertools
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from layotto.host.cli import admin_get
from layotto.images import builder
from tests.conftest import find_host_process, require
from tests.containerd_env import Containerd, default_snapshotter
from tests.support import wait_for

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.layotto.v1"
IMAGE = "docker.io/library/layotto-tenancy:latest"
ARTIFACT = "docker.io/library/layotto-private-artifact:latest"
MODULES = ("fn-hello", "fn_echo", "faas_fn1", "faas_fn2", "echoargs", "fn_misbehave")
NAMESPACES = ("default", "victim", "attacker", "locked", "walled", "partner")
POLICY = """
default:
  limits:
    instances: 8
    timeoutSeconds: 60
    queueLimit: 100
    subscriptions: 2
    memory: 256Mi
namespaces:
  locked:
    capabilities: [state]
    components: [state/state_demo]
  walled:
    components: []
  partner:
    invokeNamespaces: [victim]
"""

_ids = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


@pytest.fixture(scope="module")
def node(project_bin: Path, wasm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    for tool in ("containerd", "ctr", "runc"):
        require(tool)
    missing = [m for m in MODULES if not (wasm_dir / f"{m}.wasm").is_file()]
    if missing:
        pytest.fail(f"modules not built: {', '.join(missing)}: run `make modules`", pytrace=False)
    work = tmp_path_factory.mktemp("tenancy")
    policy = work / "policy.yaml"
    policy.write_text(POLICY)
    c = Containerd(
        path_prepend=[project_bin],
        snapshotter=default_snapshotter(),
        env={"LAYOTTO_POLICY": str(policy), "LAYOTTO_GRPC_ADDRESS": ""},
    )
    c.start()
    try:
        files = {f"/{m}.wasm": wasm_dir / f"{m}.wasm" for m in MODULES}
        builder.build_image(work / "fn.tar", files, name=IMAGE, cmd=["/fn-hello.wasm"])
        builder.build_wasm_artifact(work / "artifact.tar", wasm_dir / "echoargs.wasm", name=ARTIFACT)
        for ns in NAMESPACES:
            c.import_image(work / "fn.tar", namespace=ns)
        c.ctr("images", "import", "--no-unpack", str(work / "artifact.tar"))
        yield c
    finally:
        c.stop()


class Tasks:
    """Tasks a test started (namespace, id), killed and deleted at its end."""

    def __init__(self, c: Containerd) -> None:
        self.c = c
        self.started: list[tuple[str, str]] = []

    def run(self, module: str, *annotations: str, ns: str = "default", check: bool = True):
        task_id = new_id(module.replace("_", "-"))
        self.started.append((ns, task_id))
        opts = [a for pair in (("--annotation", a) for a in annotations) for a in pair]
        return self.c.ctr(
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            *opts,
            IMAGE,
            task_id,
            f"/{module}.wasm",
            namespace=ns,
            check=check,
        )

    def cleanup(self) -> None:
        for ns, task_id in self.started:
            self.c.ctr("tasks", "kill", "--signal", "SIGKILL", task_id, namespace=ns, check=False)
        for ns, task_id in self.started:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if self.c.ctr("tasks", "delete", task_id, namespace=ns, check=False).returncode == 0:
                    break
                if task_id not in self.c.ctr("tasks", "ls", namespace=ns).stdout:
                    break
                time.sleep(0.05)
            self.c.ctr("containers", "delete", task_id, namespace=ns, check=False)


@pytest.fixture
def tasks(node: Containerd) -> Iterator[Tasks]:
    t = Tasks(node)
    try:
        yield t
    finally:
        t.cleanup()


def get(c: Containerd, path: str, fid: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", c.host_port("http"), timeout=30)
    try:
        conn.request("GET", path, headers={"id": fid})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- identity


def test_a_function_id_claimed_from_another_namespace_fails_its_start(node: Containerd, tasks: Tasks) -> None:
    fid = new_id("victim-fn")
    tasks.run("fn-hello", f"layotto.io/function-id={fid}", ns="victim")
    r = tasks.run("fn_echo", f"layotto.io/function-id={fid}", ns="attacker", check=False)
    assert r.returncode != 0
    assert f"function id '{fid}' is already served from namespace 'victim'" in r.stderr
    # Every request still reaches the victim's function, none the attacker's echo.
    for i in range(20):
        assert get(node, f"/?name=n{i}", fid) == (200, f"Hello, n{i}!\n".encode())
    # `layotto ps` and `layotto logs` name the namespace that owns the id.
    run_dir = node.state / "layotto"
    _, rows = admin_get(run_dir, "/tasks")
    serving = [r for r in rows if r.get("function_id") == fid and r["state"] == "running"]
    assert [(r["namespace"], r["containerd_namespace"]) for r in serving] == [("victim", "victim")]
    refused = [r for r in rows if r["namespace"] == "attacker" and r.get("function_id") == fid]
    assert all(r["state"] == "stopped" and r["exit_status"] == 1 for r in refused), refused
    assert admin_get(run_dir, f"/logs/victim/{fid}")[0] == 200
    assert admin_get(run_dir, f"/logs/attacker/{fid}")[0] == 404


def test_replicas_in_one_namespace_share_an_id(node: Containerd, tasks: Tasks) -> None:
    fid = new_id("replicas")
    tasks.run("fn-hello", f"layotto.io/function-id={fid}", ns="victim")
    tasks.run("fn-hello", f"layotto.io/function-id={fid}", ns="victim")
    assert get(node, "/?name=r", fid) == (200, b"Hello, r!\n")


def test_invoke_does_not_reach_another_namespace(node: Containerd, tasks: Tasks) -> None:
    """function_1 (in `attacker`) invokes id_2, which runs in `victim` (an echo function):
    not found. The same function_1 in `victim` reaches it."""
    tasks.run("fn_echo", "layotto.io/function-id=id_2", ns="victim")
    outsider, insider = new_id("fn1-out"), new_id("fn1-in")
    invoke = "layotto.io/capabilities=invoke"
    tasks.run("faas_fn1", f"layotto.io/function-id={outsider}", invoke, ns="attacker")
    tasks.run("faas_fn1", f"layotto.io/function-id={insider}", invoke, ns="victim")
    status, body = get(node, "/?name=book1", outsider)
    assert (status, body) == (404, b"id_2 failed: NOT_FOUND\n")
    status, body = get(node, "/?name=book1", insider)
    assert status == 200, (status, body)
    # The operator's policy lets `partner` invoke `victim`'s functions (not the reverse).
    partner = new_id("fn1-partner")
    tasks.run("faas_fn1", f"layotto.io/function-id={partner}", invoke, ns="partner")
    status, body = get(node, "/?name=book1", partner)
    assert status == 200, (status, body)


def test_a_killed_function_stops_computing(node: Containerd, tasks: Tasks) -> None:
    """A request spinning forever (timeout 30 s): killing the container ends it long before
    its timeout, and the node host stops burning CPU for it."""
    fid = new_id("spin")
    tasks.run("fn_misbehave", f"layotto.io/function-id={fid}", "layotto.io/timeout=30")
    _, task_id = tasks.started[-1]
    host = find_host_process(node)
    assert host is not None
    answer: list[tuple[int, bytes]] = []
    caller = threading.Thread(target=lambda: answer.append(get(node, "/loop", fid)), daemon=True)
    caller.start()
    before = sum(host.cpu_times()[:2])
    wait_for(lambda: sum(host.cpu_times()[:2]) - before >= 0.3, what="the /loop request computing")
    killed = time.monotonic()
    node.ctr("tasks", "kill", "--signal", "SIGKILL", task_id)
    caller.join(timeout=10)
    assert answer, "the spinning request was still running 10 s after the kill"
    assert answer[0][0] == 503 and time.monotonic() - killed < 10
    # The host is idle again: what it spends now is far below a spinning core.
    quiet = sum(host.cpu_times()[:2])
    time.sleep(1.0)
    assert sum(host.cpu_times()[:2]) - quiet < 0.5


# --------------------------------------------------------------------------- policy


@pytest.mark.parametrize(
    ("ns", "annotation", "message"),
    [
        (
            "default",
            "layotto.io/capabilities=all",
            "policy: namespace 'default' may not request capability secrets (rule default.capabilities of",
        ),
        (
            "default",
            "layotto.io/capabilities=state,secrets",
            "may not request capability secrets",
        ),
        (
            "locked",
            "layotto.io/capabilities=state,invoke",
            "may not request capability invoke (rule namespaces.locked.capabilities",
        ),
        ("default", "layotto.io/instances=100000", "may not ask for layotto.io/instances 100000 (at most 8;"),
        ("default", "layotto.io/timeout=1e12", "may not ask for layotto.io/timeout 1e+12s (at most 60s;"),
        ("default", "layotto.io/timeout=nan", "layotto.io/timeout: 'nan' must be a finite number"),
        ("default", "layotto.io/timeout=-1", "must be a finite number ≥ 0"),
        (
            "default",
            "layotto.io/queue-limit=99999999",
            "may not ask for layotto.io/queue-limit 99999999 (at most 100;",
        ),
        ("default", "layotto.io/instances=two", "layotto.io/instances: 'two' is not a valid int"),
        ("default", "layotto.io/subscriptions=default/a,default/b,default/c", "subscriptions: 3 (at most 2;"),
        ("locked", "layotto.io/subscriptions=default/a", "may not use pubsub component 'default'"),
    ],
)
def test_a_request_beyond_the_policy_fails_the_container_naming_the_rule(
    node: Containerd, tasks: Tasks, ns: str, annotation: str, message: str
) -> None:
    r = tasks.run("fn-hello", annotation, ns=ns, check=False)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_a_memory_limit_beyond_the_policy_fails(node: Containerd, tasks: Tasks) -> None:
    task_id = new_id("big")
    tasks.started.append(("default", task_id))
    r = node.ctr(
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--memory-limit",
        str(1 << 30),
        IMAGE,
        task_id,
        "/fn-hello.wasm",
        check=False,
    )
    assert r.returncode != 0
    assert "may not ask for a memory limit of 1073741824 bytes (at most 268435456 bytes;" in r.stderr, (
        r.stderr
    )


def test_a_namespace_reaches_only_the_components_it_is_granted(node: Containerd, tasks: Tasks) -> None:
    """function_2 reads state_demo: in `locked` (granted state/state_demo) it gets an
    answer from the store (no such book); in `walled` (no components) the host refuses."""
    inside, outside = new_id("locked-fn2"), new_id("walled-fn2")
    state = "layotto.io/capabilities=state"
    tasks.run("faas_fn2", f"layotto.io/function-id={inside}", state, ns="locked")
    tasks.run("faas_fn2", f"layotto.io/function-id={outside}", state, ns="walled")
    assert get(node, "/?name=book1", inside) == (404, b"no inventory for book1\n")
    assert get(node, "/?name=book1", outside) == (502, b"state_demo: PERMISSION_DENIED\n")


# --------------------------------------------------------------------------- images


def test_wasm_image_annotation_cannot_borrow_another_images_module(node: Containerd, tasks: Tasks) -> None:
    """A container of IMAGE naming the private artifact's image gets no module from it."""
    task_id = new_id("borrow")
    tasks.started.append(("default", task_id))
    r = node.ctr(
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        f"layotto.io/wasm-image={ARTIFACT}",
        IMAGE,
        task_id,
        "/not-here.wasm",
        "secret-arg",
        check=False,
    )
    assert r.returncode != 0
    assert "arg[" not in r.stdout
    assert "/not-here.wasm: no such file in the container image" in r.stderr, r.stderr


# --------------------------------------------------------------------------- the host's files


def test_the_hosts_files_and_listeners_are_private(node: Containerd, tasks: Tasks) -> None:
    fid = new_id("state")
    tasks.run("faas_fn2", f"layotto.io/function-id={fid}", "layotto.io/capabilities=state", ns="victim")
    get(node, "/?name=book1", fid)  # touches the embedded state store
    state_dir = node.root / "layotto"
    run_dir = node.state / "layotto"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    written = [p for p in state_dir.rglob("*") if p.is_file()]
    assert any(p.name.startswith("components") for p in written), written
    for path in [*written, run_dir / "host.log", run_dir / "http.port"]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is readable by others"
    host = find_host_process(node)
    assert host is not None
    metrics_port = node.host_port("metrics")
    listening = {
        conn.laddr for conn in host.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN
    }
    assert ("127.0.0.1", metrics_port) in listening
    assert ("0.0.0.0", metrics_port) not in listening
