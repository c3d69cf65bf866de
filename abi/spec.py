"""The Runtime ABI table (abi/layotto_abi.yaml), and what is generated from it.

``python -m layotto.abi.spec --write`` regenerates the C header and the reference
document; ``--check`` fails when they are out of date (the tests run it). The host's
import table (host/abi_host.py) is checked against the same table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TABLE = HERE / "layotto_abi.yaml"
HEADER = HERE / "include" / "layotto_abi.h"
DOC = HERE / "ABI.md"

# How each parameter type lowers to wasm i32 parameters.
LOWERING: dict[str, tuple[str, ...]] = {
    "i32": ("",),
    "bytes": ("_ptr", "_len"),
    "string": ("_ptr", "_len"),
    "mut_bytes": ("_ptr", "_len"),
    "out_bytes": ("_ptr_ptr", "_len_ptr"),
    "out_i32": ("_ptr",),
    "out_i64": ("_ptr",),
}
C_TYPES = {
    "": "int32_t",
    "_ptr": "const uint8_t *",
    "_len": "size_t",
    "_ptr_ptr": "uint8_t **",
    "_len_ptr": "size_t *",
}


@dataclass(frozen=True)
class Param:
    name: str
    type: str

    def lowered(self) -> list[str]:
        return [self.name + suffix for suffix in LOWERING[self.type]]


@dataclass(frozen=True)
class Function:
    module: str
    name: str
    capability: str
    doc: str
    params: tuple[Param, ...]

    @property
    def arity(self) -> int:
        """Number of wasm i32 parameters (every function returns one i32 status)."""
        return sum(len(LOWERING[p.type]) for p in self.params)


@dataclass(frozen=True)
class Spec:
    version: int
    module: str
    status: dict[str, int]
    status_doc: dict[str, str]
    capabilities: dict[str, str]
    default_capabilities: frozenset[str]
    limits: dict[str, int]
    functions: tuple[Function, ...]
    compat_module: str
    compat: tuple[Function, ...]

    def all_functions(self) -> tuple[Function, ...]:
        return self.functions + self.compat

    def lookup(self, module: str, name: str) -> Function | None:
        for fn in self.all_functions():
            if fn.module == module and fn.name == name:
                return fn
        return None


def _functions(module: str, entries: list[dict], capabilities: dict[str, str]) -> tuple[Function, ...]:
    out = []
    for entry in entries:
        params = tuple(Param(p["name"], p["type"]) for p in entry.get("params", []))
        for p in params:
            if p.type not in LOWERING:
                raise ValueError(f"{entry['name']}: unknown parameter type {p.type!r}")
        if entry["capability"] not in capabilities:
            raise ValueError(f"{entry['name']}: unknown capability {entry['capability']!r}")
        out.append(Function(module, entry["name"], entry["capability"], entry.get("doc", ""), params))
    return tuple(out)


@cache
def load(path: Path = TABLE) -> Spec:
    # The C loader when PyYAML has one (the same safe subset, several times faster at start-up).
    raw = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    capabilities = dict(raw["capabilities"])
    compat = raw.get("compat") or {}
    return Spec(
        version=int(raw["version"]),
        module=raw["module"],
        status={name: int(v["code"]) for name, v in raw["status"].items()},
        status_doc={name: v.get("doc", "") for name, v in raw["status"].items()},
        capabilities=capabilities,
        default_capabilities=frozenset(raw.get("default_capabilities", [])),
        limits={k: int(v) for k, v in (raw.get("limits") or {}).items()},
        functions=_functions(raw["module"], raw["functions"], capabilities),
        compat_module=compat.get("module", "env"),
        compat=_functions(compat.get("module", "env"), compat.get("functions", []), capabilities),
    )


# --- generators ---------------------------------------------------------------------------


def c_header(spec: Spec) -> str:
    lines = [
        "/* Generated from abi/layotto_abi.yaml by `python -m layotto.abi.spec --write`. Do not edit. */",
        "#ifndef LAYOTTO_ABI_H",
        "#define LAYOTTO_ABI_H",
        "",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "",
        f"#define LAYOTTO_ABI_VERSION {spec.version}",
        "",
        "/* Status codes returned by every host function. */",
    ]
    for name, code in spec.status.items():
        lines.append(f"#define LAYOTTO_{name} {code}  /* {spec.status_doc[name]} */")
    lines += ["", f"#define LAYOTTO_MAX_KEY {spec.limits.get('max_key', 0)}"]
    lines += [f"#define LAYOTTO_MAX_VALUE {spec.limits.get('max_value', 0)}", ""]
    for fn in spec.functions:
        args = []
        for p in fn.params:
            for suffix in LOWERING[p.type]:
                ctype = C_TYPES[suffix]
                if p.type == "mut_bytes" and suffix == "_ptr":
                    ctype = "uint8_t *"
                if p.type in ("out_i32",):
                    ctype = "int32_t *"
                if p.type in ("out_i64",):
                    ctype = "int64_t *"
                sep = "" if ctype.endswith("*") else " "
                args.append(f"{ctype}{sep}{p.name}{suffix}")
        lines.append(f"/* {fn.doc} Capability: {fn.capability}. */")
        lines.append(
            f'__attribute__((import_module("{fn.module}"), import_name("{fn.name}")))\n'
            f"int32_t {fn.name}({', '.join(args) or 'void'});"
        )
        lines.append("")
    lines += ["#endif /* LAYOTTO_ABI_H */", ""]
    return "\n".join(lines)


def markdown(spec: Spec) -> str:
    out = [
        "<!-- Generated from abi/layotto_abi.yaml by `python -m layotto.abi.spec --write`. Do not edit. -->",
        f"# Layotto Runtime ABI, version {spec.version}",
        "",
        f"Host functions are imported from module `{spec.module}`; Layotto-compatible ones from "
        f"`{spec.compat_module}`. Every function returns an `i32` status. See abi/http.md for the "
        "HTTP handler a function module exports, and abi/layotto_abi.yaml for the conventions.",
        "",
        "## Status codes",
        "",
        "| name | code | meaning |",
        "|---|--:|---|",
    ]
    out += [f"| `{n}` | {c} | {spec.status_doc[n]} |" for n, c in spec.status.items()]
    out += [
        "",
        "## Capabilities",
        "",
        "Granted by the pod annotation `layotto.io/capabilities` "
        f"(a comma-separated list); by default only {', '.join(sorted(spec.default_capabilities))}.",
        "",
    ]
    out += [f"- `{n}`: {d}" for n, d in spec.capabilities.items()]
    for title, fns in (("Functions", spec.functions), ("Layotto compatibility (module env)", spec.compat)):
        out += [
            "",
            f"## {title}",
            "",
            "| function | capability | wasm parameters (all i32) | meaning |",
            "|---|---|---|---|",
        ]
        for fn in fns:
            lowered = ", ".join(name for p in fn.params for name in p.lowered())
            out.append(f"| `{fn.name}` | {fn.capability} | `{lowered}` | {fn.doc} |")
    out += ["", "## Limits", ""] + [f"- `{k}`: {v} bytes" for k, v in spec.limits.items()] + [""]
    return "\n".join(out)


def generated(spec: Spec) -> dict[Path, str]:
    return {HEADER: c_header(spec), DOC: markdown(spec)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layotto.abi.spec")
    parser.add_argument("--write", action="store_true", help="regenerate the header and the document")
    parser.add_argument("--check", action="store_true", help="fail when they are out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated(load()).items():
        current = path.read_text() if path.exists() else None
        if current != text:
            stale.append(path)
            if args.write:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if args.check and stale:
        print(
            "out of date (run python -m layotto.abi.spec --write): " + ", ".join(map(str, stale)),
            file=sys.stderr,
        )
        return 1
    for path in stale if args.write else []:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
