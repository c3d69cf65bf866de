"""``layotto_invoke`` on the host side: :class:`HostInvoker` calls another function on this
node in process, or a configured application over HTTP, as the caller's namespace allows
(docs/abi.md, docs/security.md).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from layotto.host.abi_context import MAX_VALUE, AbiContext
from layotto.host.errors import AbiStatus, Status


class HostInvoker:
    """``layotto_invoke``: another function on this node in process, or an app over HTTP."""

    def __init__(
        self,
        functions: Any,
        apps: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        may_invoke: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.functions = functions  # host.function_registry.FunctionRegistry
        self.apps = dict(apps or {})
        self.timeout = timeout
        # (caller's namespace, callee's) → allowed; None: only within one namespace
        self.may_invoke = may_invoke

    def _function(self, caller: AbiContext | None, target: str) -> Any:
        """The function ``target`` as the caller may reach it: a function id belongs to one
        namespace, and a caller reaches another namespace's only when the operator's policy
        says so (``invokeNamespaces``). The host itself (no namespace) reaches any."""
        if self.functions is None:
            return None
        namespace = caller.namespace if caller is not None else None
        if namespace is None:
            return self.functions.get(target)
        owner = self.functions.owner(target)
        if owner is None:
            return None
        if owner != namespace and (self.may_invoke is None or not self.may_invoke(namespace, owner)):
            return None
        return self.functions.get(target)

    def invoke(self, caller: AbiContext | None, target: str, method: str, data: bytes) -> bytes:
        fn = self._function(caller, target)
        if fn is not None:
            from layotto.host.function import Request

            path = b"/" + method.lstrip("/").encode() if method else b"/"
            request = Request(b"POST", path, b"", [(b"content-type", b"application/octet-stream")], data)
            response = fn.call_sync(request)
            if response.status == 404:
                raise AbiStatus(Status.NOT_FOUND, f"{target} answered 404")
            if response.status >= 400:
                reason = response.body[:200].decode(errors="replace").strip()
                raise AbiStatus(Status.INTERNAL_FAILURE, f"{target} answered {response.status}: {reason}")
            return response.body
        base = self.apps.get(target)
        if base is None:
            raise AbiStatus(Status.NOT_FOUND, f"no function or application with id {target!r}")
        url = base.rstrip("/") + "/" + method.lstrip("/")
        request = urllib.request.Request(url, data=data, method="POST", headers={"id": target})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read(MAX_VALUE + 1)
        except urllib.error.HTTPError as exc:
            raise AbiStatus(
                Status.NOT_FOUND if exc.code == 404 else Status.INTERNAL_FAILURE, f"{url}: HTTP {exc.code}"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise AbiStatus(Status.INTERNAL_FAILURE, f"{url}: {exc}") from exc
