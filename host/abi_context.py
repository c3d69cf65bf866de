"""The Runtime ABI's caller: :class:`AbiContext`, what a host function knows of the guest
that called it, with every guest pointer and length checked against its linear memory.

Whoever calls into a guest makes its context the caller for the call
(``abi_linker.calling``); the rules are in docs/abi.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import wasmtime

from layotto.abi import spec as abi_spec
from layotto.host import _handler, capi, scheduler, scoping
from layotto.host.components import ConfigItem
from layotto.host.errors import AbiStatus, ComponentDenied, ComponentError, Status

SPEC = abi_spec.load()
S = SPEC.status  # status name -> code (errors.Status is the typed form)
MAX_KEY = SPEC.limits.get("max_key", 1024)
MAX_VALUE = SPEC.limits.get("max_value", 4 << 20)
KNOWN_CAPABILITIES = frozenset(SPEC.capabilities)

_U32 = struct.Struct("<I")
MAX_REMEMBERED_STORES = 32  # key prefixes an AbiContext keeps, by (kind, store)
# What giving a result can fail for besides the allocator (host/_handler.c GIVE_*).
_GIVE_FAILURES = {
    2: "the guest allocator returned 0",
    3: "the guest allocator returned a buffer outside linear memory",
}

BUFFER_REQUEST_BODY = 0
BUFFER_RESPONSE_BODY = 1
BUFFER_CALL_DATA = 8
# Of proxy-wasm's BufferType values, the ones this host serves (layotto_abi.yaml); any
# other type is BAD_ARGUMENT, never a new host-side buffer.
BUFFER_TYPES = frozenset({BUFFER_REQUEST_BODY, BUFFER_RESPONSE_BODY, BUFFER_CALL_DATA})
# All the buffers of one instance together hold at most this much (a largest request body
# and a largest response); a write past it is LIMIT_EXCEEDED. The host empties them after
# every request.
BUFFER_LIMIT = 2 * MAX_VALUE


def _outside(ptr: int, length: int) -> AbiStatus:
    return AbiStatus(Status.INVALID_MEMORY_ACCESS, f"[{ptr:#x}, +{length}) is outside linear memory")


def _too_long(length: int, limit: int) -> AbiStatus:
    return AbiStatus(Status.LIMIT_EXCEEDED, f"{length} bytes exceeds the limit of {limit}")


_NOT_UTF8 = "not valid UTF-8"


def _guest_failure(code: int, a: Any, b: Any) -> AbiStatus:
    """What a :class:`_handler.Guest` method refused, as the Python methods say it (the
    codes are host/_handler.c's FAIL_*); an allocator's trap or error is raised as is."""
    if code == 0:
        return _outside(a, b)
    if code == 1:
        return _too_long(a, b)
    if code == 2:
        return AbiStatus(Status.BAD_ARGUMENT, _NOT_UTF8)
    if code == 3:
        return AbiStatus(Status.LIMIT_EXCEEDED, f"a result of {a} bytes exceeds {b}")
    if code == 4:
        return AbiStatus(Status.INVALID_MEMORY_ACCESS, _GIVE_FAILURES[a])
    capi.raise_failure(a, b)  # 5: the guest allocator failed or trapped
    return AbiStatus(Status.INTERNAL_FAILURE, "the guest allocator failed")


class OverNetwork:
    """A component that waits on the network (Redis, Kubernetes): each of its calls is a
    :func:`~layotto.host.scheduler.network_wait` (never on the event loop, and a worker
    waiting on it lets another run)."""

    __slots__ = ("_component", "_what")

    def __init__(self, component: Any, what: str) -> None:
        self._component = component
        self._what = what

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._component, name)
        if not callable(attr):
            return attr
        what = self._what

        def call(*args: Any, **kwargs: Any) -> Any:
            with scheduler.network_wait(what):
                return attr(*args, **kwargs)

        return call


class GuestMemory(Protocol):
    def view(self) -> memoryview: ...


class Invoker(Protocol):
    def invoke(self, caller: AbiContext, target: str, method: str, data: bytes) -> bytes: ...


@dataclass
class AbiContext:
    """Everything a host function needs to know about its caller."""

    name: str
    memory: GuestMemory
    allocate: Callable[[int], int]
    capabilities: frozenset[str]
    app_id: str
    components: Any  # host.components.registry.Components (or None: every component call fails)
    invoker: Invoker | None = None
    logger: Callable[[str, str], None] | None = None
    namespace: str | None = None  # the caller's namespace (None: not scoped, host-internal)
    buffers: dict[int, bytearray] = field(default_factory=dict)  # proxy-wasm's, per request
    buffer_limit: int = BUFFER_LIMIT  # what ``buffers`` may hold in all
    deadline: float | None = None  # time.monotonic() when the current call's time is up
    # (store context, memory, allocator) addresses of a store made through the C API: guest
    # memory is then read, written and given to in host/_handler.c, without a memoryview.
    raw: tuple[int, int, int] | None = None
    owner: Any = None  # what holds ``raw``'s Store (_handler.Instance, RawStore): once freed, refused
    _view: memoryview | None = field(default=None, repr=False)
    _prefixes: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)  # state_key's

    def __post_init__(self) -> None:
        if self.raw is not None:
            # A store made through the C API: its memory is read, written and given to by
            # a _handler.Guest, whose methods take the place of the Python ones below (the
            # same checks, statuses and messages; no memoryview, no Python frame per call).
            guest = _handler.guest(*self.raw, _guest_failure, MAX_KEY, MAX_VALUE, self.owner)
            self.read = guest.read  # type: ignore[method-assign]
            self.read_str = guest.read_str  # type: ignore[method-assign]
            self.check_writable = guest.check_writable  # type: ignore[method-assign]
            self.check_out = guest.check_out  # type: ignore[method-assign]
            self.write = guest.write  # type: ignore[method-assign]
            self.give = guest.give  # type: ignore[method-assign]

    # --- guest memory, checked (through a memoryview: nanoprocesses) --------------------

    def view(self) -> memoryview:
        """The guest's memory, fetched once per host call (until the guest allocates)."""
        view = self._view
        if view is None:
            view = self._view = self.memory.view()
        return view

    def reset_view(self) -> None:
        self._view = None

    def guest_alloc(self, size: int) -> int:
        addr = self.allocate(size)
        self._view = None  # the allocator may have grown (moved) the memory
        return addr

    def read(self, ptr: int, length: int, limit: int = MAX_VALUE) -> bytes:
        if length > limit:
            raise _too_long(length, limit)
        view = self._view if self._view is not None else self.view()
        if not (0 <= ptr and 0 <= length <= len(view) - ptr):
            raise _outside(ptr, length)
        return bytes(view[ptr : ptr + length])

    def read_str(self, ptr: int, length: int) -> str:
        try:
            return self.read(ptr, length, MAX_KEY).decode()
        except UnicodeDecodeError as exc:
            raise AbiStatus(Status.BAD_ARGUMENT, _NOT_UTF8) from exc

    def check_writable(self, ptr: int, length: int) -> None:
        view = self._view if self._view is not None else self.view()
        if ptr < 0 or length < 0 or ptr + length > len(view):
            raise _outside(ptr, length)

    def check_out(self, *ptrs: int) -> None:
        """Each of ``ptrs`` is an out-pointer: 4 bytes of linear memory to write a result to."""
        last = len(self.view()) - 4
        for ptr in ptrs:
            if not 0 <= ptr <= last:
                raise _outside(ptr, 4)

    def write(self, ptr: int, data: bytes) -> None:
        view = self.view()
        if ptr < 0 or ptr + len(data) > len(view):
            raise _outside(ptr, len(data))
        view[ptr : ptr + len(data)] = data

    def give(self, ptr_ptr: int, len_ptr: int, data: bytes, *, checked: bool = False) -> None:
        """Copy ``data`` into a guest-allocated buffer and return it through the out-pointers
        (``checked``: the caller has checked them already in this host call)."""
        n = len(data)
        if n > MAX_VALUE:
            raise AbiStatus(Status.LIMIT_EXCEEDED, f"a result of {n} bytes exceeds {MAX_VALUE}")
        if not checked:
            self.check_out(ptr_ptr, len_ptr)
        addr = 0
        if n:
            addr = self.guest_alloc(n)
            if not addr:
                raise AbiStatus(Status.INVALID_MEMORY_ACCESS, "the guest allocator returned 0")
            self.write(addr, data)
        view = self.view()  # the out-pointers were checked: memory only grows
        _U32.pack_into(view, ptr_ptr, addr)
        _U32.pack_into(view, len_ptr, n)

    # --- components ---------------------------------------------------------------------

    def component(self, kind: str, name: str, *, changes: bool = False) -> Any:
        """The component ``name`` of ``kind`` as this caller may use it. ``changes``: the
        caller is about to change something through it (a re-run of the call would repeat
        that: host/scheduler.py). One that waits on the network comes wrapped in
        :class:`OverNetwork`."""
        if self.components is None:
            raise AbiStatus(Status.INTERNAL_FAILURE, "no components are configured")
        try:
            found = getattr(self.components, kind)(name)
        except ComponentDenied as exc:  # the operator's policy does not grant it
            raise AbiStatus(Status.PERMISSION_DENIED, str(exc)) from exc
        except (KeyError, LookupError, ComponentError) as exc:
            raise AbiStatus(Status.NOT_FOUND, f"no {kind} component named {name!r}") from exc
        if changes:
            scheduler.touch()
        if getattr(found, "in_process", False):
            return found
        return OverNetwork(found, f"{kind} component {name!r}")

    def state_key(self, store: str, key: str, kind: str = "state") -> str:
        """``key`` as stored: the shared rule of ``host.scoping.state_key`` (per app unless
        the store says ``keyPrefix: name`` or ``none``). A store's prefix is looked up once
        per context: components and their metadata are fixed once built, and so are this
        caller's app id and namespace (a few stores at most are remembered: the names come
        from the guest)."""
        try:
            scoping.check_key(key)
        except scoping.ScopeError as exc:
            raise AbiStatus(Status.BAD_ARGUMENT, str(exc)) from exc
        prefixes = self._prefixes
        prefix = prefixes.get((kind, store))
        if prefix is None:
            prefix = scoping.key_prefix(self.components, kind, store, self.app_id, self.namespace)
            if len(prefixes) < MAX_REMEMBERED_STORES:
                prefixes[(kind, store)] = prefix
        return prefix + key

    def topic(self, pubsub_name: str, topic: str) -> str:
        """The component topic for ``topic``: per namespace (``host.scoping.scoped_topic``)."""
        try:
            return scoping.scoped_topic(self.components, pubsub_name, self.namespace, topic)
        except scoping.ScopeError as exc:
            raise AbiStatus(Status.BAD_ARGUMENT, str(exc)) from exc

    def secret_name(self, store: str, name: str) -> str:
        """The store's name for secret ``name``: per namespace (``host.scoping.scoped_secret``)."""
        try:
            return scoping.scoped_secret(self.components, store, self.namespace, name)
        except scoping.ScopeError as exc:
            raise AbiStatus(Status.BAD_ARGUMENT, str(exc)) from exc

    def configuration(self, store: str, keys: list[str], group: str, label: str) -> list[ConfigItem]:
        """This app's configuration items (``host.scoping.get_configuration``)."""
        found = self.component("configuration", store)  # NOT_FOUND for an unknown store
        waits = (
            scheduler.network_wait(f"configuration store {store!r}")
            if isinstance(found, OverNetwork)
            else contextlib.nullcontext()
        )
        try:
            with waits:
                return scoping.get_configuration(
                    self.components, store, self.namespace, self.app_id, keys, group=group, label=label
                )
        except scoping.ScopeError as exc:
            raise AbiStatus(Status.BAD_ARGUMENT, str(exc)) from exc

    def note(self, line: str) -> None:
        if self.logger is not None:
            self.logger("abi", line)


def is_known_import(module: str, name: str) -> bool:
    return SPEC.lookup(module, name) is not None


def parse_capabilities(value: str | None) -> frozenset[str]:
    """The capabilities a pod grants (annotation ``layotto.io/capabilities``)."""
    granted = set(SPEC.default_capabilities)
    if value:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item == "all":
                granted |= KNOWN_CAPABILITIES
            elif item not in KNOWN_CAPABILITIES:
                raise ValueError(
                    f"unknown capability {item!r} (known: {', '.join(sorted(KNOWN_CAPABILITIES))})"
                )
            else:
                granted.add(item)
    return frozenset(granted)


class WasmtimeMemory:
    """A GuestMemory over wasmtime-py's Memory (for callers without raw handles)."""

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        self.store = store
        self.memory = memory

    def view(self) -> memoryview:
        size = self.memory.data_len(self.store)
        if not size:
            return memoryview(bytearray())
        base = ctypes.addressof(self.memory.data_ptr(self.store).contents)
        return memoryview((ctypes.c_ubyte * size).from_address(base)).cast("B")


def wasmtime_allocator(store: wasmtime.Store, exports: Any) -> Callable[[int], int]:
    """The guest allocator (``proxy_on_memory_allocate``, else ``malloc``) as a callable;
    one that always fails (returns 0) when the module exports neither."""
    for name in ("proxy_on_memory_allocate", "malloc"):
        func = exports.get(name) if hasattr(exports, "get") else None
        if isinstance(func, wasmtime.Func):
            return lambda size, f=func: int(f(store, size)) & 0xFFFFFFFF
    return lambda size: 0
