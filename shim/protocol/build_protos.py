"""Generate the Python protobuf modules from the project's .proto declarations.

Run by the build (setup.py's build_py) and by `make proto`. The .proto files are
compiled under the virtual path ``layotto/shim/protocol`` so the generated modules
import each other as ``layotto.shim.protocol.<name>_pb2``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VIRTUAL = "layotto/shim/protocol"


def generate(out_dir: Path = HERE) -> list[Path]:
    """Compile every .proto next to this file into ``<name>_pb2.py`` in ``out_dir``."""
    import tempfile

    from grpc_tools import protoc  # build-time dependency only

    try:
        from importlib.resources import files

        well_known = str(files("grpc_tools") / "_proto")
    except Exception:  # pragma: no cover - very old grpc_tools
        import grpc_tools

        well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    protos = sorted(HERE.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{VIRTUAL}={HERE}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            *[f"{VIRTUAL}/{p.name}" for p in protos],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        written = []
        for src in sorted((Path(tmp) / VIRTUAL).glob("*_pb2.py")):
            dest = out_dir / src.name
            dest.write_bytes(src.read_bytes())
            written.append(dest)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for path in generate(out):
        print(path)
