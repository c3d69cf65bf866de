"""Write OCI image layout archives that ``ctr images import`` accepts.

:func:`build_image` writes an ordinary OCI image (one gzip-compressed layer holding the
files, a config with Entrypoint/Cmd/Env/WorkingDir); :func:`build_wasm_artifact` writes
an OCI wasm artifact (config ``application/vnd.wasm.config.v0+json``, one
``application/wasm`` layer that is the module). Builds are reproducible (fixed timestamps
and owners). Only the standard library is used, so the builder runs anywhere Python does;
pushing an archive to a registry is :mod:`layotto.images.registry`.

See docs/ctr.md, docs/oci-artifacts.md and docs/registries.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import posixpath
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "ANNOTATION_IMAGE_NAME",
    "ANNOTATION_REF_NAME",
    "ANNOTATION_TITLE",
    "HOST_ARCHITECTURE",
    "MEDIA_TYPE_IMAGE_CONFIG",
    "MEDIA_TYPE_IMAGE_INDEX",
    "MEDIA_TYPE_IMAGE_LAYER_GZIP",
    "MEDIA_TYPE_IMAGE_MANIFEST",
    "MEDIA_TYPE_WASM_CONFIG",
    "MEDIA_TYPE_WASM_LAYER",
    "WASM_MAGIC",
    "ImageBuildError",
    "build_image",
    "build_wasm_artifact",
    "busybox_image",
    "is_wasm",
    "layer_tar",
    "main",
    "normalize_reference",
]

MEDIA_TYPE_IMAGE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_IMAGE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_WASM_CONFIG = "application/vnd.wasm.config.v0+json"
MEDIA_TYPE_WASM_LAYER = "application/wasm"

#: containerd's image-name annotation: ``ctr images import`` names the image with it.
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
#: The OCI layout's reference annotation (the tag).
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_TITLE = "org.opencontainers.image.title"

WASM_MAGIC = b"\0asm"

_GO_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}

#: This machine's architecture as Go (and so OCI) spells it: ``amd64``, ``arm64``, ...
HOST_ARCHITECTURE = _GO_ARCH.get(platform.machine().lower(), platform.machine().lower())

FileSource = Path | bytes


class ImageBuildError(Exception):
    """An input cannot be turned into an image (missing file, bad path, bad name)."""


@dataclass(frozen=True)
class _Blob:
    media_type: str
    data: bytes
    annotations: Mapping[str, str] | None = None

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.data),
        }
        if self.annotations:
            desc["annotations"] = dict(self.annotations)
        return desc


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(value) if value.isdigit() else 0


def _created() -> str:
    return datetime.fromtimestamp(_epoch(), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_wasm(data: bytes) -> bool:
    """Whether ``data`` starts with the WebAssembly magic number."""
    return data[:4] == WASM_MAGIC


def normalize_reference(name: str) -> str:
    """Return the fully qualified form of an image reference, as CRI names images.

    ``hello`` → ``docker.io/library/hello:latest``; ``ghcr.io/x/fn`` → ``ghcr.io/x/fn:latest``.
    Digest references are rejected: the digest of a built image is an output, not an input.
    """
    if not name or name != name.strip() or any(c.isspace() for c in name):
        raise ImageBuildError(f"invalid image name {name!r}")
    if "@" in name:
        raise ImageBuildError(f"image name {name!r} must use a tag, not a digest")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain, remainder = first, rest
    else:
        domain, remainder = "docker.io", name
        if domain == "docker.io" and "/" not in remainder:
            remainder = "library/" + remainder
    last = remainder.rsplit("/", 1)[-1]
    if ":" not in last:
        remainder += ":latest"
    repository, _, tag = remainder.rpartition(":")
    if not repository or not tag or repository != repository.lower():
        raise ImageBuildError(f"invalid image name {name!r}")
    return f"{domain}/{remainder}"


def _image_path(path: str) -> str:
    """Normalise an image path to its tar member name (relative, no ``..``)."""
    clean = posixpath.normpath("/" + path.strip()).lstrip("/")
    if not clean or clean == "." or ".." in path.split("/"):
        raise ImageBuildError(f"invalid path in image: {path!r}")
    return clean


def _read_source(source: FileSource, image_path: str | None = None) -> bytes:
    if isinstance(source, bytes):
        return source
    where = f" (for /{image_path})" if image_path else ""
    try:
        return Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageBuildError(f"{source}: no such file{where}") from None
    except IsADirectoryError:
        raise ImageBuildError(f"{source}: is a directory{where}") from None
    except OSError as exc:
        raise ImageBuildError(f"{source}: {exc.strerror}{where}") from None


def layer_tar(
    files: Mapping[str, FileSource],
    symlinks: Mapping[str, str] | None = None,
) -> bytes:
    """Build an uncompressed, reproducible layer tar.

    Files get mode 0755, parent directories are added with mode 0755, everything is
    owned by 0:0 with mtime ``SOURCE_DATE_EPOCH`` (default 0).
    """
    mtime = _epoch()
    entries: dict[str, tuple[str, bytes | str]] = {}
    for path, source in files.items():
        name = _image_path(path)
        if name in entries:
            raise ImageBuildError(f"duplicate path in image: /{name}")
        entries[name] = ("file", _read_source(source, name))
    for path, target in (symlinks or {}).items():
        name = _image_path(path)
        if name in entries:
            raise ImageBuildError(f"duplicate path in image: /{name}")
        if not target:
            raise ImageBuildError(f"empty symlink target for /{name}")
        entries[name] = ("symlink", target)

    directories: set[str] = set()
    for name in entries:
        parent = posixpath.dirname(name)
        while parent:
            if parent in entries:
                raise ImageBuildError(f"/{parent} is both a file and a directory")
            directories.add(parent)
            parent = posixpath.dirname(parent)

    def header(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.mtime = mtime
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(directories | entries.keys()):
            if name in directories:
                tar.addfile(header(name, tarfile.DIRTYPE, 0o755))
                continue
            kind, value = entries[name]
            if kind == "file":
                assert isinstance(value, bytes)
                info = header(name, tarfile.REGTYPE, 0o755)
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
            else:
                assert isinstance(value, str)
                info = header(name, tarfile.SYMTYPE, 0o777)
                info.linkname = value
                tar.addfile(info)
    return buffer.getvalue()


def _write_layout(output: Path, manifest: _Blob, blobs: Sequence[_Blob], name: str) -> str:
    """Write the OCI layout tar (atomically) and return the manifest digest."""
    reference = normalize_reference(name)
    tag = reference.rsplit(":", 1)[1]
    manifest_descriptor = manifest.descriptor()
    manifest_descriptor["annotations"] = {
        ANNOTATION_IMAGE_NAME: reference,
        ANNOTATION_REF_NAME: tag,
    }
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_INDEX,
        "manifests": [manifest_descriptor],
    }
    mtime = _epoch()
    members: list[tuple[str, bytes | None]] = [
        ("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
        ("index.json", _json(index)),
        ("blobs", None),
        ("blobs/sha256", None),
    ]
    seen: set[str] = set()
    for blob in [*blobs, manifest]:
        if blob.digest not in seen:
            seen.add(blob.digest)
            members.append(("blobs/sha256/" + blob.digest.split(":", 1)[1], blob.data))

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.mtime = mtime
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if data is None:
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                else:
                    info.mode = 0o644
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, output)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return manifest.digest


def build_image(
    output: Path,
    files: Mapping[str, FileSource],
    *,
    name: str,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    workdir: str | None = None,
    architecture: str = HOST_ARCHITECTURE,
    os: str = "linux",
    symlinks: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> str:
    """Write an OCI image layout archive with one layer holding ``files``.

    ``files`` maps image paths (``/hello.wasm``) to a host file or the bytes themselves;
    ``symlinks`` maps image paths to link targets. ``name`` is the image reference
    (normalised: ``hello`` becomes ``docker.io/library/hello:latest``). ``annotations``
    go on the manifest, ``labels`` into the config. Returns the manifest digest.
    """
    for item in env or []:
        if "=" not in item or item.startswith("="):
            raise ImageBuildError(f"environment entry {item!r} is not NAME=VALUE")
    layer = layer_tar(files, symlinks)
    compressed = gzip.compress(layer, compresslevel=9, mtime=0)
    created = _created()

    container_config: dict[str, Any] = {}
    if env:
        container_config["Env"] = list(env)
    if entrypoint:
        container_config["Entrypoint"] = list(entrypoint)
    if cmd:
        container_config["Cmd"] = list(cmd)
    if workdir:
        container_config["WorkingDir"] = workdir
    if labels:
        container_config["Labels"] = dict(labels)
    config = {
        "created": created,
        "architecture": architecture,
        "os": os,
        "config": container_config,
        "rootfs": {
            "type": "layers",
            "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()],
        },
        "history": [{"created": created, "created_by": "layotto image build"}],
    }
    config_blob = _Blob(MEDIA_TYPE_IMAGE_CONFIG, _json(config))
    layer_blob = _Blob(MEDIA_TYPE_IMAGE_LAYER_GZIP, compressed)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [layer_blob.descriptor()],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    manifest_blob = _Blob(MEDIA_TYPE_IMAGE_MANIFEST, _json(manifest))
    return _write_layout(output, manifest_blob, [config_blob, layer_blob], name)


def build_wasm_artifact(
    output: Path,
    wasm: Path,
    *,
    name: str,
    annotations: Mapping[str, str] | None = None,
) -> str:
    """Write an OCI wasm artifact archive: one ``application/wasm`` layer, wasm config.

    Returns the manifest digest.
    """
    wasm = Path(wasm)
    data = _read_source(wasm)
    if not is_wasm(data):
        raise ImageBuildError(f"{wasm}: not a WebAssembly module (no \\0asm magic)")
    layer_blob = _Blob(MEDIA_TYPE_WASM_LAYER, data, {ANNOTATION_TITLE: wasm.name})
    config = {
        "created": _created(),
        "architecture": "wasm",
        "os": "wasip1",
        "layerDigests": [layer_blob.digest],
    }
    config_blob = _Blob(MEDIA_TYPE_WASM_CONFIG, _json(config))
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [layer_blob.descriptor()],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    manifest_blob = _Blob(MEDIA_TYPE_IMAGE_MANIFEST, _json(manifest))
    return _write_layout(output, manifest_blob, [config_blob, layer_blob], name)


#: Applets linked to busybox in :func:`busybox_image`.
BUSYBOX_APPLETS = ("sh", "echo", "cat", "ls", "sleep", "true", "false")


def busybox_image(
    output: Path,
    name: str = "docker.io/library/busybox:layotto",
    *,
    busybox: Path = Path("/bin/busybox"),
) -> str:
    """Write a minimal runc image: a static busybox plus ``/bin/sh``, ``/bin/echo``, ... links.

    ``busybox`` must be a statically linked binary (Debian's busybox-static is).
    Returns the manifest digest.
    """
    return build_image(
        output,
        {"/bin/busybox": Path(busybox)},
        name=name,
        cmd=["/bin/sh"],
        env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        symlinks={f"/bin/{applet}": "busybox" for applet in BUSYBOX_APPLETS},
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layotto image",
        description="Build OCI image archives for `ctr images import`, and push them to registries.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build",
        help="package a WebAssembly module as an image",
        description=(
            "Package a WebAssembly module as an OCI image archive. Without --entrypoint "
            "or --cmd the image's CMD is the module's path; note that a pod's `args` "
            "replace CMD, so images meant to take arguments should use --entrypoint."
        ),
    )
    build.add_argument("--wasm", required=True, type=Path, help="the .wasm module")
    build.add_argument("--name", required=True, help="image reference, e.g. docker.io/library/hello:latest")
    build.add_argument("-o", "--output", required=True, type=Path, help="archive to write")
    build.add_argument("--path", help="module path in the image (default: /<basename of --wasm>)")
    build.add_argument("--entrypoint", nargs="+", metavar="ARG", help="image ENTRYPOINT")
    build.add_argument("--cmd", nargs="+", metavar="ARG", help="image CMD")
    build.add_argument("--env", action="append", default=[], metavar="K=V", help="image Env (repeatable)")
    build.add_argument("--workdir", help="image WorkingDir")
    build.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="SRC:DEST",
        help="also add host file SRC at image path DEST (repeatable)",
    )
    build.add_argument(
        "--arch", default=HOST_ARCHITECTURE, help=f"image architecture (default {HOST_ARCHITECTURE})"
    )
    build.add_argument(
        "--artifact",
        action="store_true",
        help="write an OCI wasm artifact (application/wasm layer) instead of an image",
    )
    build.add_argument(
        "--push",
        metavar="REFERENCE",
        help="then push the archive to a registry as REFERENCE (e.g. 127.0.0.1:5000/hello:v1)",
    )
    _registry_arguments(build)

    push = commands.add_parser(
        "push",
        help="push an image archive to a registry",
        description=(
            "Push an OCI image archive (as `layotto image build` writes) to a registry with "
            "the OCI distribution API. Loopback registries are spoken to over plain HTTP."
        ),
    )
    push.add_argument("archive", type=Path, help="the image archive")
    push.add_argument("reference", help="where to push: HOST[:PORT]/REPOSITORY[:TAG]")
    _registry_arguments(push)

    bb = commands.add_parser("busybox", help="a static busybox image, a runc baseline")
    bb.add_argument("--name", default="docker.io/library/busybox:layotto", help="image reference")
    bb.add_argument("-o", "--output", required=True, type=Path, help="archive to write")
    bb.add_argument("--busybox", type=Path, default=Path("/bin/busybox"), help="static busybox binary")
    return parser


def _registry_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--insecure", action="store_true", help="plain HTTP even for a registry that is not on loopback"
    )
    parser.add_argument("--username", help="registry user (default: $LAYOTTO_REGISTRY_USERNAME)")
    parser.add_argument("--password", help="registry password (default: $LAYOTTO_REGISTRY_PASSWORD)")


def _push(archive: Path, reference: str, args: argparse.Namespace) -> str:
    from layotto.images import registry

    digest = registry.push_archive(
        archive, reference, insecure=args.insecure, username=args.username, password=args.password
    )
    print(f"pushed {registry.parse_reference(reference)}@{digest}", file=sys.stderr)
    return digest


def _run(args: argparse.Namespace) -> str:
    if args.command == "busybox":
        return busybox_image(args.output, args.name, busybox=args.busybox)
    if args.command == "push":
        return _push(args.archive, args.reference, args)
    digest = _build(args)
    if args.push:
        _push(args.output, args.push, args)
    return digest


def _build(args: argparse.Namespace) -> str:
    wasm: Path = args.wasm
    data = _read_source(wasm)
    if not is_wasm(data):
        raise ImageBuildError(f"{wasm}: not a WebAssembly module (no \\0asm magic)")
    if args.artifact:
        extras = [
            flag
            for flag, value in (
                ("--path", args.path),
                ("--entrypoint", args.entrypoint),
                ("--cmd", args.cmd),
                ("--env", args.env),
                ("--workdir", args.workdir),
                ("--add", args.add),
            )
            if value
        ]
        if extras:
            raise ImageBuildError(f"--artifact takes no {', '.join(extras)}")
        return build_wasm_artifact(args.output, wasm, name=args.name)

    path = "/" + _image_path(args.path or wasm.name)
    files: dict[str, FileSource] = {path: data}
    for spec in args.add:
        src, sep, dest = spec.rpartition(":")
        if not sep or not src or not dest:
            raise ImageBuildError(f"--add {spec!r}: expected SRC:DEST")
        files["/" + _image_path(dest)] = Path(src)
    cmd = args.cmd
    if not args.entrypoint and not cmd:
        cmd = [path]
    return build_image(
        args.output,
        files,
        name=args.name,
        entrypoint=args.entrypoint,
        cmd=cmd,
        env=args.env,
        workdir=args.workdir,
        architecture=args.arch,
    )


def main(argv: list[str] | None = None) -> int:
    """``layotto image``: build and push image archives. Prints the manifest digest;
    returns the exit code."""
    from layotto.images.registry import RegistryError

    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        digest = _run(args)
    except ImageBuildError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except RegistryError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
