"""Finding a function's module in its rootfs's layers without mounting them
(shim/bundle.py: layer_dirs, find_in_layers): only the plain case is taken, anything an
overlay mount would resolve differently is left to the mount. Then the module in a mounted
rootfs (locate_module: resolved inside it, never on the host) and the bundle's
root.readonly and bind mounts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from layotto.host.errors import ModuleError
from layotto.host.rootpath import DirMount
from layotto.shim.bundle import (
    BundleSpec,
    Mount,
    OciProcess,
    find_in_layers,
    layer_dirs,
    locate_module,
    locate_module_in_layers,
)


@pytest.fixture
def layers(tmp_path: Path) -> list[Path]:
    """upper, middle, lower: /fn.wasm and /app/fn.wasm in the lower layer."""
    made = [tmp_path / name for name in ("upper", "middle", "lower")]
    for layer in made:
        layer.mkdir()
    (made[2] / "app").mkdir()
    (made[2] / "fn.wasm").write_bytes(b"lower")
    (made[2] / "app" / "fn.wasm").write_bytes(b"lower-app")
    return made


def test_overlay_and_bind_mounts_give_their_layers_top_first() -> None:
    overlay = Mount("overlay", "overlay", ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"])
    assert layer_dirs([overlay]) == [Path("/u"), Path("/l1"), Path("/l2")]
    read_only = Mount("overlay", "overlay", ["lowerdir=/l1:/l2"])
    assert layer_dirs([read_only]) == [Path("/l1"), Path("/l2")]
    assert layer_dirs([Mount("bind", "/snap", ["rbind", "ro"])]) == [Path("/snap")]
    assert layer_dirs([Mount("none", "/snap", ["rbind"])]) == [Path("/snap")]
    assert layer_dirs([Mount("tmpfs", "tmpfs", [])]) is None
    assert layer_dirs([overlay, overlay]) is None
    assert layer_dirs([]) is None


def test_the_topmost_regular_file_wins(layers: list[Path]) -> None:
    assert find_in_layers(layers, "/fn.wasm") == layers[2] / "fn.wasm"
    assert find_in_layers(layers, "app/fn.wasm") == layers[2] / "app" / "fn.wasm"
    (layers[1] / "fn.wasm").write_bytes(b"middle")
    assert find_in_layers(layers, "/fn.wasm") == layers[1] / "fn.wasm"
    # A directory merged from several layers is looked through.
    (layers[0] / "app").mkdir()
    assert find_in_layers(layers, "/app/fn.wasm") == layers[2] / "app" / "fn.wasm"
    assert find_in_layers(layers, "/missing.wasm") is None


def test_whiteouts_are_left_to_the_mount(layers: list[Path]) -> None:
    os.mknod(layers[0] / "fn.wasm", 0o600 | 0o020000, os.makedev(0, 0))  # an overlay whiteout
    assert find_in_layers(layers, "/fn.wasm") is None
    os.mknod(layers[1] / "app", 0o600 | 0o020000, os.makedev(0, 0))  # a whited-out parent
    assert find_in_layers(layers, "/app/fn.wasm") is None


def test_a_symlink_on_the_way_is_left_to_the_mount(layers: list[Path]) -> None:
    (layers[0] / "fn.wasm").symlink_to("/app/fn.wasm")
    assert find_in_layers(layers, "/fn.wasm") is None
    (layers[1] / "app").symlink_to("/elsewhere")
    assert find_in_layers(layers, "/app/fn.wasm") is None


def test_an_opaque_directory_hides_the_layers_below(layers: list[Path]) -> None:
    (layers[0] / "app").mkdir()
    try:
        os.setxattr(layers[0] / "app", "trusted.overlay.opaque", b"y")
    except OSError as exc:  # trusted.* needs CAP_SYS_ADMIN; the user.* form does not
        if exc.errno not in (1, 95):  # EPERM, EOPNOTSUPP
            raise
        os.setxattr(layers[0] / "app", "user.overlay.opaque", b"y")
    assert find_in_layers(layers, "/app/fn.wasm") is None
    assert find_in_layers(layers, "/fn.wasm") == layers[2] / "fn.wasm"


def test_dot_paths_are_left_to_the_mount(layers: list[Path]) -> None:
    assert find_in_layers(layers, "/app/../fn.wasm") is None
    assert find_in_layers(layers, "/") is None


# --- the module and the mounts a bundle names, resolved without leaving the rootfs --------


def _bundle(tmp_path: Path, config: dict[str, object]) -> BundleSpec:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return BundleSpec.load(tmp_path)


def _spec(args: list[str], cwd: str = "/", env: list[str] | None = None) -> BundleSpec:
    return BundleSpec(
        path=Path("/nonexistent"),
        process=OciProcess(args=args, env=env or [], cwd=cwd, terminal=False),
        root_path=Path("/nonexistent/rootfs"),
        annotations={},
        memory_limit=None,
        cpu_quota_us=None,
        cpu_period_us=100_000,
    )


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """A rootfs with a module, beside a host directory holding another one."""
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "app.wasm").write_bytes(b"inside")
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "evil.wasm").write_bytes(b"host file")
    return root


def test_the_module_is_found_inside_the_rootfs_and_read_through_a_descriptor(rootfs: Path) -> None:
    (rootfs / "link.wasm").symlink_to("bin/app.wasm")
    for args0, image_path in [
        ("/bin/app.wasm", "/bin/app.wasm"),
        ("/link.wasm", "/link.wasm"),
        ("/../../bin/app.wasm", "/../../bin/app.wasm"),
    ]:
        ref = locate_module(_spec([args0]), rootfs)
        assert ref.image_path == image_path
        assert str(ref.host_path).startswith("/proc/self/fd/")
        assert ref.host_path.read_bytes() == b"inside"
        fd = int(ref.host_path.name)
        ref.close()
        with pytest.raises(OSError):
            os.fstat(fd)
    ref = locate_module(_spec(["app.wasm"], env=["PATH=/nope:/bin"]), rootfs)
    assert ref.image_path == "/bin/app.wasm"
    fd = int(ref.host_path.name)
    del ref  # the descriptor goes with the ref
    with pytest.raises(OSError):
        os.fstat(fd)


def test_the_module_path_cannot_name_a_host_file(rootfs: Path) -> None:
    host = rootfs.parent / "host"
    climb = "/" + "../" * 24
    (rootfs / "evil.wasm").symlink_to(host / "evil.wasm")
    (rootfs / "hostdir").symlink_to(host)
    (rootfs / "w").symlink_to("/")
    (rootfs / "up").symlink_to("../" * 24)
    (rootfs / "dir.wasm").mkdir()
    for args0 in [
        "/evil.wasm",
        "/hostdir/evil.wasm",
        climb + str(host / "evil.wasm").lstrip("/"),
        "/w" + str(host / "evil.wasm"),
        "/up" + str(host / "evil.wasm"),
        "/dir.wasm",
    ]:
        with pytest.raises(ModuleError, match="no such file in the container image"):
            locate_module(_spec([args0]), rootfs)
    with pytest.raises(ModuleError):
        locate_module(_spec(["evil.wasm"], cwd="/w" + str(host)), rootfs)


def test_a_module_found_in_the_layers_is_opened_without_following_links(layers: list[Path]) -> None:
    ref = locate_module_in_layers(_spec(["/app/fn.wasm"]), [Mount("bind", str(layers[2]), ["rbind"])])
    assert ref is not None and ref.host_path.read_bytes() == b"lower-app"
    assert str(ref.host_path).startswith("/proc/self/fd/")
    (layers[2] / "link.wasm").symlink_to("/etc/hostname")
    assert locate_module_in_layers(_spec(["/link.wasm"]), [Mount("bind", str(layers[2]), ["rbind"])]) is None


def test_root_readonly_and_directory_bind_mounts_are_read(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    spec = _bundle(
        tmp_path,
        {
            "process": {"args": ["/m.wasm"], "cwd": "/"},
            "root": {"path": "rootfs", "readonly": True},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev/shm", "type": "bind", "source": str(volume), "options": ["rbind"]},
                {"destination": "/run", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/etc/hosts", "type": "bind", "source": str(hosts), "options": ["rbind"]},
                {"destination": "/data/", "type": "bind", "source": str(volume), "options": ["rbind", "ro"]},
                {"destination": "//cache/./x", "type": "none", "source": str(volume), "options": ["bind"]},
                {"destination": "/rw", "source": str(volume), "options": ["rbind", "ro", "rw"]},
            ],
        },
    )
    assert spec.readonly
    assert spec.mounts == [
        DirMount("/data", str(volume), True),
        DirMount("/cache/x", str(volume), False),
        DirMount("/rw", str(volume), False),
    ]
    assert not _bundle(tmp_path, {"process": {"args": ["/m.wasm"]}}).readonly


@pytest.mark.parametrize(
    ("destination", "message"),
    [("data", "not an absolute path"), ("/data/../etc", "contains '..'"), ("/", "root")],
)
def test_a_bad_mount_destination_is_refused(tmp_path: Path, destination: str, message: str) -> None:
    config = {
        "process": {"args": ["/m.wasm"]},
        "mounts": [{"destination": destination, "type": "bind", "source": str(tmp_path)}],
    }
    with pytest.raises(ModuleError, match=message):
        _bundle(tmp_path, config)
