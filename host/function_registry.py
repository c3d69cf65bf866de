"""Function id → the running functions serving it, each id owned by one namespace.

Several containers may serve one id (replicas of a Deployment, round robin between them),
but only from one namespace: the first function registered under an id makes its namespace
the id's owner until the last of them goes. A claim from another namespace is refused
(:class:`IdTaken`, which fails the container's start), so a pod in one namespace can never
take a share of another namespace's traffic by naming the same id.
"""

from __future__ import annotations

import itertools
from typing import Protocol

from layotto.host.errors import ModuleError


class Registered(Protocol):
    id: str
    namespace: str


class IdTaken(ModuleError):
    """A function id already served from another namespace."""


class FunctionRegistry:
    """The functions on this node by id (several per id: round robin)."""

    def __init__(self) -> None:
        self._by_id: dict[str, list] = {}
        self._rr = itertools.count()
        # The ids served by exactly one function, by their UTF-8 bytes, kept with _by_id: the
        # ingress finds the function of an ``id`` header here without decoding it (any other
        # header value goes the way of get()). Read it, never change it.
        self.sole: dict[bytes, Registered] = {}
        self._sole_by_id: dict[str, Registered] = {}  # the same, by id: get()'s common case

    def _index(self, function_id: str) -> None:
        group = self._by_id.get(function_id)
        fn = group[0] if group is not None and len(group) == 1 else None
        if fn is None:
            self._sole_by_id.pop(function_id, None)
        else:
            self._sole_by_id[function_id] = fn
        try:
            key = function_id.encode()
        except UnicodeEncodeError:  # (a lone surrogate: no header decodes to it)
            return
        if fn is None:
            self.sole.pop(key, None)
        else:
            self.sole[key] = fn

    def add(self, fn: Registered) -> None:
        group = self._by_id.get(fn.id)
        if group and group[0].namespace != fn.namespace:
            raise IdTaken(
                f"function id {fn.id!r} is already served from namespace {group[0].namespace!r}; "
                f"a function id belongs to one namespace (this container is in {fn.namespace!r})"
            )
        self._by_id.setdefault(fn.id, []).append(fn)
        self._index(fn.id)

    def remove(self, fn: Registered) -> None:
        group = self._by_id.get(fn.id)
        if group and fn in group:
            group.remove(fn)
            if not group:
                del self._by_id[fn.id]
            self._index(fn.id)

    def owner(self, function_id: str) -> str | None:
        """The namespace serving ``function_id``, or None."""
        group = self._by_id.get(function_id)
        return group[0].namespace if group else None

    def get(self, function_id: str, namespace: str | None = None):  # noqa: ANN201 - a Function
        """A function serving ``function_id`` (round robin), or None; with ``namespace``,
        only one of that namespace."""
        fn = self._sole_by_id.get(function_id)
        if fn is not None:  # (the id is served by one function)
            return fn if namespace is None or fn.namespace == namespace else None
        group = self._by_id.get(function_id)
        if not group:
            return None
        if namespace is not None and group[0].namespace != namespace:
            return None
        if len(group) == 1:
            return group[0]
        return group[next(self._rr) % len(group)]

    def all(self) -> list:
        return [fn for group in self._by_id.values() for fn in group]

    def __len__(self) -> int:
        return sum(len(g) for g in self._by_id.values())
