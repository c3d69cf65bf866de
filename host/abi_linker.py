"""The Runtime ABI in a linker: every entry of abi/layotto_abi.yaml defined as a raw
wasmtime host function that finds its caller and runs its implementation.

The caller is found through a thread-local stack: whoever calls into a guest (a function
instance, a nanoprocess) pushes its :class:`AbiContext` for the call (``with
calling(ctx)``); with none pushed a host call answers INTERNAL_FAILURE. Each linker
definition owns its callback (wasmtime frees it with the definition). The rules are in
docs/abi.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import wasmtime

from layotto.abi import spec as abi_spec
from layotto.host import capi
from layotto.host.abi_context import SPEC, AbiContext
from layotto.host.abi_functions import IMPLEMENTATIONS, check_table
from layotto.host.errors import AbiStatus, LayottoError, Status, abi_status
from layotto.host.scheduler import WouldBlock

log = logging.getLogger(__name__)

_local = threading.local()


def current() -> AbiContext | None:
    """The innermost ABI caller of this thread (None outside every ``calling``)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def caller_stack() -> list[AbiContext | None]:
    """This thread's stack of ABI callers (innermost last)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


class calling:
    """``with calling(ctx): <call into the guest>`` makes ``ctx`` the ABI caller."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: AbiContext | None) -> None:
        self.ctx = ctx

    def __enter__(self) -> None:
        caller_stack().append(self.ctx)

    def __exit__(self, *exc: object) -> None:
        _local.stack.pop()


# Statuses a guest meets in normal operation: not written to the function's log.
_QUIET = frozenset({Status.NOT_FOUND, Status.CAS_MISMATCH})


def host_function(fn: abi_spec.Function) -> Callable[..., int | str]:
    """The wasm-callable host function for one ABI entry: the caller (:func:`current`),
    the capability check, the implementation, and every failure turned into a status, or
    into a trap (a str: the trap's message) for a trap in a nested guest call (the
    allocator) or an inline call stopped to run again on a worker."""
    impl = IMPLEMENTATIONS[(fn.module, fn.name)]
    capability = fn.capability
    name = fn.name

    def call(*args: int) -> int | str:
        # (Its time is measured by the C trampoline: host/_handler.c host_callback.)
        ctx = current()
        if ctx is None:
            return Status.INTERNAL_FAILURE
        try:
            ctx.reset_view()
            if capability not in ctx.capabilities:
                ctx.note(f"{name}: permission denied (the pod does not grant {capability!r})")
                return Status.PERMISSION_DENIED
            return impl(ctx, *args)
        except (wasmtime.Trap, wasmtime.WasmtimeError, WouldBlock) as exc:
            return f"{name}: {exc}"
        except (LayottoError, OSError) as exc:
            status = abi_status(exc) or Status.INTERNAL_FAILURE
            if status not in _QUIET:
                failure = "" if isinstance(exc, AbiStatus) else "component failure: "
                ctx.note(f"{name}: {failure}{exc}")
            return status
        except Exception as exc:  # never let guest input crash the host
            log.exception("ABI %s failed", name)
            ctx.note(f"{name}: internal error: {type(exc).__name__}: {exc}")
            return Status.INTERNAL_FAILURE

    call.__name__ = name
    return call


def _unsigned_mask(fn: abi_spec.Function) -> int:
    """Which lowered parameters are pointers or lengths (read unsigned); ``i32`` ones are
    read signed."""
    suffixes = [suffix for p in fn.params for suffix in abi_spec.LOWERING[p.type]]
    return sum(1 << i for i, suffix in enumerate(suffixes) if suffix)


def define_imports(linker: wasmtime.Linker) -> None:
    """Add every ABI function (both modules) to ``linker``."""
    check_table()
    i32 = wasmtime.ValType.i32()
    for fn in SPEC.all_functions():
        ty = wasmtime.FuncType([i32] * fn.arity, [i32])
        capi.define_host_function(linker, fn.module, fn.name, ty, host_function(fn), _unsigned_mask(fn))
