"""WASI ``poll_oneoff`` as the host provides it: interruptible sleeps.

wasmtime's own ``poll_oneoff`` sleeps in Rust where no kill can reach it. The host's
reports fd subscriptions ready at once and turns the earliest clock into a wait it
controls: on a thread, a wait on the nanoprocess's kill event; as a fiber, a suspension
the scheduler ends (host/fibers.py AsyncPoll).
"""

from __future__ import annotations

import ctypes
import struct
import time
from collections.abc import Callable

import wasmtime

_SUB = struct.Struct("<QB7xIxxxxQQH6x")  # userdata, tag, (clock id, timeout, precision, flags)
_SUB_SIZE = 48
_EVENT_SIZE = 32
_WASI_EINVAL = 28
_WASI_EFAULT = 21
_WASI_ENOTSUP = 58
_EVENT = struct.Struct("<QHBxxxxxQH6x")  # userdata, error, type, (nbytes, flags)


def _poll_plan(raw: bytes, nsubs: int) -> tuple[bytes, float]:
    """The events a ``poll_oneoff`` over ``raw`` subscriptions reports, and the seconds to
    wait first: fd subscriptions are reported ready at once, else the earliest clock."""
    clocks: list[tuple[int, float]] = []
    ready: list[tuple[int, int]] = []  # (userdata, type) of fd subscriptions
    for i in range(nsubs):
        userdata, tag, clock_id, timeout, _precision, flags = _SUB.unpack_from(raw, i * _SUB_SIZE)
        if tag == 0:
            seconds = timeout / 1e9
            if flags & 1:  # absolute time
                now = time.time() if clock_id == 0 else time.monotonic()
                seconds -= now
            clocks.append((userdata, max(0.0, seconds)))
        else:
            ready.append((userdata, tag))
    events = bytearray()
    if ready:
        for userdata, tag in ready:
            events += _EVENT.pack(userdata, 0, tag, 0, 0)
        return bytes(events), 0.0
    wait = min(seconds for _, seconds in clocks)
    for userdata, seconds in clocks:
        if seconds <= wait:
            events += _EVENT.pack(userdata, 0, 0, 0, 0)
    return bytes(events), wait


def _out_of_range(size: int, in_ptr: int, out_ptr: int, nsubs: int, nevents_ptr: int) -> bool:
    """Whether the subscriptions, events or count lie outside a memory of ``size`` bytes."""
    return in_ptr + nsubs * _SUB_SIZE > size or out_ptr + nsubs * _EVENT_SIZE > size or nevents_ptr + 4 > size


def poll_oneoff(sleep: Callable[[float], bool]) -> Callable[..., int]:
    """WASI ``poll_oneoff`` for ``Linker.define_func`` (with the caller): fd subscriptions
    are reported ready, a clock waits through ``sleep(seconds)``, which returns True when
    the module was killed meanwhile (the call then traps)."""

    def call(caller: wasmtime.Caller, in_ptr: int, out_ptr: int, nsubs: int, nevents_ptr: int) -> int:
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            return _WASI_ENOTSUP
        if nsubs == 0:
            return _WASI_EINVAL
        size = memory.data_len(caller)
        if _out_of_range(size, in_ptr, out_ptr, nsubs, nevents_ptr):
            return _WASI_EFAULT
        raw = bytes(memory.read(caller, in_ptr, in_ptr + nsubs * _SUB_SIZE))
        events, wait = _poll_plan(raw, nsubs)
        if wait > 0 and sleep(wait):
            raise wasmtime.Trap("nanoprocess killed")
        memory.write(caller, events, out_ptr)
        memory.write(caller, struct.pack("<I", len(events) // _EVENT_SIZE), nevents_ptr)
        return 0

    return call


def plain_sleep(seconds: float) -> bool:
    """Sleep, never killed (function instances: their deadline interrupts them)."""
    time.sleep(seconds)
    return False


def poll_oneoff_async(
    base: int, size: int, in_ptr: int, out_ptr: int, nsubs: int, nevents_ptr: int
) -> int | float:
    """The fibers' poll_oneoff: the events are written now, the sleep is the scheduler's."""
    if not base:
        return _WASI_ENOTSUP
    if nsubs == 0:
        return _WASI_EINVAL
    if _out_of_range(size, in_ptr, out_ptr, nsubs, nevents_ptr):
        return _WASI_EFAULT
    events, wait = _poll_plan(ctypes.string_at(base + in_ptr, nsubs * _SUB_SIZE), nsubs)
    ctypes.memmove(base + out_ptr, events, len(events))
    ctypes.memmove(base + nevents_ptr, struct.pack("<I", len(events) // _EVENT_SIZE), 4)
    return wait if wait > 0 else 0
