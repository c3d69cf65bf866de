"""Secrets from Kubernetes Secrets, through the ``kubernetes`` client.

Metadata:

- ``namespace``: where the Secrets are (default: the pod's own namespace in a cluster,
  else the kubeconfig context's, else ``default``). A namespace's secret ``N/S`` (the
  name ``host.scoping`` gives secret ``S`` asked from namespace ``N``, unless the store
  says ``secretPrefix: none``) is Secret ``S`` of Kubernetes namespace ``N`` instead: the
  node host's service account then needs to read Secrets in the tenants' namespaces.
- ``kubeconfigPath``: a kubeconfig file to use (with optional ``context``). Without it,
  the in-cluster service account is used when ``KUBERNETES_SERVICE_HOST`` is set, and the
  default kubeconfig (``$KUBECONFIG``, ``~/.kube/config``) otherwise.
- ``requestTimeout``: seconds per API call (default 10).

A Secret's ``data`` values are base64-decoded and read as UTF-8 (bytes that are not
UTF-8 become U+FFFD). ``get`` of a missing Secret raises NotFound.

Only the decoding and the configuration logic are tested here (no Kubernetes API server
runs in the test environment); the calls themselves are untested against a real cluster.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

from layotto.host.components import ComponentError, NotFound
from layotto.host.components.base import Metadata, meta_float, meta_str

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def decode_secret_data(data: Mapping[str, str] | None, name: str = "") -> dict[str, str]:
    """A Secret's ``data`` (base64 values) as text."""
    decoded: dict[str, str] = {}
    for key, value in (data or {}).items():
        try:
            raw = base64.b64decode(value or "", validate=True)
        except (binascii.Error, ValueError) as e:
            raise ComponentError(f"secret {name!r}: key {key!r} is not base64: {e}") from None
        decoded[key] = raw.decode("utf-8", errors="replace")
    return decoded


def secret_to_dict(secret: client.V1Secret) -> dict[str, str]:
    name = secret.metadata.name if secret.metadata is not None else ""
    return decode_secret_data(secret.data, name or "")


def client_configuration(
    metadata: Metadata, environ: Mapping[str, str] | None = None
) -> tuple[client.Configuration, str]:
    """The API client configuration and the namespace the metadata selects."""
    environ = os.environ if environ is None else environ
    cfg = client.Configuration()
    kubeconfig = meta_str(metadata, "kubeconfigPath")
    context = meta_str(metadata, "context") or None
    namespace = meta_str(metadata, "namespace")
    try:
        if not kubeconfig and environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
            if not namespace and SERVICE_ACCOUNT_NAMESPACE.is_file():
                namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        else:
            path = kubeconfig or environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
            config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
            if not namespace:
                contexts, active = config.list_kube_config_contexts(config_file=path)
                if context:
                    active = next((c for c in contexts if c.get("name") == context), active)
                namespace = (active or {}).get("context", {}).get("namespace", "")
    except (ConfigException, OSError) as e:
        raise ComponentError(f"kubernetes secret store: no usable cluster configuration: {e}") from e
    return cfg, namespace or "default"


class KubernetesSecretStore:
    def __init__(self, metadata: Metadata | None = None, *, name: str = "default") -> None:
        metadata = metadata or {}
        self.name = name
        cfg, self.namespace = client_configuration(metadata)
        self._timeout = meta_float(metadata, "requestTimeout", 10.0)
        self._api_client = client.ApiClient(configuration=cfg)
        self._api = client.CoreV1Api(self._api_client)

    def locate(self, name: str) -> tuple[str, str]:
        """(Kubernetes namespace, Secret name) of secret ``name``: ``N/S`` (a namespace's
        secret, ``host.scoping``) is Secret ``S`` in namespace ``N``; a plain name is in the
        store's ``namespace``."""
        namespace, sep, secret = name.partition("/")
        return (namespace, secret) if sep else (self.namespace, name)

    def get(self, name: str) -> dict[str, str]:
        namespace, secret_name = self.locate(name)
        if not namespace or not secret_name:
            raise NotFound(f"secret store {self.name!r}: no Secret {name!r}")
        try:
            secret = self._api.read_namespaced_secret(secret_name, namespace, _request_timeout=self._timeout)
        except ApiException as e:
            if e.status == 404:
                raise NotFound(
                    f"secret store {self.name!r}: no Secret {secret_name!r} in namespace {namespace!r}"
                ) from None
            raise ComponentError(f"secret store {self.name!r}: {e.status} {e.reason}") from e
        except Exception as e:  # urllib3 connection errors and the like
            raise ComponentError(f"secret store {self.name!r}: {e}") from e
        return secret_to_dict(secret)

    def bulk(self) -> dict[str, dict[str, str]]:
        try:
            secrets = self._api.list_namespaced_secret(self.namespace, _request_timeout=self._timeout)
        except ApiException as e:
            raise ComponentError(f"secret store {self.name!r}: {e.status} {e.reason}") from e
        except Exception as e:
            raise ComponentError(f"secret store {self.name!r}: {e}") from e
        return {s.metadata.name: secret_to_dict(s) for s in secrets.items}

    def close(self) -> None:
        self._api_client.close()
