"""What many tests share: waiting for a condition instead of sleeping a fixed time, and
making a function the way the node host does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from layotto.host.function import Function
    from layotto.host.runtime import NodeRuntime

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, *, what: str = "condition", interval: float = 0.02
) -> T:
    """Poll ``predicate()`` until it returns something truthy, and return that; past
    ``timeout`` seconds, fail with ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s (last: {value!r})")
        time.sleep(interval)


def make_function(runtime: NodeRuntime, wasm: bytes, name: str, **options: Any) -> Function:
    """A function of the module ``wasm`` on ``runtime``'s engine and linker, as the node host
    makes one (id ``name`` and no memory limit unless ``options`` say otherwise)."""
    from layotto.host.function import Function

    options.setdefault("function_id", name)
    options.setdefault("memory_limit", None)
    return Function(
        name=f"test/{name}",
        engine=runtime.engine,
        linker=runtime.linker,
        compiled=runtime.engine.load(wasm, name=name),
        argv=[name],
        env=[],
        **options,
    )


class Recorder(asyncio.Transport):
    """What a protocol writes, and whether it closed: a transport for feeding the parser."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.closed = False
        self.after_close = b""

    def write(self, data: bytes) -> None:
        if self.closed:
            self.after_close += data
        self.data += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default
