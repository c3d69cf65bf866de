"""Finding a function's module in its rootfs's layers without mounting them
(shim/bundle.py: layer_dirs, find_in_layers): only the plain case is taken, anything an
overlay mount would resolve differently is left to the mount."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from layotto.shim.bundle import Mount, find_in_layers, layer_dirs


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
