"""A container's filesystem against the node's, through a real containerd (`ctr run`).

Every attack is an image built here (or a `ctr run` option), run by the real shim and
node host: a working directory climbing out of the rootfs with ``..``, or through a
symlink to ``/`` in a layer; a module path through such a symlink; writing a read-only
rootfs or a read-only bind mount; and a command module without a memory limit trying to
take 1 GiB. The safe outcome is asserted from the host's side: the root-owned 0600 secret
the test planted outside the rootfs was not read, nothing was created next to it.

Unit tests of the resolver itself (host/rootpath.py) come first; they need no containerd.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from layotto.host import rootpath
from layotto.images import builder
from tests.containerd_env import Containerd
from tests.cri_client import CONTAINER_EXITED, CriClient, read_cri_log

RUNTIME = "io.containerd.layotto.v1"
PROBE = "/fsprobe.wasm"
CLIMB = "/" + "../" * 24  # more `..` than any rootfs path on the node is deep

_ids = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


# --- the resolver (host/rootpath.py) ---------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A rootfs with hostile links, beside an ``outside`` directory; yields (rootfs, fd)."""
    root = tmp_path / "rootfs"
    (root / "app" / "data").mkdir(parents=True)
    (root / "file").write_text("in the rootfs\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("outside\n")
    (root / "to-root").symlink_to("/")
    (root / "to-outside").symlink_to(tmp_path / "outside")
    (root / "up").symlink_to("../../../../../../..")
    (root / "app" / "up2").symlink_to("../../..")
    (root / "loop-a").symlink_to("loop-b")
    (root / "loop-b").symlink_to("loop-a")
    (root / "self").symlink_to("self")
    (root / "to-file").symlink_to("/file")
    (root / "magic").symlink_to("/proc/self/root")
    fd = rootpath.open_root(root)
    yield root, fd
    os.close(fd)


def resolved(fd: int, path: str, *, directory: bool = True) -> str:
    opened = rootpath.open_in_root(fd, path, directory=directory)
    try:
        return os.readlink(rootpath.fd_path(opened))
    finally:
        os.close(opened)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", ""),
        ("", ""),
        ("/app/data", "/app/data"),
        ("app/data", "/app/data"),
        ("/../../../..", ""),  # `..` past the root stays at the root
        (CLIMB + "app", "/app"),
        ("/app/../../../app/data", "/app/data"),
        ("/to-root", ""),  # an absolute symlink is resolved from the rootfs
        ("/to-root/app", "/app"),
        ("/up", ""),  # a relative symlink climbing out is clamped too
        ("/app/up2/app/data", "/app/data"),
    ],
)
def test_paths_resolve_inside_the_root(tree: tuple[Path, int], path: str, expected: str) -> None:
    root, fd = tree
    assert resolved(fd, path) == str(root) + expected


def test_a_symlink_to_a_host_path_names_the_same_path_in_the_rootfs(tree: tuple[Path, int]) -> None:
    root, fd = tree
    outside = root.parent / "outside"
    with pytest.raises(FileNotFoundError):  # /<tmp>/outside inside the rootfs: not there
        rootpath.open_in_root(fd, "/to-outside/secret")
    (root / str(outside).lstrip("/")).mkdir(parents=True)
    assert resolved(fd, "/to-outside") == str(root) + str(outside)


@pytest.mark.parametrize("path", ["/loop-a", "/self", "/loop-a/x"])
def test_symlink_loops_fail_with_eloop(tree: tuple[Path, int], path: str) -> None:
    with pytest.raises(OSError) as caught:
        rootpath.open_in_root(tree[1], path, directory=True)
    assert caught.value.errno == errno.ELOOP
    assert caught.value.filename == path


def test_magic_links_are_refused(tree: tuple[Path, int]) -> None:
    # In a rootfs, /magic -> /proc/self/root names the rootfs's own (absent) /proc ...
    with pytest.raises(FileNotFoundError):
        rootpath.open_in_root(tree[1], "/magic")
    # ... and where procfs is reachable, its magic links are not followed.
    host = rootpath.open_root("/")
    try:
        for path in ("/proc/self/root/etc", f"/proc/self/fd/{tree[1]}"):
            with pytest.raises(OSError) as caught:
                rootpath.open_in_root(host, path, directory=True)
            assert caught.value.errno == errno.ELOOP
    finally:
        os.close(host)


@pytest.mark.parametrize("path", ["/file", "/to-file", "/file/x"])
def test_a_file_where_a_directory_is_expected_is_enotdir(tree: tuple[Path, int], path: str) -> None:
    with pytest.raises(NotADirectoryError):
        rootpath.open_in_root(tree[1], path, directory=True)


def test_a_file_resolves_when_no_directory_is_asked(tree: tuple[Path, int]) -> None:
    root, fd = tree
    assert resolved(fd, "/to-file", directory=False) == str(root / "file")
    with pytest.raises(OSError):  # a NUL byte would cut the path short: refused
        rootpath.open_in_root(fd, "/fi\0le")


def test_mount_sources_must_be_real_directories(tree: tuple[Path, int]) -> None:
    root, _fd = tree
    fd = rootpath.open_host_dir(str(root / "app"))
    os.close(fd)
    for bad, code in [
        (root / "to-root", errno.ELOOP),  # a symlink is refused, not followed
        (root / "file", errno.ENOTDIR),
        (root / "missing", errno.ENOENT),
    ]:
        with pytest.raises(OSError) as caught:
            rootpath.open_host_dir(str(bad))
        assert caught.value.errno == code, bad
    with pytest.raises(OSError):
        rootpath.open_host_dir("relative/path")


def test_open_beneath_follows_no_symlink(tree: tuple[Path, int]) -> None:
    root, fd = tree
    os.close(rootpath.open_beneath(fd, "app/data"))
    for path in ("to-file", "to-root/file", "app/up2", "../x", "/file"):
        with pytest.raises(OSError):
            rootpath.open_beneath(fd, path)


# --- through containerd ------------------------------------------------------------------


@dataclass
class Secret:
    """A root-owned 0600 file outside every rootfs, and the directory it is in."""

    path: Path
    text: str

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def relative(self) -> str:
        """The secret's path relative to the host's root (what a cwd of / would open)."""
        return str(self.path).lstrip("/")


@pytest.fixture
def secret(tmp_path: Path) -> Secret:
    directory = tmp_path / "node-private"
    directory.mkdir()
    text = "TOPSECRET-" + secrets.token_hex(8)
    path = directory / "secret"
    path.write_text(text + "\n")
    os.chown(path, 0, 0)
    path.chmod(0o600)
    return Secret(path, text)


class Images:
    """Builds and imports one small image per test (the probe module, plus links)."""

    def __init__(self, c: Containerd, wasm_dir: Path, out: Path) -> None:
        self.c = c
        self.wasm_dir = wasm_dir
        self.out = out

    def build(
        self,
        *,
        workdir: str | None = None,
        symlinks: dict[str, str] | None = None,
        cmd: list[str] | None = None,
        files: dict[str, Path] | None = None,
    ) -> str:
        name = new_id("layotto-fs")
        ref = f"docker.io/library/{name}:latest"
        archive = self.out / f"{name}.tar"
        builder.build_image(
            archive,
            files or {PROBE: self.wasm_dir / "fsprobe.wasm"},
            name=ref,
            cmd=cmd or [PROBE],
            workdir=workdir,
            symlinks=symlinks,
        )
        self.c.import_image(archive)
        return ref

    def run(self, ref: str, *cmd: str, opts: tuple[str, ...] = ()) -> tuple[int, str, str]:
        r = self.c.ctr(
            "run", "--rm", "--runtime", RUNTIME, *opts, ref, new_id("fs"), *cmd, check=False, timeout=60
        )
        return r.returncode, r.stdout, r.stderr


@pytest.fixture
def images(containerd: Containerd, wasm_dir: Path, tmp_path: Path) -> Images:
    if not (wasm_dir / "fsprobe.wasm").is_file():
        pytest.fail(f"{wasm_dir / 'fsprobe.wasm'} is missing: run `make modules`", pytrace=False)
    out = tmp_path / "images"
    out.mkdir()
    return Images(containerd, wasm_dir, out)


def probes(secret: Secret) -> tuple[str, ...]:
    """Read the secret and create a file beside it, relatively (from the working
    directory) and absolutely."""
    rel, absolute = secret.relative, str(secret.path)
    created_rel = f"{secret.relative.rsplit('/', 1)[0]}/created-rel"
    created_abs = f"{secret.directory}/created-abs"
    return (f"read:{rel}", f"read:{absolute}", f"write:{created_rel}", f"write:{created_abs}", "list:.")


def assert_confined(status: int, out: str, err: str, secret: Secret) -> None:
    assert status == 0, out + err
    assert secret.text not in out + err
    lines = [line for line in out.splitlines() if line.startswith(("read ", "write "))]
    assert len(lines) == 4, out
    assert all(": error " in line for line in lines), out
    assert sorted(p.name for p in secret.directory.iterdir()) == ["secret"]
    assert secret.path.read_text() == secret.text + "\n"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("workdir", "symlinks"),
    [
        (CLIMB, None),  # WorkingDir /../../../..
        ("/w", {"/w": "/"}),  # a layer's symlink to / as the WorkingDir
        ("/w", {"/w": "../" * 24}),  # a relative symlink climbing out
        ("/a/w", {"/a/w": "/b", "/b": CLIMB}),  # a chain of links
    ],
    ids=["dotdot", "abs-symlink", "rel-symlink", "link-chain"],
)
def test_the_working_directory_cannot_leave_the_rootfs(
    images: Images, secret: Secret, workdir: str, symlinks: dict[str, str] | None
) -> None:
    ref = images.build(workdir=workdir, symlinks=symlinks)
    status, out, err = images.run(ref, PROBE, *probes(secret))
    assert_confined(status, out, err, secret)


@pytest.mark.integration
def test_the_cwd_option_cannot_leave_the_rootfs_either(images: Images, secret: Secret) -> None:
    ref = images.build()
    status, out, err = images.run(ref, PROBE, *probes(secret), opts=("--cwd", CLIMB))
    assert_confined(status, out, err, secret)


@pytest.mark.integration
@pytest.mark.parametrize("workdir", ["/nowhere", "/probe-file"])
def test_a_working_directory_that_is_not_a_directory_fails_the_start(images: Images, workdir: str) -> None:
    files = {PROBE: images.wasm_dir / "fsprobe.wasm", "/probe-file": b"not a directory\n"}
    ref = images.build(workdir=workdir, files=files)
    status, out, err = images.run(ref, PROBE, "list:.")
    assert status != 0
    assert f"working directory '{workdir}'" in err
    assert "list" not in out


@pytest.mark.integration
@pytest.mark.parametrize(
    ("cmd", "symlinks"),
    [
        (["/m.wasm"], {"/m.wasm": "{host}"}),  # args[0] is a symlink to a host module
        (["/bin/m.wasm"], {"/bin": "{host_dir}"}),  # ... through a symlinked directory
        (["{climb}{host_rel}"], None),  # args[0] climbs out with ..
        (["m.wasm"], {"/w": "/"}),  # found on PATH, through w -> /
    ],
    ids=["link-to-host-file", "link-to-host-dir", "dotdot", "relative-on-path"],
)
def test_the_module_path_cannot_leave_the_rootfs(
    images: Images, tmp_path: Path, cmd: list[str], symlinks: dict[str, str] | None
) -> None:
    host_dir = tmp_path / "host-modules"
    host_dir.mkdir()
    host_module = host_dir / "m.wasm"
    shutil.copy(images.wasm_dir / "echoargs.wasm", host_module)
    host_module.chmod(0o600)
    values = {
        "host": str(host_module),
        "host_dir": str(host_dir),
        "climb": CLIMB,
        "host_rel": str(host_module).lstrip("/"),
    }
    cmd = [part.format(**values) for part in cmd]
    links = {k: v.format(**values) for k, v in (symlinks or {}).items()}
    ref = images.build(cmd=cmd, symlinks=links or None)
    opts: tuple[str, ...] = ()
    if cmd == ["m.wasm"]:
        opts = ("--env", f"PATH=/w{host_dir}")
    status, out, err = images.run(ref, opts=opts)
    assert status != 0, out
    assert "arg[0]" not in out  # echoargs never ran
    assert "no such file in the container image" in err


@pytest.mark.integration
def test_a_read_only_rootfs_cannot_be_written(images: Images) -> None:
    ref = images.build(files={PROBE: images.wasm_dir / "fsprobe.wasm", "/etc/conf": b"setting\n"})
    status, out, _ = images.run(
        ref, PROBE, "read:/etc/conf", "write:/etc/conf", "write:/new", opts=("--read-only",)
    )
    assert status == 0
    assert "read /etc/conf: ok setting" in out
    assert "write /etc/conf: error" in out and "write /new: error" in out
    # Without --read-only the same writes succeed.
    status, out, _ = images.run(ref, PROBE, "write:/etc/conf", "write:/new")
    assert "write /etc/conf: ok" in out and "write /new: ok" in out


@pytest.mark.integration
def test_a_bind_mount_is_seen_at_its_destination(images: Images, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "data.txt").write_text("from the volume\n")
    ref = images.build()
    ro = ("--mount", f"type=bind,src={volume},dst=/data,options=rbind:ro")
    status, out, _ = images.run(ref, PROBE, "read:/data/data.txt", "write:/data/new", opts=ro)
    assert status == 0
    assert "read /data/data.txt: ok from the volume" in out
    assert "write /data/new: error" in out
    assert not (volume / "new").exists()

    rw = ("--mount", f"type=bind,src={volume},dst=/data/,options=rbind:rw")
    status, out, err = images.run(ref, PROBE, "write:/data/new", "read:/data/new", opts=rw)
    assert status == 0, err
    assert "write /data/new: ok" in out and "read /data/new: ok probe" in out
    assert (volume / "new").read_text() == "probe\n"

    # A working directory in the mount is the mount's directory.
    (volume / "sub").mkdir()
    (volume / "sub" / "here.txt").write_text("in sub\n")
    status, out, _ = images.run(ref, PROBE, "read:here.txt", opts=(*ro, "--cwd", "/data/sub"))
    assert "read here.txt: ok in sub" in out


@pytest.mark.integration
def test_a_bind_mount_whose_source_is_a_symlink_is_refused(images: Images, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    ref = images.build()
    opts = ("--mount", f"type=bind,src={tmp_path / 'link'},dst=/data,options=rbind:ro")
    status, out, err = images.run(ref, PROBE, "list:/data", opts=opts)
    assert status != 0
    assert "bind mount at /data" in err and "symbolic link" in err


@pytest.mark.integration
def test_a_module_without_a_memory_limit_gets_the_default_cap(images: Images) -> None:
    ref = images.build(files={"/memhog.wasm": images.wasm_dir / "memhog.wasm"}, cmd=["/memhog.wasm"])
    status, out, err = images.run(ref, "/memhog.wasm", "1024")
    assert status == 1, out + err
    assert "allocated 1024 MiB" not in out
    mib = int(err.split("out of memory after")[1].split()[0])
    assert mib < 128


# --- a pod's workingDir and readOnlyRootFilesystem, through CRI ---------------------------

CRI_NAMESPACE = "k8s.io"
CRI_PROBE = "docker.io/library/layotto-fs-cri-probe:latest"


@pytest.fixture(scope="module")
def cri_probe(
    cri_containerd: Containerd, wasm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Containerd:
    c = cri_containerd
    out = tmp_path_factory.mktemp("fs-cri-images")
    builder.build_image(out / "pause.tar", {"/pause": b"placeholder\n"}, name=c.sandbox_image, cmd=["/pause"])
    builder.build_image(out / "probe.tar", {PROBE: wasm_dir / "fsprobe.wasm"}, name=CRI_PROBE, cmd=[PROBE])
    for name in ("pause", "probe"):
        c.import_image(out / f"{name}.tar", namespace=CRI_NAMESPACE)
    with CriClient(c.address) as client:
        for image in (c.sandbox_image, CRI_PROBE):
            client.wait_image(image)
    return c


@pytest.mark.integration
def test_a_pods_working_dir_and_read_only_root_are_confined(
    cri_probe: Containerd, secret: Secret, tmp_path: Path
) -> None:
    with CriClient(cri_probe.address) as client:
        pod = client.run_pod(new_id("fs"), "default", new_id("uid"), tmp_path / "pods", handler="layotto")
        try:
            config = client.container_config(
                "probe", CRI_PROBE, command=[PROBE], args=[*probes(secret), "write:/new"]
            )
            config.working_dir = CLIMB
            config.linux.security_context.readonly_rootfs = True
            cid = client.create_container_raw(pod.id, config, pod.config)
            client.start_container(cid)
            st = client.wait_container_state(cid, CONTAINER_EXITED, timeout=20)
            lines = [line.content for line in read_cri_log(client.log_file(pod, cid))]
            assert any(line.startswith("write /new: error") for line in lines), lines  # read-only root
            rest = "\n".join(line for line in lines if not line.startswith("write /new:"))
            assert_confined(st.exit_code, rest, "", secret)
        finally:
            client.remove_pod(pod.id)
