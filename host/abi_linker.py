"""The Runtime ABI in a linker: every entry of abi/layotto_abi.yaml defined as a raw
wasmtime host function that finds its caller and runs its implementation.

A host call acts for the :class:`~layotto.host.abi_context.AbiContext` its store's owner
put on the store's :class:`~layotto.host.capi.EpochWatch` (``watch.owner``); a store
without one gets INTERNAL_FAILURE. Each linker definition owns its callback (wasmtime
frees it with the definition). The rules are in docs/abi.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import wasmtime

from layotto.abi import spec as abi_spec
from layotto.host import capi
from layotto.host.abi_context import SPEC, AbiContext
from layotto.host.abi_functions import IMPLEMENTATIONS, check_table
from layotto.host.errors import AbiStatus, LayottoError, Status, abi_status

log = logging.getLogger(__name__)

# Statuses a guest meets in normal operation: not written to the function's log.
_QUIET = frozenset({Status.NOT_FOUND, Status.CAS_MISMATCH})


def host_function(fn: abi_spec.Function) -> Callable[..., int]:
    """The host function for one ABI entry, as ``call(caller, *args)``: the capability
    check, the implementation, and every failure turned into a status."""
    impl = IMPLEMENTATIONS[(fn.module, fn.name)]
    capability = fn.capability

    def call(ctx: AbiContext | None, *args: int) -> int:
        if ctx is None:
            return Status.INTERNAL_FAILURE
        ctx.reset_view()
        if capability not in ctx.capabilities:
            ctx.note(f"{fn.name}: permission denied (the pod does not grant {capability!r})")
            return Status.PERMISSION_DENIED
        try:
            return impl(ctx, *args)
        except (wasmtime.Trap, wasmtime.WasmtimeError):
            raise  # a trap inside a nested call (the guest allocator): the caller traps too
        except (LayottoError, OSError) as exc:
            status = abi_status(exc) or Status.INTERNAL_FAILURE
            if status not in _QUIET:
                failure = "" if isinstance(exc, AbiStatus) else "component failure: "
                ctx.note(f"{fn.name}: {failure}{exc}")
            return status
        except Exception as exc:  # never let guest input crash the host
            log.exception("ABI %s failed", fn.name)
            ctx.note(f"{fn.name}: internal error: {type(exc).__name__}: {exc}")
            return Status.INTERNAL_FAILURE

    call.__name__ = fn.name
    return call


def _raw_callback(fn: abi_spec.Function) -> object:
    """wasmtime's unchecked host-function callback for ``fn``: arguments straight from
    the raw value array (about 1 µs per call, against 7-10 µs through ``define_func``),
    the caller from the store the call came from. Pointers and lengths are read unsigned,
    ``i32`` parameters signed."""
    host = host_function(fn)
    owner = capi.caller_owner
    signed = tuple(suffix == "" for p in fn.params for suffix in abi_spec.LOWERING[p.type])
    arity = fn.arity

    def callback(_env: object, caller: int, vals: Any, _count: int) -> int:
        try:
            args = [vals[i].i32 if signed[i] else vals[i].i32 & 0xFFFFFFFF for i in range(arity)]
            vals[0].i32 = host(owner(caller), *args)
            return 0
        except BaseException as exc:  # a trap in a nested guest call (the allocator)
            return capi.new_trap(f"{fn.name}: {exc}")

    return capi.UncheckedCallback(callback)


def define_imports(linker: wasmtime.Linker) -> None:
    """Add every ABI function (both modules) to ``linker``."""
    check_table()
    i32 = wasmtime.ValType.i32()
    for fn in SPEC.all_functions():
        ty = wasmtime.FuncType([i32] * fn.arity, [i32])
        capi.define_unchecked(linker, fn.module, fn.name, ty, _raw_callback(fn))
