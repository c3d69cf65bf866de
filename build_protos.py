"""Generate the Python protobuf modules from the project's .proto declarations.

Run by the build (setup.py's build_py) and by `make proto`. Each protocol package's .proto
files are compiled under its virtual path (``layotto/shim/protocol``: containerd's and
CRI's APIs; ``layotto/host/protocol``: the node host's gRPC Runtime API), so the generated
modules import each other as ``layotto.<part>.protocol.<name>_pb2``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = {  # the directory of .proto files → its virtual path (the package's import path)
    HERE / "shim" / "protocol": "layotto/shim/protocol",
    HERE / "host" / "protocol": "layotto/host/protocol",
}


def _well_known() -> str:
    """The directory of protobuf's own .proto files (google/protobuf/*.proto)."""
    try:
        from importlib.resources import files

        return str(files("grpc_tools") / "_proto")
    except Exception:  # pragma: no cover - very old grpc_tools
        import grpc_tools

        return str(Path(grpc_tools.__file__).parent / "_proto")


def generate_package(proto_dir: Path, virtual: str, out_dir: Path | None = None) -> list[Path]:
    """Compile every .proto in ``proto_dir`` into ``<name>_pb2.py`` in ``out_dir`` (default:
    ``proto_dir``), importing each other under ``virtual``."""
    from grpc_tools import protoc  # build-time dependency only

    out_dir = proto_dir if out_dir is None else out_dir
    protos = sorted(proto_dir.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{virtual}={proto_dir}",
            f"-I{_well_known()}",
            f"--python_out={tmp}",
            *[f"{virtual}/{p.name}" for p in protos],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        written = []
        for src in sorted((Path(tmp) / virtual).glob("*_pb2.py")):
            dest = out_dir / src.name
            dest.write_bytes(src.read_bytes())
            written.append(dest)
    return written


def generate() -> list[Path]:
    """Generate every protocol package's modules next to its .proto files."""
    return [path for proto_dir, virtual in PACKAGES.items() for path in generate_package(proto_dir, virtual)]


if __name__ == "__main__":
    for path in generate():
        print(path)
