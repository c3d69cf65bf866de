"""Function images from a registry, as a kubelet pulls them for a Deployment.

A real registry runs on loopback (Debian's ``docker-registry``, the CNCF distribution
registry, plain HTTP). ``layotto.images.registry`` pushes the images the builder makes;
containerd pulls them with its registry host configuration (``hosts.toml`` files under
a ``config_path`` directory: ``ctr images pull --hosts-dir`` and CRI's
``[plugins."io.containerd.grpc.v1.cri".registry] config_path``) and runs them with the
layotto runtime: through ``ctr run`` and as a pod after a CRI PullImage.

The OCI wasm artifact (config ``application/vnd.wasm.config.v0+json``, one
``application/wasm`` layer) has no filesystem layer. containerd before 1.6.25 / 1.7.7
refuses to unpack it ("mismatched image rootfs and manifest layers"), so there a pull
(``ctr images pull`` or CRI PullImage) fails after storing the content and the image
record; ``ctr content fetch`` stores both without unpacking. The tests check whichever
behaviour the containerd under test must have (see ``ARTIFACT_UNPACK_FIXED_IN``).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from layotto.images import builder, registry
from tests.conftest import _keep_base, _missing, require
from tests.containerd_env import Containerd, default_snapshotter
from tests.cri_client import CONTAINER_EXITED, CriClient, Pod, read_cri_log

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.layotto.v1"
HANDLER = "layotto"
CRI_NAMESPACE = "k8s.io"
GREETING = "Hello from a Layotto nanoprocess!"
REGISTRY_BIN = "docker-registry"
#: A registry name that resolves nowhere: only a hosts.toml makes containerd find it.
ALIAS = "registry.layotto.test"
#: The containerd releases whose unpacker skips non-layer media types (containerd PR
#: #9142, "Allow for images with artifacts to pull": ``image.go`` ``getLayers`` keeps
#: only ``images.IsLayerType`` layers). 2.0 and later have it (``client/image.go``).
ARTIFACT_UNPACK_FIXED_IN = {(1, 6): (1, 6, 25), (1, 7): (1, 7, 7)}
MISMATCH = "mismatched image rootfs and manifest layers"
MANIFEST_ACCEPT = ", ".join(
    [builder.MEDIA_TYPE_IMAGE_MANIFEST, builder.MEDIA_TYPE_IMAGE_INDEX, registry.MEDIA_TYPE_DOCKER_MANIFEST]
)


def artifact_unpack_supported(version: tuple[int, int, int]) -> bool:
    """Whether containerd ``version`` pulls (unpacks) an image with non-layer layers."""
    if version[:2] in ARTIFACT_UNPACK_FIXED_IN:
        return version >= ARTIFACT_UNPACK_FIXED_IN[version[:2]]
    return version >= (2, 0, 0)


def parse_version(text: str) -> tuple[int, int, int]:
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    assert m, f"no version in {text!r}"
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def daemon_version(c: Containerd) -> tuple[int, int, int]:
    """The running containerd's version (``ctr version``'s Server section)."""
    out = c.ctr("version").stdout
    return parse_version(out.split("Server:", 1)[1])


# --------------------------------------------------------------------------- registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Registry:
    """A docker-registry process on 127.0.0.1:<port>, storing under ``root``."""

    process: subprocess.Popen[bytes]
    port: int
    root: Path
    log: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def get(self, path: str, accept: str = "", auth: str = "") -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url + path)
        if accept:
            request.add_header("Accept", accept)
        if auth:
            request.add_header("Authorization", auth)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, dict(exc.headers), exc.read()

    def manifest(self, repository: str, reference: str) -> tuple[str, str, bytes]:
        """(Docker-Content-Digest, Content-Type, body) of a stored manifest."""
        status, headers, body = self.get(f"/v2/{repository}/manifests/{reference}", MANIFEST_ACCEPT)
        assert status == 200, (status, body)
        return headers["Docker-Content-Digest"], headers["Content-Type"], body

    def requests(self, method: str, path_part: str) -> int:
        """How many ``method`` requests with ``path_part`` in their path the log shows."""
        text = self.log.read_text(errors="replace")
        return len(re.findall(rf'"{method} [^" ]*{re.escape(path_part)}[^" ]* HTTP/1\.1"', text))

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_registry(base: Path, auth_yaml: str = "") -> Registry:
    """Start docker-registry with a config of ours; wait until ``GET /v2/`` answers."""
    binary = shutil.which(REGISTRY_BIN)
    if binary is None:
        _missing(
            f"{REGISTRY_BIN!r} is not on PATH: the registry tests need Debian's docker-registry "
            "package (apt-get install -y docker-registry; .ci/run must install it)"
        )
    last = ""
    for _ in range(3):  # another process may grab the free port before the registry does
        port = free_port()
        root = base / "storage"
        root.mkdir(parents=True, exist_ok=True)
        config = base / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n"
            f"storage:\n  filesystem:\n    rootdirectory: {json.dumps(str(root))}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n  secret: layotto-test-secret\n" + auth_yaml
        )
        log = base / "registry.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [binary, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=base,
                start_new_session=True,
            )
        reg = Registry(process, port, root, log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = reg.get("/v2/")[0]
            except OSError:
                status = 0
            if status in (200, 401):
                return reg
            time.sleep(0.05)
        reg.stop()
        last = reg.log_tail()
        if "address already in use" not in last:
            break
    pytest.fail(f"{REGISTRY_BIN} did not answer GET /v2/; its log:\n{last}", pytrace=False)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def hosts_dir(reg: Registry, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """containerd's registry host configuration: ``<dir>/<host>/hosts.toml`` for the
    registry's own address, and for ALIAS, a name only this configuration resolves."""
    top = tmp_path_factory.mktemp("certs.d")
    for name in (reg.host, ALIAS):
        (top / name).mkdir()
        (top / name / "hosts.toml").write_text(
            f'server = "{reg.url}"\n\n[host."{reg.url}"]\n  capabilities = ["pull", "resolve"]\n'
        )
    return top


@dataclass(frozen=True)
class Archives:
    hello: Path
    hello_digest: str
    artifact: Path
    artifact_digest: str
    pause: Path


@pytest.fixture(scope="module")
def archives(wasm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Archives:
    out = tmp_path_factory.mktemp("archives")
    hello = wasm_dir / "hello.wasm"
    hello_digest = builder.build_image(
        out / "hello.tar", {"/hello.wasm": hello}, name="layotto-reg-hello", cmd=["/hello.wasm"]
    )
    artifact_digest = builder.build_wasm_artifact(out / "artifact.tar", hello, name="layotto-reg-artifact")
    builder.build_image(
        out / "pause.tar",
        {"/pause": b"layotto pause placeholder\n"},
        name="docker.io/library/layotto-pause:latest",
        cmd=["/pause"],
    )
    return Archives(out / "hello.tar", hello_digest, out / "artifact.tar", artifact_digest, out / "pause.tar")


@pytest.fixture(scope="module")
def rctd(project_bin: Path, hosts_dir: Path, archives: Archives) -> Iterator[Containerd]:
    """A private containerd with CRI whose registry host configuration is ``hosts_dir``,
    with the sandbox image imported into k8s.io."""
    for tool in ("containerd", "ctr", "runc"):
        require(tool)
    extra = f'[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = {json.dumps(str(hosts_dir))}\n'
    c = Containerd(path_prepend=[project_bin], cri=True, snapshotter=default_snapshotter(), extra_toml=extra)
    c.start()
    try:
        c.import_image(archives.pause, namespace=CRI_NAMESPACE)
        with CriClient(c.address) as client:
            client.wait_image(c.sandbox_image)
        yield c
    finally:
        c.stop(remove_base=not _keep_base())
        if _keep_base():
            print(f"\nkept containerd base {c.base} (log: {c.log})")


@pytest.fixture
def cri(rctd: Containerd) -> Iterator[CriClient]:
    with CriClient(rctd.address) as client:
        yield client


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def blob(archive: Path, digest: str) -> bytes:
    with tarfile.open(archive) as tar:
        f = tar.extractfile("blobs/sha256/" + digest.split(":", 1)[1])
        assert f is not None
        return f.read()


def pull(c: Containerd, hosts_dir: Path, ref: str, *extra: str, namespace: str = "default") -> Any:
    return c.ctr(
        "images",
        "pull",
        "--hosts-dir",
        str(hosts_dir),
        "--snapshotter",
        c.snapshotter,
        *extra,
        ref,
        namespace=namespace,
        check=False,
        timeout=120,
    )


def run_pod_to_exit(
    client: CriClient, rctd: Containerd, image: str, tmp_path: Path, command: list[str] | None = None
) -> tuple[Pod, Any, list[str]]:
    """RunPodSandbox (handler layotto, host network), CreateContainer, StartContainer,
    wait until EXITED; returns the pod, the final status and the stdout lines. The pod is
    removed again."""
    name = unique("fn")
    pod = client.run_pod(name, "default", str(uuid.uuid4()), tmp_path / f"default_{name}", handler=HANDLER)
    try:
        cid = client.create_container(pod.id, pod.config, "fn", image, command=command)
        client.start_container(cid)
        status = client.wait_container_state(cid, CONTAINER_EXITED, timeout=30)
        lines = [line.content for line in read_cri_log(client.log_file(pod, cid)) if line.stream == "stdout"]
    finally:
        client.remove_pod(pod.id)
    return pod, status, lines


# --------------------------------------------------------------------------- push


def test_push_stores_our_manifest_and_is_idempotent(reg: Registry, archives: Archives) -> None:
    repo = unique("fn/hello")
    digest = registry.push_archive(archives.hello, f"{reg.host}/{repo}:v1")
    assert digest == archives.hello_digest

    stored, media_type, body = reg.manifest(repo, "v1")
    assert stored == digest
    assert media_type == builder.MEDIA_TYPE_IMAGE_MANIFEST
    assert body == blob(archives.hello, digest)  # byte for byte: the digest is ours
    manifest = json.loads(body)
    for descriptor in [manifest["config"], *manifest["layers"]]:
        status, _, data = reg.get(f"/v2/{repo}/blobs/{descriptor['digest']}")
        assert status == 200 and data == blob(archives.hello, descriptor["digest"])
    assert reg.requests("POST", f"/v2/{repo}/blobs/uploads/") == 2  # config + layer

    # Again, and under a second tag: only HEADs and the manifest PUT, no upload.
    assert registry.push_archive(archives.hello, f"{reg.host}/{repo}:v1") == digest
    assert registry.push_archive(archives.hello, f"localhost:{reg.port}/{repo}:v2") == digest
    assert reg.requests("POST", f"/v2/{repo}/blobs/uploads/") == 2
    assert reg.manifest(repo, "v2")[0] == digest
    status, _, tags = reg.get(f"/v2/{repo}/tags/list")
    assert status == 200 and sorted(json.loads(tags)["tags"]) == ["v1", "v2"]


def test_push_of_the_wasm_artifact_keeps_its_media_types(reg: Registry, archives: Archives) -> None:
    repo = unique("fn/artifact")
    digest = registry.push_archive(archives.artifact, f"{reg.host}/{repo}:v1")
    assert digest == archives.artifact_digest
    stored, media_type, body = reg.manifest(repo, "v1")
    assert stored == digest and media_type == builder.MEDIA_TYPE_IMAGE_MANIFEST
    manifest = json.loads(body)
    assert manifest["config"]["mediaType"] == builder.MEDIA_TYPE_WASM_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [builder.MEDIA_TYPE_WASM_LAYER]
    wasm = reg.get(f"/v2/{repo}/blobs/{manifest['layers'][0]['digest']}")[2]
    assert builder.is_wasm(wasm)


def test_cli_build_push_and_push(
    reg: Registry, wasm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = unique("fn/cli")
    out = tmp_path / "hello.tar"
    argv = ["build", "--wasm", str(wasm_dir / "hello.wasm"), "--name", "hello", "-o", str(out)]
    assert builder.main([*argv, "--push", f"{reg.host}/{repo}:built"]) == 0
    printed = capsys.readouterr()
    digest = printed.out.strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert f"pushed {reg.host}/{repo}:built@{digest}" in printed.err
    assert reg.manifest(repo, "built")[0] == digest

    assert builder.main(["push", str(out), f"{reg.host}/{repo}:again"]) == 0
    assert capsys.readouterr().out.strip() == digest
    assert reg.manifest(repo, "again")[0] == digest

    # Through the `layotto` entry point, as a user types it.
    beside = Path(sys.executable).parent / "layotto"
    layotto = str(beside) if beside.exists() else require("layotto")
    r = subprocess.run(
        [layotto, "image", "push", str(out), f"{reg.host}/{repo}:cli"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == digest


def test_push_errors_are_precise(reg: Registry, archives: Archives, tmp_path: Path) -> None:
    # Nothing listens on a port we just freed.
    port = free_port()
    with pytest.raises(registry.RegistryError, match=rf"registry http://127\.0\.0\.1:{port} unreachable"):
        registry.push_archive(archives.hello, f"127.0.0.1:{port}/fn/hello:v1")
    # The registry's own error JSON is reported: here, a blob whose bytes do not match.
    client = registry.RegistryClient(registry.parse_reference(f"{reg.host}/fn/bad:v1"))
    with pytest.raises(registry.RegistryError) as info:
        client.upload_blob(archives.hello_digest, b"not the manifest")
    assert "HTTP 400 Bad Request: DIGEST_INVALID: provided digest did not match uploaded content" in str(
        info.value
    )
    # A reference, an archive that are not what push needs.
    with pytest.raises(registry.RegistryError, match="invalid image name"):
        registry.push_archive(archives.hello, f"{reg.host}/Upper/Case:v1")
    with pytest.raises(registry.RegistryError, match="must use a tag, not a digest"):
        registry.push_archive(archives.hello, f"{reg.host}/fn/hello@{archives.hello_digest}")
    with pytest.raises(registry.RegistryError, match="no such file"):
        registry.push_archive(tmp_path / "missing.tar", f"{reg.host}/fn/hello:v1")
    (tmp_path / "notatar").write_text("hello\n")
    with pytest.raises(registry.RegistryError, match="not a tar archive"):
        registry.push_archive(tmp_path / "notatar", f"{reg.host}/fn/hello:v1")


def test_push_with_basic_auth(archives: Archives, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # stdlib (3.11) bcrypt, for the registry's htpasswd file

    htpasswd = tmp_path / "htpasswd"
    salt = crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 4)  # bcrypt's minimum cost: fast
    htpasswd.write_text(f"alice:{crypt.crypt('s3cret', salt)}\n")
    auth = f"auth:\n  htpasswd:\n    realm: layotto-test\n    path: {json.dumps(str(htpasswd))}\n"
    secured = start_registry(tmp_path / "secured", auth)
    try:
        ref = f"{secured.host}/fn/hello:v1"
        monkeypatch.delenv(registry.ENV_USERNAME, raising=False)
        monkeypatch.delenv(registry.ENV_PASSWORD, raising=False)
        with pytest.raises(
            registry.RegistryError, match="HTTP 401 Unauthorized: UNAUTHORIZED.*no credentials"
        ):
            registry.push_archive(archives.hello, ref)
        with pytest.raises(registry.RegistryError, match="refused the credentials of 'alice'"):
            registry.push_archive(archives.hello, ref, username="alice", password="wrong")
        assert registry.push_archive(archives.hello, ref, username="alice", password="s3cret") == (
            archives.hello_digest
        )
        monkeypatch.setenv(registry.ENV_USERNAME, "alice")
        monkeypatch.setenv(registry.ENV_PASSWORD, "s3cret")
        assert registry.push_archive(archives.hello, f"{secured.host}/fn/hello:v2") == archives.hello_digest
        basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
        status, headers, _ = secured.get("/v2/fn/hello/manifests/v2", MANIFEST_ACCEPT, auth=basic)
        assert status == 200 and headers["Docker-Content-Digest"] == archives.hello_digest
    finally:
        secured.stop()


def test_bearer_challenge_parsing() -> None:
    scheme, params = registry._parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull",
    }
    ref = registry.parse_reference("hello")
    assert (ref.domain, ref.endpoint, ref.repository, ref.tag) == (
        "docker.io",
        registry.DOCKER_HUB_ENDPOINT,
        "library/hello",
        "latest",
    )
    assert registry.RegistryClient(ref).base_url == "https://registry-1.docker.io"
    assert registry.RegistryClient(registry.parse_reference("localhost:5000/x")).base_url == (
        "http://localhost:5000"
    )
    assert registry.RegistryClient(registry.parse_reference("ghcr.io/x"), insecure=True).base_url == (
        "http://ghcr.io"
    )


# --------------------------------------------------------------------------- ctr


def test_ctr_pulls_with_hosts_dir_and_runs_the_function(
    reg: Registry, rctd: Containerd, hosts_dir: Path, archives: Archives
) -> None:
    repo = unique("fn/ctr")
    registry.push_archive(archives.hello, f"{reg.host}/{repo}:v1")
    for ref in (f"{reg.host}/{repo}:v1", f"{ALIAS}/{repo}:v1"):  # the alias exists only in hosts.toml
        r = pull(rctd, hosts_dir, ref)
        assert r.returncode == 0, r.stderr
        listed = rctd.ctr("images", "ls").stdout
        assert any(
            line.split()[:1] == [ref] and archives.hello_digest in line for line in listed.splitlines()
        )
        run = rctd.ctr("run", "--rm", "--runtime", RUNTIME, ref, unique("reg"), check=False)
        assert run.returncode == 0, run.stderr
        assert run.stdout == GREETING + "\n"


def test_ctr_and_the_wasm_artifact(
    reg: Registry, rctd: Containerd, hosts_dir: Path, archives: Archives, tmp_path: Path
) -> None:
    """`ctr images pull` of the artifact: on containerd < 1.6.25 / 1.7.7 the unpack fails
    after the content and the image record are stored. `ctr content fetch` stores them
    without unpacking on every version; the function then runs from the content store
    (empty --rootfs, image named by the layotto.io/wasm-image annotation)."""
    repo = unique("fn/artifact")
    ref = f"{reg.host}/{repo}:v1"
    registry.push_archive(archives.artifact, ref)

    r = pull(rctd, hosts_dir, ref, namespace="pull")
    if artifact_unpack_supported(daemon_version(rctd)):
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode != 0
        assert f"ctr: {MISMATCH}" in r.stderr
    assert ref in rctd.ctr("images", "ls", "-q", namespace="pull").stdout.split()

    fetched = rctd.ctr("content", "fetch", "--hosts-dir", str(hosts_dir), ref, check=False, timeout=120)
    assert fetched.returncode == 0, fetched.stderr
    image = rctd.ctr("images", "ls").stdout
    assert any(line.split()[:1] == [ref] and archives.artifact_digest in line for line in image.splitlines())
    empty = tmp_path / "rootfs"
    empty.mkdir()
    run = rctd.ctr(
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        f"layotto.io/wasm-image={ref}",
        "--rootfs",
        str(empty),
        unique("artifact"),
        "hello.wasm",
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == GREETING + "\n"


# --------------------------------------------------------------------------- CRI


def test_cri_pull_image_then_a_pod_runs_it(
    reg: Registry, rctd: Containerd, cri: CriClient, archives: Archives, tmp_path: Path
) -> None:
    repo = unique("fn/pod")
    ref = f"{reg.host}/{repo}:v1"
    registry.push_archive(archives.hello, ref)
    manifest = json.loads(blob(archives.hello, archives.hello_digest))

    image_ref = cri.pull_image(ref)  # as the kubelet does for a Deployment's image
    assert image_ref == manifest["config"]["digest"]  # CRI's image id
    status = cri.image_status(ref)
    assert status is not None
    assert ref in status.repo_tags
    assert f"{reg.host}/{repo}@{archives.hello_digest}" in status.repo_digests

    _, final, lines = run_pod_to_exit(cri, rctd, ref, tmp_path)
    assert final.exit_code == 0, (final.reason, final.message)
    assert final.reason == "Completed"
    assert lines == [GREETING]

    # Through an alias that only the CRI registry configuration (hosts.toml) resolves.
    alias = f"{ALIAS}/{repo}:v1"
    assert cri.pull_image(alias) == image_ref
    assert run_pod_to_exit(cri, rctd, alias, tmp_path)[2] == [GREETING]


def test_cri_and_the_wasm_artifact(
    reg: Registry, rctd: Containerd, cri: CriClient, hosts_dir: Path, archives: Archives, tmp_path: Path
) -> None:
    """CRI PullImage of the OCI wasm artifact needs containerd >= 1.6.25 / 1.7.7 (2.x).
    Before that it fails to unpack. containerd 1.6 creates the image record before it
    unpacks, so CRI knows the image all the same; and an image fetched into k8s.io
    without unpacking (what a kubelet with imagePullPolicy IfNotPresent then uses
    without pulling) runs as a pod whose command is set (the wasm config has none)."""
    repo = unique("fn/cri-artifact")
    ref = f"{reg.host}/{repo}:v1"
    registry.push_archive(archives.artifact, ref)

    if artifact_unpack_supported(daemon_version(rctd)):
        cri.pull_image(ref)
    else:
        with pytest.raises(grpc.RpcError) as info:
            cri.pull_image(ref)
        assert info.value.details() == (
            f'failed to pull and unpack image "{ref}": failed to unpack image on snapshotter '
            f"{rctd.snapshotter}: {MISMATCH}"
        )
    status = cri.wait_image(ref)
    assert status.id == json.loads(blob(archives.artifact, archives.artifact_digest))["config"]["digest"]

    # No Entrypoint/Cmd in a wasm config: the pod must give a command (any argv[0]).
    _, final, lines = run_pod_to_exit(cri, rctd, ref, tmp_path, command=["hello.wasm"])
    assert final.exit_code == 0, (final.reason, final.message)
    assert lines == [GREETING]

    # Pre-fetched into k8s.io without unpacking, as a node can be prepared on any version.
    fetched_ref = f"{reg.host}/{repo}:prefetched"
    registry.push_archive(archives.artifact, fetched_ref)
    rctd.ctr(
        "content", "fetch", "--hosts-dir", str(hosts_dir), fetched_ref, namespace=CRI_NAMESPACE, timeout=120
    )
    cri.wait_image(fetched_ref)
    _, final, lines = run_pod_to_exit(cri, rctd, fetched_ref, tmp_path, command=["hello.wasm"])
    assert final.exit_code == 0 and lines == [GREETING]

    with pytest.raises(grpc.RpcError, match="no command specified"):
        run_pod_to_exit(cri, rctd, ref, tmp_path)
