"""The node host as a boundary between tenants (issue 9): the gRPC Runtime API believes
only operator-provisioned bearer tokens, listens owner-only, and every component name a
tenant passes (through the API or the Runtime ABI) stays inside its namespace or app.

Real gRPC clients over the real sockets, real components (embedded SQLite, a real
redis-server, file and environment secret stores) and real functions (fn_echo.wasm,
pubsub_publisher.wasm) run as the node host runs them; nothing is mocked."""

from __future__ import annotations

import os
import queue
import shutil
import stat
import subprocess
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import any_pb2
from google.protobuf.message import Message

from layotto.host.abi_host import HostInvoker, parse_capabilities
from layotto.host.components import ConfigItem, Delivery
from layotto.host.components import Message as PubSubMessage
from layotto.host.components.registry import Components, load_components
from layotto.host.function import Function, HostServices, Request
from layotto.host.function_registry import FunctionRegistry
from layotto.host.grpc_api import METHODS, SERVICE, AppIdentity, RuntimeApiServer, load_identities
from layotto.host.protocol import runtime_api_pb2 as pb
from layotto.host.scoping import scoped_topic, subscribe_configuration

VICTIM_TOKEN = "victim-" + uuid.uuid4().hex
ATTACKER_TOKEN = "attacker-" + uuid.uuid4().hex
VICTIM = AppIdentity("victim", "cart")
ATTACKER = AppIdentity("attacker", "cart")  # the same app name, another namespace
NEIGHBOUR_TOKEN = "neighbour-" + uuid.uuid4().hex
NEIGHBOUR = AppIdentity("victim", "billing")  # the victim's namespace, another app
IDENTITIES = {VICTIM_TOKEN: VICTIM, ATTACKER_TOKEN: ATTACKER, NEIGHBOUR_TOKEN: NEIGHBOUR}
STATE = "state_demo"


class Client:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        grpc.channel_ready_future(self.channel).result(timeout=10)

    def call(self, name: str, request: Message, metadata: list[tuple[str, str]] | None = None) -> Any:
        rpc = self.channel.unary_unary(
            f"/{SERVICE}/{name}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=METHODS[name][1].FromString,
        )
        return rpc(request, metadata=metadata, timeout=10)

    def as_(self, token: str, name: str, request: Message, **extra: str) -> Any:
        metadata = [("authorization", f"Bearer {token}"), *extra.items()]
        return self.call(name, request, [(k.replace("_", "-"), v) for k, v in metadata])

    def error(
        self, name: str, request: Message, metadata: list[tuple[str, str]] | None = None
    ) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            self.call(name, request, metadata)
        return info.value

    def close(self) -> None:
        self.channel.close()


def bearer(token: str, **extra: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}"), *((k.replace("_", "-"), v) for k, v in extra.items())]


def code(err: grpc.RpcError) -> grpc.StatusCode:
    return err.code()


def details(err: grpc.RpcError) -> str:
    return err.details() or ""


def save(key: str, value: bytes) -> pb.SaveStateRequest:
    return pb.SaveStateRequest(store_name=STATE, states=[pb.StateItem(key=key, value=value)])


def get(key: str) -> pb.GetStateRequest:
    return pb.GetStateRequest(store_name=STATE, key=key)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def components(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Components]:
    """State, pub/sub and configuration on SQLite or a real redis-server; secrets from a
    file (namespaced and shared) and from the environment."""
    secrets_file = tmp_path / "secrets.yaml"
    secrets_file.write_text(
        yaml.safe_dump(
            {
                "victim/db": {"password": "victim-pw"},
                "attacker/db": {"password": "attacker-pw"},
                "db": {"password": "node-wide-unscoped"},
            }
        )
    )
    shared_file = tmp_path / "shared.yaml"
    shared_file.write_text(yaml.safe_dump({"ca": {"pem": "shared-ca"}}))
    monkeypatch.setenv("SECTEST_victim__token", "victim-env")
    monkeypatch.setenv("SECTEST_token", "node-env")
    if request.param == "redis":
        backend: dict[str, Any] = {
            "type": "redis",
            "metadata": {
                "redisHost": request.getfixturevalue("redis_server"),
                "redisKeyPrefix": f"sec{uuid.uuid4().hex}:",
            },
        }
    else:
        backend = {"type": "sqlite"}
    doc = {
        "state": {STATE: backend},
        "pubsub": {"bus": backend},
        "configuration": {"config": backend},
        "secrets": {
            "vault": {"type": "file", "metadata": {"path": str(secrets_file)}},
            "env": {"type": "env", "metadata": {"prefix": "SECTEST_"}},
            "shared": {"type": "file", "metadata": {"path": str(shared_file), "secretPrefix": "none"}},
        },
    }
    path = tmp_path / "components.yaml"
    path.write_text(yaml.safe_dump(doc))
    with load_components(path, tmp_path / "state") as c:
        yield c


@pytest.fixture(scope="module")
def victim_echo(wasm_dir: Path) -> Iterator[Function]:
    """fn_echo.wasm serving id ``echo`` in namespace ``victim``."""
    from layotto.host.runtime import NodeRuntime

    runtime = NodeRuntime(None)
    fn = Function(
        name="victim/echo",
        function_id="echo",
        engine=runtime.engine,
        linker=runtime.linker,
        compiled=runtime.load(wasm_dir / "fn_echo.wasm", name="fn_echo"),
        argv=["/fn_echo.wasm"],
        env=[],
        memory_limit=None,
        namespace="victim",
    )
    try:
        yield fn
    finally:
        fn.stop()


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is root-only, which would hide
    the socket's own mode from the test)."""
    path = Path(tempfile.mkdtemp(prefix="layotto-sec-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def api(
    components: Components, victim_echo: Function, world_dir: Path
) -> Iterator[tuple[RuntimeApiServer, Path, int]]:
    functions = FunctionRegistry()
    functions.add(victim_echo)
    server = RuntimeApiServer(components, HostInvoker(functions), identities=IDENTITIES)
    sock = world_dir / "runtime.sock"
    port = server.start(sock, "127.0.0.1:0")
    try:
        yield server, sock, port
    finally:
        server.stop()


@pytest.fixture(params=["unix", "tcp"])
def client(request: pytest.FixtureRequest, api: tuple[RuntimeApiServer, Path, int]) -> Iterator[Client]:
    _, sock, port = api
    c = Client(f"unix:{sock}" if request.param == "unix" else f"127.0.0.1:{port}")
    try:
        yield c
    finally:
        c.close()


# --- identity ------------------------------------------------------------------------------


def test_a_call_without_a_valid_token_is_unauthenticated(client: Client, components: Components) -> None:
    for metadata in (
        None,
        [("layotto-app-id", VICTIM.app_id)],  # the old way of naming oneself
        [("authorization", "Bearer not-a-provisioned-token")],
        [("authorization", f"Basic {VICTIM_TOKEN}")],
        [("authorization", VICTIM_TOKEN)],
        [("authorization", f"Bearer {VICTIM_TOKEN[:-1]}")],
    ):
        for name, request in (
            ("SaveState", save("cart", b"forged")),
            ("GetState", get("cart")),
            ("SayHello", pb.SayHelloRequest()),
            ("GetSecret", pb.GetSecretRequest(store_name="shared", key="ca")),
            ("InvokeService", pb.InvokeServiceRequest(id="echo")),
        ):
            err = client.error(name, request, metadata)
            assert code(err) == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
            assert "bearer token the node operator provisioned for the app" in details(err)
    assert components.state(STATE).get("victim.cart||cart") is None
    assert components.state(STATE).get("cart") is None


def test_layotto_app_id_cannot_borrow_another_apps_state(client: Client, components: Components) -> None:
    store = components.state(STATE)
    client.as_(VICTIM_TOKEN, "SaveState", save("cart", b"victim's cart"))
    assert store.get("victim.cart||cart").value == b"victim's cart"

    # The attacker's token, naming the victim: refused outright, nothing written.
    for name, request in (("SaveState", save("cart", b"overwritten")), ("GetState", get("cart"))):
        err = client.error(name, request, bearer(ATTACKER_TOKEN, layotto_app_id=VICTIM.app_id))
        assert code(err) == grpc.StatusCode.PERMISSION_DENIED
        assert VICTIM.app_id in details(err) and ATTACKER.app_id in details(err)
    # A neighbour app of the victim's own namespace cannot borrow it either.
    err = client.error("GetState", get("cart"), bearer(NEIGHBOUR_TOKEN, layotto_app_id=VICTIM.app_id))
    assert code(err) == grpc.StatusCode.PERMISSION_DENIED

    # Without the header the attacker reaches its own keys only.
    assert client.as_(ATTACKER_TOKEN, "GetState", get("cart")).data == b""
    client.as_(ATTACKER_TOKEN, "SaveState", save("cart", b"attacker's cart"))
    assert store.get("attacker.cart||cart").value == b"attacker's cart"
    assert store.get("victim.cart||cart").value == b"victim's cart"
    assert client.as_(VICTIM_TOKEN, "GetState", get("cart")).data == b"victim's cart"
    # Naming its own app is fine (Layotto's SDKs send it).
    got = client.call("GetState", get("cart"), bearer(VICTIM_TOKEN, layotto_app_id=VICTIM.app_id))
    assert got.data == b"victim's cart"


def test_save_state_lands_under_the_tokens_prefix(client: Client, components: Components) -> None:
    client.as_(NEIGHBOUR_TOKEN, "SaveState", save("invoice", b"42"))
    assert components.state(STATE).get("victim.billing||invoice").value == b"42"
    assert components.state(STATE).get("invoice") is None
    # A key that tries to write someone else's prefix is refused.
    err = client.error("SaveState", save("victim.cart||cart", b"x"), bearer(ATTACKER_TOKEN))
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT


def test_secrets_are_per_namespace(client: Client) -> None:
    def secret(token: str, store: str, key: str) -> dict[str, str]:
        return dict(client.as_(token, "GetSecret", pb.GetSecretRequest(store_name=store, key=key)).data)

    assert secret(VICTIM_TOKEN, "vault", "db") == {"password": "victim-pw"}
    assert secret(ATTACKER_TOKEN, "vault", "db") == {"password": "attacker-pw"}
    assert secret(VICTIM_TOKEN, "env", "token") == {"token": "victim-env"}
    # Another namespace's secret, by any spelling: refused or not found.
    for key in ("victim/db", "../victim/db", "/victim/db"):
        err = client.error(
            "GetSecret", pb.GetSecretRequest(store_name="vault", key=key), bearer(ATTACKER_TOKEN)
        )
        assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
    err = client.error(
        "GetSecret", pb.GetSecretRequest(store_name="env", key="token"), bearer(ATTACKER_TOKEN)
    )
    assert code(err) == grpc.StatusCode.NOT_FOUND  # SECTEST_token is node-wide, not attacker's
    # Only a store the operator marks secretPrefix: none is shared.
    assert secret(ATTACKER_TOKEN, "shared", "ca") == {"pem": "shared-ca"}


def test_secret_without_the_namespace_entry_is_not_the_unscoped_one(
    client: Client, components: Components, tmp_path: Path
) -> None:
    """A namespace with no secret of that name does not fall back to the unscoped one."""
    token = "third-" + uuid.uuid4().hex
    api = RuntimeApiServer(components, None, identities={token: AppIdentity("third", "app")})
    sock = tmp_path / "third.sock"
    api.start(sock)
    other = Client(f"unix:{sock}")
    try:
        err = other.error("GetSecret", pb.GetSecretRequest(store_name="vault", key="db"), bearer(token))
        assert code(err) == grpc.StatusCode.NOT_FOUND
        assert "node-wide-unscoped" not in details(err)
    finally:
        other.close()
        api.stop()


def test_invoke_reaches_only_the_callers_namespace(client: Client) -> None:
    request = pb.InvokeServiceRequest(
        id="echo", message=pb.CommonInvokeRequest(method="hi", data=any_pb2.Any(value=b"x"))
    )
    got = client.as_(VICTIM_TOKEN, "InvokeService", request)
    assert got.data.value.decode().splitlines()[1] == "path=/hi"
    err = client.error("InvokeService", request, bearer(ATTACKER_TOKEN))
    assert code(err) == grpc.StatusCode.NOT_FOUND


def into(inbox: queue.Queue[PubSubMessage]):
    """A pub/sub handler that puts every message into ``inbox`` and acknowledges it."""

    def handle(message: PubSubMessage) -> Delivery:
        inbox.put(message)
        return Delivery.SUCCESS

    return handle


def test_published_events_stay_in_the_namespace_and_carry_the_true_source(
    client: Client, components: Components
) -> None:
    got: dict[str, queue.Queue[PubSubMessage]] = {"victim": queue.Queue(), "attacker": queue.Queue()}

    bus = components.pubsub("bus")
    cancels = [bus.subscribe(scoped_topic(components, "bus", ns, "orders"), into(got[ns])) for ns in got]
    try:
        client.as_(
            VICTIM_TOKEN,
            "PublishEvent",
            pb.PublishEventRequest(
                pubsub_name="bus", topic="orders", data=b"secret order", metadata={"source": "x"}
            ),
        )
        message = got["victim"].get(timeout=10)
        assert message.data == b"secret order"
        assert message.metadata["source"] == VICTIM.app_id
        with pytest.raises(queue.Empty):
            got["attacker"].get(timeout=1.5)
        err = client.error(
            "PublishEvent",
            pb.PublishEventRequest(pubsub_name="bus", topic="victim||orders"),
            bearer(ATTACKER_TOKEN),
        )
        assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        for cancel in cancels:
            cancel()


def test_configuration_is_per_app(client: Client, components: Components) -> None:
    store = components.configuration("config")
    seen: queue.Queue[list[ConfigItem]] = queue.Queue()
    cancel = subscribe_configuration(components, "config", "attacker", ATTACKER.app_id, [], seen.put)
    try:
        store.set([ConfigItem("victim.cart||price", "10"), ConfigItem("attacker.cart||price", "99")])
        request = pb.GetConfigurationRequest(store_name="config")
        assert [(i.key, i.content) for i in client.as_(VICTIM_TOKEN, "GetConfiguration", request).items] == [
            ("price", "10")
        ]
        assert [
            (i.key, i.content) for i in client.as_(ATTACKER_TOKEN, "GetConfiguration", request).items
        ] == [("price", "99")]
        # The attacker's subscription sees its own item only, under its own name.
        changed = [(i.key, i.content) for batch in _drain(seen) for i in batch]
        assert changed == [("price", "99")]
    finally:
        cancel()


def _drain(q: queue.Queue[list[ConfigItem]], wait: float = 5.0) -> list[list[ConfigItem]]:
    batches = [q.get(timeout=wait)]
    while True:
        try:
            batches.append(q.get(timeout=0.5))
        except queue.Empty:
            return batches


# --- listening -----------------------------------------------------------------------------------


def test_unix_socket_is_owner_only(api: tuple[RuntimeApiServer, Path, int]) -> None:
    _, sock, _ = api
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()


def test_socket_group_makes_it_0660(components: Components, world_dir: Path) -> None:
    server = RuntimeApiServer(components, None, identities=IDENTITIES)
    sock = world_dir / "grouped.sock"
    server.start(sock, socket_group="nogroup")
    try:
        st = sock.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660
        import grp

        assert st.st_gid == grp.getgrnam("nogroup").gr_gid
    finally:
        server.stop()
    with pytest.raises(ValueError, match="does not exist"):
        RuntimeApiServer(components, None).start(world_dir / "x.sock", socket_group="no-such-group-here")


def test_tcp_only_when_asked(components: Components, world_dir: Path) -> None:
    server = RuntimeApiServer(components, None, identities=IDENTITIES)
    try:
        assert server.start(world_dir / "only.sock") == 0
    finally:
        server.stop()


NOBODY_CONNECT = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sys.argv[1])
    except OSError as exc:
        print(type(exc).__name__, exc.errno)
    else:
        print("connected")
    """
)


def _connect_as_nobody(sock: Path) -> str:
    python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    done = subprocess.run(
        [python, "-I", "-c", NOBODY_CONNECT, str(sock)],
        user="nobody",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd="/",
    )
    return done.stdout.strip()


@pytest.mark.integration  # needs root
def test_another_user_cannot_connect(api: tuple[RuntimeApiServer, Path, int]) -> None:
    _, sock, _ = api
    assert _connect_as_nobody(sock) == "PermissionError 13"
    # The control: the same user reaches the very same socket once its mode allows it, so
    # the refusal above is the socket's mode (and a connection alone still grants nothing:
    # every call needs a token).
    sock.chmod(0o666)
    assert _connect_as_nobody(sock) == "connected"


# --- the operator's list -----------------------------------------------------------------------------


def test_load_identities(tmp_path: Path) -> None:
    token_file = tmp_path / "cart.token"
    token_file.write_text("f" * 40 + "\n")
    token_file.chmod(0o600)
    identities = load_identities(
        [
            {"namespace": "shop", "app": "cart", "token": "a" * 32},
            {"namespace": "shop", "app": "billing.v2", "tokenFile": str(token_file)},
        ]
    )
    assert identities == {"a" * 32: AppIdentity("shop", "cart"), "f" * 40: AppIdentity("shop", "billing.v2")}
    assert identities["a" * 32].app_id == "shop.cart"
    assert load_identities([]) == {}

    bad = [
        ("not a list", "must be a list"),
        (["x"], r"runtimeApi.apps\[0\]: expected a mapping"),
        ([{"namespace": "shop", "app": "cart"}], "exactly one of token or tokenFile"),
        ([{"namespace": "shop", "app": "cart", "token": "a" * 32, "tokenFile": "/x"}], "exactly one"),
        ([{"namespace": "shop", "app": "cart", "token": "short"}], "at least 16 characters"),
        ([{"namespace": "sh.op", "app": "cart", "token": "a" * 32}], "no dots"),
        ([{"namespace": "shop", "app": "", "token": "a" * 32}], "app must be"),
        (
            [{"namespace": "shop", "app": "cart", "token": "a" * 32, "role": "admin"}],
            r"unknown fields \['role'\]",
        ),
        (
            [{"namespace": "shop", "app": "cart", "tokenFile": str(tmp_path / "missing")}],
            "cannot read tokenFile",
        ),
        (
            [
                {"namespace": "shop", "app": "cart", "token": "a" * 32},
                {"namespace": "shop", "app": "other", "token": "a" * 32},
            ],
            r"runtimeApi.apps\[1\] \(shop.other\): the same token is already given to shop.cart",
        ),
    ]
    for items, message in bad:
        with pytest.raises(ValueError, match=message):
            load_identities(items)


# --- the Runtime ABI: the same scoping for functions ---------------------------------------------------


def test_a_function_publishing_does_not_reach_another_namespace(
    wasm_dir: Path, components: Components
) -> None:
    """pubsub_publisher.wasm in namespace ``tenant-a`` publishes topic ``orders``: a
    subscriber of namespace ``tenant-b`` to ``orders`` gets nothing, one of ``tenant-a``
    gets the message."""
    from layotto.host.runtime import NodeRuntime

    runtime = NodeRuntime(None)
    publisher = Function(
        name="tenant-a/publisher",
        function_id="publisher",
        engine=runtime.engine,
        linker=runtime.linker,
        compiled=runtime.load(wasm_dir / "pubsub_publisher.wasm", name="pubsub_publisher"),
        argv=["/pubsub_publisher.wasm"],
        env=[],
        memory_limit=None,
        capabilities=parse_capabilities("pubsub"),
        app_id="tenant-a.publisher",
        services=HostServices(components, None),
        namespace="tenant-a",
    )
    got: dict[str, queue.Queue[PubSubMessage]] = {"tenant-a": queue.Queue(), "tenant-b": queue.Queue()}

    bus = components.pubsub("bus")
    cancels = [bus.subscribe(scoped_topic(components, "bus", ns, "orders"), into(got[ns])) for ns in got]
    try:
        response = publisher.call_sync(
            Request(b"POST", b"/", b"pubsub=bus&topic=orders", [], b"tenant a's order")
        )
        assert response.status == 200, response.body
        assert got["tenant-a"].get(timeout=10).data == b"tenant a's order"
        with pytest.raises(queue.Empty):
            got["tenant-b"].get(timeout=1.5)
        # The function cannot name another namespace's topic either.
        response = publisher.call_sync(Request(b"POST", b"/", b"pubsub=bus&topic=tenant-b||orders", [], b"x"))
        assert response.status == 502 and b"BAD_ARGUMENT" in response.body
    finally:
        for cancel in cancels:
            cancel()
        publisher.stop()
