"""The import graph's rules, read from the source with ``ast`` (nothing is imported).

- host/ knows wasm and nothing of containerd's protocol: no module under host/ except the
  composition root (host/daemon.py) imports ``layotto.shim``.
- shim/ reaches the engine through one seam: the Task service imports from ``layotto.host``
  only the seam (``layotto.host.workload``) and the error types; the other shim modules
  add only ``layotto.host.rootpath`` (safe path resolution inside a rootfs). No shim module
  imports wasmtime.
- The seam itself imports nothing of the engine, so importing it stays cheap.
- The modules of the seam stay readable: none over 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = {"host": "layotto.host", "shim": "layotto.shim"}
COMPOSITION_ROOT = "layotto.host.daemon"
SEAM = "layotto.host.workload"
TASK_SERVICE_MAY_IMPORT = {SEAM, "layotto.host.errors"}
SHIM_MAY_IMPORT = TASK_SERVICE_MAY_IMPORT | {"layotto.host.rootpath"}
ENGINE = (
    "wasmtime",
    "layotto.host.engine",
    "layotto.host.function",
    "layotto.host.nanoprocess",
    "layotto.host.abi_host",
    "layotto.host.abi_context",
    "layotto.host.abi_functions",
    "layotto.host.abi_linker",
    "layotto.host.abi_invoker",
    "layotto.host.components",
    "layotto.host.policy",
    "layotto.host.ingress",
    "layotto.host.ingress_limits",
    "layotto.host.ingress_render",
    "layotto.host.runtime",
    "layotto.host.workloads",
)
# Every product module: the project's own Python (generated *_pb2 code aside) stays small.
SIZE_CAPPED = tuple(
    sorted(
        str(path.relative_to(REPO_ROOT))
        for folder in ("shim", "host", "abi", "images")
        for path in (REPO_ROOT / folder).rglob("*.py")
        if not path.name.endswith("_pb2.py") and "node_modules" not in path.parts
    )
) + ("build_protos.py",)
MAX_LINES = 600


def modules() -> dict[str, Path]:
    """Every Python module of the host and shim packages, by its dotted name."""
    found = {}
    for directory, package in PACKAGES.items():
        for path in sorted((REPO_ROOT / directory).rglob("*.py")):
            if path.name.endswith("_pb2.py"):
                continue
            parts = path.relative_to(REPO_ROOT / directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports(path: Path) -> set[str]:
    """The modules ``path`` imports, anywhere in it (``from a import b`` counts as both
    ``a`` and ``a.b``: b may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def within_any(names: set[str], prefixes: tuple[str, ...]) -> bool:
    return any(within(n, prefixes) for n in names)


def host_modules(names: set[str]) -> set[str]:
    """The ``layotto.host`` modules among ``names`` (``from layotto.host import x`` → x)."""
    known = set(modules())
    return {n for n in names if n.startswith("layotto.host.") and n in known}


ALL = modules()


def test_the_modules_are_found():
    assert COMPOSITION_ROOT in ALL and SEAM in ALL and "layotto.shim.task_service" in ALL


@pytest.mark.parametrize("name", [n for n in ALL if n.startswith("layotto.host")])
def test_only_the_composition_root_imports_the_shim(name: str):
    if name == COMPOSITION_ROOT:
        return
    reached = sorted(n for n in imports(ALL[name]) if within(n, ("layotto.shim",)))
    assert not reached, f"{name} imports {reached}: only {COMPOSITION_ROOT} may see both sides"


@pytest.mark.parametrize("name", [n for n in ALL if n.startswith("layotto.shim")])
def test_the_shim_reaches_the_host_through_the_seam(name: str):
    names = imports(ALL[name])
    allowed = TASK_SERVICE_MAY_IMPORT if name == "layotto.shim.task_service" else SHIM_MAY_IMPORT
    beyond = sorted(host_modules(names) - allowed)
    assert not beyond, f"{name} imports {beyond}; shim/ may import only {sorted(allowed)} of the host"
    assert not within_any(names, ("wasmtime",)), f"{name} imports wasmtime"


def test_the_seam_imports_nothing_of_the_engine():
    reached = sorted(n for n in imports(ALL[SEAM]) if within(n, ENGINE))
    assert not reached, f"{SEAM} imports {reached}"


@pytest.mark.parametrize("relative", SIZE_CAPPED)
def test_seam_modules_stay_small(relative: str):
    lines = len((REPO_ROOT / relative).read_text().splitlines())
    assert lines <= MAX_LINES, f"{relative} has {lines} lines (at most {MAX_LINES})"


def test_the_rules_catch_a_violation(tmp_path: Path):
    """The checker itself: a shim module importing the engine is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from layotto.host import engine\nimport wasmtime\n")
    names = imports(bad)
    assert host_modules(names) == {"layotto.host.engine"}
    assert within_any(names, ("wasmtime",))
