"""The gRPC Runtime API (layotto.host.grpc_api): every served RPC through a real gRPC
client, over the unix socket and the TCP port, against the registry's real components
(the default embedded SQLite + environment configuration in a temporary state
directory, and the same component names on a real redis-server) and, for InvokeService,
a real function (fn_echo.wasm) behind the host's invoker. Every call carries the bearer
token provisioned for app ``default.app1`` (``default.app2`` where a second app is needed);
tests/security/test_runtime_api.py pins the token checks themselves."""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from layotto.host.abi_host import HostInvoker
from layotto.host.components import ConfigItem, Delivery
from layotto.host.components import Message as PubSubMessage
from layotto.host.components.registry import Components, load_components, parse_config
from layotto.host.function import Function, HostServices
from layotto.host.function_registry import FunctionRegistry
from layotto.host.grpc_api import METHODS, SERVICE, AppIdentity, RuntimeApiServer, modified_key
from layotto.host.protocol import runtime_api_pb2 as pb
from layotto.host.runtime import NodeRuntime
from layotto.host.scoping import scoped_topic

STATE = "state_demo"
PUBSUB = "pub_subs_demo"
CONFIG = "config_demo"
LOCK = "lock_demo"
SEQ = "sequencer_demo"
SECRETS = "secret_demo"
ECHO_ID = "echo"
TOKEN1 = "token-of-app1-" + uuid.uuid4().hex
TOKEN2 = "token-of-app2-" + uuid.uuid4().hex
APP1 = AppIdentity("default", "app1")  # fn_echo runs in namespace "default" too
APP2 = AppIdentity("default", "app2")
IDENTITIES = {TOKEN1: APP1, TOKEN2: APP2}


class Client:
    """Layotto's Runtime service through generic unary calls (no generated stubs)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(target)
        grpc.channel_ready_future(self.channel).result(timeout=10)

    def call(
        self,
        name: str,
        request: Message,
        *,
        token: str | None = TOKEN1,
        app_id: str | None = None,
        timeout: float = 10,
    ) -> Any:
        response_type = METHODS[name][1] if name in METHODS else empty_pb2.Empty
        rpc = self.channel.unary_unary(
            f"/{SERVICE}/{name}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        metadata = []
        if token is not None:
            metadata.append(("authorization", f"Bearer {token}"))
        if app_id is not None:
            metadata.append(("layotto-app-id", app_id))
        return rpc(request, metadata=metadata or None, timeout=timeout)

    def error(self, name: str, request: Message, **kw: Any) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            self.call(name, request, **kw)
        return info.value

    def close(self) -> None:
        self.channel.close()


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo_function(wasm_dir: Path) -> Iterator[Function]:
    """fn_echo.wasm as the node host runs it: compiled by NodeRuntime, a Function."""
    runtime = NodeRuntime(None)
    compiled = runtime.load(wasm_dir / "fn_echo.wasm", name="fn_echo")
    fn = Function(
        name="grpc-test/fn_echo",
        function_id=ECHO_ID,
        engine=runtime.engine,
        linker=runtime.linker,
        compiled=compiled,
        argv=["/fn_echo.wasm"],
        env=[],
        memory_limit=None,
        services=HostServices(),
    )
    try:
        yield fn
    finally:
        fn.stop()


@pytest.fixture(params=["sqlite", "redis"])
def components(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Components]:
    """The registry's components under Layotto's demo names: the default configuration
    (embedded SQLite, secrets from the environment), or the same names on a real
    redis-server (the ``redis_server`` fixture), each test under its own key prefix."""
    monkeypatch.setenv("LAYOTTO_SECRET_default__db_password", "s3cret")  # namespace default's
    path = None
    if request.param == "redis":
        meta = {
            "redisHost": request.getfixturevalue("redis_server"),
            "redisKeyPrefix": f"grpc{uuid.uuid4().hex}:",
        }
        doc: dict[str, Any] = {
            kind: {name: {"type": "redis", "metadata": meta}}
            for kind, name in (
                ("state", STATE),
                ("pubsub", PUBSUB),
                ("configuration", CONFIG),
                ("lock", LOCK),
                ("sequencer", SEQ),
            )
        }
        doc["secrets"] = {SECRETS: {"type": "env", "metadata": {"prefix": "LAYOTTO_SECRET_"}}}
        path = tmp_path / "components.yaml"
        path.write_text(yaml.safe_dump(doc))
    with load_components(path, tmp_path / "state") as c:
        yield c


@pytest.fixture
def server(tmp_path: Path, components: Components, echo_function: Function) -> Iterator[tuple[Path, int]]:
    functions = FunctionRegistry()
    functions.add(echo_function)
    api = RuntimeApiServer(components, HostInvoker(functions), identities=IDENTITIES)
    sock = tmp_path / "run" / "runtime.sock"
    port = api.start(sock, "127.0.0.1:0")
    try:
        yield sock, port
    finally:
        api.stop()


@pytest.fixture(params=["unix", "tcp"])
def client(request: pytest.FixtureRequest, server: tuple[Path, int]) -> Iterator[Client]:
    sock, port = server
    c = Client(f"unix:{sock}" if request.param == "unix" else f"127.0.0.1:{port}")
    try:
        yield c
    finally:
        c.close()


def code(err: grpc.RpcError) -> grpc.StatusCode:
    return err.code()


def details(err: grpc.RpcError) -> str:
    return err.details() or ""


def item(key: str, value: bytes, etag: str | None = None) -> pb.StateItem:
    it = pb.StateItem(key=key, value=value)
    if etag is not None:
        it.etag.value = etag
    return it


# --- the proto ---------------------------------------------------------------------------------


def test_wire_names_and_numbers_are_layottos() -> None:
    """Spot checks against mosn/layotto spec/proto/runtime/v1/runtime.proto."""
    assert pb.DESCRIPTOR.package == "spec.proto.runtime.v1"
    service = pb.DESCRIPTOR.services_by_name["Runtime"]
    assert service.full_name == SERVICE
    assert set(service.methods_by_name) == set(METHODS)
    numbers = {
        (pb.InvokeServiceRequest, "id"): 1,
        (pb.InvokeServiceRequest, "message"): 3,
        (pb.CommonInvokeRequest, "http_extension"): 4,
        (pb.SayHelloResponse, "hello"): 1,
        (pb.GetStateRequest, "consistency"): 3,
        (pb.BulkStateItem, "error"): 4,
        (pb.DeleteStateRequest, "metadata"): 5,
        (pb.StateItem, "options"): 5,
        (pb.ExecuteStateTransactionRequest, "storeName"): 1,
        (pb.TransactionalStateOperation, "operationType"): 1,
        (pb.GetConfigurationRequest, "subscribe_update"): 7,
        (pb.TryLockRequest, "expire"): 4,
        (pb.GetNextIdRequest, "metadata"): 4,
        (pb.PublishEventRequest, "data_content_type"): 4,
        (pb.GetSecretResponse, "data"): 1,
    }
    for (message, field), number in numbers.items():
        assert message.DESCRIPTOR.fields_by_name[field].number == number, (message, field)
    assert pb.UnlockResponse.Status.Value("LOCK_BELONG_TO_OTHERS") == 2
    assert pb.SequencerOptions.AutoIncrement.Value("STRONG") == 1


# --- hello, invocation ---------------------------------------------------------------------------


def test_say_hello(client: Client) -> None:
    data = any_pb2.Any(type_url="type.googleapis.com/x", value=b"payload")
    got = client.call("SayHello", pb.SayHelloRequest(service_name="helloworld", name="Layotto", data=data))
    assert got.hello == "hello, Layotto"
    assert got.data == data
    assert client.call("SayHello", pb.SayHelloRequest(service_name="helloworld")).hello == "hello"


def test_invoke_service_calls_a_real_function(client: Client) -> None:
    request = pb.InvokeServiceRequest(
        id=ECHO_ID,
        message=pb.CommonInvokeRequest(
            method="books/stock", data=any_pb2.Any(value=b"name=book1"), content_type="text/plain"
        ),
    )
    got = client.call("InvokeService", request)
    assert got.content_type == "application/octet-stream"
    lines = got.data.value.decode().splitlines()
    assert lines[:4] == ["method=POST", "path=/books/stock", "query=", "body=name=book1"]
    assert "h:content-type=application/octet-stream" in lines

    err = client.error("InvokeService", pb.InvokeServiceRequest(id="no-such-function"))
    assert code(err) == grpc.StatusCode.NOT_FOUND
    assert "no-such-function" in details(err)
    err = client.error("InvokeService", pb.InvokeServiceRequest(id=""))
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT


# --- state ------------------------------------------------------------------------------------------


def test_state_round_trip_with_etags(client: Client) -> None:
    missing = client.call("GetState", pb.GetStateRequest(store_name=STATE, key="book1"))
    assert (missing.data, missing.etag) == (b"", "")

    client.call("SaveState", pb.SaveStateRequest(store_name=STATE, states=[item("book1", b"100")]))
    got = client.call("GetState", pb.GetStateRequest(store_name=STATE, key="book1"))
    assert got.data == b"100" and got.etag
    first = got.etag

    # Optimistic concurrency: the current etag wins once, then it is stale.
    client.call("SaveState", pb.SaveStateRequest(store_name=STATE, states=[item("book1", b"99", first)]))
    err = client.error(
        "SaveState", pb.SaveStateRequest(store_name=STATE, states=[item("book1", b"98", first)])
    )
    assert code(err) == grpc.StatusCode.ABORTED
    assert "etag" in details(err)
    got = client.call("GetState", pb.GetStateRequest(store_name=STATE, key="book1"))
    assert got.data == b"99" and got.etag != first

    # An etag on a key that does not exist is a mismatch too; an empty etag is "none".
    err = client.error("SaveState", pb.SaveStateRequest(store_name=STATE, states=[item("new", b"x", "7")]))
    assert code(err) == grpc.StatusCode.ABORTED
    client.call("SaveState", pb.SaveStateRequest(store_name=STATE, states=[item("new", b"x", "")]))

    err = client.error(
        "DeleteState", pb.DeleteStateRequest(store_name=STATE, key="book1", etag=pb.Etag(value=first))
    )
    assert code(err) == grpc.StatusCode.ABORTED
    client.call(
        "DeleteState", pb.DeleteStateRequest(store_name=STATE, key="book1", etag=pb.Etag(value=got.etag))
    )
    gone = client.call("GetState", pb.GetStateRequest(store_name=STATE, key="book1"))
    assert (gone.data, gone.etag) == (b"", "")
    client.call("DeleteState", pb.DeleteStateRequest(store_name=STATE, key="book1"))  # missing: fine

    # Several states in one call; binary values survive.
    blob = bytes(range(256))
    client.call("SaveState", pb.SaveStateRequest(store_name=STATE, states=[item("a", b"1"), item("b", blob)]))
    assert client.call("GetState", pb.GetStateRequest(store_name=STATE, key="b")).data == blob


def test_get_bulk_state(client: Client) -> None:
    client.call(
        "SaveState", pb.SaveStateRequest(store_name=STATE, states=[item("k1", b"v1"), item("k3", b"v3")])
    )
    got = client.call("GetBulkState", pb.GetBulkStateRequest(store_name=STATE, keys=["k1", "k2", "k3"]))
    assert [(i.key, i.data, bool(i.etag), i.error) for i in got.items] == [
        ("k1", b"v1", True, ""),
        ("k2", b"", False, ""),
        ("k3", b"v3", True, ""),
    ]
    assert client.call("GetBulkState", pb.GetBulkStateRequest(store_name=STATE)).items == []


def test_state_transaction(client: Client) -> None:
    client.call("SaveState", pb.SaveStateRequest(store_name=STATE, states=[item("old", b"o")]))
    ok = pb.ExecuteStateTransactionRequest(
        storeName=STATE,
        operations=[
            pb.TransactionalStateOperation(operationType="upsert", request=item("t1", b"one")),
            pb.TransactionalStateOperation(operationType="upsert", request=item("t2", b"two")),
            pb.TransactionalStateOperation(operationType="delete", request=item("old", b"")),
        ],
    )
    client.call("ExecuteStateTransaction", ok)
    got = client.call("GetBulkState", pb.GetBulkStateRequest(store_name=STATE, keys=["t1", "t2", "old"]))
    assert [i.data for i in got.items] == [b"one", b"two", b""]

    # A stale etag anywhere aborts the whole transaction: nothing is applied.
    t1 = client.call("GetState", pb.GetStateRequest(store_name=STATE, key="t1")).etag
    stale = pb.ExecuteStateTransactionRequest(
        storeName=STATE,
        operations=[
            pb.TransactionalStateOperation(operationType="upsert", request=item("t3", b"three")),
            pb.TransactionalStateOperation(operationType="upsert", request=item("t1", b"uno", t1 + "0")),
        ],
    )
    err = client.error("ExecuteStateTransaction", stale)
    assert code(err) == grpc.StatusCode.ABORTED
    got = client.call("GetBulkState", pb.GetBulkStateRequest(store_name=STATE, keys=["t1", "t3"]))
    assert [i.data for i in got.items] == [b"one", b""]

    # With the current etag it goes through.
    stale.operations[1].request.etag.value = t1
    client.call("ExecuteStateTransaction", stale)
    got = client.call("GetBulkState", pb.GetBulkStateRequest(store_name=STATE, keys=["t1", "t3"]))
    assert [i.data for i in got.items] == [b"uno", b"three"]

    bad = pb.ExecuteStateTransactionRequest(
        storeName=STATE,
        operations=[pb.TransactionalStateOperation(operationType="merge", request=item("x", b""))],
    )
    assert code(client.error("ExecuteStateTransaction", bad)) == grpc.StatusCode.UNIMPLEMENTED


def test_state_keys_are_namespaced_per_app(client: Client, components: Components) -> None:
    """Keys are prefixed with the token's app id (``default.app1``), whatever the caller
    says about itself."""
    store = components.state(STATE)
    save = pb.SaveStateRequest(store_name=STATE, states=[item("cart", b"app1's")])
    client.call("SaveState", save)
    assert store.get("default.app1||cart").value == b"app1's"
    assert store.get("cart") is None

    # Another app does not see it; the same app does (also naming itself, as Layotto's SDKs do).
    get = pb.GetStateRequest(store_name=STATE, key="cart")
    assert client.call("GetState", get, token=TOKEN2).data == b""
    assert client.call("GetState", get).data == b"app1's"
    assert client.call("GetState", get, app_id="default.app1").data == b"app1's"
    # Naming another app is refused, not obeyed.
    err = client.error("GetState", get, token=TOKEN2, app_id="default.app1")
    assert code(err) == grpc.StatusCode.PERMISSION_DENIED

    # Locks and sequences are namespaced the same way.
    lock = pb.TryLockRequest(store_name=LOCK, resource_id="res", lock_owner="o", expire=30)
    assert client.call("TryLock", lock).success
    assert client.call("TryLock", lock, token=TOKEN2).success
    assert not client.call("TryLock", lock).success

    err = client.error("GetState", pb.GetStateRequest(store_name=STATE, key="a||b"))
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT


def test_key_prefix_modes(tmp_path: Path) -> None:
    doc = {
        "state": {
            "plain": {"type": "sqlite", "metadata": {"keyPrefix": "none"}},
            "named": {"type": "sqlite", "metadata": {"keyPrefix": "name"}},
            "apps": {"type": "sqlite"},
        }
    }
    with Components(parse_config(doc, "test"), tmp_path, tmp_path) as c:
        assert modified_key(c, "state", "plain", "k", "app1") == "k"
        assert modified_key(c, "state", "named", "k", "app1") == "named||k"
        assert modified_key(c, "state", "apps", "k", "app1") == "app1||k"
        assert modified_key(c, "state", "apps", "k", "") == "k"

        api = RuntimeApiServer(c, None, identities=IDENTITIES)
        port = api.start(tmp_path / "api.sock", "127.0.0.1:0")
        client = Client(f"127.0.0.1:{port}")
        try:
            client.call("SaveState", pb.SaveStateRequest(store_name="plain", states=[item("k", b"1")]))
            client.call("SaveState", pb.SaveStateRequest(store_name="named", states=[item("k", b"2")]))
            client.call("SaveState", pb.SaveStateRequest(store_name="apps", states=[item("k", b"3")]))
            assert c.state("plain").get("k").value == b"1"
            assert c.state("named").get("named||k").value == b"2"
            assert c.state("apps").get("default.app1||k").value == b"3"
            # Without an invoker, InvokeService is not offered.
            err = client.error("InvokeService", pb.InvokeServiceRequest(id="x"))
            assert code(err) == grpc.StatusCode.UNIMPLEMENTED
        finally:
            client.close()
            api.stop()


# --- pub/sub, configuration, lock, sequencer, secrets ----------------------------------------------


def test_publish_event_reaches_a_subscriber(client: Client, components: Components) -> None:
    received: queue.Queue[PubSubMessage] = queue.Queue()

    def handler(message: PubSubMessage) -> Delivery:
        received.put(message)
        return Delivery.SUCCESS

    # Topics are per namespace: app1 (namespace default) publishes to "default||orders".
    topic = scoped_topic(components, PUBSUB, "default", "orders")
    assert topic == "default||orders"
    cancel = components.pubsub(PUBSUB).subscribe(topic, handler)
    try:
        client.call(
            "PublishEvent",
            pb.PublishEventRequest(
                pubsub_name=PUBSUB,
                topic="orders",
                data=b'{"id": 1}',
                data_content_type="application/json",
                metadata={"key": "order-1", "source": "forged"},
            ),
        )
        client.call(
            "PublishEvent", pb.PublishEventRequest(pubsub_name=PUBSUB, topic="orders", data=b"\x00raw")
        )
        first = received.get(timeout=10)
        second = received.get(timeout=10)
    finally:
        cancel()
    assert (first.topic, first.data, first.content_type) == (topic, b'{"id": 1}', "application/json")
    assert dict(first.metadata) == {"key": "order-1", "source": "default.app1"}
    assert (second.data, second.content_type) == (b"\x00raw", "application/octet-stream")

    err = client.error("PublishEvent", pb.PublishEventRequest(pubsub_name=PUBSUB, topic=""))
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT


def test_get_configuration(client: Client, components: Components) -> None:
    """Configuration items are per app: app1's item ``k`` is the store's ``default.app1||k``."""
    store = components.configuration(CONFIG)
    store.set(  # the SQLite store's admin method
        [
            ConfigItem("default.app1||greeting", "hello", tags={"owner": "ops"}),
            ConfigItem("default.app1||db_url", "postgres://prod", group="backend", label="prod"),
            ConfigItem("default.app1||db_url", "postgres://dev", group="backend", label="dev"),
            ConfigItem("default.app2||greeting", "app2's"),
            ConfigItem("greeting", "unscoped"),
        ]
    )
    got = client.call(
        "GetConfiguration", pb.GetConfigurationRequest(store_name=CONFIG, keys=["greeting", "nope"])
    )
    assert [(i.key, i.content, dict(i.tags)) for i in got.items] == [("greeting", "hello", {"owner": "ops"})]

    got = client.call(
        "GetConfiguration",
        pb.GetConfigurationRequest(store_name=CONFIG, keys=["db_url"], group="backend", label="prod"),
    )
    assert [(i.key, i.content, i.group, i.label) for i in got.items] == [
        ("db_url", "postgres://prod", "backend", "prod")
    ]
    everything = client.call("GetConfiguration", pb.GetConfigurationRequest(store_name=CONFIG))
    assert sorted((i.key, i.content) for i in everything.items) == [
        ("db_url", "postgres://dev"),
        ("db_url", "postgres://prod"),
        ("greeting", "hello"),
    ]
    app2 = client.call("GetConfiguration", pb.GetConfigurationRequest(store_name=CONFIG), token=TOKEN2)
    assert [(i.key, i.content) for i in app2.items] == [("greeting", "app2's")]


def test_lock_owner_checks(client: Client) -> None:
    def try_lock(owner: str, expire: int = 30) -> bool:
        request = pb.TryLockRequest(store_name=LOCK, resource_id="order-42", lock_owner=owner, expire=expire)
        return client.call("TryLock", request).success

    def unlock(owner: str) -> int:
        request = pb.UnlockRequest(store_name=LOCK, resource_id="order-42", lock_owner=owner)
        return client.call("Unlock", request).status

    assert try_lock("alice")
    assert not try_lock("bob")
    assert not try_lock("alice")  # not re-entrant
    assert unlock("bob") == pb.UnlockResponse.LOCK_BELONG_TO_OTHERS
    assert unlock("alice") == pb.UnlockResponse.SUCCESS
    assert unlock("alice") == pb.UnlockResponse.LOCK_UNEXIST
    assert try_lock("bob")
    assert unlock("bob") == pb.UnlockResponse.SUCCESS

    for bad in (
        pb.TryLockRequest(store_name=LOCK, resource_id="r", lock_owner="o", expire=0),
        pb.TryLockRequest(store_name=LOCK, resource_id="r", lock_owner="", expire=5),
        pb.TryLockRequest(store_name=LOCK, resource_id="", lock_owner="o", expire=5),
    ):
        assert code(client.error("TryLock", bad)) == grpc.StatusCode.INVALID_ARGUMENT
    err = client.error("Unlock", pb.UnlockRequest(store_name=LOCK, resource_id="r", lock_owner=""))
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT


def test_sequencer_is_monotonic(client: Client) -> None:
    def next_id(key: str, increment: int = pb.SequencerOptions.WEAK) -> int:
        request = pb.GetNextIdRequest(
            store_name=SEQ, key=key, options=pb.SequencerOptions(increment=increment)
        )
        return client.call("GetNextId", request).next_id

    ids = [
        next_id("orders", pb.SequencerOptions.STRONG if i % 2 else pb.SequencerOptions.WEAK)
        for i in range(20)
    ]
    assert ids == sorted(set(ids)) and ids[0] >= 1
    assert next_id("invoices") < ids[-1]  # keys are independent

    # Concurrent callers on the server's thread pool: every id once, increasing per caller.
    results: list[list[int]] = [[] for _ in range(8)]

    def worker(out: list[int]) -> None:
        for _ in range(25):
            out.append(next_id("orders"))

    threads = [threading.Thread(target=worker, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = [i for r in results for i in r]
    assert len(set(merged)) == len(merged) == 200
    assert min(merged) > ids[-1]
    assert all(r == sorted(r) for r in results)

    err = client.error("GetNextId", pb.GetNextIdRequest(store_name=SEQ, key=""))
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT


def test_get_secret(client: Client) -> None:
    got = client.call("GetSecret", pb.GetSecretRequest(store_name=SECRETS, key="db_password"))
    assert dict(got.data) == {"db_password": "s3cret"}
    err = client.error("GetSecret", pb.GetSecretRequest(store_name=SECRETS, key="absent"))
    assert code(err) == grpc.StatusCode.NOT_FOUND
    assert "absent" in details(err)


# --- errors, lifecycle ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("GetState", pb.GetStateRequest(store_name="nope", key="k")),
        ("GetBulkState", pb.GetBulkStateRequest(store_name="nope", keys=["k"])),
        ("SaveState", pb.SaveStateRequest(store_name="nope", states=[item("k", b"v")])),
        ("DeleteState", pb.DeleteStateRequest(store_name="nope", key="k")),
        ("ExecuteStateTransaction", pb.ExecuteStateTransactionRequest(storeName="nope")),
        ("PublishEvent", pb.PublishEventRequest(pubsub_name="nope", topic="t")),
        ("GetConfiguration", pb.GetConfigurationRequest(store_name="nope")),
        ("TryLock", pb.TryLockRequest(store_name="nope", resource_id="r", lock_owner="o", expire=1)),
        ("Unlock", pb.UnlockRequest(store_name="nope", resource_id="r", lock_owner="o")),
        ("GetNextId", pb.GetNextIdRequest(store_name="nope", key="k")),
        ("GetSecret", pb.GetSecretRequest(store_name="nope", key="k")),
    ],
)
def test_unknown_store_is_invalid_argument(server: tuple[Path, int], method: str, request_: Message) -> None:
    client = Client(f"unix:{server[0]}")
    try:
        err = client.error(method, request_)
    finally:
        client.close()
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in details(err) and "not found" in details(err)


def test_default_store_for_an_empty_name(client: Client, components: Components) -> None:
    client.call("SaveState", pb.SaveStateRequest(store_name="", states=[item("dflt", b"1")]))
    assert components.state(STATE).get("default.app1||dflt").value == b"1"


def test_unserved_layotto_rpcs_are_unimplemented(client: Client) -> None:
    for name in ("GetFile", "DeleteBulkState", "GetBulkSecret", "SubscribeConfiguration"):
        err = client.error(name, empty_pb2.Empty())
        assert code(err) == grpc.StatusCode.UNIMPLEMENTED, name


def test_start_replaces_a_stale_socket_and_stop_removes_it(tmp_path: Path, components: Components) -> None:
    sock = tmp_path / "runtime.sock"
    sock.write_text("left over by a crashed host")
    api = RuntimeApiServer(components, None, identities=IDENTITIES)
    assert api.start(sock, None) == 0
    try:
        client = Client(f"unix:{sock}")
        assert client.call("SayHello", pb.SayHelloRequest(name="x")).hello == "hello, x"
        client.close()
        with pytest.raises(RuntimeError):
            api.start(sock, None)
    finally:
        api.stop()
    assert not sock.exists()
    api.stop()  # idempotent


def test_tcp_port_in_use_is_an_error(
    tmp_path: Path, components: Components, server: tuple[Path, int]
) -> None:
    """A taken TCP port fails start() cleanly: the same server can then start on its unix
    socket alone (what the daemon falls back to)."""
    api = RuntimeApiServer(components, None, identities=IDENTITIES)
    with pytest.raises(OSError, match="cannot listen"):
        api.start(tmp_path / "other.sock", f"127.0.0.1:{server[1]}")
    try:
        assert api.start(tmp_path / "other.sock", None) == 0
        client = Client(f"unix:{tmp_path / 'other.sock'}")
        assert client.call("SayHello", pb.SayHelloRequest()).hello == "hello"
        client.close()
    finally:
        api.stop()
