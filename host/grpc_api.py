"""The gRPC Runtime API for sidecar-mode applications: a Layotto-compatible subset.

Non-wasm applications on the node reach the same components the functions reach through
the Runtime ABI, over Layotto's own gRPC API: package ``spec.proto.runtime.v1``, service
``Runtime`` (``host/protocol/runtime_api.proto`` declares the served messages with
Layotto's field numbers), so Layotto's SDKs and generated stubs work unchanged. Served:
SayHello, InvokeService, GetConfiguration, TryLock, Unlock, GetNextId, GetState,
GetBulkState, SaveState, DeleteState, ExecuteStateTransaction, PublishEvent, GetSecret.
Any other Layotto RPC answers UNIMPLEMENTED.

The server is grpcio's synchronous server on its own bounded thread pool (and a bound on
calls in flight: beyond it, RESOURCE_EXHAUSTED): component calls block (SQLite, Redis, a
function invoked in process), so they never run on the host's event loop.

**Who is calling.** The node host is a boundary between tenants, so a caller's word about
itself counts for nothing. Every call, on every listener, carries the gRPC metadata
``authorization: Bearer <token>``, a token the node operator provisioned for one app of
one namespace (``runtimeApi.apps`` of the node policy, read by :func:`load_identities`);
the server keeps only the tokens' SHA-256 digests. A call without a valid token is
UNAUTHENTICATED. The token's :class:`AppIdentity` decides everything: the app id
``<namespace>.<app>`` that prefixes the caller's keys (the form functions' app ids take, so
a sidecar provisioned as app ``A`` of namespace ``N`` shares the keys of the functions of
``N`` whose app is ``A``), its pub/sub topics, secrets and configuration items (see
``host.scoping``), the functions InvokeService reaches (only those of its namespace), and
the ``source`` of its events. Layotto's ``layotto-app-id`` metadata is not trusted: naming
an app other than the token's is PERMISSION_DENIED.

**Where it listens.** On its unix socket, created owner-only (mode 0600; 0660 and the
operator's group with ``socket_group``), so other users of the node cannot even connect.
A TCP address (Layotto's default is ``127.0.0.1:34904``) only when the daemon is told to;
the same token check applies there.

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
- **Scoping** (``host.scoping``, the Runtime ABI's rule too). State, lock and sequencer
  keys, and configuration items, are per app: the store's ``keyPrefix`` metadata ``appid``
  (the default) prefixes ``<app id>||``, ``name`` prefixes ``<store>||``, ``none`` leaves
  keys alone. Pub/sub topics are per namespace (``<namespace>||<topic>`` unless the
  component says ``topicPrefix: none``), and so are secrets (``<namespace>/<name>`` unless
  the store says ``secretPrefix: none``). A key or topic containing ``||``, or a secret
  name containing ``/``, is INVALID_ARGUMENT.
- PublishEvent publishes ``data`` as is (no CloudEvents envelope: the host's subscribers
  are functions and component-level handlers that take raw bytes), with
  ``data_content_type`` (default ``application/octet-stream``) and the request's metadata,
  with ``source: <app id>`` of the token's app (a ``source`` in the request is replaced).
  An empty topic is INVALID_ARGUMENT.
- TryLock needs a resource id, an owner and a positive expiry (INVALID_ARGUMENT
  otherwise); Unlock answers Layotto's status enum (SUCCESS, LOCK_UNEXIST,
  LOCK_BELONG_TO_OTHERS, INTERNAL_ERROR).
- GetNextId is always STRONG (strictly increasing per key); the WEAK option is served the
  same way.
- GetConfiguration answers the caller's items for the keys (all of its items when none),
  group and label; ``app_id`` and ``subscribe_update`` are ignored (there is no app
  callback).
- GetSecret answers the secret's key/value map; an unknown secret is NOT_FOUND (Layotto
  reports component errors as INTERNAL; ours can tell "missing" apart).
- InvokeService calls function ``id`` of the caller's namespace on this node (or a
  configured application) through the host's invoker: method ``message.method``, body
  ``message.data.value``; the answer is ``InvokeResponse{data: Any{value: <body>},
  content_type}`` (an untyped Any, as Layotto builds it). A target that does not exist
  (or is another namespace's function) is NOT_FOUND.
- SayHello answers ``hello: "hello, <name>"`` (just ``"hello"`` without a name) and
  echoes ``data``, as Layotto's helloworld component configured with "hello" does; there
  are no hello components here, so every ``service_name`` is served.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from layotto.host.protocol import runtime_api_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "spec.proto.runtime.v1.Runtime"
DEFAULT_ADDRESS = "127.0.0.1:34904"  # Layotto's gRPC listener (configs/config_standalone.json)
APP_ID_METADATA = "layotto-app-id"
AUTHORIZATION_METADATA = "authorization"
MAX_MESSAGE = 16 << 20
SEPARATOR = scoping.SEPARATOR
MIN_TOKEN_LENGTH = 16
UNAUTHENTICATED_MESSAGE = (
    "the Runtime API needs a bearer token the node operator provisioned for the app "
    "(gRPC metadata 'authorization: Bearer <token>'; the operator lists it under "
    "runtimeApi.apps in the node policy)"
)
# A namespace is one DNS-label-like word (no dots: "<namespace>.<app>" must split one way).
_NAMESPACE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?")
_APP = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


@dataclass(frozen=True)
class AppIdentity:
    """Who a Runtime API caller is: app ``app`` of namespace ``namespace``, as its bearer
    token says (never as the caller says)."""

    namespace: str
    app: str

    @property
    def app_id(self) -> str:
        """The app id, in the form functions' app ids take: ``<namespace>.<app>``."""
        return f"{self.namespace}.{self.app}"


@dataclass(frozen=True)
class _Caller:
    """The invoker's view of a Runtime API caller (HostInvoker reads ``namespace``)."""

    namespace: str
    app_id: str


def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_identities(items: list[dict]) -> dict[str, AppIdentity]:
    """Token → identity, from the operator's list (``runtimeApi.apps`` of the node policy)::

        [{"namespace": "shop", "app": "cart", "token": "..."},
         {"namespace": "shop", "app": "billing", "tokenFile": "/etc/layotto/tokens/billing"}]

    Each entry has ``namespace``, ``app`` and exactly one of ``token`` (the token itself)
    or ``tokenFile`` (a file holding it; surrounding whitespace is ignored). A token is at
    least 16 characters and belongs to one app. Raises ValueError naming the bad entry."""
    if items is None:
        return {}
    if not isinstance(items, list):
        raise ValueError(
            f"runtimeApi.apps must be a list of {{namespace, app, token|tokenFile}}, not {items!r}"
        )
    identities: dict[str, AppIdentity] = {}
    for index, entry in enumerate(items):
        where = f"runtimeApi.apps[{index}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: expected a mapping with namespace, app and token or tokenFile")
        unknown = sorted(str(k) for k in set(entry) - {"namespace", "app", "token", "tokenFile"})
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown} (known: namespace, app, token, tokenFile)")
        namespace, app = entry.get("namespace"), entry.get("app")
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ValueError(
                f"{where}: namespace must be letters, digits, '-' or '_' (no dots), not {namespace!r}"
            )
        if not isinstance(app, str) or not _APP.fullmatch(app):
            raise ValueError(f"{where}: app must be letters, digits, '.', '-' or '_', not {app!r}")
        where = f"{where} ({namespace}.{app})"
        if ("token" in entry) == ("tokenFile" in entry):
            raise ValueError(f"{where}: give exactly one of token or tokenFile")
        if "token" in entry:
            token = entry["token"]
            if not isinstance(token, str):
                raise ValueError(f"{where}: token must be a string")
        else:
            path = entry["tokenFile"]
            if not isinstance(path, str) or not path:
                raise ValueError(f"{where}: tokenFile must be a file path")
            try:
                token = Path(path).read_text().strip()
                mode = Path(path).stat().st_mode
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"{where}: cannot read tokenFile {path}: {exc}") from exc
            if mode & (stat.S_IROTH | stat.S_IWOTH):
                log.warning("Runtime API token file %s is readable by every user: chmod 0600 it", path)
        if len(token) < MIN_TOKEN_LENGTH or token != token.strip():
            raise ValueError(
                f"{where}: the token must be at least {MIN_TOKEN_LENGTH} characters without surrounding "
                "whitespace (make one with: openssl rand -hex 32)"
            )
        if token in identities:
            raise ValueError(f"{where}: the same token is already given to {identities[token].app_id}")
        identities[token] = AppIdentity(namespace, app)
    return identities


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
        # Only the tokens' digests are kept; a presented token is looked up by its digest.
        self._by_digest = {_token_digest(token): who for token, who in (identities or {}).items()}

    # --- helpers ---------------------------------------------------------------------

    def authenticate(self, context: grpc.ServicerContext) -> AppIdentity:
        """The caller's identity, from its bearer token (UNAUTHENTICATED without a valid one).
        A ``layotto-app-id`` naming another app is PERMISSION_DENIED."""
        token = claimed = None
        for key, value in context.invocation_metadata() or ():
            text = value if isinstance(value, str) else value.decode(errors="replace")
            if key == AUTHORIZATION_METADATA and token is None:
                scheme, _, rest = text.strip().partition(" ")
                token = rest.strip() if scheme.lower() == "bearer" else ""
            elif key == APP_ID_METADATA:
                claimed = text
        who = self._by_digest.get(_token_digest(token)) if token else None
        if who is None:
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        if claimed is not None and claimed not in ("", who.app_id):
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{APP_ID_METADATA} {claimed!r} is not the app of this token ({who.app_id})",
            )
        return who

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
        caller = _Caller(who.namespace, who.app_id)
        body = self.invoker.invoke(caller, request.id, message.method, message.data.value)
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
