"""deploy/: the Kubernetes manifests and the node installer.

- Every YAML document under deploy/ is validated offline against the Kubernetes API
  schemas as the ``kubernetes`` client's models carry them (they are generated from the
  API server's OpenAPI document): unknown or misspelled fields, wrong types and missing
  required fields all fail, each with the path of the offending field.
- The manifests say what the runtime needs: the RuntimeClass handler, the example
  function's runtimeClassName, a privileged installer with the node's root mounted.
- deploy/installer/install.sh runs for real against a fake node root: no config, Debian's
  configs, a containerd 2.x config; idempotent, reversible, and careful with configs it
  cannot handle.
- A real containerd started from the config the installer wrote runs a pod on the
  ``layotto`` handler through the shim the installer put in place (integration).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import kubernetes.client
import pydantic
import pytest
import yaml

from layotto.images import builder
from tests.conftest import REPO_ROOT, find_host_process, require
from tests.containerd_env import Containerd, default_snapshotter, make_base
from tests.cri_client import CONTAINER_EXITED, SANDBOX_READY, CriClient, read_cri_log

DEPLOY = REPO_ROOT / "deploy"
INSTALLER = DEPLOY / "installer" / "install.sh"
SHIM_SCRIPT = REPO_ROOT / "shim" / "containerd-shim-layotto-v1"
SHIM = "containerd-shim-layotto-v1"
RUNTIME_TYPE = "io.containerd.layotto.v1"
RUNTIME_PATH = "/opt/layotto/bin/containerd-shim-layotto-v1"
BEGIN = "# BEGIN layotto runtime"
CRI_V2 = "io.containerd.grpc.v1.cri"
CRI_V3 = "io.containerd.cri.v1.runtime"
HELLO = "docker.io/library/hello:latest"
FN_HELLO = "docker.io/library/fn-hello:latest"  # the image deploy/function.yaml runs
GREETING = "Hello from a Layotto nanoprocess!"

# --------------------------------------------------------------------------- schema validation

#: apiVersion and kind -> the kubernetes client model that holds that kind's schema.
KINDS: dict[tuple[str, str], str] = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Service"): "V1Service",
    ("v1", "Pod"): "V1Pod",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
    ("node.k8s.io/v1", "RuntimeClass"): "V1RuntimeClass",
}

if not hasattr(kubernetes.client.V1Pod, "model_validate"):
    raise ImportError(
        f"kubernetes {kubernetes.__version__} has the old model classes; these tests need the "
        "pydantic models of kubernetes>=37 (pip install 'kubernetes>=37,<38')"
    )

_LIST_TYPE = re.compile(r"^(?:List\[|list\[)(?P<item>.*)\]$")
_DICT_TYPE = re.compile(r"^(?:Dict\[str, |dict\(str, )(?P<value>.*)[\])]$")


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML in which a key given twice is an error rather than silently the last value."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_documents(path: Path) -> list[dict]:
    """The non-empty YAML documents of *path*."""
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.load_all(f, Loader=_StrictLoader) if doc is not None]


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _unknown_fields(data: Any, type_name: str, path: str) -> list[str]:
    """Fields of *data* that the schema *type_name* does not have, by their JSON names.
    (The models also accept Python spellings such as ``runtime_class_name``, which the API
    server does not, so this walk is ours.)"""
    if m := _LIST_TYPE.match(type_name):
        if not isinstance(data, list):
            return []  # the model reports the type
        return [e for i, item in enumerate(data) for e in _unknown_fields(item, m["item"], _join(path, i))]
    if m := _DICT_TYPE.match(type_name):
        if not isinstance(data, dict):
            return []
        return [e for k, v in data.items() for e in _unknown_fields(v, m["value"], _join(path, str(k)))]
    model = getattr(kubernetes.client, type_name, None)
    if model is None or not hasattr(model, "attribute_map") or not isinstance(data, dict):
        return []  # a primitive, IntOrString ("object") or free-form field
    by_json_name = {json_name: attr for attr, json_name in model.attribute_map.items()}
    errors = []
    for key, value in data.items():
        where = _join(path, str(key))
        if key not in by_json_name:
            close = difflib.get_close_matches(str(key), list(by_json_name), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{where}: unknown field for {type_name}{hint}")
            continue
        errors += _unknown_fields(value, model.openapi_types[by_json_name[key]], where)
    return errors


def _loc(loc: tuple[str | int, ...]) -> str:
    path = ""
    for part in loc:
        path = _join(path, part)
    return path


def validate_manifest(doc: Any) -> list[str]:
    """Every way *doc* breaks the Kubernetes API schema of its kind, one message each
    (empty when it is valid)."""
    if not isinstance(doc, dict):
        return [f"a manifest is a mapping, not {type(doc).__name__}"]
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    type_name = KINDS.get((api_version, kind))
    if type_name is None:
        return [f"apiVersion {api_version!r} kind {kind!r}: no schema known here; add it to KINDS"]
    model = getattr(kubernetes.client, type_name)
    errors = _unknown_fields(doc, type_name, "")
    try:
        model.model_validate(doc)
    except pydantic.ValidationError as e:
        for err in e.errors():
            where = _loc(err["loc"])
            if err["type"] == "extra_forbidden":
                continue  # reported above, with a suggestion
            if err["type"] == "missing":
                errors.append(f"{where}: required field is missing")
            else:
                errors.append(f"{where}: {err['msg']} (got {err['input']!r})")
    if not (doc.get("metadata") or {}).get("name"):
        errors.append("metadata.name: required field is missing")
    return [f"{kind} {(doc.get('metadata') or {}).get('name')!r}: {e}" for e in errors]


POLICY = DEPLOY / "policy.yaml"  # the node host's operator policy, not a Kubernetes manifest
MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p != POLICY)


def all_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS for doc in load_documents(path)]


def find(kind: str, name: str) -> dict:
    found = [doc for _, doc in all_documents() if doc.get("kind") == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r} under deploy/, found {len(found)}"
    return found[0]


def test_the_shipped_policy_is_the_built_in_default():
    """deploy/policy.yaml (what the installer puts on a node) says exactly what the node host
    applies without a policy file."""
    import yaml

    from layotto.host.abi_host import KNOWN_CAPABILITIES
    from layotto.host.policy import DEFAULT_POLICY, parse_policy

    shipped = parse_policy(yaml.safe_load(POLICY.read_text()), str(POLICY), KNOWN_CAPABILITIES)
    assert shipped.default == DEFAULT_POLICY.default
    assert dict(shipped.namespaces) == {}
    assert shipped.runtime_api == {"tcp": "", "socketGroup": "", "apps": []}


def test_the_manifests_are_there():
    names = {str(p.relative_to(DEPLOY)) for p in MANIFESTS}
    assert {"runtimeclass.yaml", "function.yaml", "installer/daemonset.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(DEPLOY)) for p in MANIFESTS])
def test_manifest_matches_the_kubernetes_api_schema(path: Path):
    docs = load_documents(path)
    assert docs, f"{path} has no YAML document"
    errors = [e for doc in docs for e in validate_manifest(doc)]
    assert not errors, f"{path.relative_to(REPO_ROOT)}:\n  " + "\n  ".join(errors)


def _function_deployment() -> dict:
    return copy.deepcopy(find("Deployment", "fn-hello"))


def test_validator_reports_a_misspelled_field():
    doc = _function_deployment()
    pod = doc["spec"]["template"]["spec"]
    pod["runtimeClass"] = pod.pop("runtimeClassName")
    assert validate_manifest(doc) == [
        "Deployment 'fn-hello': spec.template.spec.runtimeClass: unknown field for V1PodSpec "
        "(did you mean 'runtimeClassName'?)"
    ]


def test_validator_reports_a_python_spelling_the_api_server_refuses():
    doc = _function_deployment()
    pod = doc["spec"]["template"]["spec"]
    pod["runtime_class_name"] = pod.pop("runtimeClassName")
    errors = validate_manifest(doc)
    assert len(errors) == 1 and "spec.template.spec.runtime_class_name: unknown field" in errors[0]


def test_validator_reports_a_wrong_type():
    doc = _function_deployment()
    doc["spec"]["replicas"] = "two"
    assert validate_manifest(doc) == [
        "Deployment 'fn-hello': spec.replicas: Input should be a valid integer (got 'two')"
    ]


def test_validator_reports_a_missing_required_field():
    doc = _function_deployment()
    del doc["spec"]["template"]["spec"]["containers"][0]["name"]
    assert validate_manifest(doc) == [
        "Deployment 'fn-hello': spec.template.spec.containers[0].name: required field is missing"
    ]


def test_validator_reports_an_unquoted_label_value():
    doc = _function_deployment()
    doc["metadata"]["labels"]["layotto.io/runtime"] = True  # `layotto.io/runtime: true`
    errors = validate_manifest(doc)
    assert (
        len(errors) == 1 and "metadata.labels.layotto.io/runtime: Input should be a valid string" in errors[0]
    )


def test_validator_reports_an_unknown_kind_and_a_duplicate_key(tmp_path: Path):
    assert validate_manifest({"apiVersion": "v1", "kind": "Pdo", "metadata": {"name": "x"}}) == [
        "apiVersion 'v1' kind 'Pdo': no schema known here; add it to KINDS"
    ]
    twice = tmp_path / "twice.yaml"
    twice.write_text("apiVersion: v1\nkind: Pod\nkind: Pod\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'kind'"):
        load_documents(twice)


# --------------------------------------------------------------------------- what the manifests say


def test_runtimeclass_handler_is_layotto():
    assert find("RuntimeClass", "layotto")["handler"] == "layotto"


def test_every_runtime_class_name_refers_to_a_runtime_class_here():
    classes = {doc["metadata"]["name"] for _, doc in all_documents() if doc["kind"] == "RuntimeClass"}
    for path, doc in all_documents():
        spec = doc.get("spec") or {}
        pod = spec.get("template", {}).get("spec") if "template" in spec else spec
        name = (pod or {}).get("runtimeClassName")
        if name is not None:
            assert name in classes, f"{path.name}: {doc['kind']} uses runtimeClassName {name!r}"


def test_function_deployment_and_service():
    """deploy/function.yaml's pods and Service agree on the port the node host opens in each
    pod's network (tests/test_pod_network.py runs the pod template through CRI)."""
    deployment = find("Deployment", "fn-hello")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 2
    assert pod["runtimeClassName"] == "layotto"
    labels = spec["template"]["metadata"]["labels"]
    assert labels["app"] == "fn-hello" and spec["selector"]["matchLabels"].items() <= labels.items()
    port = int(spec["template"]["metadata"]["annotations"]["layotto.io/port"])
    (container,) = pod["containers"]
    assert container["image"] == FN_HELLO
    assert container["resources"]["limits"] == {"memory": "64Mi", "cpu": "100m"}
    assert {"name": "http", "containerPort": port, "protocol": "TCP"} in container["ports"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}

    service = find("Service", "fn-hello")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "http"


def test_installer_daemonset_is_privileged_with_the_node_root_and_tolerates_everything():
    path = DEPLOY / "installer" / "daemonset.yaml"
    docs = {(d["kind"], d["metadata"]["name"]): d for d in load_documents(path)}
    ds = docs[("DaemonSet", "layotto-node-installer")]
    namespace = ds["metadata"]["namespace"]
    assert ("Namespace", namespace) in docs
    pod = ds["spec"]["template"]["spec"]
    assert ("ServiceAccount", pod["serviceAccountName"]) in docs
    assert docs[("ServiceAccount", pod["serviceAccountName"])]["metadata"]["namespace"] == namespace
    assert (
        ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    )

    assert pod["hostPID"] is True  # nsenter --target 1 reaches the node's systemd
    assert {"operator": "Exists"} in pod["tolerations"]  # no key, no effect: every taint

    volumes = {v["name"]: v for v in pod["volumes"]}
    (install,) = pod["initContainers"]
    assert install["securityContext"]["privileged"] is True
    env = {e["name"]: e["value"] for e in install.get("env", [])}
    host_root = env.get("HOST_ROOT", "/host")
    (mount,) = [m for m in install["volumeMounts"] if m["mountPath"] == host_root]
    assert volumes[mount["name"]]["hostPath"]["path"] == "/"
    assert not mount.get("readOnly", False)

    # The command is where the Containerfile puts install.sh.
    containerfile = (DEPLOY / "installer" / "Containerfile").read_text()
    assert f"COPY deploy/installer/install.sh {install['command'][0]}\n" in containerfile

    (main,) = pod["containers"]
    assert not main.get("securityContext", {}).get("privileged", False)
    assert not any(m["name"] == mount["name"] for m in main.get("volumeMounts", []))


# --------------------------------------------------------------------------- install.sh on a fake node

#: /etc/containerd/config.toml as Debian 12's containerd package ships it.
DEBIAN_PACKAGE_CONFIG = """\
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""

#: A containerd 2.x config (version 3), shaped like part of `containerd config default`.
CONTAINERD_2_CONFIG = """\
version = 3
root = '/var/lib/containerd'
state = '/run/containerd'

[grpc]
  address = '/run/containerd/containerd.sock'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'

    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = 'registry.k8s.io/pause:3.10'

  [plugins.'io.containerd.cri.v1.runtime']
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'

      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes]
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
          runtime_type = 'io.containerd.runc.v2'
          sandboxer = 'podsandbox'

          [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
            SystemdCgroup = false

    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['/opt/cni/bin']
      conf_dir = '/etc/cni/net.d'
"""


def interpreter() -> Path:
    """The real Python behind the test run (what a venv's bin/python3 points to)."""
    return Path(getattr(sys, "_base_executable", sys.executable)).resolve()


@pytest.fixture(scope="session")
def containerd_default_config() -> str:
    """`containerd config default`: what kubeadm-style node setups write to config.toml."""
    return subprocess.run(
        [require("containerd"), "config", "default"], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture(scope="session")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for the image's /opt/layotto: a real virtual environment (no packages)
    with the real shim script in its bin/."""
    venv = tmp_path_factory.mktemp("payload") / "layotto"
    subprocess.run([str(interpreter()), "-m", "venv", "--without-pip", str(venv)], check=True)
    shutil.copy2(SHIM_SCRIPT, venv / "bin" / SHIM)
    ship_policy(venv)
    return venv


def ship_policy(venv: Path) -> None:
    """The default policy where deploy/installer/Containerfile puts it in the payload."""
    (venv / "share" / "layotto").mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO_ROOT / "deploy" / "policy.yaml", venv / "share" / "layotto" / "policy.yaml")


class FakeNode:
    """A node root in a temporary directory, with the interpreter the payload needs (an
    empty stand-in file) and a fake ``nsenter`` that records its arguments."""

    def __init__(self, base: Path, payload: Path) -> None:
        self.root = base / "root"
        self.payload = payload
        (self.root / "etc").mkdir(parents=True)
        python = self.path(str(interpreter()))
        python.parent.mkdir(parents=True, exist_ok=True)
        python.write_text("")
        python.chmod(0o755)
        self.tools = base / "tools"
        self.tools.mkdir()
        self.nsenter_log = base / "nsenter.log"
        nsenter = self.tools / "nsenter"
        nsenter.write_text(
            f'#!/bin/sh\necho "$*" >> {self.nsenter_log}\nexit "${{FAKE_NSENTER_STATUS:-0}}"\n'
        )
        nsenter.chmod(0o755)
        self.config = self.path("/etc/containerd/config.toml")

    def path(self, node_path: str) -> Path:
        return self.root / node_path.lstrip("/")

    def run(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        environ = {
            "PATH": f"{self.tools}:{os.environ['PATH']}",
            "HOST_ROOT": str(self.root),
            "PAYLOAD": str(self.payload),
            "PYTHON": sys.executable,
            "SKIP_RESTART": "1",
            **env,
        }
        r = subprocess.run([str(INSTALLER), *args], env=environ, capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"install.sh {' '.join(args)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
        return r

    def restarts(self) -> list[str]:
        return self.nsenter_log.read_text().splitlines() if self.nsenter_log.exists() else []

    def files(self) -> dict[str, bytes | str]:
        """Every file and symlink under the root (symlinks as "-> target")."""
        result: dict[str, bytes | str] = {}
        for p in sorted(self.root.rglob("*")):
            rel = "/" + str(p.relative_to(self.root))
            if p.is_symlink():
                result[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                result[rel] = p.read_bytes()
        return result


@pytest.fixture
def node(tmp_path: Path, payload: Path) -> FakeNode:
    return FakeNode(tmp_path, payload)


def layotto_runtime(config: dict) -> dict:
    plugin = CRI_V3 if config["version"] == 3 else CRI_V2
    return config["plugins"][plugin]["containerd"]["runtimes"]["layotto"]


def without_layotto(config: dict) -> dict:
    config = copy.deepcopy(config)
    del config["plugins"][CRI_V3 if config["version"] == 3 else CRI_V2]["containerd"]["runtimes"]["layotto"]
    return config


def prune_empty(value: Any) -> Any:
    """*value* without tables that are empty (or hold only empty tables)."""
    if isinstance(value, dict):
        pruned = {k: prune_empty(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v != {}}
    return value


@pytest.mark.parametrize("original", ["missing", "debian-package", "containerd-default", "version-3"])
def test_install_twice_then_uninstall(node: FakeNode, original: str, containerd_default_config: str):
    text = {
        "missing": None,
        "debian-package": DEBIAN_PACKAGE_CONFIG,
        "containerd-default": containerd_default_config,
        "version-3": CONTAINERD_2_CONFIG,
    }[original]
    if text is not None:
        node.config.parent.mkdir(parents=True)
        node.config.write_text(text)
        node.config.chmod(0o600)
    before = node.files()

    node.run()
    installed = node.config.read_text()
    config = tomllib.loads(installed)
    assert config["version"] == (3 if original == "version-3" else 2)
    assert layotto_runtime(config) == {
        "runtime_type": RUNTIME_TYPE,
        "runtime_path": RUNTIME_PATH,
        "pod_annotations": ["layotto.io/*"],
    }
    assert installed.count(BEGIN) == 1 and installed.count(".runtimes.layotto]") == 1
    backup = node.config.with_name("config.toml.layotto-backup")
    if text is None:
        assert not backup.exists()
        assert stat.S_IMODE(node.config.stat().st_mode) == 0o644
    else:
        # Appended, nothing else touched; mode kept; the original kept once.
        assert installed.startswith(text + "\n" + BEGIN)
        assert prune_empty(without_layotto(config)) == prune_empty(tomllib.loads(text))
        assert stat.S_IMODE(node.config.stat().st_mode) == 0o600
        assert backup.read_text() == text

    # The files: the payload under a version directory, the wrapper, the record.
    assert os.readlink(node.path("/opt/layotto")) == "layotto-0.1.0"
    assert (node.path("/opt/layotto-0.1.0/pyvenv.cfg")).is_file()
    wrapper = node.path(f"/usr/local/bin/{SHIM}")
    assert os.access(wrapper, os.X_OK)
    assert f"exec '{RUNTIME_PATH}' \"$@\"" in wrapper.read_text()
    version = subprocess.run(
        [str(node.path(RUNTIME_PATH)), "--version"], capture_output=True, text=True, check=True
    )
    assert "Version: 0.1.0" in version.stdout and RUNTIME_TYPE in version.stdout
    assert node.path("/etc/layotto/installed").read_text() == (
        "version=0.1.0\nprefix=/opt/layotto\nshim=/usr/local/bin/containerd-shim-layotto-v1\n"
        f"runtime_type={RUNTIME_TYPE}\ncontainerd_config=/etc/containerd/config.toml\n"
    )

    policy = node.path("/etc/layotto/policy.yaml")
    assert policy.read_text() == (REPO_ROOT / "deploy" / "policy.yaml").read_text()
    assert stat.S_IMODE(policy.stat().st_mode) == 0o600

    after_first = node.files()
    second = node.run()
    assert node.files() == after_first, "a second run changed the node"
    assert "already has the layotto runtime" in second.stdout

    node.run("--uninstall")
    after = node.files()
    assert after == before, "uninstall did not restore the node: " + ", ".join(
        sorted(set(after) ^ set(before)) + [k for k in set(after) & set(before) if after[k] != before[k]]
    )


def test_a_restart_only_when_the_config_changes_and_a_failed_one_is_retried(node: FakeNode):
    node.config.parent.mkdir(parents=True)
    node.config.write_text(DEBIAN_PACKAGE_CONFIG)
    restart = "--target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd"

    failed = node.run(check=False, SKIP_RESTART="0", FAKE_NSENTER_STATUS="1")
    assert failed.returncode == 1
    assert "could not restart containerd on the node" in failed.stderr
    assert node.restarts() == [restart]
    assert not node.path("/etc/layotto/installed").exists()
    assert layotto_runtime(tomllib.loads(node.config.read_text()))  # the config is in place

    node.run(SKIP_RESTART="0")  # the config is unchanged now, but the restart is still owed
    assert node.restarts() == [restart] * 2
    assert node.path("/etc/layotto/installed").exists()

    node.run(SKIP_RESTART="0")
    node.run(SKIP_RESTART="0", LAYOTTO_VERSION="0.2.0")  # an upgrade leaves the config alone
    assert node.restarts() == [restart] * 2
    assert os.readlink(node.path("/opt/layotto")) == "layotto-0.2.0"
    assert node.path("/opt/layotto-0.1.0").is_dir()  # a running host may still use it

    node.run("--uninstall", SKIP_RESTART="0", CONTAINERD_SERVICE="containerd.service")
    assert node.restarts()[-1] == restart + ".service"
    assert node.config.read_text() == DEBIAN_PACKAGE_CONFIG
    assert not node.path("/opt/layotto-0.1.0").exists() and not node.path("/opt/layotto-0.2.0").exists()


def test_a_layotto_runtime_added_by_hand_is_left_alone(node: FakeNode):
    by_hand = DEBIAN_PACKAGE_CONFIG + (
        '\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.layotto]\n'
        '  runtime_type = "io.containerd.layotto.v1"\n'
    )
    node.config.parent.mkdir(parents=True)
    node.config.write_text(by_hand)
    r = node.run()
    assert "already has a layotto runtime that this installer did not add" in r.stdout
    assert node.config.read_text() == by_hand
    assert not node.config.with_name("config.toml.layotto-backup").exists()
    node.run("--uninstall")
    assert node.config.read_text() == by_hand


@pytest.mark.parametrize(
    ("config", "message"),
    [
        # Docker's containerd.io package: version 1, CRI disabled.
        ('disabled_plugins = ["cri"]\n', "has no top-level 'version'"),
        ("version = 4\n[plugins]\n", "says version = 4"),
        ('version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n', "CRI plugin is disabled"),
        (
            'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
            '  runtimes = { runc = { runtime_type = "io.containerd.runc.v2" } }\n',
            "would not be valid TOML",
        ),
        (DEBIAN_PACKAGE_CONFIG + "\n" + BEGIN + "\n[oops]\n", "without its '# END layotto runtime' line"),
    ],
    ids=["version-1", "version-4", "cri-disabled", "inline-runtimes-table", "unterminated-block"],
)
def test_a_config_it_cannot_edit_stops_it_before_anything_changes(node: FakeNode, config: str, message: str):
    node.config.parent.mkdir(parents=True)
    node.config.write_text(config)
    before = node.files()
    r = node.run(check=False)
    assert r.returncode == 1
    assert message in r.stderr
    assert node.files() == before


def test_a_node_without_the_payloads_python_is_refused(node: FakeNode):
    node.path(str(interpreter())).unlink()
    before = node.files()
    r = node.run(check=False)
    assert r.returncode == 1
    assert f"the node has no {interpreter()}" in r.stderr
    assert node.files() == before


def test_someone_elses_shim_on_the_path_is_not_overwritten(node: FakeNode):
    theirs = node.path(f"/usr/local/bin/{SHIM}")
    theirs.parent.mkdir(parents=True)
    theirs.write_text('#!/bin/sh\nexec /somewhere/else "$@"\n')
    before = node.files()
    r = node.run(check=False)
    assert r.returncode == 1 and "was not installed by this installer" in r.stderr
    assert node.files() == before


def test_install_sh_is_shellcheck_clean():
    r = subprocess.run([require("shellcheck"), "--shell=sh", str(INSTALLER)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- a real containerd

#: Node paths in `containerd config default` that a private containerd must not use.
SYSTEM_PATHS = (
    "/run/containerd",
    "/var/lib/containerd",
    "/opt/containerd",
    "/etc/cni",
    "/opt/cni",
    "/var/run",
)


def private_config(default: str, c: Containerd) -> str:
    """`containerd config default` with every path a daemon writes to moved under c.base,
    and the snapshotter this machine supports."""
    replacements = [
        (r'(?m)^root = ".*"$', f"root = {json.dumps(str(c.root))}"),
        (r'(?m)^state = ".*"$', f"state = {json.dumps(str(c.state))}"),
        (r'(?m)^  address = "/run/containerd/containerd.sock"$', f"  address = {json.dumps(str(c.address))}"),
        (r'(?m)^( *)path = "/opt/containerd"$', rf"\1path = {json.dumps(str(c.base / 'opt'))}"),
        (r'(?m)^( *)bin_dir = ".*"$', rf"\1bin_dir = {json.dumps(str(c.cni_bin_dir))}"),
        (r'(?m)^( *)conf_dir = ".*"$', rf"\1conf_dir = {json.dumps(str(c.cni_conf_dir))}"),
        (r'(?m)^( *)stream_server_port = ".*"$', r'\1stream_server_port = "0"'),
        (r'(?m)^( *)snapshotter = "overlayfs"$', rf"\1snapshotter = {json.dumps(c.snapshotter)}"),
    ]
    for pattern, replacement in replacements:
        default, n = re.subn(pattern, replacement, default)
        assert n >= 1, f"`containerd config default` has no line matching {pattern}"

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    left = [s for s in strings(tomllib.loads(default)) if s.startswith(SYSTEM_PATHS)]
    assert not left, f"node paths left in the private config: {left}"
    return default


class NodeContainerd(Containerd):
    """A private containerd whose config.toml is whatever is in its config_path (here:
    what the installer wrote), instead of one the harness generates."""

    def config_toml(self) -> str:
        return self.config_path.read_text()


@pytest.fixture(scope="module")
def built_payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/opt/layotto as deploy/installer/Containerfile builds it: a virtual environment
    with the project installed from a copy of its sources (not editable)."""
    work = tmp_path_factory.mktemp("built-payload")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "build_protos.py", "README.md"):
        shutil.copy2(REPO_ROOT / name, src / name)
    for name in ("shim", "host", "abi", "images"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = work / "layotto"
    subprocess.run([str(interpreter()), "-m", "venv", str(venv)], check=True)
    r = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir", str(src)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"pip install of the payload failed:\n{r.stdout}{r.stderr}"
    assert os.access(venv / "bin" / SHIM, os.X_OK)
    ship_policy(venv)
    return venv


@pytest.mark.integration
def test_containerd_runs_a_function_pod_from_the_installed_config(
    containerd_default_config: str, built_payload: Path, wasm_dir: Path, tmp_path: Path
):
    """Debian's containerd, started from the config the installer made out of
    `containerd config default`, knows the layotto handler, and a pod on it runs hello
    through the shim the installer put on containerd's PATH, from the installed payload."""
    for tool in ("containerd", "ctr", "runc"):
        require(tool)
    base = make_base()
    prefix, shim_dir = base / "opt" / "layotto", base / "bin"
    c = NodeContainerd(base, cri=True, snapshotter=default_snapshotter(), path_prepend=[shim_dir])
    c.config_path.write_text(private_config(containerd_default_config, c))
    node_env = {
        "PATH": os.environ["PATH"],
        "HOST_ROOT": "/",
        "PAYLOAD": str(built_payload),
        "PYTHON": sys.executable,
        "LAYOTTO_PREFIX": str(prefix),
        "SHIM_DIR": str(shim_dir),
        "CONTAINERD_CONFIG": str(c.config_path),
        "LAYOTTO_STATE_DIR": str(base / "etc" / "layotto"),
        "SKIP_RESTART": "1",
    }
    subprocess.run([str(INSTALLER)], env=node_env, check=True, capture_output=True, timeout=120)
    try:
        c.start()
        with CriClient(c.address) as client:
            # CRI's own view of its config: the layotto runtime as the installer wrote it.
            cri_config = json.loads(client.status(verbose=True).info["config"])
            runtimes = cri_config["containerd"]["runtimes"]
            assert runtimes["layotto"]["runtimeType"] == RUNTIME_TYPE
            assert runtimes["layotto"]["runtimePath"] == f"{prefix}/bin/{SHIM}"
            assert runtimes["layotto"]["PodAnnotations"] == ["layotto.io/*"]
            assert "runc" in runtimes  # the default runtime is still there

            # The default config's sandbox image (any content: layotto never runs it) and hello.
            sandbox_image = cri_config["sandboxImage"]
            builder.build_image(
                tmp_path / "pause.tar", {"/pause": b"pause\n"}, name=sandbox_image, cmd=["/pause"]
            )
            builder.build_image(
                tmp_path / "hello.tar",
                {"/hello.wasm": wasm_dir / "hello.wasm"},
                name=HELLO,
                cmd=["/hello.wasm"],
            )
            for archive, image in (("pause.tar", sandbox_image), ("hello.tar", HELLO)):
                c.import_image(tmp_path / archive, namespace="k8s.io")
                client.wait_image(image)

            pod = client.run_pod("hello", "default", str(uuid.uuid4()), tmp_path / "logs", handler="layotto")
            sandbox = client.pod_sandbox_status(pod.id).status
            assert sandbox.state == SANDBOX_READY and sandbox.runtime_handler == "layotto"
            cid = client.create_container(pod.id, pod.config, "hello", HELLO)
            client.start_container(cid)
            status = client.wait_container_state(cid, CONTAINER_EXITED, timeout=30)
            assert status.exit_code == 0, status
            lines = read_cri_log(client.log_file(pod, cid))
            assert [(x.stream, x.content) for x in lines] == [("stdout", GREETING)]

            # containerd ran the wrapper it found on its PATH (1.6.20 ignores runtime_path;
            # later versions run runtime_path itself), and the node host runs the payload.
            bundle = c.state / "io.containerd.runtime.v2.task" / "k8s.io" / pod.id
            assert (bundle / "shim-binary-path").read_text() in (str(shim_dir / SHIM), f"{prefix}/bin/{SHIM}")
            host = find_host_process(c)
            assert host is not None, "no layotto node host runs for this containerd"
            assert host.cmdline()[0].startswith(f"{prefix}/bin/"), host.cmdline()

            client.remove_pod(pod.id)
    finally:
        c.stop(remove_base=False)
        subprocess.run([str(INSTALLER), "--uninstall"], env=node_env, capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_an_edited_policy_is_never_overwritten_or_removed(node: FakeNode):
    node.run()
    policy = node.path("/etc/layotto/policy.yaml")
    policy.write_text("namespaces: {}\n")
    second = node.run()
    assert "policy.yaml exists; leaving it as it is" in second.stdout
    assert policy.read_text() == "namespaces: {}\n"
    gone = node.run("--uninstall")
    assert "kept /etc/layotto/policy.yaml: it was edited" in gone.stdout
    assert policy.read_text() == "namespaces: {}\n"
