"""Layotto's FaaS quickstart on our stack, through containerd's CRI.

Layotto's scenario (demo/faas in mosn/layotto, and its e2e test): the state store holds
``book1=100``; ``GET /?name=book1`` with header ``id: id_1`` reaches function_1, which
invokes function_2 (``id_2``), which reads ``book1`` from ``state_demo``; the caller gets
``There are 100 inventories for book1.``

Here every function is a pod run the way a kubelet runs it (RunPodSandbox on handler
``layotto``, CreateContainer, StartContainer), with the annotations of
``images/examples/faas/function-{1,2}.yaml`` reaching the node host through CRI's
``pod_annotations``. The node host of a private containerd reads a components file
(``images/examples/faas/components.yaml``: embedded SQLite; ``components-redis.yaml`` on the
``redis_server`` fixture), the book is seeded through the gRPC Runtime API on the host's
unix socket ``<state>/layotto/runtime.sock`` (and, for Redis, with a plain ``SET``), and the
chain is called over the host's HTTP ingress. Every pair of example modules is run: C, the
mixed SDKs (AssemblyScript calling Rust), Layotto's own ABI; then what a missing capability
does, and the pub/sub and lock examples.
"""

from __future__ import annotations

import http.client
import os
import re
import secrets as secrets_module
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from layotto.host.components.registry import parse_config
from layotto.host.protocol import runtime_api_pb2 as pb
from layotto.images import builder
from tests.conftest import REPO_ROOT, require
from tests.containerd_env import Containerd, default_snapshotter
from tests.cri_client import CONTAINER_RUNNING, CriClient, Pod
from tests.support import wait_for
from tests.test_deploy import load_documents, validate_manifest

FAAS = REPO_ROOT / "images" / "examples" / "faas"
MANIFESTS = (FAAS / "function-1.yaml", FAAS / "function-2.yaml")
CRI_NAMESPACE = "k8s.io"
HANDLER = "layotto"
SERVICE = "spec.proto.runtime.v1.Runtime"
STATE = "state_demo"
ANSWER = "There are 100 inventories for book1."
NO_FUNCTION = "no function with this id\n"  # the ingress's 404 for an unknown id

#: The modules of images/examples that run here; each gets an image
#: docker.io/library/<module>:latest with CMD ["/<module>.wasm"].
MODULES = (
    "faas_fn1",
    "faas_fn2",
    "faas_fn1_as",
    "faas_fn2_rs",
    "layotto_fn1",
    "layotto_fn2",
    "pubsub_publisher",
    "pubsub_subscriber",
    "lock_example",
)
#: The images the manifests name, and the module each one holds.
MANIFEST_IMAGES = {
    "docker.io/library/function_1:latest": "faas_fn1",
    "docker.io/library/function_2:latest": "faas_fn2",
}


def image_of(module: str) -> str:
    return f"docker.io/library/{module}:latest"


def quantity(text: str) -> int:
    """Bytes of a Kubernetes memory quantity such as ``64Mi``."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "": 1}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|)", text)
    assert m, f"unsupported quantity {text!r}"
    return int(m.group(1)) * units[m.group(2)]


@dataclass(frozen=True)
class FunctionPod:
    """What a function's pod manifest says, as far as the node sees it."""

    name: str
    image: str
    annotations: Mapping[str, str]
    namespace: str = "default"
    memory_limit: int | None = None
    #: The function id it serves under (its annotation, or what the module calls itself).
    serves: str | None = None

    def __post_init__(self) -> None:
        if self.serves is None and "layotto.io/function-id" in self.annotations:
            object.__setattr__(self, "serves", self.annotations["layotto.io/function-id"])

    @classmethod
    def from_manifest(cls, path: Path) -> FunctionPod:
        (doc,) = load_documents(path)
        (container,) = doc["spec"]["containers"]
        limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
        return cls(
            name=doc["metadata"]["name"],
            image=container["image"],
            annotations=dict(doc["metadata"].get("annotations") or {}),
            namespace=doc["metadata"].get("namespace", "default"),
            memory_limit=quantity(limit) if limit else None,
        )


def fn_pod(name: str, module: str, capabilities: str, function_id: str, **more: str) -> FunctionPod:
    """A pod running ``module`` that serves ``function_id``: named by the annotation
    ``layotto.io/function-id`` for our SDKs' modules, while a module on Layotto's own ABI
    (``layotto_*``) names itself through ``proxy_get_id`` and gets no annotation."""
    annotations = {"layotto.io/capabilities": capabilities, **more}
    if not module.startswith("layotto_"):
        annotations["layotto.io/function-id"] = function_id
    return FunctionPod(name=name, image=image_of(module), annotations=annotations, serves=function_id)


# --------------------------------------------------------------------------- clients


class RuntimeApi:
    """Layotto's gRPC Runtime service on the node host's unix socket, through generic
    unary calls with the runtime_api_pb2 messages (no generated stubs)."""

    def __init__(self, socket_path: Path, token: str) -> None:
        self.target = f"unix://{socket_path}"
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.channel = grpc.insecure_channel(self.target)
        grpc.channel_ready_future(self.channel).result(timeout=10)

    def call(self, method: str, request: Message, response_type: type[Message]) -> Any:
        rpc = self.channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return rpc(request, timeout=10, metadata=self.metadata)

    def save_state(self, store: str, key: str, value: bytes) -> None:
        request = pb.SaveStateRequest(store_name=store, states=[pb.StateItem(key=key, value=value)])
        self.call("SaveState", request, empty_pb2.Empty)

    def get_state(self, store: str, key: str) -> bytes:
        request = pb.GetStateRequest(store_name=store, key=key)
        return self.call("GetState", request, pb.GetStateResponse).data

    def delete_state(self, store: str, key: str) -> None:
        self.call("DeleteState", pb.DeleteStateRequest(store_name=store, key=key), empty_pb2.Empty)

    def close(self) -> None:
        self.channel.close()


@dataclass
class Response:
    status: int
    body: str
    headers: dict[str, str]


def http_get(port: int, target: str, headers: Mapping[str, str] | None = None) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", target, headers=dict(headers or {}))
        r = conn.getresponse()
        return Response(
            r.status, r.read().decode(errors="replace"), {k.lower(): v for k, v in r.getheaders()}
        )
    finally:
        conn.close()


# --------------------------------------------------------------------------- the node


@dataclass
class Backend:
    name: str  # "embedded" or "redis"
    components: Path
    redis: str | None = None  # host:port

    def redis_cli(self, *args: str) -> str:
        assert self.redis is not None
        host, _, port = self.redis.rpartition(":")
        r = subprocess.run(
            [require("redis-cli"), "-h", host, "-p", port, *args], capture_output=True, text=True, timeout=10
        )
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()


@dataclass
class Node:
    """A private CRI containerd whose node host uses the FaaS components, plus a kubelet's
    bookkeeping: the pods it runs (a test's pods are removed when it ends)."""

    c: Containerd
    backend: Backend
    client: CriClient
    log_root: Path
    token_file: Path
    pods: list[Pod] = field(default_factory=list)
    function_ids: set[str] = field(default_factory=set)
    _api: RuntimeApi | None = None

    @property
    def run_dir(self) -> Path:
        return self.c.state / "layotto"

    @property
    def port(self) -> int:
        return self.c.host_port("http")

    @property
    def api(self) -> RuntimeApi:
        if self._api is None:
            sock = self.run_dir / "runtime.sock"
            wait_for(sock.exists, what=f"the gRPC Runtime API socket {sock}")
            self._api = RuntimeApi(sock, self.token_file.read_text().strip())
        return self._api

    def run(self, spec: FunctionPod) -> tuple[Pod, str]:
        """RunPodSandbox (handler layotto, the pod's annotations), CreateContainer,
        StartContainer; returns when the container is running."""
        uid = str(uuid.uuid4())
        log_dir = self.log_root / f"{spec.namespace}_{spec.name}_{uid}"
        pod = self.client.run_pod(spec.name, spec.namespace, uid, log_dir, spec.annotations, handler=HANDLER)
        self.pods.append(pod)
        cid = self.client.create_container(
            pod.id, pod.config, spec.name, spec.image, memory_limit=spec.memory_limit
        )
        self.client.start_container(cid)
        self.client.wait_container_state(cid, CONTAINER_RUNNING)
        if spec.serves:
            self.function_ids.add(spec.serves)
        return pod, cid

    def get(self, target: str, function_id: str | None = None) -> Response:
        return http_get(self.port, target, {"id": function_id} if function_id else None)

    def logs(self, name: str) -> str:
        """``layotto logs NAME`` against this containerd's node host."""
        return self.layotto("logs", name)

    def layotto(self, *args: str) -> str:
        """The output of ``layotto ARGS`` against this containerd's node host."""
        layotto = Path(sys.executable).parent / "layotto"
        r = subprocess.run(
            [str(layotto), *args, "--run-dir", str(self.run_dir)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, f"layotto {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r.stdout

    def remove_pods(self) -> None:
        """What the kubelet does for deleted pods; then wait until the ingress no longer
        routes their function ids (the next test reuses them)."""
        failed = []
        for pod in list(self.pods):
            try:
                self.client.remove_pod(pod.id)
            except grpc.RpcError as exc:
                failed.append(f"{pod.config.metadata.name}: {exc}")
            self.pods.remove(pod)
        for fid in sorted(self.function_ids):
            wait_for(
                lambda fid=fid: self.get("/", fid).body == NO_FUNCTION, what=f"function {fid} unregistered"
            )
        self.function_ids.clear()
        assert not failed, f"removing pods failed: {failed}\n{self.diagnostics()}"

    def diagnostics(self) -> str:
        host_log = self.run_dir / "host.log"
        try:
            tail = "\n".join(host_log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            tail = "(none)"
        return f"--- containerd log ---\n{self.c.log_tail(20)}\n--- {host_log} ---\n{tail}"


@pytest.fixture(scope="module", params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    if request.param == "embedded":
        return Backend("embedded", FAAS / "components.yaml")
    address = request.getfixturevalue("redis_server")
    text = (FAAS / "components-redis.yaml").read_text()
    assert text.count('redisHost: "localhost:6379"') == 5
    path = tmp_path_factory.mktemp("faas-redis") / "components.yaml"
    path.write_text(text.replace('redisHost: "localhost:6379"', f'redisHost: "{address}"'))
    b = Backend("redis", path, address)
    # The server is the session's: start from keys of our own (keyPrefix none: unprefixed).
    b.redis_cli("DEL", "book1", "book2", "book3", "last_order", "orders")
    return b


@pytest.fixture(scope="module")
def faas_node(
    backend: Backend, project_bin: Path, wasm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    for tool in ("containerd", "ctr", "runc"):
        require(tool)
    missing = [m for m in MODULES if not (wasm_dir / f"{m}.wasm").is_file()]
    if missing:
        pytest.fail(f"modules not built: {', '.join(missing)}: run `make modules`", pytrace=False)
    # The operator provisions a token for the app that seeds the state (the README's step).
    secrets = tmp_path_factory.mktemp("faas-policy")
    token_file = secrets / "seeder"
    token_file.write_text(secrets_module.token_urlsafe(32) + "\n")
    policy = secrets / "policy.yaml"
    apps = [{"namespace": "default", "app": "seeder", "tokenFile": str(token_file)}]
    policy.write_text(yaml.safe_dump({"runtimeApi": {"apps": apps}}))
    c = Containerd(
        path_prepend=[project_bin],
        cri=True,
        snapshotter=default_snapshotter(),
        # The ingress on a free port (http.port); the Runtime API on its unix socket only.
        env={
            "LAYOTTO_COMPONENTS": str(backend.components),
            "LAYOTTO_GRPC_ADDRESS": "",
            "LAYOTTO_POLICY": str(policy),
        },
    )
    c.start()
    client = CriClient(c.address)
    node = Node(c, backend, client, tmp_path_factory.mktemp("faas-pods"), token_file)
    try:
        out = tmp_path_factory.mktemp("faas-images")
        builder.build_image(
            out / "pause.tar",
            {"/pause": b"layotto pause placeholder\n"},
            name=c.sandbox_image,
            cmd=["/pause"],
        )
        images = {c.sandbox_image: out / "pause.tar"}
        wanted = {image_of(m): m for m in MODULES} | MANIFEST_IMAGES
        for name, module in wanted.items():
            tar = out / f"{name.rsplit('/', 1)[1].replace(':', '_')}.tar"
            builder.build_image(
                tar, {f"/{module}.wasm": wasm_dir / f"{module}.wasm"}, name=name, cmd=[f"/{module}.wasm"]
            )
            images[name] = tar
        for tar in images.values():
            c.import_image(tar, namespace=CRI_NAMESPACE)
        for name in images:
            client.wait_image(name)
        yield node
    finally:
        if node._api is not None:
            node._api.close()
        client.close()
        keep = os.environ.get("LAYOTTO_KEEP_BASE") == "1"
        c.stop(remove_base=not keep)
        if keep:
            print(f"\nkept containerd base {c.base} (log: {c.log})")


@pytest.fixture
def node(faas_node: Node) -> Iterator[Node]:
    try:
        yield faas_node
    finally:
        faas_node.remove_pods()


def seed_book1(node: Node) -> None:
    """``book1=100`` through the gRPC Runtime API, read back the same way."""
    node.api.save_state(STATE, "book1", b"100")
    assert node.api.get_state(STATE, "book1") == b"100"


# --------------------------------------------------------------------------- offline


def test_the_manifests_are_layotto_function_pods():
    for path in MANIFESTS:
        docs = load_documents(path)
        errors = [e for doc in docs for e in validate_manifest(doc)]
        assert not errors, f"{path.relative_to(REPO_ROOT)}:\n  " + "\n  ".join(errors)
        (doc,) = docs
        assert doc["kind"] == "Pod" and doc["spec"]["runtimeClassName"] == "layotto"
    fn1, fn2 = (FunctionPod.from_manifest(p) for p in MANIFESTS)
    assert fn1.annotations == {"layotto.io/function-id": "id_1", "layotto.io/capabilities": "invoke"}
    assert fn2.annotations == {"layotto.io/function-id": "id_2", "layotto.io/capabilities": "state"}
    assert {fn1.image: "faas_fn1", fn2.image: "faas_fn2"} == MANIFEST_IMAGES


@pytest.mark.parametrize("name", ["components.yaml", "components-redis.yaml"])
def test_the_components_files_keep_keys_unprefixed(name: str):
    specs = parse_config(yaml.safe_load((FAAS / name).read_text()), name)
    by_name = {(s.kind, s.name): s for s in specs}
    assert {("state", STATE), ("pubsub", "pub_subs_demo"), ("lock", "lock_demo")} <= set(by_name)
    for key in (("state", STATE), ("lock", "lock_demo"), ("sequencer", "sequencer_demo")):
        assert by_name[key].metadata.get("keyPrefix") == "none", key


# --------------------------------------------------------------------------- the quickstart


@pytest.mark.integration
def test_quickstart_from_the_manifests(node: Node):
    fn1, fn2 = (FunctionPod.from_manifest(p) for p in MANIFESTS)
    node.run(fn2)
    node.run(fn1)
    seed_book1(node)

    r = node.get("/?name=book1", "id_1")
    assert (r.status, r.body) == (200, ANSWER), node.diagnostics()
    r = node.get("/fn/id_1/?name=book1")
    assert (r.status, r.body) == (200, ANSWER)
    r = node.get("/fn/id_1?name=book1")
    assert (r.status, r.body) == (200, ANSWER)

    # A book that is not there: function_2 answers 404, and function_1 says so.
    r = node.get("/?name=book9", "id_1")
    assert (r.status, r.body) == (404, "id_2 failed: NOT_FOUND\n")
    # function_2 directly, as function_1 calls it (the body is the book).
    assert node.get("/?name=book1", "id_2").body == "100"
    # `layotto ps` names each container as Kubernetes does: namespace, pod, container.
    table = [line.split() for line in node.layotto("ps").splitlines()]
    assert table[0][:3] == ["NAMESPACE", "POD", "CONTAINER"]
    for spec in (fn1, fn2):
        assert [spec.namespace, spec.name, spec.name, "function", "running"] in [r[:5] for r in table], table


@pytest.mark.integration
def test_quickstart_with_curl(node: Node):
    """Layotto's own command (curl is what `make demo` runs too)."""
    curl = require("curl")
    for spec in (FunctionPod.from_manifest(p) for p in reversed(MANIFESTS)):
        node.run(spec)
    seed_book1(node)
    argv = [curl, "-s", "-H", "id: id_1", f"localhost:{node.port}/?name=book1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    assert (out.returncode, out.stdout) == (0, ANSWER), out.stderr
    out = subprocess.run(
        [curl, "-s", f"localhost:{node.port}/fn/id_1?name=book1"], capture_output=True, text=True, timeout=20
    )
    assert (out.returncode, out.stdout) == (0, ANSWER), out.stderr


@pytest.mark.integration
def test_the_readme_seeding_script(node: Node):
    """images/examples/faas/save_state.py, the seeding step of the README's quickstart."""
    fn1, fn2 = (FunctionPod.from_manifest(p) for p in MANIFESTS)
    node.run(fn2)
    node.run(fn1)
    script = [
        sys.executable,
        str(FAAS / "save_state.py"),
        "--socket",
        str(node.run_dir / "runtime.sock"),
        "--token-file",
        str(node.token_file),
    ]
    r = subprocess.run([*script, STATE, "book3", "7"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("SaveState state_demo book3=7 (unix://")
    assert node.get("/?name=book3", "id_1").body == "There are 7 inventories for book3."
    r = subprocess.run([*script, "--get", STATE, "book3"], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "7\n"), r.stderr
    r = subprocess.run([*script, "no_such_store", "k", "v"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr, r.stderr


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_plain_redis_set_is_read(node: Node):
    """Layotto's quickstart seeds the book with `redis-cli set book1 100`."""
    fn1, fn2 = (FunctionPod.from_manifest(p) for p in MANIFESTS)
    node.run(fn2)
    node.run(fn1)
    node.backend.redis_cli("DEL", "book1")
    assert node.backend.redis_cli("SET", "book1", "100") == "OK"
    r = node.get("/?name=book1", "id_1")
    assert (r.status, r.body) == (200, ANSWER), node.diagnostics()
    assert node.api.get_state(STATE, "book1") == b"100"  # the gRPC API reads it too
    node.backend.redis_cli("SET", "book2", "42")
    assert node.get("/fn/id_1/?name=book2").body == "There are 42 inventories for book2."


PAIRS = [
    pytest.param("faas_fn1", "faas_fn2", id="c-c"),
    pytest.param("faas_fn1_as", "faas_fn2_rs", id="assemblyscript-rust"),
    pytest.param("layotto_fn1", "layotto_fn2", id="layotto_abi-layotto_abi"),
    pytest.param("layotto_fn1", "faas_fn2_rs", id="layotto_abi-rust"),
    pytest.param("faas_fn1_as", "layotto_fn2", id="assemblyscript-layotto_abi"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_the_chain_in_every_language(node: Node, first: str, second: str):
    """function_1 and function_2 as pods, from every SDK. Our SDKs' modules get their id
    from ``layotto.io/function-id``; Layotto's ABI modules name themselves (proxy_get_id)."""
    node.run(fn_pod("function-2", second, "state", "id_2"))
    node.run(fn_pod("function-1", first, "invoke", "id_1"))
    seed_book1(node)
    r = node.get("/?name=book1", "id_1")
    assert (r.status, r.body) == (200, ANSWER), node.diagnostics()
    r = node.get("/fn/id_1/?name=book1")
    assert (r.status, r.body) == (200, ANSWER)


# --------------------------------------------------------------------------- capabilities


@pytest.mark.integration
def test_function_2_without_the_state_capability(node: Node):
    fn1, fn2 = (FunctionPod.from_manifest(p) for p in MANIFESTS)
    node.run(FunctionPod(fn2.name, fn2.image, {"layotto.io/function-id": "id_2"}))
    node.run(fn1)
    seed_book1(node)

    r = node.get("/?name=book1", "id_1")
    assert r.status == 502, (r, node.diagnostics())
    assert r.body == "id_2 failed: INTERNAL_FAILURE\n"
    r = node.get("/?name=book1", "id_2")  # function_2 itself says why
    assert (r.status, r.body) == (502, "state_demo: PERMISSION_DENIED\n")
    logs = node.logs("id_2")
    assert "permission denied (the pod does not grant 'state')" in logs, logs


@pytest.mark.integration
def test_function_1_without_the_invoke_capability(node: Node):
    fn1, fn2 = (FunctionPod.from_manifest(p) for p in MANIFESTS)
    node.run(fn2)
    node.run(FunctionPod(fn1.name, fn1.image, {"layotto.io/function-id": "id_1"}))
    seed_book1(node)
    r = node.get("/?name=book1", "id_1")
    assert (r.status, r.body) == (502, "id_2 failed: PERMISSION_DENIED\n"), node.diagnostics()
    logs = node.logs("id_1")
    assert "permission denied (the pod does not grant 'invoke')" in logs, logs


# --------------------------------------------------------------------------- pub/sub, locks


@pytest.mark.integration
def test_pubsub_publisher_to_subscriber(node: Node):
    node.run(
        fn_pod(
            "subscriber",
            "pubsub_subscriber",
            "state",
            "subscriber",
            **{"layotto.io/subscriptions": "pub_subs_demo/orders"},
        )
    )
    node.run(fn_pod("publisher", "pubsub_publisher", "pubsub", "publisher"))
    assert "subscribed to pub_subs_demo/orders" in node.logs("subscriber")
    node.api.delete_state(STATE, "last_order")
    assert node.get("/orders", "subscriber").status == 404  # nothing received yet

    order = f"order-{uuid.uuid4().hex[:8]}"
    r = node.get(f"/?msg={order}", "publisher")
    assert (r.status, r.body) == (200, f"published {len(order)} bytes to pub_subs_demo/orders\n")
    got = wait_for(
        lambda: (lambda r: r if r.status == 200 else None)(node.get("/orders", "subscriber")),
        what="the subscriber stored the order",
    )
    assert got.body == order
    assert node.api.get_state(STATE, "last_order") == order.encode()
    assert "stored an order of" in node.logs("subscriber")


@pytest.mark.integration
def test_lock_example_with_two_owners(node: Node):
    node.run(fn_pod("locker", "lock_example", "lock,sequencer", "locker"))
    resource = f"res-{uuid.uuid4().hex[:8]}"

    r = node.get(f"/?owner=alice&resource={resource}&keep=1", "locker")
    assert r.status == 200, (r, node.diagnostics())
    first = yaml.safe_load(r.body)
    assert first == {
        "owner": "alice",
        "resource": resource,
        "acquired": True,
        "id": first["id"],
        "unlock": "KEPT",
    }

    r = node.get(f"/?owner=bob&resource={resource}", "locker")  # alice holds it
    assert r.status == 409
    assert yaml.safe_load(r.body) == {"owner": "bob", "resource": resource, "acquired": False}

    # The same lock through the gRPC Runtime API (lock_demo has keyPrefix none).
    unlock = node.api.call(
        "Unlock",
        pb.UnlockRequest(store_name="lock_demo", resource_id=resource, lock_owner="bob"),
        pb.UnlockResponse,
    )
    assert unlock.status == pb.UnlockResponse.LOCK_BELONG_TO_OTHERS
    unlock = node.api.call(
        "Unlock",
        pb.UnlockRequest(store_name="lock_demo", resource_id=resource, lock_owner="alice"),
        pb.UnlockResponse,
    )
    assert unlock.status == pb.UnlockResponse.SUCCESS

    r = node.get(f"/?owner=bob&resource={resource}", "locker")
    assert r.status == 200, r
    second = yaml.safe_load(r.body)
    assert second["acquired"] is True and second["unlock"] == "SUCCESS"
    assert second["id"] > first["id"] >= 1
    # Without an owner the function makes a random one (capability random: a default).
    r = node.get(f"/?resource={resource}", "locker")
    assert r.status == 200 and re.fullmatch(r"[0-9a-f]{32}", yaml.safe_load(r.body)["owner"]), r
