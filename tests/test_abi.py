"""The Runtime ABI: the table, the generated files, and the host's import table under
random and hostile arguments (the host must answer with a status, never crash)."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layotto.abi import spec as abi_spec
from layotto.host import abi_host, errors
from layotto.host.abi_context import MAX_REMEMBERED_STORES
from layotto.host.abi_host import AbiContext, WasmtimeMemory, calling, host_function, parse_capabilities
from layotto.host.components.registry import load_components
from layotto.host.engine import WasmEngine
from layotto.host.errors import ModuleError, Status
from layotto.host.function import HostServices, Request
from layotto.host.nanoprocess import build_linker
from layotto.host.runtime import NodeRuntime
from tests.support import make_function

SPEC = abi_spec.load()
STATUS = SPEC.status
CODES = frozenset(STATUS.values())
PAGE = 65536

# A guest with one page of memory and a bump allocator (the host allocates results in it).
GUEST = """
(module
  (memory (export "memory") 1)
  (global $next (mut i32) (i32.const 32768))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $next))
    (if (i32.gt_u (i32.add (local.get $at) (local.get $size)) (i32.const 65536))
      (then (return (i32.const 0))))
    (global.set $next (i32.add (local.get $at) (local.get $size)))
    (local.get $at)))
"""


@pytest.fixture(scope="module")
def components(tmp_path_factory: pytest.TempPathFactory):
    c = load_components(None, tmp_path_factory.mktemp("state"))
    yield c
    c.close()


class Guest:
    def __init__(self, components, capabilities: frozenset[str]) -> None:
        engine = wasmtime.Engine()
        self.store = wasmtime.Store(engine)
        instance = wasmtime.Instance(self.store, wasmtime.Module(engine, GUEST), [])
        exports = instance.exports(self.store)
        self.memory = exports["memory"]
        self.alloc_fn = exports["proxy_on_memory_allocate"]
        self.logged: list[tuple[str, str]] = []
        self.ctx = AbiContext(
            name="test/guest",
            memory=WasmtimeMemory(self.store, self.memory),
            allocate=lambda n: int(self.alloc_fn(self.store, n)) & 0xFFFFFFFF,
            capabilities=capabilities,
            app_id="tests.guest",
            components=components,
            invoker=None,
            logger=lambda stream, line: self.logged.append((stream, line)),
        )

    def put(self, at: int, data: bytes) -> tuple[int, int]:
        self.memory.write(self.store, data, at)
        return at, len(data)

    def get(self, at: int, n: int) -> bytes:
        return bytes(self.memory.read(self.store, at, at + n))

    def u32(self, at: int) -> int:
        return struct.unpack("<I", self.get(at, 4))[0]

    def call(self, name: str, *args: int) -> int:
        fn = SPEC.lookup("layotto", name) or SPEC.lookup("env", name)
        assert fn is not None
        with calling(self.ctx):
            return host_function(fn)(*args)


def test_generated_files_are_up_to_date() -> None:
    r = subprocess.run([sys.executable, "-m", "layotto.abi.spec", "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_status_codes_are_written_once() -> None:
    """The host's Status and the Rust and AssemblyScript SDKs' constants are the table's."""
    assert {s.name: s.value for s in Status} == STATUS
    root = Path(abi_spec.__file__).resolve().parent
    rust = (root / "rust" / "layotto" / "src" / "lib.rs").read_text()
    ts = (root / "assemblyscript" / "assembly" / "layotto.ts").read_text()
    assert dict(re.findall(r"pub const (\w+): Status = Status\((\d+)\);", rust)) == {
        n: str(c) for n, c in STATUS.items()
    }
    ts_status = ts[ts.index("export namespace Status {") :].split("}", 1)[0]
    assert dict(re.findall(r"export const (\w+): i32 = (\d+);", ts_status)) == {
        n: str(c) for n, c in STATUS.items()
    }


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.AbiStatus(Status.LIMIT_EXCEEDED, "too big"), Status.LIMIT_EXCEEDED),
        (errors.AbiStatus("BAD_ARGUMENT"), Status.BAD_ARGUMENT),
        (errors.ETagMismatch("stale"), Status.CAS_MISMATCH),
        (errors.NotFound("no secret"), Status.NOT_FOUND),
        (errors.ComponentDenied("not granted"), Status.PERMISSION_DENIED),
        (errors.UnknownComponent("no such store"), Status.NOT_FOUND),
        (errors.ScopeError("key can't contain '||'"), Status.BAD_ARGUMENT),
        (errors.ComponentError("connection refused"), Status.INTERNAL_FAILURE),
        (OSError("disk full"), Status.INTERNAL_FAILURE),
        (RuntimeError("a bug"), None),
    ],
)
def test_exceptions_map_to_one_abi_status(exc: BaseException, status: Status | None) -> None:
    assert errors.abi_status(exc) is status
    if not isinstance(exc, OSError | RuntimeError):
        assert isinstance(exc, errors.LayottoError)


def test_the_host_implements_exactly_the_table() -> None:
    abi_host.check_table()
    # And a module importing every declared function links against the host's linker.
    imports = []
    for fn in SPEC.all_functions():
        params = " ".join(["i32"] * fn.arity)
        imports.append(f'(import "{fn.module}" "{fn.name}" (func (param {params}) (result i32)))')
    wat = "(module " + " ".join(imports) + ' (memory (export "memory") 1))'
    engine = WasmEngine(None)
    wasm = wasmtime.wat2wasm(wat)
    compiled = engine.load(bytes(wasm), name="/all-imports.wasm")

    build_linker(engine).instantiate(wasmtime.Store(engine.engine), compiled.module)


def test_unknown_abi_imports_are_refused_by_name() -> None:
    wat = '(module (import "layotto" "layotto_teleport" (func (param i32) (result i32))))'
    with pytest.raises(
        ModuleError, match="imports layotto.layotto_teleport, which the layotto host does not provide"
    ):
        WasmEngine(None).load(bytes(wasmtime.wat2wasm(wat)), name="/x.wasm")


def test_capabilities_are_parsed_and_enforced(components) -> None:
    assert parse_capabilities(None) == frozenset({"log", "time", "random"})
    assert "state" in parse_capabilities("state, invoke")
    with pytest.raises(ValueError, match="unknown capability 'teleport'"):
        parse_capabilities("teleport")
    guest = Guest(components, parse_capabilities(None))
    store, key = guest.put(100, b"state_demo"), guest.put(200, b"k")
    assert guest.call("layotto_state_get", *store, *key, 300, 304, 308, 312) == STATUS["PERMISSION_DENIED"]
    assert any("permission denied" in line for _, line in guest.logged)
    # log is always granted
    msg = guest.put(400, b"hello")
    assert guest.call("layotto_log", 2, *msg) == STATUS["OK"]
    assert ("info", "hello") in guest.logged


def test_state_round_trip_with_etags(components) -> None:
    guest = Guest(components, parse_capabilities("state"))
    store, key, value = guest.put(100, b"state_demo"), guest.put(200, b"book1"), guest.put(300, b"100")
    out = 1000  # four u32 out-slots at 1000..1015
    assert guest.call("layotto_state_save", *store, *key, *value, 0, 0, out, out + 4) == STATUS["OK"]
    etag = guest.get(guest.u32(out), guest.u32(out + 4))
    assert etag
    assert guest.call("layotto_state_get", *store, *key, out, out + 4, out + 8, out + 12) == STATUS["OK"]
    assert guest.get(guest.u32(out), guest.u32(out + 4)) == b"100"
    assert guest.get(guest.u32(out + 8), guest.u32(out + 12)) == etag
    stale = guest.put(500, b"not-the-etag")
    assert (
        guest.call("layotto_state_save", *store, *key, *value, *stale, out, out + 4) == STATUS["CAS_MISMATCH"]
    )
    missing = guest.put(600, b"nope")
    assert (
        guest.call("layotto_state_get", *store, *missing, out, out + 4, out + 8, out + 12)
        == STATUS["NOT_FOUND"]
    )
    # Keys are namespaced per application: the store holds "tests.guest||book1".
    assert components.state("state_demo").get("tests.guest||book1").value == b"100"


def test_bad_pointers_are_invalid_memory_access_and_do_nothing(components) -> None:
    guest = Guest(components, parse_capabilities("state,sequencer"))
    store, key, value = guest.put(100, b"state_demo"), guest.put(200, b"untouched"), guest.put(300, b"v")
    beyond = PAGE - 2
    assert guest.call("layotto_state_get", *store, beyond, 10, 0, 4, 8, 12) == STATUS["INVALID_MEMORY_ACCESS"]
    # An out-pointer outside memory is found before the write happens.
    status = guest.call("layotto_state_save", *store, *key, *value, 0, 0, beyond, 1000)
    assert status == STATUS["INVALID_MEMORY_ACCESS"]
    assert components.state("state_demo").get("tests.guest||untouched") is None
    seq = guest.put(400, b"sequencer_demo")
    before = components.sequencer("sequencer_demo").next_id("tests.guest||ids")
    assert (
        guest.call("layotto_next_id", *seq, *guest.put(500, b"ids"), PAGE - 4)
        == STATUS["INVALID_MEMORY_ACCESS"]
    )
    assert components.sequencer("sequencer_demo").next_id("tests.guest||ids") == before + 1
    # Oversized inputs are a limit error, not a read of gigabytes.
    assert guest.call("layotto_log", 0, 0, 1 << 30) == STATUS["LIMIT_EXCEEDED"]
    assert guest.call("layotto_state_get", *store, 0, 5000, 0, 4, 8, 12) == STATUS["LIMIT_EXCEEDED"]


def test_unknown_component_is_not_found(components) -> None:
    guest = Guest(components, parse_capabilities("state"))
    store, key = guest.put(100, b"no_such_store"), guest.put(200, b"k")
    assert guest.call("layotto_state_get", *store, *key, 1000, 1004, 1008, 1012) == STATUS["NOT_FOUND"]


_u32 = st.one_of(
    st.integers(min_value=0, max_value=PAGE + 16),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.sampled_from([0, 1, PAGE - 1, PAGE, PAGE + 1, 2**31 - 1, -1, -(2**31)]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_arguments_never_crash_the_host(components, data) -> None:
    """Every host function, with random pointers, lengths and contents: always a status."""
    guest = Guest(components, parse_capabilities("all"))
    junk = data.draw(st.binary(min_size=0, max_size=4096))
    guest.put(0, junk)
    for fn in SPEC.all_functions():
        args = [data.draw(_u32) for _ in range(fn.arity)]
        result = guest.call(fn.name, *args)
        assert result in CODES, f"{fn.name}{tuple(args)} returned {result}"


def test_key_prefix_none_reads_the_raw_key(tmp_path) -> None:
    """A store configured with ``keyPrefix: none`` is shared as is (Layotto's FaaS demo
    seeds ``book1`` with redis-cli and the function reads exactly that key)."""
    config = tmp_path / "components.yaml"
    config.write_text("state:\n  state_demo: {type: sqlite, metadata: {keyPrefix: none}}\n")
    with load_components(config, tmp_path) as components:
        components.state("state_demo").set("book1", b"100")
        guest = Guest(components, parse_capabilities("state"))
        store, key = guest.put(100, b"state_demo"), guest.put(200, b"book1")
        assert guest.call("layotto_state_get", *store, *key, 1000, 1004, 1008, 1012) == STATUS["OK"]
        assert guest.get(guest.u32(1000), guest.u32(1004)) == b"100"


def test_each_store_keeps_its_own_key_prefix_for_one_caller(tmp_path) -> None:
    """A caller's key prefixes are remembered per store (AbiContext.state_key): stores with
    different ``keyPrefix`` modes, asked in turns, each keep theirs; a key containing the
    separator is refused however often the store was used; and store names made up by the
    guest are not remembered without bound."""
    config = tmp_path / "components.yaml"
    config.write_text(
        "state:\n"
        "  shared: {type: sqlite, metadata: {keyPrefix: none}}\n"
        "  named: {type: sqlite, metadata: {keyPrefix: name}}\n"
        "  mine: {type: sqlite}\n"
    )
    with load_components(config, tmp_path) as components:
        ctx = Guest(components, parse_capabilities("state")).ctx
        for _ in range(3):
            assert ctx.state_key("shared", "k") == "k"
            assert ctx.state_key("named", "k") == "named||k"
            assert ctx.state_key("mine", "k") == "tests.guest||k"
            assert ctx.state_key("mine", "k", "lock") == "tests.guest||k"
            with pytest.raises(errors.AbiStatus) as refused:
                ctx.state_key("shared", "a||b")
            assert refused.value.status == Status.BAD_ARGUMENT
        for n in range(1000):
            assert ctx.state_key(f"made-up-{n}", "k") == "tests.guest||k"
        assert len(ctx._prefixes) <= MAX_REMEMBERED_STORES


def test_calls_from_wasm_go_through_the_raw_import_table(components) -> None:
    """The linker's ABI functions (host/_handler.c host functions): pointers and lengths
    arrive unsigned, a pointer past 2 GiB is INVALID_MEMORY_ACCESS, not a crash or a
    negative index, and a trap inside the host function's guest calls traps the caller."""

    wat = """
    (module
      (import "layotto" "layotto_log" (func $log (param i32 i32 i32) (result i32)))
      (import "layotto" "layotto_state_get"
        (func $get (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "layotto" "layotto_random" (func $random (param i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 16) "hello from wasm")
      (func (export "log_ok") (result i32) (call $log (i32.const 2) (i32.const 16) (i32.const 15)))
      (func (export "get_far") (result i32)
        (call $get (i32.const 0xFFFFFFF0) (i32.const 4) (i32.const 16) (i32.const 5)
                   (i32.const 100) (i32.const 104) (i32.const 108) (i32.const 112)))
      (func (export "random_huge") (result i32) (call $random (i32.const 16) (i32.const 0xFFFFFFF0)))
      (data (i32.const 48) "state_demobook1")
      (func (export "get_book") (result i32)
        (call $get (i32.const 48) (i32.const 10) (i32.const 58) (i32.const 5)
                   (i32.const 100) (i32.const 104) (i32.const 108) (i32.const 112)))
      (func (export "alloc_trap") (param i32) (result i32) unreachable))
    """
    engine = WasmEngine(None)
    compiled = engine.load(bytes(wasmtime.wat2wasm(wat)), name="/raw.wasm")
    store = wasmtime.Store(engine.engine)
    store.set_epoch_deadline(1 << 30)  # the host's engine interrupts by epoch
    instance = build_linker(engine).instantiate(store, compiled.module)
    exports = instance.exports(store)
    logged: list[tuple[str, str]] = []
    ctx = AbiContext(
        name="raw",
        memory=WasmtimeMemory(store, exports["memory"]),
        allocate=lambda n: exports["alloc_trap"](store, n),
        capabilities=parse_capabilities("state"),
        app_id="tests.raw",
        components=components,
        logger=lambda stream, line: logged.append((stream, line)),
    )
    with calling(ctx):
        assert exports["log_ok"](store) == STATUS["OK"]
        assert exports["get_far"](store) == STATUS["INVALID_MEMORY_ACCESS"]
        # A length past 2 GiB arrives unsigned too: over the limit, not a negative length.
        assert exports["random_huge"](store) == STATUS["LIMIT_EXCEEDED"]
        # A trap in a guest call the host function makes (its allocator, for the result)
        # traps the caller, naming the host function.
        components.state("state_demo").set(ctx.state_key("state_demo", "book1"), b"100")
        trapped = (wasmtime.Trap, wasmtime.WasmtimeError)
        with pytest.raises(trapped, match=r"(?s)layotto_state_get: .*unreachable"):
            exports["get_book"](store)
    assert ("info", "hello from wasm") in logged
    # Without a caller context (no ABI caller pushed) the host answers, it does not crash.
    assert exports["log_ok"](store) == STATUS["INTERNAL_FAILURE"]


def test_secrets_configuration_and_keys_are_scoped_to_the_caller(components, monkeypatch) -> None:
    """The Runtime ABI applies host.scoping as the gRPC API does: secrets per namespace,
    configuration items and keys per app, and an app id naming another namespace's app is
    scoped under the caller's own namespace."""
    from layotto.abi.maps import decode_map
    from layotto.host.components import ConfigItem

    monkeypatch.setenv("LAYOTTO_SECRET_tenant-a__pw", "a's")
    monkeypatch.setenv("LAYOTTO_SECRET_pw", "node-wide")
    components.configuration("config_demo").set([ConfigItem("tenant-a.app||color", "red")])

    def guest(namespace: str, app_id: str) -> Guest:
        g = Guest(components, parse_capabilities("secrets,configuration,state"))
        g.ctx.namespace, g.ctx.app_id = namespace, app_id
        return g

    def secret(g: Guest, name: bytes) -> tuple[int, dict[bytes, bytes]]:
        rc = g.call("layotto_get_secret", *g.put(100, b"secret_demo"), *g.put(200, name), 1000, 1004)
        found = dict(decode_map(g.get(g.u32(1000), g.u32(1004)))) if rc == STATUS["OK"] else {}
        return rc, found

    def color(g: Guest) -> tuple[int, bytes]:
        store, key = g.put(100, b"config_demo"), g.put(200, b"color")
        rc = g.call("layotto_config_get", *store, 0, 0, 0, 0, *key, 1000, 1004)
        return rc, g.get(g.u32(1000), g.u32(1004)) if rc == STATUS["OK"] else b""

    a, b = guest("tenant-a", "tenant-a.app"), guest("tenant-b", "tenant-b.app")
    assert secret(a, b"pw") == (STATUS["OK"], {b"pw": b"a's"})
    assert secret(b, b"pw")[0] == STATUS["NOT_FOUND"]  # neither a's nor the unscoped one
    assert secret(b, b"tenant-a/pw")[0] == STATUS["BAD_ARGUMENT"]
    assert color(a) == (STATUS["OK"], b"red")
    assert color(b)[0] == STATUS["NOT_FOUND"]
    # An app id that names another namespace's app (a module choosing its own id) stays
    # inside the caller's namespace.
    impostor = guest("tenant-b", "tenant-a.app")
    assert color(impostor)[0] == STATUS["NOT_FOUND"]
    store, key, value = impostor.put(100, b"state_demo"), impostor.put(200, b"k"), impostor.put(300, b"v")
    assert impostor.call("layotto_state_save", *store, *key, *value, 0, 0, 1000, 1004) == STATUS["OK"]
    assert components.state("state_demo").get("tenant-b.tenant-a.app||k").value == b"v"
    assert components.state("state_demo").get("tenant-a.app||k") is None
    # A key naming another app's prefix is refused.
    bad = impostor.put(200, b"tenant-a.app||k")
    assert impostor.call("layotto_state_get", *store, *bad, 1000, 1004, 1008, 1012) == STATUS["BAD_ARGUMENT"]


# A handler-ABI function whose allocator can be told to fail: its handler saves and reads
# back a value, then reads it into an out-pointer past the memory's end, with an allocator
# that returns 0, and with one that returns a buffer running past the end. The statuses
# and the value read back are the response body.
GIVING = """
(module
  (import "layotto" "layotto_state_save"
    (func $save (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "layotto" "layotto_state_get" (func $get (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $bump (mut i32) (i32.const 4096))
  (global $mode (mut i32) (i32.const 0))
  (data (i32.const 16) "state_demo")
  (data (i32.const 32) "key")
  (data (i32.const 40) "value")
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (if (i32.eq (global.get $mode) (i32.const 1)) (then (return (i32.const 0))))
    (if (i32.eq (global.get $mode) (i32.const 2)) (then (return (i32.const 65534))))
    (global.get $bump)
    (global.set $bump (i32.add (global.get $bump) (i32.add (local.get $n) (i32.const 8)))))
  (func $get_into (param $value_out i32) (result i32)
    (call $get (i32.const 16) (i32.const 10) (i32.const 32) (i32.const 3)
               (local.get $value_out) (i32.const 212) (i32.const 216) (i32.const 220)))
  (func (export "layotto_http_handle") (param $req i32) (param $len i32) (param $op i32) (param $ol i32)
    (result i32)
    (i32.store8 (i32.const 524)
      (call $save (i32.const 16) (i32.const 10) (i32.const 32) (i32.const 3) (i32.const 40) (i32.const 5)
                  (i32.const 0) (i32.const 0) (i32.const 200) (i32.const 204)))
    (i32.store8 (i32.const 525) (call $get_into (i32.const 208)))
    (i32.store8 (i32.const 526) (i32.load (i32.const 212)))
    (memory.copy (i32.const 530) (i32.load (i32.const 208)) (i32.const 5))
    (i32.store8 (i32.const 527) (call $get_into (i32.const 0xFFFFFFFE)))
    (global.set $mode (i32.const 1))
    (i32.store8 (i32.const 528) (call $get_into (i32.const 208)))
    (global.set $mode (i32.const 2))
    (i32.store8 (i32.const 529) (call $get_into (i32.const 208)))
    (global.set $mode (i32.const 0))
    (i32.store (i32.const 512) (i32.const 200))
    (i32.store (i32.const 516) (i32.const 0))
    (i32.store (i32.const 520) (i32.const 11))
    (i32.store (local.get $op) (i32.const 512))
    (i32.store (local.get $ol) (i32.const 23))
    (i32.const 0)))
"""


def test_a_function_instance_gives_results_through_checked_out_pointers(components) -> None:
    """A function instance's host calls read and give guest memory in host/_handler.c:
    the value arrives in a buffer from the guest's allocator, and an out-pointer past the
    end, an allocator returning 0 and one returning a buffer past the end are each
    INVALID_MEMORY_ACCESS, with the function serving on."""
    fn = make_function(
        NodeRuntime(None),
        bytes(wasmtime.wat2wasm(GIVING)),
        "giving",
        capabilities=parse_capabilities("state"),
        services=HostServices(components, None),
    )
    try:
        bad = STATUS["INVALID_MEMORY_ACCESS"]
        for _ in range(2):  # the same instance again: nothing was left broken
            response = fn.call_inline(Request(b"GET", b"/", b"", [], b""))
            assert response is not None and response.status == 200
            assert response.body == bytes([STATUS["OK"], STATUS["OK"], 5, bad, bad, bad]) + b"value"
    finally:
        fn.stop()


def test_guest_memory_in_c_answers_as_the_python_checks_do(components) -> None:
    """A function instance's guest memory is read, checked, written and given to by
    host/_handler.c's Guest; a nanoprocess's through a memoryview (Python). For the same
    memory and the same arguments, in range or not, both return the same results or refuse
    with the same status and message (what the guest and the function's log see)."""
    fn = make_function(
        NodeRuntime(None),
        bytes(wasmtime.wat2wasm(GIVING)),
        "guest-memory",
        capabilities=parse_capabilities("state"),
        services=HostServices(components, None),
    )
    instance = fn._take()
    assert instance is not None
    try:
        in_c = instance.abi
        assert in_c is not None and in_c.raw is not None
        in_python = AbiContext(
            name="test/python",
            memory=instance.memory,
            allocate=instance.alloc.call1,
            capabilities=in_c.capabilities,
            app_id=in_c.app_id,
            components=components,
        )
        assert type(in_c.read) is not type(in_python.read)  # (two implementations indeed)
        end = instance.memory.size()
        in_python.write(300, b"\xff\xfe not UTF-8")
        in_python.write(400, "naïve".encode())
        max_key, max_value = abi_host.MAX_KEY, abi_host.MAX_VALUE

        def outcome(ctx: AbiContext, op: str, *args: object):
            try:
                return "ok", getattr(ctx, op)(*args)
            except errors.AbiStatus as exc:
                return exc.status, str(exc)

        cases = [
            ("read", 40, 5),
            ("read", end - 2, 2),
            ("read", end - 2, 3),
            ("read", end, 0),
            ("read", end + 1, 0),
            ("read", 0xFFFFFFFF, 1),
            ("read", 0, 64, 16),
            ("read", 0, max_value + 1),
            ("read_str", 400, 6),
            ("read_str", 300, 4),
            ("read_str", 0, max_key + 1),
            ("read_str", end - 1, 2),
            ("check_out", 0, end - 4),
            ("check_out", 0, end - 3, 4),
            ("check_out", 0xFFFFFFFC),
            ("check_writable", end - 6, 6),
            ("check_writable", end - 6, 7),
            ("write", end - 2, b"ab"),
            ("write", end - 1, b"ab"),
            ("write", 600, bytearray(b"bytes-like")),
            ("give", end - 2, 204, b"x"),
            ("give", 200, 204, b"x" * (max_value + 1)),
        ]
        for op, *args in cases:
            assert outcome(in_c, op, *args) == outcome(in_python, op, *args), (op, args)
        assert in_c.read(600, 10) == b"bytes-like"
        # A given result: the same bytes behind the out-pointers whichever way it was given.
        for ctx in (in_c, in_python):
            ctx.give(200, 204, b"a result", checked=True)
            at, n = struct.unpack("<II", ctx.read(200, 8))
            assert (n, ctx.read(at, n)) == (8, b"a result")
            ctx.give(200, 204, b"")
            assert struct.unpack("<II", ctx.read(200, 8)) == (0, 0)
        with pytest.raises(TypeError):
            in_c.give(200, 204, b"x", check=True)
    finally:
        fn._give_back(instance, healthy=False)
        fn.stop()
    # Its Store deleted (the instance closed), the Guest touches nothing of it any more.
    for op, args in [("read", (40, 5)), ("read_str", (40, 5)), ("check_out", (0,)), ("write", (0, b"x"))]:
        with pytest.raises(RuntimeError, match="deleted instance"):
            getattr(in_c, op)(*args)
    with pytest.raises(RuntimeError, match="deleted instance"):
        in_c.give(200, 204, b"x")


@pytest.mark.parametrize("module", ["faas_fn2", "layotto_fn2"])
def test_memory_of_a_closed_instance_is_refused_not_read(components, wasm_dir, module: str) -> None:
    """An instance's Memory and Runtime ABI view, kept past its close (a handler-ABI
    instance; a Layotto-style one, whose Store is a RawStore), refuse to read the freed Store
    instead of following its addresses."""
    fn = make_function(
        NodeRuntime(None),
        (wasm_dir / f"{module}.wasm").read_bytes(),
        module,
        capabilities=parse_capabilities("state"),
        services=HostServices(components, None),
    )
    try:
        instance = fn._take()
        assert instance is not None
        memory, ctx = instance.memory, instance.abi
        assert memory.size() > 0 and ctx is not None and len(ctx.read(0, 4)) == 4
        fn._give_back(instance, healthy=False)  # closed: its Store is freed
        with pytest.raises(RuntimeError, match="deleted"):
            memory.size()
        with pytest.raises(RuntimeError, match="deleted"):
            memory.view()
        with pytest.raises(RuntimeError, match="deleted"):
            ctx.read(0, 4)
    finally:
        fn.stop()
