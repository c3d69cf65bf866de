"""``layotto_invoke`` on the host side: :class:`HostInvoker` calls another function on this
node in process, a configured application over HTTP, or a function on another node through
the operator's resolver (host/remote_invoke.py), as the caller's namespace allows (docs/abi.md,
docs/security.md).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from layotto.host import scheduler
from layotto.host.abi_context import MAX_VALUE, AbiContext
from layotto.host.errors import AbiStatus, Status
from layotto.host.messages import Request
from layotto.host.remote_invoke import (
    CALLER_HEADER,
    CALLER_NAMESPACE_HEADER,
    RemoteInvoker,
    check_target,
)


class HostInvoker:
    """``layotto_invoke``: another function on this node in process, an app over HTTP, or
    (with ``remote``) a function on another node."""

    def __init__(
        self,
        functions: Any,
        apps: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        may_invoke: Callable[[str, str], bool] | None = None,
        remote: RemoteInvoker | None = None,
    ) -> None:
        self.functions = functions  # host.function_registry.FunctionRegistry
        self.apps = dict(apps or {})
        self.timeout = timeout
        # (caller's namespace, callee's) → allowed; None: only within one namespace
        self.may_invoke = may_invoke
        self.remote = remote  # None: functions of this node only

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

    def invoke(
        self,
        caller: AbiContext | None,
        target: str,
        method: str,
        data: bytes,
        deadline: float | None = None,
    ) -> bytes:
        """Call ``target`` (a function id, or ``<id>.<namespace>`` for another namespace's
        function on another node) with ``data``; its answer's body. ``deadline`` (a
        time.monotonic() value; default: the caller's ``deadline`` attribute if it has one,
        else ``timeout`` from now) bounds a call that leaves the node."""
        fn = self._function(caller, target)
        if fn is not None:
            return self._call_local(fn, target, method, data)
        base = self.apps.get(target)
        if base is None:
            if self.remote is not None and (self.functions is None or self.functions.owner(target) is None):
                return self._remote(caller, target, method, data, deadline)
            raise AbiStatus(Status.NOT_FOUND, f"no function or application with id {target!r}")
        url = base.rstrip("/") + "/" + method.lstrip("/")
        request = urllib.request.Request(url, data=data, method="POST", headers={"id": target})
        try:
            with scheduler.network_wait(f"the application {target!r}"):
                scheduler.touch()  # sent (or about to be): a re-run would send it again
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read(MAX_VALUE + 1)
        except urllib.error.HTTPError as exc:
            raise AbiStatus(
                Status.NOT_FOUND if exc.code == 404 else Status.INTERNAL_FAILURE, f"{url}: HTTP {exc.code}"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise AbiStatus(Status.INTERNAL_FAILURE, f"{url}: {exc}") from exc

    @staticmethod
    def _call_local(fn: Any, target: str, method: str, data: bytes) -> bytes:
        """The call to ``fn``, a function of this node, in process."""
        path = b"/" + method.lstrip("/").encode() if method else b"/"
        request = Request(b"POST", path, b"", [(b"content-type", b"application/octet-stream")], data)
        response = fn.call_sync(request)
        if response.status == 404:
            raise AbiStatus(Status.NOT_FOUND, f"{target} answered 404")
        if response.status >= 400:
            reason = response.body[:200].decode(errors="replace").strip()
            raise AbiStatus(Status.INTERNAL_FAILURE, f"{target} answered {response.status}: {reason}")
        return response.body

    def _remote(
        self, caller: AbiContext | None, target: str, method: str, data: bytes, deadline: float | None
    ) -> bytes:
        """The call to an id no function on this node serves, through ``self.remote``:
        ``<id>`` is the caller's namespace's, ``<id>.<namespace>`` another's, which the
        operator's policy must let the caller reach before anything is sent."""
        assert self.remote is not None
        namespace = caller.namespace if caller is not None else None
        function_id, dot, named = target.rpartition(".")
        if not dot:
            function_id, named = target, namespace or ""
        if not named:
            raise AbiStatus(Status.NOT_FOUND, f"{target!r} names no namespace to look it up in")
        if namespace is not None and named != namespace:
            if self.may_invoke is None or not self.may_invoke(namespace, named):
                raise AbiStatus(
                    Status.NOT_FOUND,
                    f"no function {target!r}: namespace {namespace!r} may not invoke functions of "
                    f"namespace {named!r} (the operator's invokeNamespaces)",
                )
        local = self.functions.get(function_id, named) if self.functions is not None else None
        if local is not None:
            return self._call_local(local, function_id, method, data)
        checked = check_target(function_id, named)
        if deadline is None:
            deadline = getattr(caller, "deadline", None)
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        who: dict[str, str] = {}
        if caller is not None and namespace is not None:
            who[CALLER_NAMESPACE_HEADER] = namespace
            if caller.app_id and caller.app_id.isascii() and caller.app_id.isprintable():
                who[CALLER_HEADER] = caller.app_id
        # Never on the event loop, and a worker waiting here lets another run (host/scheduler.py).
        with scheduler.network_wait(f"an invoke of {checked.id!r} on another node"):
            scheduler.touch()  # the callee may change something: a re-run would repeat it
            return self.remote.invoke(checked, method, data, who, deadline)
