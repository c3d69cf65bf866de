"""The gRPC Runtime API for sidecar-mode applications: a Layotto-compatible subset.

Non-wasm applications on the node reach the same components the functions reach through
the Runtime ABI, over Layotto's own gRPC API: package ``spec.proto.runtime.v1``, service
``Runtime`` (``shim/protocol/runtime_api.proto`` declares the served messages with
Layotto's field numbers), so Layotto's SDKs and generated stubs work unchanged. Served:
SayHello, InvokeService, GetConfiguration, TryLock, Unlock, GetNextId, GetState,
GetBulkState, SaveState, DeleteState, ExecuteStateTransaction, PublishEvent, GetSecret.
Any other Layotto RPC answers UNIMPLEMENTED.

The server is grpcio's synchronous server on its own thread pool: component calls block
(SQLite, Redis, a function invoked in process), so they never run on the host's event
loop. It listens on a unix socket and, optionally, on a TCP address (Layotto's default is
``127.0.0.1:34904``).

Semantics follow Layotto's ``pkg/grpc/default_api`` and ``pkg/grpc/dapr``:

- An unknown store (state, pub/sub, lock, sequencer, secret, configuration) is
  INVALID_ARGUMENT, as Layotto answers; no component registry at all is
  FAILED_PRECONDITION. An empty store name is the kind's default component (the
  registry's rule, as for the Runtime ABI).
- GetState of a missing key answers empty data and etag "" (not an error); GetBulkState
  answers one item per requested key, in order, a missing key with empty data.
- SaveState and DeleteState with a stale etag answer ABORTED (Layotto's
  ``wrapDaprComponentError`` maps ``state.ETagMismatch`` to ``codes.Aborted``). An empty
  etag means "no etag" (unconditional write). ExecuteStateTransaction is all or nothing;
  a stale etag inside it is ABORTED too (Layotto answers INTERNAL for every transaction
  failure; ABORTED says more and matches SaveState). A store without the TRANSACTIONAL
  feature, or an operation type other than "upsert"/"delete", is UNIMPLEMENTED.
  ``StateOptions`` (concurrency, consistency) are accepted and ignored: the components
  are strongly consistent and last-write-wins unless an etag is given.
- **Key namespacing.** State, lock and sequencer keys are prefixed per application with
  the rule of ``AbiContext.state_key``: the store's ``keyPrefix`` metadata ``none``
  leaves keys alone, ``name`` prefixes ``<store>||``, anything else (the default,
  ``appid``) prefixes ``<app id>||``. A sidecar application names itself with the gRPC
  metadata key ``layotto-app-id`` on each call (else the server's ``app_id``, by default
  ""); with no app id the key is not prefixed, as Layotto does for an empty app id. So an
  application that sends ``layotto-app-id: <function id>`` shares that function's state.
- PublishEvent publishes ``data`` as is (no CloudEvents envelope: the host's subscribers
  are functions and component-level handlers that take raw bytes), with
  ``data_content_type`` (default ``application/octet-stream``) and the request's metadata,
  plus ``source: <app id>`` when the caller names itself. An empty topic is
  INVALID_ARGUMENT.
- TryLock needs a resource id, an owner and a positive expiry (INVALID_ARGUMENT
  otherwise); Unlock answers Layotto's status enum (SUCCESS, LOCK_UNEXIST,
  LOCK_BELONG_TO_OTHERS, INTERNAL_ERROR).
- GetNextId is always STRONG (strictly increasing per key); the WEAK option is served the
  same way.
- GetConfiguration answers the store's items for the keys (all items when none), group
  and label; ``app_id`` and ``subscribe_update`` are ignored (there is no app callback).
- GetSecret answers the secret's key/value map; an unknown secret is NOT_FOUND (Layotto
  reports component errors as INTERNAL; ours can tell "missing" apart).
- InvokeService calls function ``id`` on this node (or a configured application) through
  the host's invoker: method ``message.method``, body ``message.data.value``; the answer
  is ``InvokeResponse{data: Any{value: <body>}, content_type}`` (an untyped Any, as
  Layotto builds it). A target that does not exist is NOT_FOUND.
- SayHello answers ``hello: "hello, <name>"`` (just ``"hello"`` without a name) and
  echoes ``data``, as Layotto's helloworld component configured with "hello" does; there
  are no hello components here, so every ``service_name`` is served.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from layotto.host.components import (
    ComponentError,
    ETagMismatch,
    NotFound,
    OpKind,
    StateOp,
    UnlockStatus,
)
from layotto.shim.protocol import runtime_api_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "spec.proto.runtime.v1.Runtime"
DEFAULT_ADDRESS = "127.0.0.1:34904"  # Layotto's gRPC listener (configs/config_standalone.json)
APP_ID_METADATA = "layotto-app-id"
MAX_MESSAGE = 16 << 20
SEPARATOR = "||"


class ApiError(Exception):
    """Answer the call with this gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def modified_key(components: Any, kind: str, store: str, key: str, app_id: str) -> str:
    """``key`` as stored: the rule of ``AbiContext.state_key``, plus Layotto's "an empty
    app id leaves the key alone"."""
    mode = "appid"
    metadata = getattr(components, "metadata", None)
    if callable(metadata):
        try:
            mode = str((metadata(kind, store) or {}).get("keyPrefix", "appid")).lower()
        except Exception:
            mode = "appid"
    if mode == "none":
        return key
    if mode == "name":
        return f"{store}{SEPARATOR}{key}"
    return f"{app_id}{SEPARATOR}{key}" if app_id else key


class RuntimeApi:
    """The RPC implementations (request, context) -> response; errors raise ApiError or a
    component exception, mapped to a status by the server's wrapper."""

    def __init__(self, components: Any, invoker: Any, app_id: str = "") -> None:
        self.components = components
        self.invoker = invoker
        self.app_id = app_id

    # --- helpers ---------------------------------------------------------------------

    def caller(self, context: grpc.ServicerContext) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == APP_ID_METADATA:
                return value if isinstance(value, str) else value.decode(errors="replace")
        return self.app_id

    def component(self, kind: str, name: str, what: str) -> Any:
        if self.components is None:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, f"{what}s are not configured")
        try:
            return getattr(self.components, kind)(name)
        except (KeyError, LookupError, ComponentError) as exc:
            raise _invalid(f"{what} {name} is not found: {exc}") from exc

    def key(self, kind: str, store: str, key: str, context: grpc.ServicerContext) -> str:
        if SEPARATOR in key:
            raise _invalid(f"input key/keyPrefix '{key}' can't contain '{SEPARATOR}'")
        return modified_key(self.components, kind, store, key, self.caller(context))

    # --- hello, invocation -----------------------------------------------------------------

    def SayHello(self, request: pb.SayHelloRequest, context: grpc.ServicerContext) -> pb.SayHelloResponse:
        hello = f"hello, {request.name}" if request.name else "hello"
        response = pb.SayHelloResponse(hello=hello)
        if request.HasField("data"):
            response.data.CopyFrom(request.data)
        return response

    def InvokeService(
        self, request: pb.InvokeServiceRequest, context: grpc.ServicerContext
    ) -> pb.InvokeResponse:
        if not request.id:
            raise _invalid("the invocation target id is empty")
        if self.invoker is None:
            raise ApiError(grpc.StatusCode.UNIMPLEMENTED, "service invocation is not configured")
        message = request.message
        body = self.invoker.invoke(None, request.id, message.method, message.data.value)
        return pb.InvokeResponse(data=any_pb2.Any(value=bytes(body)), content_type="application/octet-stream")

    # --- configuration -------------------------------------------------------------------

    def GetConfiguration(
        self, request: pb.GetConfigurationRequest, context: grpc.ServicerContext
    ) -> pb.GetConfigurationResponse:
        store = self.component("configuration", request.store_name, "configuration store")
        items = store.get(list(request.keys), group=request.group.strip(), label=request.label.strip())
        return pb.GetConfigurationResponse(
            items=[
                pb.ConfigurationItem(
                    key=item.key,
                    content=item.content,
                    group=item.group,
                    label=item.label,
                    tags=dict(item.tags),
                    metadata=dict(item.metadata),
                )
                for item in items
            ]
        )

    # --- lock, sequencer ---------------------------------------------------------------------

    def _lock_args(self, request: pb.TryLockRequest | pb.UnlockRequest) -> None:
        if not request.resource_id:
            raise _invalid(f"ResourceId is empty in lock store {request.store_name}")
        if not request.lock_owner:
            raise _invalid(f"LockOwner is empty in lock store {request.store_name}")

    def TryLock(self, request: pb.TryLockRequest, context: grpc.ServicerContext) -> pb.TryLockResponse:
        self._lock_args(request)
        if request.expire <= 0:
            raise _invalid(f"Expire is not positive in lock store {request.store_name}")
        store = self.component("lock", request.store_name, "lock store")
        resource = self.key("lock", request.store_name, request.resource_id, context)
        return pb.TryLockResponse(success=bool(store.try_lock(resource, request.lock_owner, request.expire)))

    def Unlock(self, request: pb.UnlockRequest, context: grpc.ServicerContext) -> pb.UnlockResponse:
        self._lock_args(request)
        store = self.component("lock", request.store_name, "lock store")
        resource = self.key("lock", request.store_name, request.resource_id, context)
        status = store.unlock(resource, request.lock_owner)
        if not isinstance(status, UnlockStatus):
            status = UnlockStatus(int(status))
        return pb.UnlockResponse(status=status.value)

    def GetNextId(self, request: pb.GetNextIdRequest, context: grpc.ServicerContext) -> pb.GetNextIdResponse:
        if not request.key:
            raise _invalid(f"Key is empty in sequencer store {request.store_name}")
        if request.options.increment not in (pb.SequencerOptions.WEAK, pb.SequencerOptions.STRONG):
            raise _invalid("Options.Increment is illegal")
        store = self.component("sequencer", request.store_name, "sequencer store")
        return pb.GetNextIdResponse(
            next_id=int(store.next_id(self.key("sequencer", request.store_name, request.key, context)))
        )

    # --- state ---------------------------------------------------------------------------------

    def GetState(self, request: pb.GetStateRequest, context: grpc.ServicerContext) -> pb.GetStateResponse:
        store = self.component("state", request.store_name, "state store")
        item = store.get(self.key("state", request.store_name, request.key, context))
        if item is None:
            return pb.GetStateResponse()
        return pb.GetStateResponse(data=item.value, etag=item.etag)

    def GetBulkState(
        self, request: pb.GetBulkStateRequest, context: grpc.ServicerContext
    ) -> pb.GetBulkStateResponse:
        store = self.component("state", request.store_name, "state store")
        keys = list(request.keys)
        if not keys:
            return pb.GetBulkStateResponse()
        items = store.bulk_get([self.key("state", request.store_name, k, context) for k in keys])
        return pb.GetBulkStateResponse(
            items=[
                pb.BulkStateItem(key=k)
                if item is None
                else pb.BulkStateItem(key=k, data=item.value, etag=item.etag)
                for k, item in zip(keys, items, strict=True)
            ]
        )

    def SaveState(self, request: pb.SaveStateRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        store = self.component("state", request.store_name, "state store")
        writes = [
            (self.key("state", request.store_name, s.key, context), s.value, s.etag.value or None)
            for s in request.states
        ]
        for key, value, etag in writes:
            try:
                store.set(key, value, etag)
            except ETagMismatch as exc:
                raise ApiError(
                    grpc.StatusCode.ABORTED,
                    f"failed saving state in state store {request.store_name}: etag mismatch: {exc}",
                ) from exc
        return empty_pb2.Empty()

    def DeleteState(self, request: pb.DeleteStateRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        store = self.component("state", request.store_name, "state store")
        key = self.key("state", request.store_name, request.key, context)
        try:
            store.delete(key, request.etag.value or None)
        except ETagMismatch as exc:
            raise ApiError(
                grpc.StatusCode.ABORTED,
                f"failed deleting state with key {request.key}: etag mismatch: {exc}",
            ) from exc
        return empty_pb2.Empty()

    def ExecuteStateTransaction(
        self, request: pb.ExecuteStateTransactionRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        name = request.storeName
        store = self.component("state", name, "state store")
        features = store.features() if callable(getattr(store, "features", None)) else frozenset()
        if "TRANSACTIONAL" not in features:
            raise ApiError(grpc.StatusCode.UNIMPLEMENTED, f"state store {name} doesn't support transaction")
        ops = []
        for op in request.operations:
            if not op.HasField("request"):
                continue  # Layotto tolerates (skips) an operation without a request
            kind = op.operationType.lower()
            if kind not in ("upsert", "delete"):
                raise ApiError(
                    grpc.StatusCode.UNIMPLEMENTED, f"operation type {op.operationType} not supported"
                )
            item = op.request
            ops.append(
                StateOp(
                    OpKind.UPSERT if kind == "upsert" else OpKind.DELETE,
                    self.key("state", name, item.key, context),
                    item.value if kind == "upsert" else b"",
                    item.etag.value or None,
                )
            )
        if not ops:
            return empty_pb2.Empty()
        try:
            store.transact(ops)
        except ETagMismatch as exc:
            raise ApiError(
                grpc.StatusCode.ABORTED, f"error while executing state transaction: etag mismatch: {exc}"
            ) from exc
        return empty_pb2.Empty()

    # --- pub/sub, secrets -----------------------------------------------------------------------

    def PublishEvent(self, request: pb.PublishEventRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        if not request.topic:
            raise _invalid(f"topic is empty in pubsub {request.pubsub_name}")
        pubsub = self.component("pubsub", request.pubsub_name, "pubsub")
        metadata = dict(request.metadata)
        app_id = self.caller(context)
        if app_id:
            metadata.setdefault("source", app_id)
        pubsub.publish(
            request.topic, request.data, request.data_content_type or "application/octet-stream", metadata
        )
        return empty_pb2.Empty()

    def GetSecret(self, request: pb.GetSecretRequest, context: grpc.ServicerContext) -> pb.GetSecretResponse:
        store = self.component("secrets", request.store_name, "secret store")
        try:
            secret = store.get(request.key)
        except NotFound as exc:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND,
                f"failed getting secret with key {request.key} from secret store {request.store_name}: "
                "no such secret",
            ) from exc
        return pb.GetSecretResponse(data={str(k): str(v) for k, v in secret.items()})


# name: (request type, response type)
METHODS: Mapping[str, tuple[type[Message], type[Message]]] = {
    "SayHello": (pb.SayHelloRequest, pb.SayHelloResponse),
    "InvokeService": (pb.InvokeServiceRequest, pb.InvokeResponse),
    "GetConfiguration": (pb.GetConfigurationRequest, pb.GetConfigurationResponse),
    "TryLock": (pb.TryLockRequest, pb.TryLockResponse),
    "Unlock": (pb.UnlockRequest, pb.UnlockResponse),
    "GetNextId": (pb.GetNextIdRequest, pb.GetNextIdResponse),
    "GetState": (pb.GetStateRequest, pb.GetStateResponse),
    "GetBulkState": (pb.GetBulkStateRequest, pb.GetBulkStateResponse),
    "SaveState": (pb.SaveStateRequest, empty_pb2.Empty),
    "DeleteState": (pb.DeleteStateRequest, empty_pb2.Empty),
    "ExecuteStateTransaction": (pb.ExecuteStateTransactionRequest, empty_pb2.Empty),
    "PublishEvent": (pb.PublishEventRequest, empty_pb2.Empty),
    "GetSecret": (pb.GetSecretRequest, pb.GetSecretResponse),
}


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status an invoker's failure maps to (HostInvoker raises AbiStatus)."""
    status = getattr(exc, "status", None)
    if not isinstance(status, str):
        return None
    codes = {
        "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
        "BAD_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
        "LIMIT_EXCEEDED": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
        "UNIMPLEMENTED": grpc.StatusCode.UNIMPLEMENTED,
    }
    return codes.get(status, grpc.StatusCode.INTERNAL), str(exc)


def _wrap(name: str, impl: Callable[[Any, grpc.ServicerContext], Message]) -> Callable[..., Message]:
    def handler(request: Message, context: grpc.ServicerContext) -> Message:
        try:
            return impl(request, context)
        except ApiError as exc:
            _abort(context, exc.code, exc.message)
        except ETagMismatch as exc:
            _abort(context, grpc.StatusCode.ABORTED, f"{name}: etag mismatch: {exc}")
        except NotFound as exc:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"{name}: {exc}")
        except (ComponentError, OSError) as exc:
            log.warning("gRPC %s: component failure: %s", name, exc)
            _abort(context, grpc.StatusCode.INTERNAL, f"{name}: component failure: {exc}")
        except ValueError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {exc}")
        except Exception as exc:
            mapped = _status_of(exc)
            if mapped is not None:
                _abort(context, mapped[0], f"{name}: {mapped[1]}")
            log.exception("gRPC %s failed", name)
            _abort(context, grpc.StatusCode.INTERNAL, f"{name}: internal error: {type(exc).__name__}: {exc}")

    handler.__name__ = name
    return handler


class RuntimeApiServer:
    """Serves the Runtime API on a unix socket and, optionally, a TCP address."""

    def __init__(self, components: Any, invoker: Any, *, app_id: str = "", max_workers: int = 32) -> None:
        self.api = RuntimeApi(components, invoker, app_id)
        self.max_workers = max_workers
        self._server: grpc.Server | None = None
        self._unix_path: Path | None = None
        self._lock = threading.Lock()

    def handler(self) -> grpc.GenericRpcHandler:
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                _wrap(name, getattr(self.api, name)),
                request_deserializer=req.FromString,
                response_serializer=resp.SerializeToString,
            )
            for name, (req, resp) in METHODS.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def start(self, unix_path: Path, tcp_address: str | None = None) -> int:
        """Listen on ``unix_path`` (a stale socket file is replaced) and on ``tcp_address``
        (``host:port``, port 0 picks one); returns the bound TCP port (0 without TCP)."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError("the Runtime API server is already started")
            server = grpc.server(
                ThreadPoolExecutor(self.max_workers, thread_name_prefix="runtime-api"),
                handlers=[self.handler()],
                options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE),
                    ("grpc.max_send_message_length", MAX_MESSAGE),
                    ("grpc.so_reuseport", 0),
                ],
            )
            unix_path = Path(unix_path)
            unix_path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                unix_path.unlink()
            port = 0
            try:
                try:
                    server.add_insecure_port(f"unix:{os.path.abspath(unix_path)}")
                    if tcp_address:
                        port = server.add_insecure_port(tcp_address)
                        if not port:
                            raise OSError(f"Runtime API: cannot listen on {tcp_address}")
                except RuntimeError as exc:  # grpcio reports a failed bind as RuntimeError
                    raise OSError(f"Runtime API: cannot listen: {exc}") from exc
                server.start()
            except BaseException:
                server.stop(None)
                raise
            self._server = server
            self._unix_path = unix_path
            log.info(
                "Runtime API (gRPC) on unix:%s%s",
                unix_path,
                f" and {tcp_address} (port {port})" if port else "",
            )
            return port

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop listening; calls in flight get ``grace`` seconds to finish."""
        with self._lock:
            server, self._server = self._server, None
            path, self._unix_path = self._unix_path, None
        if server is not None:
            server.stop(grace).wait()
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
