"""The OCI image builder: archive structure, digests, media types, CLI errors (no containerd)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from layotto.images import builder

# The smallest valid module: magic + version, no sections.
WASM = b"\0asm\x01\x00\x00\x00"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI layout archive opened for inspection, checking every descriptor it follows."""

    def __init__(self, path: Path) -> None:
        with tarfile.open(path) as tar:
            self.members = {
                m.name.rstrip("/"): tar.extractfile(m).read() if m.isfile() else None
                for m in tar.getmembers()
            }
        assert json.loads(self.members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
        self.index = json.loads(self.members["index.json"])
        assert self.index["schemaVersion"] == 2
        assert self.index["mediaType"] == builder.MEDIA_TYPE_IMAGE_INDEX
        (self.descriptor,) = self.index["manifests"]
        self.manifest = json.loads(self.blob(self.descriptor))
        assert self.manifest["schemaVersion"] == 2
        assert self.manifest["mediaType"] == builder.MEDIA_TYPE_IMAGE_MANIFEST
        self.config_bytes = self.blob(self.manifest["config"])
        self.config = json.loads(self.config_bytes)
        (self.layer_descriptor,) = self.manifest["layers"]
        self.layer = self.blob(self.layer_descriptor)

    def blob(self, descriptor: dict[str, Any]) -> bytes:
        algorithm, hexdigest = descriptor["digest"].split(":")
        assert algorithm == "sha256"
        data = self.members[f"blobs/sha256/{hexdigest}"]
        assert data is not None
        assert sha256(data) == descriptor["digest"]
        assert len(data) == descriptor["size"]
        return data


def test_image_archive_is_consistent(tmp_path: Path) -> None:
    wasm_file = tmp_path / "fn.wasm"
    wasm_file.write_bytes(WASM)
    out = tmp_path / "img.tar"
    digest = builder.build_image(
        out,
        {"/app/fn.wasm": wasm_file, "/etc/greeting": b"hi\n"},
        name="docker.io/library/fn:v1",
        entrypoint=["/app/fn.wasm"],
        cmd=["--flag"],
        env=["GREETING=hello"],
        workdir="/app",
        architecture="arm64",
        symlinks={"/bin/fn": "../app/fn.wasm"},
    )
    layout = Layout(out)
    assert layout.descriptor["digest"] == digest
    assert layout.descriptor["annotations"] == {
        builder.ANNOTATION_IMAGE_NAME: "docker.io/library/fn:v1",
        builder.ANNOTATION_REF_NAME: "v1",
    }
    assert layout.manifest["config"]["mediaType"] == builder.MEDIA_TYPE_IMAGE_CONFIG
    assert layout.layer_descriptor["mediaType"] == builder.MEDIA_TYPE_IMAGE_LAYER_GZIP

    config = layout.config
    assert (config["architecture"], config["os"]) == ("arm64", "linux")
    assert config["config"] == {
        "Entrypoint": ["/app/fn.wasm"],
        "Cmd": ["--flag"],
        "Env": ["GREETING=hello"],
        "WorkingDir": "/app",
    }
    uncompressed = gzip.decompress(layout.layer)
    assert config["rootfs"] == {"type": "layers", "diff_ids": [sha256(uncompressed)]}

    with tarfile.open(fileobj=io.BytesIO(uncompressed)) as layer:
        members = {m.name.rstrip("/"): m for m in layer.getmembers()}
        assert sorted(members) == ["app", "app/fn.wasm", "bin", "bin/fn", "etc", "etc/greeting"]
        assert layer.extractfile(members["app/fn.wasm"]).read() == WASM
        assert layer.extractfile(members["etc/greeting"]).read() == b"hi\n"
        assert members["bin/fn"].issym() and members["bin/fn"].linkname == "../app/fn.wasm"
        assert members["app"].isdir()
        for member in members.values():
            assert (member.uid, member.gid, member.mtime) == (0, 0, 0)
        assert members["app/fn.wasm"].mode == 0o755


def test_builds_are_reproducible(tmp_path: Path) -> None:
    digests = [builder.build_image(tmp_path / f"{i}.tar", {"/fn.wasm": WASM}, name="fn") for i in range(2)]
    assert digests[0] == digests[1]
    assert (tmp_path / "0.tar").read_bytes() == (tmp_path / "1.tar").read_bytes()


def test_wasm_artifact(tmp_path: Path) -> None:
    wasm_file = tmp_path / "fn.wasm"
    wasm_file.write_bytes(WASM)
    out = tmp_path / "artifact.tar"
    digest = builder.build_wasm_artifact(out, wasm_file, name="ghcr.io/example/fn:1.0")
    layout = Layout(out)
    assert layout.descriptor["digest"] == digest
    assert layout.descriptor["annotations"][builder.ANNOTATION_IMAGE_NAME] == "ghcr.io/example/fn:1.0"
    assert layout.manifest["config"]["mediaType"] == "application/vnd.wasm.config.v0+json"
    assert layout.layer_descriptor["mediaType"] == "application/wasm"
    assert layout.layer == WASM
    assert layout.config["architecture"] == "wasm"
    assert layout.config["os"] == "wasip1"
    assert layout.config["layerDigests"] == [sha256(WASM)]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("hello", "docker.io/library/hello:latest"),
        ("hello:v2", "docker.io/library/hello:v2"),
        ("acme/fn", "docker.io/acme/fn:latest"),
        ("localhost:5000/fn:dev", "localhost:5000/fn:dev"),
        ("ghcr.io/acme/fn", "ghcr.io/acme/fn:latest"),
    ],
)
def test_normalize_reference(name: str, expected: str) -> None:
    assert builder.normalize_reference(name) == expected


@pytest.mark.parametrize("name", ["", "Hello", "fn@sha256:" + "0" * 64, "a b"])
def test_rejects_bad_names(name: str) -> None:
    with pytest.raises(builder.ImageBuildError):
        builder.normalize_reference(name)


def test_cli_build_default_cmd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wasm_file = tmp_path / "hello.wasm"
    wasm_file.write_bytes(WASM)
    out = tmp_path / "hello.tar"
    assert builder.main(["build", "--wasm", str(wasm_file), "--name", "hello", "-o", str(out)]) == 0
    layout = Layout(out)
    assert capsys.readouterr().out.strip() == layout.descriptor["digest"]
    assert layout.config["config"]["Cmd"] == ["/hello.wasm"]
    assert "Entrypoint" not in layout.config["config"]


def test_cli_rejects_non_wasm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notwasm.txt"
    text.write_text("this is not wasm\n")
    out = tmp_path / "x.tar"
    assert builder.main(["build", "--wasm", str(text), "--name", "x", "-o", str(out)]) == 2
    assert str(text) in capsys.readouterr().err
    assert not out.exists()


def test_cli_rejects_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.wasm"
    assert builder.main(["build", "--wasm", str(missing), "--name", "x", "-o", str(tmp_path / "x.tar")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_busybox_image(tmp_path: Path) -> None:
    fake = tmp_path / "busybox"
    fake.write_bytes(b"\x7fELF fake")
    out = tmp_path / "busybox.tar"
    builder.busybox_image(out, "docker.io/library/busybox:layotto", busybox=fake)
    layout = Layout(out)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layout.layer))) as layer:
        members = {m.name: m for m in layer.getmembers()}
    assert members["bin/busybox"].isfile()
    for applet in ("sh", "echo"):
        assert members[f"bin/{applet}"].issym() and members[f"bin/{applet}"].linkname == "busybox"
