"""Who a Runtime API caller is: the operator's tokens (``runtimeApi.apps`` of the node
policy, read by :func:`load_identities`) and :class:`Tokens`, which turns a call's bearer
token into its :class:`AppIdentity`. See docs/grpc-api.md ("The application's identity").
"""

from __future__ import annotations

import hashlib
import logging
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from layotto.host.errors import ApiError

log = logging.getLogger(__name__)

APP_ID_METADATA = "layotto-app-id"
AUTHORIZATION_METADATA = "authorization"
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
class Caller:
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


class Tokens:
    """The provisioned tokens, kept only as their SHA-256 digests."""

    def __init__(self, identities: Mapping[str, AppIdentity] | None = None) -> None:
        # A presented token is looked up by its digest.
        self._by_digest = {_token_digest(token): who for token, who in (identities or {}).items()}

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> AppIdentity:
        """The caller's identity, from the bearer token in a call's ``metadata``
        (UNAUTHENTICATED without a valid one). A ``layotto-app-id`` naming another app is
        PERMISSION_DENIED."""
        token = claimed = None
        for key, value in metadata or ():
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
