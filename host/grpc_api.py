"""The gRPC Runtime API for sidecar-mode applications: a Layotto-compatible subset of
``spec.proto.runtime.v1.Runtime`` over the components the functions reach through the
Runtime ABI. :class:`RuntimeApi` implements the RPCs, :class:`RuntimeApiServer` serves them
on a unix socket (and TCP when asked), every call authenticated by its bearer token
(host/grpc_identity.py).

See docs/grpc-api.md for the RPCs served, their semantics and the callers' identity.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from layotto.host import scoping
from layotto.host.components import OpKind, StateOp, UnlockStatus
from layotto.host.errors import (
    AbiStatus,
    ApiError,
    ComponentError,
    ETagMismatch,
    NotFound,
    Status,
)
from layotto.host.grpc_identity import (
    APP_ID_METADATA,
    AUTHORIZATION_METADATA,
    AppIdentity,
    Caller,
    Tokens,
    load_identities,
)
from layotto.host.protocol import runtime_api_pb2 as pb
from layotto.host.remote_invoke import RemoteError

log = logging.getLogger(__name__)

__all__ = [
    "APP_ID_METADATA",
    "AUTHORIZATION_METADATA",
    "DEFAULT_ADDRESS",
    "METHODS",
    "SERVICE",
    "AppIdentity",
    "RuntimeApi",
    "RuntimeApiServer",
    "grpc_status",
    "load_identities",
    "modified_key",
]

SERVICE = "spec.proto.runtime.v1.Runtime"
DEFAULT_ADDRESS = "127.0.0.1:34904"  # Layotto's gRPC listener (configs/config_standalone.json)
MAX_MESSAGE = 16 << 20
SEPARATOR = scoping.SEPARATOR


def _invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def modified_key(components: Any, kind: str, store: str, key: str, app_id: str) -> str:
    """``key`` as stored: ``host.scoping.state_key`` (the Runtime ABI's rule too)."""
    return scoping.state_key(components, kind, store, key, app_id)


class RuntimeApi:
    """The RPC implementations (request, context, caller) -> response; errors raise
    ApiError or a component exception, mapped to a status by the server's wrapper."""

    def __init__(
        self, components: Any, invoker: Any, identities: Mapping[str, AppIdentity] | None = None
    ) -> None:
        self.components = components
        self.invoker = invoker
        self.tokens = Tokens(identities)

    # --- helpers ---------------------------------------------------------------------

    def authenticate(self, context: grpc.ServicerContext) -> AppIdentity:
        """The caller's identity, from its bearer token (:meth:`Tokens.identify`)."""
        return self.tokens.identify(context.invocation_metadata())

    def component(self, kind: str, name: str, what: str) -> Any:
        if self.components is None:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, f"{what}s are not configured")
        try:
            return getattr(self.components, kind)(name)
        except (KeyError, LookupError, ComponentError) as exc:
            raise _invalid(f"{what} {name} is not found: {exc}") from exc

    def key(self, kind: str, store: str, key: str, who: AppIdentity) -> str:
        try:
            return scoping.state_key(self.components, kind, store, key, who.app_id, who.namespace)
        except scoping.ScopeError as exc:
            raise _invalid(str(exc)) from exc

    # --- hello, invocation -----------------------------------------------------------------

    def SayHello(
        self, request: pb.SayHelloRequest, context: grpc.ServicerContext, who: AppIdentity
    ) -> pb.SayHelloResponse:
        hello = f"hello, {request.name}" if request.name else "hello"
        response = pb.SayHelloResponse(hello=hello)
        if request.HasField("data"):
            response.data.CopyFrom(request.data)
        return response

    def InvokeService(
        self, request: pb.InvokeServiceRequest, context: grpc.ServicerContext, who: AppIdentity
    ) -> pb.InvokeResponse:
        if not request.id:
            raise _invalid("the invocation target id is empty")
        if self.invoker is None:
            raise ApiError(grpc.StatusCode.UNIMPLEMENTED, "service invocation is not configured")
        message = request.message
        # The caller reaches functions of its own namespace only (HostInvoker scopes by it).
        caller = Caller(who.namespace, who.app_id)
        left = context.time_remaining()  # the client's deadline travels to another node
        deadline = None if left is None else time.monotonic() + left
        try:
            body = self.invoker.invoke(
                caller, request.id, message.method, message.data.value, deadline=deadline
            )
        except RemoteError as exc:  # a call to another node: 404, 503 or 504, naming the address
            code = _HTTP_TO_GRPC.get(exc.http_status, grpc.StatusCode.INTERNAL)
            raise ApiError(code, f"InvokeService: {exc}") from exc
        return pb.InvokeResponse(data=any_pb2.Any(value=bytes(body)), content_type="application/octet-stream")

    # --- configuration -------------------------------------------------------------------

    def GetConfiguration(
        self, request: pb.GetConfigurationRequest, context: grpc.ServicerContext, who: AppIdentity
    ) -> pb.GetConfigurationResponse:
        self.component("configuration", request.store_name, "configuration store")
        try:
            items = scoping.get_configuration(
                self.components,
                request.store_name,
                who.namespace,
                who.app_id,
                list(request.keys),
                group=request.group.strip(),
                label=request.label.strip(),
            )
        except scoping.ScopeError as exc:
            raise _invalid(str(exc)) from exc
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

    def TryLock(
        self, request: pb.TryLockRequest, context: grpc.ServicerContext, who: AppIdentity
    ) -> pb.TryLockResponse:
        self._lock_args(request)
        if request.expire <= 0:
            raise _invalid(f"Expire is not positive in lock store {request.store_name}")
        store = self.component("lock", request.store_name, "lock store")
        resource = self.key("lock", request.store_name, request.resource_id, who)
        return pb.TryLockResponse(success=bool(store.try_lock(resource, request.lock_owner, request.expire)))

    def Unlock(
        self, request: pb.UnlockRequest, context: grpc.ServicerContext, who: AppIdentity
    ) -> pb.UnlockResponse:
        self._lock_args(request)
        store = self.component("lock", request.store_name, "lock store")
        resource = self.key("lock", request.store_name, request.resource_id, who)
        status = store.unlock(resource, request.lock_owner)
        if not isinstance(status, UnlockStatus):
            status = UnlockStatus(int(status))
        return pb.UnlockResponse(status=status.value)

    def GetNextId(
        self, request: pb.GetNextIdRequest, context: grpc.ServicerContext, who: AppIdentity
    ) -> pb.GetNextIdResponse:
        if not request.key:
            raise _invalid(f"Key is empty in sequencer store {request.store_name}")
        if request.options.increment not in (pb.SequencerOptions.WEAK, pb.SequencerOptions.STRONG):
            raise _invalid("Options.Increment is illegal")
        store = self.component("sequencer", request.store_name, "sequencer store")
        return pb.GetNextIdResponse(
            next_id=int(store.next_id(self.key("sequencer", request.store_name, request.key, who)))
        )

    # --- state ---------------------------------------------------------------------------------

    def GetState(
        self, request: pb.GetStateRequest, context: grpc.ServicerContext, who: AppIdentity
    ) -> pb.GetStateResponse:
        store = self.component("state", request.store_name, "state store")
        item = store.get(self.key("state", request.store_name, request.key, who))
        if item is None:
            return pb.GetStateResponse()
        return pb.GetStateResponse(data=item.value, etag=item.etag)

    def GetBulkState(
        self, request: pb.GetBulkStateRequest, context: grpc.ServicerContext, who: AppIdentity
    ) -> pb.GetBulkStateResponse:
        store = self.component("state", request.store_name, "state store")
        keys = list(request.keys)
        if not keys:
            return pb.GetBulkStateResponse()
        items = store.bulk_get([self.key("state", request.store_name, k, who) for k in keys])
        return pb.GetBulkStateResponse(
            items=[
                pb.BulkStateItem(key=k)
                if item is None
                else pb.BulkStateItem(key=k, data=item.value, etag=item.etag)
                for k, item in zip(keys, items, strict=True)
            ]
        )

    def SaveState(
        self, request: pb.SaveStateRequest, context: grpc.ServicerContext, who: AppIdentity
    ) -> empty_pb2.Empty:
        store = self.component("state", request.store_name, "state store")
        writes = [
            (self.key("state", request.store_name, s.key, who), s.value, s.etag.value or None)
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

    def DeleteState(
        self, request: pb.DeleteStateRequest, context: grpc.ServicerContext, who: AppIdentity
    ) -> empty_pb2.Empty:
        store = self.component("state", request.store_name, "state store")
        key = self.key("state", request.store_name, request.key, who)
        try:
            store.delete(key, request.etag.value or None)
        except ETagMismatch as exc:
            raise ApiError(
                grpc.StatusCode.ABORTED,
                f"failed deleting state with key {request.key}: etag mismatch: {exc}",
            ) from exc
        return empty_pb2.Empty()

    def ExecuteStateTransaction(
        self, request: pb.ExecuteStateTransactionRequest, context: grpc.ServicerContext, who: AppIdentity
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
                    self.key("state", name, item.key, who),
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

    def PublishEvent(
        self, request: pb.PublishEventRequest, context: grpc.ServicerContext, who: AppIdentity
    ) -> empty_pb2.Empty:
        if not request.topic:
            raise _invalid(f"topic is empty in pubsub {request.pubsub_name}")
        pubsub = self.component("pubsub", request.pubsub_name, "pubsub")
        try:
            topic = scoping.scoped_topic(self.components, request.pubsub_name, who.namespace, request.topic)
        except scoping.ScopeError as exc:
            raise _invalid(str(exc)) from exc
        metadata = dict(request.metadata)
        metadata["source"] = who.app_id  # the authenticated app, whatever the request says
        pubsub.publish(topic, request.data, request.data_content_type or "application/octet-stream", metadata)
        return empty_pb2.Empty()

    def GetSecret(
        self, request: pb.GetSecretRequest, context: grpc.ServicerContext, who: AppIdentity
    ) -> pb.GetSecretResponse:
        store = self.component("secrets", request.store_name, "secret store")
        try:
            name = scoping.scoped_secret(self.components, request.store_name, who.namespace, request.key)
        except scoping.ScopeError as exc:
            raise _invalid(str(exc)) from exc
        try:
            secret = store.get(name)
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


# The one mapping from the host's exceptions to gRPC status codes (an ApiError carries its
# own): most specific first; a status the invoker raised maps by ``ABI_TO_GRPC``.
GRPC_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ETagMismatch, grpc.StatusCode.ABORTED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ComponentError, grpc.StatusCode.INTERNAL),
    (OSError, grpc.StatusCode.INTERNAL),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # ScopeError included
)
_HTTP_TO_GRPC = {  # how a call to another node failed (host/remote_invoke.py)
    404: grpc.StatusCode.NOT_FOUND,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
ABI_TO_GRPC: Mapping[Status, grpc.StatusCode] = {
    Status.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Status.BAD_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Status.LIMIT_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Status.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Status.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
}


def grpc_status(name: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message RPC ``name`` answers with when it raised ``exc``."""
    if isinstance(exc, ApiError):
        return exc.code, exc.message
    if isinstance(exc, AbiStatus):  # from the invoker (HostInvoker)
        return ABI_TO_GRPC.get(exc.status, grpc.StatusCode.INTERNAL), f"{name}: {exc}"
    for kind, code in GRPC_CODES:
        if isinstance(exc, kind):
            if isinstance(exc, ETagMismatch):
                return code, f"{name}: etag mismatch: {exc}"
            if code is grpc.StatusCode.INTERNAL:
                log.warning("gRPC %s: component failure: %s", name, exc)
                return code, f"{name}: component failure: {exc}"
            return code, f"{name}: {exc}"
    log.exception("gRPC %s failed", name)
    return grpc.StatusCode.INTERNAL, f"{name}: internal error: {type(exc).__name__}: {exc}"


def _wrap(
    name: str,
    impl: Callable[[Any, grpc.ServicerContext, AppIdentity], Message],
    authenticate: Callable[[grpc.ServicerContext], AppIdentity],
) -> Callable[..., Message]:
    """The grpcio handler for ``impl``: every call is authenticated first, on every listener."""

    def handler(request: Message, context: grpc.ServicerContext) -> Message:
        try:
            return impl(request, context, authenticate(context))
        except Exception as exc:
            _abort(context, *grpc_status(name, exc))

    handler.__name__ = name
    return handler


class RuntimeApiServer:
    """Serves the Runtime API on a unix socket (mode 0600, or 0660 with ``socket_group``)
    and, when asked, a TCP address; every call on either needs a provisioned bearer token
    (``identities``: token → :class:`AppIdentity`, see :func:`load_identities`)."""

    def __init__(
        self,
        components: Any,
        invoker: Any,
        *,
        identities: Mapping[str, AppIdentity] | None = None,
        max_workers: int = 32,
        max_concurrent_rpcs: int | None = None,
    ) -> None:
        self.api = RuntimeApi(components, invoker, identities)
        self.max_workers = max_workers
        # Calls beyond this (running plus queued) are refused with RESOURCE_EXHAUSTED
        # instead of queueing without bound behind the worker threads.
        self.max_concurrent_rpcs = max_concurrent_rpcs or 4 * max_workers
        self._server: grpc.Server | None = None
        self._unix_path: Path | None = None
        self._lock = threading.Lock()

    def handler(self) -> grpc.GenericRpcHandler:
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                _wrap(name, getattr(self.api, name), self.api.authenticate),
                request_deserializer=req.FromString,
                response_serializer=resp.SerializeToString,
            )
            for name, (req, resp) in METHODS.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def start(
        self, unix_path: Path, tcp_address: str | None = None, *, socket_group: str | None = None
    ) -> int:
        """Listen on ``unix_path`` (a stale socket file is replaced) and, only when given,
        on ``tcp_address`` (``host:port``, port 0 picks one); returns the bound TCP port (0
        without TCP). The socket file is created owner-only (mode 0600); with
        ``socket_group`` (a group name or number) it belongs to that group, mode 0660."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError("the Runtime API server is already started")
            gid = _group_id(socket_group) if socket_group else None
            server = grpc.server(
                ThreadPoolExecutor(self.max_workers, thread_name_prefix="runtime-api"),
                handlers=[self.handler()],
                options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE),
                    ("grpc.max_send_message_length", MAX_MESSAGE),
                    ("grpc.so_reuseport", 0),
                ],
                maximum_concurrent_rpcs=self.max_concurrent_rpcs,
            )
            unix_path = Path(unix_path)
            unix_path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                unix_path.unlink()
            port = 0
            try:
                try:
                    # The socket file is born owner-only (no window in which another user
                    # could connect), then given its final mode.
                    old_umask = os.umask(0o077)
                    try:
                        server.add_insecure_port(f"unix:{os.path.abspath(unix_path)}")
                    finally:
                        os.umask(old_umask)
                    if gid is not None:
                        os.chown(unix_path, -1, gid)
                        os.chmod(unix_path, 0o660)
                    else:
                        os.chmod(unix_path, 0o600)
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
                "Runtime API (gRPC) on unix:%s (mode %s)%s",
                unix_path,
                "0660" if gid is not None else "0600",
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


def _group_id(group: str) -> int:
    """The id of group ``group`` (a name or a number); ValueError when there is none."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"Runtime API socket group {group!r} does not exist") from None
