"""The host side of the Runtime ABI, by concern (the rules are in docs/abi.md):

- host/abi_context.py: the ABI's limits and :class:`AbiContext`, the caller as host
  functions see it, guest memory checked;
- host/abi_functions.py: the host functions and their table;
- host/abi_linker.py: the table in a linker, and the caller lookup (``calling``);
- host/abi_invoker.py: :class:`HostInvoker`, ``layotto_invoke``'s reach.

This module gathers their public names in one place.
"""

from __future__ import annotations

from layotto.host.abi_context import (
    BUFFER_CALL_DATA,
    BUFFER_LIMIT,
    BUFFER_REQUEST_BODY,
    BUFFER_RESPONSE_BODY,
    BUFFER_TYPES,
    KNOWN_CAPABILITIES,
    MAX_KEY,
    MAX_VALUE,
    SPEC,
    AbiContext,
    GuestMemory,
    Invoker,
    S,
    WasmtimeMemory,
    is_known_import,
    parse_capabilities,
    wasmtime_allocator,
)
from layotto.host.abi_functions import IMPLEMENTATIONS, check_table, decode_ops
from layotto.host.abi_invoker import HostInvoker
from layotto.host.abi_linker import calling, current, define_imports, host_function

__all__ = [
    "BUFFER_CALL_DATA",
    "BUFFER_LIMIT",
    "BUFFER_REQUEST_BODY",
    "BUFFER_RESPONSE_BODY",
    "BUFFER_TYPES",
    "IMPLEMENTATIONS",
    "KNOWN_CAPABILITIES",
    "MAX_KEY",
    "MAX_VALUE",
    "SPEC",
    "AbiContext",
    "GuestMemory",
    "HostInvoker",
    "Invoker",
    "S",
    "WasmtimeMemory",
    "calling",
    "check_table",
    "current",
    "decode_ops",
    "define_imports",
    "host_function",
    "is_known_import",
    "parse_capabilities",
    "wasmtime_allocator",
]
